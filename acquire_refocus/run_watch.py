"""A run's watchman: polls what can go wrong while frames are written (free space, a store's writer failing) and
stops the run on the first problem, with its reason, instead of letting it be logged and ignored."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from acquire_refocus.logs import kv

log = logging.getLogger(__name__)

Check = Callable[[], str]  # "" while all is well, else the reason the run must stop


class RunWatch:
    """Calls each check every `interval_s` in its own thread; the first reason goes to `on_problem`, once."""

    def __init__(self, checks: Sequence[Check], on_problem: Callable[[str], None], interval_s: float = 0.1) -> None:
        self._checks = list(checks)
        self._on_problem = on_problem
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="run-watch", daemon=True)
        self.problem = ""

    def start(self) -> RunWatch:
        self._thread.start()
        return self

    def check_now(self) -> str:
        """Run every check once in the caller's thread (after the acquisition, for what the polling missed)."""
        if not self.problem:
            for check in self._checks:
                reason = check()
                if reason:
                    self._report(reason)
                    break
        return self.problem

    def _report(self, reason: str) -> None:
        self.problem = reason
        log.error(kv("run_stopping", reason=reason))
        self._on_problem(reason)

    def _watch(self) -> None:
        while not self._stop.wait(self._interval_s):
            if self.check_now():
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)
