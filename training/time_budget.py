"""A wall-clock budget for a training run (`--max-minutes`).

A fixed-time run (a lent GPU, a CI slot) stops at the first optimizer step past the budget and
saves what it reached, like Lightning's `Trainer(max_time=...)`. The learning-rate schedule is
still the one planned for `max_steps`/epochs, so a run cut short ends before its decay; the run
record says so (`stopped_early`).
"""

from __future__ import annotations

import time

from transformers import TrainerCallback


class TimeBudget(TrainerCallback):
    """Stops training once `minutes` of wall time have passed since training began (0 = no limit)."""

    def __init__(self, minutes: float):
        self.minutes = minutes
        self.started = 0.0
        self.stopped_early = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.minutes and time.perf_counter() - self.started > self.minutes * 60:
            self.stopped_early = not control.should_training_stop  # the planned last step is no early stop
            control.should_training_stop = True
        return control
