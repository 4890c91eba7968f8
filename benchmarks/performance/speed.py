"""Speed of hybrid's training and generation paths against the plain loops, side by side, and
decode against the machine's memory-bandwidth limit. One run, one table of ratios.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.performance.speed            # the full run (64 min on 2 loaded cores)
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.performance.speed --quick    # every row, small (a few minutes)
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.performance.speed --quick --json --rows sft,generation

Rows (each says its settings and the spread over repeats; the two sides of a ratio are
alternated A B A B within the run, since these machines drift by +-30 % between runs):
  sft        seconds per optimizer step of `hybrid tune generator` (tuning.tune_generator.tune_generator, its TRL
             SFTTrainer path) vs a plain PEFT + torch loop written here: same packaged SmolLM2-135M,
             examples, batch, accumulation, max length, LoRA r/alpha/dropout/targets, gradient
             checkpointing, NEFTune, fp32, AdamW, linear schedule, clipping.
  dpo        `hybrid tune dpo` (tuning.tune_dpo.tune_dpo) vs TRL's DPOTrainer called directly with the
             same DPOConfig, the same SFT adapter and the same pairs.
  embedder   `hybrid tune embedder` (retrieval.tune_embedder.tune_embedder) vs
             sentence-transformers' SentenceTransformerTrainer called directly on the very rows the
             hybrid run trained on (its mined hard negatives), same loss, sampler, batch, length.
  generation tokens/s of `hybrid eval`'s path (Pipeline.answer_batch, --batch-size questions at a time) vs
             one question at a time, same questions (HaluEval rows with fixed passages), greedy;
             and `ask` latency split into retrieval, prompt prefill and decode.
  threads    1 vs 2 torch threads for encode, a training step and generation, idle and beside a
             second busy process (a one-thread numpy matmul loop started here).
  limit      decode tokens/s of `ask` as a fraction of the bound (machine's copy bandwidth / bytes of
             weights read per token), the floor of the plain fp32 matrix-vector products, and what
             the libraries offer to close the gap, each measured for speed and for how many greedy
             answers on the HaluEval factuality rows it changes.

Optimizer steps are timed end to end (one step's end to the next's) by a TrainerCallback; the
first step (warm-up) and model loading are excluded; each row reports the median over steps.
`--json` prints one JSON object last (sft_ratio, dpo_ratio, embedder_ratio = hybrid / plain
seconds per step; generation_batch_speedup = batched / sequential tokens/s; decode_fraction_of_bound, ...).
Work files go to --out (git-ignored benchmarks/out/speed).

This file runs the rows and prints the tables; each measurement is its own module beside it:
speed_training.py (sft, dpo, embedder), speed_generation.py, speed_threads.py, speed_limit.py, on the
inputs of speed_inputs.py, alternated by alternation.py.
"""

import json
import os
import sys
import time
from pathlib import Path

from benchmarks.harness import OUT, parser, read_result, write_result  # first: sets the offline environment
from benchmarks.performance.alternation import verdict
from benchmarks.performance.speed_generation import run_generation
from benchmarks.performance.speed_inputs import set_threads
from benchmarks.performance.speed_limit import run_limit
from benchmarks.performance.speed_threads import run_threads
from benchmarks.performance.speed_training import run_dpo, run_embedder, run_sft

ROWS = ("sft", "dpo", "embedder", "generation", "threads", "limit")

# Sizes: (full, quick)
SIZES = {
    "repeats": (2, 1),
    "sft_steps": (6, 3), "sft_distractors": (3, 1), "sft_max_length": (640, 512), "sft_accum": (2, 1),
    "dpo_steps": (5, 3),
    "emb_steps": (6, 3), "emb_batch": (32, 16), "emb_max_length": (256, 128),
    "gen_questions": (8, 4), "gen_batch": (4, 4), "gen_tokens": (32, 16),
    "ask_questions": (4, 2),
    "thread_reps": (2, 1),
    "limit_rows": (16, 2), "limit_tokens": (32, 12),
}

def final_json(report: dict) -> dict:
    """The one JSON object `--json` prints last: the headline numbers, then the whole report."""
    def get(row, *keys):
        v = report.get(row)
        for k in keys:
            v = v.get(k) if isinstance(v, dict) else None
        return v

    return {"sft_ratio": get("sft", "ratio"), "dpo_ratio": get("dpo", "ratio"),
            "embedder_ratio": get("embedder", "ratio"),
            "generation_batch_speedup": get("generation", "batch_speedup"),
            "decode_tokens_per_s": get("limit", "decode_tokens_per_s"),
            "decode_fraction_of_bound": get("limit", "fraction_of_bound"),
            "best_identical_decode_speedup": get("limit", "best_identical_speedup"),
            "threads_recommended": get("threads", "recommended"),
            "loadavg": report.get("loadavg"), "report": report}


def table(report: dict) -> str:
    """The side-by-side table (Markdown)."""
    lines = ["| row | hybrid | plain / reference | ratio | per-repeat ratios | target | verdict |",
             "|---|---:|---:|---:|---|---|---|"]
    for row, label, unit, target in (("sft", "SFT s/step", "s", 1.10), ("dpo", "DPO s/step", "s", 1.10),
                                     ("embedder", "embedder s/step", "s", 1.10)):
        r = report.get(row)
        if not r:
            continue
        reps = ", ".join(f"{x:.3f}" for x in r["per_repeat"])
        lines.append(f"| {label} | {r['a']['median']:.2f} (±{r['a']['spread'] * 50:.0f} %) | "
                     f"{r['b']['median']:.2f} (±{r['b']['spread'] * 50:.0f} %) | {r['ratio']:.3f} | {reps} | "
                     f"≤ {target} | {verdict(r['ratio'], target, True)} |")
    g = report.get("generation")
    if g:
        reps = ", ".join(f"{x:.2f}" for x in g["per_repeat"])
        lines.append(f"| eval tokens/s, batch {g['settings']['batch']} vs 1 | {g['batched']['median']:.1f} | "
                     f"{g['sequential']['median']:.1f} | {g['batch_speedup']:.2f} | {reps} | ≥ 2 | "
                     f"{verdict(g['batch_speedup'], 2.0, False)} |")
    lim = report.get("limit")
    if lim and lim.get("best_identical_speedup") is not None:
        lines.append(f"| ask decode tok/s, best identical-answer path vs today | "
                     f"{lim['decode_tokens_per_s'] * lim['best_identical_speedup']:.1f} | "
                     f"{lim['decode_tokens_per_s']:.1f} | {lim['best_identical_speedup']:.2f} | – | ≥ 2 | "
                     f"{verdict(lim['best_identical_speedup'], 2.0, False)} |")
    return "\n".join(lines)


def detail_tables(report: dict) -> str:
    """The rows' own tables (Markdown): `ask` split, threads, decode variants."""
    out = []
    a = (report.get("generation") or {}).get("ask")
    if a:
        out += ["| `ask` (bundled corpus, k=%d, %d new tokens max) | median | min | max |" % (
            a["settings"]["k"], a["settings"]["max_new_tokens"]), "|---|---:|---:|---:|"]
        for key, label in (("total_ms", "total ms"), ("retrieval_ms", "retrieval ms"), ("prefill_ms", "prompt prefill ms"),
                           ("decode_ms", "decode ms"), ("decode_tokens_per_s", "decode tokens/s")):
            v = a[key]
            out.append(f"| {label} | {v['median']:.1f} | {v['min']:.1f} | {v['max']:.1f} |")
        out.append("")
    t = report.get("threads")
    if t:
        out += ["| work | idle: 1 thread | idle: 2 threads | idle 2/1 | busy: 1 thread | busy: 2 threads | busy 2/1 |",
                "|---|---:|---:|---:|---:|---:|---:|"]
        for name in ("encode texts/s", "train steps/s", "generate tok/s"):
            i, b = t[name]["idle"], t[name]["busy"]
            out.append(f"| {name} | {i['1']:.3g} | {i['2']:.3g} | {i['2_over_1']:.2f} | {b['1']:.3g} | {b['2']:.3g} | "
                       f"{b['2_over_1']:.2f} |")
        out += [f"recommended threads: {t['recommended']}", ""]
    lim = report.get("limit")
    if lim:
        out += [f"bandwidth (numpy copy, read + write) {lim['bandwidth']['gb_per_s']['median']:.1f} GB/s "
                f"(±{lim['bandwidth']['gb_per_s']['spread'] * 50:.0f} %); weights read per token "
                f"{lim['weight_bytes_per_token'] / 1e6:.0f} MB; bound {lim['bound_tokens_per_s']:.1f} tok/s; "
                f"fp32 GEMV floor {lim['gemv_floor']['tokens_per_s']:.1f} tok/s ({lim['gemv_floor']['gb_per_s']:.1f} GB/s); "
                f"today {lim['decode_tokens_per_s']:.2f} tok/s = {lim['fraction_of_bound']:.2f} of the bound, "
                f"{lim['today_fraction_of_gemv_floor']:.2f} of the GEMV floor", "",
                "| variant | decode tok/s | × today | prefill ms | answers changed | correct / abstained / hallucinated | what |",
                "|---|---:|---:|---:|---:|---|---|"]
        for v in lim["variants"]:
            g = v["graded"]
            out.append(f"| {v['variant']} | {v['decode_tokens_per_s']:.2f} | {v['speedup']:.2f} | {v['prefill_ms']:.0f} | "
                       f"{v['answers_changed']} of {v['rows']} | {g['correct']} / {g['abstained']} / {g['hallucinated']} | "
                       f"{v['note']} |")
    return "\n".join(out)


# --- main --------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = parser(__doc__, out=str(OUT / "speed"), out_help="work directory; the report (report.json) is written there",
               json_help="print one JSON object last")
    p.add_argument("--quick", action="store_true", help="a small version of every row (a few minutes)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    p.add_argument("--repeats", type=int, help="override the repeats per side")
    p.add_argument("--render", metavar="REPORT", help="print the tables of an earlier run's report.json and stop")
    args = p.parse_args(argv)
    if args.render:
        report = read_result(args.render)
        print(table(report) + "\n\n" + detail_tables(report))
        return 0
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    if bad := set(rows) - set(ROWS):
        p.error(f"--rows: unknown {', '.join(sorted(bad))}")
    s = {k: v[1 if args.quick else 0] for k, v in SIZES.items()}
    if args.repeats:
        s["repeats"] = args.repeats
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    set_threads(1)  # every row at one thread but the threads row (which sets its own)
    report: dict = {"quick": args.quick, "machine": {"cpus": os.cpu_count()}, "loadavg": {"start": os.getloadavg()},
                    "torch_threads": 1}
    t0 = time.perf_counter()
    adapter = work / "sft_adapter"
    for row in rows:
        log(f"{row} ...")
        t = time.perf_counter()
        if row == "sft":
            report["sft"], adapter = run_sft(work, s, log)
        elif row == "dpo":
            if not (adapter / "hybrid_run.json").exists():
                report["sft"], adapter = run_sft(work, s, log)
            report["dpo"] = run_dpo(work, s, adapter, log)
        elif row == "embedder":
            report["embedder"] = run_embedder(work, s, log)
        elif row == "generation":
            report["generation"] = run_generation(work, s, log)
        elif row == "threads":
            report["threads"] = run_threads(work, s, log)
        elif row == "limit":
            report["limit"] = run_limit(work, s, log)
        set_threads(1)
        report.setdefault("row_seconds", {})[row] = round(time.perf_counter() - t, 1)
        report["loadavg"][f"after_{row}"] = os.getloadavg()
    report["seconds"] = round(time.perf_counter() - t0, 1)
    write_result(work / ("report_quick.json" if args.quick else "report.json"), __spec__.name,
                 report, argv)
    print(table(report) + "\n\n" + detail_tables(report))
    if args.json:
        print(json.dumps(final_json(report), default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
