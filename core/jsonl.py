"""JSONL, the hand-off format between stages: one reader and one writer for every record kind.

A reader names FILE:LINE and the flag that named the file; a writer is atomic (a reader sees the
old file or the new one).
"""

from __future__ import annotations

import json
from pathlib import Path

from core.atomic import write_text_atomic
from core.errors import InputError


def read_jsonl(path: str | Path, flag: str, what: str) -> list[tuple[int, dict]]:
    """The JSON objects of a JSONL file, with their line numbers (blank lines skipped).

    Args:
        path: the file.
        flag: the option that named it, for error messages (e.g. "--examples").
        what: what the file should hold, for the fix in error messages (e.g. "RAFT examples").

    Raises:
        InputError: unreadable file, a line that is not a JSON object (named as FILE:LINE), or no objects.
    """
    p = Path(path)
    try:
        # "\n" alone ends a line: str.splitlines would also split on U+2028 and U+0085, which
        # write_jsonl leaves raw inside strings.
        lines = p.read_text(encoding="utf-8").removeprefix("\ufeff").split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{flag} {p}: cannot read it ({exc.__class__.__name__}); pass a UTF-8 JSONL of {what}") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):  # JSONDecodeError, over-long integers, deep nesting
            raise InputError(f"{flag} {p}:{n}: not valid JSON; each line must be one JSON object") from None
        if not isinstance(obj, dict):
            raise InputError(f"{flag} {p}:{n}: each line must be one JSON object ({{...}}) of {what}")
        out.append((n, obj))
    if not out:
        raise InputError(f"{flag} {p}: no {what} in it")
    return out


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    """Write one JSON object a line, atomically (UTF-8, non-ASCII kept as is)."""
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
