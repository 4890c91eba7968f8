"""fp32 against bf16 (and today's path against the new one) for every workload the precision policy
changes, within one run on one machine, the sides alternated A B A B.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.performance.precision                     # every speed row
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.performance.precision --rows raft,prefill
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.performance.precision --rows quality      # the quality guard

It prints the CPU's flags and what `--precision auto` chose before anything else: the bf16 rows
mean something only on a CPU with amx_bf16 or avx512_bf16 (elsewhere bf16 is emulated).

Speed rows (seconds or tokens/s; median over steps or repeats, spread = (max - min) / median):
  matmul   GFLOP/s of a 1024x896 @ 896x4864 matmul (a Qwen 0.5B MLP projection), fp32 vs bf16.
  raft     seconds per optimizer step of `hybrid tune generator` (tuning.tune_generator.tune_generator, its default
           recipe: LoRA r8 q/v, batch 1 x 4 accumulated, 4 distractors, gradient checkpointing, NEFTune) on
           the packaged Qwen2.5-Coder-0.5B, three sides: `today` (fp32, TRL's loss over every position),
           `fp32+head` (fp32, the LM head on the completion only: the saving that needs no bf16 units),
           `bf16` (autocast + the completion-only head: the new default on such a CPU).
  smollm2  the same three sides on the packaged SmolLM2-135M.
  prefill  Qwen 0.5B through load_generator: prefill tokens/s of a ~900-token RAFT prompt and greedy decode
           tokens/s, fp32 vs bf16 weights.
  threads  1 vs 2 torch threads at bf16: prefill and decode of Qwen 0.5B, MiniLM encoding.
  eval     wall seconds of `hybrid eval` (hybrid.eval.run_eval) of Qwen 0.5B `rag` on 40 bundled
           questions (k 3, the four groups), model load included, fp32 vs bf16.
  index    wall seconds of `hybrid index` (build_index) of HaluEval's 9,936 passages with MiniLM, fp32 vs bf16.
  synth    rows kept per minute of `hybrid synth` (Qwen 0.5B teacher, 8 chunks x 2), fp32 vs bf16.
Quality row (no timing; may run beside other work):
  quality  `hybrid eval` of Qwen 0.5B `rag` on all 181 bundled questions at fp32 and at bf16: accuracy on the
           answerable, hallucination, the answers that differ and McNemar's exact test on the discordant
           right/wrong pairs; retrieval recall@5 at both precisions on the bundled questions and HaluEval's
           1,000 test questions; one RAFT run (40 steps) at each precision, loss curves overlaid in
           docs/benchmarks/precision_loss.png.
Results: OUT/report.json, a result file in benchmarks/harness.py's format (--out is a work directory,
default benchmarks/out/precision, git-ignored; `--work` is its older name), rows merged run to run
(an older bare report.json is read too). `--json` prints the whole report as one JSON object last.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from benchmarks.harness import ROOT, finish, parser, read_result, write_result  # first: sets the offline environment
from benchmarks.performance.alternation import alternate, ratio, summary
from benchmarks.performance.speed_inputs import BUNDLED, bundled_index, raft_examples
from benchmarks.performance.speed_training import clocked_entry_points

SPEED_ROWS = ("matmul", "raft", "smollm2", "prefill", "threads", "eval", "index", "synth")
QWEN = "qwen2.5-coder-0.5b"
GROUPS = ["hr", "finance", "security", "engineering"]


def machine() -> dict:
    from training.precision import BF16_CPU_FLAGS, cpu_flags, resolve

    name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")), platform.processor())
    return {"processor": name, "bf16_flags": sorted(BF16_CPU_FLAGS & cpu_flags()), "cores": os.cpu_count(),
            "auto": resolve("auto", "cpu"), "loadavg": os.getloadavg()[0]}


# --- matmul ----------------------------------------------------------------------------------------
def run_matmul(work: Path, repeats: int, log) -> dict:
    import torch

    def rate(dtype) -> float:
        a, b = torch.randn(1024, 896, dtype=dtype), torch.randn(896, 4864, dtype=dtype)
        a @ b
        t = time.perf_counter()
        for _ in range(20):
            a @ b
        return 20 * 2 * 1024 * 896 * 4864 / (time.perf_counter() - t) / 1e9

    runs = alternate({"fp32": lambda: rate(torch.float32), "bf16": lambda: rate(torch.bfloat16)}, repeats, log)
    return {"fp32_gflops": summary(runs["fp32"]), "bf16_gflops": summary(runs["bf16"]),
            "ratio": statistics.median(runs["bf16"]) / statistics.median(runs["fp32"])}


# --- training steps --------------------------------------------------------------------------------
def raft_side(work: Path, base_model: str, examples: Path, precision: str, head: bool, steps: int) -> list[float]:
    """Seconds per optimizer step of tune_generator (the first step left out)."""
    import shutil

    import tuning.completion_loss as completion
    from training.train_settings import TrainSettings
    from tuning.tune_generator import GeneratorTuneConfig, tune_generator

    out = work / "raft-side"
    shutil.rmtree(out, ignore_errors=True)
    cfg = GeneratorTuneConfig(out=str(out), examples=str(examples), base_model=base_model, test_fraction=0.0,
                              val_fraction=0.0, save_steps=10_000, strategy="lora",
                              train=TrainSettings(learning_rate=2e-4, batch_size=1, grad_accum=4, max_steps=steps,
                                                  max_length=1024, precision=precision))
    real = completion.supported
    completion.supported = real if head else (lambda model: False)  # `today`: TRL's loss over every position
    try:
        with clocked_entry_points() as clocks:
            tune_generator(cfg, progress=False, log=lambda *a: None)
    finally:
        completion.supported = real
    return clocks[-1].steps()


def run_steps(work: Path, base_model: str, repeats: int, steps: int, log) -> dict:
    index = bundled_index(work)
    examples = raft_examples(work, index, distractors=4, max_length=1024, n=4 * steps)
    sides = {"today": lambda: raft_side(work, base_model, examples, "fp32", False, steps),
             "fp32+head": lambda: raft_side(work, base_model, examples, "fp32", True, steps),
             "bf16": lambda: raft_side(work, base_model, examples, "bf16", True, steps)}
    runs = alternate(sides, repeats, log)
    return {"model": base_model, "recipe": "LoRA r8 q_proj,v_proj, batch 1 x 4 accumulated, 4 distractors, "
                                          "checkpointing, NEFTune 5", "steps_per_run": steps - 1,
            "seconds_per_step": {k: summary([x for r in v for x in r]) for k, v in runs.items()},
            "speedup_fp32_head": ratio(runs["today"], runs["fp32+head"]),
            "speedup_bf16": ratio(runs["today"], runs["bf16"])}


# --- inference -------------------------------------------------------------------------------------
def raft_prompt(work: Path, k: int = 5) -> list[dict]:
    """A bundled question with its top-k chunks, as `ask` builds the prompt (~900 tokens at k=5)."""
    from retrieval.retriever import Retriever
    from tuning.prompting import build_messages

    r = Retriever.load(bundled_index(work))
    q = "What scope ratio should be used when mooring a Kestrel-7 at an exposed site?"
    hits = r.search(q, k=k, groups=GROUPS)
    return build_messages(q, [{"doc_id": h.doc_id, "title": h.title, "text": h.text} for h in hits])


def prompt_ids(tok, messages):
    from tuning.prompting import chat_text

    return tok(chat_text(tok, messages), return_tensors="pt", add_special_tokens=False)["input_ids"]


def prefill_decode(model, tok, messages, new: int = 32) -> tuple[float, float]:
    import torch

    ids = prompt_ids(tok, messages)
    with torch.inference_mode():
        model(input_ids=ids[:, :64])
        t = time.perf_counter()
        model(input_ids=ids)
        pre = time.perf_counter() - t
        t = time.perf_counter()
        model.generate(input_ids=ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                       pad_token_id=tok.pad_token_id)
        gen = time.perf_counter() - t
    return ids.shape[1] / pre, new / max(gen - pre, 1e-9)


def run_prefill(work: Path, repeats: int, log) -> dict:
    from tuning.generation import load_generator

    models = {p: load_generator(QWEN, device="cpu", precision=p)[:2] for p in ("fp32", "bf16")}
    messages = raft_prompt(work)
    runs = alternate({p: (lambda p=p: prefill_decode(*models[p], messages)) for p in models}, repeats, log)
    pre = {p: [x[0] for x in v] for p, v in runs.items()}
    dec = {p: [x[1] for x in v] for p, v in runs.items()}
    return {"prompt_tokens": prompt_ids(models["fp32"][1], messages).shape[1], "prefill_tokens_per_s": {p: summary(v) for p, v in pre.items()},
            "decode_tokens_per_s": {p: summary(v) for p, v in dec.items()},
            "prefill_speedup": statistics.median(pre["bf16"]) / statistics.median(pre["fp32"]),
            "decode_speedup": statistics.median(dec["bf16"]) / statistics.median(dec["fp32"])}


def run_threads(work: Path, repeats: int, log) -> dict:
    import torch

    from retrieval.embedder import load_embedder
    from tuning.generation import load_generator

    model, tok, _ = load_generator(QWEN, device="cpu", precision="bf16")
    emb = load_embedder(None, device="cpu", precision="bf16")
    messages = raft_prompt(work)
    texts = [f"passage {i}: " + "the harbour office keeps the tide tables and the mooring rules " * 6
             for i in range(256)]

    def one(n: int):
        torch.set_num_threads(n)
        pre, dec = prefill_decode(model, tok, messages)
        t = time.perf_counter()
        emb.encode(texts)
        return pre, dec, len(texts) / (time.perf_counter() - t)

    runs = alternate({"1": lambda: one(1), "2": lambda: one(2)}, repeats, log)
    torch.set_num_threads(2)
    out = {}
    for i, what in enumerate(("prefill_tokens_per_s", "decode_tokens_per_s", "encode_passages_per_s")):
        one_t, two_t = [x[i] for x in runs["1"]], [x[i] for x in runs["2"]]
        out[what] = {"1": summary(one_t), "2": summary(two_t),
                     "two_over_one": statistics.median(two_t) / statistics.median(one_t)}
    return out


def run_eval_row(work: Path, repeats: int, log) -> dict:
    from hybrid.eval import EvalConfig, run_eval

    index = bundled_index(work)

    def side(p: str) -> float:
        t = time.perf_counter()
        run_eval(EvalConfig(qa=str(BUNDLED / "qa.jsonl"), index=str(index), base_model=QWEN, k=3, limit=40,
                            groups=GROUPS, precision=p), progress=False)
        return time.perf_counter() - t

    runs = alternate({"fp32": lambda: side("fp32"), "bf16": lambda: side("bf16")}, repeats, log)
    return {"questions": 40, "seconds": {p: summary(v) for p, v in runs.items()},
            "speedup": statistics.median(runs["fp32"]) / statistics.median(runs["bf16"])}


def halueval_corpus(work: Path) -> Path:
    from benchmarks.experiments.retrieval_halueval import prepare

    hw = work / "halueval"
    if not (hw / "qa_test.jsonl").exists():
        hw.mkdir(parents=True, exist_ok=True)
        prepare(hw)
    return hw


def run_index(work: Path, repeats: int, log) -> dict:
    import shutil

    from retrieval.index import IndexConfig, build_index

    hw = halueval_corpus(work)

    def side(p: str) -> float:
        out = work / f"halueval-index-{p}"
        shutil.rmtree(out, ignore_errors=True)
        return build_index(hw / "corpus", out, IndexConfig(index_type="flat", precision=p), progress=False).seconds

    runs = alternate({"fp32": lambda: side("fp32"), "bf16": lambda: side("bf16")}, repeats, log)
    return {"passages": sum(1 for _ in open(hw / "corpus" / "halueval.jsonl")),
            "seconds": {p: summary(v) for p, v in runs.items()},
            "speedup": statistics.median(runs["fp32"]) / statistics.median(runs["bf16"])}


def run_synth(work: Path, repeats: int, log) -> dict:
    from tuning.synth import SynthConfig, synthesize

    index = bundled_index(work)

    def side(p: str) -> float:
        out = work / f"synth-{p}"
        for f in out.glob("*") if out.exists() else []:
            f.unlink()
        out.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        rep = synthesize(SynthConfig(index=str(index), out=str(out / "qa.jsonl"), teacher=QWEN, max_chunks=8,
                                     per_chunk=2, batch_size=8, groups=GROUPS, precision=p),
                         progress=False, log=lambda *a: None)
        minutes = (time.perf_counter() - t) / 60
        return (rep.counts["kept"] + rep.counts["unanswerable_kept"]) / minutes

    runs = alternate({"fp32": lambda: side("fp32"), "bf16": lambda: side("bf16")}, repeats, log)
    return {"chunks": 8, "rows_kept_per_minute": {p: summary(v) for p, v in runs.items()},
            "speedup": statistics.median(runs["bf16"]) / statistics.median(runs["fp32"])}


RUNNERS = {"matmul": lambda w, r, log: run_matmul(w, max(r, 3), log),
           "raft": lambda w, r, log: run_steps(w, QWEN, r, 4, log),
           "smollm2": lambda w, r, log: run_steps(w, "smollm2", r, 6, log),
           "prefill": lambda w, r, log: run_prefill(w, max(r, 3), log),
           "threads": lambda w, r, log: run_threads(w, r, log),
           "eval": lambda w, r, log: run_eval_row(w, 1, log),
           "index": lambda w, r, log: run_index(w, 1, log),
           "synth": lambda w, r, log: run_synth(w, 1, log)}


def main(argv=None) -> int:
    p = parser(__doc__, out=str(ROOT / "benchmarks" / "out" / "precision"), out_aliases=("--work",),
               out_help="work directory: every row's files and report.json")
    p.add_argument("--rows", default=",".join(SPEED_ROWS), help=f"comma-separated: {','.join(SPEED_ROWS)},quality")
    p.add_argument("--repeats", type=int, default=2, help="alternations per side (default 2)")
    args = p.parse_args(argv)
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    report_file = work / "report.json"
    report = read_result(report_file) if report_file.exists() else {}  # rows merged run to run
    report["machine"] = machine()
    print(json.dumps(report["machine"]), flush=True)
    for row in [r.strip() for r in args.rows.split(",") if r.strip()]:
        print(f"== {row}", flush=True)
        if row == "quality":
            from benchmarks.performance.precision_quality import run_quality

            result = run_quality(work, lambda m: print(m, flush=True))
        else:
            result = RUNNERS[row](work, args.repeats, lambda m: print(m, flush=True))
        report[row] = {**result, "machine": machine()}
        write_result(report_file, "benchmarks.performance.precision", report, argv)  # after each row: a crash keeps the rest
        print(json.dumps({row: result}, indent=1), flush=True)
    finish(args, "benchmarks.performance.precision", report, argv, path=report_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
