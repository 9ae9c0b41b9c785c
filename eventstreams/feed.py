"""An in-process subscriber of one stream, for the bridges (IRC, RCStream).

It subscribes through the hubs exactly like an HTTP client, starting at the
live end, and when the subscription fails (the log is unreachable) it
subscribes again from where it stopped, so a bridge loses nothing.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.application.service import Service
from twisted.internet.defer import ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .assignment import resolve
from .backends.base import Backend
from .config import StreamConfig
from .hub import Batch, Entry, Hubs, Subscription

log = Logger()


class StreamFeed(Service):
    """Calls on_batch([(event, entry), …]) once per hub batch of a stream's
    events, from now on, so that a bridge can format each event once and
    write once per client per batch."""

    def __init__(
        self,
        backend: Backend,
        hubs: Hubs,
        stream: StreamConfig,
        on_batch: Callable[[list[tuple[dict, Entry]]], None],
        clock: IReactorTime,
        retry: float = 5.0,
    ):
        self.backend = backend
        self.hubs = hubs
        self.stream = stream
        self.on_batch = on_batch
        self.clock = clock
        self.retry = retry
        self.subscription: Optional[Subscription] = None
        self._offsets: dict = {}  # where to continue after a failure
        self._stamps: dict = {}
        self._call: Any = None

    def startService(self) -> None:
        super().startService()
        self._subscribe()

    def stopService(self) -> Any:
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
        if self.subscription is not None:
            self.subscription.cancel()
            self.subscription = None

    def _subscribe(self) -> None:
        self._call = None
        ensureDeferred(self._start()).addErrback(self._failed)

    async def _start(self) -> None:
        start = await resolve(self.backend, self.stream.topics, None, None)
        hub = await self.hubs.get(start.tps)
        if not self.running:
            return
        offsets = {tp: o for tp, o in self._offsets.items() if tp in hub.index}
        self.subscription = hub.subscribe(self, offsets, self._stamps, None)

    def _failed(self, failure: Any) -> None:
        log.warn("{stream}: cannot follow the stream ({error}); retrying in {retry} s",
                 stream=self.stream.name, error=failure.getErrorMessage(), retry=self.retry)
        if self.running:
            self._call = self.clock.callLater(self.retry, self._subscribe)

    # -- the Sink interface of eventstreams.hub ----------------------------------

    def send_batch(self, batch: Batch) -> None:
        events = [(entry.event, entry) for entry in batch.matched if entry.event is not None]
        if not events:
            return
        try:
            self.on_batch(events)
        except Exception:
            log.failure("{stream}: a bridge failed on a batch of {n} events", stream=self.stream.name,
                        n=len(events))

    def comment(self, text: str) -> None:
        log.info("{stream}: {text}", stream=self.stream.name, text=text)

    def fail(self, reason: str) -> None:
        sub = self.subscription
        if sub is not None:
            vector = sub.position()
            self._offsets = {tp: slot[0] for tp, slot in zip(sub.hub.tps, vector)}
            self._stamps = {tp: slot[1] for tp, slot in zip(sub.hub.tps, vector) if slot[1] is not None}
        self.subscription = None
        log.warn("{stream}: {reason}; resubscribing in {retry} s", stream=self.stream.name,
                 reason=reason, retry=self.retry)
        if self.running:
            self._call = self.clock.callLater(self.retry, self._subscribe)
