"""The quality guard of the precision policy: does bf16 change what hybrid measures? (`benchmarks/performance/precision.py
--rows quality` runs it; see that file's docstring.)

Each side runs whole at its precision: its own index of the bundled corpus (128-token chunks, 16 overlap)
encoded at it, queries encoded at it, Qwen2.5-Coder-0.5B generating with its weights in it. The evals
write to WORK/quality-eval-{fp32,bf16} and resume there; nothing here is timed.
"""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

from benchmarks.harness import ROOT
from benchmarks.performance.precision import GROUPS, QWEN, halueval_corpus
from benchmarks.performance.speed_inputs import BUNDLED, bundled_index, raft_examples

PRECISIONS = ("fp32", "bf16")


def side_index(work: Path, p: str) -> Path:
    from retrieval.index import IndexConfig, build_index

    index = work / f"quality-index-{p}"
    if not (index / "manifest.json").exists():
        build_index(BUNDLED / "docs", index, IndexConfig(chunk_tokens=128, overlap=16, precision=p), progress=False)
    return index


def answers(work: Path, p: str, log) -> list[dict]:
    from hybrid.eval import EvalConfig, run_eval

    out = work / f"quality-eval-{p}"
    log(f"  eval rag at {p} -> {out}")
    run_eval(EvalConfig(qa=str(BUNDLED / "qa.jsonl"), index=str(side_index(work, p)), base_model=QWEN, k=3,
                        groups=GROUPS, precision=p, out=str(out), closed_book=False), progress=False)
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines() if line.strip()]
    return sorted((r for r in rows if r["config"] == "rag"), key=lambda r: r["id"])


def compare_answers(a: list[dict], b: list[dict]) -> dict:
    """fp32 (a) against bf16 (b) on the same questions: the two summaries, the differences, McNemar."""
    from hybrid.statistics import mcnemar_exact, paired_diff_ci

    assert [r["id"] for r in a] == [r["id"] for r in b]

    def summary(rows):
        ans = [r for r in rows if r["answers"]]
        return {"n": len(rows), "accuracy_answerable": sum(r["label"] == "correct" for r in ans) / len(ans),
                "hallucination_rate": sum(r["label"] == "hallucinated" for r in rows) / len(rows),
                "abstention_rate": sum(r["label"] == "abstained" for r in rows) / len(rows)}

    answerable = [i for i, r in enumerate(a) if r["answers"]]
    right_a = [a[i]["label"] == "correct" for i in answerable]
    right_b = [b[i]["label"] == "correct" for i in answerable]
    hall_a = [r["label"] == "hallucinated" for r in a]
    hall_b = [r["label"] == "hallucinated" for r in b]
    acc_diff = paired_diff_ci(right_a, right_b)
    hall_diff = paired_diff_ci(hall_a, hall_b)
    return {"fp32": summary(a), "bf16": summary(b),
            "answers_differ": sum(x["prediction"] != y["prediction"] for x, y in zip(a, b)),
            "labels_differ": sum(x["label"] != y["label"] for x, y in zip(a, b)),
            "accuracy_answerable_diff": {"bf16_minus_fp32": acc_diff[0], "ci95": acc_diff[1:]},
            "hallucination_diff": {"bf16_minus_fp32": hall_diff[0], "ci95": hall_diff[1:]},
            "mcnemar_answerable_right": mcnemar_exact(right_a, right_b)}


def recall_at_5(work: Path, log) -> dict:
    from hybrid.eval_retrieval import evaluate_retrieval
    from retrieval.index import IndexConfig, build_index

    hw = halueval_corpus(work)
    out = {"bundled": {}, "halueval_test": {}}
    for p in PRECISIONS:
        out["bundled"][p] = evaluate_retrieval(BUNDLED / "qa.jsonl", side_index(work, p), groups=GROUPS,
                                               precision=p).metrics["recall@5"]
        index = work / f"halueval-index-{p}"  # the index row's, when it ran
        if not (index / "manifest.json").exists():
            log(f"  index HaluEval at {p}")
            build_index(hw / "corpus", index, IndexConfig(index_type="flat", precision=p), progress=False)
        out["halueval_test"][p] = evaluate_retrieval(hw / "qa_test.jsonl", index,
                                                     precision=p).metrics["recall@5"]
    return out


def loss_curves(work: Path, steps: int, log) -> dict:
    from training.train_settings import TrainSettings
    from tuning.tune_generator import GeneratorTuneConfig, tune_generator

    examples = raft_examples(work, bundled_index(work), distractors=2, max_length=1024, n=2 * steps)
    curves = {}
    for p in PRECISIONS:
        out = work / f"quality-raft-{p}"
        shutil.rmtree(out, ignore_errors=True)
        log(f"  RAFT {steps} steps at {p}")
        rec = tune_generator(GeneratorTuneConfig(
            out=str(out), examples=str(examples), base_model=QWEN, test_fraction=0.0, val_fraction=0.0,
            save_steps=10_000, strategy="lora", num_distractors=2,
            train=TrainSettings(learning_rate=2e-4, batch_size=1, grad_accum=2, max_steps=steps, max_length=1024,
                                precision=p)), progress=False, log=lambda *a: None)
        curves[p] = {"loss": [h["loss"] for h in rec.record["train_loss"]], "minutes": rec.minutes}
    diffs = [abs(x - y) for x, y in zip(curves["fp32"]["loss"], curves["bf16"]["loss"])]
    chart(curves, ROOT_DOCS / "precision_loss.png")
    return {**curves, "max_abs_diff": max(diffs), "median_abs_diff": statistics.median(diffs)}


ROOT_DOCS = ROOT / "docs" / "benchmarks"


def chart(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for p, style in zip(PRECISIONS, ("-", "--")):
        loss = curves[p]["loss"]
        ax.plot(range(1, len(loss) + 1), loss, style, label=p)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (completion tokens)")
    ax.set_title("RAFT on Qwen2.5-Coder-0.5B: fp32 vs bf16")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_quality(work: Path, log) -> dict:
    evals = {p: answers(work, p, log) for p in PRECISIONS}
    return {"eval_bundled_rag": compare_answers(evals["fp32"], evals["bf16"]),
            "recall@5": recall_at_5(work, log), "raft_loss": loss_curves(work, 24, log)}
