"""The loop's stages, one `Stage` record each, in the order `hybrid run` runs them.

A stage is a command of hybrid/commands.py run as a library call: its section of hybrid.yaml is that
command's config dataclass and it calls that command's function. What the loop adds lives in the
record: the section's paths it sets from the run folder (`wire`), what the stage's fingerprint holds
besides its own settings (`reads`), the file or folder that must exist for it to be up to date
(`output`), and how it is written, tracked and chosen.

    out/index  ->  out/synth/qa.jsonl  ->  out/embedder, out/generator  ->  out/dpo  ->  calibration
               ->  out/probe (the eval's reader, on the synthesised questions)  ->  out/eval
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Protocol

from hybrid.commands import COMMANDS, Command


class LoopConfig(Protocol):
    """What a stage's record reads of the loop's config (hybrid/run_config.py's LoopConfig, which
    imports this module for the stages' names: a Protocol, not an import back)."""

    corpus: str
    out: str
    eval_qa: str | None
    groups: list[str]
    stages: list[str]
    generator: Any  # GeneratorTuneConfig: its base_model
    eval: Any  # EvalConfig: its base_model and k

# What a fingerprint holds besides the stage's settings: an upstream stage's fingerprint (by its name),
# the corpus files' bytes, the eval questions' bytes, or `adapter`: the fingerprint of the adapter the
# loop ends with (dpo's when dpo is among the stages, else the generator's).
Read = Literal["corpus", "eval_qa", "adapter", "index", "synth", "embedder", "generator", "dpo", "calibrate", "probe"]
Wiring = Mapping[str, Callable[[LoopConfig], Any]]


@dataclass(frozen=True)
class Stage:
    """One stage of the loop. `name` is its section in hybrid.yaml, its name in `stages` and `--only`,
    and (but for calibrate and serve) its folder under `out`."""

    name: str
    command: Command
    # the section's keys the loop sets, each from the loop's config: the paths between stages under `out`,
    # and `groups`; a file or override setting one is refused
    wire: Wiring
    # what the stage's fingerprint holds besides its own settings, in this order
    reads: tuple[Read, ...]
    # what `output(cfg)` names must exist for the stage to be up to date; None: never (serving is not an output)
    output: Callable[[LoopConfig], Path] | None
    # read only when that stage is among the loop's stages (eval: dpo's adapter, calibrate's threshold)
    reads_if_staged: tuple[Read, ...] = ()
    # arguments before the section (index: the corpus and the index folder), and the keywords its function takes
    args: Callable[[LoopConfig], tuple] = lambda cfg: ()
    takes: tuple[Literal["progress", "log"], ...] = ("progress", "log")
    # written into OUT/NAME.partial and swapped in whole at the end: the last good output stays until the
    # new one is complete, and an interrupted run with the same settings resumes the partial one
    swapped: bool = False
    # scores the hand-written questions: skipped when the loop has none (eval_qa)
    needs_eval_qa: bool = False
    # run only when named in `stages` or --only: dpo (minutes per step on CPU), calibrate, serve (it does not return)
    optional: bool = False
    # MLflow: a child run with the stage's settings, numbers and small outputs; `parent` only opens the
    # loop's run (calibrate: its numbers are in the eval's report); `no` logs nothing (serve)
    tracked: Literal["stage", "parent", "no"] = "stage"
    # trains or answers with the generator's base model: its runs are tagged with it
    on_base_model: bool = False

    @property
    def wired(self) -> frozenset[str]:
        """The keys of the section the loop sets itself."""
        return frozenset(self.wire)

    @property
    def trains(self) -> bool:
        """A trainer's section: its `train.groups` is the loop's `groups` too."""
        return any(f.name == "train" for f in fields(self.command.config))

    def run(self, cfg: LoopConfig, section, progress: bool, log: Callable[[str], None]) -> None:
        """The command's function on the resolved section (looked up now: a test's monkeypatch is what runs)."""
        given = {"progress": progress, "log": log}
        self.command.function()(*self.args(cfg), section, **{k: given[k] for k in self.takes})


def last_adapter(cfg: LoopConfig) -> Path:
    """The adapter the loop ends with: DPO's when dpo is among the stages, else the generator's."""
    return Path(cfg.out) / ("dpo" if "dpo" in cfg.stages else "generator")


def _at(relative: str) -> Callable[[LoopConfig], str]:
    """A path under the run folder, as the section's string."""
    return lambda cfg: str(Path(cfg.out) / relative)


def _fixed(value) -> Callable[[LoopConfig], Any]:
    return lambda cfg: value


def _groups(cfg: LoopConfig) -> list[str]:
    return cfg.groups


def reader(cfg: LoopConfig) -> str:
    """The base model the eval's `rag` answers with, which the probe stage reads: eval.base_model, else
    the generator's base (its adapters' base), else the pipeline's default."""
    from tuning.generation import DEFAULT_GENERATOR

    return cfg.eval.base_model or cfg.generator.base_model or DEFAULT_GENERATOR


def _adapters(cfg: LoopConfig) -> dict[str, str]:
    """The adapters the eval scores: the generator's as `raft` and DPO's as `dpo`, each when staged."""
    out = Path(cfg.out)
    return {**({"raft": str(out / "generator")} if "generator" in cfg.stages else {}),
            **({"dpo": str(out / "dpo")} if "dpo" in cfg.stages else {})}


def _probe(cfg: LoopConfig) -> str | None:
    return str(Path(cfg.out) / "probe") if "probe" in cfg.stages else None


def _calibration(cfg: LoopConfig) -> Path:
    from tuning.abstention import CAL_FILE

    return last_adapter(cfg) / CAL_FILE


INDEX, QA = _at("index"), _at("synth/qa.jsonl")

STAGES: tuple[Stage, ...] = (
    Stage("index", COMMANDS["index"], wire={}, reads=("corpus",), output=lambda cfg: Path(cfg.out) / "index",
          args=lambda cfg: (cfg.corpus, Path(cfg.out) / "index"), takes=("progress",)),
    Stage("synth", COMMANDS["synth"], reads=("index",), swapped=True,
          wire={"index": INDEX, "out": _at("synth.partial/qa.jsonl"), "groups": _groups},
          output=lambda cfg: Path(cfg.out) / "synth" / "qa.jsonl"),
    Stage("embedder", COMMANDS["tune embedder"], reads=("index", "synth", "eval_qa"), takes=("progress",),
          wire={"index": INDEX, "out": _at("embedder"), "qa": QA, "eval_qa": lambda cfg: cfg.eval_qa},
          output=lambda cfg: Path(cfg.out) / "embedder"),
    Stage("generator", COMMANDS["tune generator"], reads=("index", "synth"), on_base_model=True,
          wire={"index": INDEX, "out": _at("generator"), "qa": QA, "examples": _fixed(None)},
          output=lambda cfg: Path(cfg.out) / "generator"),
    Stage("dpo", COMMANDS["tune dpo"], reads=("index", "synth", "generator"), optional=True, on_base_model=True,
          wire={"adapter": _at("generator"), "out": _at("dpo"), "index": INDEX, "qa": QA, "pairs_file": _fixed("")},
          output=lambda cfg: Path(cfg.out) / "dpo"),
    # the generator's held-out questions: synthesised, answerable and not, never trained on
    Stage("calibrate", COMMANDS["tune calibrate"], reads=("index", "adapter"), output=_calibration, takes=("log",),
          optional=True, tracked="parent", on_base_model=True,
          wire={"adapter": lambda cfg: str(last_adapter(cfg)), "qa": _at("generator/held_out.jsonl"), "index": INDEX,
                "groups": _groups}),
    # the answerability probe of the reader the eval's `rag` and the server's base model answer with, at the
    # eval's k (an adapter's probe: `hybrid tune probe --adapter`), trained on the synthesised questions alone
    Stage("probe", COMMANDS["tune probe"], reads=("index", "synth"), optional=True, on_base_model=True,
          wire={"index": INDEX, "out": _at("probe"), "qa": QA, "groups": _groups, "base_model": reader,
                "k": lambda cfg: cfg.eval.k, "adapter": _fixed(None)},
          output=lambda cfg: Path(cfg.out) / "probe"),
    # the eval reads every staged adapter, the probe when staged and, when calibrated, the threshold beside the
    # last adapter
    Stage("eval", COMMANDS["eval"], reads=("index", "eval_qa"),
          reads_if_staged=("generator", "dpo", "calibrate", "probe"), takes=("progress",), swapped=True, needs_eval_qa=True, on_base_model=True,
          wire={"qa": lambda cfg: cfg.eval_qa or "", "index": INDEX, "out": _at("eval.partial"), "groups": _groups,
                "adapters": _adapters, "probe": _probe},
          output=lambda cfg: Path(cfg.out) / "eval" / "report.json"),
    Stage("serve", COMMANDS["serve"], reads=(), output=None, takes=("log",), optional=True, tracked="no",
          wire={"index": INDEX, "adapter_dir": _fixed(None), "probe": _probe,
                "adapters": lambda cfg: {"raft": str(last_adapter(cfg))} if "generator" in cfg.stages else {}}),
)
STAGE_NAMES = tuple(s.name for s in STAGES)
DEFAULT_STAGES = tuple(s.name for s in STAGES if not s.optional)
BY_NAME = {s.name: s for s in STAGES}
