"""Progress lines for long stages: plain text with rate and ETA, readable from a TPU worker's stdout.

    [distill] 120/300 (40%) 3.2 step/s, elapsed 37s, ETA 56s

Only process 0 prints, at most every `min_interval_s` seconds (and always at the end).
"""

from __future__ import annotations

import sys
import time

import jax

MIN_INTERVAL_S = 5.0  # seconds between lines: frequent enough to watch, rare enough for a log file


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class Progress:
    """Counts work units of one stage; `update(n)` after each unit, `done()` at the end."""

    def __init__(self, stage: str, total: int, unit: str = "step", start: int = 0,
                 min_interval_s: float = MIN_INTERVAL_S, stream=None):
        self.stage, self.total, self.unit = stage, total, unit
        self.count = start
        self._start_count = start
        self._t0 = self._last = time.perf_counter()
        self.min_interval_s = min_interval_s
        self.stream = stream or sys.stdout
        self._note = ""

    def update(self, n: int = 1, note: str = "") -> None:
        self.count += n
        self._note = note
        now = time.perf_counter()
        if now - self._last >= self.min_interval_s and self.count < self.total:
            self._last = now
            self._print(now, note)

    def done(self, note: str = "") -> float:
        """Prints the final line (with the last update's note unless one is given); returns the elapsed seconds."""
        now = time.perf_counter()
        self._print(now, note or self._note, final=True)
        return now - self._t0

    def _print(self, now: float, note: str, final: bool = False) -> None:
        if jax.process_index() != 0:
            return
        elapsed = now - self._t0
        done = self.count - self._start_count
        rate = done / elapsed if elapsed > 0 else 0.0
        pct = 100.0 * self.count / self.total if self.total else 100.0
        parts = [f"[{self.stage}] {self.count}/{self.total} ({pct:.0f}%)", f"{rate:.2f} {self.unit}/s",
                 f"elapsed {_duration(elapsed)}"]
        if not final and rate > 0 and self.count < self.total:
            parts.append(f"ETA {_duration((self.total - self.count) / rate)}")
        line = ", ".join(parts) + (f" | {note}" if note else "")
        print(line, file=self.stream, flush=True)
