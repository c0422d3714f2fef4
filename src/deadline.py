"""The wall-clock deadline of infer.py (`--deadline MINUTES`, counted from process start): what the kernel obeys.

A kernel past Kaggle's 9-hour limit scores nothing, so the ensemble skips a model whose projected time would
cross the deadline, and the pseudo-label fine-tune stops at it. `clock` is the one time source: tests replace it
with a fake clock to drive every cut without waiting.
"""

from __future__ import annotations

import math
import time

clock = time.time  # replaced by tests (monkeypatch src.deadline.clock)
PROCESS_START = time.time()  # infer.py imports this module first, so this is (about) the process start


def now() -> float:
    """The current time from `clock` (looked up at each call, so a replaced clock takes effect everywhere)."""
    return clock()


class Deadline:
    """Seconds left until `minutes` after `start` (default: process start); no minutes = no deadline."""

    def __init__(self, minutes: float | None = None, start: float | None = None) -> None:
        self.minutes = minutes
        self.start = PROCESS_START if start is None else start

    @property
    def active(self) -> bool:
        return self.minutes is not None

    def left(self) -> float:
        """Seconds left (inf without a deadline; negative once past)."""
        if self.minutes is None:
            return math.inf
        return self.start + 60.0 * self.minutes - now()

    def passed(self) -> bool:
        return self.left() <= 0

    def fits(self, seconds: float) -> bool:
        """Would work projected to take `seconds` end before the deadline?"""
        return seconds < self.left()

    def describe(self) -> str:
        return (
            "no deadline" if self.minutes is None else f"--deadline {self.minutes:g} min, {self.left() / 60:.1f} left"
        )
