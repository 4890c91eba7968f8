"""Notices other libraries print that tell a hybrid user nothing, silenced one by one at their source.

`install()` runs when the `retrieval` package is first imported: every command and every library
entry point (`from hybrid import Pipeline`, `tune_generator`, ...) imports it before torch,
transformers, bitsandbytes or mlflow, so the CLI and a library user are quiet alike. Each entry
below names one logger and the start of one message, or one warning by its text: a record of that
logger with another message, and every other logger and warning, still shows. No logger's level is
raised and stderr is never redirected, so a warning that says something new is seen.

Not here, because they are fixed where hybrid calls the library: the mining statistics of
sentence-transformers' `mine_hard_negatives` (`verbose=False`, retrieval/tune_embedder.py), the
`gradient_checkpointing` FutureWarnings (tuning/tune_generator.py and tuning/tune_dpo.py pass the new
`activation_checkpointing`), and hybrid's own warnings (module loggers, not the root logger, which
printed them as `WARNING:root:...` in a library user's process).
"""

from __future__ import annotations

import logging
import warnings

# {logger name: starts of the messages dropped from it}
NOTICES: dict[str, tuple[str, ...]] = {
    # kernels (imported by bitsandbytes <- peft <- transformers.trainer_utils, so by nearly every command), on
    # that import under HF_HUB_OFFLINE=1, which hybrid sets: "Skipping publisher trust check for
    # 'kernels-community/quantization-bitsandbytes' because Hugging Face Hub is in offline mode." It is about
    # an optional kernel hybrid never downloads and does not need.
    "kernels._internals.hf_hub": ("Skipping publisher trust check for ",),
    # bitsandbytes, on import on a CPU with AVX512-BF16: "Failed to load CPU gemm_4bit_forward from
    # kernels-community: Version 1 ... is not available in the local cache and Hugging Face Hub is in offline
    # mode ... Please make sure you already `pip install kernels`". The same optional download: without it
    # bitsandbytes uses its own CPU 4-bit matmul (only `--strategy qlora` on a CPU runs one), and its advice
    # does not apply (kernels is installed; hybrid is offline by design).
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
    # mlflow, once, when `--track mlflow` / `hybrid run` creates a new SQLite store: "<time> INFO
    # mlflow.store.db.utils: Creating initial MLflow database tables..." and "... Updating database tables"
    # (mlflow configures its own loggers at INFO). Bookkeeping of a store hybrid creates itself; hybrid
    # prints the run it recorded ("tracked: MLflow run ..."). Its warnings still show.
    "mlflow.store.db.utils": ("Creating initial MLflow database tables", "Updating database tables"),
    # sentence-transformers, when `tune judge` and `tune reranker` start a cross-encoder from a bi-encoder (the
    # packaged MiniLM, or --base): "Converting SentenceTransformer model <path> to CrossEncoder." That is
    # hybrid's design, not something the user did; a warning that reads like a mistake.
    "sentence_transformers.base.model": ("Converting SentenceTransformer model ",),
}

# FutureWarnings raised inside a library by its own use of a deprecated name, not by hybrid's code (regex
# matched at the message's start): transformers 5 warns "`is_gradient_checkpointing` is deprecated and will
# be removed in v6" whenever peft wraps a model (PeftModel, get_peft_model) and when TRL prepares one:
# every ask, eval, serve and tuning run. Nothing a user can change.
FUTURE_WARNINGS = (r"`is_gradient_checkpointing` is deprecated",)


class _DropNotices(logging.Filter):
    """Drops the records whose message starts with one of `starts` (on the logger it is attached to)."""

    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


def install() -> None:
    """Attach the filters (idempotent). A logger that does not exist yet is created empty: the library
    gets this same logger, filter included, when it is imported later."""
    for name, starts in NOTICES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotices) for f in logger.filters):
            logger.addFilter(_DropNotices(starts))
    for message in FUTURE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
