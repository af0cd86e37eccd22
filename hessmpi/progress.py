"""Progress on rank 0: a bar redrawn in place on a terminal, a plain line per log interval
otherwise (batch logs)."""

from __future__ import annotations

import sys
import time


class Progress:
    """Report ``update(step, text)`` calls for a run of ``total`` steps, starting after step
    ``first`` (a resumed run), to ``stream``."""

    def __init__(self, total: int, stream=None, width: int = 30, first: int = 0):
        self.total, self.width, self.first = total, width, first
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.started = time.perf_counter()

    def update(self, step: int, text: str) -> None:
        elapsed = time.perf_counter() - self.started
        rate = (step - self.first) / elapsed if elapsed > 0 else 0.0
        if self.tty:
            filled = int(self.width * step / self.total)
            bar = "#" * filled + "-" * (self.width - filled)
            self.stream.write(f"\r[{bar}] {step}/{self.total} {text} {rate:.0f} steps/s ")
        else:
            self.stream.write(f"step {step}/{self.total} {text} ({elapsed:.1f} s, "
                              f"{rate:.0f} steps/s)\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
