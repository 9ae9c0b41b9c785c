"""End to end with real third-party SSE client libraries.

The daemon runs in the test's reactor; the blocking Python clients run in a
reactor thread (every read has a timeout), the npm `eventsource` client runs
as a Node process (tests/js/client.mjs). Each test waits, before the daemon
stops, until its clients have ended and the server has seen their sockets
close, so nothing is left behind.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import time
from datetime import timedelta
from importlib.metadata import distribution
from typing import Any, Callable, Iterator, NamedTuple, Optional, cast

import requests
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue

from .support import RC_TOPICS, Daemon, async_test, offsets_by_partition, rc_event, server_connections, wait_for
from .test_stream import StreamTestCase

READ_TIMEOUT = 10  # seconds: every blocking read, and every whole read, in a client thread
JS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "js")
NODE_CLIENT = os.path.join(JS_DIR, "client.mjs")
T0, T1 = RC_TOPICS


class Message(NamedTuple):
    """What a client library handed to its user: the SSE event type, id and data."""

    event: Optional[str]
    id: Optional[str]
    data: str

    @property
    def json(self) -> dict:
        return json.loads(self.data)


@functools.cache
def legacy_sseclient() -> Any:
    """PyPI `sseclient` 0.0.27 (the module sseclient.py). In this venv the
    package `sseclient/` of sseclient-py shadows it for `import sseclient`, so
    it is loaded from its own file under another name."""
    path = distribution("sseclient").locate_file("sseclient.py")
    spec = importlib.util.spec_from_file_location("sseclient_0_0_27", str(path))
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.__version__ == "0.0.27", module.__version__
    return module


def positions(id_text: str) -> dict[tuple[str, int], int]:
    """An SSE id as {(topic, partition): next offset}."""
    return {(i["topic"], i["partition"]): i["offset"] for i in json.loads(id_text)}


def offsets(messages: list[Message]) -> dict[tuple[str, int], list[int]]:
    return offsets_by_partition([m.json for m in messages])


def id_only_blocks(raw: bytes) -> list[str]:
    """The ids of the blocks in a raw SSE body that carry nothing but an id."""
    return [block[len(b"id: "):].decode() for block in raw.split(b"\n\n") if block.startswith(b"id: ")]


async def fill(d: Daemon, first: int, per_topic: tuple[int, int]) -> int:
    """Append events numbered from `first`: per_topic[0] to T0, then per_topic[1] to T1."""
    n = first
    for topic, count in zip(RC_TOPICS, per_topic):
        await d.append(topic, [rc_event(k) for k in range(n, n + count)])
        n += count
    return n


# -- the blocking clients (run in a thread) -----------------------------------


def check_deadline(deadline: float, what: str) -> None:
    """Heartbeats keep a read alive forever: bound the whole read too."""
    if time.monotonic() > deadline:
        raise TimeoutError(f"{what} within {READ_TIMEOUT}s")


class Wire:
    """The raw bytes a client thread has read so far (the reactor may look)."""

    def __init__(self) -> None:
        self.raw = b""

    def blocks(self) -> list[bytes]:
        return self.raw.split(b"\n\n")


class Body:
    """What sseclient-py parses: a response's byte chunks (recorded on a Wire), with close()."""

    def __init__(self, response: requests.Response, wire: Wire):
        self.response, self.wire = response, wire
        self.deadline = time.monotonic() + READ_TIMEOUT

    def __iter__(self) -> Any:
        for chunk in self.response.iter_content(chunk_size=None):
            check_deadline(self.deadline, "sseclient-py: not enough messages")
            self.wire.raw += chunk
            yield chunk

    def close(self) -> None:
        self.response.close()


def read_sseclient_py(
    url: str, count: int, headers: Optional[dict] = None, wire: Optional[Wire] = None
) -> list[Message]:
    """sseclient-py over requests: the first `count` messages."""
    import sseclient  # sseclient-py

    headers = {"Accept": "text/event-stream", **(headers or {})}
    with requests.get(url, stream=True, headers=headers, timeout=READ_TIMEOUT) as response:
        response.raise_for_status()
        # (its stub asks for an Iterator; it iterates the source and closes it)
        client = sseclient.SSEClient(cast(Iterator[bytes], Body(response, wire or Wire())))
        messages = []
        for event in client.events():
            messages.append(Message(event.event, event.id, event.data))
            if len(messages) == count:
                break
        return messages


class RecordingSession(requests.Session):
    """A requests session that remembers the Last-Event-Id of every request."""

    def __init__(self) -> None:
        super().__init__()
        self.sent_ids: list[Optional[str]] = []

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:
        self.sent_ids.append((kwargs.get("headers") or {}).get("Last-Event-Id"))
        return super().request(method, url, *args, **kwargs)


def read_requests_sse(
    url: str, count: int, last_event_id: Optional[str] = None, **options: Any
) -> tuple[list[Message], list[Optional[str]]]:
    """requests-sse: the first `count` messages (it reconnects by itself in
    between), and the Last-Event-Id it sent on each request."""
    from requests_sse import EventSource

    deadline = time.monotonic() + READ_TIMEOUT

    def on_error() -> None:  # called before each reconnect (a read timeout is one)
        check_deadline(deadline, f"requests-sse: no {count} messages")

    options = {"max_connect_retry": 0, **options}  # a refused connection fails at once
    messages = []
    with RecordingSession() as session, EventSource(
        url, timeout=READ_TIMEOUT, session=session, latest_event_id=last_event_id, on_error=on_error, **options
    ) as source:
        for event in source:
            messages.append(Message(event.type, event.last_event_id, event.data))
            if len(messages) == count:
                break
    return messages, session.sent_ids


def read_legacy_sseclient(
    url: str, stop: Callable[[list[Message]], bool], last_id: Optional[str] = None
) -> tuple[list[Message], Optional[str]]:
    """PyPI sseclient 0.0.27: every message it yields until stop(messages), and its last_id."""
    deadline = time.monotonic() + READ_TIMEOUT
    client = legacy_sseclient().SSEClient(url, last_id=last_id, timeout=READ_TIMEOUT)
    try:
        messages: list[Message] = []
        for event in client:
            check_deadline(deadline, f"sseclient 0.0.27: no stop after {messages}")
            messages.append(Message(event.event, event.id, event.data))
            if stop(messages):
                return messages, client.last_id
        raise AssertionError("unreachable: the legacy client iterates forever")
    finally:
        client.resp.close()


# -- the test case --------------------------------------------------------------


class ClientTestCase(StreamTestCase):
    def setUp(self) -> None:
        self._running: list[Deferred] = []

    async def daemon(self, *overrides: str, extra: str = "", partitions: dict | None = None) -> Daemon:
        d = await super().daemon(*overrides, extra=extra, partitions=partitions)
        self.addCleanup(self._settle, d)  # runs before the daemon stops
        return d

    def _track(self, d: Deferred) -> Deferred:
        ended: Deferred = Deferred()
        self._running.append(ended)
        def end(result: Any) -> Any:
            ended.callback(None)
            return result

        d.addBoth(end)
        return d

    def in_thread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred:
        """Run a blocking client in a reactor thread."""
        return self._track(deferToThread(f, *args, **kwargs))

    def node(self, url: str, count: int, timeout: float = 20, last_event_id: Optional[str] = None) -> Deferred:
        """Run tests/js/client.mjs; fires with (messages, stderr lines)."""
        if not os.path.isdir(os.path.join(JS_DIR, "node_modules", "eventsource")):
            self.fail("tests/js/node_modules is missing: run `npm ci --prefix tests/js`")
        node = shutil.which("node")
        if node is None:
            self.fail("Node.js (`node`) is not on PATH; it runs the npm eventsource client")
        args = [NODE_CLIENT, url, str(count), "--timeout", str(timeout)]
        if last_event_id is not None:
            args += ["--last-event-id", last_event_id]

        def parse(result: tuple[bytes, bytes, int]) -> tuple[list[Message], list[str]]:
            out, err, code = result
            self.assertEqual(code, 0, f"node client exited {code}; stderr: {err.decode()!r}")
            lines = [json.loads(line) for line in out.decode().splitlines()]
            return [Message("message", m["id"], m["data"]) for m in lines], err.decode().splitlines()

        return self._track(getProcessOutputAndValue(node, args, env=os.environ, path=JS_DIR)).addCallback(parse)

    async def _settle(self, d: Daemon) -> None:
        """Wait for every client to end, then for the server to see its sockets close."""
        for ended in self._running:
            await ended
        port = d.ports["api"]
        await wait_for(lambda: not server_connections(port), "the server to see every client connection close", 5)

    async def responses(self, d: Daemon, total: int, groups: list[tuple[int, bool]]) -> None:
        """Append events 0..total-1 (alternating topics) in len(groups) groups;
        for (n, away), once the server has seen n connections and, if away,
        once the n-th has ended (the events arrive while the client is away).
        The events span that many responses, whatever the machine's speed."""
        connections = d.service.connections
        for k, (opened, away) in enumerate(groups):

            def seen(opened: int = opened) -> bool:
                return connections.counters.connections_total >= opened

            await wait_for(seen, f"connection {opened}", 30)
            if away:
                await wait_for(lambda: not connections.sinks, f"the end of response {opened}", 30)
            for n in range(total * k // len(groups), total * (k + 1) // len(groups)):
                await d.append(RC_TOPICS[n % 2], [rc_event(n)])

    async def raw_messages(self, d: Daemon, path: str, count: int, headers: Optional[dict] = None) -> list[Message]:
        """The same stream read byte by byte by the raw test client: the reference."""
        client = await self.stream(d, path, headers)
        await client.wait_events(count)
        await client.close()
        return [Message(b["event"], b["id"], b["data"]) for b in client.blocks if b.get("event") == "message"][:count]

    def assert_ids_follow_data(self, messages: list[Message], start: dict[tuple[str, int], int]) -> None:
        """Each id lists both partitions at the next offset to read: just past the
        event for its own partition, unchanged for the other."""
        expected = dict(start)
        for m in messages:
            meta = m.json["meta"]
            expected[(meta["topic"], meta["partition"])] = meta["offset"] + 1
            assert m.id is not None, m
            self.assertEqual(positions(m.id), expected, m)


class SseclientPy(ClientTestCase):
    """sseclient-py: a parser over a response the caller opened with requests."""

    @async_test
    async def test_receives_events_with_offsets_and_the_servers_ids(self):
        d = await self.daemon()
        await fill(d, 0, (3, 2))
        path = "/v2/stream/recentchange?since=0"
        messages = await self.in_thread(read_sseclient_py, d.url(path), 5)
        self.assertEqual(messages, await self.raw_messages(d, path, 5))
        self.assertEqual({m.event for m in messages}, {"message"})
        self.assertEqual(offsets(messages), {(T0, 0): [0, 1, 2], (T1, 0): [0, 1]})
        self.assertEqual(sorted(m.json["id"] for m in messages), [0, 1, 2, 3, 4])
        self.assert_ids_follow_data(messages, {(T0, 0): 0, (T1, 0): 0})

    @async_test
    async def test_resumes_exactly_after_its_last_event_id(self):
        d = await self.daemon()
        await fill(d, 0, (3, 2))
        first = await self.in_thread(read_sseclient_py, d.url("/v2/stream/recentchange?since=0"), 5)
        await fill(d, 5, (2, 3))
        rest = await self.in_thread(
            read_sseclient_py, d.url("/v2/stream/recentchange"), 5, {"Last-Event-ID": first[-1].id}
        )
        self.assertEqual(offsets(rest), {(T0, 0): [3, 4], (T1, 0): [2, 3, 4]})
        self.assertEqual(sorted(m.json["id"] for m in first + rest), list(range(10)))
        self.assert_ids_follow_data(rest, positions(first[-1].id))

    @async_test
    async def test_comments_and_id_only_blocks_yield_no_messages(self):
        d = await self.daemon("eventstreams.heartbeat=0.2")
        await d.append(T0, [rc_event(0, "dewiki"), rc_event(1, "enwiki")])
        wire = Wire()
        path = "/v2/stream/recentchange?since=0&filter.wiki=dewiki"
        reading = self.in_thread(read_sseclient_py, d.url(path), 2, wire=wire)
        # The server moves the id past the skipped offset 1, then sends a heartbeat.
        await wait_for(lambda: b":" in wire.blocks() and id_only_blocks(wire.raw), "a heartbeat and an id-only block")
        await d.append(T0, [rc_event(2, "dewiki")])
        messages = await reading
        self.assertEqual([m.json["id"] for m in messages], [0, 2])
        self.assertEqual(wire.blocks()[0], b":ok")
        self.assertEqual([positions(i) for i in id_only_blocks(wire.raw)], [{(T0, 0): 2, (T1, 0): 0}])


class RequestsSse(ClientTestCase):
    """requests-sse: a WhatWG-style EventSource that reconnects by itself."""

    @async_test
    async def test_receives_events_and_reports_the_servers_id_as_last_event_id(self):
        d = await self.daemon()
        await fill(d, 0, (3, 2))
        path = "/v2/stream/recentchange?since=0"
        messages, sent = await self.in_thread(read_requests_sse, d.url(path), 5)
        self.assertEqual(messages, await self.raw_messages(d, path, 5))
        self.assertEqual(offsets(messages), {(T0, 0): [0, 1, 2], (T1, 0): [0, 1]})
        self.assert_ids_follow_data(messages, {(T0, 0): 0, (T1, 0): 0})
        self.assertEqual(sent, [None])

    @async_test
    async def test_new_source_with_its_last_event_id_continues_exactly(self):
        d = await self.daemon()
        await fill(d, 0, (3, 2))
        first, _ = await self.in_thread(read_requests_sse, d.url("/v2/stream/recentchange?since=0"), 5)
        await fill(d, 5, (2, 3))
        last_id = first[-1].id
        rest, sent = await self.in_thread(read_requests_sse, d.url("/v2/stream/recentchange"), 5, last_event_id=last_id)
        self.assertEqual(sent, [last_id])
        self.assertEqual(offsets(rest), {(T0, 0): [3, 4], (T1, 0): [2, 3, 4]})
        self.assertEqual(sorted(m.json["id"] for m in first + rest), list(range(10)))
        self.assert_ids_follow_data(rest, positions(last_id))

    @async_test
    async def test_reconnects_by_itself_with_last_event_id_when_the_server_ends_the_response(self):
        d = await self.daemon("eventstreams.max_lifetime=1")
        total = 40
        reading = self.in_thread(
            read_requests_sse, d.url("/v2/stream/recentchange?since=0"), total,
            reconnection_time=timedelta(milliseconds=50),
        )
        await self.responses(d, total, [(1, False), (2, False), (3, False)])  # over three responses
        messages, sent = await reading
        self.assertEqual(offsets(messages), {(T0, 0): list(range(20)), (T1, 0): list(range(20))})
        self.assert_ids_follow_data(messages, {(T0, 0): 0, (T1, 0): 0})
        self.assertGreaterEqual(len(sent), 3, sent)
        self.assertIsNone(sent[0])
        # Each reconnect sends the id of the last message it had by then.
        seen = [m.id for m in messages]
        self.assertEqual(sent[1:], sorted(sent[1:], key=seen.index))
        self.assertEqual(d.service.connections.counters.connections_total, len(sent))


class LegacySseclient(ClientTestCase):
    """PyPI sseclient 0.0.27: opens the URL itself and keeps `last_id`. It
    reads the socket below the chunked decoding (http.client's fp.read1), so
    it also sees chunk-size lines; those parse as unknown fields and are dropped.
    Every block it splits off becomes an Event, data or not."""

    EMPTY = Message("message", None, "")  # what `:ok` and each `:` heartbeat come out as

    @async_test
    async def test_receives_events_and_resumes_with_last_id(self):
        d = await self.daemon()
        await fill(d, 0, (3, 2))

        def five_events(messages: list[Message]) -> bool:
            return len([m for m in messages if m.data]) == 5

        path = "/v2/stream/recentchange?since=0"
        first, last_id = await self.in_thread(read_legacy_sseclient, d.url(path), five_events)
        self.assertEqual(first[0], self.EMPTY)  # the `:ok`
        self.assertEqual(first[1:], await self.raw_messages(d, path, 5))
        self.assertEqual(last_id, first[-1].id)
        await fill(d, 5, (2, 3))
        rest, _ = await self.in_thread(read_legacy_sseclient, d.url("/v2/stream/recentchange"), five_events, last_id)
        self.assertEqual(rest[0], self.EMPTY)
        self.assertEqual(offsets(rest[1:]), {(T0, 0): [3, 4], (T1, 0): [2, 3, 4]})
        self.assert_ids_follow_data(rest[1:], positions(last_id))

    @async_test
    async def test_ok_heartbeats_and_id_only_blocks_come_out_as_empty_messages(self):
        # Server defaults (heartbeats on, id updates on), with a short heartbeat.
        d = await self.daemon("eventstreams.heartbeat=0.2")
        await d.append(T0, [rc_event(0, "dewiki"), rc_event(1, "enwiki")])
        path = "/v2/stream/recentchange?since=0&filter.wiki=dewiki"

        def heartbeat_and_id_only_seen(messages: list[Message]) -> bool:
            tail = messages[2:]
            return any(m == self.EMPTY for m in tail) and any(m.id for m in tail)

        messages, last_id = await self.in_thread(read_legacy_sseclient, d.url(path), heartbeat_and_id_only_seen)
        ok, event, *tail = messages
        self.assertEqual(ok, self.EMPTY)
        self.assertEqual(event, (await self.raw_messages(d, path, 1))[0])
        # Apart from heartbeats, one empty message: the id past the skipped offset 1.
        (id_only,) = [m for m in tail if m != self.EMPTY]
        self.assertEqual((id_only.event, id_only.data), ("message", ""))
        self.assertEqual(positions(id_only.id), {(T0, 0): 2, (T1, 0): 0})
        self.assertEqual(last_id, id_only.id)  # it does move the resume point

    @async_test
    async def test_without_heartbeats_or_id_updates_only_ok_precedes_the_real_events(self):
        d = await self.daemon("eventstreams.heartbeat=0", "eventstreams.id_updates=false")
        await d.append(T0, [rc_event(0, "dewiki"), rc_event(1, "enwiki")])
        path = "/v2/stream/recentchange?since=0&filter.wiki=dewiki"
        reading = self.in_thread(read_legacy_sseclient, d.url(path), lambda messages: len(messages) == 3)
        # The id-update timer runs even with id updates off: one tick after the
        # client had the first event proves that nothing was due.
        connections = d.service.connections
        await wait_for(lambda: connections.counters.events_delivered >= 1, "the first event")
        ids = connections._ids
        before = ids.call
        await wait_for(lambda: ids.call is not before, "a tick of the id-update timer", timeout=5)
        await d.append(T0, [rc_event(2, "enwiki"), rc_event(3, "dewiki")])
        messages, last_id = await reading
        self.assertEqual(messages[0], self.EMPTY)
        self.assertEqual([m.data and m.json["id"] for m in messages[1:]], [0, 3])
        self.assertEqual(last_id, messages[2].id)


class NodeEventSource(ClientTestCase):
    """npm `eventsource` (WhatWG EventSource for Node), via tests/js/client.mjs."""

    @async_test
    async def test_receives_events_with_offsets_and_the_servers_ids(self):
        d = await self.daemon()
        await fill(d, 0, (3, 2))
        path = "/v2/stream/recentchange?since=0"
        messages, _ = await self.node(d.url(path), 5)
        self.assertEqual(messages, await self.raw_messages(d, path, 5))
        self.assertEqual(offsets(messages), {(T0, 0): [0, 1, 2], (T1, 0): [0, 1]})
        self.assert_ids_follow_data(messages, {(T0, 0): 0, (T1, 0): 0})

    @async_test
    async def test_resumes_exactly_from_a_given_last_event_id(self):
        d = await self.daemon()
        await fill(d, 0, (3, 2))
        first, _ = await self.node(d.url("/v2/stream/recentchange?since=0"), 5)
        await fill(d, 5, (2, 3))
        rest, _ = await self.node(d.url("/v2/stream/recentchange"), 5, last_event_id=first[-1].id)
        self.assertEqual(offsets(rest), {(T0, 0): [3, 4], (T1, 0): [2, 3, 4]})
        self.assertEqual(sorted(m.json["id"] for m in first + rest), list(range(10)))
        self.assert_ids_follow_data(rest, positions(first[-1].id))

    @async_test
    async def test_reconnects_by_itself_without_loss_or_duplicates(self):
        # The server ends every response after 1 s; EventSource waits its
        # default 3 s, then reconnects sending Last-Event-ID.
        d = await self.daemon("eventstreams.max_lifetime=1")
        total = 40
        reading = self.node(d.url("/v2/stream/recentchange?since=0"), total, timeout=30)
        await self.responses(d, total, [(1, False), (1, True), (2, False), (2, True)])  # some arrive while it is away
        messages, log = await reading
        self.assertEqual(offsets(messages), {(T0, 0): list(range(20)), (T1, 0): list(range(20))})
        self.assert_ids_follow_data(messages, {(T0, 0): 0, (T1, 0): 0})
        opens = log.count("open")
        self.assertGreaterEqual(opens, 3, log)  # at least two reconnects
        self.assertEqual(d.service.connections.counters.connections_total, opens)

    @async_test
    async def test_comments_and_id_only_blocks_dispatch_nothing(self):
        d = await self.daemon("eventstreams.heartbeat=0.2")
        await d.append(T0, [rc_event(0, "dewiki"), rc_event(1, "enwiki")])
        path = "/v2/stream/recentchange?since=0&filter.wiki=dewiki"
        reading = self.node(d.url(path), 2)
        connections = d.service.connections
        await wait_for(lambda: connections.counters.events_delivered >= 1, "the Node client's first event")
        # Connected after it, the witness gets each heartbeat and id update no
        # earlier than the Node client does (the same timers, one pass for both).
        witness = await self.stream(d, path)

        def heartbeat_and_id_only_sent() -> bool:
            return any(b["comments"] == [""] for b in witness.blocks) and any(
                set(b) == {"comments", "id"} for b in witness.blocks
            )

        await wait_for(heartbeat_and_id_only_sent, "a heartbeat and an id-only block")
        await d.append(T0, [rc_event(2, "dewiki")])
        messages, _ = await reading
        self.assertEqual([m.json["id"] for m in messages], [0, 2])
