"""Access scope of trained artifacts: what a model learned from, and who may use it.

Retrieval keeps a restricted chunk away from callers outside its groups; a model
fine-tuned on that chunk holds the text in its weights, so the rule has to follow
the text into every artifact. Each training job (RAFT SFT, DPO, embedder tuning)
sees public chunks only, unless its caller names groups (`--group hr`); the
artifact it writes (adapter dir, merged model, tuned embedder, judge) carries
`hybrid_access.json`:

    {"scope": "public"}                       learned from public chunks only
    {"scope": ["hr"], "groups_seen": ["hr"]}  may hold text of these groups' documents

The scope is exactly the groups the trainer named; `groups_seen` is the subset
whose chunks actually entered a training example. Loading an artifact for a
caller whose groups do not include every scope group is refused; an artifact
without the file is refused too (its scope is unknown).
"""

from __future__ import annotations

import json
from dataclasses import field
from pathlib import Path

from core.atomic import write_text_atomic
from core.errors import Arg, InputError

ACCESS_FILE = "hybrid_access.json"
CALLER_HELP = "Access group of the caller (repeatable). Without it: public documents only."


def option(help: str = CALLER_HELP):
    """The `groups` field of a command's config: flag `--group` (repeatable), YAML key `groups`, a list
    of names checked by `group_problems`; `help` says what the groups open to that command."""
    return field(default_factory=list, metadata={"flag": "--group", "help": help})


def caller_groups(groups) -> frozenset[str]:
    """A caller's (or trainer's) access groups as a set; None or () = public only.

    A lone string is one group: iterated, "hr" would become the groups "h" and "r".

    Raises:
        InputError: groups that are not a collection of strings.
    """
    if groups is None:
        return frozenset()
    if isinstance(groups, str):
        groups = [groups]
    if isinstance(groups, (bytes, dict)) or not hasattr(groups, "__iter__"):
        raise InputError(f"groups must be a list of group names, got {type(groups).__name__}")
    groups = list(groups)
    if not all(isinstance(g, str) for g in groups):
        raise InputError("groups must be a list of group names (strings)")
    return frozenset(groups)


def training_groups(groups) -> list[str]:
    """The trainer's groups as a sorted list without repeats ([] = public only)."""
    return sorted(caller_groups(groups))


def may_learn(text_groups, trainer_groups) -> bool:
    """Whether a trainer with `trainer_groups` may learn from text of `text_groups` (() = public):
    only when it holds every one of them, the rule retrieval applies to a restricted chunk's readers
    applied to the text a question was written from."""
    return set(text_groups) <= caller_groups(trainer_groups)


def record(groups, seen=()) -> dict:
    """The hybrid_access.json content for an artifact trained with `groups` (see module docstring)."""
    groups = training_groups(groups)
    if not groups:
        return {"scope": "public"}
    return {"scope": groups, "groups_seen": training_groups(seen)}


def write(path: str | Path, rec: dict) -> None:
    """Write the access record into an artifact dir (atomic)."""
    write_text_atomic(Path(path) / ACCESS_FILE, json.dumps(rec, indent=2))


def scope(path: str | Path) -> list[str] | None:
    """The artifact's scope groups ([] = public), or None when it has no access record."""
    f = Path(path) / ACCESS_FILE
    if not f.exists():
        return None
    try:
        s = json.loads(f.read_text(encoding="utf-8")).get("scope")
    except (OSError, ValueError, AttributeError):  # unreadable, not JSON, not an object
        s = None
    if s == "public":
        return []
    # Anything else must be a list of names: a string "hr" read as a list would be the groups h, r.
    if not (isinstance(s, list) and s and all(isinstance(g, str) and g for g in s)):
        raise InputError(f"{f}: 'scope' must be \"public\" or a list of group names; the access record is "
                         f"damaged, so retrain the artifact (what it learned from is unknown)")
    return list(s)


def group_problems(groups) -> list[str]:
    """Validation of a config's `groups` field (for the workflows' `problems()`)."""
    if isinstance(groups, list) and all(isinstance(g, str) and g for g in groups):
        return []
    return ["--group must be a non-empty group name (groups: a list of names in YAML)"]


def require(scope_groups: list[str], caller_groups, label: str | Arg) -> None:
    """Raise InputError naming `label` and the missing groups unless the caller holds every scope group."""
    missing = sorted(set(scope_groups) - set(training_groups(caller_groups)))
    if missing:
        raise InputError(label, f": trained on documents of access group(s) {', '.join(sorted(scope_groups))}; the "
                         f"caller lacks {', '.join(missing)} (pass ", Arg("groups", missing),
                         " only if the caller belongs to them)")


def check(path: str | Path, caller_groups, label: str | Arg) -> None:
    """Refuse an artifact the caller may not use.

    Args:
        path: artifact dir.
        caller_groups: the caller's access groups (None = public).
        label: how the user named it, e.g. `Arg("adapters", {"hr": "runs/hr"})` (goes into the error).

    Raises:
        InputError: no access record, or scope groups missing from the caller's groups.
    """
    s = scope(path)
    if s is None:
        raise InputError(label, f": no {ACCESS_FILE}, so what it learned from is unknown; retrain it with this "
                         f"version of hybrid (artifacts record the access groups of their training data)")
    require(s, caller_groups, label)
