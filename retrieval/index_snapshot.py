"""Reading an index directory: its manifest checked as a schema, its files verified, one build at a time.

`hybrid index` (retrieval/index.py, which describes the layout) writes the directory; everything
that reads one (the retriever, a rebuild reusing the previous vectors, `read_manifest`) goes
through `IndexSnapshot`, so these checks are made in one place and a reader never mixes the
manifest of one build with the files of another.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import time
from pathlib import Path

from core.errors import InputError

FORMAT_VERSION = 1
INDEX_FILE, STORE_FILE, MANIFEST_FILE = "index.faiss", "chunks.sqlite", "manifest.json"
# A read that keeps meeting swaps (IndexMoved) gives up after this many tries, naming the index.
_READ_ATTEMPTS = 20
_HEX64 = re.compile(r"[0-9a-f]{64}")
_REBUILD = "rebuild the index with 'hybrid index'"


def _count(v, lo: int = 0) -> bool:
    return type(v) is int and v >= lo  # type(): True is an int to isinstance, not a count


def validate_manifest(m: object, where: str) -> dict:
    """Check a parsed manifest as a schema, before anything it names is read.

    Every field the build writes is required with its type; `files` must list exactly the FAISS
    index and the chunk store with sha256 digests, so integrity checking cannot be skipped by a
    manifest that lists nothing.

    Raises:
        InputError: naming the manifest and the first bad field.
    """
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise InputError(f"{where}: {what}; the manifest is damaged or not hybrid's, {_REBUILD}")

    need(isinstance(m, dict), "not a JSON object")
    if type(m.get("format_version")) is not int or m["format_version"] != FORMAT_VERSION:
        raise InputError(f"{where}: index format {m.get('format_version')!r} is not {FORMAT_VERSION}; {_REBUILD}")
    for key in ("embedder", "chunking", "index", "counts", "files", "config"):
        need(isinstance(m.get(key), dict), f"field '{key}' is missing or not an object")
    for key in ("corpus", "created_at"):
        need(isinstance(m.get(key), str), f"field '{key}' is missing or not a string")
    e, c, ix, n, files = m["embedder"], m["chunking"], m["index"], m["counts"], m["files"]
    need(isinstance(e.get("name"), str) and bool(e["name"]), "'embedder.name' must be a non-empty string")
    need(isinstance(e.get("fingerprint"), str) and bool(_HEX64.fullmatch(e["fingerprint"])),
         "'embedder.fingerprint' must be a sha256 hex digest")
    need(_count(e.get("dim"), 1), "'embedder.dim' must be a positive integer")
    need(e.get("normalize") is True, "'embedder.normalize' must be true")
    need(e.get("max_seq_length") is None or _count(e["max_seq_length"], 1), "'embedder.max_seq_length' must be a positive integer")
    need(_count(c.get("chunk_tokens"), 1) and _count(c.get("overlap")), "'chunking.chunk_tokens'/'overlap' must be integers")
    need(isinstance(c.get("tokenizer"), str), "'chunking.tokenizer' must be a string")
    need(ix.get("type") in ("flat", "hnsw", "ivf", "ivfpq"), "'index.type' must be flat, hnsw, ivf or ivfpq")
    if ix["type"] == "hnsw":
        need(all(_count(ix.get(k), 1) for k in ("m", "ef_construction", "ef_search")),
             "'index.m'/'ef_construction'/'ef_search' must be positive integers")
    if ix["type"] in ("ivf", "ivfpq"):
        need(_count(ix.get("nlist"), 1) and _count(ix.get("nprobe"), 1), "'index.nlist'/'nprobe' must be positive integers")
    if ix["type"] == "ivfpq":
        need(_count(ix.get("m"), 1) and _count(ix.get("nbits"), 1), "'index.m'/'nbits' must be positive integers")
    need(all(_count(n.get(k)) for k in ("documents", "chunks", "restricted_documents", "skipped_files")),
         "'counts' must hold documents, chunks, restricted_documents and skipped_files as integers")
    need(set(files) == {INDEX_FILE, STORE_FILE}, f"'files' must list exactly {INDEX_FILE} and {STORE_FILE}")
    need(all(isinstance(v, str) and _HEX64.fullmatch(v) for v in files.values()),
         "'files' values must be sha256 hex digests")
    if "search" in m:  # absent in indexes built before lexical search: dense only
        st = m["search"]
        need(isinstance(st, dict) and st.get("mode") in ("dense", "lexical", "hybrid")
             and st.get("fusion") in ("rrf", "convex") and isinstance(st.get("fusion_weight"), (int, float))
             and 0 <= st["fusion_weight"] <= 1 and _count(st.get("fusion_candidates"), 1),
             "'search' must hold mode, fusion, fusion_weight in [0, 1] and fusion_candidates")
        # an index whose default search reads the lexical table must say it has one
        need(st["mode"] == "dense" or "lexical" in m, f"'search.mode' {st['mode']} needs the 'lexical' field")
    if "lexical" in m:
        need(isinstance(m["lexical"], dict) and isinstance(m["lexical"].get("table"), str),
             "'lexical' must be an object naming its table")
    return m


class IndexMoved(Exception):
    """The index path was swapped to another build while it was being read (retry the read)."""


class IndexSnapshot:
    """One index directory read through a directory descriptor: a consistent view of one build.

    A build swaps a new directory into place (core.atomic); files opened through the
    descriptor all come from the directory that was there when the snapshot was taken, so a
    reader never mixes the manifest of one build with the files of another. A file that cannot
    be read is an InputError, or IndexMoved when the path meanwhile names another directory.
    """

    def __init__(self, index_dir: str | Path):
        self.dir = Path(index_dir)
        self.mpath = self.dir / MANIFEST_FILE
        try:
            self.fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        except (FileNotFoundError, NotADirectoryError):
            # A fallback swap (two renames) may be under way: between them `.NAME.old-*` exists, after
            # them the path. Looked at a few times, .old first: one look can fall between two swaps.
            for _ in range(3):
                if any(self.dir.parent.glob(f".{self.dir.name}.old-*")) or self.dir.is_dir():
                    raise IndexMoved() from None
                time.sleep(0.001)
            raise InputError(f"--index {self.dir}: no {MANIFEST_FILE} there; build one with "
                             f"'hybrid index CORPUS_DIR --out {self.dir}'") from None
        self._pinned: dict[str, int | None] = {}
        try:
            self.manifest = validate_manifest(self._parse_manifest(), str(self.mpath))
            # Open every file now, in the instant after the manifest: an open file stays readable
            # when a later swap removes the directory, so the slow part (hashing, FAISS) cannot be
            # overtaken by builds that replace the index faster than one load takes.
            for name in self.manifest["files"]:
                self._pinned[name] = self._open(name)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "IndexSnapshot":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for fd in self._pinned.values():
            if fd is not None:
                os.close(fd)
        self._pinned.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def moved(self) -> bool:
        """True when the path no longer names the directory this snapshot reads."""
        try:
            now, mine = os.stat(self.dir), os.fstat(self.fd)
        except OSError:
            return True
        return (now.st_dev, now.st_ino) != (mine.st_dev, mine.st_ino)

    def _fail(self, message: str) -> None:
        if self.moved():
            raise IndexMoved()
        raise InputError(message)

    def _open(self, name: str) -> int | None:
        try:
            return os.open(name, os.O_RDONLY, dir_fd=self.fd)
        except FileNotFoundError:
            return None

    def _parse_manifest(self) -> object:
        fd = self._open(MANIFEST_FILE)
        if fd is None:
            self._fail(f"--index {self.dir}: no {MANIFEST_FILE} there; build one with "
                       f"'hybrid index CORPUS_DIR --out {self.dir}'")
        with os.fdopen(fd, "rb") as fh:
            data = fh.read()
        try:
            return json.loads(data.decode("utf-8"))
        except (ValueError, RecursionError):  # not UTF-8, not JSON, absurd numbers or nesting
            raise InputError(f"{self.mpath}: corrupted manifest (not JSON); {_REBUILD}") from None

    def verified(self, name: str, keep_bytes: bool = False) -> tuple[int, bytes | None]:
        """(open descriptor, its bytes if asked) of a file whose sha256 matches the manifest.

        The digest is taken over what is read through the returned descriptor, so the file
        checked is the file used. The caller closes the descriptor."""
        fd = self._pinned.pop(name) if name in self._pinned else self._open(name)
        if fd is None:
            self._fail(f"{self.dir / name}: missing index file; {_REBUILD}")
        digest, blocks = hashlib.sha256(), []
        try:
            while block := os.read(fd, 1 << 20):
                digest.update(block)
                if keep_bytes:
                    blocks.append(block)
            os.lseek(fd, 0, os.SEEK_SET)
        except BaseException:
            os.close(fd)
            raise
        if digest.hexdigest() != self.manifest["files"][name]:
            os.close(fd)
            self._fail(f"{self.dir / name}: checksum mismatch (corrupted or truncated); {_REBUILD}")
        return fd, (b"".join(blocks) if keep_bytes else None)

    def connect_store(self) -> sqlite3.Connection:
        """Read-only connection to the verified chunk store of this snapshot.

        SQLite opens by path: the path the verified file has now (its directory may have been
        swapped out to a stage name; /proc/self/fd/N tells), else the index path. If that path
        no longer holds the verified file once SQLite has opened it, SQLite may have opened
        another build's store: IndexMoved, and the caller takes a new snapshot."""
        fd, _ = self.verified(STORE_FILE)
        try:
            mine = os.fstat(fd)
            try:
                path = Path(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:  # no /proc
                path = (self.dir / STORE_FILE).resolve()
            con = None
            try:
                con = sqlite3.connect(f"{path.as_uri()}?mode=ro&immutable=1", uri=True, check_same_thread=False)
                con.execute("SELECT 1 FROM chunks LIMIT 1").fetchall()  # opens the file
            except (sqlite3.Error, ValueError):
                if con is not None:
                    con.close()
                self._fail(f"{self.dir / STORE_FILE}: cannot be opened as a hybrid chunk store; {_REBUILD}")
            try:
                now = os.stat(path)
            except OSError:
                now = None
            if now is None or (now.st_dev, now.st_ino) != (mine.st_dev, mine.st_ino):
                con.close()
                raise IndexMoved()
            return con
        finally:
            os.close(fd)


def read_manifest(index_dir: Path, verify: bool = True) -> dict:
    """Read, validate and (by default) verify an index directory: the one loader of manifest.json.

    Raises:
        InputError: missing directory or files, not a valid manifest (see `validate_manifest`),
            unknown format, checksum mismatch.
    """
    for _ in range(_READ_ATTEMPTS):
        try:
            with IndexSnapshot(index_dir) as snap:
                if verify:
                    for name in snap.manifest["files"]:
                        os.close(snap.verified(name)[0])
                return snap.manifest
        except IndexMoved:
            time.sleep(0.01)
    raise InputError(f"--index {index_dir}: kept changing while being read (a build is replacing it); try again")
