"""Speed row `limit`: decode tokens/s of `ask` against the machine's memory-bandwidth bound, the plain
fp32 GEMV floor, and what the libraries offer to close the gap (each variant's answers compared too)."""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path

from benchmarks.performance.alternation import alternate, summary
from benchmarks.performance.speed_generation import clock_generate, unwrap_generate
from benchmarks.performance.speed_inputs import halueval_rows, set_threads


def copy_bandwidth(mib: int = 512, reps: int = 5) -> dict:
    """Memory bandwidth from a large numpy copy: (bytes read + bytes written) per second."""
    import numpy as np

    a = np.ones(mib * 2**20 // 4, dtype=np.float32)
    b = np.empty_like(a)
    np.copyto(b, a)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        np.copyto(b, a)
        ts.append(time.perf_counter() - t)
    gbs = [2 * a.nbytes / x / 1e9 for x in ts]
    return {"array_mib": mib, "gb_per_s": summary(gbs), "best_gb_per_s": max(gbs)}


def gemv_floor(model, reps: int = 7) -> dict:
    """The time of only the matrix-vector products one decoded token needs (every nn.Linear once, batch 1):
    the floor of the plain fp32 path, whatever the generation loop around it does."""
    import torch

    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    xs = [torch.randn(1, w.shape[1]) for w in weights]

    def once():
        with torch.inference_mode():
            for w, x in zip(weights, xs):
                torch.nn.functional.linear(x, w)

    once()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        once()
        ts.append(time.perf_counter() - t)
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    return {"linear_bytes": nbytes, "ms_per_token": statistics.median(ts) * 1000,
            "tokens_per_s": 1 / statistics.median(ts), "gb_per_s": nbytes / statistics.median(ts) / 1e9}


def decode_pass(model, tok, rows: list[dict], max_new: int, **generate_kwargs) -> list[dict]:
    """Greedy answers one question at a time through the `ask` path (tuning.generation.generate_batch,
    batch 1), each with its prefill seconds and decode tokens/s."""
    from tuning.generation import generate_batch
    from tuning.prompting import build_messages

    records = clock_generate(model)
    out = []
    try:
        for r in rows:
            (text, n), = generate_batch(model, tok, [build_messages(r["question"], r["passages"])], max_new,
                                        **generate_kwargs)
            g = records[-1]
            out.append({"text": text, "new_tokens": n, "prefill_s": g["prefill_s"],
                        "decode_tps": g["decode_steps"] / g["decode_s"] if g["decode_s"] else None})
    finally:
        unwrap_generate(model)
    return out


def graded(texts: list[str], rows: list[dict]) -> dict:
    """correct / abstained / hallucinated counts of greedy answers, by the rule `hybrid eval` uses."""
    from tuning.grading import classify
    from tuning.prompting import parse_answer

    out = {"correct": 0, "abstained": 0, "hallucinated": 0}
    for text, r in zip(texts, rows):
        parsed = parse_answer(text)
        out[classify(parsed.answer, parsed.abstained, r["answers"])] += 1
    return out


def variant_row(name: str, passes: list[list[dict]], reference: list[dict], today_tps: float, note: str,
                rows: list[dict]) -> dict:
    tps = [statistics.median([x["decode_tps"] for x in p if x["decode_tps"]]) for p in passes]
    pre = [statistics.median([x["prefill_s"] for x in p]) * 1000 for p in passes]
    changed = sum(x["text"] != y["text"] for x, y in zip(passes[0], reference))
    return {"variant": name, "decode_tokens_per_s": statistics.median(tps), "decode_spread": summary(tps)["spread"],
            "prefill_ms": statistics.median(pre), "speedup": statistics.median(tps) / today_tps,
            "answers_changed": changed, "rows": len(reference), "graded": graded([x["text"] for x in passes[0]], rows),
            "note": note}


def run_limit(work: Path, s: dict, log) -> dict:
    import torch

    from tuning.generation import PrefixCache, load_generator

    rows = halueval_rows(s["limit_rows"])
    n_new = s["limit_tokens"]
    set_threads(1)
    model, tok, _ = load_generator(None, device="cpu")
    params = {id(p): p for p in model.parameters()}
    weight_bytes = sum(p.numel() * p.element_size() for p in params.values())  # tied lm_head counted once, read once
    bw = copy_bandwidth()
    floor = gemv_floor(model)
    bound = bw["gb_per_s"]["median"] * 1e9 / weight_bytes
    log(f"  bandwidth {bw['gb_per_s']['median']:.1f} GB/s, bound {bound:.1f} tok/s, fp32 GEMV floor "
        f"{floor['tokens_per_s']:.1f} tok/s")

    # today, alternated with the identical-answer candidates that need no second model
    def today():
        return decode_pass(model, tok, rows, n_new)

    def static():
        return decode_pass(model, tok, rows, n_new, cache_implementation="static")

    def prefix():
        return decode_pass(model, tok, rows, n_new, prefix_cache=PrefixCache())

    def eager():
        model.set_attn_implementation("eager")
        try:
            return decode_pass(model, tok, rows, n_new)
        finally:
            model.set_attn_implementation("sdpa")

    # dynamic int8 quantisation of the linear layers: a second (quantised) copy of the model
    qmodel = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)

    def int8():
        return decode_pass(qmodel, tok, rows, n_new)

    # today first and last, the candidates between (the drift of the machine shows in today's two passes)
    sides = {"today": today, "prefix": prefix, "static": static, "eager": eager, "int8_dynamic": int8}
    passes = alternate(sides, 1, log)
    passes["today"] += alternate({"today": today}, 1, log)["today"]
    del qmodel
    reference = passes["today"][0]
    today_tps = statistics.median([statistics.median([x["decode_tps"] for x in p if x["decode_tps"]])
                                   for p in passes["today"]])
    notes = {"today": "fp32, sdpa, dynamic cache, 1 thread: the `ask` path as shipped",
             "prefix": "the shared prompt prefix's KV cache computed once and reused (generate_batch prefix_cache=)",
             "static": "cache_implementation='static' (no torch.compile)",
             "eager": "attn_implementation='eager' instead of sdpa",
             "int8_dynamic": "torch.ao.quantization.quantize_dynamic(nn.Linear -> qint8), inference only"}
    variants = [variant_row(k, passes[k], reference, today_tps, notes[k], rows) for k in sides]
    variants[0]["answers_changed_between_repeats"] = sum(
        x["text"] != y["text"] for x, y in zip(passes["today"][0], passes["today"][-1]))
    identical = [v for v in variants[1:] if v["answers_changed"] == 0]
    best = max(identical, key=lambda v: v["speedup"]) if identical else None
    return {"settings": {"rows": len(rows), "max_new_tokens": n_new, "threads": 1, "batch": 1,
                         "model": "smollm2 fp32", "order": ", ".join(sides) + ", today"},
            "weight_bytes_per_token": weight_bytes, "bandwidth": bw,
            "bound_tokens_per_s": bound, "decode_tokens_per_s": today_tps, "fraction_of_bound": today_tps / bound,
            "gemv_floor": floor, "gemv_floor_fraction_of_bound": floor["tokens_per_s"] / bound,
            "today_fraction_of_gemv_floor": today_tps / floor["tokens_per_s"],
            "variants": variants, "best_identical": best and best["variant"],
            "best_identical_speedup": best and best["speedup"],
            "llama_cpp": "not measured: llama-cpp-python is not installed (its PyPI release builds llama.cpp from "
                         "source) and nothing may be downloaded here"}
