"""The run record, `hybrid_run.json`: what a generator training run was, written beside its adapter.

One home for the record: the file name, writing it, reading it back validated, and its
fingerprint (the identity of a training run: an adapter retrained at the same path has another
one, so stale predictions or a stale calibration are never mixed with the new weights).

    >>> write(out_dir, {"workflow": "sft", "base_model": {"name": "smollm2", "fingerprint": "ab12"}})  # doctest: +SKIP
    >>> read(out_dir, "--adapter runs/raft")["base_model"]["name"]                                                # doctest: +SKIP
    'smollm2'
"""

from __future__ import annotations

import json
from pathlib import Path

from core import access
from core.atomic import write_text_atomic
from core.errors import Arg, InputError
from core.atomic import sha256_file

RUN_FILE = "hybrid_run.json"


def write(directory: str | Path, record: dict) -> None:
    """Write DIR/hybrid_run.json atomically."""
    write_text_atomic(Path(directory) / RUN_FILE, json.dumps(record, indent=2))


def exists(directory: str | Path) -> bool:
    return (Path(directory) / RUN_FILE).is_file()


def read(directory: str | Path, label: str | Arg) -> dict:
    """The validated run record of an adapter (or merged model) directory.

    Args:
        directory: the adapter directory.
        label: how the user named it, for the one-line error (e.g. `Arg("adapters", {"raft": "runs/raft"})`).

    Raises:
        InputError: no record, not JSON (e.g. truncated), not an object, or `base_model` lacking
            a string `name` and `fingerprint`.
    """
    path = Path(directory) / RUN_FILE
    fix = "retrain it with 'hybrid tune generator' or 'hybrid tune dpo'"
    if not path.is_file():
        raise InputError(f"{label}: not an adapter made by 'hybrid tune generator' or 'hybrid tune dpo' "
                         f"(no {RUN_FILE}); pass such a directory")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{label}: {RUN_FILE} is unreadable ({exc.__class__.__name__}); {fix}") from None
    base = record.get("base_model") if isinstance(record, dict) else None
    if not isinstance(base, dict) or not all(isinstance(base.get(k), str) and base.get(k) for k in ("name", "fingerprint")):
        raise InputError(f"{label}: {RUN_FILE} lacks base_model.name / base_model.fingerprint; {fix}")
    return record


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# What a run continuing an SFT adapter (`hybrid tune dpo`) reads from its record: the SFT run's split
# (held-out ids and seed, so its held-out questions stay unseen), LoRA shape and strategy.
SFT_FIELDS = {"strategy": ("a string", lambda v: isinstance(v, str)),
              "data.held_out_ids": ("a list of question ids", lambda v: isinstance(v, list)
                                    and all(isinstance(i, str) for i in v)),
              "config.lora_r": ("an integer", _is_int),
              "config.target_modules": ("a string", lambda v: isinstance(v, str)),
              "seed": ("an integer", _is_int)}


def _field_problem(record: dict, dotted: str, want: str, ok) -> str | None:
    """What is wrong with the record's field at a dotted path (None: nothing)."""
    value, path = record, []
    for key in dotted.split("."):
        if not isinstance(value, dict):
            return f"field {'.'.join(path)} must be an object, not {json.dumps(value)[:40]}"
        if key not in value:
            return f"lacks {dotted} ({want})"
        value = value[key]
        path.append(key)
    return None if ok(value) else f"field {dotted} must be {want}, not {json.dumps(value)[:40]}"


def read_sft(directory: str | Path, label: str) -> dict:
    """The validated run record of an SFT adapter that training continues from (`hybrid tune dpo`):
    `read`'s checks plus every field continuing it reads (SFT_FIELDS).

    Raises:
        InputError: as `read`; a DPO adapter (continue its SFT adapter instead); a field missing or
            of another type, named by its dotted path.
    """
    record = read(directory, label)
    if record.get("stage") == "dpo":  # its config is DPO's: no LoRA shape of its own to continue
        sft = record.get("sft_adapter")
        raise InputError(f"{label}: a DPO adapter; DPO continues an SFT adapter: pass the one it was trained from "
                         f"({sft if isinstance(sft, str) and sft.isprintable() else 'made by hybrid tune generator'})")
    config = record.get("config")
    # the seed's home moved into `train` (train_settings); older records keep it in `config`
    seed = "config.train.seed" if not isinstance(config, dict) or "train" in config else "config.seed"
    for dotted, (want, ok) in SFT_FIELDS.items():
        if why := _field_problem(record, seed if dotted == "seed" else dotted, want, ok):
            raise InputError(f"{label}: {RUN_FILE} {why}; retrain it with 'hybrid tune generator'")
    return record


def fingerprint(directory: str | Path) -> str | None:
    """Identity of an adapter's training run (sha256 of its run record); None without one."""
    path = Path(directory) / RUN_FILE
    return sha256_file(path) if path.is_file() else None


def train_settings(record: dict) -> dict:
    """The training settings a run used (`config.train`; records written before TrainSettings existed
    hold them at the top of `config`)."""
    config = record.get("config", {})
    return config.get("train", config)


def read_adapter(name: str, path: str | Path, groups) -> dict:
    """The run record of an adapter the caller (`groups`) may load; one-line InputError otherwise."""
    label = Arg("adapters", {name: str(path)})  # as Pipeline.load(adapters=...) / --adapter NAME=DIR name it
    check_name(name, label)
    rec = read(path, label)
    if not (Path(path) / "adapter_config.json").exists():
        raise InputError(f"{label}: not a LoRA adapter (no adapter_config.json); pass a "
                         f"directory made by 'hybrid tune generator' or 'hybrid tune dpo'")
    access.check(path, groups, label)
    return rec


def check_name(name: str, label) -> None:
    """An adapter's name becomes a torch module name in PEFT, which refuses a "." deep inside loading
    (a traceback); refuse it in one line instead."""
    if "." in name:
        raise InputError(label, f": adapter name {name!r} contains '.'; give a name without one "
                         f"(NAME=DIR, e.g. {name.replace('.', '_')}=DIR)")


def check_base(name: str, path, rec: dict, info) -> None:
    """Refuse an adapter trained on another base model than the loaded one (`info`).

    A remote engine's base (no local weights: `info.fingerprint` is empty) is known by name only.
    """
    base = rec["base_model"]
    same = base["fingerprint"] == info.fingerprint if info.fingerprint else base["name"] == info.name
    if not same:
        raise InputError(Arg("adapters", {name: str(path)}), f": trained on base model {base['name']} "
                         f"(fingerprint {base['fingerprint'][:12]}), not on {info.name} "
                         f"({info.fingerprint[:12] or 'remote'}); pass ", Arg("base_model", base["name"]), " or retrain")
