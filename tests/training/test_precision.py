"""The precision policy (training/precision.py): what `auto` chooses on each device, explicit choices,
the CPU's flags as /proc/cpuinfo gives them, and the autocast context."""

import pytest

from core.errors import InputError
from training.precision import autocast, cpu_flags, emulated, resolve

AVX2_ONLY = {"fpu", "sse4_2", "avx2", "fma"}


@pytest.mark.parametrize("flags, chosen", [(AVX2_ONLY, "fp32"), (AVX2_ONLY | {"avx512_bf16"}, "bf16"),
                                           (AVX2_ONLY | {"amx_bf16", "amx_tile"}, "bf16"), (set(), "fp32"),
                                           ({"avx512f", "avx512bw"}, "fp32")])
def test_auto_on_a_cpu_is_bf16_only_with_bf16_units(flags, chosen):
    assert resolve("auto", "cpu", flags=flags) == chosen


def test_auto_on_cuda_follows_the_gpus_bf16_and_explicit_choices_are_kept():
    assert resolve("auto", "cuda", cuda_bf16=True) == "bf16"
    assert resolve("auto", "cuda", cuda_bf16=False) == "fp32"
    assert resolve("fp32", "cuda", cuda_bf16=True) == "fp32"
    assert resolve("fp32", "cpu", flags={"amx_bf16"}) == "fp32"
    assert resolve("bf16", "cpu", flags=AVX2_ONLY) == "bf16"  # honoured, and said to be emulated
    assert emulated("bf16", "cpu", flags=AVX2_ONLY) and not emulated("bf16", "cpu", flags={"amx_bf16"})
    assert not emulated("fp32", "cpu", flags=AVX2_ONLY) and not emulated("bf16", "cuda", flags=AVX2_ONLY)


def test_bad_choices_are_one_line():
    with pytest.raises(InputError, match="--precision 'fp16': use one of auto, fp32, bf16"):
        resolve("fp16", "cpu", flags=AVX2_ONLY)
    with pytest.raises(InputError, match="this GPU does not support bf16"):
        resolve("bf16", "cuda", cuda_bf16=False)


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Some Xeon\nflags\t\t: fpu avx2 avx512_bf16 amx_bf16\n\n"
                    "processor\t: 1\nflags\t\t: fpu avx2 avx512_bf16 amx_bf16\n")
    assert cpu_flags(info) == {"fpu", "avx2", "avx512_bf16", "amx_bf16"}
    assert cpu_flags(tmp_path / "absent") == frozenset()
    info.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")  # aarch64 spells it Features
    assert "bf16" in cpu_flags(info)


def test_autocast_runs_matmuls_in_bf16_and_fp32_leaves_them():
    import torch

    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with autocast("bf16", "cpu"):
        assert (a @ b).dtype == torch.bfloat16
    with autocast("fp32", "cpu"):
        assert (a @ b).dtype == torch.float32
