"""A training budget in seconds that may be spread over several sessions, with periodic checkpoints."""

from __future__ import annotations

import time
from collections.abc import Callable

#: ``on_checkpoint(seconds spent in all sessions, steps, this session's losses)``
OnCheckpoint = Callable[[float, int, list[float]], None]


class TimeBudget:
    """``budget_s`` seconds in all, ``done_s`` of them spent in earlier sessions, at most ``session_s`` of them in
    this one (but at least one step while budget is left, so a session on a slow or busy machine still moves);
    :meth:`tick` after each step calls ``on_checkpoint`` every ``every_s`` seconds, :meth:`finish` once at the end."""

    def __init__(self, budget_s: float, done_s: float = 0.0, every_s: float = 300.0,
                 on_checkpoint: OnCheckpoint | None = None, session_s: float = float("inf")):
        self.budget_s, self.done_s, self.every_s, self.on_checkpoint = budget_s, done_s, every_s, on_checkpoint
        self.session_s = session_s
        self.start, self.last = time.perf_counter(), 0.0
        self.session_steps = 0

    @property
    def elapsed(self) -> float:
        """Seconds of this session."""
        return time.perf_counter() - self.start

    @property
    def spent(self) -> float:
        """Seconds of all sessions."""
        return self.done_s + self.elapsed

    def running(self) -> bool:
        return self.spent < self.budget_s and (self.elapsed < self.session_s or self.session_steps == 0)

    def progress(self) -> float:
        """Fraction of the budget spent (0 … 1)."""
        return min(1.0, self.spent / max(self.budget_s, 1e-9))

    def tick(self, steps: int, losses: list[float]) -> None:
        self.session_steps += 1
        elapsed = self.elapsed
        if self.on_checkpoint is not None and elapsed - self.last >= self.every_s:
            self.on_checkpoint(self.done_s + elapsed, steps, losses)
            self.last = elapsed

    def finish(self, steps: int, losses: list[float]) -> float:
        """The final checkpoint; returns this session's seconds."""
        elapsed = self.elapsed
        if self.on_checkpoint is not None:
            self.on_checkpoint(self.done_s + elapsed, steps, losses)
        return elapsed
