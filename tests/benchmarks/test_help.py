"""Every benchmark script runs as a module from the checkout's root: its `--help` exits 0 (no sys.path insert)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(
    ".".join(p.relative_to(ROOT).with_suffix("").parts)
    for p in (ROOT / "benchmarks").glob("*/*.py")
    if p.name != "__init__.py" and "if __name__ == \"__main__\"" in p.read_text()
)


def test_the_scripts_are_found():
    assert "benchmarks.performance.speed" in SCRIPTS and len(SCRIPTS) >= 20


@pytest.mark.parametrize("module", SCRIPTS)
def test_help_runs(module):
    done = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout
    assert "--out" in done.stdout and "--json" in done.stdout  # the harness's two options, in every script
