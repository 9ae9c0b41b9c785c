"""Integration tests of the embedded (SQLite) event log, on a real file and
the real reactor."""
from __future__ import annotations

import os
import sqlite3
import threading
import time
import zlib

from twisted.internet import defer
from twisted.trial import unittest

from eventstreams.backends.base import BackendUnavailable, Record
from eventstreams.backends.embedded import EmbeddedBackend, EmbeddedLogError

from .support import Waiters, turn, wait_for

HOUR_MS = 3600 * 1000

# zlib.crc32 of these keys, so the partition of a key is known in advance:
# b"a" -> 3904355907, b"b" -> 1908338681, b"d" -> 2564639436.
KEY_P0 = b"d"  # partition 0 of 2
KEY_P1 = b"a"  # partition 1 of 2


def waited(condition, what: str, timeout: float = 10) -> defer.Deferred:
    """wait_for, for inlineCallbacks."""
    return defer.ensureDeferred(wait_for(condition, what, timeout))


@defer.inlineCallbacks
def settled(log: EmbeddedBackend):
    """A poll of the file has run and no tail is reading: what the log would
    still deliver has been delivered (the marker before a check that
    nothing more came)."""
    yield log._poll()
    yield waited(lambda: not any(tail._reading for tail in log._tails), "the tails to be idle")


class Collector(Waiters):
    """An on_records callback that remembers what it got."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[Record] = []
        self.batches: list[list[Record]] = []

    def __call__(self, records: list[Record]) -> None:
        self.batches.append(list(records))
        self.records.extend(records)
        self._check_waiters()

    def progress(self) -> str:
        return f"got {len(self.records)} records"

    def wait_records(self, count: int, timeout: float = 15) -> defer.Deferred:
        """Fires once `count` records have come."""
        return self.wait_for(lambda: len(self.records) >= count, timeout)

    def offsets(self, tp: tuple[str, int]) -> list[int]:
        return [r.offset for r in self.records if r.tp == tp]


class EmbeddedBackendTests(unittest.TestCase):
    timeout = 60

    def make(self, retention: float = 0, partitions: int = 1, path: str | None = None, **kw):
        if path is None:
            path = os.path.join(self.mktemp(), "log", "events.sqlite")
        backend = EmbeddedBackend(path, retention, partitions=partitions, **kw)
        backend.start()
        self.addCleanup(backend.stop)
        return backend

    # -- append and read -----------------------------------------------------

    @defer.inlineCallbacks
    def test_append_read_round_trip(self):
        log = self.make(partitions=3)
        stored = yield log.append(
            "t", [(b"a", b"v1"), (None, b"v2"), (b"", b"v3"), (None, b"v4")], timestamp=1000
        )
        # Keys hash with crc32 (b"a" -> 0 of 3, b"" -> 0); None keys go round robin.
        self.assertEqual(
            [(r.partition, r.offset, r.key, r.value) for r in stored],
            [(0, 0, b"a", b"v1"), (0, 1, None, b"v2"), (0, 2, b"", b"v3"), (1, 0, None, b"v4")],
        )
        self.assertEqual({r.timestamp for r in stored}, {1000})
        self.assertEqual({r.topic for r in stored}, {"t"})
        got = yield log.read({("t", 0): 0, ("t", 1): 0, ("t", 2): 0}, 100)
        self.assertEqual(sorted(got, key=lambda r: (r.partition, r.offset)), stored)
        # Reading from the middle answers the rest.
        got = yield log.read({("t", 0): 1}, 100)
        self.assertEqual([(r.offset, r.key, r.value) for r in got], [(1, None, b"v2"), (2, b"", b"v3")])
        parts = yield log.partitions("t")
        self.assertEqual(parts, [0, 1, 2])
        parts = yield log.partitions("never-written")
        self.assertEqual(parts, [0, 1, 2])

    @defer.inlineCallbacks
    def test_append_without_timestamp_uses_now(self):
        log = self.make()
        before = int(time.time() * 1000)
        stored = yield log.append("t", [(None, b"x")])
        after = int(time.time() * 1000)
        self.assertTrue(before <= stored[0].timestamp <= after, (before, stored, after))

    @defer.inlineCallbacks
    def test_append_rejects_non_bytes(self):
        log = self.make()
        yield self.assertFailure(log.append("t", [(None, "text")]), TypeError)
        yield self.assertFailure(log.append("t", [("key", b"v")]), TypeError)
        # Nothing was written.
        marks = yield log.watermarks(("t", 0))
        self.assertEqual(marks, (0, 0))
        self.assertEqual((yield log.append("t", [])), [])

    @defer.inlineCallbacks
    def test_offsets_gap_free_per_partition(self):
        log = self.make(partitions=2)
        for i in range(5):
            yield log.append("t", [(None, b"%d-%d" % (i, j)) for j in range(3)])
        yield log.append("u", [(None, b"other topic")])
        got = yield log.read({("t", 0): 0, ("t", 1): 0}, 100)
        p0 = [r.offset for r in got if r.partition == 0]
        p1 = [r.offset for r in got if r.partition == 1]
        # 15 keyless records alternate: 8 to partition 0, 7 to partition 1.
        self.assertEqual(p0, list(range(8)))
        self.assertEqual(p1, list(range(7)))
        self.assertEqual((yield log.watermarks(("t", 0))), (0, 8))
        self.assertEqual((yield log.watermarks(("t", 1))), (0, 7))
        # Topics have their own offsets.
        self.assertEqual((yield log.watermarks(("u", 0))), (0, 1))

    @defer.inlineCallbacks
    def test_key_hashing_is_stable(self):
        path = os.path.join(self.mktemp(), "events.sqlite")
        log = self.make(partitions=4, path=path)
        self.assertEqual(zlib.crc32(b"en.wikipedia.org"), 2066466693)
        first = yield log.append("t", [(b"en.wikipedia.org", b"1"), (b"b", b"2"), (b"d", b"3")])
        self.assertEqual([r.partition for r in first], [2066466693 % 4, 1908338681 % 4, 2564639436 % 4])
        self.assertEqual([r.partition for r in first], [1, 1, 0])
        again = yield log.append("t", [(b"d", b"4"), (b"en.wikipedia.org", b"5")])
        self.assertEqual([(r.partition, r.offset) for r in again], [(0, 1), (1, 2)])
        yield log.stop()
        reopened = self.make(partitions=4, path=path)
        after = yield reopened.append("t", [(b"en.wikipedia.org", b"6")])
        self.assertEqual([(r.partition, r.offset) for r in after], [(1, 3)])

    # -- watermarks and time ------------------------------------------------

    @defer.inlineCallbacks
    def test_watermarks(self):
        log = self.make(partitions=2)
        self.assertEqual((yield log.watermarks(("t", 0))), (0, 0))
        self.assertEqual((yield log.watermarks(("nothing", 1))), (0, 0))
        yield log.append("t", [(KEY_P1, b"x")] * 4)
        self.assertEqual((yield log.watermarks(("t", 1))), (0, 4))
        self.assertEqual((yield log.watermarks(("t", 0))), (0, 0))

    @defer.inlineCallbacks
    def test_offsets_for_time(self):
        log = self.make(partitions=2)
        yield log.append("t", [(KEY_P0, b"a")], timestamp=1000)
        yield log.append("t", [(KEY_P0, b"b")], timestamp=2000)
        yield log.append("t", [(KEY_P0, b"c"), (KEY_P0, b"d")], timestamp=3000)
        tps = [("t", 0), ("t", 1)]
        self.assertEqual((yield log.offsets_for_time(tps, 0)), {("t", 0): 0, ("t", 1): 0})
        self.assertEqual((yield log.offsets_for_time(tps, 1000)), {("t", 0): 0, ("t", 1): 0})
        self.assertEqual((yield log.offsets_for_time(tps, 1500)), {("t", 0): 1, ("t", 1): 0})
        self.assertEqual((yield log.offsets_for_time(tps, 2000)), {("t", 0): 1, ("t", 1): 0})
        # Two records share 3000: the first of them.
        self.assertEqual((yield log.offsets_for_time(tps, 2001)), {("t", 0): 2, ("t", 1): 0})
        # After all: the next offset.
        self.assertEqual((yield log.offsets_for_time(tps, 3001)), {("t", 0): 4, ("t", 1): 0})
        self.assertEqual((yield log.offsets_for_time([], 3001)), {})

    @defer.inlineCallbacks
    def test_timestamps_never_go_down_in_a_partition(self):
        log = self.make(partitions=2)
        a = yield log.append("t", [(KEY_P0, b"a")], timestamp=5000)
        b = yield log.append("t", [(KEY_P0, b"b"), (KEY_P1, b"other")], timestamp=3000)
        c = yield log.append("t", [(KEY_P0, b"c")], timestamp=6000)
        self.assertEqual(a[0].timestamp, 5000)
        # Raised to the partition's last timestamp; the other partition keeps 3000.
        self.assertEqual([(r.partition, r.timestamp) for r in b], [(0, 5000), (1, 3000)])
        self.assertEqual(c[0].timestamp, 6000)
        got = yield log.read({("t", 0): 0}, 10)
        self.assertEqual([r.timestamp for r in got], [5000, 5000, 6000])
        offsets = yield log.offsets_for_time([("t", 0), ("t", 1)], 4000)
        self.assertEqual(offsets, {("t", 0): 0, ("t", 1): 1})
        # The last timestamp survives a restart.
        yield log.stop()
        reopened = self.make(partitions=2, path=log.path)
        d = yield reopened.append("t", [(KEY_P0, b"d")], timestamp=1)
        self.assertEqual((d[0].offset, d[0].timestamp), (3, 6000))

    # -- read ----------------------------------------------------------------

    @defer.inlineCallbacks
    def test_read_merges_partitions_by_timestamp(self):
        log = self.make(partitions=2)
        plan = [(KEY_P0, 100), (KEY_P1, 150), (KEY_P1, 160), (KEY_P0, 200), (KEY_P1, 250), (KEY_P0, 300)]
        for i, (key, ts) in enumerate(plan):
            yield log.append("t", [(key, b"%d" % i)], timestamp=ts)
        positions = {("t", 0): 0, ("t", 1): 0}
        got = yield log.read(positions, 100)
        self.assertEqual([r.value for r in got], [b"0", b"1", b"2", b"3", b"4", b"5"])
        self.assertEqual([r.timestamp for r in got], [100, 150, 160, 200, 250, 300])
        self.assertEqual([(r.partition, r.offset) for r in got], [(0, 0), (1, 0), (1, 1), (0, 1), (1, 2), (0, 2)])
        # max_records cuts the merged list, each partition keeping its order.
        got = yield log.read(positions, 3)
        self.assertEqual([(r.partition, r.offset) for r in got], [(0, 0), (1, 0), (1, 1)])
        got = yield log.read({("t", 0): 1, ("t", 1): 2}, 2)
        self.assertEqual([(r.partition, r.offset) for r in got], [(0, 1), (1, 2)])
        # Every position at the end: nothing.
        self.assertEqual((yield log.read({("t", 0): 3, ("t", 1): 3}, 10)), [])
        self.assertEqual((yield log.read({("t", 0): 99}, 10)), [])
        self.assertEqual((yield log.read({("missing", 0): 0}, 10)), [])
        self.assertEqual((yield log.read(positions, 0)), [])

    @defer.inlineCallbacks
    def test_read_same_timestamp_keeps_partition_order(self):
        log = self.make(partitions=2)
        yield log.append("t", [(KEY_P1, b"%d" % i) for i in range(5)] + [(KEY_P0, b"z")], timestamp=7)
        got = yield log.read({("t", 0): 0, ("t", 1): 0}, 4)
        self.assertEqual([(r.partition, r.offset) for r in got], [(0, 0), (1, 0), (1, 1), (1, 2)])

    # -- retention -----------------------------------------------------------

    @defer.inlineCallbacks
    def test_prune_deletes_by_age_and_offsets_continue(self):
        path = os.path.join(self.mktemp(), "events.sqlite")
        log = self.make(retention=3600, partitions=2, path=path)
        now = int(time.time() * 1000)
        yield log.append("t", [(KEY_P0, b"old%d" % i) for i in range(3)], timestamp=now - 2 * HOUR_MS)
        yield log.append("t", [(KEY_P1, b"old")] * 2, timestamp=now - 2 * HOUR_MS)
        yield log.append("t", [(KEY_P0, b"new%d" % i) for i in range(2)], timestamp=now)
        self.assertEqual((yield log.watermarks(("t", 0))), (0, 5))

        deleted = yield log.prune()
        self.assertEqual(deleted, 5)
        self.assertEqual((yield log.prune()), 0)
        self.assertEqual((yield log.watermarks(("t", 0))), (3, 5))
        # Everything of partition 1 is gone, its next offset is kept.
        self.assertEqual((yield log.watermarks(("t", 1))), (2, 2))

        # A read from below the first retained offset starts at it.
        got = yield log.read({("t", 0): 0, ("t", 1): 0}, 10)
        self.assertEqual([(r.partition, r.offset, r.value) for r in got], [(0, 3, b"new0"), (0, 4, b"new1")])
        offsets = yield log.offsets_for_time([("t", 0), ("t", 1)], 0)
        self.assertEqual(offsets, {("t", 0): 3, ("t", 1): 2})

        more = yield log.append("t", [(KEY_P0, b"a"), (KEY_P1, b"b")])
        self.assertEqual([(r.partition, r.offset) for r in more], [(0, 5), (1, 2)])

        # Offsets are not reused after a restart either, even for a
        # partition emptied by retention.
        yield log.prune()
        yield log.stop()
        yield self.assertFailure(log.prune(), BackendUnavailable)
        reopened = self.make(retention=3600, partitions=2, path=path)
        self.assertEqual((yield reopened.watermarks(("t", 0))), (3, 6))
        self.assertEqual((yield reopened.watermarks(("t", 1))), (2, 3))
        after = yield reopened.append("t", [(KEY_P0, b"c"), (KEY_P1, b"d")])
        self.assertEqual([(r.partition, r.offset) for r in after], [(0, 6), (1, 3)])

    @defer.inlineCallbacks
    def test_prune_empties_a_partition_then_reopen(self):
        path = os.path.join(self.mktemp(), "events.sqlite")
        log = self.make(retention=60, path=path)
        old = int(time.time() * 1000) - 10 * 60 * 1000
        yield log.append("t", [(None, b"%d" % i) for i in range(4)], timestamp=old)
        self.assertEqual((yield log.prune()), 4)
        self.assertEqual((yield log.watermarks(("t", 0))), (4, 4))
        self.assertEqual((yield log.read({("t", 0): 0}, 10)), [])
        yield log.stop()
        reopened = self.make(retention=60, path=path)
        self.assertEqual((yield reopened.watermarks(("t", 0))), (4, 4))
        stored = yield reopened.append("t", [(None, b"next")])
        self.assertEqual(stored[0].offset, 4)

    @defer.inlineCallbacks
    def test_prune_is_a_no_op_without_retention(self):
        log = self.make(retention=0)
        yield log.append("t", [(None, b"ancient")], timestamp=1)
        self.assertEqual((yield log.prune()), 0)
        self.assertEqual((yield log.watermarks(("t", 0))), (0, 1))

    @defer.inlineCallbacks
    def test_prune_runs_on_a_timer(self):
        # retention 1 s: the timer runs every second.
        log = self.make(retention=1)
        yield log.append("t", [(None, b"x")] * 3, timestamp=int(time.time() * 1000) - 5000)
        self.assertEqual((yield log.watermarks(("t", 0))), (0, 3))
        yield waited(lambda: log.watermarks(("t", 0)).addCallback(lambda marks: marks == (3, 3)),
                     "the timer to prune the old records", timeout=5)

    # -- the file ------------------------------------------------------------

    @defer.inlineCallbacks
    def test_file_is_in_wal_mode(self):
        log = self.make()
        yield log.append("t", [(None, b"x")])
        self.assertTrue(os.path.isfile(log.path))
        conn = sqlite3.connect(log.path)
        try:
            self.assertEqual(conn.execute("PRAGMA journal_mode").fetchone()[0], "wal")
            self.assertEqual(
                conn.execute("SELECT topic, partition, offset, value FROM records").fetchall(),
                [("t", 0, 0, b"x")],
            )
            self.assertEqual(
                conn.execute("SELECT topic, partition, next_offset FROM partitions").fetchall(),
                [("t", 0, 1)],
            )
        finally:
            conn.close()
        # synchronous=NORMAL (1) on the writer's connection.
        self.assertEqual(log._wconn.execute("PRAGMA synchronous").fetchone()[0], 1)

    def test_start_on_a_file_that_is_not_a_database(self):
        path = os.path.join(self.mktemp(), "events.sqlite")
        os.makedirs(os.path.dirname(path))
        with open(path, "wb") as f:
            f.write(b"this is not an SQLite database\n" * 200)
        log = EmbeddedBackend(path, 0)
        e = self.assertRaises(EmbeddedLogError, log.start)
        self.assertIn(path, str(e))
        self.assertIn("not a database", str(e))
        self.assertFalse(log._running)
        self.assertRaises(BackendUnavailable, log.tail, {("t", 0): 0}, lambda records: None)

    def test_start_where_the_directory_cannot_be_made(self):
        blocker = self.mktemp()
        with open(blocker, "w") as f:
            f.write("a file, not a directory")
        path = os.path.join(blocker, "sub", "events.sqlite")
        e = self.assertRaises(EmbeddedLogError, EmbeddedBackend(path, 0).start)
        self.assertIn(path, str(e))

    @defer.inlineCallbacks
    def test_stop_waits_for_pending_work_then_refuses(self):
        path = os.path.join(self.mktemp(), "events.sqlite")
        log = self.make(path=path)
        pending = log.append("t", [(None, b"%d" % i) for i in range(100)])
        stopped = log.stop()
        # stop() does not block the reactor on the pending write.
        self.assertFalse(stopped.called)
        stored = yield pending
        self.assertEqual(len(stored), 100)
        yield stopped
        yield self.assertFailure(log.append("t", [(None, b"late")]), BackendUnavailable)
        yield self.assertFailure(log.read({("t", 0): 0}, 10), BackendUnavailable)
        yield self.assertFailure(log.watermarks(("t", 0)), BackendUnavailable)
        reopened = self.make(path=path)
        self.assertEqual((yield reopened.watermarks(("t", 0))), (0, 100))

    # -- tail ----------------------------------------------------------------

    @defer.inlineCallbacks
    def test_tail_delivers_new_records_once_in_order(self):
        log = self.make(partitions=2)
        yield log.append("t", [(None, b"before")] * 2)
        got = Collector()
        tail = log.tail({("t", 0): 1, ("t", 1): 1}, got)
        self.addCleanup(tail.stop)
        expected = []
        for i in range(10):
            stored = yield log.append("t", [(None, b"%d-%d" % (i, j)) for j in range(3)])
            expected.extend(stored)
            # Appends of this process are handed over before append answers.
            self.assertEqual(len(got.records), len(expected))
        yield log.append("other", [(None, b"not followed")])
        yield settled(log)
        self.assertEqual(sorted(got.records, key=lambda r: (r.partition, r.offset)),
                         sorted(expected, key=lambda r: (r.partition, r.offset)))
        self.assertEqual(got.offsets(("t", 0)), list(range(1, 16)))
        self.assertEqual(got.offsets(("t", 1)), list(range(1, 16)))
        self.assertEqual(tail.positions, {("t", 0): 16, ("t", 1): 16})

    @defer.inlineCallbacks
    def test_tail_catches_up_then_follows_without_gap_or_duplicate(self):
        log = self.make(partitions=2)
        written: dict[int, list[bytes]] = {0: [], 1: []}

        def remember(stored):
            for r in stored:
                written[r.partition].append(r.value)

        for i in range(30):  # 3000 records already in the file
            stored = yield log.append("t", [(None, b"old-%d-%d" % (i, j)) for j in range(100)])
            remember(stored)
        got = Collector()
        pending = []

        def on_records(records):
            got(records)
            # The first two catch-up batches (1000 each) each start 5 more
            # appends, so writes surely land while the tail is behind.
            if len(got.records) <= 2000:
                for i in range(5):
                    values = [(None, b"mid-%d-%d-%d" % (len(got.records), i, j)) for j in range(20)]
                    pending.append(log.append("t", values).addCallback(remember))

        tail = log.tail({("t", 0): 0, ("t", 1): 0}, on_records)
        self.addCleanup(tail.stop)
        # And 2000 more in 100 appends, racing with the catch-up reads.
        for i in range(100):
            pending.append(log.append("t", [(None, b"new-%d-%d" % (i, j)) for j in range(20)]).addCallback(remember))
            if i % 10 == 0:
                yield turn()
        yield got.wait_records(5200)
        yield defer.gatherResults(pending)
        self.assertEqual(len(pending), 110)
        yield settled(log)
        self.assertEqual(len(got.records), 5200)
        for p in (0, 1):
            self.assertEqual(got.offsets(("t", p)), list(range(2600)))
            self.assertEqual([r.value for r in got.records if r.partition == p], written[p])
        self.assertEqual([len(batch) for batch in got.batches[:2]], [1000, 1000])
        self.assertTrue(max(len(batch) for batch in got.batches) <= 1000)

        # Caught up: new records come straight from the append, no read.
        reads = []
        real = log._read_sync
        log._read_sync = lambda *args: reads.append(args) or real(*args)
        stored = yield log.append("t", [(None, b"live-1"), (None, b"live-2")])
        self.assertEqual(got.records[-2:], sorted(stored, key=lambda r: (r.timestamp, r.partition)))
        self.assertEqual(reads, [])
        self.assertEqual(len(got.records), 5202)

    @defer.inlineCallbacks
    def test_tail_from_below_retention_jumps_to_first_retained(self):
        log = self.make(retention=3600)
        now = int(time.time() * 1000)
        yield log.append("t", [(None, b"old")] * 5, timestamp=now - 2 * HOUR_MS)
        yield log.append("t", [(None, b"new")] * 2, timestamp=now)
        self.assertEqual((yield log.prune()), 5)
        got = Collector()
        tail = log.tail({("t", 0): 1}, got)
        self.addCleanup(tail.stop)
        yield got.wait_records(2)
        self.assertEqual([(r.offset, r.value) for r in got.records], [(5, b"new"), (6, b"new")])
        yield log.append("t", [(None, b"live")])
        self.assertEqual(got.offsets(("t", 0)), [5, 6, 7])

    @defer.inlineCallbacks
    def test_tail_behind_an_emptied_partition_waits_for_new_records(self):
        log = self.make(retention=3600)
        yield log.append("t", [(None, b"old")] * 3, timestamp=int(time.time() * 1000) - 2 * HOUR_MS)
        self.assertEqual((yield log.prune()), 3)
        got = Collector()
        tail = log.tail({("t", 0): 0}, got)
        self.addCleanup(tail.stop)
        yield waited(lambda: tail.positions == {("t", 0): 3}, "the tail to skip the removed records")
        yield settled(log)
        self.assertEqual(got.records, [])
        yield log.append("t", [(None, b"new")])
        self.assertEqual([(r.offset, r.value) for r in got.records], [(3, b"new")])

    @defer.inlineCallbacks
    def test_stopped_tail_gets_no_more_callbacks(self):
        log = self.make()
        got = Collector()
        tail = log.tail({("t", 0): 0}, got)
        yield log.append("t", [(None, b"1")])
        self.assertEqual([r.value for r in got.records], [b"1"])
        tail.stop()
        tail.stop()  # twice is fine
        yield log.append("t", [(None, b"2")])
        yield settled(log)
        self.assertEqual([r.value for r in got.records], [b"1"])

        # Stopped while its catch-up read is in flight.
        behind = Collector()
        tail = log.tail({("t", 0): 0}, behind)
        self.assertTrue(tail._reading)
        tail.stop()
        yield log.append("t", [(None, b"3")])
        yield waited(lambda: not tail._reading, "the catch-up read to end")
        yield settled(log)
        self.assertEqual(behind.records, [])

    @defer.inlineCallbacks
    def test_tail_stopping_itself_from_its_callback(self):
        log = self.make(partitions=2)
        got = []

        def once(records):
            got.extend(records)
            tail.stop()

        tail = log.tail({("t", 0): 0, ("t", 1): 0}, once)
        yield log.append("t", [(None, b"a"), (None, b"b")])
        yield log.append("t", [(None, b"c")])
        self.assertEqual(sorted(r.value for r in got), [b"a", b"b"])

    @defer.inlineCallbacks
    def test_backend_stop_stops_tails(self):
        path = os.path.join(self.mktemp(), "events.sqlite")
        log = self.make(path=path)
        got = Collector()
        log.tail({("t", 0): 0}, got)
        yield log.append("t", [(None, b"1")])
        yield log.stop()
        other = self.make(path=path)
        yield other.append("t", [(None, b"2")])
        # No wait: a stopped log has no poller, threads or tails left to deliver.
        self.assertEqual((log._tails, log._poller), (set(), None))
        self.assertEqual([r.value for r in got.records], [b"1"])

    @defer.inlineCallbacks
    def test_on_records_raising_does_not_stop_the_tail(self):
        log = self.make()
        seen = []

        def fragile(records):
            seen.extend(r.value for r in records)
            if len(seen) == 1:
                raise ZeroDivisionError("boom")

        tail = log.tail({("t", 0): 0}, fragile)
        self.addCleanup(tail.stop)
        yield log.append("t", [(None, b"1")])
        yield log.append("t", [(None, b"2"), (None, b"3")])
        self.assertEqual(seen, [b"1", b"2", b"3"])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(tail.positions, {("t", 0): 3})

    @defer.inlineCallbacks
    def test_on_records_raising_during_catch_up(self):
        log = self.make()
        yield log.append("t", [(None, b"%d" % i) for i in range(2500)])
        seen = []

        def fragile(records):
            seen.extend(r.offset for r in records)
            raise ZeroDivisionError("boom")

        tail = log.tail({("t", 0): 0}, fragile)
        self.addCleanup(tail.stop)
        yield waited(lambda: len(seen) >= 2500, "the catch-up")
        self.assertEqual(seen, list(range(2500)))
        yield log.append("t", [(None, b"live")])
        self.assertEqual(seen[-1], 2500)
        # One failure logged per call: three catch-up batches and one live.
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 4)

    @defer.inlineCallbacks
    def test_live_partition_is_not_held_up_by_a_catch_up_read(self):
        log = self.make(partitions=2)
        yield log.append("t", [(KEY_P0, b"old-%d" % i) for i in range(10)])
        release = threading.Event()
        real = log._read_sync

        def slow_read(*args):
            release.wait(10)
            return real(*args)

        log._read_sync = slow_read
        self.addCleanup(release.set)
        got = Collector()
        tail = log.tail({("t", 0): 0, ("t", 1): 0}, got)
        self.addCleanup(tail.stop)
        self.assertTrue(tail._reading)
        # Partition 1 is at its end: its new records come at once.
        live = yield log.append("t", [(KEY_P1, b"live-1"), (KEY_P1, b"live-2")])
        self.assertEqual(got.records, live)
        # Partition 0 is behind: its new records wait for the read.
        yield log.append("t", [(KEY_P0, b"new-10")])
        self.assertEqual(got.records, live)
        release.set()
        yield got.wait_records(13)
        yield settled(log)
        self.assertEqual(got.offsets(("t", 0)), list(range(11)))
        self.assertEqual(got.offsets(("t", 1)), [0, 1])
        self.assertEqual([r.value for r in got.records if r.partition == 0],
                         [b"old-%d" % i for i in range(10)] + [b"new-10"])
        self.assertEqual(tail.positions, {("t", 0): 11, ("t", 1): 2})

    @defer.inlineCallbacks
    def test_no_duplicate_when_the_poll_sees_a_commit_before_its_notice(self):
        # The race: the poll reads a commit of this process from the file
        # before the reactor has handled that append's answer, so the
        # records reach the tail both by a read and by the notice.
        log = self.make(poll_interval=0)
        got = Collector()
        tail = log.tail({("t", 0): 0}, got)
        self.addCleanup(tail.stop)
        release = threading.Event()
        real = log._read_sync

        def slow_read(*args):
            release.wait(10)
            return real(*args)

        log._read_sync = slow_read
        self.addCleanup(release.set)
        # Written without the notice (as if still on its way to the reactor).
        stored = yield log._write(log._append_sync, "t", [(None, b"a"), (None, b"b")], None)
        polled = log._poll()
        yield waited(lambda: tail._reading, "the poll to start a read")
        log._appended(stored)  # the notice arrives: delivered directly
        self.assertEqual([r.offset for r in got.records], [0, 1])
        release.set()
        yield polled
        yield waited(lambda: not tail._reading, "the read to end")
        self.assertEqual([r.offset for r in got.records], [0, 1])
        yield log.append("t", [(None, b"c")])
        self.assertEqual([r.offset for r in got.records], [0, 1, 2])

    @defer.inlineCallbacks
    def test_tail_sees_records_written_by_another_process(self):
        path = os.path.join(self.mktemp(), "events.sqlite")
        log = self.make(path=path, poll_interval=0.05)
        other = self.make(path=path, poll_interval=0)
        got = Collector()
        tail = log.tail({("t", 0): 0}, got)
        self.addCleanup(tail.stop)
        yield other.append("t", [(None, b"from-elsewhere-%d" % i) for i in range(3)])
        yield got.wait_records(3, timeout=5)
        self.assertEqual([(r.offset, r.value) for r in got.records],
                         [(i, b"from-elsewhere-%d" % i) for i in range(3)])
        # Both writers share the offsets of the file.
        stored = yield log.append("t", [(None, b"here")])
        self.assertEqual(stored[0].offset, 3)
        yield settled(log)  # the poll sees "here" too: it must not come twice
        self.assertEqual(got.offsets(("t", 0)), [0, 1, 2, 3])


class ReadOnlyOpen(unittest.TestCase):
    """A worker process's backend (read_only) next to the writing process."""

    timeout = 60

    @defer.inlineCallbacks
    def test_a_read_only_start_does_not_wait_for_the_write_lock(self):
        path = os.path.join(self.mktemp(), "events.sqlite")
        writer = EmbeddedBackend(path, 0)
        writer.start()
        self.addCleanup(writer.stop)
        yield writer.append("t", [(None, b"v0")], timestamp=1000)
        # Another connection holds the write lock (a long append elsewhere).
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        self.addCleanup(holder.close)
        self.addCleanup(holder.execute, "ROLLBACK")
        reader = EmbeddedBackend(path, 0, read_only=True)
        reader.start()  # on the reactor thread: must neither block nor fail
        self.addCleanup(reader.stop)
        got = yield reader.read({("t", 0): 0}, 10)
        self.assertEqual([r.value for r in got], [b"v0"])
        yield self.assertFailure(reader.append("t", [(None, b"x")]), BackendUnavailable)

    def test_a_read_only_start_refuses_a_log_not_created_yet(self):
        path = os.path.join(self.mktemp(), "events.sqlite")
        os.makedirs(os.path.dirname(path))
        with self.assertRaises(EmbeddedLogError):
            EmbeddedBackend(path, 0, read_only=True).start()
        self.assertFalse(os.path.exists(path))
