"""The Kafka engine against a real Apache Kafka broker (started by `make test`
with scripts/kafka; EVENTSTREAMS_KAFKA holds its bootstrap address).

Every end-to-end check of tests/test_stream.py runs again over Kafka, then
the behaviours only Kafka has: several partitions, missing topics, records
that are not JSON, keys, many clients on one tail, a broker that goes away.
"""
from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from typing import Optional

from confluent_kafka import Consumer, Producer
from confluent_kafka import TopicPartition as KafkaTP
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from eventstreams.backends.kafka import KafkaBackend, KafkaTail

from . import test_stream
from .support import KAFKA, async_test, create_topics, kafka_admin, offsets_by_partition, open_stream, rc_event, turn, wait_for

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "kafka")


class OverKafka:
    backend = "kafka"


class KafkaStreamBasics(OverKafka, test_stream.StreamBasics):
    pass


class KafkaResume(OverKafka, test_stream.Resume):
    @async_test
    async def test_expired_offset_starts_at_oldest_and_says_so(self):
        d = await self.daemon()
        await d.append(d.rc[0], [rc_event(n) for n in range(5)])
        await deferToThread(delete_records, d.rc[0], 0, 3)
        leid = json.dumps([{"topic": d.rc[0], "partition": 0, "offset": 1}])
        client = await self.stream(d, "/v2/stream/recentchange", {"Last-Event-ID": leid})
        await client.wait_events(2)
        self.assertEqual([e["meta"]["offset"] for e in client.events], [3, 4])
        self.assertTrue(any("no longer retained" in c for c in client.comments()), client.comments())


class KafkaFilters(OverKafka, test_stream.Filters):
    pass


class KafkaErrors(OverKafka, test_stream.Errors):
    pass


class KafkaSlowClient(OverKafka, test_stream.SlowClient):
    pass


def delete_records(topic: str, partition: int, before: int) -> None:
    """Move a partition's log start, as retention would (blocking)."""
    admin = kafka_admin()  # must outlive its futures
    futures = admin.delete_records([KafkaTP(topic, partition, before)])
    for future in futures.values():
        future.result(30)


def produce_raw(topic: str, items: list[tuple[bytes | None, bytes | None]], partition: int = 0) -> None:
    """Write records the way any Kafka producer might (blocking)."""
    producer = Producer({"bootstrap.servers": KAFKA})
    for key, value in items:
        producer.produce(topic, value, key, partition=partition)
    assert producer.flush(30) == 0


def kafka_script(*args: str) -> str:
    return subprocess.run([SCRIPT, *args], check=True, capture_output=True, text=True, timeout=120).stdout


class KafkaOnly(OverKafka, test_stream.StreamTestCase):
    @async_test
    async def test_ids_cover_every_partition_of_a_three_partition_topic_and_a_two_topic_stream(self):
        d = await self.daemon(partitions={"eqiad.mediawiki.recentchange": 3})
        client = await self.stream(d, "/v2/stream/recentchange")
        await d.append(d.rc[0], [rc_event(n) for n in range(30)])
        await client.wait_events(30)
        ids = json.loads(client.last_id)
        self.assertEqual([(i["topic"], i["partition"]) for i in ids],
                         [(d.rc[0], 0), (d.rc[0], 1), (d.rc[0], 2), (d.rc[1], 0)])
        seen = offsets_by_partition(client.events)
        self.assertEqual(sum(len(v) for v in seen.values()), 30)
        for tp, offsets in seen.items():
            self.assertEqual(offsets, list(range(len(offsets))), tp)
            self.assertEqual(next(i["offset"] for i in ids if (i["topic"], i["partition"]) == tp), len(offsets))

    @async_test
    async def test_exact_resume_over_thousands_of_records_in_three_partitions(self):
        d = await self.daemon("eventstreams.ring_size=20", partitions={"eqiad.mediawiki.recentchange": 3})
        for start in range(0, 4000, 500):
            await deferToThread(produce_keyed, d.rc[0], range(start, start + 500))
        first = await self.stream(d, "/v2/stream/recentchange?since=0")
        await first.wait_events(1500, timeout=30)
        await first.close()
        cut = [b for b in first.blocks if b.get("event") == "message"]
        got = first.events[:1500]
        again = await self.stream(d, "/v2/stream/recentchange", {"Last-Event-ID": cut[1499]["id"]})
        await again.wait_events(2500, timeout=30)
        # A sentinel after the rest: any repeat arrives before it.
        await deferToThread(produce_keyed, d.rc[0], range(4000, 4001))
        await again.wait_for(lambda: any(e["id"] == 4000 for e in again.events), timeout=30)
        got += [e for e in again.events if e["id"] != 4000]
        self.assertEqual(len(got), 4000)
        self.assertEqual(sorted(e["id"] for e in got), list(range(4000)))
        seen = offsets_by_partition(got)
        self.assertEqual(len(seen), 3)
        for tp, offsets in seen.items():
            self.assertEqual(sorted(offsets), list(range(len(offsets))), tp)
            self.assertEqual(len(set(offsets)), len(offsets), tp)

    @async_test
    async def test_keys_become_meta_key_and_bad_records_are_skipped_with_the_id_advancing(self):
        d = await self.daemon()
        client = await self.stream(d, "/v2/stream/recentchange")
        good = json.dumps(rc_event(1)).encode()
        await deferToThread(produce_raw, d.rc[0], [
            (b"Q42", good), (None, b"not json"), (b"k", None), (None, b"[1,2]"), (None, json.dumps(rc_event(2)).encode()),
        ])
        await client.wait_events(2)
        self.assertEqual([e["id"] for e in client.events], [1, 2])
        self.assertEqual(client.events[0]["meta"]["key"], "Q42")
        self.assertNotIn("key", client.events[1]["meta"])
        self.assertEqual(client.events[1]["meta"]["offset"], 4)
        self.assertEqual(json.loads(client.last_id)[0]["offset"], 5)
        hub = next(iter(d.hubs.hubs.values()))
        self.assertEqual(hub.skipped_records, 3)
        self.flushLoggedErrors()

    @async_test
    async def test_a_read_below_the_log_start_continues_at_the_oldest_record(self):
        d = await self.daemon()
        await d.append(d.rc[0], [rc_event(n) for n in range(6)])
        await deferToThread(delete_records, d.rc[0], 0, 4)
        records = await d.backend.read({(d.rc[0], 0): 1}, 100)
        self.assertEqual([r.offset for r in records], [4, 5])

    @async_test
    async def test_a_stream_with_none_of_its_topics_is_a_503(self):
        d = await self.daemon(extra="\n[stream:ghost]\ntopics = {prefix}nowhere\n", partitions={"nowhere": 0})
        response = await self.get(d.url("/v2/stream/ghost"))
        body = await response.json()
        self.assertEqual(response.code, 503)
        self.assertEqual(body["type"], "service_unavailable")
        self.assertIn(d.topic("nowhere"), body["detail"])

    @async_test
    async def test_a_stream_serves_the_topics_that_exist_and_picks_up_a_new_one(self):
        d = await self.daemon(partitions={"codfw.mediawiki.recentchange": 0})
        client = await self.stream(d, "/v2/stream/recentchange")
        self.assertEqual(client.status, 200)
        await d.append(d.rc[0], [rc_event(1)])
        await client.wait_events(1)
        self.assertEqual([i["topic"] for i in json.loads(client.last_id)], [d.rc[0]])
        await deferToThread(create_topics, {d.rc[1]: 1})
        d.backend._partitions.clear()  # as after the metadata cache's few seconds
        later = await self.stream(d, "/v2/stream/recentchange")
        await d.append(d.rc[1], [rc_event(2)])
        await later.wait_events(1)
        self.assertEqual([i["topic"] for i in json.loads(later.last_id)], [d.rc[0], d.rc[1]])

    @async_test
    async def test_a_hundred_clients_share_one_tail_consumer_and_leave_none_behind(self):
        d = await self.daemon("eventstreams.client_ip_connection_limit=0", "eventstreams.request_rate_per_ip=0")
        clients = [await open_stream(d.ports["api"], "/v2/stream/recentchange") for _ in range(100)]
        await d.append(d.rc[0], [rc_event(n) for n in range(10)])
        for c in clients:
            await c.wait_events(10)
        self.assertEqual(len(d.hubs.hubs), 1)
        self.assertEqual(len(d.backend._tails), 1)
        self.assertEqual({tuple(e["id"] for e in c.events) for c in clients}, {tuple(range(10))})
        for c in clients:
            await c.close()
        await wait_for(lambda: d.hubs.hubs == {} and d.backend._tails == set(), "the hub and its tail to go")

    @async_test
    async def test_catch_up_readers_are_bounded_and_the_rest_wait_their_turn(self):
        d = await self.daemon("eventstreams.ring_size=10", "eventstreams.catchup_consumers=2")
        await d.append(d.rc[0], [rc_event(n) for n in range(300)])
        clients = [await self.stream(d, "/v2/stream/recentchange?since=0") for _ in range(6)]
        for c in clients:
            await c.wait_events(300, timeout=30)
            self.assertEqual([e["meta"]["offset"] for e in c.events], list(range(300)))
        self.assertLessEqual(len(d.backend._idle), 2)


class BrokerOutage(OverKafka, test_stream.StreamTestCase):
    """Stops and restarts the shared test broker (tests after it see a restarted broker)."""

    def setUp(self):
        if not os.environ.get("KAFKA_STATE"):
            self.skipTest("the broker's state dir (KAFKA_STATE) is not known") if os.environ.get("CI") != "true" \
                else self.fail("KAFKA_STATE is not set")

    @async_test
    async def test_connected_clients_survive_a_broker_restart_without_loss_or_duplicates(self):
        d = await self.daemon("eventstreams.heartbeat=0.5", "eventstreams.backend_timeout=2")
        client = await self.stream(d, "/v2/stream/recentchange")
        await d.append(d.rc[0], [rc_event(n) for n in range(50)])
        await client.wait_events(50)
        await deferToThread(kafka_script, "stop-broker")
        try:
            beats = client.body.count(b":\n\n")
            await client.wait_for(lambda: client.body.count(b":\n\n") >= beats + 2, timeout=10)
            # New clients get a 503 with a JSON body within the bounded wait.
            response = await self.get(d.url("/v2/stream/test"))
            self.assertEqual(response.code, 503)
            self.assertEqual((await response.json())["type"], "service_unavailable")
        finally:
            await deferToThread(kafka_script, "start-broker")
        await d.append(d.rc[0], [rc_event(n) for n in range(50, 100)])
        await client.wait_events(100, timeout=60)
        await d.append(d.rc[0], [rc_event(100)])  # a sentinel: any repeat arrives before it
        await client.wait_events(101, timeout=30)
        self.assertEqual([e["meta"]["offset"] for e in client.events], list(range(101)))
        self.flushLoggedErrors()


def produce_keyed(topic: str, numbers: range) -> None:
    producer = Producer({"bootstrap.servers": KAFKA, "linger.ms": 20})
    for n in numbers:
        producer.produce(topic, json.dumps(rc_event(n)).encode(), str(n).encode())
    assert producer.flush(30) == 0


# -- without a broker: the engine's own threading ------------------------------------

NO_BROKER = {"bootstrap.servers": "127.0.0.1:9"}  # never contacted: librdkafka connects lazily


class SlowPositions(dict):
    """Positions whose comparison yields the GIL to other threads, so that
    two threads looking for the same idle consumer overlap every time."""

    def __eq__(self, other: object) -> bool:
        time.sleep(0.01)
        return dict.__eq__(self, other)

    __hash__ = None


class ConsumerPool(unittest.TestCase):
    """The idle catch-up consumers are shared by the pool's threads and the reactor."""

    def test_two_threads_never_take_the_same_idle_consumer(self):
        backend = KafkaBackend(dict(NO_BROKER), reactor)
        wanted = {("t", 0): 5}
        consumers = [Consumer(backend.consumer_settings(catchup=True)) for _ in range(2)]
        self.addCleanup(lambda: [c.close() for c in consumers])
        backend._idle = [(dict(wanted), consumers[0]), ({("t", 0): 99}, consumers[1])]
        taken: list[object] = []
        start = threading.Barrier(2)

        def take() -> None:
            start.wait()
            taken.append(backend._take_consumer(SlowPositions(wanted)))

        threads = [threading.Thread(target=take) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(len(taken), 2)
        self.assertIsNot(taken[0], taken[1], "one idle consumer was handed to two threads")
        self.assertEqual(backend._idle, [])

    @async_test
    async def test_a_tail_that_reports_at_once_keeps_its_report(self):
        backend = KafkaBackend(dict(NO_BROKER), reactor)

        class ReportingTail(KafkaTail):
            crash: Optional[BaseException] = None

            def _run(self) -> None:  # the first poll fails at once
                try:
                    self._report("the first poll failed")
                except BaseException as e:
                    self.crash = e
                finally:
                    self._consumer.close()

        for _ in range(20):  # the thread and __init__ race: give it chances
            tail = ReportingTail(backend, {("t", 0): 0}, lambda records: None)
            await deferToThread(tail._thread.join)
            self.assertIsNone(tail.crash)
            self.assertEqual(tail._reported, "the first poll failed")
        await turn()  # the reports' warnings, queued with callFromThread
