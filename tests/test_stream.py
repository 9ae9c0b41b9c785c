"""End to end: the real service tree on loopback ports, real HTTP clients."""
from __future__ import annotations

import gc
import json
import os
import time
from datetime import datetime, timezone

import treq
from twisted.internet import reactor
from twisted.web.client import HTTPConnectionPool
from twisted.trial import unittest
from twisted.web.http import HTTPChannel
from twisted.web.server import Request

from .support import KAFKA, Daemon, async_test, offsets_by_partition, open_stream, rc_event, wait_for


# A recent base for explicit record timestamps: Kafka deletes segments whose
# records are older than its retention, so tests never write 1970 times.
T0 = (int(time.time()) // 3600 - 2) * 3600 * 1000


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class StreamTestCase(unittest.TestCase):
    overrides: tuple[str, ...] = ()
    backend = "embedded"

    async def daemon(self, *overrides: str, extra: str = "", partitions: dict | None = None) -> Daemon:
        if self.backend == "kafka" and not KAFKA:
            message = "no Kafka broker: set EVENTSTREAMS_KAFKA (make test starts one with scripts/kafka)"
            if os.environ.get("CI") == "true":
                self.fail(message)
            raise unittest.SkipTest(message)
        d = Daemon(self.mktemp(), self.overrides + overrides, extra, self.backend, partitions)
        await d.start()
        self.addCleanup(d.stop)
        return d

    def request(self, method: str, url: str, **kwargs):
        """One request on its own connection, closed before the test ends."""
        pool = HTTPConnectionPool(reactor, persistent=False)
        return treq.request(method, url, pool=pool, **kwargs)

    def get(self, url: str, **kwargs):
        return self.request("GET", url, **kwargs)

    async def stream(self, d: Daemon, path: str, headers: dict | None = None):
        client = await open_stream(d.ports["api"], path, headers)
        self.addCleanup(lambda: client.transport.loseConnection())
        return client


class StreamBasics(StreamTestCase):
    @async_test
    async def test_stream_starts_with_ok_and_upstream_headers(self):
        d = await self.daemon()
        client = await self.stream(d, "/v2/stream/recentchange")
        await client.wait_for(lambda: client.body.startswith(b":ok\n\n"))
        self.assertEqual(client.status, 200)
        self.assertEqual(client.headers["content-type"], "text/event-stream; charset=utf-8")
        self.assertEqual(client.headers["cache-control"], "no-cache")
        self.assertEqual(client.headers["connection"], "close")
        self.assertEqual(client.headers["access-control-allow-origin"], "*")
        self.assertEqual(client.headers["x-accel-buffering"], "no")
        self.assertEqual(client.headers["transfer-encoding"], "chunked")
        self.assertEqual(client.body, b":ok\n\n")

    @async_test
    async def test_event_frame_carries_meta_position_and_an_id_over_every_partition(self):
        d = await self.daemon()
        client = await self.stream(d, "/v2/stream/recentchange,test")
        await d.append(d.rc[1], [rc_event(1)])
        await client.wait_events(1)
        block = client.blocks[-1]
        self.assertEqual(block["event"], "message")
        event = json.loads(block["data"])
        self.assertEqual(event["meta"]["topic"], d.rc[1])
        self.assertEqual((event["meta"]["partition"], event["meta"]["offset"]), (0, 0))
        self.assertEqual(event["title"], "Page 1")
        ids = json.loads(block["id"])
        self.assertEqual(
            [(i["topic"], i["partition"], i["offset"]) for i in ids],
            [(d.rc[0], 0, 0), (d.rc[1], 0, 1), (d.topic("eqiad.test.event"), 0, 0)],
        )
        codfw = ids[1]
        self.assertEqual((codfw["timestamp"], codfw["n"]), d.hubs.hubs[tuple(sorted(
            [(d.rc[0], 0), (d.rc[1], 0), (d.topic("eqiad.test.event"), 0)]))].head[1][1])
        self.assertEqual(ids[0]["cluster"], d.backend.cluster)
        # One data line of compact JSON, raw UTF-8.
        self.assertNotIn(b"\ndata: {\n", client.body)

    @async_test
    async def test_non_ascii_is_sent_as_raw_utf8(self):
        d = await self.daemon()
        client = await self.stream(d, "/v2/stream/recentchange")
        event = rc_event(1)
        event["title"] = "Zürich 東京"
        await d.append(d.rc[0], [event])
        await client.wait_events(1)
        self.assertIn("Zürich 東京".encode("utf-8"), client.body)
        self.assertEqual(client.events[0]["title"], "Zürich 东京".replace("东", "東"))

    @async_test
    async def test_default_start_is_the_end_of_the_log(self):
        d = await self.daemon()
        await d.append(d.rc[0], [rc_event(n) for n in range(5)])
        client = await self.stream(d, "/v2/stream/recentchange")
        await d.append(d.rc[0], [rc_event(99), rc_event(100)])
        await client.wait_events(2)  # 100 comes after anything the start could have sent
        self.assertEqual([e["id"] for e in client.events], [99, 100])

    @async_test
    async def test_ndjson_when_the_client_accepts_json(self):
        d = await self.daemon()
        client = await self.stream(d, "/v2/stream/recentchange", {"Accept": "application/json"})
        await d.append(d.rc[0], [rc_event(1), rc_event(2)])
        await client.wait_for(lambda: client.body.count(b"\n") >= 3)
        self.assertEqual(client.headers["content-type"], "application/json; charset=utf-8")
        self.assertTrue(client.body.startswith(b"\n{"))
        lines = client.body.split(b"\n")[1:3]
        self.assertEqual([json.loads(x)["id"] for x in lines], [1, 2])
        self.assertNotIn(b"event:", client.body)

    @async_test
    async def test_heartbeat_comment_after_silence(self):
        d = await self.daemon("eventstreams.heartbeat=0.2")
        client = await self.stream(d, "/v2/stream/recentchange")
        await client.wait_for(lambda: b":ok\n\n:\n\n:\n\n" in client.body, timeout=5)
        self.assertEqual(client.events, [])

    @async_test
    async def test_max_lifetime_ends_the_response(self):
        d = await self.daemon("eventstreams.max_lifetime=0.3")
        client = await self.stream(d, "/v2/stream/recentchange")
        await client.wait_for(lambda: client.done, timeout=5)
        self.assertTrue(client.body.startswith(b":ok\n\n"))

    @async_test
    async def test_client_disconnect_leaves_no_reader_behind(self):
        d = await self.daemon()
        a = await self.stream(d, "/v2/stream/recentchange")
        b = await self.stream(d, "/v2/stream/recentchange")
        await d.append(d.rc[0], [rc_event(1)])
        await a.wait_events(1)
        self.assertEqual(len(d.hubs.hubs), 1)
        hub = next(iter(d.hubs.hubs.values()))
        self.assertEqual(len(hub.subscriptions), 2)
        await a.close()
        await wait_for(lambda: len(hub.subscriptions) == 1, "the first client's subscription to end")
        await b.close()
        await wait_for(lambda: d.hubs.hubs == {}, "the hub to go")
        self.assertIsNone(hub._tail)
        self.assertEqual(d.service.connections.sinks, set())
        self.assertEqual(d.service.connections.per_ip, {})


class Resume(StreamTestCase):
    async def fill(self, d: Daemon, n: int) -> None:
        """n events spread over both recentchange topics, in several writes."""
        for start in range(0, n, 50):
            batch = range(start, min(n, start + 50))
            await d.append(d.rc[0], [rc_event(i) for i in batch if i % 3])
            await d.append(d.rc[1], [rc_event(i) for i in batch if not i % 3])

    async def resume_exactly(self, d: Daemon, total: int, first: int) -> None:
        client = await self.stream(d, "/v2/stream/recentchange?since=0")
        await client.wait_events(first)
        await client.close()
        got = client.events[:first]
        last_id = [b["id"] for b in client.blocks if b.get("event") == "message"][first - 1]
        again = await self.stream(d, "/v2/stream/recentchange", {"Last-Event-ID": last_id})
        await again.wait_events(total - first)
        # A sentinel after the log's end: once it arrives, any repeat would have too.
        await d.append(d.rc[0], [rc_event(total)])
        await again.wait_for(lambda: again.events[-1]["id"] == total)
        got += again.events[:-1]
        self.assertEqual(sorted(e["id"] for e in got), list(range(total)))
        for tp, offsets in offsets_by_partition(got).items():
            self.assertEqual(offsets, list(range(len(offsets))), tp)

    @async_test
    async def test_resume_by_offset_id_is_exact_from_the_ring(self):
        d = await self.daemon("eventstreams.ring_size=1000")
        await self.fill(d, 300)
        await self.resume_exactly(d, 300, 120)

    @async_test
    async def test_resume_by_offset_id_is_exact_from_the_log(self):
        d = await self.daemon("eventstreams.ring_size=10")
        await self.fill(d, 3000)
        await self.resume_exactly(d, 3000, 1234)

    @async_test
    async def test_resume_while_events_keep_arriving(self):
        d = await self.daemon("eventstreams.ring_size=50")
        await self.fill(d, 200)
        client = await self.stream(d, "/v2/stream/recentchange?since=0")
        await client.wait_events(200)
        await client.close()
        await self.fill_range(d, 200, 400)
        again = await self.stream(d, "/v2/stream/recentchange", {"Last-Event-ID": client.last_id})
        await self.fill_range(d, 400, 600)
        await again.wait_events(400)
        got = client.events + again.events
        self.assertEqual(sorted(e["id"] for e in got), list(range(600)))
        for offsets in offsets_by_partition(got).values():
            self.assertEqual(offsets, list(range(len(offsets))))

    async def fill_range(self, d: Daemon, a: int, b: int) -> None:
        await d.append(d.rc[0], [rc_event(i) for i in range(a, b) if i % 3])
        await d.append(d.rc[1], [rc_event(i) for i in range(a, b) if not i % 3])

    @async_test
    async def test_resume_by_timestamp_id(self):
        d = await self.daemon()
        await d.append(d.rc[0], [rc_event(1)], timestamp=T0 + 1_000_000)
        await d.append(d.rc[0], [rc_event(2)], timestamp=T0 + 2_000_000)
        await d.append(d.rc[0], [rc_event(3)], timestamp=T0 + 3_000_000)
        leid = json.dumps([{"topic": d.rc[0], "partition": 0, "timestamp": T0 + 2_000_000}])
        client = await self.stream(d, "/v2/stream/recentchange", {"Last-Event-ID": leid})
        await client.wait_events(2)
        self.assertEqual([e["id"] for e in client.events], [2, 3])
        ids = json.loads(client.last_id)
        self.assertEqual(ids, [{"topic": d.rc[0], "partition": 0, "offset": 3, "timestamp": T0 + 3_000_001,
                                "n": 1, "cluster": d.backend.cluster}])

    @async_test
    async def test_offset_wins_over_timestamp(self):
        d = await self.daemon()
        await d.append(d.rc[0], [rc_event(n) for n in range(5)], timestamp=T0 + 1_000)
        leid = json.dumps([{"topic": d.rc[0], "partition": 0, "offset": 3, "timestamp": 0}])
        client = await self.stream(d, "/v2/stream/recentchange", {"Last-Event-ID": leid})
        await client.wait_events(2)
        self.assertEqual([e["id"] for e in client.events], [3, 4])

    @async_test
    async def test_subset_of_partitions_limits_the_stream(self):
        d = await self.daemon()
        await d.append(d.rc[0], [rc_event(1)])
        await d.append(d.rc[1], [rc_event(2)])
        leid = json.dumps([{"topic": d.rc[1], "partition": 0, "offset": 0}])
        client = await self.stream(d, "/v2/stream/recentchange", {"Last-Event-ID": leid})
        await client.wait_events(1)
        await d.append(d.rc[0], [rc_event(3)])
        await d.append(d.rc[1], [rc_event(4)])
        await client.wait_events(2)
        self.assertEqual([e["id"] for e in client.events], [2, 4])
        self.assertEqual([i["topic"] for i in json.loads(client.last_id)], [d.rc[1]])

    @async_test
    async def test_topic_name_form_starts_at_since_or_the_end(self):
        d = await self.daemon()
        await d.append(d.rc[0], [rc_event(1)], timestamp=T0 + 5_000)
        await d.append(d.rc[1], [rc_event(2)], timestamp=T0 + 5_000)
        leid = json.dumps([d.rc[0]])
        client = await self.stream(d, f"/v2/stream/recentchange?since={T0 + 1000}", {"Last-Event-ID": leid})
        await client.wait_events(1)
        self.assertEqual([e["id"] for e in client.events], [1])
        latest = await self.stream(d, "/v2/stream/recentchange", {"Last-Event-ID": leid})
        await d.append(d.rc[0], [rc_event(3)])
        await latest.wait_events(1)
        self.assertEqual([e["id"] for e in latest.events], [3])

    @async_test
    async def test_upstream_id_with_minus_one_offset_is_accepted(self):
        d = await self.daemon()
        await d.append(d.rc[0], [rc_event(1)], timestamp=T0 + 1_000)
        await d.append(d.rc[0], [rc_event(2)], timestamp=T0 + 2_000)
        leid = json.dumps([
            {"topic": d.rc[0], "partition": 0, "timestamp": T0 + 1_500},
            {"topic": d.rc[1], "partition": 0, "offset": -1},
        ])
        client = await self.stream(d, "/v2/stream/recentchange", {"Last-Event-ID": leid})
        await client.wait_events(1)
        self.assertEqual(client.events[0]["id"], 2)

    @async_test
    async def test_since_epoch_ms_and_iso8601(self):
        d = await self.daemon()
        await d.append(d.rc[0], [rc_event(1)], timestamp=T0)
        await d.append(d.rc[0], [rc_event(2)], timestamp=T0 + 100_000)
        by_ms = await self.stream(d, f"/v2/stream/recentchange?since={T0 + 50_000}")
        by_iso = await self.stream(d, "/v2/stream/recentchange?since=" + iso(T0 + 50_000))
        await by_ms.wait_events(1)
        await by_iso.wait_events(1)
        self.assertEqual([e["id"] for e in by_ms.events], [2])
        self.assertEqual([e["id"] for e in by_iso.events], [2])

    @async_test
    async def test_expired_offset_starts_at_oldest_and_says_so(self):
        d = await self.daemon("embedded.retention=1h")
        await d.append(d.rc[0], [rc_event(n) for n in range(3)], timestamp=1_000)
        await d.append(d.rc[0], [rc_event(n) for n in range(3, 5)])
        removed = await d.backend.prune()
        self.assertEqual(removed, 3)
        leid = json.dumps([{"topic": d.rc[0], "partition": 0, "offset": 1}])
        client = await self.stream(d, "/v2/stream/recentchange", {"Last-Event-ID": leid})
        await client.wait_events(2)
        self.assertEqual([e["meta"]["offset"] for e in client.events], [3, 4])
        self.assertTrue(any("no longer retained" in c and "3" in c for c in client.comments()), client.comments())

    @async_test
    async def test_offset_beyond_the_end_starts_at_the_end(self):
        d = await self.daemon()
        await d.append(d.rc[0], [rc_event(n) for n in range(3)])
        leid = json.dumps([{"topic": d.rc[0], "partition": 0, "offset": 1000}])
        client = await self.stream(d, "/v2/stream/recentchange", {"Last-Event-ID": leid})
        await d.append(d.rc[0], [rc_event(7)])
        await client.wait_events(1)
        self.assertEqual(client.events[0]["meta"]["offset"], 3)
        self.assertTrue(any("beyond the end" in c for c in client.comments()))


class Filters(StreamTestCase):
    @async_test
    async def test_filters_select_events_and_ids_still_advance(self):
        d = await self.daemon()
        client = await self.stream(
            d, "/v2/stream/recentchange?filter.wiki=dewiki,enwiki&filter.bot=false&filter.namespace!=2"
        )
        events = [
            rc_event(1, "enwiki"), rc_event(2, "wikidatawiki"), rc_event(3, "dewiki", bot=True),
            rc_event(4, "dewiki", namespace=2), rc_event(5, "dewiki"),
            rc_event(6, "wikidatawiki"), rc_event(7, "wikidatawiki"),
        ]
        await d.append(d.rc[0], events)
        await client.wait_events(2)
        self.assertEqual([e["id"] for e in client.events], [1, 5])
        # The skipped tail still moves the client's id past offset 6.
        await client.wait_for(lambda: json.loads(client.last_id)[0]["offset"] == 7, timeout=5)
        last = client.blocks[-1]
        self.assertNotIn("data", last)
        self.assertNotIn("event", last)

    @async_test
    async def test_glob_filter_on_server_name(self):
        d = await self.daemon()
        client = await self.stream(d, "/v2/stream/recentchange?filter.server_name=*.wikipedia.org")
        await d.append(d.rc[0], [rc_event(1, "wikidatawiki"), rc_event(2, "dewiki"), rc_event(3, "enwiki")])
        await client.wait_events(2)
        self.assertEqual([e["id"] for e in client.events], [2, 3])

    @async_test
    async def test_id_updates_can_be_turned_off(self):
        # Heartbeats share the id updates' 1 s period, and one is written only
        # after a whole quiet period: when it arrives, an id update tick has
        # passed since the message (the positive marker for the negative check).
        d = await self.daemon("eventstreams.id_updates=false", "eventstreams.heartbeat=1")
        client = await self.stream(d, "/v2/stream/recentchange?filter.wiki=dewiki")
        await d.append(d.rc[0], [rc_event(1, "enwiki"), rc_event(2, "dewiki"), rc_event(3, "enwiki")])
        await client.wait_events(1)
        await client.wait_for(lambda: len(client.blocks) > 2, timeout=5)
        self.assertEqual([b.get("event") for b in client.blocks[:2]], [None, "message"])
        self.assertEqual([b for b in client.blocks[2:] if "id" in b], [])
        self.assertIn("", client.blocks[2]["comments"])  # the heartbeat


class Errors(StreamTestCase):
    async def error(self, d: Daemon, path: str, status: int, headers: dict | None = None) -> dict:
        response = await self.get(d.url(path), headers=headers or {})
        body = await response.json()
        self.assertEqual(response.code, status, body)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json; charset=utf-8"])
        self.assertEqual(body["status"], status)
        self.assertEqual(body["method"], "get")
        self.assertEqual(body["uri"], path)
        return body

    @async_test
    async def test_unknown_stream(self):
        d = await self.daemon()
        body = await self.error(d, "/v2/stream/recentchange,nope,other", 400)
        self.assertEqual(body["type"], "not_found")
        self.assertEqual(body["title"], "Stream Not Found")
        self.assertEqual(body["detail"], "Invalid streams: nope,other")

    @async_test
    async def test_bad_since(self):
        d = await self.daemon()
        body = await self.error(d, "/v2/stream/recentchange?since=yesterday", 400)
        self.assertEqual(body["type"], "invalid_timestamp")

    @async_test
    async def test_bad_last_event_id_forms(self):
        d = await self.daemon()
        for header in ("", "nope", "[]", '{"topic":"x"}', json.dumps([{"topic": d.rc[0], "partition": "a"}]),
                       json.dumps([{"topic": d.rc[0], "partition": 7, "offset": 1}])):
            body = await self.error(d, "/v2/stream/recentchange", 400, {"Last-Event-ID": header})
            self.assertEqual(body["type"], "invalid_last_event_id", header)
            self.assertTrue(body["detail"], header)

    @async_test
    async def test_last_event_id_that_is_not_utf8(self):
        d = await self.daemon()
        body = await self.error(d, "/v2/stream/recentchange", 400, {b"Last-Event-ID": [b"[\xff\xfe]"]})
        self.assertEqual(body["type"], "invalid_last_event_id")
        self.assertIn("UTF-8", body["detail"])

    @async_test
    async def test_topic_outside_the_stream(self):
        d = await self.daemon()
        leid = json.dumps([{"topic": d.topic("eqiad.test.event"), "partition": 0, "offset": 0}])
        body = await self.error(d, "/v2/stream/recentchange", 404, {"Last-Event-ID": leid})
        self.assertIn(d.topic("eqiad.test.event"), body["detail"])

    @async_test
    async def test_malformed_filter(self):
        d = await self.daemon()
        body = await self.error(d, "/v2/stream/recentchange?filter.=x", 400)
        self.assertEqual(body["type"], "invalid_filter")

    @async_test
    async def test_per_ip_limit(self):
        d = await self.daemon("eventstreams.client_ip_connection_limit=2")
        await self.stream(d, "/v2/stream/recentchange")
        await self.stream(d, "/v2/stream/test")
        body = await self.error(d, "/v2/stream/recentchange", 429)
        self.assertEqual(body["type"], "too_many_requests")

    @async_test
    async def test_per_ip_limit_uses_the_configured_header(self):
        d = await self.daemon("eventstreams.client_ip_connection_limit=1", "eventstreams.client_ip_header=X-Client-IP")
        await self.stream(d, "/v2/stream/recentchange", {"X-Client-IP": "192.0.2.1"})
        other = await self.stream(d, "/v2/stream/recentchange", {"X-Client-IP": "192.0.2.2"})
        self.assertEqual(other.status, 200)
        await self.error(d, "/v2/stream/recentchange", 429, {"X-Client-IP": "192.0.2.1"})

    @async_test
    async def test_max_connections(self):
        d = await self.daemon("eventstreams.max_connections=1")
        await self.stream(d, "/v2/stream/recentchange")
        body = await self.error(d, "/v2/stream/recentchange", 503)
        self.assertEqual(body["type"], "service_unavailable")

    @async_test
    async def test_failure_after_200_is_an_error_event_with_the_current_id(self):
        d = await self.daemon("eventstreams.ring_size=5")
        await d.append(d.rc[0], [rc_event(n) for n in range(20)])

        def broken_read(positions, max_records):
            from twisted.internet.defer import fail

            return fail(OSError("disk on fire"))

        d.backend.read = broken_read  # the log fails under a catch-up reader
        client = await self.stream(d, "/v2/stream/recentchange?since=0")
        await client.wait_for(lambda: client.done, timeout=5)
        error = client.blocks[-1]
        self.assertEqual(error["event"], "error")
        self.assertIn("disk on fire", json.loads(error["data"])["detail"])
        self.assertEqual(json.loads(error["id"])[0]["offset"], 0)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)


class SlowClient(StreamTestCase):
    @async_test
    async def test_stalled_client_is_bounded_and_resumes_without_loss(self):
        d = await self.daemon("eventstreams.ring_size=200")
        slow = await self.stream(d, "/v2/stream/recentchange")
        fast = await self.stream(d, "/v2/stream/recentchange")
        slow.pause()
        big = "x" * 4000
        total = 3000
        for start in range(0, total, 100):
            batch = []
            for n in range(start, start + 100):
                event = rc_event(n)
                event["comment"] = big
                batch.append(event)
            await d.append(d.rc[0], batch)
        await fast.wait_events(total, timeout=30)
        hub = next(iter(d.hubs.hubs.values()))
        sub = next(s for s in hub.subscriptions if s.paused)
        self.assertFalse(sub.live)
        self.assertEqual(hub.catching_up, 1)
        # Its memory is bounded: what waits in the server for this client is
        # about one transport buffer, and the kernel took far less than the
        # ~12 MB produced.
        transport = sub.sink.transport
        queued = len(transport.dataBuffer) - transport.offset + transport._tempDataLen
        self.assertLess(queued, 128 * 1024)
        self.assertLess(sub.sink.bytes_written, 6_000_000)
        self.assertEqual(len(fast.events), total)
        slow.resume()
        await slow.wait_events(total, timeout=30)
        self.assertEqual([e["id"] for e in slow.events], list(range(total)))
        await wait_for(lambda: sub.live, "the slow client to join live")
        await d.append(d.rc[0], [rc_event(total)])
        await slow.wait_events(total + 1)


class Coalescing(StreamTestCase):
    """Records that reach a hub together go to each live client as one write
    (up to the batch bounds of eventstreams.hub), with the same ids as one
    write per event would give."""

    @async_test
    async def test_a_burst_goes_out_in_few_writes_with_every_id(self):
        d = await self.daemon()
        plain = await self.stream(d, "/v2/stream/recentchange")
        filtered = await self.stream(d, "/v2/stream/recentchange?filter.wiki=dewiki")
        await plain.wait_for(lambda: plain.body.startswith(b":ok"))
        await filtered.wait_for(lambda: filtered.body.startswith(b":ok"))
        chunks_before = plain.chunks
        total = 600
        events = [rc_event(n, "dewiki" if n % 3 == 0 else "enwiki") for n in range(total)]
        await d.append(d.rc[0], events)
        await plain.wait_events(total)
        self.assertEqual([e["meta"]["offset"] for e in plain.events], list(range(total)))
        # ~250-byte events: a batch ends at 256 entries or 64 KiB, ~3-4 writes
        self.assertLess(plain.chunks - chunks_before, total // 50)
        ids = [json.loads(b["id"])[0]["offset"] for b in plain.blocks if b.get("event") == "message"]
        self.assertEqual(ids, list(range(1, total + 1)))  # each id resumes right after its event
        await filtered.wait_events(total // 3)
        self.assertEqual([e["id"] for e in filtered.events], list(range(0, total, 3)))
        # The last event (599) does not match: the id still moves past it.
        await filtered.wait_for(lambda: json.loads(filtered.last_id)[0]["offset"] == total, timeout=5)

    @async_test
    async def test_a_client_that_resumes_mid_burst_gets_each_event_once(self):
        d = await self.daemon("eventstreams.ring_size=1000")
        first = await self.stream(d, "/v2/stream/recentchange")
        await d.append(d.rc[0], [rc_event(n) for n in range(100)])
        await first.wait_events(50)
        resume_id = next(b["id"] for b in first.blocks if b.get("event") == "message")  # after offset 0
        for start in range(100, 400, 100):  # appends and the resume interleave
            await d.append(d.rc[0], [rc_event(n) for n in range(start, start + 100)])
            if start == 200:
                second = await self.stream(d, "/v2/stream/recentchange", {"Last-Event-ID": resume_id})
        await first.wait_events(400)
        await second.wait_events(399)
        await d.append(d.rc[0], [rc_event(400)])  # a sentinel: any repeat arrives before it
        await second.wait_for(lambda: second.events[-1]["id"] == 400)
        self.assertEqual([e["id"] for e in second.events], list(range(1, 401)))


class TakeOver(StreamTestCase):
    """An open stream keeps no twisted.web request or channel (eventstreams.takeover)."""

    def live_http_objects(self) -> tuple[int, int]:
        gc.collect()
        objects = gc.get_objects()
        return (sum(isinstance(o, Request) for o in objects), sum(isinstance(o, HTTPChannel) for o in objects))

    @async_test
    async def test_open_streams_hold_no_request_objects(self):
        d = await self.daemon()
        before = self.live_http_objects()
        clients = [await self.stream(d, "/v2/stream/recentchange") for _ in range(5)]
        for client in clients:
            await client.wait_for(lambda c=client: c.body.startswith(b":ok"))
        await wait_for(lambda: self.live_http_objects() == before, "the requests and channels to be freed",
                       interval=0.05)
        await d.append(d.rc[0], [rc_event(1)])
        for client in clients:
            await client.wait_events(1)
        await clients[0].close()
        await wait_for(lambda: len(d.service.connections.sinks) == 4, "the closed client's sink to go")

    @async_test
    async def test_max_lifetime_sends_the_last_chunk_and_frees_the_slot(self):
        d = await self.daemon("eventstreams.max_lifetime=0.3", "eventstreams.client_ip_connection_limit=1")
        client = await self.stream(d, "/v2/stream/recentchange")
        await client.closed
        self.assertTrue(client.ended)
        self.assertTrue(client.body.startswith(b":ok\n\n"))
        again = await self.stream(d, "/v2/stream/recentchange")
        self.assertEqual(again.status, 200)

    @async_test
    async def test_a_client_that_leaves_frees_its_per_ip_slot(self):
        d = await self.daemon("eventstreams.client_ip_connection_limit=1")
        client = await self.stream(d, "/v2/stream/recentchange")
        await client.wait_for(lambda: client.body.startswith(b":ok"))
        await client.close()
        await wait_for(lambda: not d.service.connections.per_ip, "the per-IP slot to be freed")
        again = await self.stream(d, "/v2/stream/recentchange")
        self.assertEqual(again.status, 200)

    @async_test
    async def test_pipelined_bytes_after_the_request_are_ignored(self):
        d = await self.daemon()
        client = await self.stream(d, "/v2/stream/recentchange")
        await client.wait_for(lambda: client.body.startswith(b":ok"))
        client.transport.write(b"GET /v2/streams HTTP/1.1\r\nHost: x\r\n\r\n" * 100)
        await d.append(d.rc[0], [rc_event(1)])
        await client.wait_events(1)
        self.assertNotIn(b"HTTP/1.1", client.body)


class ServiceRoutes(StreamTestCase):
    @async_test
    async def test_spec_is_valid_openapi_with_the_stream_enum(self):
        from openapi_spec_validator import validate

        d = await self.daemon()
        response = await self.get(d.url("/?spec"))
        spec = await response.json()
        validate(spec)
        param = spec["paths"]["/v2/stream/{streams}"]["get"]["parameters"][0]
        self.assertEqual(param["schema"]["items"]["enum"], ["mediawiki.recentchange", "recentchange", "test"])

    @async_test
    async def test_stream_list_info_robots(self):
        d = await self.daemon()
        streams = await (await self.get(d.url("/v2/streams"))).json()
        self.assertEqual([s["name"] for s in streams], ["mediawiki.recentchange", "test"])
        self.assertEqual(streams[0]["aliases"], ["recentchange"])
        info = await (await self.get(d.url("/_info"))).json()
        self.assertEqual(info["name"], "eventstreams")
        self.assertEqual(await (await self.get(d.url("/_info/name"))).json(), {"name": "eventstreams"})
        self.assertIn("version", await (await self.get(d.url("/_info/version"))).json())
        robots = await self.get(d.url("/robots.txt"))
        self.assertEqual(await robots.text(), "User-agent: *\nDisallow: /\n")

    @async_test
    async def test_root_redirects_to_the_ui(self):
        d = await self.daemon()
        response = await self.get(d.url("/"), allow_redirects=False)
        self.assertEqual(response.code, 303)
        self.assertEqual(response.headers.getRawHeaders("location"), ["/v2/ui"])

    @async_test
    async def test_options_answers_cors(self):
        d = await self.daemon()
        response = await self.request(
            "OPTIONS", d.url("/v2/stream/recentchange"),
            headers={"Origin": "https://example.org", "Access-Control-Request-Headers": "last-event-id"},
        )
        self.assertEqual(response.code, 204)
        self.assertEqual(response.headers.getRawHeaders("access-control-allow-origin"), ["*"])
        self.assertIn("GET", response.headers.getRawHeaders("access-control-allow-methods")[0])
        self.assertEqual(response.headers.getRawHeaders("access-control-allow-headers"), ["last-event-id"])

    @async_test
    async def test_unknown_route_is_a_json_404(self):
        d = await self.daemon()
        response = await self.get(d.url("/nope"))
        self.assertEqual(response.code, 404)
        self.assertEqual((await response.json())["status"], 404)

    @async_test
    async def test_metrics_report_clients_and_deliveries(self):
        d = await self.daemon()
        client = await self.stream(d, "/v2/stream/recentchange")
        await d.append(d.rc[0], [rc_event(1), rc_event(2)])
        await client.wait_events(2)
        text = await (await self.get(d.url("/metrics", "metrics"))).text()
        self.assertIn('eventstreams_connected_clients{stream="mediawiki.recentchange"} 1', text)
        self.assertIn("eventstreams_events_delivered_total 2", text)
        self.assertIn("eventstreams_hubs 1", text)
        self.assertIn("eventstreams_connections_total 1", text)


class OverTLS(StreamTestCase):
    """A TLS connection keeps twisted.web's path (it is not taken over)."""

    @async_test
    async def test_a_stream_that_ends_closes_its_connection(self):
        # `Connection: close` is in the head: a client that waits for the
        # close (rather than the last chunk) must not wait forever.
        import socket
        import ssl

        import twisted.test
        from twisted.internet.threads import deferToThread

        pem = os.path.join(os.path.dirname(twisted.test.__file__), "server.pem")
        d = await self.daemon("eventstreams.max_lifetime=0.3",
                              f"eventstreams.listen=ssl:0:interface=127.0.0.1:privateKey={pem}")

        def read_until_closed() -> bytes:
            context = ssl.create_default_context()
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            with socket.create_connection(("127.0.0.1", d.ports["api"]), timeout=10) as raw:
                with context.wrap_socket(raw) as tls:
                    tls.sendall(b"GET /v2/stream/recentchange HTTP/1.1\r\nHost: x\r\n\r\n")
                    body = b""
                    try:
                        while chunk := tls.recv(65536):
                            body += chunk
                    except TimeoutError:
                        return body + b"<timed out>"
                    return body

        body = await deferToThread(read_until_closed)
        self.assertIn(b"connection: close", body.lower())
        self.assertTrue(body.endswith(b"0\r\n\r\n"), body[-60:])
