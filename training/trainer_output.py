"""What a training run prints: one progress bar per stage (the trainer's, with its ETA), not library chatter.

TRL maps its datasets through several `datasets` passes (tokenising, truncating, building labels),
each with a progress bar of its own, and a Trainer without its progress bar prints every step's
loss dict instead. Both are switched off here, the datasets bars only while the run lasts.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


@contextmanager
def no_dataset_bars() -> Iterator[None]:
    """Silence `datasets`' per-map progress bars inside the block, restoring the caller's setting after."""
    from datasets.utils import logging as ds_logging

    was_off = ds_logging.is_progress_bar_enabled() is False
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if not was_off:
            ds_logging.enable_progress_bar()


def drop_step_printer(trainer, progress: bool) -> None:
    """A Trainer prints each step's loss dict (beside its progress bar, or instead of it without one):
    the bar stays, the dicts go (the losses are kept in the run record and the loss curve)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    if not progress:
        trainer.remove_callback(PrinterCallback)
    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, ProgressCallback):
            cb.on_log = lambda *args, **kwargs: None
