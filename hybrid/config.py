"""One typed dataclass per workflow is the single source of truth: YAML loads into it, and its
fields are the command's flags.

A field's `metadata` carries its `help` (every field has one), optionally its `flag` (e.g.
`"--group"` for `groups`, `"-k"`), `argument=True` for a positional argument, `parse` (flag
values -> field value, e.g. `NAME=DIR` pairs -> a dict), `default_help` (how to show a None
default) and `metavar` (how --help names the value; else `metavar()` picks DIR, FILE, N, X, a|b...). A field whose type is itself a dataclass (`train: TrainSettings`) is flattened: its
fields are flags of their own and, in YAML, a nested mapping (`train: {learning_rate: ...}`).

    @tune_app.command("generator")
    @cli_errors
    @from_config(GeneratorTuneConfig)
    def tune_generator_cmd(cfg: GeneratorTuneConfig, quiet: bool = typer.Option(False, "-q")): ...

Every flag defaults to None ("not given"), so YAML and then the dataclass default decide, and
the help shows the dataclass's real default. `build_config` rejects unknown keys and wrong
types and collects every problem, each naming its key or flag.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import re
import typing
from pathlib import Path
from typing import Any, List, Literal, Optional, TypeVar, Union

import typer
import yaml

from hybrid.config_fields import field_default, flag_name
from hybrid.inert_options import problems as inert  # options their other settings leave without effect
from core.errors import QUOTE_LIMIT, InputError, lone_surrogate, quoted

T = TypeVar("T")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (Union, getattr(__import__("types"), "UnionType")) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else Union[tuple(rest)]), True
    return tp, False


# --- quoting user input in an error line ---------------------------------------------------------

def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def named(text: Any, limit: int = 200) -> str:
    """A key, flag value or path as an error line names it: as typed when it is plain printable text,
    else escaped like a repr (a newline or an undecodable byte must not break the one line)."""
    text = str(text)
    if not text.isprintable():  # a lone surrogate is not printable either
        text = repr(text)[1:-1]
    return _cut(text, limit)


def _strings(value: Any):
    """Every string inside `value` (keys of mappings included)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def one_line(message: str, limit: int = 2000) -> str:
    """The last guard on an InputError's text: one line, printable on any UTF-8 stderr, bounded."""
    message = message.replace("\r", "\\r").replace("\n", "\\n")
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return message if len(message) <= limit else message[:limit - 300] + " ... " + message[-295:]


# --- YAML / overrides -> dataclass --------------------------------------------------------------

def _type_problem(where: str, tp: Any, value: Any) -> str | None:
    """Why `value` is not a `tp` (None when it is)."""
    for text in _strings(value):  # no path, query or name holds these; argv cannot even pass a NUL
        if lone_surrogate(text):
            return f"{where}: not valid UTF-8 text; pass UTF-8"
        if "\0" in text:
            return f"{where}: contains a NUL character; remove it"
    tp, optional = _strip_optional(tp)
    if value is None:
        return None if optional else f"{where}: expected a value, got null"
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        return None if value in allowed else f"{where}: expected one of {', '.join(map(str, allowed))}, got {quoted(value)}"
    if tp is bool:
        return None if isinstance(value, bool) else f"{where}: expected true/false, got {quoted(value)}"
    if tp is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else \
            f"{where}: expected an integer, got {quoted(value)}"
    if tp is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) or _float_text(value) else \
            f"{where}: expected a number, got {quoted(value)}"
    if tp is str:
        return None if isinstance(value, str) else f"{where}: expected a string, got {quoted(value)}"
    if origin is list:
        return None if isinstance(value, list) and all(isinstance(v, str) for v in value) else \
            f"{where}: expected a list of strings, got {quoted(value)}"
    if origin is dict:
        return None if isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str)
                                                      for k, v in value.items()) else \
            f"{where}: expected a mapping of strings to strings, got {quoted(value)}"
    return None


_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _float_text(value: Any) -> bool:
    """YAML 1.1 reads `1e-4` (no dot) as a string; such scientific notation is a number here."""
    return isinstance(value, str) and bool(_FLOAT.match(value.strip()))


def _known(cls: type) -> list[str]:
    """The keys a mapping for `cls` may hold: its fields, and the training settings it may hoist."""
    names = [f.name for f in dataclasses.fields(cls)]
    train = _hints(cls).get("train")
    return names + ([f.name for f in dataclasses.fields(train)] if dataclasses.is_dataclass(train) else [])


def _refuse_unknown(source: str, mapping: dict, cls: type, prefix: str, problems: list[str]) -> None:
    """One problem naming every unknown key of `mapping`, each with its closest known key."""
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted((k for k in mapping if k not in fields), key=str)
    if not unknown:
        return

    def guess(name) -> str:
        close = difflib.get_close_matches(str(name), _known(cls), n=1, cutoff=0.6)
        return named(f"{prefix}{name}", QUOTE_LIMIT) + (f" (did you mean {prefix}{close[0]}?)" if close else "")

    problems.append(f"{source}: unknown key(s) {', '.join(guess(u) for u in unknown[:8])}"
                    f"{' and more' if len(unknown) > 8 else ''}; known: {', '.join(prefix + n for n in fields)}")


def _hoist(cls: type, mapping: dict, prefix: str, problems: list[str], source: str) -> dict:
    """A shared training setting written at the section's level (`generator: {max_steps: 80}`,
    `generator.distributed=ddp`) is the nested `train:` one: the one rule for files and overrides."""
    nested = {f.name: _hints(cls)[f.name] for f in dataclasses.fields(cls) if f.name == "train"}
    if not nested or not dataclasses.is_dataclass(nested["train"]):
        return mapping
    own, train_keys = {f.name for f in dataclasses.fields(cls)}, {f.name for f in dataclasses.fields(nested["train"])}
    moved = {k: v for k, v in mapping.items() if k not in own and k in train_keys}
    if not moved:
        return mapping
    if mapping.get("train") is not None and not isinstance(mapping["train"], dict):
        return {k: v for k, v in mapping.items() if k not in moved}  # `train: 5` is refused; never silently replaced
    train = dict(mapping.get("train") or {})
    if twice := sorted(k for k in moved if k in train):
        problems.append(f"{source}: {', '.join(prefix + k for k in twice)} given both at {prefix.rstrip('.') or 'the top'}"
                        f"'s level and under {prefix}train; keep one")
    return {**{k: v for k, v in mapping.items() if k not in moved}, "train": {**moved, **train}}


def _section(source: str, mapping: dict, name: str, prefix: str, tp: type, problems: list[str]) -> dict | None:
    """`mapping[name]` for a nested dataclass: a mapping, or None and a problem saying how to set its keys."""
    sub = mapping.get(name, {})
    if isinstance(sub, dict):
        return sub
    keys = ", ".join(x.name for x in dataclasses.fields(tp))
    how = f"set its keys as {prefix}{name}.KEY=VALUE" if source == "override" else f"write it as a mapping of {keys}"
    problems.append(f"{source}: {prefix}{name} is a section, got {quoted(sub)}; {how}")
    return None


def _collect(cls: type, loaded: dict, overrides: dict, prefix: str, problems: list[str],
             keyed: bool = False) -> dict[str, Any]:
    """Constructor kwargs for `cls` from a YAML mapping and overrides (both may nest).

    `keyed`: the overrides are `KEY=VALUE` pairs (named by their dotted key; an explicit null sets
    null) rather than flags (named by the flag; None means "not given")."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = _hints(cls)
    source = "override" if keyed else "--config"
    loaded, overrides = _hoist(cls, loaded, prefix, problems, "--config"), _hoist(cls, overrides, prefix, problems, source)
    _refuse_unknown("--config", loaded, cls, prefix, problems)
    _refuse_unknown("override", overrides, cls, prefix, problems)  # flags are all known: only KEY=VALUE gets here
    values: dict[str, Any] = {}
    for name, f in fields.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            sub = _section("--config", loaded, name, prefix, tp, problems)
            given = _section(source, overrides, name, prefix, tp, problems)
            if sub is None or given is None:  # refused: its own keys' problems would only add noise
                continue
            base = dataclasses.asdict(field_default(f)) if field_default(f) is not dataclasses.MISSING else {}
            kwargs = {**base, **_collect(tp, sub, given, f"{prefix}{name}.", problems, keyed)}
            values[name] = tp(**kwargs)
            continue
        if name in overrides and (overrides[name] is not None or keyed):
            values[name] = overrides[name]
            where = f"{prefix}{name}" if keyed else name.upper() if f.metadata.get("argument") else \
                f.metadata.get("flag", flag_name(name))
        elif name in loaded:
            values[name] = loaded[name]
            where = f"--config key {prefix}{name}"
        else:
            continue
        if problem := _type_problem(where, tp, values[name]):
            problems.append(problem)
        elif _float_text(values[name]) and _strip_optional(tp)[0] is float:
            values[name] = float(values[name])
    missing = [n for n, f in fields.items() if n not in values and field_default(f) is dataclasses.MISSING]
    problems += [f"{fields[n].metadata.get('flag', flag_name(n))} is required" for n in missing]
    return values


# --- reading YAML ----------------------------------------------------------------------------------

MAX_NODES = 100_000  # values in a document with its aliases expanded: a config has hundreds
MAX_DEPTH = 64  # nesting; a config has a handful of levels


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses a document whose aliases expand past MAX_NODES values or nest past
    MAX_DEPTH ("billion laughs": 600 bytes whose value prints as 44 MB), or that refers to itself.
    Checked on the composed nodes, where an alias is still one shared node, before anything is built."""

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            _expanded_size(node, {}, set(), 0)
        return node


class _TooLarge(Exception):
    """A YAML document refused by _BoundedLoader; its message says why."""


def _expanded_size(node, sizes: dict, open_: set, depth: int) -> int:
    """Values under `node` with every alias expanded (memoised per node: the walk itself stays small)."""
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_ or depth > MAX_DEPTH:
        raise _TooLarge("refers to itself or nests too deeply")
    open_.add(id(node))
    children = [c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode) else \
        node.value if isinstance(node, yaml.SequenceNode) else []
    size = 1 + sum(_expanded_size(c, sizes, open_, depth + 1) for c in children)
    open_.discard(id(node))
    if size > MAX_NODES:
        raise _TooLarge(f"expands to over {MAX_NODES} values through its aliases (&name / *name)")
    sizes[id(node)] = size
    return size


def parse_yaml(text: str, where: str, invalid_as_text: bool = False) -> Any:
    """The value of YAML `text` (InputError naming `where` when invalid or too large once expanded).

    `invalid_as_text`: text that is not YAML is itself the value (a KEY=VALUE override's `a: b`)."""
    try:
        return yaml.load(text, Loader=_BoundedLoader)
    except _TooLarge as exc:
        raise InputError(f"{where}: {exc}; write the values out") from None
    except RecursionError:
        raise InputError(f"{where}: nests too deeply; a config has a few levels") from None
    except yaml.YAMLError:
        if invalid_as_text:
            return text
        raise InputError(f"{where}: not valid YAML; fix its syntax") from None


def read_yaml(path: str | Path, flag: str = "--config") -> Any:
    """The value in a YAML file (InputError naming `flag` and the file when unreadable or invalid)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{flag} {named(path)}: cannot read it ({exc.__class__.__name__}); pass a UTF-8 YAML file") \
            from None
    return parse_yaml(text, f"{flag} {named(path)}")


def load_yaml(path: str | Path) -> dict:
    """The mapping in a YAML config file (InputError when unreadable, invalid or not a mapping)."""
    loaded = read_yaml(path)
    if loaded is None:
        return {}
    if not isinstance(loaded, dict) or not all(isinstance(k, str) for k in loaded):
        raise InputError(f"--config {named(path)}: must be a YAML mapping of settings (field: value)")
    return loaded


def build_config(cls: type[T], yaml_path: str | Path | None = None, overrides: dict | None = None,
                 keyed: bool = False) -> T:
    """Make a workflow config from an optional YAML file plus flag values.

    Args:
        cls: the workflow's dataclass (it has a `problems()` method).
        yaml_path: YAML mapping whose keys are the dataclass's fields (nested for nested dataclasses).
        overrides: flag values, nested like the dataclass; None means "not given on the command line".
        keyed: the overrides are `KEY=VALUE` pairs: an unknown key is refused, null is a value.

    Raises:
        InputError: unknown keys, wrong types, missing required values or any invalid value (all listed).
    """
    loaded = load_yaml(yaml_path) if yaml_path is not None else {}
    problems: list[str] = []
    values = _collect(cls, loaded, overrides or {}, "", problems, keyed)
    if problems:
        raise InputError(one_line("; ".join(problems)))
    cfg = cls(**values)
    if problems := cfg.problems() + inert(cfg):  # each workflow's own checks may quote a value: bounded here
        raise InputError(one_line("; ".join(problems)))
    return cfg


# --- dataclass -> command-line flags ---------------------------------------------------------------

# field name -> its flag, for every config a command is generated from (filled by from_config)
_FLAGS: dict[str, str] = {}


def flag_of(field: str) -> str:
    """The flag a command line sets `field` with (`groups` -> `--group`, `k` -> `-k`): how an error
    raised for a library argument names it to a command-line user (core/errors.py `Arg`)."""
    return _FLAGS.get(field) or flag_name(field)


@dataclasses.dataclass
class _Flag:
    path: tuple[str, ...]  # ("train", "learning_rate")
    param: str  # the Python parameter name of the generated command
    annotation: Any
    info: Any  # typer.Option / typer.Argument
    parse: Any = None


# What --help shows as a flag's value. A str field is most often a path, so its name says more than
# its type; a field's own `metavar` metadata wins over both.
_NAMED_METAVARS = {
    "index": "DIR", "adapter": "DIR", "adapter_dir": "DIR", "judge": "DIR", "rerank": "DIR", "merge": "DIR",
    "out": "PATH", "qa": "FILE", "eval_qa": "FILE", "examples": "FILE", "pairs_file": "FILE", "pairs": "FILE",
    "test_pairs": "FILE", "wrong_answers": "FILE", "keys": "FILE", "groups": "GROUP", "adapters": "[NAME=]DIR",
    "select": "NAME", "use": "NAME", "base_model": "MODEL", "teacher": "MODEL", "embedder": "MODEL",
    "base": "MODEL", "shard": "I/N", "host": "HOST", "backend_url": "URL", "target_modules": "NAMES"}
_TYPE_METAVARS = {int: "N", float: "X", str: "TEXT", Path: "PATH"}


def metavar(name: str, tp: Any, meta: Any = None) -> str:
    """A flag's value as --help names it: TEXT, PATH, N, X, DIR, GROUP, or its choices a|b|c."""
    if meta and "metavar" in meta:
        return meta["metavar"]
    base, _ = _strip_optional(tp)
    if typing.get_origin(base) is Literal:
        return "|".join(map(str, typing.get_args(base)))
    return _NAMED_METAVARS.get(name) or _TYPE_METAVARS.get(base, "TEXT")


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, dict)) and not value:
        return "none"
    return str(value)


def flags_of(cls: type, path: tuple[str, ...] = (), defaults: Any = None) -> list[_Flag]:
    """One flag per field of `cls`, nested dataclasses flattened (their defaults: the parent's instance)."""
    out = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp, meta = hints[f.name], f.metadata
        default = field_default(f) if defaults is None else getattr(defaults, f.name)
        if dataclasses.is_dataclass(tp):
            out += flags_of(tp, path + (f.name,), default)
            continue
        if "help" not in meta:
            raise TypeError(f"{cls.__name__}.{f.name} has no help in its metadata")
        required = default is dataclasses.MISSING
        shown = meta.get("default_help") or ("" if required or default is None else _show(default))
        # an argument's [required] is Typer's own; an option is optional to Typer (it may come from
        # --config), so its [required] is ours
        help_text = meta["help"] + (f" [default: {shown}]" if shown else
                                    " [required]" if required and not meta.get("argument") else "")
        base, _ = _strip_optional(tp)
        decls = [meta["flag"]] if "flag" in meta else [flag_name(f.name)]
        if meta.get("argument"):
            annotation, info = base, typer.Argument(..., metavar=f.name.upper(), help=help_text, show_default=False)
        elif base is bool:
            annotation = Optional[bool]
            info = typer.Option(None, f"{decls[0]}/--no-{decls[0][2:]}", help=help_text, show_default=False)
        else:
            annotation = Optional[List[str]] if typing.get_origin(base) in (list, dict) else Optional[base]
            # a required field may come from --config too: build_config names it when neither gives it
            info = typer.Option(None, *decls, help=help_text, show_default=False,
                                metavar=metavar(f.name, base, meta))
        out.append(_Flag(path + (f.name,), "_".join(path + (f.name,)), annotation, info, meta.get("parse")))
    return out


def from_config(cls: type):
    """Decorator: a command `fn(cfg, **own)` whose options are `cls`'s fields plus `--config`.

    `fn`'s own parameters (e.g. `--quiet`, `--json`, a positional CORPUS_DIR) are kept as they are.
    """
    specs = flags_of(cls)
    _FLAGS.update({s.path[-1]: s.info.param_decls[0].split("/")[0] for s in specs
                   if isinstance(s.info, typer.models.OptionInfo)})

    def decorate(fn):
        own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name != "cfg"]
        hints = typing.get_type_hints(fn)
        config_option = typer.Option(None, "--config", metavar="YAML",
                                     help=f"YAML file with any {cls.__name__} field (flags win).")
        config_param = inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                                         default=config_option)
        generated = [inspect.Parameter(s.param, inspect.Parameter.KEYWORD_ONLY, default=s.info,
                                       annotation=s.annotation) for s in specs]
        positional = [p for p in generated if isinstance(p.default, typer.models.ArgumentInfo)]
        params = ([p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + positional +
                  [p for p in generated if p not in positional] + [config_param])

        @functools.wraps(fn)
        def command(**kwargs):
            config = kwargs.pop("config")
            own_values = {p.name: kwargs.pop(p.name) for p in own}
            overrides: dict = {}
            for s in specs:
                value = kwargs.pop(s.param)
                if value is not None and s.parse is not None:
                    value = s.parse(value)
                elif isinstance(value, (list, tuple)):
                    value = list(value) or None  # an empty repeatable flag = not given
                node = overrides
                for key in s.path[:-1]:
                    node = node.setdefault(key, {})
                node[s.path[-1]] = value
            return fn(build_config(cls, config, overrides), **own_values)

        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = {**{p.name: hints.get(p.name, p.annotation) for p in own},
                                   **{p.name: p.annotation for p in generated}, "config": Optional[Path]}
        del command.__wrapped__  # typer must read the generated signature, not fn's
        return command

    return decorate
