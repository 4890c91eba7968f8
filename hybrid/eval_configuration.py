"""One configuration of `hybrid eval` as a typed record, and its label (`rag+raft+cal`, ...):
rendered here and parsed here, the one place the label's grammar lives.

Labels are what report.json, report.md and predictions.jsonl name configurations by, so their
form does not change: `closed_book`, `rag`, `rag+NAME`, `rag+A|B` (the judge picks among the
adapters' answers), then `+answered` (stored lines: abstentions a threshold overruled, answered
again), `+gate` (the judge gate on top), `+cal` (the calibrated threshold on top) or `+probe` (the probe's
rule on top).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

SUFFIXES = {"answered": "answered", "gate": "gate", "cal": "calibrated", "probe": "probe"}  # label suffix -> field, in label order


@dataclass(frozen=True)
class Configuration:
    """Who answers, from what, and which decider is applied on top of the greedy answers.

    A new decider is one more flag here, one more suffix in `label`/`parse`.
    """

    closed_book: bool = False  # no passages
    adapters: tuple[str, ...] = ()  # (): the base model; (NAME,): rag+NAME; several: the judge picks among them
    answered: bool = False  # answers written again from the answer's opening (calibrated thresholds)
    gate: bool = False  # the judge gate: abstain where no passage answers the question
    calibrated: bool = False  # the adapter's calibrated threshold decides whether to abstain
    probe: bool = False  # the probe's rule decides whether to answer (tuning/probe.py)

    @property
    def adapter(self) -> str | None:
        """The one adapter that generates this configuration's answers (None: the base model)."""
        return self.adapters[0] if len(self.adapters) == 1 else None

    @property
    def generated(self) -> "Configuration":
        """The configuration whose generated answers this one derives from (itself when it has no decider)."""
        return replace(self, gate=False, calibrated=False, probe=False)

    @property
    def label(self) -> str:
        head = "closed_book" if self.closed_book else "+".join(["rag"] + (["|".join(self.adapters)] if self.adapters else []))
        return "".join([head] + [f"+{suffix}" for suffix, name in SUFFIXES.items() if getattr(self, name)])

    @classmethod
    def parse(cls, label: str) -> "Configuration":
        """The configuration a stored label names (report.json, predictions.jsonl); `label`'s inverse.

        Suffixes are read from the end, so an adapter name holding '+' reads as it was written.
        """
        flags = {}
        for suffix, name in reversed(SUFFIXES.items()):
            flags[name] = label.endswith(f"+{suffix}")
            label = label.removesuffix(f"+{suffix}")
        if label == "closed_book":
            return cls(closed_book=True, **flags)
        rest = label.removeprefix("rag+") if label.startswith("rag+") else ""
        return cls(adapters=tuple(rest.split("|")) if rest else (), **flags)

    def __str__(self) -> str:
        return self.label


def planned(closed_book: bool, adapters) -> list[Configuration]:
    """The configurations an eval generates: closed_book (if asked), rag, then rag+NAME per adapter."""
    return ([Configuration(closed_book=True)] if closed_book else []) + [Configuration()] + \
        [Configuration(adapters=(n,)) for n in adapters]
