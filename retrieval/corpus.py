"""Read a corpus directory into documents.

A corpus is a directory of `.md`/`.markdown`/`.txt` files (optional YAML front
matter with `title` and `groups`), `.jsonl` files with one document a line
(`{"id", "title"?, "text", "groups"?}`) and, when pypdf is installed, `.pdf`
files. A file document's id is its path relative to the corpus directory,
without the suffix, with `/` separators (`policies/travel`).

Reading is safe by construction: a file either yields documents whose groups are
exactly what it declares, or it is refused (skipped with a warning, or an
InputError under `on_bad_file="fail"`); nothing ambiguous is ever read as public.
Refused, among others: front matter that opens with `---` and never closes, a
first line that only looks like `---` (`—--`, a zero-width joiner before it), an
empty or malformed `groups`, any key hybrid does not read (`author`, `Groups`,
`groups` with a zero-width space, a Cyrillic `о` or full-width letters, `1:`),
group names with invisible or non-NFKC characters, duplicate keys, invalid
YAML/JSON, UTF-16/UTF-32 or NUL-bearing text, documents over the size limit.
Symbolic links that lead outside the corpus directory are
skipped with a warning; links within it are followed.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import os
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import yaml

from core.errors import InputError, quoted

log = logging.getLogger(__name__)

TEXT_SUFFIXES = {".md", ".markdown", ".txt"}
SUFFIXES = TEXT_SUFFIXES | {".jsonl", ".pdf"}
DEFAULT_MAX_DOCUMENT_MB = 64.0
_HEADING = re.compile(r"^#\s+(.+?)\s*#*\s*$", re.MULTILINE)
# Characters that make a line look blank without being whitespace to str.strip().
_INVISIBLE = "\ufeff\u200b\u2060"
_LEADING_BLANK_LINES = re.compile(rf"(?:(?:[^\S\n]|[{_INVISIBLE}])*\n)*")
_CLOSER = re.compile(r"^---[ \t]*$", re.MULTILINE)
# Dashes that render like '-': a first line of them is a look-alike front matter opener.
_DASHES = str.maketrans(dict.fromkeys("\u2010\u2011\u2012\u2013\u2014\u2015\u2212\u2500\u2501\u2e3a\u2e3b\ufe58", "-"))
_FRONT_MATTER_KEYS = ("title", "groups")
_JSONL_FIELDS = ("id", "title", "text", "groups")


@dataclass(frozen=True)
class Document:
    """One document of the corpus.

    Attributes:
        id: stable document id (relative path without suffix, or the JSONL `id`).
        title: document title (front matter, first `#` heading, or the file stem).
        text: body text, front matter removed.
        source: where it came from (`path` or `path:line`).
        groups: access groups; empty means public.
    """

    id: str
    title: str
    text: str
    source: str
    groups: tuple[str, ...] = ()

    @property
    def content_hash(self) -> str:
        """sha256 over everything that changes the document's chunks and their visibility."""
        payload = json.dumps([self.title, self.text, sorted(self.groups)], ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()


@dataclass
class Corpus:
    """Documents read from a directory plus what was skipped and why."""

    documents: list[Document]
    skipped: list[tuple[str, str]] = field(default_factory=list)


class _Refused(Exception):
    """A file or JSONL line that cannot be read safely: `load_corpus` skips it or fails on it."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}")
        self.where, self.reason = where, reason

    @classmethod
    def of(cls, exc: InputError, where: str) -> "_Refused":
        """An InputError 'WHERE[:LINE]: reason' as the refusal of WHERE[:LINE]."""
        msg = str(exc)
        m = re.match(rf"{re.escape(where)}(:\d+)?: ", msg)
        return cls(where + (m.group(1) or ""), msg[m.end():]) if m else cls(where, msg)


# Letters that render like Latin ones (after casefold), so `grоups` with a Cyrillic о is named as a
# look-alike of `groups` in the error. Only the message depends on this map: every key that is not
# exactly a known one is refused whether or not it is listed here.
_CONFUSABLES = str.maketrans({
    "а": "a", "в": "b", "с": "c", "ԁ": "d", "е": "e", "һ": "h", "н": "h", "і": "i", "ј": "j", "к": "k",
    "ӏ": "l", "м": "m", "о": "o", "р": "p", "ԛ": "q", "ѕ": "s", "т": "t", "у": "y", "х": "x", "ԝ": "w",
    "ԍ": "g", "ɡ": "g", "г": "r", "ı": "i", "ο": "o", "α": "a", "β": "b", "ε": "e", "η": "n", "ι": "i", "κ": "k",
    "μ": "u", "ν": "v", "ρ": "p", "τ": "t", "υ": "u", "χ": "x", "γ": "y", "ζ": "z", "ω": "w",
})


def _visible(text: str) -> str:
    """What a reader sees: NFKC, without format characters (zero-width space, BOM, bidi marks)."""
    return "".join(c for c in unicodedata.normalize("NFKC", text) if unicodedata.category(c) != "Cf")


def _fold(key: str) -> str:
    """The key's skeleton: case, width, separators, invisible and look-alike letters folded away."""
    folded = unicodedata.normalize("NFKC", _visible(key).casefold())
    return re.sub(r"[\s_-]+", "", folded).translate(_CONFUSABLES)


def _check_keys(mapping: dict, known: tuple[str, ...], where: str, what: str) -> None:
    """Refuse every key that is not exactly a known one.

    An unread key is never ignored: `groups` spelt with a zero-width space, a Cyrillic letter or
    full-width letters would otherwise be an unknown key, and the document public. The fold only
    picks the message: a near miss is told how to spell the key, anything else to delete it."""
    for key in mapping:
        if isinstance(key, str) and key in known:
            continue
        canon = _near_miss(key, known) if isinstance(key, str) else None
        if canon is None:
            shown = quoted(key) if isinstance(key, str) else f"{quoted(key)} (type {type(key).__name__}, not a name)"
            raise InputError(f"{where}: {what} {shown} is not one hybrid reads (it reads {', '.join(known)}); "
                             f"delete the key")
        why = "keys are lower-case" if key.isascii() else \
            "it has look-alike, full-width or invisible characters; type it in plain ASCII"
        raise InputError(f"{where}: {what} {quoted(key)} is not {canon!r}; spell it '{canon}' ({why})")


def _near_miss(key: str, known: tuple[str, ...]) -> str | None:
    """The known key that `key` folds to (or its singular: `group`), else None."""
    folded = _fold(key)
    return next((canon for canon in known if folded in (canon, canon.rstrip("s"))), None)


def _groups(mapping: dict, where: str, example: str) -> tuple[str, ...]:
    """The document's groups; () only when the key is absent (an explicit empty value is refused)."""
    if "groups" not in mapping:
        return ()
    value = mapping["groups"]
    if isinstance(value, str):
        if "," in value:
            raise InputError(f"{where}: 'groups' is the single string {quoted(value)}; write a list, e.g. {example}")
        value = [value]
    if value is None or value == [] or (isinstance(value, list) and all(isinstance(g, str) and not g.strip()
                                                                          for g in value)):
        raise InputError(f"{where}: 'groups' is empty; list the access groups, e.g. {example}, or remove the key "
                         f"to make the document public")
    if not isinstance(value, list) or not all(isinstance(g, str) and g.strip() for g in value):
        raise InputError(f"{where}: 'groups' must be a list of non-empty strings, e.g. {example}")
    names = {g.strip() for g in value}
    for name in sorted(names):
        _check_group_name(name, where)
    return tuple(sorted(names))


# Characters no one types into a group name on purpose; a caller's `--group` can never match them.
_HIDDEN_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}


def _check_group_name(name: str, where: str) -> None:
    """Refuse a name that cannot be what the author meant: hidden characters, or not in NFKC form.

    Such a name matches no caller's group, so the document would silently be visible to no one
    (fail-closed, never a leak); a clear refusal says which name to fix."""
    if any(unicodedata.category(c) in _HIDDEN_CATEGORIES for c in name):
        raise InputError(f"{where}: group name {quoted(name)} has invisible or control characters; "
                         f"type the name in plain text")
    plain = unicodedata.normalize("NFKC", name)
    if plain != name:
        raise InputError(f"{where}: group name {quoted(name)} is not in Unicode NFKC form (full-width, styled, "
                         f"ligature or decomposed letters); write it as {quoted(plain)}")


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML keeps the last: `groups: [hr]` then `groups:` is public)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            counts = Counter(k.value for k, _ in node.value if isinstance(k, yaml.ScalarNode))
            dup = sorted(str(k) for k, n in counts.items() if n > 1)
            if dup:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {quoted(dup[0])}",
                                                        node.start_mark)
        return super().construct_mapping(node, deep)


def _normalise(raw: str) -> str:
    """Text with a leading BOM removed and CRLF/CR line ends turned into LF (one line model for all checks)."""
    return raw.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


def parse_front_matter(raw: str, where: str) -> tuple[dict, str]:
    """Split YAML front matter from a Markdown/text body.

    Front matter opens when the first non-blank line is `---` and closes at the next line that
    is exactly `---` (at the start of the line). A BOM, CRLF line ends and leading blank lines
    are allowed.

    Args:
        raw: the whole file.
        where: file name for error messages.

    Returns:
        (front-matter mapping, body). The mapping is empty when there is none.

    Raises:
        InputError: an opening `---` that never closes (or a first line of dashes that is not
            exactly `---`, a look-alike of it, or `+++` TOML front matter), invalid YAML, duplicate
            keys or any key but `title` and `groups`, a non-mapping, a bad `title`.
    """
    text = _normalise(raw)
    start = _LEADING_BLANK_LINES.match(text).end()
    nl = text.find("\n", start)
    first = text[start: nl if nl >= 0 else len(text)]
    head = first.strip().strip(_INVISIBLE).strip()
    lineno = text.count("\n", 0, start) + 1
    if head == "+++":
        raise InputError(f"{where}:{lineno}: TOML front matter ('+++') is not supported; write it as YAML "
                         f"between '---' lines")
    if not head.startswith("---"):
        if _visible(head).translate(_DASHES).lstrip().startswith("---"):
            # `—--` or `---` after a zero-width joiner: meant as front matter, and its groups would be body text.
            raise InputError(f"{where}:{lineno}: the first line {quoted(head[:20])} looks like '---' but is not; "
                             f"front matter opens with a line of exactly three ASCII hyphens '---' (remove the "
                             f"line if it is a rule)")
        return {}, text
    if head != "---":
        raise InputError(f"{where}:{lineno}: the first line {head[:20]!r} starts with '---' but is not a front "
                         f"matter opener; front matter opens with a line that is exactly '---' (remove the line "
                         f"if it is a rule)")
    close = _CLOSER.search(text, nl + 1) if nl >= 0 else None
    if close is None:
        raise InputError(f"{where}:{lineno}: front matter opened with '---' never closes; add a line '---' "
                         f"after it (the file is not read as public text)")
    block = text[nl + 1: close.start()]
    try:
        meta = yaml.load(block, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass
    except (yaml.YAMLError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        # ValueError etc.: PyYAML builds dates and numbers with Python's constructors (2023-02-30).
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        at = f":{lineno + 1 + mark.line}" if mark is not None else ""
        raise InputError(f"{where}{at}: front matter is not valid YAML ({str(exc).splitlines()[0][:80]}); "
                         f"fix the block between the '---' lines") from None
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise InputError(f"{where}: front matter must be a YAML mapping (title: ..., groups: [...])")
    _check_keys(meta, _FRONT_MATTER_KEYS, where, "front matter key")
    if meta.get("title") is not None and not isinstance(meta["title"], (str, int, float)):
        raise InputError(f"{where}: front matter 'title' must be a string")
    body_at = close.end() + 1
    return meta, text[body_at:]


def _decode(data: bytes, where: str) -> str:
    """UTF-8 text (a BOM is dropped); anything else is refused, never guessed."""
    if data.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE, codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise _Refused(where, "UTF-16/UTF-32 text; save it as UTF-8")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise _Refused(where, "not UTF-8 text") from None
    if "\x00" in text:
        # UTF-16 without a BOM decodes as "UTF-8" with NULs, and its front matter would go unseen.
        raise _Refused(where, "contains NUL bytes (binary, or UTF-16 without a byte-order mark); save it as UTF-8")
    return text


def _too_big(nbytes: int, limit_mb: float, where: str) -> None:
    if nbytes > limit_mb * 1e6:
        raise _Refused(where, f"document is {nbytes / 1e6:.3g} MB, over --max-document-mb {limit_mb:g}; split it "
                              f"or raise --max-document-mb (max_document_mb)")


def _read_text_file(path: Path, real: Path, doc_id: str, limit_mb: float) -> Document:
    where = str(path)
    _too_big(real.stat().st_size, limit_mb, where)
    meta, body = parse_front_matter(_decode(real.read_bytes(), where), where)
    title = meta.get("title")
    if title is None:
        heading = _HEADING.search(body)
        title = heading.group(1) if heading else path.stem
    return Document(id=doc_id, title=str(title).strip(), text=body.strip(), source=where,
                    groups=_groups(meta, where, "groups: [hr, finance]"))


def _read_pdf(path: Path, real: Path, doc_id: str, limit_mb: float) -> Document:
    try:
        import pypdf
    except ImportError:
        raise InputError(f"{path}: reading PDF needs pypdf; install it with 'pip install pypdf' or remove the file") from None
    try:
        reader = pypdf.PdfReader(str(real))
        text = "\n\n".join((page.extract_text() or "") for page in reader.pages)
        title = reader.metadata.title if reader.metadata and reader.metadata.title else path.stem
    except Exception as exc:  # noqa: BLE001 - a third-party parser on untrusted bytes fails in many ways
        raise _Refused(str(path), f"unreadable PDF ({exc.__class__.__name__})") from None
    _too_big(len(text.encode("utf-8")), limit_mb, str(path))
    return Document(id=doc_id, title=str(title), text=text.strip(), source=str(path))


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = next(k for k, n in Counter(keys).items() if n > 1)
        raise ValueError(f"duplicate key {quoted(dup)}")
    return dict(pairs)


def _jsonl_document(raw: bytes, where: str, limit_mb: float) -> Document | None:
    """One JSONL line as a Document (None for a blank line); _Refused/InputError when it is not one."""
    _too_big(len(raw), limit_mb, where)
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _Refused(where, "not UTF-8 text") from None
    if not line.strip():
        return None
    try:
        row = json.loads(line, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as exc:
        raise InputError(f"{where}: not valid JSON ({exc.msg}); each line must be one JSON object") from None
    except (ValueError, RecursionError) as exc:  # duplicate keys, over-long numbers, deep nesting
        raise InputError(f"{where}: not valid JSON ({str(exc)[:80] or 'too deeply nested'}); each line must be "
                         f"one JSON object") from None
    if not isinstance(row, dict):
        raise InputError(f"{where}: each line must be a JSON object with 'id' and 'text'")
    _check_keys(row, _JSONL_FIELDS, where, "field")
    doc_id, text, title = row.get("id"), row.get("text"), row.get("title")
    if not isinstance(doc_id, str) or not doc_id.strip():
        raise InputError(f"{where}: field 'id' must be a non-empty string")
    if not isinstance(text, str):
        raise InputError(f"{where}: field 'text' must be a string")
    if title is not None and not isinstance(title, str):
        raise InputError(f"{where}: field 'title' must be a string")
    return Document(id=doc_id.strip(), title=(title or "").strip(), text=text.strip(), source=where,
                    groups=_groups(row, where, '"groups": ["hr", "finance"]'))


def _read_jsonl(path: Path, real: Path, limit_mb: float) -> Iterator[Document | _Refused]:
    """The documents of a JSONL file; a bad line is yielded as _Refused (the other lines still count)."""
    with real.open("rb") as fh:  # bytes: lines end at b"\n" only (U+2028 may sit inside a JSON string)
        for lineno, raw in enumerate(fh, 1):
            where = f"{path}:{lineno}"
            if lineno == 1:
                if raw.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE, codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
                    yield _Refused(str(path), "UTF-16/UTF-32 text; save it as UTF-8")
                    return
                raw = raw.removeprefix(codecs.BOM_UTF8)
            try:
                doc = _jsonl_document(raw, where, limit_mb)
            except _Refused as exc:
                yield exc
                continue
            except InputError as exc:
                yield _Refused.of(exc, where)
                continue
            if doc is not None:
                yield doc


def _walk(root: Path) -> tuple[list[tuple[Path, Path]], list[tuple[str, str]]]:
    """(path, real path) of the supported files under root, and the links skipped for leaving it.

    Hidden entries are ignored. Symbolic links (to files or directories) are followed only when
    their target lies inside root: a link to /etc/... would otherwise index it as public text."""
    real_root = root.resolve()
    files: list[tuple[Path, Path]] = []
    skipped: list[tuple[str, str]] = []
    stack: list[tuple[Path, frozenset]] = [(root, frozenset({real_root}))]
    while stack:
        folder, ancestors = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            skipped.append((str(folder), f"unreadable directory ({exc.strerror})"))
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            try:
                real = path.resolve(strict=entry.is_symlink())
            except (OSError, RuntimeError):  # broken link or a loop of links
                if path.suffix.lower() in SUFFIXES:
                    skipped.append((str(path), "broken symbolic link"))
                continue
            if entry.is_symlink() and not real.is_relative_to(real_root):
                skipped.append((str(path), f"symbolic link to {real}, outside the corpus directory"))
                continue
            if real.is_dir():
                if real not in ancestors:  # a link back up would loop forever
                    stack.append((path, ancestors | {real}))
            elif real.is_file() and path.suffix.lower() in SUFFIXES:
                files.append((path, real))
    files.sort()
    return files, skipped


def load_corpus(corpus_dir: str | Path, on_bad_file: Literal["skip", "fail"] = "skip",
                max_document_mb: float = DEFAULT_MAX_DOCUMENT_MB) -> Corpus:
    """Read every supported file under `corpus_dir`.

    Args:
        corpus_dir: directory to read (recursively; hidden files are ignored, symbolic links
            leading outside it are skipped with a warning).
        on_bad_file: what to do with a file (or JSONL line) that cannot be read safely:
            unreadable, not UTF-8, malformed front matter/JSON/groups, a key or field hybrid does
            not read, too big, or an empty document: `skip` (warn and count it; never index it)
            or `fail` (raise InputError).
        max_document_mb: largest document (file, or JSONL line) read, in MB.

    Returns:
        Corpus with documents sorted by id and the skipped files with reasons.

    Raises:
        InputError: missing/empty directory, duplicate ids, or any bad file under `fail`.
    """
    root = Path(corpus_dir)
    if not root.exists():
        raise InputError(f"corpus directory {root} does not exist; pass a directory of .md/.txt/.jsonl files")
    if not root.is_dir():
        raise InputError(f"{root} is not a directory; pass a directory of .md/.txt/.jsonl files")
    files, skipped = _walk(root)
    for where, reason in skipped:
        log.warning("skipping %s: %s", where, reason)
    if not files:
        raise InputError(f"corpus directory {root} holds no .md, .txt, .jsonl or .pdf files; add documents to it")

    docs: list[Document] = []

    def bad(where: str, reason: str) -> None:
        if on_bad_file == "fail":
            raise InputError(f"{where}: {reason}; fix or remove it, or pass --on-bad-file skip to skip such files")
        log.warning("skipping %s: %s", where, reason)
        skipped.append((where, reason))

    for path, real in files:
        suffix = path.suffix.lower()
        doc_id = path.relative_to(root).with_suffix("").as_posix()
        try:
            if suffix == ".jsonl":
                found = list(_read_jsonl(path, real, max_document_mb))
            elif suffix == ".pdf":
                found = [_read_pdf(path, real, doc_id, max_document_mb)]
            else:
                found = [_read_text_file(path, real, doc_id, max_document_mb)]
        except _Refused as exc:
            found = [exc]
        except InputError as exc:
            found = [_Refused.of(exc, str(path))]
        except OSError as exc:
            found = [_Refused(str(path), f"unreadable ({exc.strerror})")]
        for item in found:
            if isinstance(item, _Refused):
                bad(item.where, item.reason)
            elif not item.text:
                bad(item.source, "empty document")
            else:
                docs.append(item)

    seen: dict[str, str] = {}
    for doc in docs:
        if doc.id in seen:
            raise InputError(f"duplicate document id {quoted(doc.id)} in {seen[doc.id]} and {doc.source}; ids must be unique")
        seen[doc.id] = doc.source
    if not docs:
        raise InputError(f"corpus directory {root} holds no non-empty documents")
    docs.sort(key=lambda d: d.id)
    return Corpus(documents=docs, skipped=skipped)
