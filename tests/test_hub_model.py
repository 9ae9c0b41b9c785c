"""The hub and its shared rings as a state machine, on a deterministic
clock over an in-memory log: random interleavings of appends, subscribes,
pauses, resumes and cancels, and every subscriber's sequence must be
exactly the log's, without gap or duplicate (eventstreams.hub, .rings)."""
from __future__ import annotations

from typing import Any, Callable

from hypothesis import HealthCheck, example, given, settings, strategies as st
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial import unittest

from eventstreams import hub as hub_module
from eventstreams.backends.base import Record, TopicPartition
from eventstreams.hub import Batch, Hubs, Subscription

TPS: list[TopicPartition] = [("t", 0), ("t", 1), ("u", 0)]


class MemoryTail:
    def __init__(self, log: "MemoryLog", positions: dict, on_records: Callable[[list[Record]], None]):
        self.log, self.positions, self.on_records = log, dict(positions), on_records
        self.stopped = False

    def deliver(self) -> None:
        """Everything past this tail's positions, as a log's tail would."""
        if self.stopped:
            return
        out = []
        for tp, position in self.positions.items():
            records = self.log.records[tp][position:]
            out += records
            self.positions[tp] = position + len(records)
        if out:
            self.on_records(out)

    def stop(self) -> None:
        self.stopped = True
        self.log.tails.discard(self)


class MemoryLog:
    """The Backend interface over lists, answering at once; tails see
    appends on the clock's next turn."""

    cluster = "memory"

    def __init__(self, clock: Clock):
        self.clock = clock
        self.records: dict[TopicPartition, list[Record]] = {tp: [] for tp in TPS}
        self.tails: set[MemoryTail] = set()
        self.now = 1_000
        self.low: dict[TopicPartition, int] = {tp: 0 for tp in TPS}  # first retained offset

    def prune(self, tp: TopicPartition, below: int) -> None:
        """Retention: records below `below` are gone."""
        self.low[tp] = below

    def identity(self) -> Deferred[str]:
        return succeed(self.cluster)

    def watermarks(self, tp: TopicPartition) -> Deferred[tuple[int, int]]:
        return succeed((self.low[tp], len(self.records[tp])))

    def read(self, positions: dict, max_records: int) -> Deferred[list[Record]]:
        out = [r for tp, position in positions.items() for r in self.records[tp][max(position, self.low[tp]):]]
        out.sort(key=lambda r: (r.timestamp, r.topic, r.partition))
        return succeed(out[:max_records])

    def tail(self, positions: dict, on_records: Callable[[list[Record]], None]) -> MemoryTail:
        tail = MemoryTail(self, positions, on_records)
        self.tails.add(tail)
        self.clock.callLater(0, tail.deliver)
        return tail

    def append(self, tp: TopicPartition, count: int) -> None:
        records = self.records[tp]
        for _ in range(count):
            self.now += 1 if len(records) % 3 else 0  # some records share a millisecond
            offset = len(records)
            records.append(Record(tp[0], tp[1], offset, self.now, None, b'{"o":%d}' % offset))
        for tail in list(self.tails):
            self.clock.callLater(0, tail.deliver)


class Sink:
    def __init__(self) -> None:
        self.got: dict[TopicPartition, list[int]] = {}
        self.last_id: Any = None
        self.subscription: Subscription | None = None
        self.comments: list[str] = []
        self.comments_expected = False

    def send_batch(self, batch: Batch) -> None:
        for entry in batch.matched:
            self.got.setdefault(entry.record.tp, []).append(entry.record.offset)
        self.last_id = batch.last.vector

    def comment(self, text: str) -> None:
        if not self.comments_expected:
            raise AssertionError(f"unexpected comment: {text}")
        self.comments.append(text)

    def fail(self, reason: str) -> None:
        raise AssertionError(reason)


operations = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(0, len(TPS) - 1), st.integers(1, 40)),
        st.tuples(st.just("subscribe"), st.integers(1, 2 ** len(TPS) - 1), st.integers(0, 60)),
        st.tuples(st.just("pause"), st.integers(0, 30)),
        st.tuples(st.just("resume"), st.integers(0, 30)),
        st.tuples(st.just("cancel"), st.integers(0, 30)),
        st.tuples(st.just("turn"), st.sampled_from([0, 0.01, 0.06, 1.0])),
        st.tuples(st.just("prune"), st.integers(0, len(TPS) - 1)),
    ),
    max_size=60,
)


def check_delivered(test: unittest.SynchronousTestCase, got: list[int], first: int, end: int, low: int,
                    complete: bool) -> None:
    """In order, no duplicate, nothing before `first`; only records lost to
    retention (below `low`) may be missing; complete: up to `end`."""
    test.assertEqual(got, sorted(set(got)), "out of order or duplicated")
    upto = end if complete else (got[-1] + 1 if got else first)
    missing = set(range(first, upto)) - set(got)
    test.assertEqual({o for o in missing if o >= low}, set(), f"gap from {first}")
    test.assertTrue(all(first <= o < end for o in got))


def settle(clock: Clock) -> None:
    """Run everything due now, and what that schedules for now: the cursors
    must get where they are going without the clock moving (a cursor that
    waits for a timer instead of a wake-up stays behind)."""
    clock.advance(0)


class Interleavings(unittest.SynchronousTestCase):
    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(operations, st.sampled_from([0, 3_000]), st.sampled_from([5, 1000]))
    # A client that subscribes after an append, before the reader has it:
    # it waits, and the pass that takes the records must wake it.
    @example([("subscribe", 1, 0), ("turn", 0), ("append", 0, 2), ("subscribe", 1, 1)], 0, 1000)
    # A cursor behind a log pruned to its end: its read finds nothing, and
    # the next record must wake it.
    @example([("append", 0, 3), ("subscribe", 1, 0), ("prune", 0), ("subscribe", 1, 3)], 0, 1000)
    def test_every_subscriber_sees_exactly_the_log(self, ops: list, memory: int, ring_size: int):
        clock = Clock()
        log = MemoryLog(clock)
        hubs = Hubs(log, ring_size, 0.5, clock, 0.0, memory)  # type: ignore[arg-type]
        clients: list[tuple[Sink, Subscription, dict[TopicPartition, int]]] = []
        for op in ops:
            if op[0] == "append":
                log.append(TPS[op[1]], op[2])
            elif op[0] == "subscribe":
                tps = [tp for n, tp in enumerate(TPS) if op[1] >> n & 1]
                d = hubs.get(tps)
                results: list = []
                d.addBoth(results.append)
                self.assertEqual(len(results), 1)  # the in-memory log answers at once
                hub = results[0]
                # start op[2] records back from the end of each partition (or at its start)
                start = {tp: max(0, len(log.records[tp]) - op[2]) for tp in tps}
                sink = Sink()
                sink.comments_expected = any(log.low.values())
                sub = hub.subscribe(sink, start)
                sink.subscription = sub
                clients.append((sink, sub, start))
            elif clients and op[0] in ("pause", "resume", "cancel"):
                _, sub, _ = clients[op[1] % len(clients)]
                {"pause": sub.pauseProducing, "resume": sub.resumeProducing, "cancel": sub.cancel}[op[0]]()
            elif op[0] == "turn":
                clock.advance(op[1])
            elif op[0] == "prune":
                tp = TPS[op[1]]
                log.prune(tp, len(log.records[tp]))  # all of it, so far: a cursor behind finds nothing
                for sink, _, _ in clients:
                    sink.comments_expected = True
        for _, sub, _ in clients:
            sub.resumeProducing()
        settle(clock)
        if any(log.low.values()):
            # A cursor behind a pruned log may wait for the next record:
            # append one to every partition and let the wake-ups run.
            for tp in TPS:
                log.append(tp, 1)
            settle(clock)
        for sink, sub, start in clients:
            for tp, first in start.items():
                check_delivered(self, sink.got.get(tp, []), first, len(log.records[tp]), log.low[tp],
                                complete=not sub.closed)
            if not sub.closed:
                self.assertTrue(sub.live)
                self.assertEqual([slot[0] for slot in sub.position()],
                                 [len(log.records[tp]) for tp in sub.hub.tps])
        self.assertLessEqual(hubs.rings.bytes, memory or hubs.rings.bytes)
        hubs.stop()
        self.assertEqual(log.tails, set())


class States(unittest.SynchronousTestCase):
    """One behaviour at a time, on the clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.log = MemoryLog(self.clock)
        self.hubs = Hubs(self.log, 5, 0.5, self.clock)  # type: ignore[arg-type]  # 5 items per ring
        self.addCleanup(self.hubs.stop)

    def hub(self, tps: list[TopicPartition]) -> Any:
        results: list = []
        self.hubs.get(tps).addBoth(results.append)
        return results[0]

    def settle(self) -> None:
        for _ in range(40):
            self.clock.advance(0.05)

    def test_a_cursor_behind_the_rings_reads_the_log_then_joins_live(self):
        self.log.append(TPS[0], 30)
        hub = self.hub([TPS[0]])
        sink = Sink()
        sub = hub.subscribe(sink, {TPS[0]: 3})
        self.assertEqual(sub.state, "catching up")
        self.settle()
        self.assertEqual(sub.state, "live")
        self.log.append(TPS[0], 2)
        self.settle()
        self.assertEqual(sink.got[TPS[0]], list(range(3, 32)))

    def test_pause_leaves_the_live_set_and_resume_continues_without_gap(self):
        hub = self.hub([TPS[0], TPS[1]])
        sink = Sink()
        sub = hub.subscribe(sink)
        self.settle()
        self.log.append(TPS[0], 3)
        self.settle()
        sub.pauseProducing()
        self.assertEqual((sub.state, hub.catching_up), ("paused", 1))
        self.log.append(TPS[0], 20)  # beyond the ring of 5: the resume reads the log
        self.log.append(TPS[1], 2)
        self.settle()
        self.assertEqual(sink.got[TPS[0]], [0, 1, 2])
        sub.resumeProducing()
        self.settle()
        self.assertEqual((sub.state, hub.catching_up), ("live", 0))
        self.assertEqual(sink.got, {TPS[0]: list(range(23)), TPS[1]: [0, 1]})

    def test_records_lost_to_retention_are_said_and_skipped(self):
        self.log.append(TPS[0], 30)
        self.log.prune(TPS[0], 12)
        hub = self.hub([TPS[0]])
        sink = Sink()
        sink.comments_expected = True
        hub.subscribe(sink, {TPS[0]: 4})
        self.settle()
        self.assertEqual(sink.got[TPS[0]], list(range(12, 30)))
        self.assertEqual(len(sink.comments), 1)
        self.assertIn("no records at offsets 4 to 11", sink.comments[0])

    def test_a_cursor_whose_read_finds_nothing_is_woken_by_the_next_record(self):
        self.log.append(TPS[0], 10)
        self.log.prune(TPS[0], 10)  # retention took everything: the ring starts empty at 10
        hub = self.hub([TPS[0]])
        sink = Sink()
        sink.comments_expected = True
        sub = hub.subscribe(sink, {TPS[0]: 4})
        self.clock.advance(0)  # behind the ring: reads the log, finds nothing, waits
        self.assertEqual((sub.state, sink.got), ("catching up", {}))
        self.log.append(TPS[0], 2)
        self.clock.advance(0)  # the reader brings 10 and 11; that pass wakes the cursor
        self.assertEqual((sub.state, sink.got), ("live", {TPS[0]: [10, 11]}))
        self.assertEqual(self.clock.seconds(), 0)
        self.assertIn("no records at offsets 4 to 9", sink.comments[0])

    def test_an_empty_read_in_a_quiet_stream_is_tried_again(self):
        # A Kafka read that times out answers nothing, though the log has
        # records; no record may come to wake the cursor.
        self.log.append(TPS[0], 30)  # the ring holds the last 5
        hub = self.hub([TPS[0]])
        read = self.log.read
        empty = [1]

        def flaky(positions: dict, max_records: int) -> Deferred[list[Record]]:
            if empty:
                empty.pop()
                return succeed([])
            return read(positions, max_records)

        self.log.read = flaky
        sink = Sink()
        sub = hub.subscribe(sink, {TPS[0]: 10})
        self.clock.advance(0)
        self.assertEqual((sub.state, sink.got), ("catching up", {}))
        self.clock.advance(hub_module.EMPTY_READ_RETRY)
        self.assertEqual((sub.state, sink.got), ("live", {TPS[0]: list(range(10, 30))}))
        self.assertEqual(self.clock.getDelayedCalls(), [])  # no retry left behind

    def test_ring_items_are_found_by_bisection_across_offset_gaps(self):
        ring = self.hubs.rings.ring(("g", 0))
        ring.reset((10, None))
        self.hubs.rings.on_records([Record("g", 0, o, 1_000 + o, None, b"{}") for o in (10, 11, 15, 16, 40)])
        self.assertEqual([i.offset for i in ring.items_from(0)], [10, 11, 15, 16, 40])
        self.assertEqual([i.offset for i in ring.items_from(12)], [15, 16, 40])
        self.assertEqual([i.offset for i in ring.items_from(16)], [16, 40])
        self.assertEqual([i.offset for i in ring.items_from(41)], [])

    def test_a_set_lingers_then_stops_with_its_readers(self):
        hub = self.hub([TPS[0], TPS[2]])
        sub = hub.subscribe(Sink())
        self.settle()
        self.assertEqual((len(self.hubs.rings.readers), len(self.log.tails)), (1, 1))
        sub.cancel()
        self.assertEqual(sub.state, "gone")
        self.clock.advance(0.4)
        self.assertIs(self.hub([TPS[2], TPS[0]]), hub)  # still there: a new client takes it
        self.clock.advance(0.6)
        self.assertEqual(self.hubs.hubs, {})
        self.assertEqual((len(self.hubs.rings.readers), len(self.log.tails), self.hubs.rings.bytes), (0, 0, 0))
