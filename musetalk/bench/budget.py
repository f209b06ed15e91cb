"""The report's time budget: one deadline for the whole run, shared out between its sections.

Each section gets the time left, weighted against the sections still to come, so time a section
did not use goes to the later ones. Inside a section every measurement asks `Deadline.allows`
with its own estimate first, and is skipped (with the reason in the report) when it would not fit.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


class OutOfTime(Exception):
    """A measurement would not fit in what is left of its section's time."""


@dataclass
class Deadline:
    """One section's share of the budget: `until` on the monotonic clock."""

    until: float
    clock: Callable[[], float] = time.monotonic

    def left(self) -> float:
        return max(0.0, self.until - self.clock())

    def allows(self, seconds: float) -> bool:
        return seconds <= self.left()

    def check(self, seconds: float, what: str) -> None:
        """Raise `OutOfTime` naming `what` when `seconds` do not fit."""
        if not self.allows(seconds):
            raise OutOfTime(f"{what} needs ~{seconds:.0f} s, {self.left():.0f} s of this section's time left")


@dataclass
class Budget:
    """The whole run's seconds, handed to sections by weight (later sections inherit what is unused)."""

    total_s: float
    weights: dict[str, float]
    clock: Callable[[], float] = time.monotonic
    start: float = field(default=0.0)

    def __post_init__(self) -> None:
        self.start = self.start or self.clock()

    def elapsed(self) -> float:
        return self.clock() - self.start

    def left(self) -> float:
        return max(0.0, self.total_s - self.elapsed())

    def section(self, name: str) -> Deadline:
        """The deadline of section `name`: its weight's share of the time left among it and the sections after it."""
        names = list(self.weights)
        later = names[names.index(name) :]
        share = self.weights[name] / sum(self.weights[n] for n in later)
        return Deadline(self.clock() + self.left() * share, self.clock)
