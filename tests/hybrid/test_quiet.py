"""Quiet means quiet (issue 34): real commands in fresh processes print only hybrid's own lines on stderr.

Fresh processes, not CliRunner: the notices come from importing bitsandbytes/kernels, transformers and
mlflow for the first time, and pytest's own warning capture would hide the FutureWarnings in-process.

hybrid's own stderr lines: under the CLI, `warning: ` / `error: ` / `tracked: ` lines and `hybrid run`'s
stage lines (`index: running`); progress bars only where the command was not asked to be quiet. In a
library user's process (no logging set up), hybrid's warnings are their bare message, listed per test.
"""

import json
import logging
import os
import re
import subprocess
import sys

import pytest

from core import quiet_libraries
from tests.conftest import ROOT, make_small_corpus

HYBRID_LINE = re.compile(r"(warning|error|tracked): |(index|synth|embedder|generator|dpo|calibrate|probe|eval|serve): ")
PROGRESS = re.compile(r"\d+%\|")  # a tqdm bar


def foreign(stderr: str, progress_allowed: bool = False) -> list[str]:
    """The stderr lines that are not hybrid's own (a bar's redraws split on \\r; blank lines ignored)."""
    lines = [part for line in stderr.splitlines() for part in line.split("\r") if part.strip()]
    return [l for l in lines if not HYBRID_LINE.match(l) and not (progress_allowed and PROGRESS.search(l))]


def env() -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PYTHONWARNINGS"))}
    return {**e, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def hybrid(*args, cwd) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "hybrid.cli", *map(str, args)], capture_output=True, text=True,
                         cwd=cwd, env=env(), timeout=300)
    assert res.returncode == 0, res.stderr
    return res


@pytest.fixture(scope="module")
def quiet_index(tmp_path_factory, tiny_embedder_dir):
    """`hybrid index -q --track mlflow` on the six small documents, in a fresh directory (its ./mlflow.db is
    new, so MLflow creates its tables): the index, and the command's result."""
    work = tmp_path_factory.mktemp("quiet")
    corpus = make_small_corpus(work / "corpus")
    res = hybrid("index", corpus, "--out", work / "idx", "--embedder", tiny_embedder_dir, "--chunk-tokens", 64,
                 "--overlap", 8, "-q", "--track", "mlflow", cwd=work)
    return work, res


def test_index_with_tracking_and_search_print_only_their_own_lines(quiet_index):
    work, res = quiet_index
    assert (work / "mlflow.db").is_file() and res.stdout.startswith("indexed 6 documents")
    # kernels' "Skipping publisher trust check", bitsandbytes' "Failed to load CPU gemm_4bit_forward" and
    # MLflow's "INFO mlflow.store.db.utils: Creating initial MLflow database tables..." would be here
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert foreign(res.stderr) == [] and len(lines) == 1 and lines[0].startswith("tracked: MLflow run "), res.stderr
    res = hybrid("search", "battery", "--index", work / "idx", "-k", 2, cwd=work)
    assert res.stdout.startswith("1. [") and res.stderr == ""


LIBRARY_USE = """
import sys
from hybrid import GeneratorTuneConfig, Pipeline, TrainSettings, tune_generator
work, llm = sys.argv[1], sys.argv[2]
Pipeline.load(work + "/idx", base_model=llm, max_new_tokens=2).ask("How long does the Kestrel battery last?")
steps = TrainSettings(max_steps=1, grad_accum=1, batch_size=1, max_length=1024)
tune_generator(GeneratorTuneConfig(out=work + "/adapter", index=work + "/idx", qa=work + "/qa.jsonl", base_model=llm,
                                   num_distractors=1, val_fraction=0, test_fraction=0, train=steps),
               progress=False, log=lambda *_: None)
"""


def test_library_use_prints_only_hybrids_own_warnings(quiet_index, tiny_llm_dir):
    """Pipeline.load + ask and tune_generator as a library user calls them, logging not set up."""
    work, _ = quiet_index
    rows = [("1", "How long does the Kestrel buoy battery last?", ["14 months"], ["buoys/kestrel"]),
            ("2", "How long does the Osprey buoy battery last?", ["9 months"], ["buoys/osprey"]),
            ("3", "Which extension is support on?", ["4411"], ["support"]),
            ("4", "What does salary band L3 pay?", ["61000"], ["salaries"]),  # hr only: skipped, with a warning
            ("5", "Who founded the company?", [], [])]
    (work / "qa.jsonl").write_text("".join(json.dumps({"id": i, "question": q, "answers": a, "gold_ids": g}) + "\n"
                                           for i, q, a, g in rows))
    res = subprocess.run([sys.executable, "-c", LIBRARY_USE, str(work), str(tiny_llm_dir)], capture_output=True,
                         text=True, cwd=ROOT, env=env(), timeout=300)
    assert res.returncode == 0, res.stderr
    # kernels' and bitsandbytes' notices on import, transformers' FutureWarnings (`gradient_checkpointing`
    # passed by hybrid, `is_gradient_checkpointing` used by peft) and `WARNING:root:access: ...` would be here
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert lines == ["access: 1 questions skipped, their gold documents are restricted to groups not named with "
                     "groups= (e.g. 4)"], res.stderr


def test_tune_embedder_says_what_mining_found_in_hybrids_words(quiet_index):
    """`-q`: no progress bar of the miner's either. No sentence-transformers mining table on stdout (nor torch's std() warnings it brings on stderr); the
    pairs that found no hard negative are one hybrid warning naming hybrid's flags."""
    work, _ = quiet_index
    res = hybrid("tune", "embedder", "--index", work / "idx", "--out", work / "emb", "--batch-size", 2,
                 "--max-steps", 1, "--test-fraction", 0.34, "-q", cwd=work)
    assert not any(l.startswith(("Metric", "Count", "Mean", "Skipped", "Could not find")) for l in res.stdout.splitlines())
    assert "| base |" in res.stdout and "| tuned |" in res.stdout
    assert foreign(res.stderr) == []  # -q: not even the miner's own progress bars
    assert "warning: hard negatives: " in res.stderr and "--relative-margin" in res.stderr


def test_each_filter_drops_its_notice_and_nothing_else():
    """The filters are narrow: another message of the same logger, and other warnings, still show."""
    quiet_libraries.install()
    quiet_libraries.install()  # idempotent: one filter per logger
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    for name, starts in quiet_libraries.NOTICES.items():
        logger = logging.getLogger(name)
        assert sum(isinstance(f, quiet_libraries._DropNotices) for f in logger.filters) == 1
        keep = Keep()
        logger.addHandler(keep)
        try:
            for start in starts:
                logger.warning(start + " ...")
            logger.warning("something else")
        finally:
            logger.removeHandler(keep)
    assert seen == ["something else"] * len(quiet_libraries.NOTICES)
