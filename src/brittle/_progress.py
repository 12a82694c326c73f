"""Progress on stderr for long runs. Silent unless the caller (the CLI, or `progress=True`) switches it on.

On a terminal, a bar redrawn in place; elsewhere (a CI log, `| tee`, a notebook's captured stderr) one line
per step with the elapsed time, at most one every few seconds per step, so that a long run is never silent and
a log is never flooded.
"""

from __future__ import annotations

import sys
import time

LINE_INTERVAL = 5.0  # seconds between two progress lines of one step (the first and last always print)


class Progress:
    """`enabled=False` makes every call a no-op, which is the library default. `lines`: one line per update
    instead of a bar (default: lines unless the stream is a terminal)."""

    def __init__(self, enabled: bool = False, stream=None, *, lines: bool | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.lines = (not _is_terminal(self.stream)) if lines is None else lines
        self._label = ""
        self._total = 0
        self._done = 0
        self._start = 0.0
        self._last_line = 0.0
        self._born = time.monotonic()

    @classmethod
    def for_terminal(cls, quiet: bool) -> "Progress":
        """What the CLI shows: nothing with --quiet; a bar on a terminal; lines otherwise."""
        return cls(enabled=not quiet)

    @classmethod
    def from_argument(cls, progress: "Progress | bool | None") -> "Progress":
        """The `progress=` argument of the Python API: a Progress, True (print to stderr) or False/None."""
        if isinstance(progress, Progress):
            return progress
        return cls(enabled=bool(progress))

    def start(self, label: str, total: int) -> None:
        self._label, self._total, self._done, self._start = label, max(int(total), 1), 0, time.monotonic()
        self._last_line = 0.0
        self._draw(force=True)

    def advance(self, n: int = 1) -> None:
        self._done = min(self._done + n, self._total)
        self._draw(force=False)

    def finish(self) -> None:
        if not self.enabled:
            return
        self._done = self._total
        if self.lines:
            self._line(f"{self._label}: done, {self._total}/{self._total} in {time.monotonic() - self._start:.1f} s")
        else:
            self._draw(force=True)
            self.stream.write("\n")
            self.stream.flush()

    def message(self, text: str) -> None:
        if self.enabled:
            self._line(text)

    def _line(self, text: str) -> None:
        self.stream.write(f"[{time.monotonic() - self._born:7.1f}s] {text}\n")
        self.stream.flush()

    def _draw(self, *, force: bool) -> None:
        if not self.enabled:
            return
        elapsed = time.monotonic() - self._start
        if self.lines:
            now = time.monotonic()
            if force or now - self._last_line >= LINE_INTERVAL:
                self._last_line = now
                self._line(f"{self._label}: {self._done}/{self._total} ({elapsed:.1f} s)")
            return
        frac = self._done / self._total
        bar = "#" * int(frac * 24)
        self.stream.write(f"\r{self._label:<28} [{bar:<24}] {self._done}/{self._total} {elapsed:6.1f}s")
        self.stream.flush()


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
