"""README.md's "## Library" block, run as written against a directory laid out like `make demo`'s
outputs (built on the tests' tiny random models), so the README cannot drift from the library."""

import re

import pytest

from tests.conftest import ROOT, config
from tests.tuning.test_tune_generator import small_qa
from tuning.tune_generator import GeneratorTuneConfig, tune_generator

DEMO_GROUPS = ["hr", "finance", "security", "engineering"]  # the Makefile's GROUPS


def library_block() -> str:
    section = (ROOT / "README.md").read_text(encoding="utf-8").split("\n## Library\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the Library section holds one python block"
    return blocks[0]


@pytest.fixture()
def demo_dir(tmp_path, bundled_tiny_index, tiny_embedder_dir, tiny_llm_dir):
    """runs/demo as `make demo` leaves it: index, embedder, synth/qa.jsonl and raft (the four groups)."""
    runs = tmp_path / "runs" / "demo"
    (runs / "synth").mkdir(parents=True)
    (runs / "index").symlink_to(bundled_tiny_index)
    (runs / "embedder").symlink_to(tiny_embedder_dir)
    small_qa(runs / "synth")
    tune_generator(config(GeneratorTuneConfig, index=str(runs / "index"), qa=str(runs / "synth" / "qa.jsonl"),
                          out=str(runs / "raft"), base_model=str(tiny_llm_dir), num_distractors=2, max_steps=1,
                          grad_accum=1, test_fraction=0, val_fraction=0, groups=DEMO_GROUPS),
                   progress=False, log=lambda *_: None)
    return tmp_path


def test_the_library_section_runs_against_the_demo_outputs(demo_dir, tiny_llm_dir, monkeypatch):
    import tuning.generation
    import tuning.tune_generator

    real = tuning.generation.resolve_generator

    def tiny_default(spec):  # only the default generator's weights differ from a user's machine
        return ("smollm2", tiny_llm_dir) if spec in (None, "smollm2") else real(spec)

    monkeypatch.setattr(tuning.generation, "resolve_generator", tiny_default)
    monkeypatch.setattr(tuning.tune_generator, "resolve_generator", tiny_default)
    monkeypatch.chdir(demo_dir)
    exec(compile(library_block(), "README.md (## Library)", "exec"), {"__name__": "readme"})
    assert (demo_dir / "runs" / "demo" / "raft-more" / "adapter_config.json").exists()
