"""Two readers' answers to the same questions, paired: which differences are real.

    .venv/bin/python -m benchmarks.analyses.paired_readers \
        benchmarks/out/readers/qwen2.5-coder-0.5b_halueval200 benchmarks/out/readers/qwen2.5-coder-1.5b_halueval200

Each argument is a `hybrid eval --out` directory (its predictions.jsonl); `--config` picks the
configuration (default `rag`). On the questions both answered: accuracy on answerable questions and
hallucination for each, the difference B − A with its paired 95 % bootstrap interval, the
discordant counts and McNemar's exact p (hybrid/statistics.py, as `hybrid eval` reports them).
Printed as a table; `--json` prints the numbers as one JSON object last, `--out FILE` writes them as a
result file (benchmarks/harness.py's format).
"""

from __future__ import annotations

import sys
from pathlib import Path

from benchmarks.harness import finish, parser  # first: sets the offline environment

from hybrid.statistics import mcnemar_exact, paired_diff_ci
from core.errors import InputError
from core.jsonl import read_jsonl


def paired(a_dir: str, b_dir: str, config: str = "rag", seed: int = 0) -> dict:
    """{"n", "n_answerable", "a"/"b": {"accuracy_answerable", "hallucination_rate"}, and per rate
    B - A with its paired bootstrap interval, the discordant counts (a_only, b_only), McNemar's p}."""
    runs = {}
    for name, d in (("a", a_dir), ("b", b_dir)):
        rows = read_jsonl(Path(d) / "predictions.jsonl", name.upper(), "hybrid eval predictions")
        runs[name] = {p["id"]: p for _, p in rows if p["config"] == config}
    ids = sorted(set(runs["a"]) & set(runs["b"]))
    answerable = [q for q in ids if runs["a"][q]["answers"]]
    if not answerable:
        raise InputError(f"{a_dir}, {b_dir}: no answerable question in common under config {config!r}")
    out: dict = {"n": len(ids), "n_answerable": len(answerable), "a": {}, "b": {}}
    for rate, label, over in (("accuracy_answerable", "correct", answerable),
                              ("hallucination_rate", "hallucinated", ids)):
        xa = [runs["a"][q]["label"] == label for q in over]
        xb = [runs["b"][q]["label"] == label for q in over]
        out["a"][rate], out["b"][rate] = sum(xa) / len(over), sum(xb) / len(over)
        diff, low, high = paired_diff_ci(xa, xb, seed=seed)
        test = mcnemar_exact(xa, xb)
        out[rate] = {"b_minus_a": diff, "ci": [low, high], "a_only": test["a_only"], "b_only": test["b_only"],
                     "mcnemar_p": test["p_value"]}
    return out


def table(out: dict) -> str:
    """The paired numbers as a Markdown table: one row per rate."""
    lines = [f"{out['n']} questions both answered ({out['n_answerable']} answerable)", "",
             "| rate | A | B | B − A [95 % CI] | A only | B only | McNemar p |", "|---|---:|---:|---:|---:|---:|---:|"]
    for rate in ("accuracy_answerable", "hallucination_rate"):
        d = out[rate]
        lines.append(f"| {rate} | {out['a'][rate]:.3f} | {out['b'][rate]:.3f} | {d['b_minus_a']:+.3f} "
                     f"[{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] | {d['a_only']} | {d['b_only']} | {d['mcnemar_p']:.3g} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, out_help="result file (JSON); none unless given")
    p.add_argument("a", help="eval --out directory of reader A")
    p.add_argument("b", help="eval --out directory of reader B")
    p.add_argument("--config", default="rag")
    args = p.parse_args(argv)
    for d in (args.a, args.b):
        if not (Path(d) / "predictions.jsonl").is_file():
            print(f"error: {d}: no predictions.jsonl there; pass a 'hybrid eval --out' directory", file=sys.stderr)
            return 2
    try:
        out = paired(args.a, args.b, args.config)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(table(out))
    finish(args, "benchmarks.analyses.paired_readers", {"a": args.a, "b": args.b, "config": args.config, **out}, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
