"""The job's progress line (images done, images/s, errors, time left) and its closing summary."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class Progress:
    """Counts results as they arrive and prints a line every `interval` seconds (rewritten in place on a tty)."""

    def __init__(self, total: int, done_before: int, interval: float = 10.0, stream: TextIO | None = None) -> None:
        self.total, self.done_before, self.interval = total, done_before, interval
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.ok = self.errors = 0
        self.start = time.monotonic()
        self.first: float | None = None  # when the first results came: the steady rate excludes start-up
        self.first_images = 0
        self._printed = self.start

    @property
    def images(self) -> int:
        """Images answered in this run."""
        return self.ok + self.errors

    def rate(self) -> float:
        """Images per second since the job began (start-up included)."""
        return self.images / max(time.monotonic() - self.start, 1e-9)

    def steady_rate(self) -> float:
        """Images per second from the first results on: the pipeline's pace once it is full."""
        if self.first is None:
            return 0.0
        elapsed = time.monotonic() - self.first
        return (self.images - self.first_images) / elapsed if elapsed > 0 else 0.0

    def update(self, ok: int, errors: int) -> None:
        """Count a batch of results; print when the interval has passed."""
        self.ok += ok
        self.errors += errors
        now = time.monotonic()
        if self.first is None:
            self.first, self.first_images = now, self.images
        if now - self._printed >= self.interval:
            self._printed = now
            self.print_line()

    def line(self) -> str:
        """The progress line as it stands."""
        done = self.done_before + self.images
        # Until a second batch arrives there is no pace to extrapolate: start-up would make the estimate absurd.
        rate = self.steady_rate()
        eta = _duration((self.total - done) / rate) if rate > 0 else "?"
        pct = 100.0 * done / self.total if self.total else 100.0
        return (f"{done}/{self.total} images ({pct:.1f}%), {rate:.1f} img/s, {self.errors} errors, "
                f"{eta} left")  # fmt: skip

    def print_line(self) -> None:
        """Print the line: in place on a terminal, one per interval in a log."""
        end = "\r" if self.tty else "\n"
        print(self.line(), end=end, file=self.stream, flush=True)

    def summary(self, state: str, out_dir: str) -> str:
        """The closing lines: what this run did and what the output folder now holds."""
        elapsed = time.monotonic() - self.start
        return (
            f"{state}: {self.images} images in {_duration(elapsed)} ({self.rate():.1f} img/s overall, "
            f"{self.steady_rate():.1f} img/s steady), {self.ok} ok, {self.errors} errors this run; "
            f"{self.done_before + self.images}/{self.total} inputs done in {out_dir}"
        )
