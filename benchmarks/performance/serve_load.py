"""Load test of `hybrid serve` on loopback: concurrent clients against sequential `Pipeline.ask`.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.performance.serve_load --index runs/demo/index \
        --adapter a=runs/demo/raft --adapter b=runs/other_raft --group hr --group finance \
        --clients 1,4,16 --requests 16 --max-tokens 24 --out docs/benchmarks/results/serve_load.json

Stages, one after another (never two heavy jobs at once on a small machine):
1. sequential: `Pipeline.ask` in this process on the first `--requests` questions, once with
   adapter a on every question, once cycling a, b and the base model (the reference answers);
2. the server: `hybrid serve` as a subprocess (keys file written here, one key holding
   `--group`s), once per `--batching` mode (the one-adapter scenario with the first only), then for each scenario (`one`: every request to a; `spread`: a, b, base in turn)
   and each client count, the same questions sent by that many threads: p50/p95 latency,
   requests/s, tokens/s, errors, answers that differ from the sequential ones and wrong-adapter
   answers (equal to another model's sequential answer for that question, not its own; checked on the
   first `--wrong-check` questions, which every model answers sequentially), the
   server's peak RSS;
3. memory of N adapters: the base alone, then copies of adapter a added one by one, RSS after each
   (slope = MiB per adapter), beside the adapter's file size.
0. first, where a request's time goes: prefill seconds and decode ms per step at batch 1 and 4.
The script stops by itself (bounded request counts); the server binds 127.0.0.1 only.
The report is printed (indented JSON; `--json`: one line) and, with `--out FILE`, written as a result
file (benchmarks/harness.py's format).
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.harness import ROOT, child_env, finish, parser  # first: sets the offline environment

KEY = "bench-key"


def rss_mib(pid: int | str = "self", field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def questions(qa: Path, n: int) -> list[str]:
    rows = [json.loads(l) for l in qa.read_text().splitlines() if l.strip()]
    return [r["question"] for r in rows[:n]]


def plan(scenario: str, qs: list[str], base: str) -> list[tuple[str, str]]:
    models = ["a"] if scenario == "one" else ["a", "b", base]
    return [(models[i % len(models)], q) for i, q in enumerate(qs)]


def sequential(args, qs) -> dict:
    from hybrid.pipeline import Pipeline
    from hybrid.serve_answers import served_content

    pipe = Pipeline.load(args.index, adapters=args.adapters, k=args.k, max_new_tokens=args.max_tokens,
                         groups=args.groups, precision=args.precision)
    base = Path(pipe.info.name).name
    out, answers = {}, {}
    for scenario in ("one", "spread"):
        t0, tokens, lat = time.perf_counter(), 0, []
        for model, q in plan(scenario, qs, base):
            t = time.perf_counter()
            a = pipe.ask(q, groups=args.groups, adapter=None if model == base else model)
            lat.append(time.perf_counter() - t)
            tokens += a.new_tokens
            answers[(model, q)] = served_content(a)
        wall = time.perf_counter() - t0
        out[scenario] = {"requests": len(lat), "seconds": round(wall, 1), "requests_per_s": len(lat) / wall,
                         "tokens_per_s": tokens / wall, "p50_s": statistics.median(lat),
                         "p95_s": sorted(lat)[max(0, int(round(0.95 * len(lat))) - 1)]}
    # what every model answers on the first --wrong-check questions: a wrong-adapter answer is one of these
    for model in ("a", "b", base):
        for q in qs[:args.wrong_check]:
            if (model, q) not in answers:
                answers[(model, q)] = served_content(pipe.ask(q, groups=args.groups,
                                                              adapter=None if model == base else model))
    del pipe
    gc.collect()
    return {"rows": out, "answers": answers, "base": base}


def prefill_decode(args, qs: list[str]) -> dict:
    """Where a request's time goes: prefill seconds and decode ms per step at batch 1 and 4 (adapter a)."""
    import torch

    from hybrid.pipeline import Pipeline
    from tuning.prompting import build_messages

    pipe = Pipeline.load(args.index, adapters={"a": args.adapters["a"]}, k=args.k, groups=args.groups,
                         precision=args.precision)
    pipe.model.set_adapter("a")
    ps = pipe.retrieve(qs[:4], groups=args.groups, k=args.k)
    texts = [pipe.tok.apply_chat_template(build_messages(q, p), add_generation_prompt=True, tokenize=False)
             for q, p in zip(qs[:4], ps)]
    pipe.tok.padding_side = "left"
    out = {}
    for bs in (1, 4):
        enc = pipe.tok(texts[:bs], return_tensors="pt", padding=True, add_special_tokens=False)
        timed = {}
        for new in (1, 33):
            t = time.perf_counter()
            with torch.inference_mode():
                pipe.model.generate(**enc, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                    pad_token_id=pipe.tok.pad_token_id)
            timed[new] = time.perf_counter() - t
        out[f"batch{bs}"] = {"prompt_tokens": int(enc["attention_mask"].sum()), "padded_len": enc["input_ids"].shape[1],
                             "prefill_s": round(timed[1], 2), "decode_ms_per_step": round((timed[33] - timed[1]) / 32 * 1000, 1)}
    return out


def start_server(args, keys: Path, batching: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(ROOT / ".venv" / "bin" / "hybrid"), "serve", "--index", args.index, "--keys", str(keys),
           "--port", str(port), "-k", str(args.k), "--max-new-tokens", str(args.max_tokens),
           "--max-adapters", "2", "--max-batch", str(args.max_batch), "--max-queue", "256", "--batching", batching,
           "--precision", args.precision]
    for name, path in args.adapters.items():
        cmd += ["--adapter", f"{name}={path}"]
    proc = subprocess.Popen(cmd, env=child_env(), stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    import httpx2 as httpx

    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"error: hybrid serve exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(1)
    raise SystemExit("error: hybrid serve did not come up in 10 minutes")


def load(url: str, work: list[tuple[str, str]], clients: int, max_tokens: int, reference: dict) -> dict:
    import httpx2 as httpx

    def one(mq):
        model, q = mq
        t = time.perf_counter()
        r = httpx.post(url + "/v1/chat/completions", timeout=1800, headers={"Authorization": f"Bearer {KEY}"},
                       json={"model": model, "messages": [{"role": "user", "content": q}], "max_tokens": max_tokens})
        dt = time.perf_counter() - t
        if r.status_code != 200:
            return dt, 0, None, r.status_code
        body = r.json()
        return dt, body["usage"]["completion_tokens"], body["choices"][0]["message"]["content"], 200

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as ex:
        results = list(ex.map(one, work))
    wall = time.perf_counter() - t0
    lat = sorted(r[0] for r in results)
    differs = wrong = 0
    for (model, q), (_, _, content, _) in zip(work, results):
        if content is None or content == reference[(model, q)]:
            continue
        differs += 1
        wrong += any(content == ref for (m, q2), ref in reference.items() if q2 == q and m != model)
    return {"clients": clients, "requests": len(work), "seconds": round(wall, 1), "requests_per_s": len(work) / wall,
            "tokens_per_s": sum(r[1] for r in results) / wall, "p50_s": statistics.median(lat),
            "p95_s": lat[max(0, int(round(0.95 * len(lat))) - 1)], "errors": sum(r[3] != 200 for r in results),
            "differs_from_sequential": differs, "wrong_adapter": wrong}


def adapter_memory(args, n: int) -> dict:
    from hybrid.pipeline import Pipeline

    src = Path(args.adapters["a"])
    tmp = Path(tempfile.mkdtemp(prefix="hybrid_adapters_"))
    from training import run_record

    base = run_record.read(src, "--adapter a")["base_model"]["name"]
    pipe = Pipeline.load(None, base_model=base, groups=args.groups, precision=args.precision)

    def measure():  # RSS after handing freed heap back (else loading's freed buffers hide the adapters)
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        params = {id(p): p.numel() * p.element_size() for p in pipe.model.parameters()}
        return rss_mib(), sum(params.values()) / 2**20

    rss, weights = map(list, zip(measure()))
    for i in range(n):
        shutil.copytree(src, tmp / f"m{i}")
        pipe.add_adapter(f"m{i}", tmp / f"m{i}")
        r, w = measure()
        rss.append(r)
        weights.append(w)
    shutil.rmtree(tmp, ignore_errors=True)
    size = sum(f.stat().st_size for f in src.glob("adapter_model.*")) / 2**20
    def slope(ys):
        return round(statistics.linear_regression(range(len(ys)), ys).slope, 1) if len(ys) > 1 else float("nan")

    return {"rss_mib": [round(r, 1) for r in rss], "rss_slope_mib_per_adapter": slope(rss),
            "weights_mib": [round(w, 1) for w in weights], "weights_slope_mib_per_adapter": slope(weights),
            "adapter_file_mib": round(size, 1)}


def report_out(args, report: dict, argv: list[str] | None) -> None:
    """Print the report (indented, unless --json prints it as one line) and write it to --out if given."""
    if not args.json:
        print(json.dumps(report, indent=2))
    finish(args, "benchmarks.performance.serve_load", report, argv)


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__, out_help="result file (JSON); none unless given",
                json_help="print the report as one JSON line instead of indented")
    ap.add_argument("--index", required=True)
    ap.add_argument("--adapter", action="append", required=True, help="a=DIR and b=DIR")
    ap.add_argument("--group", action="append", default=[])
    ap.add_argument("--qa", default=str(ROOT / "corpora" / "brindle" / "qa.jsonl"))
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--batching", default="mixed,by-adapter", help="server --batching modes to run, in turn")
    ap.add_argument("-k", type=int, default=3)
    ap.add_argument("--memory-adapters", type=int, default=4)
    ap.add_argument("--wrong-check", type=int, default=6, help="questions every model answers sequentially (the "
                    "references a wrong-adapter answer would equal)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                    help="the server's and the sequential baseline's --precision [default: auto]")
    ap.add_argument("--split-only", action="store_true", help="only the prefill/decode split")
    args = ap.parse_args(argv)
    args.adapters = dict(a.split("=", 1) for a in args.adapter)
    args.groups = args.group
    if set(args.adapters) != {"a", "b"}:
        raise SystemExit("error: --adapter: pass exactly a=DIR and b=DIR")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    qs = questions(Path(args.qa), args.requests)
    report = {"settings": {k: v for k, v in vars(args).items() if k != "adapter"}, "machine": os.cpu_count()}
    print("prefill and decode ...", file=sys.stderr)
    report["prefill_decode"] = prefill_decode(args, qs)
    print(json.dumps(report["prefill_decode"]), file=sys.stderr)
    if args.split_only:
        report_out(args, report, argv)
        return
    print("sequential Pipeline.ask ...", file=sys.stderr)
    seq = sequential(args, qs)
    report["sequential"] = seq["rows"]
    keys = Path(tempfile.mkdtemp()) / "keys.yaml"
    keys.write_text(json.dumps([{"name": "bench", "sha256": hashlib.sha256(KEY.encode()).hexdigest(),
                                 "groups": args.groups}]))
    report["server"], report["server_peak_rss_mib"] = [], {}
    for n, batching in enumerate(args.batching.split(",")):
        proc, url = start_server(args, keys, batching)
        try:  # one adapter is the same in either mode: measured with the first only
            for scenario in ("one", "spread") if n == 0 else ("spread",):
                for c in map(int, args.clients.split(",")):
                    print(f"{batching}: {scenario}, {c} clients ...", file=sys.stderr)
                    row = load(url, plan(scenario, qs, seq["base"]), c, args.max_tokens, seq["answers"])
                    row.update(scenario=scenario, batching=batching,
                               vs_sequential=row["requests_per_s"] / seq["rows"][scenario]["requests_per_s"])
                    report["server"].append(row)
                    print(json.dumps(row), file=sys.stderr)
            report["server_peak_rss_mib"][batching] = round(rss_mib(proc.pid, "VmHWM"), 1)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    print("adapter memory ...", file=sys.stderr)
    report["adapter_memory"] = adapter_memory(args, args.memory_adapters)
    report_out(args, report, argv)


if __name__ == "__main__":
    main()
