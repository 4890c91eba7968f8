"""What retrieval recall buys downstream: `hybrid eval` reports with retrieved passages, one per mode, side by side.

    .venv/bin/python -m benchmarks.analyses.downstream_retrieval --out OUT.json \
        dense=benchmarks/out/factuality/retrieved_dense hybrid=benchmarks/out/factuality/retrieved_hybrid \
        "dense, rag+raft=benchmarks/out/factuality/retrieved_dense_raft:rag+raft_both2" ...

Each NAME=REPORT_DIR[:CONFIG] reads that dir's predictions.jsonl, configuration CONFIG (default
`rag`); the runs are paired by question id. Reported: the share
of questions whose gold document was among the retrieved passages, accuracy and hallucination
with 95 % Wilson intervals (as `hybrid eval` reports them), abstention, accuracy split by whether
the gold document was retrieved, and McNemar's exact test on accuracy against the first run.
"""
import json

from benchmarks.harness import finish, parser  # first: sets the offline environment
from hybrid.statistics import mcnemar_exact, proportion_ci


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, out_required=True, out_help="result file (JSON)")
    p.add_argument("runs", nargs="+", metavar="NAME=REPORT_DIR[:CONFIG]")
    args = p.parse_args(argv)
    runs = dict(a.split("=", 1) for a in args.runs)
    preds = {}
    for name, spec in runs.items():
        d, _, config = spec.partition(":")
        try:
            rows = [json.loads(line) for line in open(f"{d}/predictions.jsonl")]
        except FileNotFoundError:
            continue
        preds[name] = {r["id"]: r for r in rows if r["config"] == (config or "rag")}
    out = {}
    print("| retrieval | gold passage retrieved (top 4) | accuracy [95 % CI] | hallucination [95 % CI] | abstention |")
    print("|---|---:|---:|---:|---:|")
    for name, p in preds.items():
        ids = sorted(p)
        hit = [int(any(g in p[i]["retrieved_doc_ids"] for g in p[i]["gold_ids"])) for i in ids]
        acc = [int(p[i]["label"] == "correct") for i in ids]
        hal = [int(p[i]["label"] == "hallucinated") for i in ids]
        ab = [int(p[i]["label"] == "abstained") for i in ids]
        ca, ch = proportion_ci(acc), proportion_ci(hal)
        out[name] = {"n": len(ids), "gold_in_top4": sum(hit) / len(ids), "accuracy": sum(acc) / len(ids), "accuracy_ci": ca,
                     "hallucination": sum(hal) / len(ids), "hallucination_ci": ch, "abstention": sum(ab) / len(ids),
                     "accuracy_when_gold_retrieved": sum(a for a, h in zip(acc, hit) if h) / max(1, sum(hit)),
                     "accuracy_when_gold_missed": sum(a for a, h in zip(acc, hit) if not h) / max(1, len(ids) - sum(hit))}
        print(f"| {name} | {sum(hit)/len(ids):.2f} | {sum(acc)/len(ids):.2f} [{ca[0]:.2f}, {ca[1]:.2f}] | {sum(hal)/len(ids):.2f} [{ch[0]:.2f}, {ch[1]:.2f}] | {sum(ab)/len(ids):.2f} |")
    first = next(iter(preds))
    base = preds[first]
    for name, p in preds.items():
        if name == first:
            continue
        ids = sorted(set(p) & set(base))
        m = mcnemar_exact([int(base[i]["label"] == "correct") for i in ids], [int(p[i]["label"] == "correct") for i in ids])
        out[f"{name} vs {first} accuracy"] = m
        print(f"{name} vs {first}, accuracy: {m}")
    for name, o in out.items():
        if "accuracy_when_gold_retrieved" in o:
            print(name, "acc | gold retrieved", round(o["accuracy_when_gold_retrieved"], 3), "acc | gold missed", round(o["accuracy_when_gold_missed"], 3))
    finish(args, "benchmarks.analyses.downstream_retrieval", out, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
