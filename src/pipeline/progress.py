"""Periodic progress log lines with rate and ETA, readable in a batch job's log file."""

from __future__ import annotations

import logging
import time


class Progress:
    """Logs ``done/total``, rate and ETA at most every ``interval`` seconds, and at the end.

    Arguments:
        total: Units of work expected.
        what: Name of a unit, e.g. ``"simulations"``.
        logger: Where the lines go.
        interval: Minimum seconds between two lines.
    """

    def __init__(
        self, total: int, what: str, logger: logging.Logger, interval: float = 10.0
    ) -> None:
        self.total, self.what, self.logger, self.interval = total, what, logger, interval
        self.done = 0
        self.start = self.last = time.perf_counter()

    def update(self, count: int) -> None:
        """Records ``count`` more units; logs when ``interval`` has passed or all are done."""
        self.done += count
        now = time.perf_counter()
        if now - self.last >= self.interval or self.done >= self.total:
            self.last = now
            self.logger.info(self.line(now))

    def line(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        remaining = (self.total - self.done) / rate if rate > 0 else float("inf")
        percent = 100.0 * self.done / max(self.total, 1)
        return (
            f"{self.done}/{self.total} {self.what} ({percent:.0f}%), "
            f"{rate:.1f} {self.what}/s, elapsed {elapsed:.1f} s, ETA {remaining:.1f} s"
        )
