"""What a config dataclass's field is called on the command line and what it defaults to: read by
the flag generator (hybrid/config.py) and by the check for options that cannot take effect
(hybrid/inert_options.py), which config.py runs, so neither imports the other for these.

    >>> flag_name("max_new_tokens")
    '--max-new-tokens'
"""

from __future__ import annotations

import dataclasses
from typing import Any


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def field_default(f: dataclasses.Field) -> Any:
    """The field's default (a fresh one from its factory), or dataclasses.MISSING when it has none."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING
