"""Factuality on HaluEval: closed_book vs rag vs rag+raft vs rag+raft_dpo, same test questions.

Steps (each reruns on its own; finished steps are skipped when their output exists):
  data    HaluEval's fixed split (benchmarks/data/halueval.py: seeded shuffle of line numbers, seed 0, first
          1000 = test). Training rows: a seeded sample of --train-questions train lines, as QA
          rows with gold_ids into the retrieval benchmark's 10k-passage index
          (benchmarks/experiments/retrieval_halueval.py builds it). Test rows: a seeded sample of
          --test-questions test lines with FIXED passages: the gold knowledge plus
          --distractors nearest other passages from the index; for half of them (seeded) the
          gold knowledge is withheld and `answers` is [] (the right behaviour is to abstain).
  dev     WORK/dev.jsonl: 200 more train-split lines (none in train.jsonl), built like the test
          rows (gold + distractors, half withheld; seed 7), for `hybrid tune calibrate`.
  judge   benchmarks/experiments/judge_halueval.py (hybrid tune judge on pairs from HaluEval's train split) (--judge-questions questions).
  sft     hybrid tune generator (RAFT, LoRA) on the training rows.
  dpo     hybrid tune dpo on top of the SFT adapter, with HaluEval's hallucinated answers as a
          second source of rejected answers (train lines only).
  calibrate  the judge gate's threshold, chosen on TRAIN rows built like the test rows (gold +
          distractors, half withheld): the answerability cut that maximises TPR - FPR
          (Youden's J). Written to WORK/calibration_JUDGE.json; --gate uses it.
  eval    hybrid eval on the test rows with --judge: closed_book, rag, rag+raft, rag+raft_dpo.
No test line is used by any training step.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.experiments.factuality_halueval    # CPU sizes below

--out is a work directory: the rows, the adapters, the judge, the eval (EVAL_OUT/report.json, as
`hybrid eval` writes it) and two result files in benchmarks/harness.py's format: timings.json (the
steps' times, added to by each rerun) and calibration_JUDGE.json. `--json` prints timings.json's results.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

from benchmarks.harness import ROOT, finish, parser, read_result, write_result  # first: sets the offline environment


def write_fixed_rows(path: Path, idx: list[int], withheld: set[int], lines: list[dict], doc_of: dict[str, str],
                     retriever, distractors: int) -> None:
    """QA rows with FIXED passages: the gold knowledge plus the nearest other passages, or, for the
    withheld lines, the distractors alone with `answers: []`."""
    hits = retriever.search_batch([lines[i]["question"] for i in idx], k=distractors + 3)
    with open(path, "w") as fh:
        for i, hs in zip(idx, hits):
            r = lines[i]
            gold = doc_of[r["knowledge"].strip()]
            distract = [{"id": h.doc_id, "text": h.text} for h in hs if h.doc_id != gold][:distractors]
            if i in withheld:
                passages, answers = distract, []
            else:
                passages = distract + [{"id": gold, "text": r["knowledge"].strip()}]
                random.Random(i).shuffle(passages)
                answers = [r["right_answer"]]
            fh.write(json.dumps({"id": f"h{i:05d}", "question": r["question"], "answers": answers,
                                 "gold_ids": [gold] if answers else [], "passages": passages}) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, out="benchmarks/out/factuality", out_aliases=("--work",),
               out_help="work directory: every step's output, timings.json and calibration_JUDGE.json",
               json_help="print timings.json's results as one JSON object last")
    p.add_argument("--index", default="benchmarks/out/halueval/index")
    p.add_argument("--train-questions", type=int, default=400)
    p.add_argument("--test-questions", type=int, default=100)
    p.add_argument("--distractors", type=int, default=3)
    p.add_argument("--judge-questions", type=int, default=1500)
    p.add_argument("--sft-steps", type=int, default=100)
    p.add_argument("--sft-lr", type=float, default=1e-3)
    p.add_argument("--dpo-questions", type=int, default=80)
    p.add_argument("--dpo-steps", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", default="data,judge,sft,dpo,eval")
    p.add_argument("--sft-out", default="raft", help="adapter dir name under --work for the SFT stage")
    p.add_argument("--sft-no-oracle", default="abstain", choices=["abstain", "answer", "both"])
    p.add_argument("--dpo-out", default="raft_dpo", help="adapter dir name under --work for the DPO stage")
    p.add_argument("--dpo-sft", default="raft", help="SFT adapter dir name under --work that DPO starts from")
    p.add_argument("--dpo-pairs", default="sampled", choices=["sampled", "contrastive"])
    p.add_argument("--no-wrong-answers", action="store_true", help="DPO without HaluEval's hallucinated answers")
    p.add_argument("--dpo-p-oracle", type=float, default=0.5)
    p.add_argument("--no-answer-over-abstain", action="store_true")
    p.add_argument("--eval-out", default="eval")
    p.add_argument("--judge-name", default="judge", help="judge dir name under --work (trained by the judge step "
                   "when it is 'judge'; otherwise made by 'hybrid tune judge --out WORK/NAME')")
    p.add_argument("--eval-adapters", default=None, help="comma-separated adapter dir names under --work to "
                   "evaluate [default: raft and --dpo-out]")
    p.add_argument("--gate", action="store_true", help="also report each passage configuration with the judge as a gate")
    args = p.parse_args(argv)
    steps = set(args.steps.split(","))
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    timings = read_result(work / "timings.json") if (work / "timings.json").exists() else {}

    from benchmarks.data import halueval
    from hybrid.config import build_config
    from retrieval.retriever import Retriever

    lines = halueval.load_lines()
    train_idx, test_idx = halueval.split(len(lines), 1000, args.seed)
    doc_of = halueval.doc_ids(lines)  # knowledge text -> its document id in the index
    t0 = time.perf_counter()
    if "data" in steps and not (work / "test.jsonl").exists():
        retriever = Retriever.load(args.index)
        rng = random.Random(args.seed)
        tr = sorted(rng.sample(train_idx, args.train_questions))
        with open(work / "train.jsonl", "w") as fh, open(work / "wrong.jsonl", "w") as wh:
            for i in tr:
                r = lines[i]
                fh.write(json.dumps({"id": f"h{i:05d}", "question": r["question"], "answers": [r["right_answer"]],
                                     "gold_ids": [doc_of[r["knowledge"].strip()]]}) + "\n")
                wh.write(json.dumps({"id": f"h{i:05d}", "wrong_answer": r["hallucinated_answer"]}) + "\n")
        te = sorted(rng.sample(test_idx, args.test_questions))
        withheld = set(rng.sample(te, len(te) // 2))
        write_fixed_rows(work / "test.jsonl", te, withheld, lines, doc_of, retriever, args.distractors)
        timings["data_s"] = time.perf_counter() - t0
        print(f"data: {args.train_questions} train rows, {args.test_questions} test rows ({len(withheld)} withheld)",
              flush=True)

    if "dev" in steps and not (work / "dev.jsonl").exists():
        retriever = Retriever.load(args.index)
        used = {int(json.loads(line)["id"][1:]) for line in open(work / "train.jsonl")}
        rng = random.Random(7)
        dev = sorted(rng.sample([i for i in train_idx if i not in used], 200))
        withheld = set(rng.sample(dev, 100))
        write_fixed_rows(work / "dev.jsonl", dev, withheld, lines, doc_of, retriever, args.distractors)
        print("dev: 200 rows (100 withheld)", flush=True)

    def stage(name, fn):
        t = time.perf_counter()
        fn()
        timings[f"{name}_min"] = round((time.perf_counter() - t) / 60, 1)
        write_result(work / "timings.json", "benchmarks.experiments.factuality_halueval", timings, argv)
        print(f"{name}: {timings[f'{name}_min']} min", flush=True)

    if "judge" in steps and not (work / "judge" / "hybrid_judge.json").exists():
        import subprocess

        stage("judge", lambda: subprocess.run([sys.executable, "-m", "benchmarks.experiments.judge_halueval", "--out",
                                               str(work / "judge"), "--train-questions", str(args.judge_questions),
                                               "--seed", str(args.seed)], cwd=ROOT, check=True))
    if "sft" in steps and not (work / args.sft_out / "hybrid_run.json").exists():
        from tuning.tune_generator import GeneratorTuneConfig, tune_generator

        stage("sft", lambda: tune_generator(build_config(GeneratorTuneConfig, overrides=dict(
            index=args.index, qa=str(work / "train.jsonl"), out=str(work / args.sft_out), num_distractors=args.distractors,
            no_oracle=args.sft_no_oracle, test_fraction=0.0, val_fraction=0.05, target_modules="all-linear", lora_r=16,
            lora_alpha=32, save_steps=50,
            train=dict(max_steps=args.sft_steps, grad_accum=2, learning_rate=args.sft_lr, max_length=1024))),
            progress=False))
    if "dpo" in steps and not (work / args.dpo_out / "hybrid_run.json").exists():
        from tuning.tune_dpo import DPOTuneConfig, tune_dpo

        stage("dpo", lambda: tune_dpo(build_config(DPOTuneConfig, overrides=dict(
            index=args.index, qa=str(work / "train.jsonl"), adapter=str(work / args.dpo_sft), out=str(work / args.dpo_out),
            p_oracle=args.dpo_p_oracle, answer_over_abstain=not args.no_answer_over_abstain, pairs=args.dpo_pairs,
            wrong_answers=None if args.no_wrong_answers else str(work / "wrong.jsonl"), judge=str(work / args.judge_name),
            num_distractors=args.distractors, max_questions=args.dpo_questions, test_fraction=0.0,
            train=dict(max_steps=args.dpo_steps, grad_accum=2))), progress=False))
    calibration = work / f"calibration_{args.judge_name}.json"
    if "calibrate" in steps:
        import numpy as np

        from tuning.judge import Judge, auroc
        from core.qa import load_qa

        retriever = Retriever.load(args.index)
        rows = load_qa(work / "train.jsonl")
        rng = random.Random(args.seed + 1)
        withheld = set(rng.sample([r.id for r in rows], len(rows) // 2))
        text = {r.id: lines[int(r.id[1:])]["knowledge"].strip() for r in rows}
        hits = retriever.search_batch([r.question for r in rows], k=args.distractors + 3)
        contexts = []
        for r, hs in zip(rows, hits):
            ctx = [{"text": h.text} for h in hs if h.doc_id not in r.gold_ids][: args.distractors]
            contexts.append(ctx if r.id in withheld else ctx + [{"text": text[r.id]}])
        scores = Judge.load(work / args.judge_name).answerable([r.question for r in rows], contexts)
        labels = np.array([r.id not in withheld for r in rows])
        best = max(sorted(set(scores.tolist())), key=lambda t: (scores[labels] >= t).mean() - (scores[~labels] >= t).mean())
        cal = {"threshold": best, "auroc": auroc(scores, labels), "n": len(rows),
               "tpr": float((scores[labels] >= best).mean()), "fpr": float((scores[~labels] >= best).mean()),
               "rows": "train.jsonl (HaluEval train split), gold + distractors, half withheld (seed + 1)"}
        write_result(calibration, "benchmarks.experiments.factuality_halueval", cal, argv)
        print(f"calibrate: {json.dumps(cal)}", flush=True)
    if "eval" in steps:
        from hybrid.eval import EvalConfig, markdown, run_eval

        def ev():
            names = args.eval_adapters.split(",") if args.eval_adapters else ["raft", args.dpo_out]
            rep = run_eval(EvalConfig(qa=str(work / "test.jsonl"), adapters={n: str(work / n) for n in names},
                                      judge=str(work / args.judge_name), gate=args.gate, seed=args.seed, batch_size=4,
                                      gate_threshold=read_result(calibration)["threshold"]
                                      if args.gate and calibration.exists() else 0.5,
                                      max_new_tokens=64, out=str(work / args.eval_out)), progress=False)
            print(markdown(rep))
        stage("eval", ev)
    finish(args, "benchmarks.experiments.factuality_halueval", timings, argv, path=work / "timings.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
