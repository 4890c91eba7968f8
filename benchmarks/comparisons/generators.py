"""The packaged generators side by side on the bundled corpus, untuned (how the default was chosen).

For each packaged model: cold conversion time (GGUF -> cached safetensors, first use only),
warm load time, and the `rag` configuration of `hybrid eval` on a seeded sample of the bundled
QA file with passages retrieved from an index of the bundled corpus (k=3): accuracy,
abstention, hallucination, latency and tokens/s.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.comparisons.generators --limit 30

--out is a work directory: the bundled index, one eval per model, and the result file results.json
(benchmarks/harness.py's format).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from benchmarks.harness import ROOT, finish, parser  # first: sets the offline environment

from benchmarks.data.bundled_corpus import GROUPS


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, out="benchmarks/out/generators", out_aliases=("--work",),
               out_help="work directory: the index, the evals and results.json")
    p.add_argument("--limit", type=int, default=30)
    p.add_argument("--models", default="smollm2,gemma3-270m")
    args = p.parse_args(argv)
    from hybrid.eval import EvalConfig, run_eval
    from retrieval.index import IndexConfig, build_index
    from tuning.generation import cache_root, load_generator, resolve_generator

    work = Path(args.out)
    index = work / "index"
    if not (index / "manifest.json").exists():
        build_index(ROOT / "corpora/brindle/docs", index, IndexConfig(chunk_tokens=128, overlap=16))
    rows = []
    for name in args.models.split(","):
        cached = any((cache_root() / "models").glob(f"{name}-*/config.json"))
        t = time.perf_counter()
        resolve_generator(name)
        convert_s = None if cached else time.perf_counter() - t
        t = time.perf_counter()
        model, tok, _ = load_generator(name)
        load_s = time.perf_counter() - t
        params = sum(p.numel() for p in model.parameters())
        del model
        rep = run_eval(EvalConfig(qa=str(ROOT / "corpora/brindle/qa.jsonl"), index=str(index), closed_book=False,
                                  limit=args.limit, seed=0, k=3, base_model=name, batch_size=4, max_new_tokens=64,
                                  groups=GROUPS, out=str(work / name)),
                       progress=False)
        m = rep.configs["rag"]
        rows.append({"model": name, "params_m": round(params / 1e6), "vocab": len(tok), "convert_s": convert_s,
                     "load_s": load_s, **{k: m[k] for k in ("n", "accuracy", "abstention_rate", "hallucination_rate",
                                                             "f1", "latency_ms_p50", "tokens_per_s")}})
        print(json.dumps(rows[-1]), flush=True)
    print("\n| model | params | vocab | first-use conversion s | load s | n | accuracy | abstention | hallucination | F1 | p50 ms | tok/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        conv = f"{r['convert_s']:.0f}" if r["convert_s"] is not None else "(cached)"
        print(f"| {r['model']} | {r['params_m']}M | {r['vocab']} | {conv} | {r['load_s']:.1f} | {r['n']} | {r['accuracy']:.3f} | "
              f"{r['abstention_rate']:.3f} | {r['hallucination_rate']:.3f} | {r['f1']:.3f} | {r['latency_ms_p50']:.0f} | "
              f"{r['tokens_per_s']:.1f} |")
    finish(args, "benchmarks.comparisons.generators", rows, argv, path=work / "results.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
