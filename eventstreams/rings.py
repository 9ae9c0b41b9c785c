"""One log reader and one ring per partition, shared by every stream set.

Clients choose their set of partitions (several streams in one URL, a
Last-Event-ID naming only some partitions), and the number of possible sets
is huge; what a set costs must not include a copy of the records. So the
records are kept here, once per partition, as compact items: the event's
compact JSON (what every sink sends), its position and mark, and its id
fragment (see positions.id_fragment), which every set that includes the
partition joins into its ids. A hub (eventstreams.hub) is what is left per
set: its position vector, its clients, and the frames of the pass being
sent.

All rings together hold at most `memory` bytes (oldest items go first, in
arrival order over all partitions) and each at most `ring_size` items;
a resume older than what is kept reads the log. Decoded events (for filters
and bridges) are not kept per item but in a small bounded cache.
"""
from __future__ import annotations

import heapq
import json
from bisect import bisect_left
from collections import OrderedDict, deque
from operator import attrgetter
from typing import Any, Iterator, Optional, Sequence

from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import strictjson
from .assignment import marks_at
from .backends.base import Backend, Record, TopicPartition
from .positions import Mark, advance, id_fragment

log = Logger()

Slot = tuple[int, Optional[Mark]]

# What an item costs beyond its data and fragment: the object, its mark
# and slot tuples and ints, the bytes headers, its ring slot and its place
# in the eviction order (measured with sys.getsizeof, rounded up).
ITEM_OVERHEAD = 460
EVENT_CACHE = 1024  # decoded events kept for filters and bridges, over all rings


def decode_checked(record: Record) -> tuple[Optional[dict], Optional[bytes], str]:
    """The event of a record with meta.topic/partition/offset (and key) set,
    its compact JSON, and why a record is skipped ('' when it is not):
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


def fragment_of(tp: TopicPartition, slot: Slot) -> bytes:
    """A partition's entry of an id as it follows another's, in UTF-8."""
    return b"," + id_fragment(tp[0], tp[1], slot[0], slot[1]).encode("utf-8") + b"}"


class Item:
    """One record as a ring keeps it (it stands in for the Record: topic,
    partition, offset, timestamp). `data` is None for a skipped record: it
    only moves the id."""

    __slots__ = ("seq", "topic", "partition", "tp", "offset", "mark", "slot", "data", "fragment")

    def __init__(self, seq: int, topic: str, partition: int, offset: int, mark: Mark,
                 data: Optional[bytes], tp: Optional[TopicPartition] = None):
        self.seq = seq  # arrival order over all rings
        self.topic = topic
        self.partition = partition
        # made once (its ring's): every set that takes the item looks it up
        self.tp = tp if tp is not None else (topic, partition)
        self.offset = offset
        self.mark = mark  # the partition's mark after this record
        self.slot = (offset + 1, mark)  # where a set stands after it, shared by all
        self.data = data
        self.fragment = fragment_of(self.tp, self.slot)  # every set's ids join it (hub.id_parts)

    @property
    def timestamp(self) -> int:
        return self.mark[0] - 1

    def size(self) -> int:
        return (len(self.data) if self.data is not None else 0) + len(self.fragment) + ITEM_OVERHEAD


class Skipped(Item):
    """A record that is not a strict JSON object, and why (decode_checked)."""

    __slots__ = ("why",)

    def __init__(self, seq: int, topic: str, partition: int, offset: int, mark: Mark, why: str,
                 tp: Optional[TopicPartition] = None):
        super().__init__(seq, topic, partition, offset, mark, None, tp)
        self.why = why


class EventCache:
    """Decoded events of recent items, at most `limit` of them: filters and
    bridges need the object, the rings keep only the bytes."""

    def __init__(self, limit: int = EVENT_CACHE):
        self.limit = limit
        self._events: OrderedDict[Item, dict] = OrderedDict()

    def put(self, item: Item, event: dict) -> None:
        events = self._events
        events[item] = event
        if len(events) > self.limit:
            events.popitem(last=False)

    def get(self, item: Any) -> Optional[dict]:
        """The event of an item, decoded again when it is no longer cached."""
        if item.data is None:
            return None
        event = self._events.get(item)
        if event is None:
            event = json.loads(item.data)
            self.put(item, event)
        return event


events = EventCache()

_offset_of = attrgetter("offset")
_seq_of = attrgetter("seq")


class PartitionRing:
    """The recent items of one partition, in offset order."""

    __slots__ = ("tp", "items", "first", "head", "base", "hubs", "reader", "bytes")

    def __init__(self, tp: TopicPartition, slot: Slot = (0, None)):
        self.tp = tp
        self.items: list[Optional[Item]] = []  # items[first:] are held
        self.first = 0
        self.head: Slot = slot  # next offset and mark after the newest item
        self.base: Slot = slot  # the position before the oldest item
        self.hubs: set[Any] = set()  # the hubs (sets) that include this partition
        self.reader: Optional[Reader] = None
        self.bytes = 0

    def __len__(self) -> int:
        return len(self.items) - self.first

    def reset(self, slot: Slot) -> int:
        """Start over at slot; answers the bytes freed."""
        freed = self.bytes
        self.items, self.first, self.bytes = [], 0, 0
        self.head = self.base = slot
        return freed

    def oldest(self) -> Optional[Item]:
        return self.items[self.first] if self.first < len(self.items) else None

    def push(self, item: Item) -> int:
        self.items.append(item)
        self.head = (item.offset + 1, item.mark)
        size = item.size()
        self.bytes += size
        return size

    def drop_oldest(self) -> int:
        """Forget the oldest item; answers the bytes freed."""
        items = self.items
        item = items[self.first]
        assert item is not None
        items[self.first] = None
        self.first += 1
        self.base = (item.offset + 1, item.mark)
        if self.first > 1024 and self.first * 2 > len(items):
            del items[: self.first]
            self.first = 0
        size = item.size()
        self.bytes -= size
        return size

    def items_from(self, offset: int) -> Iterator[Item]:
        """The held items at or after offset, in order."""
        items = self.items
        start = bisect_left(items, offset, lo=self.first, key=_offset_of)
        for n in range(start, len(items)):
            yield items[n]  # type: ignore[misc]


class Reader:
    """One tail of the log for some partitions, feeding their rings."""

    def __init__(self, rings: "Rings", tps: Sequence[TopicPartition]):
        self.rings = rings
        self.tps = tuple(tps)
        self.tail: Any = None
        self.ready = False
        self.stopped = False
        self._failure: Optional[Failure] = None
        self._waiters: list[Deferred[None]] = []

    def when_ready(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if self.ready:
            d.callback(None)
        elif self._failure is not None:
            d.errback(self._failure)
        else:
            self._waiters.append(d)
        return d

    def start(self) -> None:
        """Find the end of every partition (and its mark) and follow it."""
        ensureDeferred(self._start()).addBoth(self._started)

    async def _start(self) -> None:
        backend, tps = self.rings.backend, self.tps
        try:
            marks = await gatherResults([backend.watermarks(tp) for tp in tps], consumeErrors=True)
        except Exception as e:
            if hasattr(e, "subFailure"):  # the first error itself, not FirstError
                e.subFailure.raiseException()
            raise
        slots = await marks_at(backend, tps, marks, self.rings.clock)
        if self.stopped:
            return
        for tp, slot in zip(tps, slots):
            ring = self.rings.ring(tp)
            self.rings.freed(ring.reset(slot))
            ring.reader = self
        self.tail = backend.tail({tp: slot[0] for tp, slot in zip(tps, slots)}, self.rings.on_records)

    def _started(self, result: Any) -> None:
        waiters, self._waiters = self._waiters, []
        if isinstance(result, Failure):
            self._failure = result
            self.rings._reader_failed(self)
            for w in waiters:
                w.errback(result)
            return
        self.ready = True
        for w in waiters:
            w.callback(None)

    def stop(self) -> None:
        self.stopped = True
        if self.tail is not None:
            self.tail.stop()
            self.tail = None


class Rings:
    """The partition rings and their readers, shared by every hub."""

    def __init__(self, backend: Backend, ring_size: int, clock: IReactorTime, memory: int = 0):
        self.backend = backend
        self.ring_size = ring_size  # items per partition, at most
        self.memory = memory  # bytes over all rings, at most (0: no bound but ring_size)
        self.clock = clock
        self.rings: dict[TopicPartition, PartitionRing] = {}
        self.readers: set[Reader] = set()
        self._starting: dict[TopicPartition, Reader] = {}
        self._order: deque[tuple[PartitionRing, Item]] = deque()  # arrival order, for eviction
        self.bytes = 0
        self.entries = 0
        self.seq = 0  # the last item's
        self.skipped_records = 0
        self._due: dict[Any, None] = {}  # hubs whose pass runs next turn, in order
        self._call: Any = None

    def ring(self, tp: TopicPartition) -> PartitionRing:
        ring = self.rings.get(tp)
        if ring is None:
            ring = self.rings[tp] = PartitionRing(tp)
        return ring

    def freed(self, size: int) -> None:
        self.bytes -= size

    # -- readers ------------------------------------------------------------

    async def acquire(self, tps: Sequence[TopicPartition]) -> None:
        """Make sure every one of tps has a running reader (one reader is
        started for all those that have none)."""
        missing = [tp for tp in tps if tp not in self._starting
                   and (tp not in self.rings or self.rings[tp].reader is None)]
        if missing:
            reader = Reader(self, missing)
            self.readers.add(reader)
            for tp in missing:
                self._starting[tp] = reader
            reader.start()
        for reader in {self._starting[tp] for tp in tps if tp in self._starting}:
            await reader.when_ready()
            for tp in reader.tps:
                if self._starting.get(tp) is reader:
                    del self._starting[tp]

    def _reader_failed(self, reader: Reader) -> None:
        self.readers.discard(reader)
        for tp in reader.tps:
            if self._starting.get(tp) is reader:
                del self._starting[tp]

    def release(self, hub: Any, rings: Sequence[PartitionRing]) -> None:
        """A hub no longer follows these rings: stop the readers nobody needs."""
        readers = set()
        for ring in rings:
            ring.hubs.discard(hub)
            if ring.reader is not None:
                readers.add(ring.reader)
        for reader in readers:
            if all(not self.rings[tp].hubs for tp in reader.tps if tp in self.rings):
                self._stop_reader(reader)

    def _stop_reader(self, reader: Reader) -> None:
        reader.stop()
        self.readers.discard(reader)
        for tp in reader.tps:
            ring = self.rings.get(tp)
            if ring is not None and ring.reader is reader:
                self.entries -= len(ring)
                self.freed(ring.reset(ring.head))
                ring.reader = None
                del self.rings[tp]

    def stop(self) -> None:
        for reader in list(self.readers):
            self._stop_reader(reader)
        self._order.clear()
        self._due.clear()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    # -- passes -------------------------------------------------------------

    def cancel_pass(self, hub: Any) -> None:
        self._due.pop(hub, None)

    def _passes(self) -> None:
        self._call = None
        due, self._due = self._due, {}
        for hub in due:
            try:
                hub._fan_out()
            except Exception:
                log.failure("a fan-out pass failed")

    # -- records ------------------------------------------------------------

    def on_records(self, records: list[Record]) -> None:
        """Keep the records in their rings and hand them to the hubs that
        include their partitions, in arrival order."""
        rings = self.rings
        added: list[tuple[PartitionRing, Item]] = []
        for record in records:
            ring = rings.get((record.topic, record.partition))
            if ring is None or record.offset < ring.head[0]:
                continue  # not followed, or already seen (a reader restart)
            mark = advance(ring.head[1], record.timestamp)
            event, data, why = decode_checked(record)
            self.seq += 1
            if event is None:
                item: Item = Skipped(self.seq, record.topic, record.partition, record.offset, mark, why, ring.tp)
                self.skipped_records += 1
                log.warn(
                    "skipping a record that is not a strict JSON object ({why}): {topic}/{partition}@{offset}",
                    why=why, topic=record.topic, partition=record.partition, offset=record.offset,
                )
            else:
                item = Item(self.seq, record.topic, record.partition, record.offset, mark, data, ring.tp)
                events.put(item, event)
            self.bytes += ring.push(item)
            self.entries += 1
            self._order.append((ring, item))
            if len(ring) > self.ring_size:
                self.bytes -= ring.drop_oldest()
                self.entries -= 1
            added.append((ring, item))
        if not added:
            return
        self._evict()
        self._hand_over(added)

    def _evict(self) -> None:
        """Drop the oldest items over all rings until they fit the budget."""
        order = self._order
        if self.memory:
            while self.bytes > self.memory and order:
                ring, item = order.popleft()
                if ring.oldest() is item:
                    self.bytes -= ring.drop_oldest()
                    self.entries -= 1
        if len(order) > 2 * self.entries + 4096:
            # Items dropped by ring_size or with their reader: forget them.
            self._order = deque(pair for pair in order if pair[0].reader is not None
                                and pair[0].first < len(pair[0].items)
                                and pair[1].seq >= pair[0].items[pair[0].first].seq)  # type: ignore[union-attr]

    def _hand_over(self, added: list[tuple[PartitionRing, Item]]) -> None:
        """Queue the items for every hub whose set includes their partitions
        (hub.incoming) and run its pass (hub._fan_out) on the next turn,
        which takes what else arrives in this one: one timer for every hub,
        however many sets there are; a paced hub's pass runs when due
        (hub.request_pass)."""
        touched = {ring for ring, _ in added}
        if len(touched) == 1:
            hubs: Any = added[0][0].hubs
        else:
            hubs = set()
            for ring in touched:
                hubs |= ring.hubs
        everything = [item for _, item in added]
        due = self._due
        for hub in hubs:
            mine = hub.ring_set
            hub.incoming.extend(everything if touched <= mine else [item for ring, item in added if ring in mine])
            if hub.paced:
                hub.request_pass()
            else:
                due[hub] = None
        if due and self._call is None:
            self._call = self.clock.callLater(0, self._passes)


def merged(iterators: list[Iterator[Item]]) -> Iterator[Item]:
    """Items of several rings in arrival order."""
    if len(iterators) == 1:
        return iterators[0]
    return heapq.merge(*iterators, key=_seq_of)

