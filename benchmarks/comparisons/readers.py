"""The packaged readers side by side, untuned with passages (`rag`): how the default generator is chosen.

For each model, in a fresh process (so peak memory is its own): first-use conversion (GGUF ->
cached safetensors, verified against the pinned hash), warm load time, peak RSS, prefill and
decode tokens/s on one fixed 3-passage prompt (greedy, fp32), then `hybrid eval`'s `rag`
configuration on
  - a seeded --halueval-limit subset of the HaluEval test rows (all 1000 test-split lines with
    fixed passages, the gold knowledge + 3 nearest distractors, half of the lines withheld so the
    right behaviour is to abstain: benchmarks/experiments/factuality_halueval.py write_fixed_rows, seed 0), and
  - a seeded --bundled-limit subset of the bundled corpus's questions, 3 passages retrieved (all
    groups) from an index of the bundled corpus.
Reported: accuracy on answerable questions, abstention on unanswerable ones, hallucination (95 %
intervals as `hybrid eval` reports them: Wilson; rows measured before carry percentile bootstrap
ones), and the timings. Needs ../shared (HaluEval) and the HaluEval index of
benchmarks/experiments/retrieval_halueval.py (`--skip-throughput --skip-tuning` builds just that).

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.comparisons.readers \
        --models smollm2,qwen2.5-coder-0.5b,qwen2.5-coder-1.5b --halueval-limit 200 --bundled-limit 40

--out is a work directory: the test rows, the bundled index, one eval per model and set, and the
result file results.json (benchmarks/harness.py's format), one entry per MODEL@HALUEVAL/BUNDLED
limits, rewritten after each model. A run adds to the results.json already there (older bare files
too), so models can be measured one at a time.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.harness import ROOT, finish, parser, read_result, write_result  # first: sets the offline environment

from benchmarks.data.bundled_corpus import GROUPS


def test_rows(work: Path, index: Path) -> Path:
    """WORK/test.jsonl: every HaluEval test-split line with fixed passages (built once)."""
    path = work / "test.jsonl"
    if not path.exists():
        import random

        from benchmarks.data import halueval
        from benchmarks.experiments.factuality_halueval import write_fixed_rows
        from retrieval.retriever import Retriever

        lines = halueval.load_lines()
        _, test_idx = halueval.split(len(lines), 1000, 0)
        te = sorted(test_idx)
        work.mkdir(parents=True, exist_ok=True)
        write_fixed_rows(path, te, set(random.Random(0).sample(te, len(te) // 2)), lines, halueval.doc_ids(lines),
                         Retriever.load(index), 3)
    return path


def speed(model, tok) -> dict:
    """Prefill and decode tokens/s on one fixed prompt (3 bundled passages and a question)."""
    import torch

    from tuning.prompting import build_messages

    docs = sorted((ROOT / "corpora/brindle/docs").glob("*.md"))[:3]
    passages = [{"text": d.read_text(encoding="utf-8")[:1200], "title": d.stem} for d in docs]
    prompt = tok.apply_chat_template(build_messages("What does the first document say about safety?", passages),
                                     add_generation_prompt=True, tokenize=False)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]

    def generate(n: int) -> float:
        t = time.perf_counter()
        model.generate(input_ids=ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
        return time.perf_counter() - t

    # Decode is timed as the difference of two generations from the same prompt, both after a
    # warm-up: a cold first forward pass can be slower than the prefill inside generate, which
    # made "total - separate prefill" negative for Qwen 1.5B.
    with torch.inference_mode():
        generate(1)  # warm-up
        first = generate(1)  # prefill + one token
        total = generate(33)
    # Timing noise can leave no difference to divide by: no decode figure then, not an absurd one.
    return {"prompt_tokens": int(ids.shape[1]), "prefill_tok_s": ids.shape[1] / first,
            "decode_tok_s": 32 / (total - first) if total > first else float("nan")}


def one(args) -> dict:
    """Everything for one model (run in its own process)."""
    from hybrid.eval import EvalConfig, run_eval
    from tuning.generation import cache_root, load_generator, resolve_generator

    name, work = args.one, Path(args.out)
    cached = any((cache_root() / "models").glob(f"{name}-*/hybrid_source.json"))
    t = time.perf_counter()
    resolve_generator(name)
    convert_s = None if cached else time.perf_counter() - t
    t = time.perf_counter()
    model, tok, info = load_generator(name)
    load_s = time.perf_counter() - t
    row = {"model": name, "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6),
           "convert_s": convert_s, "load_s": load_s, **speed(model, tok)}
    del model
    evals = {}
    if args.halueval_limit:
        evals["halueval"] = EvalConfig(qa=str(test_rows(work, Path(args.index))), closed_book=False,
                                       limit=args.halueval_limit, seed=0, base_model=name, batch_size=4,
                                       max_new_tokens=64, out=str(work / f"{name}_halueval{args.halueval_limit}"))
    if args.bundled_limit:
        evals["bundled"] = EvalConfig(qa=str(ROOT / "corpora/brindle/qa.jsonl"), index=str(work / "bundled_index"),
                                      closed_book=False, limit=args.bundled_limit, seed=0, k=3, base_model=name,
                                      batch_size=4, max_new_tokens=64, groups=GROUPS,
                                      out=str(work / f"{name}_bundled{args.bundled_limit}"))
    for what, cfg in evals.items():
        t = time.perf_counter()
        m = run_eval(cfg, progress=False).configs["rag"]
        row[what] = {k: m.get(k) for k in ("n", "accuracy", "accuracy_answerable", "abstention_unanswerable",
                                           "hallucination_rate", "latency_ms_p50", "tokens_per_s")}
        row[what]["ci"] = m["ci"]
        row[what]["minutes"] = round((time.perf_counter() - t) / 60, 1)
    row["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return row


def table(results: dict) -> str:
    """results.json's entries as one Markdown table: a row per model and set."""
    lines = ["| model | params | load s | peak RSS GiB | prefill tok/s | decode tok/s | set | n | accuracy on answerable "
             "[95 % CI] | abstention on unanswerable | hallucination [95 % CI] |",
             "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in results.values():
        for what in ("halueval", "bundled"):
            if what not in r:
                continue
            m, ci = r[what], r[what]["ci"]
            acc = ci.get("accuracy_answerable", [float("nan")] * 2)
            lines.append(f"| {r['model']} | {r['params_m']}M | {r['load_s']:.1f} | {r['peak_rss_gib']:.1f} | "
                         f"{r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | {what} | {m['n']} | "
                         f"{m['accuracy_answerable']:.3f} [{acc[0]:.3f}, {acc[1]:.3f}] | "
                         f"{m['abstention_unanswerable']:.3f} | {m['hallucination_rate']:.3f} "
                         f"[{ci['hallucination_rate'][0]:.3f}, {ci['hallucination_rate'][1]:.3f}] |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, out="benchmarks/out/readers", out_aliases=("--work",),
               out_help="work directory: evals, indexes and results.json (added to, not replaced)")
    p.add_argument("--models", default="smollm2,qwen2.5-coder-0.5b,qwen2.5-coder-1.5b")
    p.add_argument("--halueval-limit", type=int, default=200)
    p.add_argument("--bundled-limit", type=int, default=40)
    p.add_argument("--index", default="benchmarks/out/halueval/index", help="the HaluEval index")
    p.add_argument("--one", help=argparse.SUPPRESS)  # child mode: one model, its row as JSON on stdout
    args = p.parse_args(argv)
    work = Path(args.out)
    if args.one:
        print(json.dumps(one(args)), flush=True)
        return 0
    if args.bundled_limit and not (work / "bundled_index" / "manifest.json").exists():
        from retrieval.index import IndexConfig, build_index

        build_index(ROOT / "corpora/brindle/docs", work / "bundled_index", IndexConfig(chunk_tokens=128, overlap=16))
    if args.halueval_limit:
        test_rows(work, Path(args.index))
    result_file = work / "results.json"
    results = read_result(result_file) if result_file.exists() else {}
    for name in args.models.split(","):
        cmd = [sys.executable, "-m", "benchmarks.comparisons.readers", "--one", name, "--out", args.out, "--index", args.index,
               "--halueval-limit", str(args.halueval_limit), "--bundled-limit", str(args.bundled_limit)]
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if out.returncode:
            print(f"{name}: failed\n{out.stderr[-2000:]}", flush=True)
            continue
        results[f"{name}@{args.halueval_limit}/{args.bundled_limit}"] = json.loads(out.stdout.strip().splitlines()[-1])
        write_result(result_file, "benchmarks.comparisons.readers", results, argv)  # after each model: a crash keeps the rest
        print(json.dumps(results[f"{name}@{args.halueval_limit}/{args.bundled_limit}"]), flush=True)
    print("\n" + table(results))
    finish(args, "benchmarks.comparisons.readers", results, argv, path=result_file)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
