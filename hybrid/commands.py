"""Every `hybrid` command, once: the name a user types, its config dataclass and the function that runs it.

    hybrid tune generator --config g.yaml    # COMMANDS["tune generator"]: GeneratorTuneConfig, tuning.tune_generator:tune_generator

hybrid/cli.py registers each command from this table (its group, and its flags built from the config
dataclass), and the loop's stages (hybrid/run_stages.py) take their section's dataclass and the
function they call from the same rows, so a command and its stage cannot drift apart. The function is
named as `module:attribute` and imported on use: `hybrid --help` and a bad flag stay instant, and a
test's monkeypatch of the module's function is what runs.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from hybrid.ask import AskConfig
from hybrid.eval import EvalConfig
from hybrid.serve import ServeConfig
from hybrid.tune_calibrate import CalibrateConfig
from retrieval.index import IndexConfig
from retrieval.retriever import SearchConfig
from retrieval.tune_embedder import EmbedderTuneConfig
from retrieval.tune_reranker import RerankerTuneConfig
from tuning.synth import SynthConfig
from tuning.tune_dpo import DPOTuneConfig
from tuning.tune_generator import GeneratorTuneConfig
from tuning.tune_judge import JudgeTuneConfig
from tuning.tune_probe import ProbeTuneConfig


@dataclass(frozen=True)
class Command:
    """One command: `name` as typed (a group's command is `group leaf`: "tune generator"), the dataclass
    its flags and `--config` YAML fill (None: the loop's commands, which read hybrid.yaml instead), and
    `runs`, the library function behind it as `module:attribute` (`Class.method` allowed)."""

    name: str
    config: type | None
    runs: str

    @property
    def group(self) -> str | None:
        """The group the command sits under ("tune", "config"), None for a top-level one."""
        return self.name.rpartition(" ")[0] or None

    @property
    def leaf(self) -> str:
        """The word that names the command inside its group."""
        return self.name.rpartition(" ")[2]

    def function(self) -> Callable[..., Any]:
        """The function behind the command, imported now (looked up at each call, never cached)."""
        module, _, attribute = self.runs.partition(":")
        found: Any = importlib.import_module(module)
        for part in attribute.split("."):
            found = getattr(found, part)
        return found


# In the order `hybrid --help` lists them.
COMMANDS: dict[str, Command] = {c.name: c for c in (
    Command("index", IndexConfig, "retrieval.index:build_index"),
    Command("search", SearchConfig, "retrieval.retriever:Retriever.search"),
    Command("synth", SynthConfig, "tuning.synth:synthesize"),
    Command("tune embedder", EmbedderTuneConfig, "retrieval.tune_embedder:tune_embedder"),
    Command("tune reranker", RerankerTuneConfig, "retrieval.tune_reranker:tune_reranker"),
    Command("tune generator", GeneratorTuneConfig, "tuning.tune_generator:tune_generator"),
    Command("tune dpo", DPOTuneConfig, "tuning.tune_dpo:tune_dpo"),
    Command("tune judge", JudgeTuneConfig, "tuning.tune_judge:tune_judge"),
    Command("tune calibrate", CalibrateConfig, "hybrid.tune_calibrate:calibrate"),
    Command("tune probe", ProbeTuneConfig, "tuning.tune_probe:tune_probe"),
    Command("ask", AskConfig, "hybrid.pipeline:Pipeline.ask"),
    # `eval --only retrieval` runs hybrid.eval_retrieval:evaluate_retrieval instead (the command's body decides)
    Command("eval", EvalConfig, "hybrid.eval:run_eval"),
    Command("serve", ServeConfig, "hybrid.serve:run"),
    Command("init", None, "hybrid.run:init"),
    Command("run", None, "hybrid.run:run_loop"),
    Command("config show", None, "hybrid.run:provenance"),
)}
