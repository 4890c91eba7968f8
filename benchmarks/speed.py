"""Speed of hybrid's training and generation paths against the plain loops, side by side, and
decode against the machine's memory-bandwidth limit. One run, one table of ratios.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/speed.py            # the full run (64 min on 2 loaded cores)
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/speed.py --quick    # every row, small (a few minutes)
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/speed.py --quick --json --rows sft,generation

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
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

ROWS = ("sft", "dpo", "embedder", "generation", "threads", "limit")
HALUEVAL_ROWS = ROOT / "benchmarks" / "out" / "factuality" / "test.jsonl"
BUNDLED = ROOT / "corpora" / "brindle"

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


# --- statistics (tested in tests/benchmarks/test_speed.py) -------------------------------------------
def summary(xs: list[float]) -> dict:
    """Median, min, max and the relative spread (max - min) / median of some measurements."""
    xs = [float(x) for x in xs]
    if not xs:
        return {"n": 0, "median": None, "min": None, "max": None, "spread": None}
    med = statistics.median(xs)
    return {"n": len(xs), "median": med, "min": min(xs), "max": max(xs),
            "spread": (max(xs) - min(xs)) / med if med else None}


def ratio(a_runs: list[list[float]], b_runs: list[list[float]]) -> dict:
    """a / b of the median per-step seconds, from runs alternated a b a b.

    Returns the ratio of the medians over all steps of each side, and the per-repeat ratios
    (run i of a over run i of b: what the alternation controls for) with their min and max.
    """
    a_all = [x for r in a_runs for x in r]
    b_all = [x for r in b_runs for x in r]
    pairs = [statistics.median(a) / statistics.median(b) for a, b in zip(a_runs, b_runs) if a and b]
    return {"ratio": statistics.median(a_all) / statistics.median(b_all) if a_all and b_all else None,
            "per_repeat": pairs, "per_repeat_min": min(pairs) if pairs else None,
            "per_repeat_max": max(pairs) if pairs else None, "a": summary(a_all), "b": summary(b_all)}


def alternate(sides: dict, repeats: int, log=print) -> dict[str, list]:
    """Run each side's callable `repeats` times, in the order a b a b ... (never all of a, then all of b)."""
    out: dict[str, list] = {name: [] for name in sides}
    for i in range(repeats):
        for name, fn in sides.items():
            log(f"  {name} {i + 1}/{repeats} (load {os.getloadavg()[0]:.2f})")
            out[name].append(fn())
    return out


def verdict(value: float | None, target: float, at_most: bool) -> str:
    """'met' / 'MISSED' against a target (<= target when at_most, else >=)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "not measured"
    return "met" if (value <= target if at_most else value >= target) else "MISSED"


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


# --- step timing -------------------------------------------------------------------------------------
def step_clock():
    """A TrainerCallback class recording the wall time of every optimizer step (end to end)."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.marks: list[float] = []
            self.args = None
            self.dataset = None
            self.model = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks = [time.perf_counter()]
            self.args = args

        def on_step_end(self, args, state, control, train_dataloader=None, model=None, **kwargs):
            self.marks.append(time.perf_counter())
            if self.dataset is None and train_dataloader is not None:
                self.dataset = train_dataloader.dataset
                self.model = model

        def steps(self) -> list[float]:
            """Seconds per optimizer step, the first (warm-up) left out."""
            return [b - a for a, b in zip(self.marks[1:], self.marks[2:])]

    return StepClock


@contextlib.contextmanager
def clocked_entry_points():
    """Time the optimizer steps of hybrid's own trainers, unchanged: each of them builds its Trainer with
    `training.time_budget.TimeBudget` (imported at call time), so a subclass that also records step
    times is put in its place for the block. Yields the list the clocks are appended to."""
    from training import time_budget

    clocks = []
    original = time_budget.TimeBudget
    Clock = step_clock()

    class ClockedBudget(original, Clock):
        def __init__(self, *a, **kw):
            original.__init__(self, *a, **kw)
            Clock.__init__(self)
            clocks.append(self)

        def on_train_begin(self, *a, **kw):
            original.on_train_begin(self, *a, **kw)
            Clock.on_train_begin(self, *a, **kw)

        def on_step_end(self, *a, **kw):
            Clock.on_step_end(self, *a, **kw)
            return original.on_step_end(self, *a, **kw)

    time_budget.TimeBudget = ClockedBudget
    try:
        yield clocks
    finally:
        time_budget.TimeBudget = original


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


# --- data --------------------------------------------------------------------------------------------
def bundled_index(work: Path) -> Path:
    """An index of the bundled corpus with the packaged MiniLM (built once under WORK)."""
    from retrieval.index import IndexConfig, build_index

    index = work / "index"
    if not (index / "manifest.json").exists():
        build_index(BUNDLED / "docs", index, IndexConfig(chunk_tokens=128, overlap=16))
    return index


def raft_examples(work: Path, index: Path, distractors: int, max_length: int, n: int) -> Path:
    """RAFT examples mined from the bundled corpus by hybrid's own data stage; the `n` whose token
    length is nearest the median (so step times do not depend on the trainers' different shuffles)."""
    from core.jsonl import write_jsonl
    from tuning.generation import load_tokenizer, resolve_generator
    from tuning.prompting import sequence_tokens
    from tuning.tune_generator import GeneratorTuneConfig, raft_data

    path = work / f"raft_d{distractors}_L{max_length}_n{n}.jsonl"
    if path.exists():
        return path
    cfg = GeneratorTuneConfig(out=str(work / "unused"), index=str(index), qa=str(BUNDLED / "qa.jsonl"),
                              num_distractors=distractors, test_fraction=0.0, val_fraction=0.0)
    data = raft_data(cfg)
    tok = load_tokenizer(resolve_generator(None)[1])
    answers = [e for e in data.train if e["oracle"]]  # quote + answer targets (the DPO row prefers them to abstaining)
    lengths = [sequence_tokens(tok, e["prompt"], e["completion"][0]["content"])[1] for e in answers]
    fits = [(abs(length - statistics.median(lengths)), i) for i, length in enumerate(lengths) if length <= max_length]
    chosen = [answers[i] for _, i in sorted(fits)[:n]]
    if not chosen:  # never leave an empty file behind: a rerun would read it as the examples
        raise SystemExit(f"no RAFT example of the bundled corpus fits {max_length} tokens (shortest "
                         f"{min(lengths)}); raise sft_max_length")
    write_jsonl(path, chosen)
    return path


def example_lengths(path: Path) -> list[int]:
    from core.jsonl import read_jsonl
    from tuning.generation import load_tokenizer, resolve_generator
    from tuning.prompting import sequence_tokens

    tok = load_tokenizer(resolve_generator(None)[1])
    return [sequence_tokens(tok, e["prompt"], e["completion"][0]["content"])[1] for _, e in read_jsonl(path, "x", "x")]


def halueval_rows(n: int) -> list[dict]:
    """HaluEval factuality test rows with fixed passages (benchmarks/factuality_halueval.py writes them)."""
    if not HALUEVAL_ROWS.exists():
        raise SystemExit(f"error: {HALUEVAL_ROWS} is missing; run benchmarks/factuality_halueval.py --steps data first")
    rows = [json.loads(line) for line in HALUEVAL_ROWS.read_text().splitlines() if line.strip()]
    return rows[:n]


# --- SFT ---------------------------------------------------------------------------------------------
def sft_config(work: Path, examples: Path, s: dict, out: Path):
    from training.train_settings import TrainSettings
    from tuning.tune_generator import GeneratorTuneConfig

    return GeneratorTuneConfig(out=str(out), examples=str(examples), test_fraction=0.0, val_fraction=0.0,
                               save_steps=10_000, strategy="lora",
                               train=TrainSettings(learning_rate=2e-4, batch_size=1, grad_accum=s["sft_accum"],
                                                   max_steps=s["sft_steps"], max_length=s["sft_max_length"]))


def hybrid_steps(entry_point, cfg, **kwargs) -> list[float]:
    """Seconds per optimizer step of one of hybrid's trainers (`tune_generator`, `tune_dpo`), run as
    `hybrid tune ...` runs it, into a fresh output directory."""
    import shutil

    shutil.rmtree(cfg.out, ignore_errors=True)
    with clocked_entry_points() as clocks:
        entry_point(cfg, progress=False, **kwargs)
    return clocks[-1].steps()


def sft_hybrid(cfg) -> list[float]:
    from tuning.tune_generator import tune_generator

    return hybrid_steps(tune_generator, cfg, log=lambda *a: None)


def sft_plain(cfg) -> list[float]:
    """The same training as `tune_generator` does, written as a plain PEFT + torch loop."""
    import torch
    from peft import LoraConfig, get_peft_model

    from core.jsonl import read_jsonl
    from tuning.generation import load_generator

    t = cfg.train
    torch.manual_seed(t.seed)
    model, tok, _ = load_generator(cfg.base_model, device="cpu")
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                             target_modules=cfg.targets, task_type="CAUSAL_LM"))
    if cfg.neftune_alpha:  # NEFTune: uniform noise on the input embeddings while training
        def neftune(module, inputs, output):
            if module.training:
                mag = cfg.neftune_alpha / math.sqrt(output.shape[1] * output.shape[2])
                output = output + torch.zeros_like(output).uniform_(-mag, mag)
            return output

        model.get_input_embeddings().register_forward_hook(neftune)
    # completion-only loss: labels -100 on the prompt, as TRL's completion_only_loss does
    rows = []
    for _, e in read_jsonl(cfg.examples, "--examples", "RAFT examples"):
        prompt = tok.apply_chat_template(e["prompt"], add_generation_prompt=True, tokenize=True, return_dict=False)
        full = tok.apply_chat_template(e["prompt"] + e["completion"], tokenize=True, return_dict=False)
        prompt, full = list(prompt), list(full)[:t.max_length]
        rows.append((torch.tensor([full]), torch.tensor([[-100] * len(prompt) + full[len(prompt):]])))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=0.0)
    steps = t.max_steps
    warm = int(math.ceil(t.warmup_ratio * steps)) if t.warmup_ratio < 1 else int(t.warmup_ratio)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: (i + 1) / max(1, warm) if i < warm else max(0.0, (steps - i) / max(1, steps - warm)))
    model.train()
    marks = [time.perf_counter()]
    g = torch.Generator().manual_seed(t.seed)
    order = torch.randperm(len(rows), generator=g).tolist()
    k = 0
    for _ in range(steps):
        for _ in range(t.grad_accum):
            ids, labels = rows[order[k % len(rows)]]
            k += 1
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss / t.grad_accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())  # the trainer logs every step's loss: the same sync here
        marks.append(time.perf_counter())
    return [b - a for a, b in zip(marks[1:], marks[2:])]


def run_sft(work: Path, s: dict, log) -> tuple[dict, Path]:
    index = bundled_index(work)
    n_examples = max(8, s["sft_steps"] * s["sft_accum"])
    examples = raft_examples(work, index, s["sft_distractors"], s["sft_max_length"], n_examples)
    lengths = example_lengths(examples)
    adapter = work / "sft_adapter"
    cfg = sft_config(work, examples, s, adapter)
    runs = alternate({"hybrid": lambda: sft_hybrid(cfg), "plain": lambda: sft_plain(cfg)}, s["repeats"], log)
    r = ratio(runs["hybrid"], runs["plain"])
    r["settings"] = {"model": "smollm2 (SmolLM2-135M-Instruct, fp32)", "examples": len(lengths),
                     "tokens_per_example": [min(lengths), max(lengths)], "batch": 1, "grad_accum": s["sft_accum"],
                     "max_length": s["sft_max_length"], "lora": f"r={cfg.lora_r} alpha={cfg.lora_alpha} "
                     f"dropout={cfg.lora_dropout} targets={cfg.target_modules}",
                     "gradient_checkpointing": cfg.gradient_checkpointing, "neftune_alpha": cfg.neftune_alpha,
                     "steps_per_run": s["sft_steps"], "timed_steps_per_run": s["sft_steps"] - 1,
                     "repeats": s["repeats"], "order": "hybrid, plain, hybrid, plain"}
    r["runs"] = runs
    return r, adapter


# --- DPO ---------------------------------------------------------------------------------------------
def dpo_pairs(work: Path, examples: Path) -> Path:
    """Preference pairs from the SFT examples: the RAFT answer over the abstention (the form
    `hybrid tune dpo --pairs contrastive` writes)."""
    from core.jsonl import read_jsonl, write_jsonl
    from tuning.prompting import abstain_answer

    path = work / f"pairs_{examples.stem}.jsonl"
    pairs = [{"id": e["id"], "prompt": e["prompt"], "chosen": e["completion"],
              "rejected": [{"role": "assistant", "content": abstain_answer()}], "source": "answer", "groups": []}
             for _, e in read_jsonl(examples, "x", "x")]
    write_jsonl(path, pairs)
    return path


def dpo_config(adapter: Path, pairs: Path, s: dict, out: Path):
    from training.train_settings import TrainSettings
    from tuning.tune_dpo import DPOTuneConfig

    return DPOTuneConfig(adapter=str(adapter), out=str(out), pairs_file=str(pairs),
                         train=TrainSettings(learning_rate=5e-5, batch_size=1, grad_accum=1, max_steps=s["dpo_steps"],
                                             max_length=s["sft_max_length"]))


def dpo_hybrid(cfg) -> list[float]:
    from tuning.tune_dpo import tune_dpo

    return hybrid_steps(tune_dpo, cfg, log=lambda *a: None)


def dpo_plain(cfg) -> list[float]:
    """TRL's DPOTrainer called directly: the SFT adapter trainable on the base, ref_model=None."""
    import torch

    from training.trainer_output import drop_step_printer
    from datasets import Dataset
    from peft import PeftModel
    from trl import DPOConfig, DPOTrainer

    from core.jsonl import read_jsonl
    from tuning.generation import load_generator

    t = cfg.train
    torch.manual_seed(t.seed)
    base, tok, _ = load_generator(None, device="cpu")
    model = PeftModel.from_pretrained(base, cfg.adapter, is_trainable=True)
    model.train()
    pairs = [p for _, p in read_jsonl(cfg.pairs_file, "x", "x")]
    ds = Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs])
    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(output_dir=tmp, beta=cfg.beta, loss_type=[cfg.loss_type], max_length=t.max_length,
                         per_device_train_batch_size=t.batch_size, gradient_accumulation_steps=t.grad_accum,
                         learning_rate=t.learning_rate, max_steps=t.max_steps, use_cpu=True, bf16=False,
                         gradient_checkpointing=False, logging_steps=1, save_strategy="no", report_to="none",
                         seed=t.seed, disable_tqdm=True, warmup_steps=t.warmup_ratio)
        clock = step_clock()()
        trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=ds, processing_class=tok,
                             callbacks=[clock])
        drop_step_printer(trainer, False)  # as hybrid's trainers: no per-step loss dicts on stdout
        trainer.train()
    return clock.steps()


def run_dpo(work: Path, s: dict, adapter: Path, log) -> dict:
    examples = sorted(work.glob(f"raft_d{s['sft_distractors']}_L{s['sft_max_length']}_n*.jsonl"))[0]
    pairs = dpo_pairs(work, examples)
    cfg = dpo_config(adapter, pairs, s, work / "dpo_adapter")
    runs = alternate({"hybrid": lambda: dpo_hybrid(cfg), "plain": lambda: dpo_plain(cfg)}, s["repeats"], log)
    r = ratio(runs["hybrid"], runs["plain"])
    r["settings"] = {"model": "smollm2 + the SFT row's adapter (trainable), ref = adapter disabled",
                     "pairs": sum(1 for _ in open(pairs)), "batch": 1, "grad_accum": 1, "max_length": s["sft_max_length"],
                     "beta": cfg.beta, "loss": cfg.loss_type, "gradient_checkpointing": False,
                     "steps_per_run": s["dpo_steps"], "timed_steps_per_run": s["dpo_steps"] - 1, "repeats": s["repeats"],
                     "order": "hybrid, plain, hybrid, plain"}
    r["runs"] = runs
    return r


# --- embedder ----------------------------------------------------------------------------------------
def embedder_config(index: Path, s: dict, out: Path):
    from retrieval.tune_embedder import EmbedderTuneConfig
    from training.train_settings import TrainSettings

    return EmbedderTuneConfig(index=str(index), out=str(out), qa=str(BUNDLED / "qa.jsonl"),
                              train=TrainSettings(learning_rate=5e-5, batch_size=s["emb_batch"], epochs=50,
                                                  max_steps=s["emb_steps"], max_length=s["emb_max_length"]))


def embedder_hybrid(cfg, captured: dict) -> list[float]:
    import shutil

    from retrieval.tune_embedder import tune_embedder

    shutil.rmtree(cfg.out, ignore_errors=True)
    with clocked_entry_points() as clocks:
        tune_embedder(cfg, progress=False)
    captured.setdefault("dataset", clocks[-1].dataset)  # the rows (with mined negatives) it trained on
    return clocks[-1].steps()


def embedder_plain(cfg, captured: dict) -> list[float]:
    """sentence-transformers' trainer called directly on the rows the hybrid run trained on."""
    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments, losses)
    from sentence_transformers.training_args import BatchSamplers

    from retrieval.embedder import resolve_embedder
    from training.trainer_output import drop_step_printer

    t = cfg.train
    model = SentenceTransformer(str(resolve_embedder(None)[1]), device="cpu", local_files_only=True)
    model.max_seq_length = min(t.max_length, model.max_seq_length)
    with tempfile.TemporaryDirectory() as tmp:
        args = SentenceTransformerTrainingArguments(
            output_dir=tmp, num_train_epochs=t.epochs, max_steps=t.max_steps, per_device_train_batch_size=t.batch_size,
            gradient_accumulation_steps=t.grad_accum, learning_rate=t.learning_rate, warmup_steps=t.warmup_ratio,
            batch_sampler=BatchSamplers.NO_DUPLICATES, seed=t.seed, save_strategy="no", report_to="none",
            logging_steps=10, disable_tqdm=True, use_cpu=True, dataloader_drop_last=True)
        clock = step_clock()()
        trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=captured["dataset"],
                                             loss=losses.MultipleNegativesRankingLoss(model), callbacks=[clock])
        drop_step_printer(trainer, False)
        trainer.train()
    return clock.steps()


def run_embedder(work: Path, s: dict, log) -> dict:
    index = bundled_index(work)
    cfg = embedder_config(index, s, work / "embedder_out")
    captured: dict = {}
    runs = alternate({"hybrid": lambda: embedder_hybrid(cfg, captured), "plain": lambda: embedder_plain(cfg, captured)},
                     s["repeats"], log)
    r = ratio(runs["hybrid"], runs["plain"])
    ds = captured.get("dataset")
    r["settings"] = {"model": "packaged all-MiniLM-L6-v2", "rows": len(ds) if ds is not None else None,
                     "columns": list(ds.column_names) if ds is not None else None, "batch": s["emb_batch"],
                     "max_length": s["emb_max_length"], "loss": "MultipleNegativesRankingLoss",
                     "sampler": "no duplicates", "steps_per_run": s["emb_steps"],
                     "timed_steps_per_run": s["emb_steps"] - 1, "repeats": s["repeats"],
                     "order": "hybrid, plain, hybrid, plain"}
    r["runs"] = runs
    return r


# --- generation --------------------------------------------------------------------------------------
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


# --- threads -----------------------------------------------------------------------------------------
BUSY = "import numpy as np\na = np.random.rand(768, 768)\nwhile True:\n    a @ a\n"


@contextlib.contextmanager
def busy_process(on: bool):
    """A second job beside the measurement: a one-thread numpy matmul loop (a subprocess, ended here)."""
    if not on:
        yield None
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", BUSY], env=env)
    time.sleep(1.0)
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def run_threads(work: Path, s: dict, log) -> dict:
    import torch

    from retrieval.embedder import load_embedder
    from tuning.generation import generate_batch, load_generator
    from tuning.prompting import build_messages

    emb = load_embedder(None, device="cpu")
    texts = [json.loads(line)["question"] * 3 for line in (BUNDLED / "qa.jsonl").read_text().splitlines()[:64]]
    model, tok, _ = load_generator(None, device="cpu")
    row = halueval_rows(1)[0]
    msgs = [build_messages(row["question"], row["passages"])]
    from peft import LoraConfig, get_peft_model

    lm = get_peft_model(load_generator(None, device="cpu")[0], LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                                          task_type="CAUSAL_LM"))
    ids = tok(tok.apply_chat_template(msgs[0], add_generation_prompt=True, tokenize=False), return_tensors="pt",
              add_special_tokens=False)["input_ids"][:, :256]
    opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-4)

    def encode():
        t = time.perf_counter()
        emb.encode(texts)
        return len(texts) / (time.perf_counter() - t)  # texts/s

    def train():
        lm.train()
        t = time.perf_counter()
        lm(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        return 1 / (time.perf_counter() - t)  # steps/s

    def generate():
        t = time.perf_counter()
        (_, n), = generate_batch(model, tok, msgs, 24)
        return n / (time.perf_counter() - t)  # tokens/s (prefill included)

    work_fns = {"encode texts/s": encode, "train steps/s": train, "generate tok/s": generate}
    out: dict = {"settings": {"encode": f"MiniLM, {len(texts)} texts", "train": "SmolLM2 LoRA q/v step, 256 tokens",
                              "generate": "SmolLM2 greedy, 24 new tokens after a ~450-token prompt",
                              "busy": "one-thread numpy 768x768 matmul loop in a second process",
                              "repeats": s["thread_reps"], "order": "1, 2, 1, 2 threads per condition"}}
    before = torch.get_num_threads()
    for cond in ("idle", "busy"):
        with busy_process(cond == "busy"):
            for name, fn in work_fns.items():
                set_threads(1)
                fn()  # warm-up
                res = alternate({1: lambda: (set_threads(1), fn())[1], 2: lambda: (set_threads(2), fn())[1]},
                                s["thread_reps"], lambda *a: None)
                out.setdefault(name, {})[cond] = {"1": summary(res[1])["median"], "2": summary(res[2])["median"],
                                                   "2_over_1": statistics.median(res[2]) / statistics.median(res[1])}
                log(f"  threads {name} {cond}: {out[name][cond]}")
    set_threads(before)
    busy_ratios = [out[n]["busy"]["2_over_1"] for n in work_fns]
    idle_ratios = [out[n]["idle"]["2_over_1"] for n in work_fns]
    out["recommended"] = 1 if statistics.median(busy_ratios) < 1 and statistics.median(idle_ratios) < 1.3 else 2
    return out


# --- the limit ---------------------------------------------------------------------------------------
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


# --- main --------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small version of every row (a few minutes)")
    p.add_argument("--json", action="store_true", help="print one JSON object last")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    p.add_argument("--repeats", type=int, help="override the repeats per side")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "speed"))
    p.add_argument("--render", metavar="REPORT", help="print the tables of an earlier run's report.json and stop")
    args = p.parse_args(argv)
    if args.render:
        report = json.loads(Path(args.render).read_text())
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
    (work / ("report_quick.json" if args.quick else "report.json")).write_text(json.dumps(report, indent=2, default=str))
    print(table(report) + "\n\n" + detail_tables(report))
    if args.json:
        print(json.dumps(final_json(report), default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
