"""More than one process: DDP, FSDP2 and DeepSpeed ZeRO-2/3 through the launchers that already do it.

A trainer whose `train.distributed` is not `none` and that is not already running under a
launcher starts itself again under one: its resolved config is written to a YAML file and the
trainer's own module, `python -m MODULE --config FILE`, runs in N processes (each reads the file
back with `read_config`, in training/trainer_run.py's `main`), under `accelerate launch` with one
of the shipped configs (`training/accelerate_configs/`, TRL's presets: `ddp` is TRL's `multi_gpu`) on
CUDA, under `torchrun` (gloo) on CPU, where only DDP exists. Inside, the HF trainer reads the
launcher's environment (sharding the data, wrapping the model); the workflow itself writes its
outputs on rank 0 only.

    >>> render("zero2", num_processes=2, mixed_precision="bf16")["deepspeed_config"]["zero_stage"]
    2

Known-broken combinations are refused when the config is validated (`problems`), not when a
run fails an hour in.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
import tempfile
import typing
from pathlib import Path
from typing import Literal

import yaml

from core.atomic import write_text_atomic
from core.errors import InputError

Distributed = Literal["none", "ddp", "fsdp2", "zero2", "zero3"]
CONFIG_DIR = Path(__file__).parent / "accelerate_configs"
# the environment every launcher sets in the processes it starts
LAUNCHED = ("LOCAL_RANK", "ACCELERATE_PROCESS_ID")


def under_launcher() -> bool:
    return any(v in os.environ for v in LAUNCHED)


def should_launch(train) -> bool:
    """True when this process must start the N processes itself (a setting asks for them, none started us)."""
    return train.distributed != "none" and not under_launcher()


def render(kind: str, num_processes: int, mixed_precision: Literal["no", "bf16"]) -> dict:
    """The shipped accelerate config for `kind` with this run's process count and precision.

    The precision is the one the trainer resolved from `--precision` (training/precision.py), so the
    launcher and `TrainingArguments` never disagree.
    """
    cfg = yaml.safe_load((CONFIG_DIR / f"{kind}.yaml").read_text())
    cfg["num_processes"] = num_processes
    cfg["mixed_precision"] = mixed_precision
    return cfg


def problems(train, *, allowed: tuple[str, ...], quantized: bool = False, merge: bool = False,
             cuda_devices: int | None = None) -> list[str]:
    """What is wrong with `train.distributed` / `train.num_processes` for this trainer and machine.

    Args:
        train: the TrainSettings.
        allowed: the kinds this trainer supports.
        quantized: the run loads the base in 4 bits (QLoRA).
        merge: the run also exports a merged model.
        cuda_devices: GPUs on this machine (None: ask torch only when a launch is asked for).
    """
    kind, n = train.distributed, train.num_processes
    out = [] if n >= 0 else ["--num-processes must be >= 0 (0 = one per GPU)"]
    if kind == "none":
        return out + (["--num-processes needs --distributed ddp|fsdp2|zero2|zero3"] if n else [])
    if kind not in allowed:
        return out + [f"--distributed {kind}: not supported by this trainer (supported: {', '.join(allowed)})"]
    if cuda_devices is None:
        import torch

        cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if kind != "ddp" and not cuda_devices:
        out.append(f"--distributed {kind}: shards the model across GPUs and needs CUDA; on CPU use --distributed ddp")
    if kind.startswith("zero") and importlib.util.find_spec("deepspeed") is None:
        out.append(f"--distributed {kind}: DeepSpeed is not installed; pip install deepspeed, or use fsdp2")
    if not cuda_devices and n < 2:
        out.append("--num-processes: on CPU give the number of processes (>= 2) for --distributed ddp")
    if cuda_devices and n > cuda_devices:
        out.append(f"--num-processes {n}: this machine has {cuda_devices} GPU(s)")
    # The merged model is the full weights: under sharding no process holds them, and PEFT's
    # merge_and_unload on sharded layers writes garbage; merge afterwards from the saved adapter.
    if merge and kind in ("fsdp2", "zero3"):
        out.append(f"--merge with --distributed {kind}: the weights are sharded; train without --merge, then merge "
                   f"the saved adapter in one process")
    # bitsandbytes' 4-bit weights are uint8 unless told otherwise, and FSDP/ZeRO-3 can only shard a
    # model whose parameters share one dtype: load_generator stores them in the compute dtype
    # (bnb_4bit_quant_storage) under these launchers; ZeRO-2 does not shard weights at all.
    if quantized and kind in ("fsdp2", "zero3") and not cuda_devices:
        out.append(f"--strategy qlora with --distributed {kind}: 4-bit weights need CUDA")
    return out


def processes(train) -> int:
    if train.num_processes:
        return train.num_processes
    import torch

    return torch.cuda.device_count()


def command(module: str, config_file: Path, train, mixed_precision: Literal["no", "bf16"],
            workdir: Path) -> list[str]:
    """The launcher command line that runs `python -m MODULE --config CONFIG_FILE` in N processes.

    MODULE is the trainer's own module (it ends in `trainer_run.main`), so the launched processes
    enter at the training they run, not through the command line above it.
    """
    n = processes(train)
    import torch

    if not torch.cuda.is_available():  # accelerate's CPU path is one process (or MPI); torchrun does gloo DDP
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                "-m", module, "--config", str(config_file)]
    launch_cfg = workdir / f"accelerate_{train.distributed}.yaml"
    write_text_atomic(launch_cfg, yaml.safe_dump(render(train.distributed, n, mixed_precision), sort_keys=False))
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch_cfg),
            "-m", module, "--config", str(config_file)]


def launch(module: str, cfg, mixed_precision: Literal["no", "bf16"] = "no", log=print) -> None:
    """Run `python -m MODULE` on `cfg` in `cfg.train.num_processes` processes and wait for them.

    Raises:
        InputError: a process failed (its output is above, on the terminal).
    """
    with tempfile.TemporaryDirectory(prefix="hybrid-launch-") as tmp:
        config_file = Path(tmp) / "config.yaml"
        write_text_atomic(config_file, yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
        argv = command(module, config_file, cfg.train, mixed_precision, Path(tmp))
        log(f"{module}: --distributed {cfg.train.distributed}, {processes(cfg.train)} processes: "
            f"{' '.join(argv[1:4])} ...")
        done = subprocess.run(argv, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if done.returncode:
        raise InputError(f"--distributed {cfg.train.distributed}: the launched processes exited with code "
                         f"{done.returncode} (their error is above)")


def read_config(config_type: type, path: str | Path):
    """The config `launch` wrote (a dataclass, nested dataclasses as mappings), rebuilt as `config_type`."""
    return _rebuild(config_type, yaml.safe_load(Path(path).read_text(encoding="utf-8")))


def _rebuild(config_type: type, values: dict):
    hints = typing.get_type_hints(config_type)
    kwargs = {}
    for f in dataclasses.fields(config_type):
        if f.name in values:
            value = values[f.name]
            if dataclasses.is_dataclass(hints[f.name]) and isinstance(value, dict):
                value = _rebuild(hints[f.name], value)
            kwargs[f.name] = value
    return config_type(**kwargs)


def full_state_dict(trainer):
    """The whole model's state dict on rank 0 after a launched run, None in one process.

    Every rank must call it: under FSDP and ZeRO-3 it is a collective (each rank holds a shard and
    `save_pretrained` on rank 0 alone would write an empty or partial adapter). It mirrors what
    `Trainer.save_model` does for these engines.
    """
    if not trainer.accelerator.num_processes > 1:
        return None
    model = trainer.model_wrapped if trainer.is_deepspeed_enabled else trainer.model
    return trainer.accelerator.get_state_dict(model)
