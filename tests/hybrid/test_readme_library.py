"""README.md's "## Library" block, run as written against a directory laid out like `make demo`'s
outputs (built on the tests' tiny random models), so the README cannot drift from the library."""

import json
import re

import pytest

from tests.conftest import ROOT
from tests.tuning.test_probe import ANSWERS, fake_reader, probe_qa  # noqa: F401  (fixture reused)
from tests.tuning.test_tune_generator import small_qa
from tuning.tune_probe import ProbeTuneConfig, tune_probe

DEMO_GROUPS = ["hr", "finance", "security", "engineering"]  # the Makefile's GROUPS


def library_block() -> str:
    section = (ROOT / "README.md").read_text(encoding="utf-8").split("\n## Library\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the Library section holds one python block"
    return blocks[0]


@pytest.fixture()
def demo_dir(tmp_path, bundled_tiny_index, tiny_embedder_dir, tiny_llm_dir, probe_qa):
    """runs/demo as `make demo` leaves it: index, embedder, synth/qa.jsonl and probe (the four groups)."""
    runs = tmp_path / "runs" / "demo"
    (runs / "synth").mkdir(parents=True)
    (runs / "index").symlink_to(bundled_tiny_index)
    (runs / "embedder").symlink_to(tiny_embedder_dir)
    small_qa(runs / "synth")
    with pytest.MonkeyPatch.context() as mp:  # the tiny model cannot read: the fake reader answers for it
        fake_reader(mp)
        ANSWERS[:] = sorted({a for line in probe_qa.read_text().splitlines() for a in json.loads(line)["answers"]},
                            key=len, reverse=True)
        tune_probe(ProbeTuneConfig(out=str(runs / "probe"), index=str(runs / "index"), qa=str(probe_qa),
                                   base_model=str(tiny_llm_dir), held_out_fraction=0.5, batch_size=4,
                                   precision="fp32", groups=DEMO_GROUPS), progress=False)
    return tmp_path


def test_the_library_section_runs_against_the_demo_outputs(demo_dir, tiny_llm_dir, monkeypatch):
    import tuning.generation
    import tuning.tune_generator

    real = tuning.generation.resolve_generator

    def tiny_default(spec):  # only the default generator's weights differ from a user's machine
        return ("smollm2", tiny_llm_dir) if spec in (None, "smollm2", "qwen2.5-coder-0.5b") else real(spec)

    monkeypatch.setattr(tuning.generation, "resolve_generator", tiny_default)
    monkeypatch.setattr(tuning.tune_generator, "resolve_generator", tiny_default)
    monkeypatch.chdir(demo_dir)
    ns = {"__name__": "readme"}
    exec(compile(library_block(), "README.md (## Library)", "exec"), ns)
    assert ns["pipe"].probe is not None and ns["r"].probe_answerable is not None  # the base model answers: probed
    assert (demo_dir / "runs" / "demo" / "raft-more" / "adapter_config.json").exists()
