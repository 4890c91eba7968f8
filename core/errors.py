"""The one error type that user-facing code raises for bad input.

The CLI turns it into a single line on stderr and exit code 2; library callers
catch it like any exception. The message always names the file, line, field or
flag at fault and says how to fix it.

A setting the caller passed is named with `Arg`, so one message reads right to both
readers: `Retriever.search(..., k=0)` raises "k=0: must be a positive integer", and
`hybrid search -k 0` prints "-k 0: must be a positive integer". The command line says
which flag sets which argument (`speaking_flags`, from hybrid/cli.py); the library
default is the Python spelling.

    raise InputError(Arg("k", k), ": must be a positive integer")
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable

_FLAG_OF: contextvars.ContextVar[Callable[[str], str] | None] = contextvars.ContextVar("flag_of", default=None)


@contextlib.contextmanager
def speaking_flags(flag_of: Callable[[str], str]):
    """Within this block errors name settings as flags: `flag_of(field)` -> "--group"."""
    token = _FLAG_OF.set(flag_of)
    try:
        yield
    finally:
        _FLAG_OF.reset(token)


class Arg:
    """A setting an error names, spelled when the message is read: `groups=['hr']` to a library
    caller, `--group hr` on the command line.

    Args:
        name: the Python argument (`groups`, `adapter`, `index_dir`).
        value: what was passed, if the message shows it (a list or dict shows as repeated flags).
        field: the config field that sets it on the command line, where it differs from `name`
            (`index_dir` is the field `index`, flag `--index`).
    """

    def __init__(self, name: str, value: Any = ..., field: str | None = None):  # ...: no value shown
        self.name, self.value, self.field = name, value, field

    def __str__(self) -> str:
        flag_of = _FLAG_OF.get()
        if flag_of is None:
            return f"{self.name}=" + ("" if self.value is ... else _python(self.value))
        flag = flag_of(self.field or self.name)
        if self.value is ...:
            return flag
        values = [f"{k}={v}" for k, v in self.value.items()] if isinstance(self.value, dict) else \
            self.value if isinstance(self.value, (list, tuple)) else [self.value]
        return " ".join(f"{flag} {_typed(v)}" for v in values[:8]) + (" ..." if len(values) > 8 else "")


_PATH_LIMIT = 300  # a value an error shows whole: a path is often longer than QUOTE_LIMIT


def _python(value: Any) -> str:
    """A value as Python code would pass it (a list or dict item by item, each bounded)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{quoted(k)}: {_python(v)}" for k, v in list(value.items())[:8]) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_python(v) for v in value[:8]) + (", ...]" if len(value) > 8 else "]")
    return quoted(value, _PATH_LIMIT)


def _typed(value: Any) -> str:
    """A value as the user typed it on the command line, escaped only when it cannot print."""
    text = str(value)
    return text if text.isprintable() and len(text) <= _PATH_LIMIT else quoted(text, _PATH_LIMIT)


class InputError(Exception):
    """Bad input from the user (file, field or flag), with the fix in the message.

    The message is the parts joined when it is read: text, and `Arg`s naming settings."""

    def __str__(self) -> str:
        return "".join(map(str, self.args))


# --- quoting a user's value in an error line: one rule for every floor ---------------------------

QUOTE_LIMIT = 80  # a hostile key or value can be megabytes; enough to recognise it, never a flood


def _bounded_repr():
    import reprlib

    r = reprlib.Repr()
    r.maxstring = r.maxother = QUOTE_LIMIT
    r.maxlist = r.maxtuple = r.maxdict = r.maxset = 4
    r.maxlevel = 2
    return r


_REPR = _bounded_repr()


def quoted(value, limit: int = QUOTE_LIMIT) -> str:
    """`value` as an error line quotes it: a repr escaped to ASCII (a zero-width space shows as
    \\u200b, a lone surrogate as \\ud800, a newline as \\n), cut to `limit` characters. Never builds
    the whole repr of a large value.

        >>> quoted("groups\\u200b"), quoted("x" * 500, limit=12)
        ("'groups\\\\u200b'", "'xxxxxxxx...")
    """
    text = ascii(value[:limit + 1]) if isinstance(value, (str, bytes)) else \
        _REPR.repr(value).encode("ascii", "backslashreplace").decode("ascii")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def lone_surrogate(text: str) -> bool:
    """Whether `text` holds a lone surrogate: argv bytes that are not UTF-8 (surrogateescape), or a
    JSON/YAML "\\ud800" escape. No tokenizer, index, file system or log can encode one."""
    return any("\ud800" <= c <= "\udfff" for c in text)
