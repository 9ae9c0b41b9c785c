"""Writes that a producer may repeat: each event is stored once per meta.id.

The embedded log keeps the ids in a unique index, written in the same
transaction as the records (EmbeddedBackend.append_unique). Kafka has no
such index: `Window` remembers the ids this daemon stored within the window
(librdkafka's idempotent producer covers its own retries), and rebuilds
itself at start-up by reading the window back from the topics, so a
producer's retry after a crash of the daemon is still recognised. A write
whose outcome Kafka could not confirm is checked against the log again
before the same ids are written a second time.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any, NamedTuple, Optional, Protocol, Sequence

from twisted.internet.defer import Deferred, DeferredList, ensureDeferred, gatherResults, succeed
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from . import strictjson
from .backends.base import Backend, BackendUnavailable, Record

log = Logger()

SCAN_BATCH = 1000


class Outcome(NamedTuple):
    """What became of one item of a write."""

    record: Optional[Record]  # the stored record (the earlier one for a duplicate)
    duplicate: bool = False
    error: Optional[BackendUnavailable] = None  # not stored (or, maybe_stored, not known)


class Store(Protocol):
    ready: bool

    def start(self) -> None: ...

    def when_ready(self) -> Deferred[None]:
        """Fires once writes can be taken."""

    def write(self, topic: str, items: Sequence[tuple[Optional[str], bytes]],
              deadline: float) -> Deferred[list[Outcome]]:
        """Store (meta.id or None, value) items; one Outcome per item."""


class UniqueIndexStore:
    """The embedded log: duplicates are found by the database itself."""

    ready = True

    def __init__(self, backend: Any, window: float):
        self.backend, self.window = backend, window

    def start(self) -> None:
        pass

    def when_ready(self) -> Deferred[None]:
        return succeed(None)

    def write(self, topic: str, items: Sequence[tuple[Optional[str], bytes]],
              deadline: float) -> Deferred[list[Outcome]]:
        d = self.backend.append_unique(topic, items, self.window, deadline)

        def done(result: list[tuple[Record, bool]]) -> list[Outcome]:
            return [Outcome(record, duplicate) for record, duplicate in result]

        def failed(failure: Any) -> list[Outcome]:
            failure.trap(BackendUnavailable)
            return [Outcome(None, False, failure.value)] * len(items)

        return d.addCallbacks(done, failed)


class Window:
    """(topic, meta.id) -> position of the records this daemon knows of,
    for `window` seconds and at most `limit` ids (oldest forgotten first)."""

    def __init__(self, window: float, limit: int, clock: Any = time):
        self.window, self.limit, self.clock = window, limit, clock
        self.ids: OrderedDict[tuple[str, str], tuple[int, int, int, float]] = OrderedDict()

    def add(self, topic: str, event_id: str, record: Record) -> None:
        key = (topic, event_id)
        self.ids[key] = (record.partition, record.offset, record.timestamp, self.clock.time())
        self.ids.move_to_end(key)
        while len(self.ids) > self.limit:
            self.ids.popitem(last=False)

    def get(self, topic: str, event_id: str) -> Optional[Record]:
        self._expire()
        found = self.ids.get((topic, event_id))
        if found is None:
            return None
        partition, offset, timestamp, _ = found
        return Record(topic, partition, offset, timestamp, None, None)

    def _expire(self) -> None:
        cutoff = self.clock.time() - self.window
        while self.ids:
            key, value = next(iter(self.ids.items()))
            if value[3] >= cutoff:
                return
            self.ids.popitem(last=False)


def _ids_of(records: list[Record]) -> list[tuple[Record, str]]:
    """(record, meta.id) of the records that carry one (runs in a thread)."""
    out = []
    for r in records:
        if r.value is None:
            continue
        try:
            event = strictjson.loads(r.value)
        except ValueError:
            continue
        meta = event.get("meta") if isinstance(event, dict) else None
        event_id = meta.get("id") if isinstance(meta, dict) else None
        if isinstance(event_id, str):
            out.append((r, event_id))
    return out


class WindowStore:
    """Kafka: the window in memory, loaded from the topics before the first
    write is taken (`ready`), and checked against the log again for ids
    whose earlier write has an unknown outcome."""

    def __init__(self, backend: Backend, topics: Sequence[str], window: float, limit: int, reactor: Any,
                 retry: float = 2.0):
        self.backend = backend
        self.topics = list(dict.fromkeys(topics))
        self.window = Window(window, limit)
        self.limit = limit
        self.reactor = reactor
        self.retry = retry
        self.ready = False
        self._pending: dict[tuple[str, str], Deferred] = {}  # ids being written now
        self._unsure: dict[tuple[str, str], int] = {}  # ids whose write may have been stored: since (ms)
        self._call: Any = None
        self._stopped = False
        self._waiting: list[Deferred[None]] = []

    def start(self) -> None:
        self._load()

    def when_ready(self) -> Deferred[None]:
        if self.ready:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        return d

    def stop(self) -> None:
        self._stopped = True
        if self._call is not None and self._call.active():
            self._call.cancel()

    def _load(self) -> None:
        self._call = None
        since = int((time.time() - self.window.window) * 1000)
        d = gatherResults([self._scan(t, since) for t in self.topics], consumeErrors=True)

        def loaded(_: Any) -> None:
            self.ready = True
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                d.callback(None)
            log.info("intake: {n} event ids of the last {w:.0f} s loaded from {topics}",
                     n=len(self.window.ids), w=self.window.window, topics=",".join(self.topics))

        def failed(failure: Any) -> None:
            if self._stopped:
                return
            log.warn("intake: cannot read the recent event ids yet ({error}); retrying",
                     error=failure.value.subFailure.getErrorMessage()
                     if hasattr(failure.value, "subFailure") else failure.getErrorMessage())
            self._call = self.reactor.callLater(self.retry, self._load)

        d.addCallbacks(loaded, failed)

    async def _scan_async(self, topic: str, since: int) -> None:
        partitions = await self.backend.partitions(topic)
        if not partitions:
            return
        tps = [(topic, p) for p in partitions]
        starts = await self.backend.offsets_for_time(tps, since)
        for tp in tps:
            low, high = await self.backend.watermarks(tp)
            position = max(starts[tp], low, high - self.limit)
            while position < high and not self._stopped:
                records = await self.backend.read({tp: position}, SCAN_BATCH)
                if not records:
                    break
                for record, event_id in await deferToThread(_ids_of, records):
                    self.window.add(topic, event_id, record)
                position = records[-1].offset + 1

    def _scan(self, topic: str, since: int) -> Deferred:
        return ensureDeferred(self._scan_async(topic, since))

    def write(self, topic: str, items: Sequence[tuple[Optional[str], bytes]],
              deadline: float) -> Deferred[list[Outcome]]:
        return ensureDeferred(self._write(topic, list(items)))

    async def _write(self, topic: str, items: list[tuple[Optional[str], bytes]]) -> list[Outcome]:
        unsure = {self._unsure[(topic, i)] for i, _ in items if i is not None and (topic, i) in self._unsure}
        if unsure:  # an earlier write of these ids may be in the log: look
            try:
                await self._scan(topic, min(unsure) - 1000)
            except BackendUnavailable as e:
                return [Outcome(None, False, e)] * len(items)
            for event_id, _ in items:
                self._unsure.pop((topic, event_id), None)  # type: ignore[arg-type]
        outcomes: list[Optional[Outcome]] = [None] * len(items)
        waits: list[tuple[int, Deferred]] = []
        writes: list[tuple[int, Deferred]] = []
        mine: dict[str, int] = {}
        started = int(time.time() * 1000)
        for n, (event_id, value) in enumerate(items):
            if event_id is not None:
                key = (topic, event_id)
                found = self.window.get(topic, event_id)
                if found is not None:
                    outcomes[n] = Outcome(found, True)
                    continue
                if event_id in mine or key in self._pending:  # being written: its outcome is ours
                    waits.append((n, self._pending[key]))
                    continue
            d = self.backend.append(topic, [(None, value)])
            if event_id is not None:
                mine[event_id] = n
                shared: Deferred = Deferred()
                self._pending[(topic, event_id)] = shared
                d.addBoth(self._settle, topic, event_id, shared, started)
            writes.append((n, d))
        results = await DeferredList([d for _, d in writes], consumeErrors=True)
        for (n, _), (ok, value) in zip(writes, results):
            if ok:
                outcomes[n] = Outcome(value[0])
            else:
                error = value.value if isinstance(value.value, BackendUnavailable) else BackendUnavailable(
                    value.getErrorMessage())
                outcomes[n] = Outcome(None, False, error)
        for n, shared in waits:
            outcome = await _observe(shared)
            outcomes[n] = Outcome(outcome.record, True) if outcome.record is not None else outcome
        return outcomes  # type: ignore[return-value]

    def _settle(self, result: Any, topic: str, event_id: str, shared: Deferred, started: int) -> Any:
        key = (topic, event_id)
        if self._pending.get(key) is shared:
            del self._pending[key]
        if isinstance(result, list):
            self.window.add(topic, event_id, result[0])
            shared.callback(Outcome(result[0]))
        else:
            error = result.value if isinstance(result.value, BackendUnavailable) else BackendUnavailable(
                result.getErrorMessage())
            if error.maybe_stored:
                self._unsure[key] = started
                while len(self._unsure) > self.limit:
                    del self._unsure[next(iter(self._unsure))]
            shared.callback(Outcome(None, False, error))
        return result


def _observe(shared: Deferred) -> Deferred:
    """The result of a shared Deferred without taking it from other observers."""
    d: Deferred = Deferred()

    def relay(result: Any) -> Any:
        d.callback(result)
        return result

    shared.addBoth(relay)
    return d
