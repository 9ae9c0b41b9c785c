"""Shared helpers for the end-to-end tests: a daemon in the test's reactor, a
raw HTTP/1.1 stream client whose reading the test controls byte by byte, and
the waits: tests wait for a condition (wait_for, Waiters) with a deadline,
never for a guessed time; before a check that something did not happen, they
wait for a marker that proves it would have (a later event, a sentinel)."""
from __future__ import annotations

import inspect
import json
import os
import socket
import time
import uuid
from typing import Any, Awaitable, Callable, Optional, TypeVar, Union, overload

from twisted.internet import reactor, tcp
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from eventstreams.config import load
from eventstreams.tap import build_service
from eventstreams.transports import ITCPConnection

BASE_CONFIG = """
[eventstreams]
listen = tcp:0:interface=127.0.0.1
heartbeat = 0
ring_size = 100
hub_linger = 0

[embedded]
path = {path}
retention = 0

[intake]
listen = tcp:0:interface=127.0.0.1
max_body = 64k

[metrics]
listen = tcp:0:interface=127.0.0.1

[stream:mediawiki.recentchange]
topics = {prefix}eqiad.mediawiki.recentchange,{prefix}codfw.mediawiki.recentchange
aliases = recentchange
description = Mediawiki RecentChanges feed.
schema_title = mediawiki/recentchange

[stream:test]
topics = {prefix}eqiad.test.event
description = A test stream.
"""

RC_TOPICS = ("eqiad.mediawiki.recentchange", "codfw.mediawiki.recentchange")
TEST_TOPIC = "eqiad.test.event"

# bootstrap.servers of the test broker that `make test` starts (scripts/kafka)
KAFKA = os.environ.get("EVENTSTREAMS_KAFKA")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(directory: str, extra: str = "", prefix: str = "") -> str:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "streams.ini")
    with open(path, "w") as f:
        f.write((BASE_CONFIG + extra).format(path=os.path.join(directory, "log.sqlite"), prefix=prefix))
    return path


def kafka_admin(bootstrap: Optional[str] = None) -> Any:
    from confluent_kafka.admin import AdminClient

    servers = bootstrap or KAFKA
    assert servers, "a Kafka test without EVENTSTREAMS_KAFKA"
    return AdminClient({"bootstrap.servers": servers})


def create_topics(topics: dict[str, int], config: Optional[dict[str, str]] = None,
                  bootstrap: Optional[str] = None) -> None:
    """Create Kafka topics (name → partitions) on the test broker (or the
    cluster at `bootstrap`) and wait until they exist (blocking)."""
    from confluent_kafka.admin import NewTopic

    admin = kafka_admin(bootstrap)  # must outlive its futures
    futures = admin.create_topics(
        [NewTopic(t, num_partitions=n, replication_factor=1, config=config or {}) for t, n in topics.items()]
    )
    for future in futures.values():
        future.result(30)

    def served() -> bool:  # created is not yet served: every partition has a leader
        metadata = admin.list_topics(timeout=10)
        return all(
            t in metadata.topics and metadata.topics[t].error is None
            and len(metadata.topics[t].partitions) == n
            and all(p.leader >= 0 for p in metadata.topics[t].partitions.values())
            for t, n in topics.items()
        )

    wait_until(served, f"a leader for every partition of {sorted(topics)}", 30, 0.1)


class Daemon:
    """The real service tree, listening on free loopback ports, over the
    embedded log or the test Kafka broker (with topics of its own)."""

    def __init__(
        self,
        directory: str,
        overrides: tuple[str, ...] = (),
        extra: str = "",
        backend: str = "embedded",
        partitions: Optional[dict[str, int]] = None,
    ):
        self.kafka = backend == "kafka"
        self.prefix = f"t{uuid.uuid4().hex[:10]}." if self.kafka else ""
        self.partitions = partitions or {}
        if self.kafka:
            overrides = ("eventstreams.backend=kafka", f"kafka.bootstrap.servers={KAFKA}") + tuple(overrides)
        self.config = load(write_config(directory, extra, self.prefix), overrides)
        self.service = build_service(self.config, reactor)
        self.ports: dict[str, int] = {}

    @property
    def rc(self) -> tuple[str, str]:
        """The recentchange topics of this daemon."""
        return (self.prefix + RC_TOPICS[0], self.prefix + RC_TOPICS[1])

    def topic(self, name: str) -> str:
        return self.prefix + name

    async def start(self) -> "Daemon":
        if self.kafka:
            from twisted.internet.threads import deferToThread

            # partitions per topic (without prefix); 0: leave the topic missing
            topics = {t: self.partitions.get(t[len(self.prefix):], 1)
                      for s in self.config.streams.values() for t in s.topics}
            await deferToThread(create_topics, {t: n for t, n in topics.items() if n})
        self.service.startService()
        for name, listener in self.service.listeners.items():
            port = await listener.bound()
            self.ports[name] = port.getHost().port
        return self

    def stop(self) -> Deferred:
        return self.service.stopService()

    @property
    def hubs(self) -> Any:
        return self.service.hubs

    @property
    def backend(self) -> Any:
        return self.service.backend

    def url(self, path: str, listener: str = "api") -> str:
        return f"http://127.0.0.1:{self.ports[listener]}{path}"

    async def append(self, topic: str, events: list[dict], timestamp: Optional[int] = None) -> list:
        values = [(None, json.dumps(e).encode()) for e in events]
        return await self.backend.append(topic, values, timestamp=timestamp)


def rc_event(n: int, wiki: str = "enwiki", type: str = "edit", bot: bool = False, namespace: int = 0) -> dict:
    """A small recentchange-shaped event."""
    host = {"enwiki": "en.wikipedia.org", "dewiki": "de.wikipedia.org", "wikidatawiki": "www.wikidata.org"}.get(
        wiki, "commons.wikimedia.org"
    )
    return {
        "$schema": "/mediawiki/recentchange/1.0.0",
        "meta": {"stream": "mediawiki.recentchange", "id": f"id-{n}", "dt": "2024-01-01T00:00:00Z", "domain": host},
        "id": n,
        "type": type,
        "namespace": namespace,
        "title": f"Page {n}",
        "user": "Example",
        "bot": bot,
        "wiki": wiki,
        "server_name": host,
    }


class Waiters:
    """Waits on a test protocol's own state, checked whenever the protocol
    calls _check_waiters() (on data, on close) rather than by polling."""

    timeout_error: type[Exception] = AssertionError  # what a wait that timed out fails with
    wait_timeout = 10.0  # seconds, when wait_for is given none

    def __init__(self) -> None:
        self._waiters: list[tuple[Callable[[], bool], Deferred]] = []

    def progress(self) -> str:
        """What the protocol has so far, for a timeout's message."""
        return ""

    def _check_waiters(self) -> None:
        for item in list(self._waiters):
            predicate, d = item
            if predicate():
                self._waiters.remove(item)
                d.callback(self)

    def wait_for(self, predicate: Callable[[], bool], timeout: Optional[float] = None) -> Deferred:
        """Fires (with the protocol) when predicate() holds; fails after
        `timeout` seconds (default `wait_timeout`)."""
        d: Deferred = Deferred()
        if predicate():
            d.callback(self)
            return d
        item = (predicate, d)
        self._waiters.append(item)

        def expire() -> None:
            if not d.called:
                self._waiters.remove(item)
                d.errback(self.timeout_error(f"timed out; {self.progress()}"))

        call = reactor.callLater(self.wait_timeout if timeout is None else timeout, expire)
        d.addBoth(cancelling(call))
        return d


class StreamClient(Waiters, Protocol):
    """Sends one GET, parses the response head, de-chunks the body and splits
    SSE blocks (or NDJSON lines). The test can pause reading entirely."""

    transport: ITCPConnection  # (Twisted types it Optional[ITransport])

    def __init__(self, path: str, headers: dict[str, str]):
        super().__init__()
        self.path = path
        self.request_headers = headers
        self.buffer = b""
        self.status: Optional[int] = None
        self.headers: dict[str, str] = {}
        self.body = b""  # de-chunked body so far
        self.chunks = 0  # HTTP chunks received (each is one write of the server)
        self.ended = False  # the response's last (zero-size) chunk arrived
        self.blocks: list[dict[str, Any]] = []  # SSE blocks: fields, comments
        self._body_pos = 0
        self._chunk_left: Optional[int] = None
        self._chunked = False
        self.head_received: Deferred = Deferred()
        self.closed: Deferred = Deferred()
        self.done = False

    def connectionMade(self) -> None:
        lines = [f"GET {self.path} HTTP/1.1", "Host: 127.0.0.1", "Connection: keep-alive"]
        lines += [f"{k}: {v}" for k, v in self.request_headers.items()]
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("utf-8"))

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if self.status is None:
            head, sep, rest = self.buffer.partition(b"\r\n\r\n")
            if not sep:
                return
            status_line, *header_lines = head.decode("latin-1").split("\r\n")
            self.status = int(status_line.split()[1])
            for line in header_lines:
                k, _, v = line.partition(":")
                self.headers[k.strip().lower()] = v.strip()
            self._chunked = self.headers.get("transfer-encoding", "").lower() == "chunked"
            self.buffer = rest
            self.head_received.callback(self)
        self._decode_body()
        self._parse_blocks()
        self._check_waiters()

    def _decode_body(self) -> None:
        if not self._chunked:
            self.body += self.buffer
            self.buffer = b""
            return
        while True:
            if self._chunk_left is None:
                line, sep, rest = self.buffer.partition(b"\r\n")
                if not sep:
                    return
                self._chunk_left = int(line.split(b";")[0], 16)
                self.chunks += 1
                self.buffer = rest
                if self._chunk_left == 0:
                    self.done = self.ended = True
                    return
            take = self.buffer[: self._chunk_left]
            self.body += take
            self.buffer = self.buffer[len(take) :]
            self._chunk_left -= len(take)
            if self._chunk_left:
                return
            if len(self.buffer) < 2:
                self._chunk_left = 0
                return
            self.buffer = self.buffer[2:]
            self._chunk_left = None

    def _parse_blocks(self) -> None:
        while True:
            end = self.body.find(b"\n\n", self._body_pos)
            if end < 0:
                return
            raw = self.body[self._body_pos : end]
            self._body_pos = end + 2
            block: dict[str, Any] = {"comments": []}
            for line in raw.decode("utf-8").split("\n"):
                if line.startswith(":"):
                    block["comments"].append(line[1:].strip())
                else:
                    k, _, v = line.partition(":")
                    block[k] = v[1:] if v.startswith(" ") else v
            self.blocks.append(block)

    @property
    def events(self) -> list[dict]:
        """Parsed `data` of every message event."""
        return [json.loads(b["data"]) for b in self.blocks if b.get("event") == "message"]

    @property
    def last_id(self) -> Optional[str]:
        ids = [b["id"] for b in self.blocks if "id" in b]
        return ids[-1] if ids else None

    def comments(self) -> list[str]:
        return [c for b in self.blocks for c in b["comments"]]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.done = True
        self.closed.callback(None)
        self._check_waiters()

    def progress(self) -> str:
        return f"got {len(self.blocks)} blocks: {self.body[-500:]!r}"

    def wait_events(self, n: int, timeout: float = 10) -> Deferred:
        return self.wait_for(lambda: len(self.events) >= n, timeout)

    def pause(self) -> None:
        self.transport.pauseProducing()

    def resume(self) -> None:
        self.transport.resumeProducing()

    def close(self) -> Deferred:
        self.transport.loseConnection()
        return self.closed


async def open_stream(port: int, path: str, headers: Optional[dict[str, str]] = None) -> StreamClient:
    """Connect and wait for the response head."""
    client = StreamClient(path, headers or {})
    await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(ClientFactory.forProtocol(lambda: client))
    await client.head_received
    return client


def sleep(seconds: float) -> Deferred:
    """Let real time pass. Only for time that is itself under test (an idle
    timeout, a rate); to wait for something to happen, use wait_for."""
    return deferLater(reactor, seconds, lambda: None)


def cancelling(call: Any) -> Callable[[Any], Any]:
    """A pass-through callback that cancels `call` (a time-out) if it is still pending."""
    def passthrough(result: Any) -> Any:
        if call.active():
            call.cancel()
        return result

    return passthrough


def turn() -> Deferred:
    """One turn of the reactor: what is ready to read or write is done."""
    return deferLater(reactor, 0, lambda: None)


def server_connections(port: int) -> list:
    """The server side of the connections still open on a listening port."""
    return [s for s in reactor.getReaders() if isinstance(s, tcp.Server) and s.getHost().port == port]


T = TypeVar("T")


def wait_until(condition: Callable[[], T], what: str, timeout: float = 10, interval: float = 0.1) -> T:
    """wait_for for blocking code in a thread of its own (never the reactor's)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {value!r})")
        time.sleep(interval)


@overload
async def wait_for(
    condition: Callable[[], Awaitable[T]],
    what: Union[str, Callable[[], str]],
    timeout: float = ...,
    interval: float = ...,
) -> T: ...


@overload
async def wait_for(
    condition: Callable[[], T],
    what: Union[str, Callable[[], str]],
    timeout: float = ...,
    interval: float = ...,
) -> T: ...


async def wait_for(
    condition: Callable[[], Union[T, Awaitable[T]]],
    what: Union[str, Callable[[], str]],
    timeout: float = 10,
    interval: float = 0.02,
) -> T:
    """Poll condition() (plain or async) until it returns a true value, and
    return that value; after timeout seconds, fail naming what was awaited
    (a string, or a function giving one then) and the last value seen.
    A wait for a condition, not for a guessed time: fast when the machine
    is fast, and still right when it is slow."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            named = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout} s waiting for {named} (last: {value!r})")
        await deferLater(reactor, interval, lambda: None)


def offsets_by_partition(events: list[dict]) -> dict[tuple[str, int], list[int]]:
    seen: dict[tuple[str, int], list[int]] = {}
    for e in events:
        seen.setdefault((e["meta"]["topic"], e["meta"]["partition"]), []).append(e["meta"]["offset"])
    return seen


def async_test(f: Callable[..., Any]) -> Callable[..., Deferred]:
    """Run an `async def` test method as a Deferred (trial waits for it)."""
    import functools

    from twisted.internet.defer import ensureDeferred

    @functools.wraps(f)
    def run(*args: Any, **kwargs: Any) -> Deferred:
        return ensureDeferred(f(*args, **kwargs))

    return run
