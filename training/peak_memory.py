"""The measured peak memory of a training run, recorded beside the memory plan's estimate.

Every `tune generator` / `tune dpo` run then checks the plan: the run record holds
`memory_measured` next to `memory_plan`, so an estimate that drifts from reality on some card or
stack shows up in the user's own runs, not only in benchmarks/performance/memory_plan.py.

What is measured, per device:
  cuda  torch.cuda.max_memory_allocated / max_memory_reserved, reset when training begins and
        read after every optimizer step (the training steps, not model loading or saving);
  cpu   the process's peak resident set size (ru_maxrss) after every step: a high-water mark
        since the process started, model loading included, as the plan's `total` counts it.
transformers' own tracker (`skip_memory_metrics=False`) reports deltas from the start of
training, without the weights and runtime the plan counts, and samples RSS in a thread; the
plan needs absolute peaks, which these two counters give for free.
"""

from __future__ import annotations

import resource
import sys

from transformers import TrainerCallback


def process_peak_rss() -> int:
    """Peak resident set size of this process so far, in bytes (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class PeakMemory(TrainerCallback):
    """Tracks the peak memory of the training steps on `device` ("cuda" or "cpu")."""

    def __init__(self, device: str):
        self.device = device
        self.peak = 0
        self.reserved = 0
        self.steps = 0

    def on_train_begin(self, args, state, control, **kwargs):
        if self.device == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1
        if self.device == "cuda":
            import torch

            self.peak = max(self.peak, int(torch.cuda.max_memory_allocated()))
            self.reserved = max(self.reserved, int(torch.cuda.max_memory_reserved()))
        else:
            self.peak = max(self.peak, process_peak_rss())
        return control

    def record(self, planned_bytes: int | None) -> dict:
        """The run record's `memory_measured`.

        Args:
            planned_bytes: the plan's total for the chosen strategy (None when not planned).

        Returns:
            {"device", "what", "peak_bytes", "reserved_bytes" (cuda), "steps", "planned_bytes", "planned_over_measured"}.
        """
        what = ("torch.cuda.max_memory_allocated over the training steps" if self.device == "cuda"
                else "process peak RSS (ru_maxrss), model loading included")
        out = {"device": self.device, "what": what, "peak_bytes": self.peak, "steps": self.steps,
               "planned_bytes": planned_bytes,
               "planned_over_measured": round(planned_bytes / self.peak, 3) if planned_bytes and self.peak else None}
        if self.device == "cuda":
            out["reserved_bytes"] = self.reserved
        return out
