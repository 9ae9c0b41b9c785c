"""The hub's fan-out pacing, on a deterministic clock (eventstreams.hub)."""
from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial import unittest

from eventstreams.backends.base import Record
from eventstreams.hub import Batch, Hub

TP = ("t", 0)


class SlowSink:
    """A live client whose writes take `seconds` of the (fake) clock."""

    def __init__(self, clock: Clock, seconds: float):
        self.clock, self.seconds = clock, seconds
        self.batches: list[list[int]] = []

    def send_batch(self, batch: Batch) -> None:
        self.batches.append([e.record.offset for e in batch.matched])
        self.clock.advance(self.seconds)

    def comment(self, text: str) -> None:
        pass

    def fail(self, reason: str) -> None:
        raise AssertionError(reason)


def record(offset: int) -> Record:
    return Record(TP[0], TP[1], offset, 1_000 + offset, None, b'{"meta":{},"n":%d}' % offset)


class Pacing(unittest.SynchronousTestCase):
    def hub(self, max_gap: float, pass_seconds: float) -> tuple[Clock, Hub, SlowSink]:
        clock = Clock()
        hub = Hub(None, [TP], 100, clock, max_gap)  # type: ignore[arg-type]  # records are fed by hand
        hub.head = hub.ring_base = ((0, None),)
        sink = SlowSink(clock, pass_seconds)
        hub.subscribe(sink)
        clock.advance(0)  # the cursor is at the head: it goes live
        return clock, hub, sink

    def test_a_pass_waits_twice_the_last_pass_and_takes_what_came_meanwhile(self):
        clock, hub, sink = self.hub(max_gap=0.1, pass_seconds=0.03)
        hub._on_records([record(0)])
        clock.advance(0)  # the first pass: at once, it takes 0.03 s
        self.assertEqual(sink.batches, [[0]])
        hub._on_records([record(1)])  # at 0.03: the next pass starts at 0.06
        clock.advance(0.02)
        hub._on_records([record(2)])
        self.assertEqual(sink.batches, [[0]])
        clock.advance(0.01)
        self.assertEqual(sink.batches, [[0], [1, 2]])

    def test_the_wait_is_at_most_max_gap(self):
        clock, hub, sink = self.hub(max_gap=0.1, pass_seconds=0.08)
        hub._on_records([record(0)])
        clock.advance(0)  # 0.08 s: twice that would be 0.16, max_gap makes it 0.1
        hub._on_records([record(1)])
        clock.advance(0.015)
        self.assertEqual(sink.batches, [[0]])
        clock.advance(0.006)  # 0.101
        self.assertEqual(sink.batches, [[0], [1]])

    def test_no_pacing_with_max_gap_zero(self):
        clock, hub, sink = self.hub(max_gap=0.0, pass_seconds=0.03)
        for n in range(3):
            hub._on_records([record(n)])
            clock.advance(0)
        self.assertEqual(sink.batches, [[0], [1], [2]])

    def test_a_quiet_hub_delivers_at_once(self):
        clock, hub, sink = self.hub(max_gap=0.1, pass_seconds=0.01)
        hub._on_records([record(0)])
        clock.advance(0)
        clock.advance(1.0)  # events further apart than two passes: no wait
        hub._on_records([record(1)])
        clock.advance(0)
        self.assertEqual(sink.batches, [[0], [1]])


class BrokenSink(SlowSink):
    """A client whose sink raises on every batch (a bug in one sink)."""

    def __init__(self, clock: Clock):
        super().__init__(clock, 0.0)
        self.failed: list[str] = []

    def send_batch(self, batch: Batch) -> None:
        super().send_batch(batch)
        raise RuntimeError("sink bug")

    def fail(self, reason: str) -> None:
        self.failed.append(reason)


class FanOutIsolation(unittest.SynchronousTestCase):
    def test_a_raising_sink_does_not_stop_the_pass_for_the_others(self):
        clock = Clock()
        hub = Hub(None, [TP], 100, clock, 0.0)  # records are fed by hand
        hub.head = hub.ring_base = ((0, None),)
        before, broken, after = SlowSink(clock, 0.0), BrokenSink(clock), SlowSink(clock, 0.0)
        # One group (no filter), served in subscription order: the broken
        # sink sits between two others.
        for sink in (before, broken, after):
            hub.subscribe(sink)
        clock.advance(0)  # all at the head: live
        hub._on_records([record(0)])
        clock.advance(0)
        hub._on_records([record(1)])
        clock.advance(0)
        self.assertEqual(before.batches, [[0], [1]])
        self.assertEqual(after.batches, [[0], [1]])
        # The broken client is ended (once), and its error logged once.
        self.assertEqual(broken.batches, [[0]])
        self.assertEqual(len(broken.failed), 1)
        errors = self.flushLoggedErrors(RuntimeError)
        self.assertEqual(len(errors), 1)
