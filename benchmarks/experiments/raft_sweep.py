"""Choose a RAFT recipe (learning rate, steps, abstention share) on synthesised held-out rows only.

Each adapter given with --adapter NAME=DIR is a `hybrid tune generator` run on the same synthesised
rows with the same seed, so the rows it held out (OUT/held_out.jsonl, never trained on) are the same
for all; a sweep whose adapters held out different rows is refused. The selection rows are those
held-out answerable rows plus the synthesised unanswerable rows of --synth (RAFT trains on the
answerable rows only). `hybrid eval` scores the untuned reader (`rag`) and every adapter on them,
and the rule below, fixed before any result was read, picks one configuration:

    among the configurations whose accuracy on the answerable selection rows is at least rag's
    minus --max-accuracy-drop, the lowest hallucination; a tie, or no adapter inside the drop,
    keeps rag (no tuning)

The hand-written test questions choose nothing here; evaluate the chosen adapter on them afterwards.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.experiments.raft_sweep --synth runs/b34/synth/qa.jsonl \\
        --index runs/b33/index --adapter s200=runs/b34/raft --adapter s50=OUT/lr2e-4_s50_p0.8 \\
        --out benchmarks/out/raft_sweep
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.harness import child_env, fail, finish, parser  # first: sets the offline environment

GROUPS = ["hr", "finance", "security", "engineering"]
UNTUNED = "rag"


def recipe(adapter: Path) -> dict:
    """The swept settings and cost of one adapter, read from its run record."""
    rec = json.loads((adapter / "hybrid_run.json").read_text(encoding="utf-8"))
    cfg = rec["config"]
    return {"dir": str(adapter), "learning_rate": cfg["train"]["learning_rate"], "max_steps": cfg["train"]["max_steps"],
            "steps": rec["steps"], "p_oracle": cfg["p_oracle"], "no_oracle": cfg["no_oracle"],
            "qa": cfg["qa"], "seed": cfg["train"]["seed"], "train_minutes": rec["minutes"],
            "final_val_loss": rec["final_val_loss"], "held_out_ids": sorted(rec["data"]["held_out_ids"])}


def selection_rows(adapters: dict[str, Path], recipes: dict[str, dict], synth: Path) -> list[dict]:
    """The held-out answerable rows all adapters share, plus --synth's unanswerable rows."""
    held = {tuple(r["held_out_ids"]) for r in recipes.values()}
    if len(held) != 1:
        fail("the adapters held out different rows; train every --adapter on the same --qa "
                         "with the same --seed and --test-fraction")
    first = next(iter(adapters.values()))
    rows = [json.loads(line) for line in (first / "held_out.jsonl").read_text(encoding="utf-8").splitlines() if line]
    synth_rows = [json.loads(line) for line in synth.read_text(encoding="utf-8").splitlines() if line]
    trained_on = {Path(r["qa"]).resolve() for r in recipes.values()}
    if synth.resolve() in trained_on:
        fail(f"--synth {synth} is the file the adapters trained on; give the synth output that "
                         "also holds the unanswerable rows")
    rows += [{k: r[k] for k in ("id", "question", "answers", "gold_ids")} for r in synth_rows
             if r.get("synth", {}).get("kind") == "unanswerable"]
    return rows


def choose(configs: dict[str, dict], max_drop: float) -> str:
    """The rule in the module docstring, on `hybrid eval`'s per-configuration figures.

    >>> choose({"rag": {"accuracy_answerable": 0.8, "hallucination_rate": 0.4},
    ...         "rag+a": {"accuracy_answerable": 0.78, "hallucination_rate": 0.3},
    ...         "rag+b": {"accuracy_answerable": 0.6, "hallucination_rate": 0.1}}, 0.05)
    'rag+a'
    """
    floor = configs[UNTUNED]["accuracy_answerable"] - max_drop
    best = UNTUNED
    for name, c in configs.items():
        if c["accuracy_answerable"] >= floor - 1e-12 and c["hallucination_rate"] < configs[best]["hallucination_rate"]:
            best = name
    return best


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__, out="benchmarks/out/raft_sweep", out_help="work directory: selection.jsonl, eval/, result.json")
    p.add_argument("--synth", required=True, help="the synth output the adapters' answerable rows came from")
    p.add_argument("--index", required=True)
    p.add_argument("--adapter", action="append", required=True, help="NAME=DIR, one per sweep point")
    p.add_argument("--base-model", default="qwen2.5-coder-0.5b")
    p.add_argument("-k", type=int, default=3)
    p.add_argument("--max-accuracy-drop", type=float, default=0.05)
    args = p.parse_args(argv)

    adapters = {}
    for spec in args.adapter:
        name, sep, path = spec.partition("=")
        if not sep or "." in name or not (Path(path) / "hybrid_run.json").exists():
            fail(f"--adapter {spec}: give NAME=DIR of a hybrid tune generator output, "
                             "the name without '.'")
        adapters[name] = Path(path)
    recipes = {name: recipe(d) for name, d in adapters.items()}
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    rows = selection_rows(adapters, recipes, Path(args.synth))
    sel = work / "selection.jsonl"
    sel.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cmd = [sys.executable, "-m", "hybrid", "eval", str(sel), "--index", args.index, "-k", str(args.k),
           "--base-model", args.base_model, "--no-closed-book", "--out", str(work / "eval"), "-q",
           *[a for g in GROUPS for a in ("--group", g)],
           *[a for n, d in adapters.items() for a in ("--adapter", f"{n}={d}")]]
    if subprocess.run(cmd, env=child_env()).returncode:
        fail("hybrid eval on the selection rows failed (its error is above)")
    report = json.loads((work / "eval" / "report.json").read_text(encoding="utf-8"))
    keys = ("accuracy_answerable", "abstention_unanswerable", "hallucination_rate", "accuracy")
    configs = {name: {k: c[k] for k in keys} for name, c in report["configs"].items()}
    chosen = choose(configs, args.max_accuracy_drop)
    results = {"rule": f"lowest hallucination with accuracy on answerable >= rag's - {args.max_accuracy_drop}",
               "selection_rows": {"answerable": sum(bool(r["answers"]) for r in rows),
                                  "unanswerable": sum(not r["answers"] for r in rows)},
               "recipes": {n: {k: v for k, v in r.items() if k != "held_out_ids"} for n, r in recipes.items()},
               "configs": configs, "chosen": chosen, "base_model": args.base_model, "precision": report["precision"]}
    for name, c in configs.items():
        print(f"{name:24s} accuracy on answerable {c['accuracy_answerable']:.3f}  abstained on unanswerable "
              f"{c['abstention_unanswerable']:.3f}  hallucination {c['hallucination_rate']:.3f}", flush=True)
    print(f"chosen: {chosen}", flush=True)
    finish(args, "benchmarks.experiments.raft_sweep", results, argv, path=work / "result.json")


if __name__ == "__main__":
    main()
