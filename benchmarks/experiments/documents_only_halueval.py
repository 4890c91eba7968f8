"""Documents only on HaluEval: an adapter trained on questions synthesised from the 10,000 passages
against the adapter trained on HaluEval's own questions, same recipe and step budget, same test rows.

Steps (each reruns on its own; a finished step is skipped when its output exists):
  synth  `hybrid synth` over the HaluEval index (benchmarks/experiments/retrieval_halueval.py builds it): the
         packaged Qwen2.5-Coder-0.5B teacher, answer-first, --max-chunks chunks sampled by
         document, bounded by --synth-minutes (rerun to continue). No HaluEval question is read.
  train  WORK/train.jsonl: the synthesised rows minus those written from the gold passage of any
         test-split line (benchmarks/data/halueval.py's fixed split), so no test line's passage is taught.
  sft    `hybrid tune generator` with the recipe of the labelled adapter (`raft_both2` of
         benchmarks/experiments/factuality_halueval.py: every question with and without its oracle, 3 hard
         distractors, LoRA r16 / alpha 32 on all linear layers, lr 1e-3, accumulation 2,
         max length 1024) and its step budget (--steps-budget, 200).
  eval   `hybrid eval` on the fixed test rows (benchmarks/out/factuality/test.jsonl: gold + 3
         distractors, half withheld) with both adapters: rag, rag+labelled, rag+synth.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.experiments.documents_only_halueval --synth-minutes 30

--out is a work directory: synth/, train.jsonl, raft_synth/, eval/ and the result file timings.json
(benchmarks/harness.py's format: minutes per step and the train rows kept), added to by each rerun.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.harness import finish, parser, read_result, write_result  # first: sets the offline environment

HYBRID = str(Path(sys.executable).parent / "hybrid")


def hybrid(*args: str) -> None:
    print("+ hybrid " + " ".join(args), flush=True)
    subprocess.run([HYBRID, *args], check=True)


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__, out="benchmarks/out/documents_only", out_aliases=("--work",),
               out_help="work directory: every step's output and timings.json",
               json_help="print timings.json's results as one JSON object last")
    p.add_argument("--index", default="benchmarks/out/halueval/index")
    p.add_argument("--labelled", default="benchmarks/out/factuality/raft_both2",
                   help="the adapter trained on HaluEval's questions (factuality_halueval.py --sft-out raft_both2)")
    p.add_argument("--test", default="benchmarks/out/factuality/test.jsonl")
    p.add_argument("--max-chunks", type=int, default=400)
    p.add_argument("--synth-minutes", type=float, default=30)
    p.add_argument("--steps-budget", type=int, default=200)
    p.add_argument("--eval-limit", type=int, default=0, help="seeded subset of the test rows (0 = all)")
    p.add_argument("--steps", default="synth,train,sft,eval")
    args = p.parse_args(argv)
    steps, work = set(args.steps.split(",")), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    timings_path = work / "timings.json"
    timings = read_result(timings_path) if timings_path.exists() else {}  # a rerun adds to the minutes

    def save():
        write_result(timings_path, "benchmarks.experiments.documents_only_halueval", timings, argv)

    def stage(name, fn):
        t = time.perf_counter()
        fn()
        timings[f"{name}_min"] = round(timings.get(f"{name}_min", 0) + (time.perf_counter() - t) / 60, 1)
        save()

    synth = work / "synth" / "qa.jsonl"
    if "synth" in steps:
        synth.parent.mkdir(parents=True, exist_ok=True)
        stage("synth", lambda: hybrid("synth", "--index", args.index, "--out", str(synth), "--max-chunks",
                                      str(args.max_chunks), "--per-chunk", "2", "--unanswerable", "0.25",
                                      "--batch-size", "8", "--max-minutes", str(args.synth_minutes), "-q"))
    train = work / "train.jsonl"
    if "train" in steps:
        from benchmarks.data import halueval

        lines = halueval.load_lines()
        _, test_idx = halueval.split(len(lines), 1000, 0)
        doc_of = halueval.doc_ids(lines)
        test_docs = {doc_of[lines[i]["knowledge"].strip()] for i in test_idx}
        rows = [json.loads(x) for x in synth.read_text(encoding="utf-8").splitlines() if x.strip()]
        src_doc = {r["id"]: r["source_chunk"].rsplit("#", 1)[0] for r in rows}
        kept = [r for r in rows if not set(r["gold_ids"]) & test_docs and src_doc[r["id"]] not in test_docs]
        train.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8")
        timings["train_rows"] = {"synthesised": len(rows), "kept": len(kept),
                                 "answerable": sum(bool(r["answers"]) for r in kept),
                                 "dropped_test_passage": len(rows) - len(kept)}
        save()
        print(f"train: {len(kept)} of {len(rows)} rows (the rest written from test-split passages)", flush=True)
    adapter = work / "raft_synth"
    if "sft" in steps and not (adapter / "hybrid_run.json").exists():
        stage("sft", lambda: hybrid(
            "tune", "generator", "--index", args.index, "--qa", str(train), "--out", str(adapter), "-q",
            "--no-oracle", "both", "--num-distractors", "3", "--test-fraction", "0", "--val-fraction", "0.05",
            "--target-modules", "all-linear", "--lora-r", "16", "--lora-alpha", "32", "--save-steps", "50",
            "--max-steps", str(args.steps_budget), "--grad-accum", "2", "--learning-rate", "1e-3",
            "--max-length", "1024"))
    if "eval" in steps:
        stage("eval", lambda: hybrid(
            "eval", args.test, "--no-closed-book", "--max-new-tokens", "64", "--limit", str(args.eval_limit),
            "--seed", "0", "--adapter", f"labelled={args.labelled}", "--adapter", f"synth={adapter}",
            "--out", str(work / "eval")))
    if not args.json:  # as before: the timings, one JSON line; --json prints the same object
        print(json.dumps(timings), flush=True)
    finish(args, "benchmarks.experiments.documents_only_halueval", timings, argv, path=timings_path)


if __name__ == "__main__":
    main()
