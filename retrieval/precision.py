"""The precision policy: which number format a model computes in, decided in one place.

`--precision auto|fp32|bf16`. `auto` is bf16 where the device has bf16 units — a CUDA GPU that
supports bf16, or a CPU reporting AMX (`amx_bf16`) or AVX512-BF16 (`avx512_bf16`) — and fp32
elsewhere: on an AVX2-only CPU bf16 has no hardware and is emulated, many times slower. bf16 here
is mixed precision: weights and optimizer state stay fp32 and matmuls run in bf16 under
`torch.autocast`; losses are computed in fp32. An explicit `bf16` on a CPU without the units is
honoured (it computes the same) but said to be slow.

    >>> resolve("auto", "cpu", flags={"avx2"}), resolve("auto", "cpu", flags={"amx_bf16"})
    ('fp32', 'bf16')
    >>> resolve("fp32", "cuda", cuda_bf16=True)
    'fp32'
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Literal

from retrieval.errors import InputError

Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS = ("auto", "fp32", "bf16")
BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})
HELP = ("auto: bf16 where the device has bf16 units (a CUDA GPU with bf16; a CPU with AMX or AVX512-BF16), "
        "else fp32; fp32; bf16 (mixed: fp32 weights and optimizer state, bf16 matmuls).")


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
    has = bool(BF16_CPU_FLAGS & (cpu_flags() if flags is None else flags))
    return ("bf16" if has else "fp32") if requested == "auto" else requested


def emulated(precision: str, device: str, flags: frozenset[str] | set[str] | None = None) -> bool:
    """Whether `precision` runs without hardware units here (bf16 on a CPU lacking AMX and AVX512-BF16)."""
    return precision == "bf16" and device == "cpu" and not (BF16_CPU_FLAGS & (cpu_flags() if flags is None else flags))


def autocast(precision: str, device: str):
    """The context a forward pass runs in: bf16 autocast, or nothing for fp32."""
    if precision != "bf16":
        return contextlib.nullcontext()
    import torch

    return torch.autocast(device_type=device, dtype=torch.bfloat16)
