"""YAML -> workflow dataclass, with unknown keys rejected and every problem collected."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

import yaml

from retrieval.errors import InputError

T = TypeVar("T")


def build_config(cls: type[T], yaml_path: str | Path | None = None, **overrides: Any) -> T:
    """Make a workflow config from an optional YAML file plus CLI flags.

    Args:
        cls: the workflow's dataclass (it has a `problems()` method).
        yaml_path: YAML mapping whose keys are the dataclass's fields.
        overrides: flag values; None means "not given on the command line".

    Returns:
        The validated config.

    Raises:
        InputError: unknown YAML keys, wrong types, or any invalid value (all listed).
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    problems: list[str] = []
    if yaml_path is not None:
        path = Path(yaml_path)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"--config {path}: cannot read it ({exc.__class__.__name__}); pass a YAML file") from None
        except yaml.YAMLError:
            raise InputError(f"--config {path}: not valid YAML; fix its syntax") from None
        if not isinstance(loaded, dict):
            raise InputError(f"--config {path}: must be a YAML mapping of settings")
        unknown = sorted(set(loaded) - set(fields))
        if unknown:
            problems.append(f"--config {path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(fields)}")
        values.update({k: v for k, v in loaded.items() if k in fields})
    values.update({k: v for k, v in overrides.items() if v is not None})
    missing = [n for n, f in fields.items() if n not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    problems += [f"--{n.replace('_', '-')} is required" for n in missing]
    for name, value in values.items():
        default = fields[name].default
        if isinstance(default, bool) and not isinstance(value, bool):
            problems.append(f"{name}: expected true/false, got {value!r}")
        elif isinstance(default, (int, float)) and not isinstance(default, bool) and (
                isinstance(value, bool) or not isinstance(value, (int, float))):
            problems.append(f"{name}: expected a number, got {value!r}")
    if problems:
        raise InputError("; ".join(problems))
    cfg = cls(**values)
    if problems := cfg.problems():
        raise InputError("; ".join(problems))
    return cfg


def default_of(cls: type, name: str) -> Any:
    """A field's default, for `--help` texts that show it while the flag itself defaults to None."""
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)
