"""What every hybrid trainer does around its own data, model and save: the shared skeleton.

The five trainers (tuning/tune_generator.py, tuning/tune_dpo.py, tuning/tune_judge.py,
retrieval/tune_embedder.py, retrieval/tune_reranker.py) each read top to bottom in stages,
config -> load -> data -> train -> save, and call these steps in this order:

    run = begin(cfg, ...)           the config's problems as one line; OUT new or one of ours;
                                    the device and precision, read once into a `Run`
    relaunch(module, cfg, run, log) under --distributed with no launcher yet: the trainer's own
                                    module in N processes (training/launch.py), then return
    meters(cfg.train, run)          the callbacks: time budget (--max-minutes) and peak memory
    arguments(cfg.train, run, ...)  HF TrainingArguments' keywords every trainer sets alike
    save(trainer, run, write, ...)  rank 0 stages OUT atomically with its record and access tag;
                                    every rank waits until it is in place
    main(Config, tune)              `python -m MODULE --config FILE`: what each launched process runs

Nothing here imports torch or transformers at module level: the CLI imports the trainers' configs
and must start fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

from core import access
from core.atomic import not_its_own, staged_dir, write_text_atomic
from core.errors import InputError
from training import launch
from training.precision import choose, default_device
from training.train_settings import TrainSettings


@dataclass(frozen=True)
class Run:
    """A run's plain values, read from its config once at the top; the stages below get these."""

    out: Path
    device: Literal["cpu", "cuda"]
    precision: str  # what `--precision` resolved to on this device (training/precision.py)
    progress: bool
    started: float = field(default_factory=time.perf_counter)

    def minutes(self, digits: int = 2) -> float:
        return round((time.perf_counter() - self.started) / 60, digits)

    def seconds(self) -> float:
        return round(time.perf_counter() - self.started, 1)


def begin(cfg, progress: bool, marker: str | None = None, refusal: str = "") -> Run:
    """Validate `cfg` and read its run values.

    Args:
        cfg: a trainer config (`problems()`, `out`, `train: TrainSettings`).
        marker: the file that makes an existing OUT one of ours (None: OUT is not checked).
        refusal: what the one-line error says after `--out OUT:` when OUT is someone else's.

    Raises:
        InputError: the config's problems, or OUT exists and is not one of ours.
    """
    if problems := cfg.problems():
        raise InputError("; ".join(problems))
    out = Path(cfg.out)
    if marker and not_its_own(out, marker):
        raise InputError(f"--out {out}: {refusal}")
    on = default_device()
    return Run(out=out, device=on, precision=choose(cfg.train.precision, on), progress=progress)


def relaunch(module: str, cfg, run: Run, log=print) -> bool:
    """Under `--distributed` and no launcher yet: run `python -m MODULE` on this config in N processes
    and wait for them (True: the caller reads what rank 0 wrote); False: train in this process."""
    if not launch.should_launch(cfg.train):
        return False
    launch.launch(module, cfg, "bf16" if run.precision == "bf16" else "no", log)
    return True


@dataclass
class Meters:
    """The callbacks every trainer runs with: the time budget and the peak-memory meter."""

    budget: object  # training.time_budget.TimeBudget
    peak: object  # training.peak_memory.PeakMemory

    @property
    def callbacks(self) -> list:
        return [self.budget, self.peak]


def meters(train: TrainSettings, run: Run) -> Meters:
    from training.peak_memory import PeakMemory  # these two import transformers: kept out of CLI start-up
    from training.time_budget import TimeBudget

    return Meters(TimeBudget(train.max_minutes), PeakMemory(run.device))


def arguments(train: TrainSettings, run: Run, **own) -> dict:
    """Keywords of an HF `TrainingArguments` (or TRL's / sentence-transformers' subclass) from the
    train settings; `own` adds the trainer's own or replaces these (e.g. a planned micro-batch)."""
    common = dict(num_train_epochs=train.epochs, max_steps=train.max_steps or -1,  # HF: -1 = epochs decide
                  per_device_train_batch_size=train.batch_size, gradient_accumulation_steps=train.grad_accum,
                  learning_rate=train.learning_rate, warmup_steps=train.warmup_ratio, seed=train.seed,
                  save_strategy="no", report_to="none", disable_tqdm=not run.progress,
                  use_cpu=run.device == "cpu", bf16=run.precision == "bf16")
    return {**common, **own}


def save(trainer, run: Run, write: Callable[[Path], None], record_file: str, record: dict, scope: dict,
         scratch: Path | None = None) -> None:
    """Rank 0 writes OUT atomically (the previous one stays until the new one is complete): the
    trainer's files (`write(staging_dir)`), RECORD_FILE, and the access tag `scope`; then `scratch`
    (checkpoints) goes. Under torchrun / accelerate launch every rank trained on its shard; no rank
    returns before OUT is in place."""
    if trainer.is_world_process_zero():
        with staged_dir(run.out) as tmp:
            write(tmp)
            write_text_atomic(tmp / record_file, json.dumps(record, indent=2))
            access.write(tmp, scope)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()


def main(config_type: type, tune: Callable, argv: list[str] | None = None) -> None:
    """A trainer module run as `python -m MODULE --config FILE` in each launched process: the
    config the launcher wrote, trained with progress; a refused input is one line and exit 2."""
    parser = argparse.ArgumentParser(description="One process of a launched hybrid trainer.")
    parser.add_argument("--config", required=True, help="The config file training/launch.py wrote.")
    cfg = launch.read_config(config_type, parser.parse_args(argv).config)
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    try:
        tune(cfg)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def stderr(message: str) -> None:
    """A launched process's progress lines: on stderr, beside the launcher's."""
    print(message, file=sys.stderr)
