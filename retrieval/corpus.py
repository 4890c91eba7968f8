"""Read a corpus directory into documents.

A corpus is a directory of `.md`/`.markdown`/`.txt` files (optional YAML front
matter with `title` and `groups`), `.jsonl` files with one document a line
(`{"id", "title"?, "text", "groups"?}`) and, when pypdf is installed, `.pdf`
files. A file document's id is its path relative to the corpus directory,
without the suffix, with `/` separators (`policies/travel`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from retrieval.errors import InputError

log = logging.getLogger(__name__)

TEXT_SUFFIXES = {".md", ".markdown", ".txt"}
SUFFIXES = TEXT_SUFFIXES | {".jsonl", ".pdf"}
_FRONT_MATTER = re.compile(r"\A---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|\Z)", re.DOTALL)
_HEADING = re.compile(r"^#\s+(.+?)\s*#*\s*$", re.MULTILINE)


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


def _groups(value: object, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(g, str) and g.strip() for g in value):
        raise InputError(f"{where}: 'groups' must be a list of non-empty strings, e.g. groups: [hr, finance]")
    return tuple(sorted({g.strip() for g in value}))


def parse_front_matter(raw: str, where: str) -> tuple[dict, str]:
    """Split YAML front matter from a Markdown/text body.

    Args:
        raw: the whole file.
        where: file name for error messages.

    Returns:
        (front-matter mapping, body). The mapping is empty when there is none.
    """
    match = _FRONT_MATTER.match(raw)
    if not match:
        return {}, raw
    try:
        meta = yaml.safe_load(match.group(1))
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        at = f":{line + 2}" if line is not None else ""
        raise InputError(f"{where}{at}: front matter is not valid YAML; fix the block between the '---' lines") from None
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise InputError(f"{where}: front matter must be a YAML mapping (title: ..., groups: [...])")
    if "title" in meta and not isinstance(meta["title"], (str, int, float)):
        raise InputError(f"{where}: front matter 'title' must be a string")
    return meta, raw[match.end():]


def _read_text_file(path: Path, root: Path) -> Document:
    where = str(path)
    raw = path.read_text(encoding="utf-8")
    meta, body = parse_front_matter(raw, where)
    doc_id = path.relative_to(root).with_suffix("").as_posix()
    title = meta.get("title")
    if title is None:
        heading = _HEADING.search(body)
        title = heading.group(1) if heading else path.stem
    return Document(id=doc_id, title=str(title).strip(), text=body.strip(), source=where,
                    groups=_groups(meta.get("groups"), where))


def _read_pdf(path: Path, root: Path) -> Document:
    try:
        import pypdf
    except ImportError:
        raise InputError(f"{path}: reading PDF needs pypdf; install it with 'pip install pypdf' or remove the file") from None
    reader = pypdf.PdfReader(str(path))
    text = "\n\n".join((page.extract_text() or "") for page in reader.pages)
    title = (reader.metadata.title if reader.metadata and reader.metadata.title else path.stem)
    return Document(id=path.relative_to(root).with_suffix("").as_posix(), title=str(title), text=text.strip(),
                    source=str(path))


def _read_jsonl(path: Path) -> list[Document]:
    docs = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{where}: not valid JSON ({exc.msg}); each line must be one JSON object") from None
            if not isinstance(row, dict):
                raise InputError(f"{where}: each line must be a JSON object with 'id' and 'text'")
            doc_id, text = row.get("id"), row.get("text")
            if not isinstance(doc_id, str) or not doc_id.strip():
                raise InputError(f"{where}: field 'id' must be a non-empty string")
            if not isinstance(text, str):
                raise InputError(f"{where}: field 'text' must be a string")
            title = row.get("title") or ""
            if not isinstance(title, str):
                raise InputError(f"{where}: field 'title' must be a string")
            docs.append(Document(id=doc_id.strip(), title=title.strip(), text=text.strip(), source=where,
                                 groups=_groups(row.get("groups"), where)))
    return docs


def load_corpus(corpus_dir: str | Path, on_bad_file: Literal["skip", "fail"] = "skip") -> Corpus:
    """Read every supported file under `corpus_dir`.

    Args:
        corpus_dir: directory to read (recursively; hidden files are ignored).
        on_bad_file: what to do with an unreadable or non-UTF-8 file or an empty
            document: `skip` (warn and count it) or `fail` (raise InputError).

    Returns:
        Corpus with documents sorted by id and the skipped files with reasons.

    Raises:
        InputError: missing/empty directory, duplicate ids, malformed JSONL or front matter.
    """
    root = Path(corpus_dir)
    if not root.exists():
        raise InputError(f"corpus directory {root} does not exist; pass a directory of .md/.txt/.jsonl files")
    if not root.is_dir():
        raise InputError(f"{root} is not a directory; pass a directory of .md/.txt/.jsonl files")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise InputError(f"corpus directory {root} holds no .md, .txt, .jsonl or .pdf files; add documents to it")

    docs: list[Document] = []
    skipped: list[tuple[str, str]] = []

    def bad(where: str, reason: str) -> None:
        if on_bad_file == "fail":
            raise InputError(f"{where}: {reason}; fix or remove it, or pass --on-bad-file skip to skip such files")
        log.warning("skipping %s: %s", where, reason)
        skipped.append((where, reason))

    for path in files:
        suffix = path.suffix.lower()
        try:
            if suffix == ".jsonl":
                found = _read_jsonl(path)
            elif suffix == ".pdf":
                found = [_read_pdf(path, root)]
            else:
                found = [_read_text_file(path, root)]
        except UnicodeDecodeError:
            bad(str(path), "not UTF-8 text")
            continue
        except OSError as exc:
            bad(str(path), f"unreadable ({exc.strerror})")
            continue
        for doc in found:
            if not doc.text:
                bad(doc.source, "empty document")
            else:
                docs.append(doc)

    seen: dict[str, str] = {}
    for doc in docs:
        if doc.id in seen:
            raise InputError(f"duplicate document id {doc.id!r} in {seen[doc.id]} and {doc.source}; ids must be unique")
        seen[doc.id] = doc.source
    if not docs:
        raise InputError(f"corpus directory {root} holds no non-empty documents")
    docs.sort(key=lambda d: d.id)
    return Corpus(documents=docs, skipped=skipped)
