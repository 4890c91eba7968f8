"""`hybrid run hybrid.yaml`: the whole loop from one file, and `hybrid init DIR` to write that file.

    hybrid init runs/loop                         # runs/loop/hybrid.yaml: every key, its type, default and help
    hybrid run runs/loop/hybrid.yaml              # index -> synth -> embedder -> generator -> eval
    hybrid run runs/loop/hybrid.yaml generator.max_steps=80    # redoes generator and eval only

Each stage is the command of the same name run as a library call, reading the previous stage's
files under `out` (index/, synth/qa.jsonl, embedder/, generator/, eval/). A stage is skipped when
its fingerprint — its resolved settings and the fingerprints of what it reads (the corpus files'
bytes, the upstream stages, the eval questions) — equals the one recorded in
`out/hybrid_stages.json` when it last finished and its output is there: a Makefile for the loop.
The file's sections are the commands' own config dataclasses, so a section takes exactly the keys
that command's `--config` takes, less the paths the loop wires itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from hybrid.config import _hints, _strip_optional, build_config, load_yaml, named, parse_yaml
from hybrid.calibration import CalibrateConfig
from hybrid.factuality import EvalConfig
from hybrid.serve import ServeConfig
from hybrid.tracking import Tracker, TrackingConfig, adapter_scope
from retrieval.atomic import not_its_own, swap_dir_into_place, write_text_atomic
from retrieval.embedder_tuning import EmbedderTuneConfig
from retrieval.errors import InputError, quoted
from retrieval.index import IndexConfig
from tuning.dpo import DPOTuneConfig
from tuning.sft import GeneratorTuneConfig
from tuning.synth import SynthConfig

STAGES = ("index", "synth", "embedder", "generator", "dpo", "calibrate", "eval", "serve")
# dpo (minutes per step on CPU), calibrate and serve (it does not return) run when named in `stages` or --only
DEFAULT_STAGES = ("index", "synth", "embedder", "generator", "eval")
STAGE_FILE = "hybrid_stages.json"
# stages that write into DIR.partial and are swapped in whole at the end: the last good output stays
# until the new one is complete, and an interrupted run with the same settings resumes the partial one
PARTIAL = {"synth": "synth", "eval": "eval"}
# the fields the loop sets itself in each section (the paths between stages and the caller's groups)
WIRED = {"synth": {"index", "out", "groups"}, "embedder": {"index", "out", "qa", "eval_qa"},
         "generator": {"index", "out", "qa", "examples"}, "dpo": {"adapter", "out", "index", "qa", "pairs_file"},
         "calibrate": {"adapter", "qa", "index", "groups"}, "eval": {"qa", "index", "adapters", "out", "groups"},
         "serve": {"index", "adapters", "adapter_dir"}}


@dataclass
class LoopConfig:
    """The whole loop (YAML keys = field names; a section per stage)."""

    corpus: str = field(metadata={"help": "Directory of documents (.md/.txt/.jsonl/.pdf) to learn."})
    out: str = field(default="runs/loop", metadata={"help": "Run directory: every stage's output goes under it."})
    eval_qa: str | None = field(default=None, metadata={
        "help": "Hand-written questions the eval stage scores (none of them is trained on); without it the "
                "eval stage is skipped and the embedder is scored on held-out synthesised questions."})
    groups: list[str] = field(default_factory=list, metadata={
        "flag": "--group", "help": "Access groups every stage may read (and its artifacts are tagged with)."})
    stages: list[str] = field(default_factory=lambda: list(DEFAULT_STAGES), metadata={
        "help": f"Stages to run, in this order: {', '.join(STAGES)} (dpo, calibrate and serve when named)."})
    index: IndexConfig = field(default_factory=IndexConfig, metadata={"help": "hybrid index"})
    synth: SynthConfig = field(default_factory=lambda: SynthConfig(index="", out=""), metadata={"help": "hybrid synth"})
    embedder: EmbedderTuneConfig = field(default_factory=lambda: EmbedderTuneConfig(index="", out=""),
                                         metadata={"help": "hybrid tune embedder"})
    generator: GeneratorTuneConfig = field(default_factory=lambda: GeneratorTuneConfig(out=""),
                                           metadata={"help": "hybrid tune generator"})
    dpo: DPOTuneConfig = field(default_factory=lambda: DPOTuneConfig(adapter="", out=""), metadata={
        "help": "hybrid tune dpo (on the generator's adapter, pairs sampled on the synthesised questions)"})
    calibrate: CalibrateConfig = field(default_factory=lambda: CalibrateConfig(adapter="", qa=""), metadata={
        "help": "hybrid tune calibrate (the last adapter, on the questions the generator held out)"})
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(qa=""), metadata={"help": "hybrid eval"})
    serve: ServeConfig = field(default_factory=lambda: ServeConfig(index=""), metadata={
        "help": "hybrid serve (the index and the last adapter, as 'raft')"})
    tracking: TrackingConfig = field(default_factory=TrackingConfig, metadata={"help": "MLflow tracking"})

    def problems(self) -> list[str]:
        out = [f"stages: unknown stage {quoted(s)} (known: {', '.join(STAGES)})" for s in self.stages if s not in STAGES]
        if not self.stages:
            out.append("stages: names no stage; list the ones to run, e.g. stages=index,synth")
        return out + _path_problems(self) + _empty_names(self)


def _path_problems(cfg: LoopConfig) -> list[str]:
    # an empty path is the current directory to Path(""): never what was meant
    out = [f"{key}: empty; name a directory" for key in ("corpus", "out") if not getattr(cfg, key).strip()]
    if cfg.corpus.strip() and not _is(cfg.corpus, Path.is_dir):
        out.append(f"corpus: {named(cfg.corpus)} is not a directory of documents")
    if cfg.eval_qa is not None and not cfg.eval_qa.strip():
        out.append("eval_qa: empty; name a file of questions, or null to skip the eval stage")
    elif cfg.eval_qa is not None and not _is(cfg.eval_qa, Path.is_file):
        out.append(f"eval_qa: {named(cfg.eval_qa)} does not exist")
    return out


def _empty_names(cfg: LoopConfig) -> list[str]:
    """An empty tracking name would silently mean the default, an empty group no group: refused."""
    t = cfg.tracking
    out = [f"tracking.{key}: empty; name one, or null for the default" for key in ("uri", "experiment", "run_name")
           if getattr(t, key) is not None and not getattr(t, key).strip()]
    return out + [f"{key}: an empty group name in {quoted(groups)}; list group names (none: public documents only)"
                  for key, groups in (("groups", cfg.groups), ("tracking.store_groups", t.store_groups))
                  if not all(g.strip() for g in groups)]


def _is(path: str, test: Callable[[Path], bool]) -> bool:
    """`test(Path(path))`, False where the file system cannot even look (a name too long, say)."""
    try:
        return bool(path.strip()) and test(Path(path))
    except OSError:
        return False


# --- overrides and the resolved sections -----------------------------------------------------------
def parse_overrides(pairs: list[str]) -> dict:
    """`generator.max_steps=80` pairs as the nested mapping `build_config` takes (values read as YAML;
    a training setting may skip its `train.`: `generator.learning_rate=1e-4`, as in the file).
    A pair that cannot take effect is refused: no key part, no value, a key given twice."""
    nested: dict = {}
    for pair in pairs:
        key, eq, raw = pair.partition("=")
        if not eq or not key:
            raise InputError(f"override '{named(pair, 80)}': use KEY=VALUE, e.g. generator.max_steps=80")
        path = key.split(".")  # `generator.max_steps` is generator.train.max_steps: the loader hoists it
        if not all(p.strip() for p in path):
            raise InputError(f"override '{named(pair, 80)}': an empty part in the key; use dotted names, e.g. "
                             f"generator.max_steps=80")
        if not raw.strip():
            raise InputError(f"override '{named(pair, 80)}': no value; give one (null unsets an optional key)")
        node = nested
        for depth, part in enumerate(path[:-1], 1):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise InputError(f"override '{named(pair, 80)}': {named('.'.join(path[:depth]), 80)} is given a value "
                                 f"by another override; give the section's keys or the value, not both")
        if path[-1] in node:
            raise InputError(f"override '{named(pair, 80)}': {named(key, 80)} is given twice; keep one")
        node[path[-1]] = parse_yaml(raw, f"override '{named(pair, 80)}'", invalid_as_text=True)
    return nested


def load_loop(path: str | Path, overrides: list[str] = ()) -> LoopConfig:
    """The loop's config: the YAML file, then the overrides; unknown keys and wrong types refused (all listed)."""
    given = parse_overrides(list(overrides))
    for name in ("groups", "stages"):  # stages=index,synth on the command line
        if isinstance(given.get(name), str):
            given[name] = [v for v in given[name].split(",") if v]
    loaded = load_yaml(path)
    set_here = [f"{name}.{key}" for name, keys in WIRED.items() for key in sorted(keys)
                for src in (loaded, given) if isinstance(src.get(name), dict) and key in src[name]]
    set_here += [f"{name}.train.groups" for name in ("embedder", "generator", "dpo") for src in (loaded, given)
                 if isinstance(src.get(name), dict) and ("groups" in src[name] or isinstance(src[name].get("train"), dict)
                                                         and "groups" in src[name]["train"])]
    if set_here:
        raise InputError(f"--config {named(path)}: {', '.join(set_here)} are set by the loop (the paths between stages "
                         f"under 'out', the groups from 'groups'); remove them")
    for name, keys in WIRED.items():  # placeholders for the required paths; sections() fills them in
        section = given.setdefault(name, {})
        if isinstance(section, dict):  # a section given a value (synth=5): build_config refuses it, naming it
            section.update({k: "" for k in keys if k in ("index", "out", "qa", "adapter")})
    return build_config(LoopConfig, path, given, keyed=True)


def last_adapter(cfg: LoopConfig) -> Path:
    """The adapter the loop ends with: DPO's when dpo is among the stages, else the generator's."""
    return Path(cfg.out) / ("dpo" if "dpo" in cfg.stages else "generator")


def sections(cfg: LoopConfig) -> dict[str, Any]:
    """Each stage's config with the loop's paths and groups filled in, each validated by its own rules."""
    out = Path(cfg.out)
    adapters = {"raft": str(out / "generator"), **({"dpo": str(out / "dpo")} if "dpo" in cfg.stages else {})}
    wired = {
        "synth": {"index": str(out / "index"), "out": str(out / "synth.partial" / "qa.jsonl"), "groups": cfg.groups},
        "embedder": {"index": str(out / "index"), "out": str(out / "embedder"), "qa": str(out / "synth" / "qa.jsonl"),
                     "eval_qa": cfg.eval_qa},
        "generator": {"index": str(out / "index"), "out": str(out / "generator"), "qa": str(out / "synth" / "qa.jsonl"),
                      "examples": None},
        "dpo": {"adapter": str(out / "generator"), "out": str(out / "dpo"), "index": str(out / "index"),
                "qa": str(out / "synth" / "qa.jsonl"), "pairs_file": ""},
        # the generator's held-out questions: synthesised, answerable and not, never trained on
        "calibrate": {"adapter": str(last_adapter(cfg)), "qa": str(out / "generator" / "held_out.jsonl"),
                      "index": str(out / "index"), "groups": cfg.groups},
        "eval": {"qa": cfg.eval_qa or "", "index": str(out / "index"), "adapters": adapters,
                 "out": str(out / "eval.partial"), "groups": cfg.groups},
        "serve": {"index": str(out / "index"), "adapters": {"raft": str(last_adapter(cfg))}, "adapter_dir": None},
    }
    resolved = {"index": cfg.index}
    for name, paths in wired.items():
        section = dataclasses.replace(getattr(cfg, name), **paths)
        if name in ("embedder", "generator", "dpo"):
            section.train = dataclasses.replace(section.train, groups=cfg.groups)
        resolved[name] = section
    return resolved


# --- fingerprints --------------------------------------------------------------------------------
def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def tree_digest(root: str | Path) -> str:
    """sha256 over every file under `root` (relative path and bytes), in sorted order."""
    h = hashlib.sha256()
    root = Path(root)
    for p in sorted(x for x in root.rglob("*") if x.is_file()):
        h.update(str(p.relative_to(root)).encode() + b"\0")
        with p.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def fingerprints(cfg: LoopConfig, resolved: dict) -> dict[str, str]:
    """Each stage's fingerprint: its settings and those of everything it reads."""
    eval_qa = hashlib.sha256(Path(cfg.eval_qa).read_bytes()).hexdigest() if cfg.eval_qa else None
    fp = {"index": _digest(["index", dataclasses.asdict(resolved["index"]), tree_digest(cfg.corpus)])}
    fp["synth"] = _digest(["synth", dataclasses.asdict(resolved["synth"]), fp["index"]])
    fp["embedder"] = _digest(["embedder", dataclasses.asdict(resolved["embedder"]), fp["index"], fp["synth"], eval_qa])
    fp["generator"] = _digest(["generator", dataclasses.asdict(resolved["generator"]), fp["index"], fp["synth"]])
    fp["dpo"] = _digest(["dpo", dataclasses.asdict(resolved["dpo"]), fp["index"], fp["synth"], fp["generator"]])
    adapter = fp["dpo"] if "dpo" in cfg.stages else fp["generator"]
    fp["calibrate"] = _digest(["calibrate", dataclasses.asdict(resolved["calibrate"]), fp["index"], adapter])
    # the eval reads every adapter and, when calibrated, the threshold written beside the last one
    fp["eval"] = _digest(["eval", dataclasses.asdict(resolved["eval"]), fp["index"], fp["generator"], eval_qa,
                          *([fp["dpo"]] if "dpo" in cfg.stages else []),
                          *([fp["calibrate"]] if "calibrate" in cfg.stages else [])])
    fp["serve"] = ""  # never up to date: serving is not an output
    return fp


# --- the stages ----------------------------------------------------------------------------------
def _run_stage(name: str, cfg: LoopConfig, sec, progress: bool, log: Callable[[str], None]) -> None:
    out = Path(cfg.out)
    if name == "index":
        from retrieval.index import build_index

        build_index(cfg.corpus, out / "index", sec, progress=progress)
    elif name == "synth":
        # written beside the last good questions; swapped in whole only when it finishes (a rerun
        # after an interruption resumes the partial file with the same settings)
        from tuning.synth import synthesize

        synthesize(sec, progress=progress, log=log)
    elif name == "embedder":
        from retrieval.embedder_tuning import tune_embedder

        tune_embedder(sec, progress=progress)
    elif name == "generator":
        from tuning.sft import tune_generator

        tune_generator(sec, progress=progress, log=log)
    elif name == "dpo":
        from tuning.dpo import tune_dpo

        tune_dpo(sec, progress=progress, log=log)
    elif name == "calibrate":
        from hybrid.calibration import calibrate

        calibrate(sec, log=log)
    elif name == "eval":
        from hybrid.factuality import run_eval

        run_eval(sec, progress=progress)
    elif name == "serve":
        from hybrid.serve import run

        run(sec, log=log)


def _lineage(cfg: LoopConfig, resolved: dict, name: str, fp: dict[str, str]) -> dict[str, str]:
    tags = {"hybrid.access_scope": ",".join(sorted(cfg.groups)) or "public", "hybrid.index_fingerprint": fp["index"]}
    if name in ("generator", "dpo", "calibrate", "eval"):
        tags["hybrid.base_model"] = str(resolved["generator"].base_model or "smollm2")
    return tags


def _output(name: str, cfg: LoopConfig) -> Path | None:
    out = Path(cfg.out)
    if name == "serve":
        return None
    if name == "calibrate":
        from tuning.abstention import CAL_FILE

        return last_adapter(cfg) / CAL_FILE
    return out / {"index": "index", "synth": "synth/qa.jsonl", "embedder": "embedder", "generator": "generator",
                  "dpo": "dpo", "eval": "eval/report.json"}[name]


def _foreign_outputs(cfg: LoopConfig, chosen) -> list[str]:
    """The swapped-in output directories (synth/, eval/) among `chosen` that are not the loop's own."""
    out = Path(cfg.out)
    return [f"{named(out / PARTIAL[n])}: exists and is not the {n} stage's output (no {_output(n, cfg).name} in it); "
            f"move what is in it, or set another 'out'"
            for n in PARTIAL if n in chosen and (n != "eval" or cfg.eval_qa)
            and not_its_own(out / PARTIAL[n], _output(n, cfg).name)]


def read_record(path: Path) -> dict[str, str]:
    """OUT/hybrid_stages.json: {stage: fingerprint} of what last finished ({} before the first run)."""
    if not path.is_file():
        return {}
    try:
        done = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        done = None
    if not isinstance(done, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in done.items()):
        raise InputError(f"{named(path)}: not the loop's stage record (a mapping of stage to fingerprint; truncated "
                         f"or edited?); delete it and every stage runs again")
    return done


def parse_only(text: str | None) -> list[str] | None:
    """`--only index,synth` as stage names (None: not given); text naming no stage is refused, never
    read as "not given" (which would run every stage)."""
    if text is None:
        return None
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise InputError(f"--only '{named(text, 80)}': names no stage; give one or more, e.g. --only index,synth "
                         f"(known: {', '.join(STAGES)})")
    return names


def run_loop(cfg: LoopConfig, only: list[str] | None = None, progress: bool = True,
             log: Callable[[str], None] = print) -> dict[str, str]:
    """Run the loop's stages in order, skipping those up to date; returns {stage: "ran" | "up to date" | "skipped"}.

    Raises:
        InputError: a section's own problems (naming the section), or any stage's bad input.
    """
    out = Path(cfg.out)
    resolved = sections(cfg)
    chosen = only or cfg.stages
    problems = [f"{name}: {p}" for name in STAGES[1:] if name in chosen and (name != "eval" or cfg.eval_qa)
                for p in resolved[name].problems()]
    t = cfg.tracking
    if t.backend == "mlflow" and t.log_adapters and (missing := sorted(set(cfg.groups) - set(t.store_groups))):
        problems.append(f"tracking.log_adapters: the adapter will be trained on {', '.join(cfg.groups)}; the store is "
                        f"declared for {', '.join(t.store_groups) or 'public artifacts only'} (tracking.store_groups), "
                        f"lacking {', '.join(missing)}: add them only if this store may hold them")
    if only and (bad := [s for s in only if s not in STAGES]):
        problems.append(f"--only {named(','.join(bad), 80)}: unknown stage (known: {', '.join(STAGES)})")
    problems += _foreign_outputs(cfg, chosen)  # before any stage runs, not when its output is swapped in
    if problems:
        raise InputError("; ".join(problems))
    out.mkdir(parents=True, exist_ok=True)
    record_file = out / STAGE_FILE
    done = read_record(record_file)
    scope = ",".join(sorted(cfg.groups)) or "public"
    tracker = Tracker(cfg.tracking, out, {"hybrid.access_scope": scope, "hybrid.corpus": str(cfg.corpus)}) \
        if cfg.tracking.backend == "mlflow" else None
    try:
        status = _stages(cfg, resolved, out, done, record_file, only, progress, log, tracker)
    except BaseException:
        if tracker is not None:
            tracker.end("FAILED")
        raise
    if tracker is not None:
        tracker.end()
    return status


def _stages(cfg, resolved, out, done, record_file, only, progress, log, tracker) -> dict[str, str]:
    status = {}
    for name in [s for s in STAGES if s in cfg.stages or only and s in only]:
        if only and name not in only:
            status[name] = "skipped"
            continue
        if name == "eval" and not cfg.eval_qa:
            status[name] = "skipped"
            log("eval: skipped (no eval_qa: no hand-written questions to score)")
            continue
        fps = fingerprints(cfg, resolved)  # recomputed: an upstream stage that just ran changed its inputs
        fp = fps[name]
        if name != "serve" and done.get(name) == fp and _output(name, cfg).exists():
            status[name] = "up to date"
            log(f"{name}: up to date")
            continue
        partial = out / f"{PARTIAL[name]}.partial" if name in PARTIAL else None
        if partial is not None and (foreign := _foreign_outputs(cfg, [name])):  # put there while earlier stages ran
            raise InputError(foreign[0])
        if partial is not None:
            if partial.exists() and done.get(partial.name) != fp:
                shutil.rmtree(partial)  # a partial run with other settings cannot be resumed
            partial.mkdir(exist_ok=True)
            done[partial.name] = fp
            write_text_atomic(record_file, json.dumps(done, indent=2))
        t0 = time.perf_counter()
        log(f"{name}: running")
        _run_stage(name, cfg, resolved[name], progress, log)
        if partial is not None:
            swap_dir_into_place(partial, out / PARTIAL[name])
            done.pop(partial.name)
        done[name] = fp
        write_text_atomic(record_file, json.dumps(done, indent=2))
        status[name] = "ran"
        if tracker is not None and name not in ("serve", "calibrate"):  # calibrate's numbers: in the eval's report
            tracker.stage(name, resolved[name], fp, _lineage(cfg, resolved, name, fps),
                          adapter_scope(out) if name == "generator" else None)
        log(f"{name}: done in {time.perf_counter() - t0:.1f} s")
    return status


def provenance(path: str | Path, overrides: list[str] = ()) -> list[tuple[str, Any, str]]:
    """Every resolved key of the loop as (dotted key, value, where it came from: default | file | override)."""
    cfg = load_loop(path, overrides)
    loaded, given = load_yaml(path), parse_overrides(list(overrides))

    def has(tree, keys) -> bool:
        for k in keys:
            if not isinstance(tree, dict) or k not in tree:
                return False
            tree = tree[k]
        return True

    rows = []

    def walk(obj, keys: list[str], skip: set[str]):
        for f in dataclasses.fields(obj):
            if f.name in skip:
                continue
            value, here = getattr(obj, f.name), keys + [f.name]
            if dataclasses.is_dataclass(value):
                walk(value, here, WIRED.get(f.name, set()) if not keys else {"groups"} if f.name == "train" else set())
                continue
            # a training setting may be written at its section's level (the loader hoists it)
            short = [k for k in here if k != "train"]
            where = "override" if has(given, here) or has(given, short) else \
                "file" if has(loaded, here) or has(loaded, short) else "default"
            rows.append((".".join(here), value, where))

    walk(cfg, [], set())
    return rows


# --- hybrid init ---------------------------------------------------------------------------------
def _type_name(tp) -> str:
    tp, optional = _strip_optional(tp)
    if typing.get_origin(tp) is typing.Literal:
        name = "one of " + " | ".join(map(str, typing.get_args(tp)))
    elif typing.get_origin(tp) in (list, dict):
        name = {list: "list of names", dict: "mapping of names to paths"}[typing.get_origin(tp)]
    else:
        name = getattr(tp, "__name__", str(tp))
    return name + (" or null" if optional else "")


def _yaml_value(v) -> str:
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


def _section_lines(cls, instance, skip: set[str], indent: str) -> list[str]:
    lines = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        value = getattr(instance, f.name)
        help_text = " ".join(str(f.metadata.get("help", "")).split())
        if dataclasses.is_dataclass(hints[f.name]):  # a section (the loop's paths left out) or `train`
            lines.append(f"{indent}{f.name}:  # {help_text or 'settings'}")
            wired = WIRED.get(f.name, set()) if cls is LoopConfig else set()
            lines += _section_lines(hints[f.name], value, wired | ({"groups"} if f.name == "train" else set()),
                                    indent + "  ")
            continue
        lines.append(f"{indent}# {help_text} ({_type_name(hints[f.name])})")
        lines.append(f"{indent}{f.name}: {_yaml_value(value)}")
    return lines


def init_text(corpus: str = "corpora/brindle/docs", eval_qa: str | None = "corpora/brindle/qa.jsonl") -> str:
    """hybrid.yaml with every key of every section, commented with its help and type, at its default
    (generated from the config dataclasses: one source for help, comments and defaults)."""
    example = LoopConfig(corpus=corpus, eval_qa=eval_qa)
    head = ["# hybrid.yaml: the whole loop (hybrid run hybrid.yaml [KEY=VALUE ...]). Every key is at its default;",
            "# the paths between stages are set by the loop. Delete what you do not change.", ""]
    return "\n".join(head + _section_lines(LoopConfig, example, set(), "")) + "\n"


def init(directory: str | Path, corpus: str = "corpora/brindle/docs",
         eval_qa: str | None = "corpora/brindle/qa.jsonl") -> Path:
    """Write DIR/hybrid.yaml (refusing to overwrite one)."""
    path = Path(directory) / "hybrid.yaml"
    if path.exists():
        raise InputError(f"{path} exists; edit it, or pass another directory")
    write_text_atomic(path, init_text(corpus, eval_qa))
    return path
