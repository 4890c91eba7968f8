"""What every benchmark shares: the offline environment, `--out`/`--json`, and one result-file format.

Run a benchmark as a module from the checkout's root, so `core`, `retrieval`, `tuning`, `hybrid` and
`benchmarks` import without a `sys.path` insert:

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.performance.speed --quick

Importing this module sets the offline and quiet environment (setdefault: a variable the caller set
wins) before the script imports torch or transformers, so no benchmark reaches the network.

A result file is one JSON object: {"schema", "header", "results"}. The header says how the numbers
were made (the command, the git commit and whether the tree was dirty, the machine, the date), so a
result file read months later still says which CPU and which code it came from. Result files written
before this format (docs/benchmarks/results/*.json) are the bare `results`; `read_result` reads both.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from core.atomic import write_text_atomic

# Set before anything imports transformers: they read these once, at import.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "TRANSFORMERS_VERBOSITY": "error", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
for _key, _value in OFFLINE_ENV.items():
    os.environ.setdefault(_key, _value)

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"  # git-ignored: work files and fresh results
SCHEMA = "hybrid-benchmark-result/1"


def fail(message: str) -> None:
    """Bad input: one line `error: MESSAGE` on stderr, exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a benchmark's subprocess: this one's, offline and quiet, plus `extra`."""
    return {**os.environ, **{k: os.environ.get(k, v) for k, v in OFFLINE_ENV.items()}, **extra}


class _DefaultsFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and every option's default after its help."""


def parser(doc: str | None, *, out: str | None = None, out_help: str = "where the results go",
           out_required: bool = False, out_aliases: tuple[str, ...] = (), defaults_in_help: bool = False,
           json_help: str = "print the result as one JSON object last") -> argparse.ArgumentParser:
    """An ArgumentParser with the module docstring as its help and the two options every benchmark has:
    `--out` (a result file or work directory; each script says which) and `--json`. `out_aliases`
    keeps an older name of the option working (`--work`), so commands in older pages still run."""
    p = argparse.ArgumentParser(description=doc, formatter_class=_DefaultsFormatter if defaults_in_help
                                else argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", *out_aliases, dest="out", default=out, required=out_required,
                   help=out_help + (f" (default {out})" if out and not defaults_in_help else ""))
    p.add_argument("--json", action="store_true", help=json_help)
    return p


@dataclasses.dataclass(frozen=True)
class Machine:
    """What ran it: bf16 numbers mean something only with amx_bf16 or avx512_bf16 (elsewhere emulated)."""
    cpu: str
    cpus: int | None
    amx_bf16: bool
    avx512_bf16: bool
    gpu: str | None
    python: str


@dataclasses.dataclass(frozen=True)
class ResultHeader:
    benchmark: str  # the module, e.g. benchmarks.performance.speed
    command: str
    commit: str | None
    dirty: bool | None  # uncommitted changes in the tree when it ran
    machine: Machine
    date: str  # UTC, ISO 8601


def machine() -> Machine:
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                cpu = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:  # not Linux: the flags stay unknown (False)
        pass
    return Machine(cpu=cpu, cpus=os.cpu_count(), amx_bf16="amx_bf16" in flags, avx512_bf16="avx512_bf16" in flags,
                   gpu=_gpu(), python=platform.python_version())


def _gpu() -> str | None:
    # torch is imported only when the benchmark already did: a header must not pay for a torch import
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return None


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):  # no git, or not a checkout (a copied tree on a device)
        return None


def header(benchmark: str, argv: list[str] | None = None) -> ResultHeader:
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    argv = sys.argv[1:] if argv is None else argv
    return ResultHeader(benchmark=benchmark, command=shlex.join(["python", "-m", benchmark, *argv]),
                        commit=commit, dirty=None if status is None else bool(status), machine=machine(),
                        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def write_result(path: str | Path, benchmark: str, results: Any, argv: list[str] | None = None) -> Path:
    """Write `results` under the header, atomically (a killed run leaves the previous file whole)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"schema": SCHEMA, "header": dataclasses.asdict(header(benchmark, argv)), "results": results}
    write_text_atomic(path, json.dumps(doc, indent=2, default=str) + "\n")
    return path


def finish(args: argparse.Namespace, benchmark: str, results: Any, argv: list[str] | None = None, *,
           path: str | Path | None = None) -> Path | None:
    """The end of every benchmark: write the result file (`path`, else `--out` when that names the file;
    none when neither is given) and, with `--json`, print `results` as one JSON object, last."""
    target = path if path is not None else args.out
    written = write_result(target, benchmark, results, argv) if target else None
    if args.json:
        print(json.dumps(results, default=str), flush=True)
    return written


def read_result(path: str | Path) -> Any:
    """The `results` of a result file: this format's, or an older file's whole object."""
    doc = json.loads(Path(path).read_text())
    if isinstance(doc, dict) and doc.get("schema") == SCHEMA:
        return doc["results"]
    return doc
