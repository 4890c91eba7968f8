"""Chunking cost by document size: is `chunk_document` linear in time and memory?

For each size a fresh subprocess builds one document of that many MB (the bundled corpus's
Markdown bodies, repeated: real prose with sentence and paragraph breaks), loads the packaged
MiniLM tokenizer that retrieval/embedder.py resolves, and times `chunk_document` at the default
IndexConfig settings (200 tokens, overlap 32). It reports seconds, chunks, the peak RSS of the
process (ru_maxrss: interpreter, tokenizer and the text included) and the RSS before chunking,
so the difference is what chunking itself held at its peak.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.performance.chunking                    # 0.25 .. 50 MB, ~3 min on 2 cores
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.performance.chunking --sizes 0.25 1 2   # quick

`--out FILE` writes the rows as a result file (benchmarks/harness.py's format); `--json` prints them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

from benchmarks.harness import ROOT, child_env, finish, parser  # first: sets the offline environment

SIZES = [0.25, 1, 2, 10, 50]


def _rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def one(size_mb: float, chunk_tokens: int, overlap: int) -> dict:
    """Chunk one document of `size_mb` MB in this process; returns the measurements."""
    import time

    from transformers import AutoTokenizer

    from retrieval.chunking import chunk_document
    from retrieval.corpus import Document, load_corpus
    from retrieval.embedder import resolve_embedder

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_embedder(None)[1]))
    base = "\n\n".join(d.text for d in load_corpus(ROOT / "corpora" / "brindle" / "docs").documents)
    n = int(size_mb * 1e6)
    text = (base * (n // len(base) + 1))[:n]
    tokenizer("warm up", add_special_tokens=False, return_offsets_mapping=True)
    before = _rss_mb()
    t0 = time.perf_counter()
    chunks = chunk_document(Document(id="big", title="Big", text=text, source="big.md"), tokenizer, chunk_tokens, overlap)
    seconds = time.perf_counter() - t0
    return {"mb": size_mb, "seconds": round(seconds, 2), "chunks": len(chunks), "rss_before_mb": round(before),
            "peak_rss_mb": round(_rss_mb())}


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__, out_help="result file (JSON); none unless given")
    ap.add_argument("--sizes", type=float, nargs="+", default=SIZES, help="document sizes in MB")
    ap.add_argument("--chunk-tokens", type=int, default=200)
    ap.add_argument("--overlap", type=int, default=32)
    ap.add_argument("--one", type=float, help=argparse.SUPPRESS)  # child mode: one size, JSON on stdout
    args = ap.parse_args(argv)
    if args.one is not None:
        print(json.dumps(one(args.one, args.chunk_tokens, args.overlap)))
        return
    env = child_env()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print("| MB | seconds | s/MB | chunks | RSS before (MB) | peak RSS (MB) |")
    print("|---:|---:|---:|---:|---:|---:|")
    rows = []
    for size in args.sizes:
        out = subprocess.run([sys.executable, "-m", "benchmarks.performance.chunking", "--one", str(size), "--chunk-tokens", str(args.chunk_tokens),
                              "--overlap", str(args.overlap)], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
        rows.append(r := json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"| {r['mb']:g} | {r['seconds']:.2f} | {r['seconds'] / r['mb']:.2f} | {r['chunks']} | "
              f"{r['rss_before_mb']} | {r['peak_rss_mb']} |", flush=True)
    finish(args, "benchmarks.performance.chunking", {"chunk_tokens": args.chunk_tokens, "overlap": args.overlap,
                                                     "rows": rows}, argv)


if __name__ == "__main__":
    main()
