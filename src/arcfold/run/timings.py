"""Where a run's wall time goes: seconds per phase (load, train, inference, scoring, logging) and every timed span
for the timeline plot (phase, fold, device, start and end in seconds from the run's start)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator


@dataclass
class Timings:
    seconds: dict[str, float] = field(default_factory=dict)
    spans: list[dict[str, Any]] = field(default_factory=list)
    device: str = ""  # the run's devices, for spans of the run itself
    origin: float = field(default_factory=time.perf_counter)

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        """Time a phase of the run itself (fold None, the run's devices)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(None, phase, self.device, time.perf_counter() - start)

    def add(self, fold: int | None, phase: str, device: str, seconds: float) -> None:
        """A span that ended now and lasted `seconds` (a fold's phase reported by its worker as it ends)."""
        end = time.perf_counter() - self.origin
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds
        self.spans.append({"phase": phase, "fold": fold, "device": device, "start": end - seconds, "end": end})
