"""The one error type that user-facing code raises for bad input.

The CLI turns it into a single line on stderr and exit code 2; library callers
catch it like any exception. The message always names the file, line, field or
flag at fault and says how to fix it.
"""

from __future__ import annotations


class InputError(Exception):
    """Bad input from the user (file, field or flag), with the fix in the message."""


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
