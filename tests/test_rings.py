"""Memory that does not multiply with stream sets (issue 20, eventstreams.rings).

The daemon runs in its own process so that its RSS is its own; clients
here only count bytes. Each client names a different subset of the
recentchange partitions in its Last-Event-ID, which makes a distinct set:
the records must still be kept once per partition, within ring_memory.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time
import urllib.request

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.trial import unittest

from eventstreams.backends.embedded import EmbeddedBackend
from tests.support import async_test, free_port, sleep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = os.path.join(ROOT, "eventstreams", "data", "recentchange-combined.jsonl")
TOPICS = ("eqiad.mediawiki.recentchange", "codfw.mediawiki.recentchange")
PARTITIONS = 4
SETS = 60
RATE = 50  # events per second
EVENTS = 600
RING_MEMORY = 1024 * 1024
SLACK = 8 * 1024 * 1024  # allocator and interpreter noise: "a few MiB"

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

    def connectionLost(self, reason: object) -> None:
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
        self.addCleanup(lambda: (proc.terminate(), proc.wait(30)))
        return proc, port, metrics, directory

    @async_test
    async def test_sixty_partition_subsets_stay_within_the_ring_budget(self):
        proc, port, metrics, directory = self.start_daemon()
        for _ in range(100):
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
