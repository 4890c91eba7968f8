"""The generator's confidence in its own answers, read off an eval: one forward pass per answer.

For each prediction of one configuration in a `hybrid eval` predictions.jsonl, the prompt the
eval built (the same passages: fixed ones, or the same deterministic retrieval) is followed by
the answer exactly as generated (`raw`) and the model's log-probability of every answer token is
read in one forward pass: no sampling, nothing generated. Written as JSONL to --out, one line
per question: `{"id", "config", "confidence"}` with confidence = mean log-probability
per answer token (higher = surer). `benchmarks/analyses/abstention_bound.py --confidence FILE` then asks
how far a cut on it (alone or with the adapter's abstention score) could take the answers.

Why: the adapters' abstention score rates whether the passages answer the question; most of a
small reader's hallucinations on the bundled corpus are misreadings of passages that do answer
it (docs/benchmarks/synth.md), which only the answer itself can show.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.analyses.answer_confidence benchmarks/out/bundled15/eval181/predictions.jsonl \
        --config rag+raft --adapter raft=benchmarks/out/bundled15/raft --qa corpora/brindle/qa.jsonl \
        --index benchmarks/out/embedders/minilm -k 3 --all-groups --out benchmarks/out/conf/smollm2_raft.jsonl

--out is per-question data for abstention_bound.py (JSONL, like an eval's predictions.jsonl), not a
result file; `--json` prints the run's summary (answers scored, mean confidence, seconds) as JSON.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from benchmarks.harness import fail, parser  # first: sets the offline environment


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__, out_required=True, out_help="the JSONL of {id, config, confidence} lines to write",
               json_help="print the summary as one JSON object last")
    p.add_argument("predictions")
    p.add_argument("--config", default="rag", help="rag (the base model) or rag+NAME (the adapter --adapter names)")
    p.add_argument("--adapter", help="NAME=DIR of the configuration's adapter")
    p.add_argument("--base-model", help="for --config rag: the generator the eval used [default: smollm2]")
    p.add_argument("--qa", required=True, help="the QA file the eval read")
    p.add_argument("--index", help="the index the eval retrieved from (rows without fixed passages)")
    p.add_argument("-k", type=int, default=3)
    p.add_argument("--all-groups", action="store_true", help="retrieve as the bundled corpus's owner (every group)")
    args = p.parse_args(argv)
    from hybrid.eval import row_contexts
    from hybrid.pipeline_settings import PipelineSettings
    from hybrid.pipeline import Pipeline
    from benchmarks.data.bundled_corpus import GROUPS  # the owner's view
    from core.atomic import write_text_atomic
    from core.errors import InputError
    from core.qa import load_qa
    from tuning.prompting import build_messages

    if args.config == "rag" and args.adapter:
        fail("--adapter: --config rag is the base model's answers; name the adapter's configuration, --config rag+NAME")
    if args.config != "rag" and not (args.adapter and args.adapter.split("=", 1)[0] == args.config.split("+", 1)[1]):
        fail(f"--config {args.config}: pass --adapter {args.config.split('+', 1)[-1]}=DIR, the adapter that answered")
    try:
        preds = [json.loads(line) for line in open(args.predictions, encoding="utf-8") if line.strip()]
    except (OSError, ValueError) as e:
        fail(f"{args.predictions}: cannot read ({e.__class__.__name__}); pass a `hybrid eval --out` predictions.jsonl")
    preds = [q for q in preds if q.get("config") == args.config]
    if not preds:
        fail(f"{args.predictions}: no prediction of --config {args.config}")
    try:
        rows = {r.id: r for r in load_qa(args.qa)}
        if missing := [q["id"] for q in preds if q["id"] not in rows]:
            fail(f"--qa {args.qa}: lacks {len(missing)} of the predictions' ids (e.g. {missing[0]}); "
                 "pass the eval's QA file")
        groups = GROUPS if args.all_groups else []
        adapters = dict([args.adapter.split("=", 1)]) if args.adapter else None
        pipe = Pipeline.load(args.index, adapters, base_model=None if adapters else args.base_model, k=args.k,
                             groups=groups, calibrated=False)
        qa_rows = [rows[q["id"]] for q in preds]
        contexts = row_contexts(qa_rows, PipelineSettings(index=args.index, k=args.k, groups=groups), pipe)
        adapter = args.config.split("+", 1)[1] if adapters else None
        t0, out = time.perf_counter(), []
        for q, r in zip(preds, qa_rows):
            lp = pipe.completion_logprobs(build_messages(r.question, contexts[r.id]), q["raw"], adapter=adapter)
            out.append({"id": q["id"], "config": args.config, "confidence": float(lp.mean())})
        write_text_atomic(Path(args.out), "".join(json.dumps(o) + "\n" for o in out))
    except InputError as e:  # a bad --qa, --index or --adapter: one line, no traceback
        fail(str(e))
    seconds = time.perf_counter() - t0
    print(f"{len(out)} answers scored in {seconds:.0f} s -> {args.out}")
    summary = {"config": args.config, "answers": len(out), "out": args.out, "seconds": round(seconds, 1),
               "mean_confidence": sum(o["confidence"] for o in out) / len(out)}
    if args.json:  # --out is the JSONL above, not a result file: nothing more is written
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
