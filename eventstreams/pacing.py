"""One rule for spacing fan-out passes (the hub, the IRC and RCStream bridges).

A pass writes what is pending to every client: one send() per client,
whatever it carries. When passes grow long (many clients), starting the
next one no sooner than twice the last one's length after it keeps the
fan-out to about half of the core and lets each send() carry more; a pass
never waits longer than `max_gap`, and with short passes nothing waits.
"""
from __future__ import annotations

from typing import Any, Callable

from twisted.internet.interfaces import IReactorTime


class Pacer:
    """Runs `work` when asked, spaced as above."""

    def __init__(self, clock: IReactorTime, max_gap: float, work: Callable[[], None], defer: bool = False):
        self.clock = clock
        self.max_gap = max_gap
        self.work = work
        self.defer = defer  # never run within request(): what arrives in the same turn joins the pass
        self._call: Any = None
        self._started = float("-inf")  # when the last pass started
        self._seconds = 0.0  # how long it took

    def request(self) -> None:
        """There is work: run a pass now (or next turn, with defer) or when due."""
        if self._call is not None:
            return
        wait = self._started + min(self.max_gap, 2 * self._seconds) - self.clock.seconds()
        if wait > 0 or self.defer:
            self._call = self.clock.callLater(max(0.0, wait), self.run)
        else:
            self.run()

    def run(self) -> None:
        """A pass now, whether due or not."""
        self.cancel()
        self._started = started = self.clock.seconds()
        self.work()
        self._seconds = self.clock.seconds() - started

    def cancel(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
