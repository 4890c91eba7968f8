"""Speed row `threads`: 1 vs 2 torch threads for encode, a training step and generation, idle and beside
a second busy process."""

from __future__ import annotations

import contextlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.harness import child_env
from benchmarks.performance.alternation import alternate, summary
from benchmarks.performance.speed_inputs import BUNDLED, halueval_rows, set_threads


BUSY = "import numpy as np\na = np.random.rand(768, 768)\nwhile True:\n    a @ a\n"


@contextlib.contextmanager
def busy_process(on: bool):
    """A second job beside the measurement: a one-thread numpy matmul loop (a subprocess, ended here)."""
    if not on:
        yield None
        return
    env = child_env(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
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
