"""Fan-out: one hub per distinct set of partitions, shared by all its clients.

The records themselves are read and kept once per partition, whatever the
sets (eventstreams.rings); a hub is what is specific to a set: its position
vector (each id is a join of the partitions' cached id fragments), its
clients grouped by filter (a filter is evaluated once per entry and group)
and the entries of the pass being sent, whose frames the sinks build once
and share. Records that arrive while a fan-out pass runs wait for the next
pass and go out together, one write per client: under load a pass carries
several events, so the cost per delivery falls as the rate rises, and the
added latency is at most one pass.

A subscriber that starts behind the head, or whose sink pushes back, is a
catch-up cursor: it reads at its own pace (from the partition rings, else
from the log), in batches too, and joins the live set again when it
reaches the head. Nothing is lost and a slow client holds no more than its
transport buffer and one batch. A cursor that must wait for records
the reader has not brought yet is woken by the hub's next pass (Hub.wait),
not by a timer. A subscription's states (CATCHING_UP,
REPLAYING, LIVE, PAUSED, GONE) are spelled out below, and one Cutter cuts
every run of entries into batches.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Protocol, Sequence

from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .backends.base import Backend, Record, TopicPartition
from .filters import Filter
from .pacing import Pacer
from .positions import Mark, Partitions, advance, cluster_suffix, encode_id
from .rings import Item, PartitionRing, Rings, decode_checked, events, fragment_of, merged

__all__ = ["LIVE", "Batch", "Entry", "Hub", "Hubs", "Sink", "Subscription", "TooManySets", "decode_checked",
           "decode_record", "matching"]

log = Logger()

# (next offset, mark or None) per hub partition; the mark is the last
# delivered timestamp + 1 ms and how many records of that ms were delivered
Slot = tuple[int, Optional[Mark]]
Vector = tuple[Slot, ...]

REPLAY_CHUNK = 500  # ring items replayed per reactor turn
# After a read that found nothing, the cursor also waits for the reader's
# next pass; a quiet stream gets one more read after this long, in case the
# read came back empty only because the backend gave up early (a Kafka read
# that timed out).
EMPTY_READ_RETRY = 1.0
READ_BATCH = 1000  # records per catch-up read from the log
FIRST_READ = 100  # a smaller first read: the first event comes sooner
# A fan-out batch ends at either bound: a client that stops reading holds at
# most one batch beyond its socket buffer before it leaves the live set.
BATCH_BYTES = 64 * 1024
BATCH_ENTRIES = 256

_LAZY: Any = object()  # an Entry's event, decoded (or found in the cache) when asked for


class Entry:
    """One record as the sinks of one set see it: `record` is the ring item
    (or the Record read from the log), `vector` where the set stands after
    it. Entries live as long as the pass or batch that sends them; sinks
    cache their frames in `frames`."""

    __slots__ = ("seq", "record", "_event", "data", "tps", "vector", "frames", "_id")

    def __init__(
        self,
        seq: int,
        record: Any,
        event: Optional[dict],
        data: Optional[bytes],
        tps: Sequence[TopicPartition],
        vector: Vector,
    ):
        self.seq = seq
        self.record = record
        self._event = event  # None: the value is not a JSON object; only the id moves
        self.data = data
        self.tps = tps
        self.vector = vector
        self.frames: dict[str, bytes] = {}
        self._id: Optional[bytes] = None  # UTF-8: frames are bytes, and every set makes one per event

    @property
    def event(self) -> Optional[dict]:
        event = self._event
        if event is _LAZY:
            event = self._event = events.get(self.record)
        return event

    def id_bytes(self) -> bytes:
        """The SSE id: where to resume after this entry, for every partition."""
        if self._id is None:
            self._id = id_text(self.tps, self.vector).encode("utf-8")
        return self._id

    def id_text(self) -> str:
        return self.id_bytes().decode("utf-8")


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


def id_parts(tps: Sequence[TopicPartition], vector: Vector, suffix: bytes) -> list[bytes]:
    """A position's id in parts, one per partition and the closing "]",
    whose join is the id: the first opens the array and names the cluster
    (suffix), the others are the ring items' cached fragments
    (rings.Item.fragment)."""
    parts = [fragment_of(tp, slot) for tp, slot in zip(tps, vector)]
    if parts:
        parts[0] = first_part(parts[0], suffix)
    parts.append(b"]")
    return parts


def first_part(fragment: bytes, suffix: bytes) -> bytes:
    """An item's fragment as the first entry of an id."""
    return b"[" + fragment[1:-1] + suffix


class TooManySets(Exception):
    """`max_stream_sets` distinct sets are being served: no new one now."""


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
        if len(entries) == 1:  # a pass of one event, the usual case with many sets
            return entries if entries[0].data is not None else []
        return [e for e in entries if e.data is not None]
    return [e for e in entries if e.data is not None and flt.matches(e.event)]  # type: ignore[arg-type]


def decode_record(record: Record) -> tuple[Optional[dict], Optional[bytes]]:
    """The event of a record with meta.topic/partition/offset (and key) set,
    and its compact JSON; (None, None) when the value is not a JSON object."""
    event, data, _ = decode_checked(record)
    return event, data


class Cutter:
    """The one rule for cutting consecutive entries into batches (live
    passes, replays from the rings, reads from the log): a batch ends at
    BATCH_BYTES or BATCH_ENTRIES."""

    __slots__ = ("send", "entries", "size")

    def __init__(self, send: Callable[[list[Entry]], None]):
        self.send = send
        self.entries: list[Entry] = []
        self.size = 0

    def add(self, entry: Entry) -> bool:
        """Take an entry; True when that cut and sent a batch."""
        self.entries.append(entry)
        if entry.data is not None:
            self.size += len(entry.data)
        if self.size >= BATCH_BYTES or len(self.entries) >= BATCH_ENTRIES:
            return self.flush()
        return False

    def flush(self) -> bool:
        """Send what is held; True when there was something."""
        if not self.entries:
            return False
        entries, self.entries, self.size = self.entries, [], 0
        self.send(entries)
        return True


# A subscription's states. It starts CATCHING_UP; its cursor REPLAYs from
# the rings when they hold its position, and goes LIVE at the hub's head.
# A sink that pushes back makes it PAUSED (from any state but GONE);
# resuming makes it CATCHING_UP again from where it stands. GONE is final.
CATCHING_UP = "catching up"  # reading the log, or waiting for the reader to reach it (Hub.wait)
REPLAYING = "replaying"  # sending from the rings at its own pace
LIVE = "live"  # fed by the hub's passes
PAUSED = "paused"
GONE = "gone"


@implementer(IPushProducer)
class Subscription:
    """One client of a hub; also the producer its sink's transport pauses."""

    __slots__ = (
        "hub", "sink", "filter", "offsets", "stamps", "state", "last", "_pending",
        "_reading", "_scheduled", "_reads", "_retry",
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
        self.state = CATCHING_UP
        self.last: Optional[Entry] = None  # last entry sent while live
        self._pending: list[Record] = []  # read from the log, not yet sent
        self._reading = False
        self._scheduled = False
        self._reads = 0  # catch-up reads from the log so far
        self._retry: Any = None  # the re-read after an empty read (EMPTY_READ_RETRY)

    @property
    def live(self) -> bool:
        return self.state is LIVE

    @property
    def paused(self) -> bool:
        return self.state is PAUSED

    @property
    def closed(self) -> bool:
        return self.state is GONE

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
        if self.state is GONE or self.state is PAUSED:
            return
        if self.state is LIVE:
            self._leave_live()
        self.state = PAUSED

    def resumeProducing(self) -> None:
        if self.state is not PAUSED:
            return
        self.state = CATCHING_UP
        self._schedule()

    def stopProducing(self) -> None:
        self.cancel()

    def cancel(self) -> None:
        """Stop delivering; the hub forgets this client."""
        if self.state is GONE:
            return
        if self.state is LIVE:
            self.hub.leave_live(self)
        self.state = GONE
        self._cancel_retry()
        self.hub.forget(self)

    # -- live ---------------------------------------------------------------

    def _leave_live(self) -> None:
        """Take the position of the last live entry as this cursor's own."""
        self.hub.leave_live(self)
        if self.last is not None:
            self.offsets = [slot[0] for slot in self.last.vector]
            self.stamps = [slot[1] for slot in self.last.vector]
            self.last = None

    # -- catch-up -----------------------------------------------------------

    def _schedule(self) -> None:
        if not self._scheduled and not self.closed:
            self._scheduled = True
            self.hub.clock.callLater(0, self._pump)

    def _cancel_retry(self) -> None:
        if self._retry is not None:
            if self._retry.active():
                self._retry.cancel()
            self._retry = None

    def _retried(self) -> None:
        self._retry = None
        self._schedule()

    def _pump(self) -> None:
        """Move this cursor forward until it is live or must wait."""
        self._scheduled = False
        self._cancel_retry()
        self.hub.waiting.pop(self, None)  # woken by the retry, or no longer waiting
        if (self.state is not CATCHING_UP and self.state is not REPLAYING) or self._reading:
            return
        if self._pending:
            self._send_records()
            if self.paused or self.closed:
                return
        hub = self.hub
        if hub.contains(self.offsets):
            self.state = REPLAYING
            if self._replay():
                hub.join_live(self)
                self.state = LIVE
            elif not self.paused and not self.closed:
                self._schedule()
            return
        self.state = CATCHING_UP
        if any(o > head[0] for o, head in zip(self.offsets, hub.head)):
            # The log holds records the hub has not seen yet: they come
            # through the rings, and the pass that takes them wakes us.
            if all(o >= low[0] for o, low in zip(self.offsets, hub.ring_base)):
                hub.wait(self)
                return
        self._read()

    def _replay(self) -> bool:
        """Send ring items from this cursor's position; True at the hub's head."""
        hub = self.hub
        offsets, stamps = self.offsets, self.stamps
        index, tps, limit, suffix = hub.index, hub.tps, hub.seen_seq, hub.suffix
        frags = id_parts(tps, tuple(zip(offsets, stamps)), suffix)
        sent = 0
        cut = Cutter(self._send_batch)
        for item in merged([ring.items_from(o) for ring, o in zip(hub.rings_, offsets)]):
            if item.seq > limit:
                break  # the hub's next pass sends it
            i = index[item.tp]
            offsets[i] = item.offset + 1
            stamps[i] = item.mark
            frags[i] = first_part(item.fragment, suffix) if i == 0 else item.fragment
            entry = Entry(item.seq, item, _LAZY, item.data, tps, tuple(zip(offsets, stamps)))
            entry._id = b"".join(frags)
            sent += 1
            if cut.add(entry) or sent >= REPLAY_CHUNK:
                cut.flush()
                if self.closed or self.paused or sent >= REPLAY_CHUNK:
                    return False
        if cut.flush() and (self.closed or self.paused):
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
                # At the end of the log but not in the ring: the reader's
                # next pass wakes us (or, in a quiet stream, the retry).
                hub.wait(self)
                self._retry = hub.clock.callLater(EMPTY_READ_RETRY, self._retried)
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
        index, tps, suffix = hub.index, hub.tps, hub.suffix
        records = self._pending
        frags = id_parts(tps, tuple(zip(self.offsets, self.stamps)), suffix)
        cut = Cutter(self._send_batch)
        n = 0
        while n < len(records):
            record = records[n]
            n += 1
            i = index.get(record.tp)
            if i is None or record.offset < self.offsets[i]:
                continue
            if record.offset > self.offsets[i]:
                if cut.flush() and (self.closed or self.paused):
                    n -= 1  # this record is next
                    break
                self.sink.comment(
                    f"no records at offsets {self.offsets[i]} to {record.offset - 1} of "
                    f"{record.topic}/{record.partition} (no longer retained); "
                    f"continuing at {record.offset}"
                )
            self.offsets[i] = record.offset + 1
            self.stamps[i] = mark = advance(self.stamps[i], record.timestamp)
            fragment = fragment_of(record.tp, (record.offset + 1, mark))
            frags[i] = first_part(fragment, suffix) if i == 0 else fragment
            self.last = None
            event, data = decode_record(record)
            entry = Entry(-1, record, event, data, tps, tuple(zip(self.offsets, self.stamps)))
            entry._id = b"".join(frags)
            if cut.add(entry) and (self.closed or self.paused):
                break
        cut.flush()
        self._pending = records[n:]


class Hub:
    """What one set of partitions needs beyond the shared rings: its head
    vector, its clients and the pass being sent. Without `rings` it makes
    its own (one hub alone, as in tests)."""

    def __init__(
        self,
        backend: Backend,
        tps: Sequence[TopicPartition],
        ring_size: int,
        clock: IReactorTime,
        max_gap: float = 0.0,
        rings: Optional[Rings] = None,
    ):
        self.backend = backend
        self.tps = Partitions(tps, getattr(backend, "cluster", None))  # ids name the cluster
        self.suffix = cluster_suffix(self.tps.cluster).encode("utf-8")
        self.index = {tp: i for i, tp in enumerate(self.tps)}
        self.clock = clock
        self._head: Vector = tuple((0, None) for _ in self.tps)
        self._slots: list[Slot] = list(self._head)  # the head, as each pass moves it
        self.seen_seq = 0  # the last ring item this hub has taken into its head
        self.groups: dict[str, tuple[Optional[Filter], set[Subscription]]] = {}
        self.subscriptions: set[Subscription] = set()
        self.waiting: dict[Subscription, None] = {}  # cursors the next pass wakes, in order
        self.skipped_records = 0
        self.skipped_reasons: dict[str, int] = {}  # skipped_records by reason (decode_checked)
        self._tail: Any = None  # the shared rings while this hub follows them
        self.incoming: list[Item] = []  # from the rings (Rings.hand_over), not yet sent
        self._frags: list[bytes] = []
        self._cut = Cutter(self._send_live)  # one per hub: a pass makes none
        # max_gap 0: each pass on the turn after records arrive
        self._pacer = Pacer(clock, max_gap, self._fan_out, defer=True)
        self.paced = max_gap > 0  # passes at most every max_gap (request_pass), else the rings run them
        self.on_empty: Optional[Callable[["Hub"], None]] = None
        self.rings_: list[PartitionRing] = []
        self.ring_set: set[PartitionRing] = set()
        self._own = rings is None
        self.shared = rings if rings is not None else Rings(backend, ring_size, clock)
        if self._own:
            self._attach()  # records may be handed in directly (_on_records)

    def start(self) -> Deferred[None]:
        """Find the end of every partition and start following it (through
        the shared readers)."""

        async def start() -> None:
            await self.shared.acquire(self.tps)
            self._attach()

        return ensureDeferred(start())

    def _attach(self) -> None:
        """Stand at the rings' heads and take every item that comes after."""
        self.rings_ = [self.shared.ring(tp) for tp in self.tps]
        self.ring_set = set(self.rings_)
        self.head = tuple(ring.head for ring in self.rings_)
        self._frags = id_parts(self.tps, self.head, self.suffix)
        self.seen_seq = self.shared.seq
        self.incoming = []
        for ring in self.rings_:
            ring.hubs.add(self)
        self._tail = self.shared

    def stop(self) -> None:
        if self._tail is not None:
            self._tail = None
            self.shared.release(self, self.rings_)
        self._pacer.cancel()
        self.shared.cancel_pass(self)
        self.incoming = []
        self.waiting.clear()
        for sub in list(self.subscriptions):
            sub.cancel()

    @property
    def head(self) -> Vector:
        """Where the set stands after the last item a pass took."""
        return self._head

    @head.setter
    def head(self, vector: Vector) -> None:
        self._head = tuple(vector)
        self._slots = list(vector)

    @property
    def ring_base(self) -> Vector:
        """The position before the oldest item each partition ring holds."""
        return tuple(ring.base for ring in self.rings_)

    @ring_base.setter
    def ring_base(self, vector: Vector) -> None:
        # Where the rings of a hub fed by hand start.
        for ring, slot in zip(self.rings_, vector):
            ring.reset(slot)

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
        sub._schedule()  # starts next turn, once the caller has wired the sink
        return sub

    @property
    def catching_up(self) -> int:
        """Clients that are not live (replaying, reading the log, paused)."""
        return len(self.subscriptions) - sum(len(subs) for _, subs in self.groups.values())

    def join_live(self, sub: Subscription) -> None:
        """A cursor at the head: the next passes feed it."""
        key = sub.filter.key if sub.filter is not None else ""
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = (sub.filter, set())
        group[1].add(sub)

    def leave_live(self, sub: Subscription) -> None:
        key = sub.filter.key if sub.filter is not None else ""
        group = self.groups.get(key)
        if group is not None:
            group[1].discard(sub)
            if not group[1]:
                del self.groups[key]

    def wait(self, sub: Subscription) -> None:
        """A cursor needs records the hub has not taken in yet: the pass that
        moves the head schedules it again."""
        self.waiting[sub] = None

    def forget(self, sub: Subscription) -> None:
        """A subscription is gone (it has left the live set already)."""
        self.subscriptions.discard(sub)
        self.waiting.pop(sub, None)
        if not self.subscriptions and self.on_empty is not None:
            self.on_empty(self)

    # -- the rings ----------------------------------------------------------------

    def contains(self, offsets: Sequence[int]) -> bool:
        """Whether the rings can serve a cursor at these offsets."""
        return all(
            ring.base[0] <= o <= high[0] for o, ring, high in zip(offsets, self.rings_, self.head)
        )

    def __len__(self) -> int:
        return sum(len(ring) for ring in self.rings_)

    # -- the reader ---------------------------------------------------------------

    def _on_records(self, records: list[Record]) -> None:
        """Records of this hub's partitions, handed in directly (a hub with
        its own rings): into the rings, and from there to the next pass."""
        self.shared.on_records(records)

    def request_pass(self) -> None:
        """Items are queued on a paced hub: its pass runs when due."""
        self._pacer.request()

    def _fan_out(self) -> None:
        """Move the head over the items the rings handed in and send them to
        the live clients, a batch at a time. With many sets this runs once
        per set for every event, so what it makes per item is the least a
        set needs: the head, and for live clients one Entry with its id."""
        items, self.incoming = self.incoming, []
        index, tps, suffix, frags, head = self.index, self.tps, self.suffix, self._frags, self._slots
        cut = self._cut
        moved = False  # the head moved after the last entry made
        for item in items:
            i = index.get(item.tp)
            if i is None or item.offset < head[i][0]:
                continue
            head[i] = item.slot
            frags[i] = item.fragment if i else first_part(item.fragment, suffix)
            self.seen_seq = item.seq
            data = item.data
            if data is None:
                why = item.why  # type: ignore[attr-defined]
                self.skipped_records += 1
                self.skipped_reasons[why] = self.skipped_reasons.get(why, 0) + 1
            if not self.groups:
                moved = True
                continue  # nobody live: only the head moves
            # the head as a batch is sent stands after its last entry
            self._head = vector = tuple(head)
            moved = False
            entry = Entry(item.seq, item, _LAZY, data, tps, vector)
            entry._id = b"".join(frags)
            cut.add(entry)
        if moved:
            self._head = tuple(head)
        cut.flush()
        self._wake()

    def _wake(self) -> None:
        """The head has moved: the waiting cursors look again (next turn,
        after this pass, so they replay up to seen_seq and then join live)."""
        if self.waiting:
            waiting, self.waiting = self.waiting, {}
            for sub in waiting:
                sub._schedule()

    def _send_live(self, entries: list[Entry]) -> None:
        last = entries[-1]
        for flt, subs in list(self.groups.values()):
            batch = Batch(matching(entries, flt), last)
            for sub in list(subs):  # the fan-out itself: keep it lean
                if sub.state is not GONE:
                    sub.last = last
                    try:
                        sub.sink.send_batch(batch)
                    except Exception:
                        # One failing sink must not cost the others their events.
                        log.failure("a sink failed during a fan-out pass; ending its stream")
                        self._drop(sub)

    def _drop(self, sub: Subscription) -> None:
        """End a subscription whose sink raised."""
        try:
            sub.sink.fail("internal error while sending events")
        except Exception:
            log.failure("a sink failed to end its stream")
        sub.cancel()


class Hubs:
    """Finds or starts the hub for a set of partitions; stops idle ones.
    All hubs share one set of partition rings and readers."""

    def __init__(self, backend: Backend, ring_size: int, linger: float, clock: IReactorTime,
                 max_gap: float = 0.0, ring_memory: int = 0, max_sets: int = 0):
        self.backend = backend
        self.max_gap = max_gap
        self.ring_size = ring_size
        self.linger = linger
        self.clock = clock
        self.max_sets = max_sets  # distinct sets at once (0: no bound)
        self.refused = 0  # sets refused by max_sets
        self.rings = Rings(backend, ring_size, clock, ring_memory)
        self.hubs: dict[tuple[TopicPartition, ...], Hub] = {}
        self._starting: dict[tuple[TopicPartition, ...], list[Deferred]] = {}
        self._idle: dict[Hub, Any] = {}

    def get(self, tps: Sequence[TopicPartition]) -> Deferred[Hub]:
        """The hub for these partitions; subscribe to it in the same turn.
        Fails with TooManySets when max_sets others are being served."""
        key = tuple(sorted(tps))
        hub = self.hubs.get(key)
        if hub is not None:
            self._check_idle(hub)
            return succeed(hub)
        waiting: Deferred[Hub] = Deferred()
        if key in self._starting:
            self._starting[key].append(waiting)
            return waiting
        if self.max_sets and len(self.hubs) + len(self._starting) >= self.max_sets and not self._make_room():
            self.refused += 1
            return fail(TooManySets(f"{self.max_sets} distinct stream and partition sets are being served"))
        self._starting[key] = [waiting]
        hub = Hub(self.backend, tps, self.ring_size, self.clock, self.max_gap, self.rings)
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

    def _make_room(self) -> bool:
        """Stop one lingering hub without clients, if there is one."""
        for hub in self._idle:
            if not hub.subscriptions:
                self._idle.pop(hub).cancel()
                self._close(hub)
                return True
        return False

    def _check_idle(self, hub: Hub) -> None:
        """Close a hub that stays without subscribers for `linger` seconds."""
        if hub not in self._idle:
            self._idle[hub] = self.clock.callLater(self.linger, self._close_if_idle, hub)

    def _close_if_idle(self, hub: Hub) -> None:
        del self._idle[hub]
        if hub.subscriptions:
            return
        self._close(hub)

    def _close(self, hub: Hub) -> None:
        key = tuple(sorted(hub.tps))
        if self.hubs.get(key) is hub:
            del self.hubs[key]
        hub.stop()

    def stop(self) -> None:
        for hub in list(self.hubs.values()):
            hub.on_empty = None  # its clients go now: no new idle timer
            hub.stop()
        self.hubs.clear()
        for call in self._idle.values():
            if call.active():
                call.cancel()
        self._idle.clear()
        self.rings.stop()
