"""Factuality on HaluEval at full size on a CUDA GPU: prepare the files here, train and evaluate there.

The GPU machine needs no index, embedder or FAISS: every stage after `prepare` reads JSONL.

  prepare (CPU, needs the 10k-passage index of benchmarks/experiments/retrieval_halueval.py and ../shared):
      WORK/sft_examples.jsonl  RAFT examples for --train-questions train-split lines (seed 0), each
                               with and without its oracle (no_oracle=both), 3 hard distractors mined
                               from the index, quote + answer targets
      WORK/dpo_pairs.jsonl     contrastive pairs for --dpo-questions of those lines (seed 13)
      WORK/dev.jsonl           --dev-questions other train-split lines, fixed passages (gold + 3
                               distractors), half withheld (seed 7): calibration rows
      WORK/test.jsonl          all 1000 test-split lines, fixed passages, half withheld (seed 0)
  run (CUDA): hybrid tune generator --examples (QLoRA: 4-bit NF4 base, bf16 compute),
      hybrid tune dpo --pairs-file, hybrid tune calibrate on dev for both adapters, then hybrid eval
      on test (closed_book, rag, rag+raft, rag+raft_dpo and their +cal) and on dev (the adapters).
      Each training stage has a wall-time budget (--sft-minutes, --dpo-minutes) so the whole run
      fits one lease; the run records say whether a budget cut a stage short.
No test line is used by any training step; dev lines are neither trained on nor tested.

  fresh (here): WORK/fresh.jsonl, --fresh-questions train-split lines that neither the SFT/DPO
      data, the dev rows nor the judge's training used, built like test.jsonl (seed 11): a
      confirmation set for a rule found by looking at the test split's predictions.

  pack (here): what the GPU machine lacks, in two folders that each fit one transfer (64 MiB):
      .gpu/a: the first part of the packaged GGUF; .gpu/b: the rest of it, wheels (pip download for
      CPython 3.12 x86-64), bitsandbytes with its CUDA 13 library only, data.tar.xz.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.experiments.factuality_gpu prepare     # here
    .venv/bin/python -m benchmarks.experiments.factuality_gpu pack                          # here
    bash benchmarks/experiments/gpu_factuality.sh                                          # there (see that file)

--work holds the prepared rows and the adapters; --out (run) is a directory: eval_test/, eval_dev/
(as `hybrid eval` writes them) and the result files timings.json (each stage's minutes and peak GPU
memory, the calibrations), sft_run.json and dpo_run.json, in benchmarks/harness.py's format.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

from benchmarks.harness import finish, parser, write_result  # first: sets the offline environment


def fresh(args) -> None:
    """A confirmation set no step has touched: train-split questions used by neither the SFT/DPO data,
    nor the dev rows, nor the judge's training (`hybrid tune judge --train-questions 1000`, seed 0),
    built like the test rows (gold + 3 distractors, half withheld). For checking a rule that was
    found by looking at the test split's predictions."""
    from benchmarks.experiments.factuality_halueval import write_fixed_rows
    from benchmarks.data import halueval
    from retrieval.retriever import Retriever

    lines = halueval.load_lines()
    train_idx, _ = halueval.split(len(lines), 1000, 0)
    doc_of = halueval.doc_ids(lines)  # knowledge text -> its document id in the index
    used = set(random.Random(0).sample(train_idx, args.train_questions))  # SFT (and DPO, a subset of it)
    used |= set(random.Random(7).sample([i for i in train_idx if i not in used], args.dev_questions))  # dev
    used |= set(random.Random(0).sample(train_idx, args.judge_questions))  # the judge (hybrid/judge.py, seed 0)
    rows = sorted(random.Random(11).sample([i for i in train_idx if i not in used], args.fresh_questions))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    write_fixed_rows(work / "fresh.jsonl", rows, set(random.Random(11).sample(rows, len(rows) // 2)), lines, doc_of,
                     Retriever.load(args.index), 3)
    print(f"fresh: {len(rows)} rows from {len(train_idx) - len(used)} untouched train-split questions -> "
          f"{work / 'fresh.jsonl'}", flush=True)


def prepare(args) -> None:
    from benchmarks.experiments.factuality_halueval import write_fixed_rows
    from benchmarks.data import halueval
    from core.qa import QARow
    from retrieval.retriever import Retriever
    from tuning.tune_dpo import contrastive_pairs
    from core.jsonl import write_jsonl
    from tuning.raft_data import RaftSettings, build_examples

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    lines = halueval.load_lines()
    train_idx, test_idx = halueval.split(len(lines), 1000, 0)
    doc_of = halueval.doc_ids(lines)  # knowledge text -> its document id in the index
    retriever = Retriever.load(args.index)
    tr = sorted(random.Random(0).sample(train_idx, args.train_questions))
    rows = [QARow(id=f"h{i:05d}", question=lines[i]["question"], answers=(lines[i]["right_answer"],),
                  gold_ids=(doc_of[lines[i]["knowledge"].strip()],)) for i in tr]
    t = time.perf_counter()
    examples = build_examples(rows, retriever, RaftSettings(num_distractors=3, no_oracle="both", seed=13))
    write_jsonl(work / "sft_examples.jsonl", examples)
    dpo_rows = random.Random(13).sample(rows, args.dpo_questions)
    dpo_ex = build_examples(dpo_rows, retriever, RaftSettings(num_distractors=3, no_oracle="both", seed=13))
    chunks = {h.chunk_id: h for h in retriever.chunks()}
    pairs = contrastive_pairs(dpo_ex, {r.id: r for r in dpo_rows}, chunks)
    write_jsonl(work / "dpo_pairs.jsonl", pairs)
    used = set(tr)
    dev = sorted(random.Random(7).sample([i for i in train_idx if i not in used], args.dev_questions))
    write_fixed_rows(work / "dev.jsonl", dev, set(random.Random(7).sample(dev, len(dev) // 2)), lines, doc_of,
                     retriever, 3)
    te = sorted(test_idx)
    write_fixed_rows(work / "test.jsonl", te, set(random.Random(0).sample(te, len(te) // 2)), lines, doc_of,
                     retriever, 3)
    print(f"prepare: {len(examples)} SFT examples ({len(rows)} questions), {len(pairs)} DPO pairs, {len(dev)} dev rows, "
          f"{len(te)} test rows in {time.perf_counter() - t:.0f} s -> {work}", flush=True)


# What the GPU image lacks or holds in other versions (the versions hybrid is tested with).
WHEELS = ["transformers==5.24.0", "peft==0.21.2", "trl==1.16.0", "datasets==5.2.0", "dill==0.4.1",
          "multiprocess==0.70.19", "gguf==0.19.0", "regex==2026.11.19"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]


def pack(args) -> None:
    import hashlib
    import importlib.util
    import shutil
    import subprocess
    import tarfile

    from tuning.generation import PACKAGED, _package_dir

    work, dest = Path(args.work), Path(args.pack_dir)
    a, b = dest / "a", dest / "b"
    shutil.rmtree(dest, ignore_errors=True)
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *[f"--platform={p}" for p in PLATFORMS],
                    "-d", str(b), *WHEELS], check=True)
    bnb = Path(importlib.util.find_spec("bitsandbytes").origin).parent
    keep = {"libbitsandbytes_cuda130.so", "libbitsandbytes_cpu.so"}  # the GPU image's torch is built for CUDA 13.0
    shutil.copytree(bnb, b / "bitsandbytes", ignore=lambda d, names: [n for n in names if n == "__pycache__" or (
        n.startswith("libbitsandbytes_") and n not in keep)])
    for info in bnb.parent.glob("bitsandbytes-*.dist-info"):
        shutil.copytree(info, b / info.name)
    module, gguf_file, install = PACKAGED["smollm2"]
    gguf = _package_dir(module, install) / gguf_file
    data = gguf.read_bytes()
    (a / "gguf.part-aa").write_bytes(data[: args.part_a_mib << 20])
    (b / "gguf.part-ab").write_bytes(data[args.part_a_mib << 20:])
    (b / "gguf.sha256").write_text(f"{hashlib.sha256(data).hexdigest()}  {gguf_file}\n")
    with tarfile.open(b / "data.tar.xz", "w:xz", preset=9) as tar:
        for name in ("sft_examples.jsonl", "dpo_pairs.jsonl", "dev.jsonl", "test.jsonl"):
            tar.add(work / name, arcname=name)
    for d in (a, b):
        size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
        print(f"pack: {d} {size / 2**20:.1f} MiB", flush=True)


def run(args) -> dict:
    import torch

    from hybrid.eval import EvalConfig, markdown, run_eval
    from hybrid.tune_calibrate import CalibrateConfig, calibrate
    from hybrid.config import build_config
    from tuning.tune_dpo import DPOTuneConfig, tune_dpo
    from tuning.tune_generator import GeneratorTuneConfig, tune_generator

    work = Path(args.work)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    t_all = time.perf_counter()

    def stage(name, fn):
        t = time.perf_counter()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        result = fn()
        timings[f"{name}_min"] = round((time.perf_counter() - t) / 60, 2)
        if torch.cuda.is_available():
            timings[f"{name}_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        write_result(out / "timings.json", "benchmarks.experiments.factuality_gpu", timings, args.argv)
        print(f"{name}: {timings[f'{name}_min']} min; total {(time.perf_counter() - t_all) / 60:.1f} min", flush=True)
        return result

    stages = set(args.stages.split(","))
    adapters = {"raft": str(work / "raft"), "raft_dpo": str(work / "raft_dpo")}
    if "sft" in stages:
        sft = stage("sft", lambda: tune_generator(build_config(GeneratorTuneConfig, overrides=dict(
            out=str(work / "raft"), examples=str(work / "sft_examples.jsonl"), test_fraction=0.0, val_fraction=0.02,
            target_modules="all-linear", lora_r=16, lora_alpha=32, save_steps=10**6, strategy=args.strategy,
            train=dict(max_steps=args.sft_steps, max_minutes=args.sft_minutes, batch_size=args.batch_size, grad_accum=1,
                       learning_rate=args.sft_lr, max_length=1536))), progress=False))
        write_result(out / "sft_run.json", "benchmarks.experiments.factuality_gpu",
                     {k: v for k, v in sft.record.items() if k != "train_loss"}, args.argv)
    if "dpo" in stages:
        dpo = stage("dpo", lambda: tune_dpo(build_config(DPOTuneConfig, overrides=dict(
            adapter=str(work / "raft"), out=str(work / "raft_dpo"), pairs_file=str(work / "dpo_pairs.jsonl"),
            test_fraction=0.0, train=dict(max_steps=args.dpo_steps, max_minutes=args.dpo_minutes,
                                          batch_size=args.batch_size // 2, grad_accum=1))), progress=False))
        write_result(out / "dpo_run.json", "benchmarks.experiments.factuality_gpu",
                     {k: v for k, v in dpo.record.items() if k != "train_log"}, args.argv)
    for name, path in adapters.items() if "calibrate" in stages else ():
        cal = stage(f"calibrate_{name}", lambda p=path: calibrate(CalibrateConfig(adapter=p, qa=str(work / "dev.jsonl"))))
        timings[f"calibration_{name}"] = cal.to_json()  # hybrid_abstain.json's record
    for split, qa, configs, closed in (("test", "test.jsonl", adapters, True), ("dev", "dev.jsonl", adapters, False)):
        if f"eval_{split}" not in stages:
            continue
        # an interrupted eval resumes from OUT/eval_SPLIT/predictions.jsonl (batch size is not part of its signature)
        rep = stage(f"eval_{split}", lambda qa=qa, configs=configs, closed=closed, split=split: run_eval(EvalConfig(
            qa=str(work / qa), adapters=configs, closed_book=closed, batch_size=args.eval_batch, max_new_tokens=64,
            seed=0, out=str(out / f"eval_{split}")), progress=False))
        print(markdown(rep), flush=True)
    return timings


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, out="benchmarks/out/factuality_gpu/results",
               out_help="run: directory of the evals and the result files (timings.json, sft_run.json, dpo_run.json)",
               json_help="run: print timings.json's results as one JSON object last")
    p.add_argument("step", choices=["prepare", "pack", "run", "fresh"])
    p.add_argument("--work", default="benchmarks/out/factuality_gpu")
    p.add_argument("--index", default="benchmarks/out/halueval/index")
    p.add_argument("--train-questions", type=int, default=4000)
    p.add_argument("--dpo-questions", type=int, default=1000)
    p.add_argument("--dev-questions", type=int, default=500)
    p.add_argument("--judge-questions", type=int, default=1000, help="fresh: the judge's --train-questions")
    p.add_argument("--fresh-questions", type=int, default=400, help="fresh: rows to write")
    p.add_argument("--strategy", default="auto", help="run: auto = QLoRA on CUDA")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--sft-steps", type=int, default=0, help="0 = one epoch")
    p.add_argument("--sft-minutes", type=float, default=2.5)
    p.add_argument("--sft-lr", type=float, default=1e-3)
    p.add_argument("--dpo-steps", type=int, default=0, help="0 = one epoch")
    p.add_argument("--dpo-minutes", type=float, default=1.0)
    p.add_argument("--eval-batch", type=int, default=64)
    p.add_argument("--stages", default="sft,dpo,calibrate,eval_test,eval_dev", help="run: which stages, in this order")
    p.add_argument("--pack-dir", default=".gpu", help="pack: ignored folder the device call carries")
    p.add_argument("--part-a-mib", type=int, default=60, help="pack: MiB of the GGUF in the first transfer")
    args = p.parse_args(argv)
    args.argv = argv  # the result files' header records the command
    if args.step == "run":
        timings = run(args)
        finish(args, "benchmarks.experiments.factuality_gpu", timings, argv, path=Path(args.out) / "timings.json")
    else:
        {"prepare": prepare, "pack": pack, "fresh": fresh}[args.step](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
