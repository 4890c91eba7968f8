"""The one error type that user-facing code raises for bad input.

The CLI turns it into a single line on stderr and exit code 2; library callers
catch it like any exception. The message always names the file, line, field or
flag at fault and says how to fix it.
"""

from __future__ import annotations


class InputError(Exception):
    """Bad input from the user (file, field or flag), with the fix in the message."""
