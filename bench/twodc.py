"""Time to first event when a client resumes in the other datacenter.

`python -m bench.twodc --kafka A --kafka-b B`: A and B are two Kafka
clusters with MirrorMaker 2 copying A's `dc.*` topics to B
(`scripts/kafka start-pair`, or `make test`'s pair). Two daemons run in this
process, one per cluster. The log gets `--records` recentchange events in
bursts that share milliseconds; then `--tries` times each, a client resumes
from a random event's id (an id taken from daemon A) at daemon A (offsets
valid: within the cluster) and at daemon B (resolved by time and `n`:
across clusters), and measures connect -> first event, checking that it is
the event after the id.
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
import uuid

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from eventstreams.config import load
from eventstreams.tap import build_service
from eventstreams.transports import ITCPConnection

CONFIG = """
[eventstreams]
listen = tcp:0:interface=127.0.0.1
backend = kafka
heartbeat = 0
hub_linger = 60
request_rate_per_ip = 0

[kafka]
bootstrap.servers = {bootstrap}

[intake]
listen = none

[stream:mediawiki.recentchange]
topics = {topic}
aliases = recentchange
"""


class FirstEvent(Protocol):
    transport: ITCPConnection  # (Twisted types it Optional[ITransport])

    def __init__(self, last_id: str):
        self.last_id = last_id
        self.buffer = b""
        self.started = 0.0
        self.done: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.started = time.monotonic()
        self.transport.write((f"GET /v2/stream/recentchange HTTP/1.1\r\nHost: bench\r\n"
                              f"Last-Event-ID: {self.last_id}\r\n\r\n").encode())

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        start = self.buffer.find(b"\ndata: ")
        end = self.buffer.find(b"\n", start + 7) if start >= 0 else -1
        if end < 0 or self.done.called:
            return
        seconds = time.monotonic() - self.started
        self.transport.abortConnection()
        self.done.callback((seconds, json.loads(self.buffer[start + 7:end])["id"]))


async def first_event(port: int, last_id: str) -> tuple[float, int]:
    client = FirstEvent(last_id)
    await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(ClientFactory.forProtocol(lambda: client))
    return await client.done


def setup(a: str, b: str, topic: str) -> None:
    """The topic in B (with records of its own), then in A."""
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    for bootstrap in (b, a):
        admin = AdminClient({"bootstrap.servers": bootstrap})
        admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(30)
        if bootstrap == b:
            producer = Producer({"bootstrap.servers": b})
            for i in range(7):  # older than A's records: timestamps do not go back
                producer.produce(topic, json.dumps({"local": i}).encode(),
                                 timestamp=int(time.time() * 1000) - 120_000)
            producer.flush(30)
    time.sleep(3)  # MirrorMaker sees the new topic


def produce(a: str, topic: str, records: int) -> None:
    """Bursts of 5 records sharing a millisecond."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": a, "linger.ms": 5})
    base = int(time.time() * 1000) - 60_000
    for n in range(records):
        producer.produce(topic, json.dumps({"meta": {}, "id": n}).encode(), timestamp=base + n // 5)
    producer.flush(30)


async def main(args: argparse.Namespace) -> None:
    topic = f"dc.bench{uuid.uuid4().hex[:6]}.eqiad.mediawiki.recentchange"
    await deferToThread(setup, args.kafka, args.kafka_b, topic)
    daemons = []
    for bootstrap in (args.kafka, args.kafka_b):
        directory = tempfile.mkdtemp(prefix="bench-twodc-")
        path = f"{directory}/streams.ini"
        with open(path, "w") as f:
            f.write(CONFIG.format(bootstrap=bootstrap, topic=topic))
        service = build_service(load(path, ()), reactor)
        service.startService()
        port = (await service.listeners["api"].bound()).getHost().port
        daemons.append((service, port))
    # Every event's id from daemon A. Both daemons follow the topic before
    # the records come, so resumes are served from their rings.
    ids: dict[int, str] = {}
    clients = []
    for _, port in daemons:
        client = FirstEvent(json.dumps([topic]))
        await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(ClientFactory.forProtocol(lambda: client))  # noqa: B023 (used at once)
        client.dataReceived = lambda data, c=client: setattr(c, "buffer", c.buffer + data)  # type: ignore[method-assign,misc]  # only collect: the ids come from the buffer
        clients.append(client)
    await deferLater(reactor, 1, lambda: None)
    await deferToThread(produce, args.kafka, topic, args.records)
    client = clients[0]
    while min(c.buffer.count(b"\ndata: ") for c in clients) < args.records:
        await deferLater(reactor, 0.2, lambda: None)
    for c in clients:
        c.transport.abortConnection()
    block_id = None
    for line in client.buffer.split(b"\n"):
        if line.startswith(b"id: "):
            block_id = line[4:].decode()
        elif line.startswith(b"data: ") and block_id is not None:
            ids[json.loads(line[6:])["id"]] = block_id
    results: dict[str, list[float]] = {"within the cluster (A's id at A)": [],
                                       "across clusters (A's id at B)": []}
    wrong = 0
    for _ in range(args.tries):
        n = random.randrange(args.records // 2, args.records - 1)
        for (label, seconds), (_, port) in zip(results.items(), daemons):
            took, got = await first_event(port, ids[n])
            seconds.append(took)
            if got != n + 1:
                wrong += 1
                print(f"{label}: resumed after {n}, first event {got}")
    for label, seconds in results.items():
        seconds.sort()
        print(f"{label}: first event p50 {seconds[len(seconds) // 2] * 1000:.1f} ms, "
              f"p90 {seconds[int(len(seconds) * .9)] * 1000:.1f} ms, max {seconds[-1] * 1000:.1f} ms "
              f"({len(seconds)} resumes)")
    print(f"first event not the one after the id: {wrong}")
    for service, _ in daemons:
        await service.stopService()


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kafka", required=True, help="cluster A's bootstrap servers")
    parser.add_argument("--kafka-b", required=True, help="cluster B's bootstrap servers (mirror of A)")
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--tries", type=int, default=50)
    args = parser.parse_args()
    done = defer.ensureDeferred(main(args))
    done.addErrback(lambda f: print(f.getTraceback()))
    done.addBoth(lambda _: reactor.stop())
    reactor.run()


if __name__ == "__main__":
    run()
