"""Two datacenters: daemon A reads cluster A, daemon B reads cluster B, and
Apache Kafka's MirrorMaker 2 copies A's topics to B under the same names.

`make test` starts the second cluster and MirrorMaker (scripts/kafka
start-mirror, topics matching `dc\\..*`) beside the usual broker, which is
cluster A: EVENTSTREAMS_KAFKA is A, EVENTSTREAMS_KAFKA_B is B. Before a
topic is created in A (and so before it is mirrored), its copy in B gets
records of its own, so the same record has different offsets in A and B.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from typing import Any, Optional

from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from eventstreams.config import load
from eventstreams.tap import build_service

from .support import (
    KAFKA,
    StreamClient,
    async_test,
    create_topics,
    open_stream,
    rc_event,
    wait_for,
    write_config,
)

KAFKA_B = os.environ.get("EVENTSTREAMS_KAFKA_B")
PARTITIONS = {"eqiad.mediawiki.recentchange": 2, "codfw.mediawiki.recentchange": 1, "eqiad.test.event": 1}
LOCAL_ONLY = 4  # records each partition's copy in B has before mirroring starts
BURST = 5  # records of one partition that share a millisecond
MIRRORED = 30  # seconds within which MirrorMaker must have copied a record


def produce(bootstrap: str, records: list[tuple[str, int, int, dict]]) -> None:
    """(topic, partition, timestamp, event) in order, acknowledged."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "acks": "all"})
    errors: list[Any] = []
    for topic, partition, timestamp, event in records:
        producer.produce(topic, json.dumps(event).encode(), partition=partition, timestamp=timestamp,
                         on_delivery=lambda e, m: errors.extend([e] if e else []))
    assert producer.flush(30) == 0 and not errors, errors


def high_watermark(bootstrap: str, topic: str, partition: int) -> int:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "twodc-check"})
    try:
        return consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)[1]
    finally:
        consumer.close()


class ClusterDaemon:
    """The real service tree over one cluster, topics named with `prefix`."""

    def __init__(self, directory: str, bootstrap: str, prefix: str, *overrides: str):
        self.prefix = prefix
        self.config = load(write_config(directory, "", prefix), (
            "eventstreams.backend=kafka", f"kafka.bootstrap.servers={bootstrap}",
            "eventstreams.ring_size=1000") + overrides)
        self.service = build_service(self.config, reactor)
        self.port = 0

    async def start(self) -> "ClusterDaemon":
        self.service.startService()
        self.port = (await self.service.listeners["api"].bound()).getHost().port
        return self

    @property
    def backend(self) -> Any:
        return self.service.backend


class TwoDatacenters(unittest.TestCase):
    timeout = 300

    async def setup_clusters(self, *overrides: str) -> tuple[ClusterDaemon, ClusterDaemon, str]:
        if not (KAFKA and KAFKA_B):
            message = ("no mirrored cluster pair: set EVENTSTREAMS_KAFKA and EVENTSTREAMS_KAFKA_B "
                       "(make test starts them, and MirrorMaker, with scripts/kafka)")
            if os.environ.get("CI") == "true":
                self.fail(message)
            raise unittest.SkipTest(message)
        prefix = f"dc.{uuid.uuid4().hex[:8]}."
        topics = {prefix + t: n for t, n in PARTITIONS.items()}
        # B's copies first, with records of their own: offsets differ from A's.
        await deferToThread(create_topics, topics, bootstrap=KAFKA_B)
        local = [(t, p, int(time.time() * 1000) - 60_000, {"local": i})
                 for t, n in topics.items() for p in range(n) for i in range(LOCAL_ONLY)]
        await deferToThread(produce, KAFKA_B, local)
        await deferToThread(create_topics, topics, bootstrap=KAFKA)
        a = await ClusterDaemon(self.mktemp(), KAFKA, prefix, *overrides).start()
        b = await ClusterDaemon(self.mktemp(), KAFKA_B, prefix, *overrides).start()
        self.addCleanup(b.service.stopService)
        self.addCleanup(a.service.stopService)
        return a, b, prefix

    async def stream(self, d: ClusterDaemon, path: str, headers: Optional[dict] = None) -> StreamClient:
        client = await open_stream(d.port, path, headers)
        self.addCleanup(lambda: client.transport.loseConnection())
        self.assertEqual(client.status, 200, client.body)
        return client

    def bursts(self, prefix: str, first: int, count: int, base_ms: int) -> list[tuple[str, int, int, dict]]:
        """`count` bursts; in each, every partition gets BURST records of one
        millisecond (the same one for all partitions)."""
        records = []
        seq = first
        for burst in range(count):
            for topic in ("eqiad.mediawiki.recentchange", "codfw.mediawiki.recentchange"):
                for p in range(PARTITIONS[topic]):
                    for _ in range(BURST):
                        records.append((prefix + topic, p, base_ms + burst, rc_event(seq)))
                        seq += 1
        return records

    async def mirrored(self, prefix: str, records: list[tuple[str, int, int, dict]]) -> None:
        """Wait until B holds copies of all these records."""
        assert KAFKA_B, "setUp skips without a cluster B"
        ends: dict[tuple[str, int], int] = {}
        for topic, p, _, _ in records:
            ends[(topic, p)] = ends.get((topic, p), LOCAL_ONLY) + 1

        async def copied() -> bool:
            for (topic, p), end in ends.items():
                if await deferToThread(high_watermark, KAFKA_B, topic, p) < end:
                    return False
            return True

        await wait_for(copied, f"MirrorMaker to copy {len(ends)} partitions", MIRRORED, 0.2)

    @staticmethod
    def by_partition(events: list[dict], produced: list[tuple[str, int, int, dict]]) -> dict:
        where = {e["id"]: (t, p) for t, p, _, e in produced}
        seen: dict[tuple[str, int], list[int]] = {}
        for e in events:
            seen.setdefault(where.get(e.get("id"), ("?", -1)), []).append(e["id"])
        return seen

    @async_test
    async def test_resume_back_and_forth_across_clusters_is_exact(self):
        a, b, prefix = await self.setup_clusters()
        daemons = [a, b]
        produced: list[tuple[str, int, int, dict]] = []
        # A first burst so both daemons' hubs know the topics are mirrored.
        warmup = self.bursts(prefix, 0, 1, int(time.time() * 1000) - 30_000)
        await deferToThread(produce, KAFKA, warmup)
        await self.mirrored(prefix, warmup)

        client = await self.stream(a, "/v2/stream/recentchange")
        await wait_for(lambda: any(s.subscription is not None and s.subscription.live
                                   for s in a.service.connections.sinks), "the hub to follow the end")
        kept: list[dict] = []  # the events the client keeps, over every connection
        seq = 10_000
        hops = []
        comments: list[str] = []
        for hop in range(5):  # A -> B -> A -> B -> A -> B
            already = len(client.events)
            base = int(time.time() * 1000)
            batch = self.bursts(prefix, seq, 4, base)
            seq += len(batch)
            produced += batch
            await deferToThread(produce, KAFKA, batch)
            # Read at least into the third burst, then cut the client right
            # after the 2nd record of a millisecond: the id it resumes with
            # stands inside that millisecond.
            want = already + 2 * len(batch) // 4 + 2
            await client.wait_for(lambda c=client, n=want: len(c.events) >= n, timeout=30)
            blocks = [blk for blk in client.blocks if blk.get("event") == "message"]
            cut = next((i for i in range(already + len(batch) // 4, len(blocks))
                        if json.loads(blocks[i]["data"])["id"] % BURST == 1), None)
            self.assertIsNotNone(cut, "no record inside a millisecond to cut after")
            kept += [json.loads(blk["data"]) for blk in blocks[:cut + 1]]
            comments += client.comments()
            last_id = blocks[cut]["id"]
            entries = json.loads(last_id)
            self.assertTrue(any(e.get("n", 0) > 1 for e in entries), entries)
            await client.close()
            target = daemons[(hop + 1) % 2]
            client = await self.stream(target, "/v2/stream/recentchange", {"Last-Event-ID": last_id})
            hops.append((last_id, target is b))
        await self.mirrored(prefix, warmup + produced)
        # The rest: everything produced after the last cut.
        await client.wait_for(lambda: len(kept) + len(client.events) >= len(produced), timeout=60)
        # A sentinel after everything: anything repeated would arrive before it.
        sentinel = (prefix + "eqiad.mediawiki.recentchange", 0, int(time.time() * 1000), rc_event(seq))
        await deferToThread(produce, KAFKA, [sentinel])
        await client.wait_for(lambda: any(e.get("id") == seq for e in client.events), timeout=MIRRORED)
        kept += [e for e in client.events if e.get("id") != seq]
        comments += client.comments()
        self.assertFalse(any("repeat" in c for c in comments), comments)
        got = self.by_partition(kept, produced)
        want = self.by_partition([e for _, _, _, e in produced], produced)
        self.assertEqual(set(got), set(want))
        for tp in want:
            self.assertEqual(got[tp], want[tp], f"{tp} after hops {hops}")

    @async_test
    async def test_upstream_format_ids_and_since_on_both_clusters(self):
        a, b, prefix = await self.setup_clusters()
        base = int(time.time() * 1000) - 10_000
        produced = self.bursts(prefix, 0, 5, base)
        await deferToThread(produce, KAFKA, produced)
        await self.mirrored(prefix, produced)
        topic = prefix + "eqiad.mediawiki.recentchange"
        in_order = [e["id"] for t, p, _, e in produced if (t, p) == (topic, 0)]
        stamps = {e["id"]: ts for t, p, ts, e in produced}

        # Upstream's timestamp-only id: the first record at or after the time.
        leid = json.dumps([{"topic": topic, "partition": 0, "timestamp": base + 2}])
        for d in (a, b):
            client = await self.stream(d, "/v2/stream/recentchange", {"Last-Event-ID": leid})
            await client.wait_events(3 * BURST)
            self.assertEqual([e["id"] for e in client.events], [i for i in in_order if stamps[i] >= base + 2])

        # Upstream's offset id against B: B's own offsets, as before.
        leid = json.dumps([{"topic": topic, "partition": 0, "offset": LOCAL_ONLY + 7}])
        client = await self.stream(b, "/v2/stream/recentchange", {"Last-Event-ID": leid})
        await client.wait_events(len(in_order) - 7)
        self.assertEqual([e["id"] for e in client.events], in_order[7:])
        self.assertEqual(client.events[0]["meta"]["offset"], LOCAL_ONLY + 7)

        # since: the same records from both clusters.
        firsts = []
        for d in (a, b):
            client = await self.stream(d, f"/v2/stream/recentchange?since={base + 3}")
            want = [e["id"] for _, _, ts, e in produced if ts >= base + 3]
            await client.wait_events(len(want))
            self.assertEqual(sorted(e["id"] for e in client.events), sorted(want))
            firsts.append(self.by_partition(client.events, produced))
        self.assertEqual(firsts[0], firsts[1])

    @async_test
    async def test_a_mirror_with_other_records_is_said_and_repeats_rather_than_skips(self):
        a, b, prefix = await self.setup_clusters()
        topic = prefix + "codfw.mediawiki.recentchange"
        base = int(time.time() * 1000) - 10_000
        produced = self.bursts(prefix, 0, 2, base)
        await deferToThread(produce, KAFKA, produced)
        await self.mirrored(prefix, produced)
        # An id from A that counts more records of a millisecond than B holds
        # (as when the mirror lost some): B says so and starts at the first.
        mine = await a.backend.identity()
        leid = json.dumps([{"topic": topic, "partition": 0, "offset": 3, "timestamp": base + 1,
                            "n": BURST + 2, "cluster": mine}])
        client = await self.stream(b, "/v2/stream/recentchange", {"Last-Event-ID": leid})
        want = [e["id"] for t, p, ts, e in produced if t == topic and ts == base]
        await client.wait_for(lambda: any("repeat" in c for c in client.comments()), timeout=30)
        await client.wait_events(len(want))
        self.assertEqual([e["id"] for e in client.events if e["meta"]["topic"] == topic][:len(want)], want)
