"""Progress on stderr for long runs. Silent unless the caller (the CLI) switches it on."""

from __future__ import annotations

import sys
import time


class Progress:
    """A minimal progress line. `enabled=False` makes every call a no-op, which is the library default."""

    def __init__(self, enabled: bool = False, stream=None):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self._label = ""
        self._total = 0
        self._done = 0
        self._start = 0.0

    @classmethod
    def for_terminal(cls, quiet: bool) -> "Progress":
        """Enabled only when stderr is a terminal and the user did not ask for quiet."""
        return cls(enabled=(not quiet) and sys.stderr.isatty())

    def start(self, label: str, total: int) -> None:
        self._label, self._total, self._done, self._start = label, max(int(total), 1), 0, time.monotonic()
        self._draw()

    def advance(self, n: int = 1) -> None:
        self._done = min(self._done + n, self._total)
        self._draw()

    def finish(self) -> None:
        if self.enabled:
            self._done = self._total
            self._draw()
            self.stream.write("\n")
            self.stream.flush()

    def message(self, text: str) -> None:
        if self.enabled:
            self.stream.write(text + "\n")
            self.stream.flush()

    def _draw(self) -> None:
        if not self.enabled:
            return
        frac = self._done / self._total
        bar = "#" * int(frac * 24)
        elapsed = time.monotonic() - self._start
        self.stream.write(f"\r{self._label:<28} [{bar:<24}] {self._done}/{self._total} {elapsed:6.1f}s")
        self.stream.flush()
