"""What the speed rows (and precision.py) run on: the bundled index, RAFT examples mined from it,
HaluEval rows with fixed passages, and the torch thread count every row but `threads` holds at 1."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from benchmarks.harness import OUT, ROOT

HALUEVAL_ROWS = OUT / "factuality" / "test.jsonl"
BUNDLED = ROOT / "corpora" / "brindle"


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)

def bundled_index(work: Path) -> Path:
    """An index of the bundled corpus with the packaged MiniLM (built once under WORK)."""
    from retrieval.index import IndexConfig, build_index

    index = work / "index"
    if not (index / "manifest.json").exists():
        build_index(BUNDLED / "docs", index, IndexConfig(chunk_tokens=128, overlap=16))
    return index


def raft_examples(work: Path, index: Path, distractors: int, max_length: int, n: int) -> Path:
    """RAFT examples mined from the bundled corpus by hybrid's own data stage; the `n` whose token
    length is nearest the median (so step times do not depend on the trainers' different shuffles)."""
    from core.jsonl import write_jsonl
    from tuning.generation import load_tokenizer, resolve_generator
    from tuning.prompting import sequence_tokens
    from tuning.tune_generator import GeneratorTuneConfig, raft_data

    path = work / f"raft_d{distractors}_L{max_length}_n{n}.jsonl"
    if path.exists():
        return path
    cfg = GeneratorTuneConfig(out=str(work / "unused"), index=str(index), qa=str(BUNDLED / "qa.jsonl"),
                              num_distractors=distractors, test_fraction=0.0, val_fraction=0.0)
    data = raft_data(cfg)
    tok = load_tokenizer(resolve_generator(None)[1])
    answers = [e for e in data.train if e["oracle"]]  # quote + answer targets (the DPO row prefers them to abstaining)
    lengths = [sequence_tokens(tok, e["prompt"], e["completion"][0]["content"])[1] for e in answers]
    fits = [(abs(length - statistics.median(lengths)), i) for i, length in enumerate(lengths) if length <= max_length]
    chosen = [answers[i] for _, i in sorted(fits)[:n]]
    if not chosen:  # never leave an empty file behind: a rerun would read it as the examples
        raise SystemExit(f"no RAFT example of the bundled corpus fits {max_length} tokens (shortest "
                         f"{min(lengths)}); raise sft_max_length")
    write_jsonl(path, chosen)
    return path


def example_lengths(path: Path) -> list[int]:
    from core.jsonl import read_jsonl
    from tuning.generation import load_tokenizer, resolve_generator
    from tuning.prompting import sequence_tokens

    tok = load_tokenizer(resolve_generator(None)[1])
    return [sequence_tokens(tok, e["prompt"], e["completion"][0]["content"])[1] for _, e in read_jsonl(path, "x", "x")]


def halueval_rows(n: int) -> list[dict]:
    """HaluEval factuality test rows with fixed passages (benchmarks/experiments/factuality_halueval.py writes them)."""
    if not HALUEVAL_ROWS.exists():
        raise SystemExit(f"error: {HALUEVAL_ROWS} is missing; run benchmarks/experiments/factuality_halueval.py --steps data first")
    rows = [json.loads(line) for line in HALUEVAL_ROWS.read_text().splitlines() if line.strip()]
    return rows[:n]
