"""Fan-out: one log reader per distinct set of partitions, shared by all its clients.

A hub follows the end of the log for its partitions, keeps the last
`ring_size` records as entries (parsed event, position vector, frames cached
by the sinks) and pushes them to its live subscribers, grouped by filter so
a filter is evaluated once per entry and group. Records that arrive while a
fan-out pass runs wait for the next pass and go out together, one write per
client: under load a pass carries several events, so the cost per delivery
falls as the rate rises, and the added latency is at most one pass.

A subscriber that starts behind the ring, or whose sink pushes back, is a
catch-up cursor: it reads at its own pace (from the ring, else from the
log), in batches too, and joins the live set again when it reaches the head.
Nothing is lost and a slow client holds no more than its transport buffer
and one batch.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Protocol, Sequence

from twisted.internet.defer import Deferred, ensureDeferred, gatherResults, succeed
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .assignment import marks_at
from . import strictjson
from .backends.base import Backend, Record, TopicPartition
from .filters import Filter
from .pacing import Pacer
from .positions import Mark, Partitions, advance, encode_id

log = Logger()

# (next offset, mark or None) per hub partition; the mark is the last
# delivered timestamp + 1 ms and how many records of that ms were delivered
Slot = tuple[int, Optional[Mark]]
Vector = tuple[Slot, ...]

REPLAY_CHUNK = 500  # ring entries replayed per reactor turn
READ_BATCH = 1000  # records per catch-up read from the log
FIRST_READ = 100  # a smaller first read: the first event comes sooner
# A fan-out batch ends at either bound: a client that stops reading holds at
# most one batch beyond its socket buffer before it leaves the live set.
BATCH_BYTES = 64 * 1024
BATCH_ENTRIES = 256


class Entry:
    """One record as every sink sees it; sinks cache their frames in `frames`."""

    __slots__ = ("seq", "record", "event", "data", "tps", "vector", "frames", "_id")

    def __init__(
        self,
        seq: int,
        record: Record,
        event: Optional[dict],
        data: Optional[bytes],
        tps: Sequence[TopicPartition],
        vector: Vector,
    ):
        self.seq = seq
        self.record = record
        self.event = event  # None: the value is not a JSON object; only the id moves
        self.data = data
        self.tps = tps
        self.vector = vector
        self.frames: dict[str, bytes] = {}
        self._id: Optional[str] = None

    def id_text(self) -> str:
        """The SSE id: where to resume after this entry, for every partition."""
        if self._id is None:
            self._id = id_text(self.tps, self.vector)
        return self._id

    def with_vector(self, vector: Vector) -> "Entry":
        return Entry(self.seq, self.record, self.event, self.data, self.tps, vector)


class Batch:
    """Consecutive entries for a client, or for the live clients of one filter
    group: the ones the filter matched, and the last one (where the clients
    then stand; unmatched entries only move the id).
    Sinks cache the joined frames in `frames`, so each client gets the same
    bytes object."""

    __slots__ = ("matched", "last", "frames")

    def __init__(self, matched: list[Entry], last: Entry):
        self.matched = matched
        self.last = last
        self.frames: dict[str, bytes] = {}


def id_text(tps: Sequence[TopicPartition], vector: Vector) -> str:
    return encode_id(((tp[0], tp[1], slot[0], slot[1]) for tp, slot in zip(tps, vector)),
                     getattr(tps, "cluster", None))


class Sink(Protocol):
    """Where a subscription writes: an HTTP response, an IRC or Socket.IO bridge.

    A sink that cannot take more calls `subscription.pauseProducing()` (for
    HTTP the transport does so) and `resumeProducing()` when it can.
    """

    def send_batch(self, batch: Batch) -> None:
        """Deliver the matched entries of a batch; the id moves to batch.last."""

    def comment(self, text: str) -> None:
        """Tell the client something that is not an event."""

    def fail(self, reason: str) -> None:
        """The subscription cannot go on; end the client with this reason."""


def matching(entries: list[Entry], flt: Optional[Filter]) -> list[Entry]:
    """The entries a client with this filter gets (the others only move its id)."""
    if flt is None:
        return [e for e in entries if e.event is not None]
    return [e for e in entries if e.event is not None and flt.matches(e.event)]


def decode_record(record: Record) -> tuple[Optional[dict], Optional[bytes]]:
    """The event of a record with meta.topic/partition/offset (and key) set,
    and its compact JSON; (None, None) when the value is not a JSON object."""
    event, data, _ = decode_checked(record)
    return event, data


def decode_checked(record: Record) -> tuple[Optional[dict], Optional[bytes], str]:
    """decode_record, plus why a record is skipped ('' when it is not):
    `tombstone`, `invalid_json`, `not_object`, or what strict JSON refuses
    (`non_finite`, `lone_surrogate`), so nothing that is not strict JSON
    reaches any sink."""
    if record.value is None:
        return None, None, "tombstone"
    try:
        event = strictjson.loads(record.value)
    except strictjson.NotStrictJSON as e:
        return None, None, e.reason
    if not isinstance(event, dict):
        return None, None, "not_object"
    meta = event.get("meta")
    if not isinstance(meta, dict):
        meta = event["meta"] = {}
    meta["topic"] = record.topic
    meta["partition"] = record.partition
    meta["offset"] = record.offset
    if record.key is not None:
        meta["key"] = record.key.decode("utf-8", "replace")
    try:
        data = strictjson.dumps(event)
    except strictjson.NotStrictJSON as e:
        return None, None, e.reason
    return event, data, ""


@implementer(IPushProducer)
class Subscription:
    """One client of a hub; also the producer its sink's transport pauses."""

    __slots__ = (
        "hub", "sink", "filter", "offsets", "stamps", "live", "closed", "paused", "last", "_pending",
        "_reading", "_scheduled", "_reads",
    )

    def __init__(
        self,
        hub: "Hub",
        sink: Sink,
        filter: Optional[Filter],
        offsets: list[int],
        stamps: list[Optional[Mark]],
    ):
        self.hub = hub
        self.sink = sink
        self.filter = filter
        self.offsets = offsets  # next offset per hub partition (catch-up mode)
        self.stamps = stamps
        self.live = False
        self.closed = False
        self.paused = False
        self.last: Optional[Entry] = None  # last entry sent while live
        self._pending: list[Record] = []  # read from the log, not yet sent
        self._reading = False
        self._scheduled = False
        self._reads = 0  # catch-up reads from the log so far

    # -- position ---------------------------------------------------------

    def position(self) -> Vector:
        """Where this client resumes: its own cursor, or the last live entry."""
        if self.live and self.last is not None:
            return self.last.vector
        return tuple(zip(self.offsets, self.stamps))

    def id_text(self) -> str:
        return id_text(self.hub.tps, self.position())

    # -- IPushProducer ------------------------------------------------------

    def pauseProducing(self) -> None:
        if self.closed or self.paused:
            return
        self.paused = True
        if self.live:
            self._leave_live()

    def resumeProducing(self) -> None:
        if self.closed or not self.paused:
            return
        self.paused = False
        self._schedule()

    def stopProducing(self) -> None:
        self.cancel()

    def cancel(self) -> None:
        """Stop delivering; the hub forgets this client."""
        if self.closed:
            return
        self.closed = True
        if self.live:
            self.hub._remove_live(self)
        self.hub._forget(self)

    # -- live ---------------------------------------------------------------

    def _leave_live(self) -> None:
        self.hub._remove_live(self)
        self.live = False
        if self.last is not None:
            self.offsets = [slot[0] for slot in self.last.vector]
            self.stamps = [slot[1] for slot in self.last.vector]
        self.hub.catching_up += 1

    # -- catch-up -----------------------------------------------------------

    def _schedule(self) -> None:
        if not self._scheduled and not self.closed:
            self._scheduled = True
            self.hub.clock.callLater(0, self._pump)

    def _pump(self) -> None:
        """Move this cursor forward until it is live or must wait."""
        self._scheduled = False
        if self.closed or self.paused or self.live or self._reading:
            return
        if self._pending:
            self._send_records()
            if self.paused or self.closed:
                return
        hub = self.hub
        if hub.contains(self.offsets):
            if self._replay():
                hub._add_live(self)
            elif not self.paused:
                self._schedule()
            return
        if any(o > head[0] for o, head in zip(self.offsets, hub.head)):
            # The log holds records the hub's reader has not seen yet.
            if all(o >= low[0] for o, low in zip(self.offsets, hub.ring_base)):
                hub.clock.callLater(0.05, self._schedule)
                return
        self._read()

    def _replay(self) -> bool:
        """Send ring entries from this cursor's position; True at the head."""
        hub = self.hub
        offsets, stamps = self.offsets, self.stamps
        index = hub.index
        sent = 0
        batch: list[Entry] = []
        size = 0
        for entry in hub.entries_from(hub.ring_start_for(offsets, self.last)):
            i = index[entry.record.tp]
            if entry.record.offset < offsets[i]:
                continue
            vector = entry.vector
            if any(slot[0] < o for slot, o in zip(vector, offsets)):
                vector = tuple(
                    slot if slot[0] >= o else (o, s)
                    for slot, o, s in zip(vector, offsets, stamps)
                )
                entry = entry.with_vector(vector)
            self.offsets = offsets = [slot[0] for slot in vector]
            self.stamps = stamps = [slot[1] for slot in vector]
            self.last = entry
            batch.append(entry)
            size += len(entry.data) if entry.data is not None else 0
            sent += 1
            if size >= BATCH_BYTES or len(batch) >= BATCH_ENTRIES or sent >= REPLAY_CHUNK:
                self._send_batch(batch)
                batch, size = [], 0
                if self.closed or self.paused or sent >= REPLAY_CHUNK:
                    return False
        if batch:
            self._send_batch(batch)
            if self.closed or self.paused:
                return False
        return True

    def _send_batch(self, entries: list[Entry]) -> None:
        """Write entries read at this cursor's own pace, as one write."""
        self.sink.send_batch(Batch(matching(entries, self.filter), entries[-1]))

    def _read(self) -> None:
        hub = self.hub
        self._reading = True
        d = hub.backend.read(dict(zip(hub.tps, self.offsets)), READ_BATCH if self._reads else FIRST_READ)
        self._reads += 1

        def got(records: list[Record]) -> None:
            self._reading = False
            if self.closed:
                return
            if not records:
                # At the end of the log but not in the ring: wait for the reader.
                hub.clock.callLater(0.05, self._schedule)
                return
            self._pending = records
            self._schedule()

        def failed(failure: Any) -> None:
            self._reading = False
            if self.closed:
                return
            log.failure("catch-up read failed", failure)
            self.sink.fail("the event log could not be read: " + failure.getErrorMessage())
            self.cancel()

        d.addCallbacks(got, failed)

    def _send_records(self) -> None:
        hub = self.hub
        index = hub.index
        records = self._pending
        batch: list[Entry] = []
        size = 0
        n = 0
        while n < len(records):
            record = records[n]
            n += 1
            i = index.get(record.tp)
            if i is None or record.offset < self.offsets[i]:
                continue
            if record.offset > self.offsets[i]:
                if batch:
                    self._send_batch(batch)
                    batch, size = [], 0
                    if self.closed or self.paused:
                        n -= 1  # this record is next
                        break
                self.sink.comment(
                    f"no records at offsets {self.offsets[i]} to {record.offset - 1} of "
                    f"{record.topic}/{record.partition} (no longer retained); "
                    f"continuing at {record.offset}"
                )
            self.offsets[i] = record.offset + 1
            self.stamps[i] = advance(self.stamps[i], record.timestamp)
            self.last = None
            event, data = decode_record(record)
            batch.append(Entry(-1, record, event, data, hub.tps, tuple(zip(self.offsets, self.stamps))))
            size += len(data) if data is not None else 0
            if size >= BATCH_BYTES or len(batch) >= BATCH_ENTRIES:
                self._send_batch(batch)
                batch, size = [], 0
                if self.closed or self.paused:
                    break
        if batch:
            self._send_batch(batch)
        self._pending = records[n:]


class Hub:
    """The shared reader and ring for one set of partitions."""

    def __init__(
        self,
        backend: Backend,
        tps: Sequence[TopicPartition],
        ring_size: int,
        clock: IReactorTime,
        max_gap: float = 0.0,
    ):
        self.backend = backend
        self.tps = Partitions(tps, getattr(backend, "cluster", None))  # ids name the cluster
        self.index = {tp: i for i, tp in enumerate(self.tps)}
        self.ring_size = ring_size
        self.clock = clock
        self.head: Vector = ()
        self.ring_base: Vector = ()  # position before the oldest ring entry
        self._ring: list[Optional[Entry]] = [None] * ring_size
        self.first_seq = 0
        self.next_seq = 0
        self.groups: dict[str, tuple[Optional[Filter], set[Subscription]]] = {}
        self.subscriptions: set[Subscription] = set()
        self.catching_up = 0
        self.skipped_records = 0
        self.skipped_reasons: dict[str, int] = {}  # skipped_records by reason (decode_checked)
        self._tail: Any = None
        self._incoming: list[Record] = []  # from the reader, not yet in the ring
        # max_gap 0: each pass on the turn after records arrive
        self._pacer = Pacer(clock, max_gap, self._fan_out, defer=True)
        self.on_empty: Optional[Callable[["Hub"], None]] = None

    def start(self) -> Deferred[None]:
        """Find the end of every partition and start following it."""

        def started(slots: list[Slot]) -> None:
            self.head = self.ring_base = tuple(slots)
            self._tail = self.backend.tail(
                {tp: high for tp, (high, _) in zip(self.tps, slots)}, self._on_records
            )

        return (
            gatherResults([self.backend.watermarks(tp) for tp in self.tps], consumeErrors=True)
            .addErrback(lambda f: f.value.subFailure)  # the first error itself, not FirstError
            .addCallback(lambda marks: ensureDeferred(marks_at(self.backend, self.tps, marks, self.clock)))
            .addCallback(started)
        )

    def stop(self) -> None:
        if self._tail is not None:
            self._tail.stop()
            self._tail = None
        self._pacer.cancel()
        self._incoming = []
        for sub in list(self.subscriptions):
            sub.cancel()

    # -- subscribers ----------------------------------------------------------

    def subscribe(
        self,
        sink: Sink,
        start: Optional[dict[TopicPartition, int]] = None,
        stamps: Optional[dict[TopicPartition, Mark]] = None,
        filter: Optional[Filter] = None,
    ) -> Subscription:
        """Deliver to sink from start (next offset per partition; missing
        partitions and None start at the head)."""
        start = start or {}
        stamps = stamps or {}
        offsets = [start.get(tp, head[0]) for tp, head in zip(self.tps, self.head)]
        stamp_list = [
            stamps.get(tp) if tp in start else head[1] for tp, head in zip(self.tps, self.head)
        ]
        sub = Subscription(self, sink, filter, offsets, stamp_list)
        self.subscriptions.add(sub)
        self.catching_up += 1
        sub._schedule()  # starts next turn, once the caller has wired the sink
        return sub

    def _add_live(self, sub: Subscription) -> None:
        key = sub.filter.key if sub.filter is not None else ""
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = (sub.filter, set())
        group[1].add(sub)
        sub.live = True
        self.catching_up -= 1

    def _remove_live(self, sub: Subscription) -> None:
        key = sub.filter.key if sub.filter is not None else ""
        group = self.groups.get(key)
        if group is not None:
            group[1].discard(sub)
            if not group[1]:
                del self.groups[key]

    def _forget(self, sub: Subscription) -> None:
        if sub in self.subscriptions:
            self.subscriptions.discard(sub)
            if not sub.live:
                self.catching_up -= 1
            sub.live = False
        if not self.subscriptions and self.on_empty is not None:
            self.on_empty(self)

    # -- the ring ---------------------------------------------------------------

    def contains(self, offsets: Sequence[int]) -> bool:
        """Whether the ring can serve a cursor at these offsets."""
        return all(
            low[0] <= o <= high[0] for o, low, high in zip(offsets, self.ring_base, self.head)
        )

    def ring_start_for(self, offsets: Sequence[int], last: Optional[Entry]) -> int:
        """The first ring sequence number a cursor at offsets may need."""
        if last is not None and last.seq >= 0 and self.first_seq <= last.seq < self.next_seq:
            if self._ring[last.seq % self.ring_size] is last:
                return last.seq + 1
        # Each entry's vector is the head after it, so slot i never decreases
        # along the ring: the first entry past the cursor in partition i is
        # found by bisection, and the cursor needs nothing before the
        # earliest of those.
        ring, size = self._ring, self.ring_size
        start = self.next_seq
        for i, offset in enumerate(offsets):
            low, high = self.first_seq, start
            while low < high:
                mid = (low + high) // 2
                if ring[mid % size].vector[i][0] > offset:  # type: ignore[union-attr]
                    high = mid
                else:
                    low = mid + 1
            start = low
        return start

    def entries_from(self, seq: int):
        ring, size = self._ring, self.ring_size
        while seq < self.next_seq:
            entry = ring[seq % size]
            seq += 1
            yield entry

    def __len__(self) -> int:
        return self.next_seq - self.first_seq

    # -- the reader ---------------------------------------------------------------

    def _on_records(self, records: list[Record]) -> None:
        """Queue records for the next fan-out pass (see the module docstring)."""
        self._incoming.extend(records)
        self._pacer.request()

    def _fan_out(self) -> None:
        """Put the queued records in the ring and send them to the live
        clients, a batch at a time."""
        records, self._incoming = self._incoming, []
        index = self.index
        batch: list[Entry] = []
        size = 0
        for record in records:
            i = index.get(record.tp)
            if i is None:
                continue
            head = list(self.head)
            if record.offset < head[i][0]:
                continue  # already seen (a reader restart)
            head[i] = (record.offset + 1, advance(head[i][1], record.timestamp))
            self.head = vector = tuple(head)
            event, data, why = decode_checked(record)
            if event is None:
                self.skipped_records += 1
                self.skipped_reasons[why] = self.skipped_reasons.get(why, 0) + 1
                log.warn(
                    "skipping a record that is not a strict JSON object ({why}): {topic}/{partition}@{offset}",
                    why=why,
                    topic=record.topic,
                    partition=record.partition,
                    offset=record.offset,
                )
            entry = Entry(self.next_seq, record, event, data, self.tps, vector)
            self._push(entry)
            batch.append(entry)
            size += len(data) if data is not None else 0
            if size >= BATCH_BYTES or len(batch) >= BATCH_ENTRIES:
                self._send_live(batch)
                batch, size = [], 0
        if batch:
            self._send_live(batch)

    def _send_live(self, entries: list[Entry]) -> None:
        last = entries[-1]
        for flt, subs in list(self.groups.values()):
            batch = Batch(matching(entries, flt), last)
            for sub in list(subs):  # the fan-out itself: keep it lean
                if not sub.closed:
                    sub.last = last
                    try:
                        sub.sink.send_batch(batch)
                    except Exception:
                        self._sink_raised(sub)

    def _sink_raised(self, sub: Subscription) -> None:
        """A sink raised mid-pass (a bug in it): its client is ended, so the
        error is logged once, and the pass goes on for the others."""
        log.failure("a sink raised during fan-out; ending its client ({sink!r})", sink=sub.sink)
        sub.cancel()
        try:
            sub.sink.fail("internal error")
        except Exception:
            log.failure("the sink also raised while ending its client ({sink!r})", sink=sub.sink)

    def _push(self, entry: Entry) -> None:
        size = self.ring_size
        if self.next_seq - self.first_seq == size:
            evicted = self._ring[self.first_seq % size]
            assert evicted is not None
            self.ring_base = evicted.vector
            self.first_seq += 1
        self._ring[self.next_seq % size] = entry
        self.next_seq += 1


class Hubs:
    """Finds or starts the hub for a set of partitions; stops idle ones."""

    def __init__(self, backend: Backend, ring_size: int, linger: float, clock: IReactorTime,
                 max_gap: float = 0.0):
        self.backend = backend
        self.max_gap = max_gap
        self.ring_size = ring_size
        self.linger = linger
        self.clock = clock
        self.hubs: dict[tuple[TopicPartition, ...], Hub] = {}
        self._starting: dict[tuple[TopicPartition, ...], list[Deferred]] = {}
        self._idle: dict[Hub, Any] = {}

    def get(self, tps: Sequence[TopicPartition]) -> Deferred[Hub]:
        """The hub for these partitions; subscribe to it in the same turn."""
        key = tuple(sorted(tps))
        hub = self.hubs.get(key)
        if hub is not None:
            self._check_idle(hub)
            return succeed(hub)
        waiting: Deferred[Hub] = Deferred()
        if key in self._starting:
            self._starting[key].append(waiting)
            return waiting
        self._starting[key] = [waiting]
        hub = Hub(self.backend, tps, self.ring_size, self.clock, self.max_gap)
        hub.on_empty = self._check_idle

        def done(result: Any) -> None:
            waiters = self._starting.pop(key)
            if isinstance(result, Failure):
                for w in waiters:
                    w.errback(result)
                return
            self.hubs[key] = hub
            self._check_idle(hub)
            for w in waiters:
                w.callback(hub)

        hub.start().addBoth(done)
        return waiting

    def _check_idle(self, hub: Hub) -> None:
        """Close a hub that stays without subscribers for `linger` seconds."""
        if hub not in self._idle:
            self._idle[hub] = self.clock.callLater(self.linger, self._close_if_idle, hub)

    def _close_if_idle(self, hub: Hub) -> None:
        del self._idle[hub]
        if hub.subscriptions:
            return
        key = tuple(sorted(hub.tps))
        if self.hubs.get(key) is hub:
            del self.hubs[key]
        hub.stop()

    def stop(self) -> None:
        for call in self._idle.values():
            if call.active():
                call.cancel()
        self._idle.clear()
        for hub in list(self.hubs.values()):
            hub.stop()
        self.hubs.clear()
