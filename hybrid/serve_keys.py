"""API keys of `hybrid serve`: each key maps to the access groups its requests read with.

`keys.yaml` never holds a key, only its sha256 hex digest:

    - name: alice               # shows in logs and /metrics, never the key
      sha256: 9f86d081...       # printf %s "$KEY" | sha256sum
      groups: [hr]              # what this key's retrieval sees, and which adapters it may use
      adapters: [raft, hr-raft] # optional: the only adapters (and `base`) it may ask for

A request's bearer token is hashed and compared with every entry in constant time
(`hmac.compare_digest`, no early exit), so timing says nothing about which digest came close.

    >>> import hashlib
    >>> ring = KeyRing([Caller("alice", ["hr"], None, hashlib.sha256(b"s3cret").hexdigest())])
    >>> ring.authenticate("s3cret").groups, ring.authenticate("wrong")
    (['hr'], None)
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from pathlib import Path

from hybrid.config import read_yaml
from core.errors import InputError

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
FIELDS = {"name", "sha256", "groups", "adapters"}


@dataclass(frozen=True)
class Caller:
    """Who a request is: a key's name, its groups, and the adapters it may use (None = any its groups cover)."""

    name: str
    groups: list[str]
    adapters: list[str] | None = None
    sha256: str = ""

    def may_name(self, model: str, base: str) -> bool:
        """Whether the key's `adapters` list admits this model name (the base model is `base`)."""
        return self.adapters is None or model in self.adapters or (model == base and "base" in self.adapters)


PUBLIC = Caller("anonymous", [])  # without --keys: loopback only, public documents and public adapters


class KeyRing:
    def __init__(self, callers: list[Caller]):
        self.callers = callers

    def authenticate(self, token: str) -> Caller | None:
        """The caller whose digest matches the token's, or None; every entry is compared."""
        digest = hashlib.sha256(token.encode("utf-8")).hexdigest()
        found = None
        for c in self.callers:
            if hmac.compare_digest(digest, c.sha256):
                found = c
        return found

    def all_groups(self) -> list[str]:
        return sorted({g for c in self.callers for g in c.groups})

    def shared_groups(self) -> list[str]:
        """The groups every key holds: what an artifact serving every request (the judge) may have learned from."""
        return sorted(set.intersection(*(set(c.groups) for c in self.callers)))


def load_keys(path: str | Path) -> KeyRing:
    """Read and validate keys.yaml; every problem is collected into one `error:` line naming the entry and field."""
    path = Path(path)
    data = read_yaml(path, "--keys")
    if not isinstance(data, list) or not data:
        raise InputError(f"--keys {path}: must be a non-empty list of {{name, sha256, groups, adapters?}} entries")
    problems, callers, seen = [], [], set()
    for i, entry in enumerate(data, 1):
        where = f"entry {i}"
        if not isinstance(entry, dict):
            problems.append(f"{where}: must be a mapping with name, sha256, groups")
            continue
        where = f"entry {i} ({entry.get('name', '?')})"
        problems += [f"{where}: unknown field '{k}' (expected {', '.join(sorted(FIELDS))})" for k in set(entry) - FIELDS]
        name, digest, groups, adapters = (entry.get(k) for k in ("name", "sha256", "groups", "adapters"))
        if not isinstance(name, str) or not name:
            problems.append(f"{where}: 'name' must be a non-empty string")
        if not isinstance(digest, str) or not _HEX64.match(digest.lower()):
            problems.append(f"{where}: 'sha256' must be the key's 64-hex-digit sha256 (printf %s \"$KEY\" | sha256sum), "
                            f"never the key itself")
        elif digest.lower() in seen:
            problems.append(f"{where}: 'sha256' repeats an earlier entry's (one key, one entry)")
        else:
            seen.add(digest.lower())
        if not isinstance(groups, list) or not all(isinstance(g, str) and g for g in groups):
            problems.append(f"{where}: 'groups' must be a list of group names ([] = public documents only)")
        if adapters is not None and not (isinstance(adapters, list) and all(isinstance(a, str) and a for a in adapters)):
            problems.append(f"{where}: 'adapters' must be a list of adapter names (or left out: any its groups cover)")
        if not problems:
            callers.append(Caller(name, sorted(set(groups)), adapters, digest.lower()))
    if problems:
        raise InputError(f"--keys {path}: " + "; ".join(problems))
    return KeyRing(callers)
