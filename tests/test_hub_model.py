"""The hub and its shared rings as a state machine, on a deterministic
clock over an in-memory log: random interleavings of appends, subscribes,
pauses, resumes and cancels, and every subscriber's sequence must be
exactly the log's, without gap or duplicate (eventstreams.hub, .rings)."""
from __future__ import annotations

from typing import Any, Callable

from hypothesis import HealthCheck, given, settings, strategies as st
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial import unittest

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

    def identity(self) -> Deferred[str]:
        return succeed(self.cluster)

    def watermarks(self, tp: TopicPartition) -> Deferred[tuple[int, int]]:
        return succeed((0, len(self.records[tp])))

    def read(self, positions: dict, max_records: int) -> Deferred[list[Record]]:
        out = [r for tp, position in positions.items() for r in self.records[tp][position:]]
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

    def send_batch(self, batch: Batch) -> None:
        for entry in batch.matched:
            self.got.setdefault(entry.record.tp, []).append(entry.record.offset)
        self.last_id = batch.last.vector

    def comment(self, text: str) -> None:
        raise AssertionError(f"unexpected comment: {text}")

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
    ),
    max_size=60,
)


class Interleavings(unittest.SynchronousTestCase):
    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(operations, st.sampled_from([0, 3_000]), st.sampled_from([5, 1000]))
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
                sub = hub.subscribe(sink, start)
                sink.subscription = sub
                clients.append((sink, sub, start))
            elif clients and op[0] in ("pause", "resume", "cancel"):
                _, sub, _ = clients[op[1] % len(clients)]
                {"pause": sub.pauseProducing, "resume": sub.resumeProducing, "cancel": sub.cancel}[op[0]]()
            elif op[0] == "turn":
                clock.advance(op[1])
        for _, sub, _ in clients:
            sub.resumeProducing()
        for _ in range(200):
            clock.advance(0.05)
        for sink, sub, start in clients:
            for tp, first in start.items():
                got = sink.got.get(tp, [])
                end = len(log.records[tp])
                if sub.closed:
                    self.assertEqual(got, list(range(first, first + len(got))))  # a prefix
                else:
                    self.assertEqual(got, list(range(first, end)), f"{tp} from {first}")
            if not sub.closed:
                self.assertTrue(sub.live)
                self.assertEqual([slot[0] for slot in sub.position()],
                                 [len(log.records[tp]) for tp in sub.hub.tps])
        self.assertLessEqual(hubs.rings.bytes, memory or hubs.rings.bytes)
        hubs.stop()
        self.assertEqual(log.tails, set())
