"""The training settings every hybrid trainer shares: one dataclass, embedded in each workflow's config.

`EmbedderTuneConfig`, `GeneratorTuneConfig`, `DPOTuneConfig` and `JudgeTuneConfig` each hold a
`train: TrainSettings` with their own defaults. On the command line its fields are flags of
their own (`--learning-rate`, `--batch-size`, `--group`, ...); in a YAML config they sit under
`train:`.

    >>> TrainSettings(learning_rate=0).problems()
    ['--learning-rate must be > 0']
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from core import access
from training.precision import Precision, option


@dataclass
class TrainSettings:
    """Optimiser, length, time and access settings shared by every trainer."""

    learning_rate: float = field(default=2e-4, metadata={"help": "Peak learning rate (AdamW, linear decay)."})
    batch_size: int = field(default=1, metadata={"help": "Examples per micro-batch."})
    grad_accum: int = field(default=1, metadata={"help": "Micro-batches accumulated per optimizer step."})
    epochs: float = field(default=1.0, metadata={"help": "Passes over the training data."})
    max_steps: int = field(default=0, metadata={"help": "Stop after N optimizer steps; 0 = no limit."})
    warmup_ratio: float = field(default=0.1, metadata={"help": "Share of the steps spent warming the learning rate up."})
    max_length: int = field(default=1024, metadata={"help": "Max tokens of one training sequence (longer ones are cut)."})
    max_minutes: float = field(default=0.0, metadata={
        "help": "Stop at the first step past N minutes of training and save what was reached; 0 = no limit."})
    seed: int = field(default=13, metadata={"help": "Seed of the split, the sampling and the training."})
    groups: list[str] = field(default_factory=list, metadata={
        "flag": "--group", "help": "Also learn from chunks restricted to this access group (repeatable); the result "
                                   "is tagged with these groups and only callers holding them can load it. "
                                   "Without it: public chunks only."})
    distributed: Literal["none", "ddp", "fsdp2", "zero2", "zero3"] = field(default="none", metadata={
        "help": "Train in --num-processes processes: ddp (a copy per process; CPU or GPU), fsdp2 or zero2/zero3 "
                "(DeepSpeed; GPUs: the model sharded). The run starts its own launcher (torchrun on CPU, "
                "accelerate launch with the shipped config on CUDA); under one already, it just trains."})
    num_processes: int = field(default=0, metadata={
        "help": "Processes for --distributed; 0 = one per GPU (on CPU give a number)."})
    precision: Precision = option()

    def problems(self) -> list[str]:
        out = access.group_problems(self.groups)
        if self.learning_rate <= 0:
            out.append("--learning-rate must be > 0")
        if self.epochs <= 0:
            out.append("--epochs must be > 0")
        for name in ("batch_size", "grad_accum", "max_length"):
            if getattr(self, name) < 1:
                out.append(f"--{name.replace('_', '-')} must be >= 1")
        for name in ("max_steps", "max_minutes"):
            if getattr(self, name) < 0:
                out.append(f"--{name.replace('_', '-')} must be >= 0")
        if not 0 <= self.warmup_ratio < 1:
            out.append("--warmup-ratio must be in [0, 1)")
        return out


def literal_problems(cfg) -> list[str]:
    """A config's fields typed `Literal[...]` that hold another value (library callers skip the CLI's checks)."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(type(cfg))
    out = []
    for f in dataclasses.fields(cfg):
        allowed = typing.get_args(hints[f.name]) if typing.get_origin(hints[f.name]) is typing.Literal else None
        if allowed and getattr(cfg, f.name) not in allowed:
            out.append(f"--{f.name.replace('_', '-')} must be one of {', '.join(map(str, allowed))}")
    return out
