"""The loop's file, `hybrid.yaml`: what it may hold, how it is read, where each value came from, and
the commented file `hybrid init` writes.

    hybrid init runs/mine                          # runs/mine/hybrid.yaml: every key commented out at its default
    hybrid config show runs/mine/hybrid.yaml generator.max_steps=80   # every key: value  # default | file | override

A relative path in the file is read against the file's folder, so the file means the same thing
from any working directory; a path given on the command line (an override) against the working
directory, as every command's flags are. Both are stored absolute, which is what `config show`
prints and what the stages' fingerprints hold. The sections are the commands' own config
dataclasses, so a section takes exactly the keys that command's `--config` takes, less the paths
the loop wires itself (each stage's record: hybrid/run_stages.py).
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from hybrid.tune_calibrate import CalibrateConfig
from hybrid.config import _collect, _hints, _strip_optional, load_yaml, named, one_line, parse_yaml
from hybrid.eval import EvalConfig
from hybrid.run_stages import DEFAULT_STAGES, STAGE_NAMES, STAGES
from hybrid.serve import ServeConfig
from hybrid.tracking import TrackingConfig, shown_uri
from core.atomic import write_text_atomic
from retrieval.tune_embedder import EmbedderTuneConfig
from core.errors import InputError, quoted
from retrieval.index import IndexConfig
from tuning.tune_dpo import DPOTuneConfig
from tuning.tune_generator import GeneratorTuneConfig
from tuning.synth import SynthConfig
from tuning.tune_probe import ProbeTuneConfig

# the fields the loop sets itself in each section (the paths between stages and the caller's groups): a
# view of the stages' records, hybrid/run_stages.py
WIRED = {s.name: s.wired for s in STAGES if s.wired}
# the keys that name files or folders (test_every_path_key_is_resolved checks this list against the help texts)
PATH_KEYS = ("corpus", "out", "eval_qa", "dpo.wrong_answers", "dpo.judge", "eval.rerank", "eval.judge", "eval.merge",
             "serve.keys", "serve.judge", "serve.rerank")
# keys naming a packaged model or a model folder: only the folder is a path
MODEL_KEYS = ("index.embedder", "synth.teacher", "generator.base_model", "eval.base_model", "serve.base_model")


@dataclass
class LoopConfig:
    """The whole loop (YAML keys = field names; a section per stage)."""

    corpus: str = field(metadata={"help": "Directory of documents (.md/.txt/.jsonl/.pdf) to learn."})
    out: str = field(default="run", metadata={
        "help": "Run directory: every stage's output goes under it (default: run, beside hybrid.yaml)."})
    eval_qa: str | None = field(default=None, metadata={
        "help": "Hand-written questions the eval stage scores (none of them is trained on); without it the "
                "eval stage is skipped and the embedder is scored on held-out synthesised questions."})
    groups: list[str] = field(default_factory=list, metadata={
        "flag": "--group", "help": "Access groups every stage may read (and its artifacts are tagged with)."})
    stages: list[str] = field(default_factory=lambda: list(DEFAULT_STAGES), metadata={
        "help": f"Stages to run, in this order: {', '.join(STAGE_NAMES)} (dpo, calibrate, probe and serve when "
                f"named)."})
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
    probe: ProbeTuneConfig = field(default_factory=lambda: ProbeTuneConfig(out="", index="", qa=""), metadata={
        "help": "hybrid tune probe (the eval's base model, on the synthesised questions)"})
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(qa=""), metadata={"help": "hybrid eval"})
    serve: ServeConfig = field(default_factory=lambda: ServeConfig(index=""), metadata={
        "help": "hybrid serve (the index and the last adapter, as 'raft')"})
    tracking: TrackingConfig = field(default_factory=TrackingConfig, metadata={"help": "MLflow tracking"})

    def problems(self) -> list[str]:
        out = [f"stages: unknown stage {quoted(s)} (known: {', '.join(STAGE_NAMES)})" for s in self.stages
               if s not in STAGE_NAMES]
        if not self.stages:
            out.append("stages: names no stage; list the ones to run, e.g. stages=index,synth")
        empty = _empty_names(self)  # an empty tracking name is refused as such, not also as idle
        return out + _path_problems(self) + empty + (_idle_tracking(self.tracking) if not empty else [])


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


def _idle_tracking(t: TrackingConfig) -> list[str]:
    """Tracking settings under `backend: none` would be read by nothing: refused, naming them."""
    if t.backend != "none":
        return []
    defaults = TrackingConfig()
    idle = [f"tracking.{f.name}" for f in dataclasses.fields(t)
            if f.name != "backend" and getattr(t, f.name) != getattr(defaults, f.name)]
    return [f"{', '.join(idle)}: tracking.backend is none, so nothing is tracked; set tracking.backend: mlflow or "
            f"drop {'it' if len(idle) == 1 else 'them'}"] if idle else []


def _is(path: str, test: Callable[[Path], bool]) -> bool:
    """`test(Path(path))`, False where the file system cannot even look (a name too long, say)."""
    try:
        return bool(path.strip()) and test(Path(path))
    except OSError:
        return False


# --- paths: against the file's folder, or the working directory for overrides ----------------------
def _model_names() -> set[str]:
    from retrieval.embedder import PACKAGED as EMBEDDER
    from tuning.generation import PACKAGED as GENERATORS

    # the names retrieval.embedder.resolve_embedder and tuning.generation.resolve_generator take
    return {EMBEDDER, "all-MiniLM-L6-v2", "default", "minilm", "mpnet", *GENERATORS}


def _absolute(value: Any, base: Path) -> Any:
    """A relative path (or each one of a list) read against `base`; anything else as it is (an
    empty or mistyped value is refused later, naming its key, and `~` is the resolvers' to expand)."""
    if isinstance(value, list):
        return [_absolute(v, base) for v in value]
    if not isinstance(value, str) or not value.strip() or value.startswith("~") or os.path.isabs(value):
        return value
    return os.path.abspath(base / value)


def _absolute_uri(uri: Any, base: Path) -> Any:
    """tracking.uri: a SQLite file or a file store given by a relative path, read against `base`
    (a server's URI is left as it is)."""
    from urllib.parse import urlsplit

    if not isinstance(uri, str):
        return uri
    if uri.startswith("sqlite:///") and uri[10:] not in ("", ":memory:"):
        return "sqlite:///" + _absolute(uri[10:], base)
    return uri if urlsplit(uri).scheme else _absolute(uri, base)


def resolve_paths(mapping: dict, base: Path) -> dict:
    """`mapping` (a file's, or the overrides') with its relative paths read against `base`."""
    names = _model_names()

    def at(dotted: str, fix: Callable[[Any], Any]) -> None:
        *sections, key = dotted.split(".")
        node = mapping
        for s in sections:
            node = node.get(s) if isinstance(node, dict) else None
        if isinstance(node, dict) and key in node:
            node[key] = fix(node[key])

    for key in PATH_KEYS:
        at(key, lambda v: _absolute(v, base))
    for key in MODEL_KEYS:
        at(key, lambda v: v if isinstance(v, str) and v in names else _absolute(v, base))
    at("tracking.uri", lambda v: _absolute_uri(v, base))
    return mapping


def read_file(path: str | Path) -> dict:
    """hybrid.yaml as a mapping: a section header with its keys all commented out (as `hybrid init`
    writes them) is an empty section, not null, and relative paths are read against the file's folder."""
    loaded = load_yaml(path)
    _empty_sections(loaded, LoopConfig)
    return resolve_paths(loaded, Path(os.path.abspath(path)).parent)


def _empty_sections(mapping: dict, cls: type) -> None:
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]) and f.name in mapping:
            if mapping[f.name] is None:
                mapping[f.name] = {}
            if isinstance(mapping[f.name], dict):
                _empty_sections(mapping[f.name], hints[f.name])


# --- overrides and loading -----------------------------------------------------------------------
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


def _given(overrides: list[str]) -> dict:
    given = parse_overrides(list(overrides))
    for name in ("groups", "stages"):  # stages=index,synth on the command line
        if isinstance(given.get(name), str):
            given[name] = [v for v in given[name].split(",") if v]
    return resolve_paths(given, Path.cwd())  # a path typed on the command line: the working directory's


def _refuse_wired(path, loaded: dict, given: dict) -> None:
    set_here = [f"{name}.{key}" for name, keys in WIRED.items() for key in sorted(keys)
                for src in (loaded, given) if isinstance(src.get(name), dict) and key in src[name]]
    trainers = [stage.name for stage in STAGES if stage.trains]
    set_here += [f"{name}.train.groups" for name in trainers for src in (loaded, given)
                 if isinstance(src.get(name), dict) and ("groups" in src[name] or isinstance(src[name].get("train"), dict)
                                                         and "groups" in src[name]["train"])]
    if set_here:
        raise InputError(f"--config {named(path)}: {', '.join(set_here)} are set by the loop (the paths between stages "
                         f"under 'out', the groups from 'groups', the probe's reader and k from the eval's); "
                         f"remove them")


def load_loop(path: str | Path, overrides: list[str] = ()) -> LoopConfig:
    """The loop's config: the YAML file, then the overrides; unknown keys and wrong types refused (all listed)."""
    given, loaded = _given(overrides), read_file(path)
    _refuse_wired(path, loaded, given)
    for name, keys in WIRED.items():  # placeholders for the required paths; sections() fills them in
        section = given.setdefault(name, {})
        if isinstance(section, dict):  # a section given a value (synth=5): _collect refuses it, naming it
            section.update({k: "" for k in keys if k in ("index", "out", "qa", "adapter")})
    problems: list[str] = []
    values = _collect(LoopConfig, loaded, given, "", problems, keyed=True)
    if problems:
        raise InputError(one_line("; ".join(problems)))
    cfg = LoopConfig(**values)
    # a default that is a relative path (out: run) lies beside the file, as if the file had said it
    cfg.out = _absolute(cfg.out, Path(os.path.abspath(path)).parent)
    if problems := cfg.problems():
        raise InputError(one_line("; ".join(problems)))
    return cfg


# --- every key: config show, the tracked copy -------------------------------------------------------
def keys(cfg: LoopConfig) -> Iterator[tuple[list[str], Any]]:
    """Every key the file may set, as (dotted path as a list, resolved value); the loop's own paths left out."""
    def walk(obj, here: list[str], skip: set[str]):
        for f in dataclasses.fields(obj):
            if f.name in skip:
                continue
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                yield from walk(value, here + [f.name], WIRED.get(f.name, set()) if not here else
                                {"groups"} if f.name == "train" else set())
            else:
                yield here + [f.name], value

    yield from walk(cfg, [], set())


def _has(tree, keys_: list[str]) -> bool:
    for k in keys_:
        if not isinstance(tree, dict) or k not in tree:
            return False
        tree = tree[k]
    return True


def provenance(path: str | Path, overrides: list[str] = ()) -> list[tuple[str, Any, str]]:
    """Every resolved key of the loop as (dotted key, value, where it came from): `override` when the
    command line gives it, `file` when the file writes it (whatever its value: a key written down stays
    at that value when hybrid's defaults change), else `default`."""
    cfg = load_loop(path, overrides)
    loaded, given = read_file(path), parse_overrides(list(overrides))
    rows = []
    for here, value in keys(cfg):
        short = [k for k in here if k != "train"]  # a training setting may be written at its section's level
        where = "override" if _has(given, here) or _has(given, short) else \
            "file" if _has(loaded, here) or _has(loaded, short) else "default"
        rows.append((".".join(here), value, where))
    return rows


def resolved_yaml(cfg: LoopConfig) -> str:
    """The resolved config as a hybrid.yaml `hybrid run` takes back (paths absolute; a password in
    tracking.uri masked: the copy goes to the tracking store)."""
    tree: dict = {}
    for here, value in keys(cfg):
        node = tree
        for k in here[:-1]:
            node = node.setdefault(k, {})
        node[here[-1]] = shown_uri(value) if here == ["tracking", "uri"] and value else value
    return yaml.safe_dump(tree, sort_keys=False)


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


def _section_lines(cls, instance, skip: set[str], indent: str, written: set[str]) -> list[str]:
    """Every key of `cls` with its help and type; those not in `written` commented out at their default,
    so the file holds only what its author set (and `config show` can say so)."""
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
                                    indent + "  ", set())
            continue
        lines.append(f"{indent}# {help_text} ({_type_name(hints[f.name])})")
        lines.append(f"{indent}{'' if f.name in written else '# '}{f.name}: {_yaml_value(value)}")
    return lines


def init_text(corpus: str = "corpora/brindle/docs", eval_qa: str | None = "corpora/brindle/qa.jsonl") -> str:
    """hybrid.yaml with every key of every section, commented with its help and type; `corpus` and
    `eval_qa` written, every other key commented out at its default (generated from the config
    dataclasses: one source for help, comments and defaults)."""
    example = LoopConfig(corpus=corpus, eval_qa=eval_qa)
    head = ["# hybrid.yaml: the whole loop (hybrid run hybrid.yaml [KEY=VALUE ...]). Every key but corpus and eval_qa",
            "# is commented out at its default: uncomment one to set it. Relative paths are read from this file's",
            "# folder; the paths between stages are set by the loop.", ""]
    written = {"corpus"} | ({"eval_qa"} if eval_qa is not None else set())
    return "\n".join(head + _section_lines(LoopConfig, example, set(), "", written)) + "\n"


def init(directory: str | Path, corpus: str = "corpora/brindle/docs",
         eval_qa: str | None = "corpora/brindle/qa.jsonl") -> Path:
    """Write DIR/hybrid.yaml (refusing to overwrite one). `corpus` and `eval_qa` are command-line paths
    (the working directory's): written relative to DIR, where the file's paths are read from."""
    path = Path(directory) / "hybrid.yaml"
    if path.exists():
        raise InputError(f"{path} exists; edit it, or pass another directory")

    def beside(p: str) -> str:
        if not p.strip() or os.path.isabs(p) or p.startswith("~"):  # an empty one: refused when the file loads
            return p
        return os.path.relpath(os.path.abspath(p), os.path.abspath(directory))

    write_text_atomic(path, init_text(beside(corpus), None if eval_qa is None else beside(eval_qa)))
    return path
