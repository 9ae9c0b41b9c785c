"""Ids that resume exactly in a mirrored log: the id format, the mark of a
position, and the resolution of an id from another cluster, on two real
embedded logs where B holds records of its own and then A's records in A's
order with A's timestamps (what MirrorMaker 2 makes of two Kafka clusters;
tests/test_twodc.py does it with real ones)."""
from __future__ import annotations

import json
import os

from twisted.internet import reactor
from twisted.trial import unittest

from eventstreams.assignment import mark_before, resolve
from eventstreams.backends.embedded import EmbeddedBackend
from eventstreams.hub import Hub
from eventstreams.positions import Assignment, PositionError, advance, encode_id, parse_last_event_id

from .support import async_test, wait_for

T = "eqiad.mediawiki.recentchange"
# A's partition: (timestamp of each record); three records share 1001, two 1002.
STAMPS = [1000, 1001, 1001, 1001, 1002, 1002]
LOCAL = 4  # records B has before the mirrored ones


class IdFormat(unittest.TestCase):
    def test_mark_counts_the_records_of_the_last_millisecond(self):
        mark = None
        for ts in (1000, 1001, 1001, 1001):
            mark = advance(mark, ts)
        self.assertEqual(mark, (1002, 3))
        self.assertEqual(advance((1001, 0), 1001), (1002, 1))  # a boundary mark of `since`

    def test_id_keeps_upstreams_keys_and_adds_n_and_cluster(self):
        text = encode_id([(T, 0, 4, (1002, 3)), (T, 1, 9, (1500, 0)), (T, 2, 0, None)], "eqiad")
        self.assertEqual(json.loads(text), [
            {"topic": T, "partition": 0, "offset": 4, "timestamp": 1002, "n": 3, "cluster": "eqiad"},
            {"topic": T, "partition": 1, "offset": 9, "timestamp": 1500},
            {"topic": T, "partition": 2, "offset": 0},
        ])
        # The cluster named on the first entry holds for the ones after it.
        self.assertEqual(parse_last_event_id(text), [
            Assignment(T, 0, 4, 1002, 3, "eqiad"),
            Assignment(T, 1, 9, 1500, 0, "eqiad"),
            Assignment(T, 2, 0, None, 0, "eqiad"),
        ])

    def test_a_few_bytes_per_partition(self):
        upstream = encode_id([(T, p, 123456, 1700000000123) for p in range(10)])
        ours = encode_id([(T, p, 123456, (1700000000123, 3)) for p in range(10)], "ZiyxFjBWa21uJktn8J3GuA")
        self.assertLessEqual(len(ours) - len(upstream), 10 * len(',"n":3') + len(',"cluster":""') + 22)

    def test_bad_n_and_cluster_are_refused(self):
        for entry, message in [
            ({"topic": T, "partition": 0, "offset": 1, "n": 2}, "'n' needs a 'timestamp'"),
            ({"topic": T, "partition": 0, "timestamp": 5, "n": -1}, "'n' must be a non-negative integer"),
            ({"topic": T, "partition": 0, "timestamp": 5, "n": "2"}, "'n' must be a non-negative integer"),
            ({"topic": T, "partition": 0, "offset": 1, "cluster": ""}, "'cluster' must be a string"),
            ({"topic": T, "partition": 0, "offset": 1, "cluster": 7}, "'cluster' must be a string"),
            ({"topic": T, "partition": 0, "offset": 1, "cluster": "x" * 256}, "'cluster' must be a string"),
        ]:
            with self.assertRaises(PositionError) as caught:
                parse_last_event_id(json.dumps([entry]))
            self.assertIn(message, str(caught.exception))


class MirroredLogs(unittest.TestCase):
    timeout = 60

    async def make(self, name: str, partitions: int = 1) -> EmbeddedBackend:
        backend = EmbeddedBackend(os.path.join(self.mktemp(), name), retention=0, partitions=partitions,
                                  reactor=reactor)
        os.makedirs(os.path.dirname(backend.path), exist_ok=True)
        backend.start()
        self.addCleanup(backend.stop)
        return backend

    async def pair(self, mirrored: int = len(STAMPS), b_partitions: int = 1):
        a = await self.make("a.sqlite")
        b = await self.make("b.sqlite", b_partitions)
        for i, ts in enumerate(STAMPS):
            await a.append(T, [(None, json.dumps({"n": i}).encode())], timestamp=ts)
        for i in range(LOCAL):
            await b.append(T, [(b"d", json.dumps({"local": i}).encode())], timestamp=500)
        for i, ts in enumerate(STAMPS[:mirrored]):
            await b.append(T, [(b"d", json.dumps({"n": i}).encode())], timestamp=ts)
        return a, b

    @async_test
    async def test_each_log_has_its_own_identity(self):
        a, b = await self.pair()
        self.assertNotEqual(await a.identity(), await b.identity())
        self.assertTrue(a.cluster.startswith("embedded-"))

    @async_test
    async def test_an_id_inside_a_millisecond_resumes_exactly_in_the_other_log(self):
        a, b = await self.pair()
        # The client has A's records 0..2: two of the three of millisecond 1001.
        leid = parse_last_event_id(encode_id([(T, 0, 3, (1002, 2))], a.cluster))
        start = await resolve(b, [T], leid, None)
        self.assertEqual(start.offsets, {(T, 0): LOCAL + 3})
        self.assertEqual(start.stamps, {(T, 0): (1002, 2)})
        self.assertEqual(start.notes, [])
        # ... and back: B's id resumes in A at the same record.
        leid = parse_last_event_id(encode_id([(T, 0, LOCAL + 3, (1002, 2))], b.cluster))
        start = await resolve(a, [T], leid, None)
        self.assertEqual((start.offsets, start.notes), ({(T, 0): 3}, []))

    @async_test
    async def test_same_cluster_uses_the_offset_and_upstream_ids_work_as_before(self):
        a, b = await self.pair()
        leid = parse_last_event_id(encode_id([(T, 0, 3, (1002, 2))], b.cluster))
        self.assertEqual((await resolve(b, [T], leid, None)).offsets, {(T, 0): 3})
        # upstream: offset wins; timestamp only = first record at or after it
        leid = parse_last_event_id(json.dumps([{"topic": T, "partition": 0, "offset": 2}]))
        start = await resolve(b, [T], leid, None)
        self.assertEqual((start.offsets, start.stamps), ({(T, 0): 2}, {(T, 0): (501, 2)}))
        leid = parse_last_event_id(json.dumps([{"topic": T, "partition": 0, "timestamp": 1002}]))
        start = await resolve(b, [T], leid, None)
        self.assertEqual((start.offsets, start.stamps), ({(T, 0): LOCAL + 4}, {(T, 0): (1002, 0)}))

    @async_test
    async def test_a_lagging_mirror_is_waited_for_then_said_and_repeats(self):
        a, b = await self.pair(mirrored=2)  # B has only 1000 and the first 1001
        leid = parse_last_event_id(encode_id([(T, 0, 3, (1002, 2))], a.cluster))
        start = await resolve(b, [T], leid, None, mirror_wait=0.3)
        self.assertEqual(start.offsets, {(T, 0): LOCAL + 1})  # the first record of 1001
        self.assertEqual(start.stamps, {(T, 0): (1001, 0)})
        self.assertEqual(len(start.notes), 1)
        self.assertIn("the id counts 2 delivered", start.notes[0])
        self.assertIn("some events may repeat", start.notes[0])

    @async_test
    async def test_records_that_differ_are_said_and_repeat(self):
        a, b = await self.pair()
        # More records of 1001 than the log has: the one counted last is a 1002.
        leid = parse_last_event_id(encode_id([(T, 0, 5, (1002, 4))], a.cluster))
        start = await resolve(b, [T], leid, None, mirror_wait=0)
        self.assertEqual(start.offsets, {(T, 0): LOCAL + 1})
        self.assertIn("has 3 record(s)", start.notes[0])
        self.assertIn("the id counts 4 delivered (the mirror did not keep", start.notes[0])

    @async_test
    async def test_partitions_the_id_does_not_name_are_resumed_by_time(self):
        a, b = await self.pair(b_partitions=2)
        leid = parse_last_event_id(encode_id([(T, 0, 3, (1002, 2))], a.cluster))
        start = await resolve(b, [T], leid, None)
        self.assertEqual(start.tps, [(T, 0), (T, 1)])
        self.assertIn("does not name partition(s) 1", start.notes[0])
        self.assertIn((T, 1), start.offsets)

    @async_test
    async def test_mark_before_counts_from_the_log(self):
        a, _ = await self.pair()
        self.assertEqual(await mark_before(a, (T, 0), 3), (1002, 2))
        self.assertEqual(await mark_before(a, (T, 0), 4), (1002, 3))
        self.assertEqual(await mark_before(a, (T, 0), 6), (1003, 2))
        self.assertIsNone(await mark_before(a, (T, 0), 0))

    @async_test
    async def test_a_new_hub_counts_the_millisecond_it_starts_in(self):
        a, _ = await self.pair()
        hub = Hub(a, [(T, 0)], 10, reactor)
        await hub.start()
        self.addCleanup(hub.stop)
        self.assertEqual(hub.head, ((6, (1003, 2)),))
        self.assertEqual(hub.tps.cluster, a.cluster)
        # A record of the same millisecond continues the count.
        await a.append(T, [(None, b'{"n": 6}')], timestamp=1002)
        await a.append(T, [(None, b'{"n": 7}')], timestamp=1002)
        await wait_for(lambda: hub.head[0][0] == 8, "the hub's head to reach offset 8")
        self.assertEqual(hub.head, ((8, (1003, 4)),))


class ClusterName(unittest.TestCase):
    @async_test
    async def test_cluster_name_overrides_the_kafka_cluster_id_and_is_not_passed_on(self):
        from eventstreams.backends.kafka import KafkaBackend

        backend = KafkaBackend({"bootstrap.servers": "127.0.0.1:9", "cluster_name": "eqiad"}, reactor)
        self.assertEqual(await backend.identity(), "eqiad")
        self.assertNotIn("cluster_name", backend.consumer_settings())
        self.assertIsNone(backend.check_settings())
