"""Atomic writes: a reader sees the old file or directory, or the new one, never half of one."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from core.errors import InputError


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` via a temp file in the same directory and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux renameat2(RENAME_EXCHANGE); False where unsupported."""
    global _renameat2
    if _renameat2 is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            _renameat2 = fn
        except (AttributeError, OSError):  # not Linux, or a libc without it (glibc < 2.28)
            _renameat2 = False
    if _renameat2 is False:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):  # this filesystem cannot exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


_renameat2 = None


def swap_dir_into_place(new: Path, dest: Path) -> None:
    """Replace directory `dest` by `new` (same filesystem); the old one is deleted only afterwards.

    Where the kernel and filesystem allow, one atomic exchange: a reader opening `dest` at any
    moment finds the old directory or the new one. Elsewhere two renames, with a moment in
    which `dest` is missing (`.NAME.old-PID-*` then exists; IndexSnapshot waits for it)."""
    new, dest = Path(new), Path(dest)
    if dest.exists() and _exchange(new, dest):
        shutil.rmtree(new, ignore_errors=True)  # `new` now names the old directory
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-{os.getpid()}-", dir=dest.parent))
    if dest.exists():
        os.replace(dest, old)  # onto the empty placeholder: a unique name, never a stale one
    os.rename(new, dest)
    shutil.rmtree(old, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def remove_stale_stages(dest: Path) -> list[Path]:
    """Delete `.NAME.tmp-PID-*` / `.NAME.old-PID` leftovers of `dest` whose process is gone.

    A build killed by SIGKILL cannot clean up after itself; the next one does, but never touches
    a directory whose writer is still running (its PID is in the name)."""
    removed = []
    for p in dest.parent.glob(f".{dest.name}.*"):
        m = re.fullmatch(rf"\.{re.escape(dest.name)}\.(?:tmp|old)-(\d+)(?:-.*)?", p.name)
        if m and p.is_dir() and not p.is_symlink() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


@contextmanager
def staged_dir(dest: str | Path) -> Iterator[Path]:
    """Yield an empty directory beside `dest`; when the block succeeds it replaces `dest`.

    The one home of "write into a temporary directory, then swap": an exception (or Ctrl-C)
    inside the block leaves the previous `dest` untouched and removes the stage.

    >>> with staged_dir(tmp_path / "model") as stage:   # doctest: +SKIP
    ...     (stage / "weights.bin").write_bytes(b"...")
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_stages(dest)
    stage = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-{os.getpid()}-", dir=dest.parent))
    try:
        yield stage
        swap_dir_into_place(stage, dest)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def not_its_own(dest: str | Path, marker: str) -> bool:
    """The one rule every writer applies before replacing an output directory `dest`: one that exists,
    holds something and lacks the writer's own file `marker` (an index's manifest.json, an adapter's
    hybrid_run.json, ...) was put there by someone else, and is never replaced (nor is a file there)."""
    dest = Path(dest)
    return dest.exists() and (not dest.is_dir() or (not (dest / marker).exists() and any(dest.iterdir())))


def check_writable(directory: str | Path, flag: str) -> None:
    """Refuse, before any work, a directory the caller cannot create or write into (one line naming `flag`)."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".hybrid-write-check-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise InputError(f"{flag} {directory}: cannot write there ({exc.strerror or exc.__class__.__name__}); "
                         f"choose a directory you can write to") from None


def sha256_file(path: Path) -> str:
    """The file's sha256, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
