"""Memory that does not multiply with stream sets (issue 20, eventstreams.rings).

The daemon runs in its own process so that its RSS is its own; clients
here only count bytes. Each client names a different subset of the
recentchange partitions in its Last-Event-ID, which makes a distinct set:
the records must still be kept once per partition, within ring_memory.
"""
from __future__ import annotations

import gc
import json
import os
import random
import tracemalloc
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial import unittest

from eventstreams.backends.base import Record
from eventstreams.backends.embedded import EmbeddedBackend
from eventstreams.hub import Hub, Hubs, TooManySets, id_text
from eventstreams.rings import Rings, events
from eventstreams.transports import ITCPConnection
from tests.support import async_test, free_port, sleep
from tests.test_stream import StreamTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = os.path.join(ROOT, "eventstreams", "data", "recentchange-combined.jsonl")
TOPICS = ("eqiad.mediawiki.recentchange", "codfw.mediawiki.recentchange")
PARTITIONS = 4
SETS = 60
RATE = 50  # events per second
EVENTS = 600
RING_MEMORY = 1024 * 1024
SLACK = 8 * 1024 * 1024  # allocator and interpreter noise: "a few MiB"
A, B = ("a", 0), ("b", 0)

CONFIG = """
[eventstreams]
listen = tcp:{port}:interface=127.0.0.1
heartbeat = 0
ring_size = 10000
ring_memory = {memory}
hub_linger = 60
client_ip_connection_limit = 0

[embedded]
path = {dir}/log.sqlite
retention = 0
partitions = {partitions}

[metrics]
listen = tcp:{metrics}:interface=127.0.0.1

[stream:mediawiki.recentchange]
topics = {topics}
aliases = recentchange
"""


class Counter(Protocol):
    """A stream client that keeps nothing but counts."""

    transport: ITCPConnection  # (Twisted types it Optional[ITransport])

    def __init__(self, request: bytes):
        self.request = request
        self.received = 0
        self.head = b""
        self.status = 0
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        if not self.status:
            self.head += data
            if b"\r\n" in self.head:
                self.status = int(self.head.split(b" ", 2)[1])
                self.head = b""
        self.received += len(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.callback(None)


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


class DistinctSets(unittest.TestCase):
    timeout = 120

    def start_daemon(self) -> tuple[subprocess.Popen, int, int, str]:
        directory = tempfile.mkdtemp(prefix="es-rings-")
        port, metrics = free_port(), free_port()
        path = os.path.join(directory, "streams.ini")
        with open(path, "w") as f:
            f.write(CONFIG.format(port=port, metrics=metrics, dir=directory, partitions=PARTITIONS,
                                  memory=RING_MEMORY, topics=",".join(TOPICS)))
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        proc = subprocess.Popen([twistd, "-n", "--pidfile=", "--logfile", os.path.join(directory, "log"),
                                 "eventstreams", "-c", path], cwd=ROOT)

        def stop() -> None:
            proc.terminate()
            proc.wait(30)

        self.addCleanup(stop)
        return proc, port, metrics, directory

    @async_test
    async def test_sixty_partition_subsets_stay_within_the_ring_budget(self):
        proc, port, metrics, directory = self.start_daemon()
        for _ in range(300):  # a busy machine may take a while to start it
            try:
                metric(metrics, "eventstreams_hubs")
                break
            except OSError:
                await sleep(0.1)
        writer = EmbeddedBackend(os.path.join(directory, "log.sqlite"), 0, PARTITIONS, reactor=reactor,
                                 poll_interval=0)
        writer.start()
        self.addCleanup(writer.stop)
        with open(SAMPLES, "rb") as f:
            samples = [line.strip() for line in f][:EVENTS]
        await writer.append(TOPICS[0], [(None, s) for s in samples[:2 * PARTITIONS]])
        await writer.append(TOPICS[1], [(None, s) for s in samples[:2 * PARTITIONS]])

        everything = [(t, p) for t in TOPICS for p in range(PARTITIONS)]
        subsets: set[tuple] = set()
        chooser = random.Random(20)
        while len(subsets) < SETS:
            subsets.add(tuple(sorted(chooser.sample(everything, chooser.randint(1, len(everything) - 1)))))
        clients = []
        for subset in sorted(subsets):
            last_id = json.dumps([{"topic": t, "partition": p, "offset": -1} for t, p in subset])
            request = (b"GET /v2/stream/recentchange HTTP/1.1\r\nHost: x\r\nLast-Event-ID: "
                       + last_id.encode() + b"\r\n\r\n")
            client = Counter(request)
            await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
            clients.append(client)
        for _ in range(100):
            if metric(metrics, "eventstreams_hubs") >= SETS:
                break
            await sleep(0.1)
        self.assertEqual(metric(metrics, "eventstreams_hubs"), SETS)
        self.assertEqual({c.status for c in clients}, {200})

        async def publish(events: list[bytes]) -> None:
            """At RATE events per second, in ticks of a tenth of a second."""
            step = RATE // 10
            for n in range(0, len(events), step):
                started = time.monotonic()
                await writer.append(TOPICS[n // step % 2], [(None, e) for e in events[n:n + step]])
                await sleep(max(0.0, 0.1 - (time.monotonic() - started)))

        await publish(samples[:RATE])  # warm up: every set has taken a pass
        await sleep(1.5)
        before = rss(proc.pid)
        received = sum(c.received for c in clients)
        await publish(samples[RATE:])
        await sleep(1.5)  # the daemon polls the shared file every second
        after = rss(proc.pid)
        self.assertGreater(sum(c.received for c in clients), received)
        growth = after - before
        self.assertLessEqual(growth, RING_MEMORY + SLACK,
                             f"RSS grew by {growth / 2**20:.1f} MiB with {SETS} sets; "
                             f"the rings' budget is {RING_MEMORY / 2**20:.1f} MiB")
        self.assertLessEqual(metric(metrics, "eventstreams_ring_bytes"), RING_MEMORY)
        self.assertLessEqual(metric(metrics, "eventstreams_log_readers"), len(everything))
        for c in clients:
            c.transport.loseConnection()
        for c in clients:
            await c.lost


def raw_samples(n: int) -> list[bytes]:
    with open(SAMPLES, "rb") as f:
        return [line.strip() for line, _ in zip(f, range(n))]


def records(tp: tuple[str, int], first: int, values: list[bytes], timestamp: int = 1_000) -> list[Record]:
    return [Record(tp[0], tp[1], first + n, timestamp + n, None, v) for n, v in enumerate(values)]


class Budget(unittest.SynchronousTestCase):
    """The rings' bounds, fed by hand (as a reader's tail would)."""

    def rings(self, ring_size: int = 100_000, memory: int = 0) -> Rings:
        rings = Rings(None, ring_size, Clock(), memory)  # type: ignore[arg-type]
        for tp in (A, B):
            rings.ring(tp)
        return rings

    def test_the_oldest_items_go_first_over_all_partitions(self):
        values = raw_samples(400)
        rings = self.rings(memory=200_000)
        for n in range(0, 400, 10):
            rings.on_records(records(A if n % 20 else B, n, values[n:n + 10]))
        self.assertLessEqual(rings.bytes, 200_000)
        self.assertGreater(rings.bytes, 200_000 - 10_000)
        kept = sorted((item.seq for ring in rings.rings.values() for item in ring.items[ring.first:]))
        # what is kept is the newest run of arrivals, nothing older
        self.assertEqual(kept, list(range(400 - len(kept) + 1, 401)))
        self.assertEqual(rings.entries, len(kept))
        self.assertEqual(rings.bytes, sum(ring.bytes for ring in rings.rings.values()))
        for ring in rings.rings.values():
            oldest = ring.oldest()
            self.assertLessEqual(ring.base[0], oldest.offset)
            self.assertGreater(ring.base[0], 0)  # the dropped ones are behind it

    def test_ring_size_bounds_each_partition_and_the_eviction_order_stays_small(self):
        rings = self.rings(ring_size=5)
        for n in range(0, 20_000, 100):
            rings.on_records(records(A, n, [b'{"n":%d}' % i for i in range(n, n + 100)]))
        self.assertEqual(len(rings.rings[A]), 5)
        self.assertEqual([i.offset for i in rings.rings[A].items[rings.rings[A].first:]], list(range(19_995, 20_000)))
        self.assertLess(len(rings._order), 2 * rings.entries + 4096 + 100)
        self.assertLess(len(rings.rings[A].items), 2 * 1024 + 100)

    def test_an_item_costs_at_most_twice_its_raw_recentchange_value(self):
        values = raw_samples(2000)
        rings = self.rings()
        events._events.clear()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for n in range(0, 2000, 100):
                rings.on_records(records(A, n, values[n:n + 100]))
            events._events.clear()  # the bounded cache of decoded events is not per item
            gc.collect()
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        raw = sum(len(v) for v in values)
        self.assertLessEqual(held, 2 * raw, f"{held / 2000:.0f} bytes per item for {raw / 2000:.0f} raw")
        # and the budget's count is honest about it
        self.assertGreaterEqual(rings.bytes, held * 0.9)


class Sharing(unittest.TestCase):
    """Hubs over overlapping sets share one reader and ring per partition."""

    async def hubs(self, max_sets: int = 0) -> tuple[EmbeddedBackend, Hubs]:
        backend = EmbeddedBackend(os.path.join(self.mktemp(), "log.sqlite"), 0, 2, reactor=reactor)
        backend.start()
        self.addCleanup(backend.stop)
        hubs = Hubs(backend, 1000, 0.01, reactor, 0.0, 10_000_000, max_sets)
        self.addCleanup(hubs.stop)
        await backend.identity()
        return backend, hubs

    @async_test
    async def test_overlapping_sets_share_readers_and_items_and_each_gets_its_own_ids(self):
        backend, hubs = await self.hubs()
        t, u = "t", "u"
        one = await hubs.get([(t, 0), (t, 1)])
        two = await hubs.get([(t, 1), (u, 0)])
        self.assertEqual(len(hubs.rings.readers), 2)  # (t,0),(t,1) then (u,0): each partition once
        sinks = [Collect(), Collect()]
        one.subscribe(sinks[0])
        two.subscribe(sinks[1])
        await sleep(0.05)
        stored = await backend.append(t, [(None, b'{"n":%d}' % n) for n in range(6)])
        await backend.append(u, [(None, b'{"u":1}')])
        for sink, count in ((sinks[0], 6), (sinks[1], 4)):
            for _ in range(100):
                if len(sink.entries) >= count:
                    break
                await sleep(0.02)
        on_t1 = [r.offset for r in stored if r.partition == 1]
        self.assertEqual([e.record.offset for e in sinks[0].entries if e.record.partition == 1], on_t1)
        self.assertEqual([e.record.offset for e in sinks[1].entries if e.record.topic == t], on_t1)
        self.assertEqual(hubs.rings.entries, 7)  # each record once, whatever the sets
        # the same record, with each set's own id over its own partitions
        first = next(e for e in sinks[1].entries if e.record.topic == t)
        same = next(e for e in sinks[0].entries if e.record is first.record)
        self.assertEqual([(i["topic"], i["partition"]) for i in json.loads(first.id_text())], [(t, 1), (u, 0)])
        self.assertEqual([(i["topic"], i["partition"]) for i in json.loads(same.id_text())], [(t, 0), (t, 1)])
        self.assertEqual(first.id_text(), id_text(two.tps, first.vector))
        self.assertEqual(same.id_text(), id_text(one.tps, same.vector))
        one.stop()
        self.assertEqual(len(hubs.rings.readers), 2)  # (t,1) is still followed for the other set
        two.stop()
        self.assertEqual((len(hubs.rings.readers), hubs.rings.bytes, hubs.rings.entries), (0, 0, 0))

    @async_test
    async def test_max_stream_sets_refuses_a_new_set_but_makes_room_from_idle_ones(self):
        backend, hubs = await self.hubs(max_sets=2)
        a = await hubs.get([("t", 0)])
        b = await hubs.get([("t", 1)])
        a.subscribe(Collect())
        b.subscribe(Collect())
        await sleep(0.05)
        with self.assertRaises(TooManySets):
            await hubs.get([("t", 0), ("t", 1)])
        self.assertIs(await hubs.get([("t", 0)]), a)  # a known set is always served
        self.assertEqual(hubs.refused, 1)
        for sub in list(b.subscriptions):
            sub.cancel()
        # b lingers without clients: a new set takes its place
        await hubs.get([("t", 0), ("t", 1)])
        self.assertEqual(len(hubs.hubs), 2)


class Collect:
    def __init__(self) -> None:
        self.entries: list = []

    def send_batch(self, batch: Any) -> None:
        self.entries.extend(batch.matched)

    def comment(self, text: str) -> None:
        pass

    def fail(self, reason: str) -> None:
        raise AssertionError(reason)


class TooManySetsOverHTTP(StreamTestCase):
    @async_test
    async def test_a_set_beyond_max_stream_sets_is_a_503_with_retry_after(self):
        d = await self.daemon("eventstreams.max_stream_sets=1", "eventstreams.hub_linger=60")
        await self.stream(d, "/v2/stream/recentchange")
        response = await self.get(d.url("/v2/stream/test"))
        self.assertEqual(response.code, 503)
        self.assertEqual(response.headers.getRawHeaders("retry-after"), ["30"])
        body = json.loads(await response.content())
        self.assertEqual(set(body), {"status", "type", "title", "detail", "method", "uri"})
        self.assertEqual((body["status"], body["type"]), (503, "service_unavailable"))
        metrics = (await (await self.get(d.url("/", "metrics"))).text()).splitlines()
        self.assertIn("eventstreams_stream_sets_refused_total 1", metrics)


class Raising(Collect):
    def __init__(self) -> None:
        super().__init__()
        self.failed: list[str] = []

    def send_batch(self, batch: Any) -> None:
        raise RuntimeError("a broken sink")

    def fail(self, reason: str) -> None:
        self.failed.append(reason)


class FanOutFaults(unittest.SynchronousTestCase):
    def test_a_sink_that_raises_does_not_stop_the_pass_for_the_others(self):
        clock = Clock()
        hub = Hub(None, [A], 100, clock)  # records are fed by hand
        hub.head = hub.ring_base = ((0, None),)
        sinks = [Collect(), Raising(), Collect(), Raising(), Collect()]
        subs = [hub.subscribe(sink) for sink in sinks]
        clock.advance(0)  # all live
        hub._on_records(records(A, 0, [b'{"n":0}', b'{"n":1}']))
        clock.advance(0)
        for sink in sinks:
            if isinstance(sink, Raising):
                self.assertEqual(sink.failed, ["internal error while sending events"])
            else:
                self.assertEqual([e.record.offset for e in sink.entries], [0, 1])
        self.assertEqual([s.closed for s in subs], [False, True, False, True, False])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)
        hub._on_records(records(A, 2, [b'{"n":2}']))
        clock.advance(0)
        self.assertEqual([e.record.offset for e in sinks[0].entries], [0, 1, 2])
