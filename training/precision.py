"""The precision policy: which number format a model computes in, decided in one place.

`--precision auto|fp32|bf16`. `auto` is bf16 where the device has bf16 units — a CUDA GPU that
supports bf16, or a CPU reporting AMX (`amx_bf16`) or AVX512-BF16 (`avx512_bf16`) — and fp32
elsewhere: on an AVX2-only CPU bf16 has no hardware and is emulated, many times slower. bf16 here
is used in the form each workload runs fastest with the same results:

- training: mixed precision. Weights and optimizer state stay fp32, matmuls run in bf16 under
  `torch.autocast`, losses are computed in fp32 (the trainers' `bf16=True`).
- encoders (embedder, reranker, judge): the same autocast around a batched forward pass.
- generation: bf16 weights (`weights_dtype`). A decoded token reads every weight once, so
  autocast would cast all of them again at every token (measured 2.7x slower than fp32 decoding).

An explicit `bf16` on a CPU without the units is honoured (it computes the same) but said to be slow.

    >>> resolve("auto", "cpu", flags={"avx2"}), resolve("auto", "cpu", flags={"amx_bf16"})
    ('fp32', 'bf16')
    >>> resolve("fp32", "cuda", cuda_bf16=True)
    'fp32'
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import field
from pathlib import Path
from typing import Literal

from core.errors import InputError

Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS = ("auto", "fp32", "bf16")
BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})
HELP = ("auto: bf16 where the device has bf16 units (a CUDA GPU with bf16; a CPU with AMX or AVX512-BF16), "
        "else fp32. bf16: training keeps fp32 weights and optimizer state with bf16 matmuls, generation loads "
        "bf16 weights, encoders run under bf16 autocast.")


log = logging.getLogger(__name__)


def option(default: Precision = "auto"):
    """The `precision` field of a command's config (flag `--precision`, YAML key `precision`)."""
    return field(default=default, metadata={"help": HELP})


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags as the kernel reports them (empty where there is no /proc/cpuinfo)."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


@functools.lru_cache(maxsize=1)
def _this_cpu() -> frozenset[str]:
    return cpu_flags()


def _cuda_bf16() -> bool:
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def resolve(requested: str, device: str, flags: frozenset[str] | set[str] | None = None,
            cuda_bf16: bool | None = None) -> Literal["fp32", "bf16"]:
    """The precision that runs: `requested` as given, or for `auto` what `device` computes fastest.

    Args:
        requested: auto, fp32 or bf16.
        device: "cpu" or "cuda".
        flags: the CPU's flags (default: read from /proc/cpuinfo).
        cuda_bf16: whether the GPU supports bf16 (default: asked of torch).

    Raises:
        InputError: an unknown value, or bf16 on a GPU without it.
    """
    if requested not in PRECISIONS:
        raise InputError(f"--precision {requested!r}: use one of {', '.join(PRECISIONS)}")
    if device == "cuda":
        has = _cuda_bf16() if cuda_bf16 is None else cuda_bf16
        if requested == "bf16" and not has:
            raise InputError("--precision bf16: this GPU does not support bf16; use fp32 or auto")
        return ("bf16" if has else "fp32") if requested == "auto" else requested
    has = bool(BF16_CPU_FLAGS & (_this_cpu() if flags is None else flags))
    return ("bf16" if has else "fp32") if requested == "auto" else requested


def emulated(precision: str, device: str, flags: frozenset[str] | set[str] | None = None) -> bool:
    """Whether `precision` runs without hardware units here (bf16 on a CPU lacking AMX and AVX512-BF16)."""
    return precision == "bf16" and device == "cpu" and not (BF16_CPU_FLAGS & (_this_cpu() if flags is None else flags))


@functools.lru_cache(maxsize=None)
def choose(requested: str, device: str) -> Literal["fp32", "bf16"]:
    """`resolve` for a loader about to run a model: bf16 that would be emulated is said, once per process."""
    chosen = resolve(requested, device)
    if emulated(chosen, device):
        log.warning("--precision bf16: this CPU has no bf16 units (no amx_bf16 or avx512_bf16 flag), so bf16 is "
                    "emulated and many times slower than fp32; use --precision auto or fp32")
    return chosen


def weights_dtype(precision: str):
    """The dtype generation loads a model's weights in: bf16, or fp32."""
    import torch

    return torch.bfloat16 if precision == "bf16" else torch.float32


def default_device() -> str:
    """The device a loader picks when none is given: CUDA when available, else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def device_of(model) -> str:
    """"cuda" or "cpu": the device type a model's parameters are on (what autocast needs)."""
    try:
        return next(model.parameters()).device.type
    except (StopIteration, AttributeError):
        return "cpu"


def autocast(precision: str, device: str):
    """The context a forward pass runs in: bf16 autocast, or nothing for fp32."""
    if precision != "bf16":
        return contextlib.nullcontext()
    import torch

    return torch.autocast(device_type=device, dtype=torch.bfloat16)
