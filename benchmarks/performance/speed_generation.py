"""Speed row `generation`: tokens/s of `hybrid eval`'s batched path against one question at a time, and
`ask` latency split into retrieval, prefill and decode (a logits processor clocks every token)."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from benchmarks.performance.alternation import alternate, summary
from benchmarks.performance.speed_inputs import BUNDLED, bundled_index, halueval_rows


class TokenClock:
    """A logits processor that only notes the time it is called: once per generated token, right
    after that token's forward pass (the first call ends the prompt's prefill)."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def clock_generate(model) -> list[dict]:
    """Wrap `model.generate` (this instance only) so each call records prefill seconds and decode
    seconds per token; returns the list the records go to."""
    from transformers import LogitsProcessorList

    records: list[dict] = []
    inner = model.generate

    def generate(*args, **kwargs):
        clock = TokenClock()
        kwargs["logits_processor"] = LogitsProcessorList([*(kwargs.get("logits_processor") or []), clock])
        t0 = time.perf_counter()
        out = inner(*args, **kwargs)
        end = time.perf_counter()
        ts = clock.times
        records.append({"prefill_s": ts[0] - t0 if ts else end - t0, "decode_steps": max(0, len(ts) - 1),
                        "decode_s": ts[-1] - ts[0] if len(ts) > 1 else 0.0, "total_s": end - t0})
        return out

    model.generate = generate
    return records


def unwrap_generate(model) -> None:
    model.__dict__.pop("generate", None)


def run_generation(work: Path, s: dict, log) -> dict:
    from hybrid.pipeline import Pipeline

    rows = halueval_rows(s["gen_questions"])
    qs, ps = [r["question"] for r in rows], [r["passages"] for r in rows]
    pipe = Pipeline.load(None, max_new_tokens=s["gen_tokens"], device="cpu")
    b = s["gen_batch"]

    def sequential():
        t0, answers = time.perf_counter(), []
        for q, p in zip(qs, ps):
            answers += pipe.answer_batch([q], [p])
        return time.perf_counter() - t0, answers

    def batched():  # what `hybrid eval --batch-size B` does: answer_batch over B questions at a time
        t0, answers = time.perf_counter(), []
        for i in range(0, len(qs), b):
            answers += pipe.answer_batch(qs[i:i + b], ps[i:i + b])
        return time.perf_counter() - t0, answers

    pipe.answer_batch(qs[:1], ps[:1], max_new_tokens=2)  # warm-up
    runs = alternate({"sequential": sequential, "batched": batched}, s["repeats"], log)
    tps = {k: [sum(a.new_tokens for a in ans) / wall for wall, ans in v] for k, v in runs.items()}
    seq_ans, bat_ans = runs["sequential"][0][1], runs["batched"][0][1]
    out = {"settings": {"model": "smollm2 fp32, base (no adapter)", "questions": len(qs), "batch": b,
                        "max_new_tokens": s["gen_tokens"], "rows": "HaluEval factuality test rows (fixed passages)",
                        "repeats": s["repeats"], "order": "sequential, batched, ..."},
           "sequential": summary(tps["sequential"]), "batched": summary(tps["batched"]),
           "batch_speedup": statistics.median(tps["batched"]) / statistics.median(tps["sequential"]),
           "per_repeat": [bt / st for bt, st in zip(tps["batched"], tps["sequential"])],
           "tokens": {k: sum(a.new_tokens for a in v[0][1]) for k, v in runs.items()},
           "answers_differ_batched_vs_sequential": sum(x.raw != y.raw for x, y in zip(seq_ans, bat_ans))}
    del pipe
    out["ask"] = run_ask(work, s, log)
    return out


def run_ask(work: Path, s: dict, log) -> dict:
    """`Pipeline.ask` on bundled-corpus questions: total, retrieval, prefill and decode per question."""
    from hybrid.pipeline import Pipeline

    index = bundled_index(work)
    qs = [json.loads(line)["question"] for line in (BUNDLED / "qa.jsonl").read_text().splitlines()[:s["ask_questions"]]]
    pipe = Pipeline.load(str(index), max_new_tokens=s["gen_tokens"], device="cpu")
    gen = clock_generate(pipe.model)
    retrieval_s: list[float] = []
    inner = pipe.retrieve

    def retrieve(*a, **kw):
        t = time.perf_counter()
        out = inner(*a, **kw)
        retrieval_s.append(time.perf_counter() - t)
        return out

    pipe.retrieve = retrieve
    pipe.ask("warm-up question?")
    gen.clear()
    retrieval_s.clear()
    total = []
    for q in qs:
        t = time.perf_counter()
        pipe.ask(q)
        total.append(time.perf_counter() - t)
    decode = [g["decode_steps"] / g["decode_s"] for g in gen if g["decode_s"] > 0]
    return {"settings": {"index": "bundled corpus, MiniLM, chunk 128", "k": pipe.k, "questions": len(qs),
                         "max_new_tokens": s["gen_tokens"], "model": "smollm2 fp32, base"},
            "total_ms": summary([x * 1000 for x in total]), "retrieval_ms": summary([x * 1000 for x in retrieval_s]),
            "prefill_ms": summary([g["prefill_s"] * 1000 for g in gen]),
            "decode_tokens_per_s": summary(decode),
            "decode_ms": summary([g["decode_s"] * 1000 for g in gen])}
