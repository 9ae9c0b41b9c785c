"""Server-Sent Events and NDJSON framing, and the sink that writes them to a response.

Frames are cached on the hub entry, so every client of a hub gets the same
bytes object; only catch-up cursors, whose ids are their own, encode frames
for themselves.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

from . import strictjson
from .delay import DeliveryDelays
from .errors import ApiError
from .fastwrite import writer_for
from .hub import LIVE, Batch, Entry, Subscription

OK = b":ok\n\n"
HEARTBEAT = b":\n\n"
NDJSON_START = b"\n"
NDJSON_HEARTBEAT = b"\n"


def event_parts(entry: Entry) -> list[bytes]:
    """`event: message`, the id over every partition, one `data:` line, in
    pieces: event_frame joins them, chunked_frame joins them into a chunk."""
    return [b"event: message\nid: ", entry.id_bytes(), b"\ndata: ", entry.data or b"", b"\n\n"]


def event_frame(entry: Entry) -> bytes:
    frame = entry.frames.get("sse")
    if frame is None:
        frame = entry.frames["sse"] = b"".join(event_parts(entry))
    return frame


def id_frame(entry: Entry) -> bytes:
    """A block with only an id: moves the client's Last-Event-ID, dispatches nothing."""
    frame = entry.frames.get("id")
    if frame is None:
        frame = entry.frames["id"] = b"id: " + entry.id_bytes() + b"\n\n"
    return frame


def ndjson_line(entry: Entry) -> bytes:
    frame = entry.frames.get("ndjson")
    if frame is None:
        frame = entry.frames["ndjson"] = (entry.data or b"") + b"\n"
    return frame


def chunk(data: bytes) -> bytes:
    """One HTTP/1.1 chunk."""
    return b"%x\r\n" % len(data) + data + b"\r\n"


def chunk_of(parts: list[bytes]) -> bytes:
    """The parts as one HTTP/1.1 chunk, joined in one copy."""
    return b"".join([b"%x\r\n" % sum(map(len, parts)), *parts, b"\r\n"])


FRAME_KEYS = {(ndjson, chunked): ("ndjson" if ndjson else "sse") + ("-chunk" if chunked else "")
              for ndjson in (False, True) for chunked in (False, True)}


def chunked_frame(entry: Entry, ndjson: bool) -> bytes:
    """An event as a ready HTTP chunk, built once per entry and shared.
    The SSE chunk is joined in one go, not framed and then copied into a
    chunk: with many sets, every set builds its own for every event."""
    key = FRAME_KEYS[ndjson, True]
    frame = entry.frames.get(key)
    if frame is None:
        if ndjson:
            frame = chunk(ndjson_line(entry))
        else:
            cached = entry.frames.get("sse")
            frame = chunk(cached) if cached is not None else chunk_of(event_parts(entry))
        entry.frames[key] = frame
    return frame


def batch_frame(batch: Batch, ndjson: bool, chunked: bool) -> bytes:
    """The matched events of a batch as one write (one HTTP chunk when
    chunked), built once per batch and shared by its clients."""
    key = FRAME_KEYS[ndjson, chunked]
    frame = batch.frames.get(key)
    if frame is None:
        matched = batch.matched
        if len(matched) == 1 and chunked:
            frame = chunked_frame(matched[0], ndjson)
        else:
            frames = [ndjson_line(e) if ndjson else event_frame(e) for e in matched]
            frame = chunk_of(frames) if chunked else b"".join(frames)
        batch.frames[key] = frame
    return frame


def comment_frame(text: str) -> bytes:
    lines = text.replace("\r", "").split("\n")
    return b"".join(b": " + line.encode("utf-8") + b"\n" for line in lines) + b"\n"


def error_frame(id_text: Optional[str], body: dict) -> bytes:
    data = strictjson.dumps(body)
    head = b"event: error\n"
    if id_text is not None:
        head += b"id: " + id_text.encode("utf-8") + b"\n"
    return head + b"data: " + data + b"\n\n"


class Counters:
    """Totals the metrics endpoint reports."""

    def __init__(self) -> None:
        self.connections_total = 0
        self.events_delivered = 0
        self.bytes_sent = 0
        self.rejected: dict[tuple[int, str], int] = {}  # (status, error type) -> count
        self.backend_unavailable = 0  # stream requests answered 503 as the log was unreachable


class ResponseSink:
    """Writes one client's stream to its HTTP response."""

    __slots__ = (
        "_write", "_transport", "_raw_write", "_finish", "ndjson", "id_updates", "connections", "streams",
        "client_ip", "subscription", "pending", "quiet", "closed", "started", "bytes_written", "counters",
        "timer", "on_lost", "uri", "_frame_key",
    )

    def __init__(
        self,
        write: Callable[[bytes], None],
        finish: Callable[[], None],
        ndjson: bool,
        id_updates: bool,
        connections: "Connections",
        streams: tuple[str, ...],
        client_ip: str,
    ):
        self._write = write
        self._transport: Optional[Any] = None  # set: write ready chunks straight to it
        self._finish = finish
        self.ndjson = ndjson
        self.id_updates = id_updates and not ndjson
        self.connections = connections
        self.streams = streams
        self.client_ip = client_ip
        self.subscription: Optional[Subscription] = None
        self.pending: Optional[Entry] = None  # last skipped entry, id not yet sent
        self.quiet = True  # nothing written since the last heartbeat tick
        self.closed = False
        self.started = False  # the 200 and the first bytes are out
        self.bytes_written = 0
        self.counters = connections.counters
        self.timer: Optional[Any] = None  # max_lifetime's DelayedCall
        self.on_lost: Optional[Callable[[], None]] = None  # e.g. give back a limit slot
        self.uri = ""  # the request's, for the body of an error event
        self._frame_key = FRAME_KEYS[ndjson, False]  # which of a batch's frames this client gets

    def begin(self) -> None:
        """The response head is set: write the stream's first bytes."""
        self.started = True
        self.write(NDJSON_START if self.ndjson else OK)

    def detach(self, finish: Callable[[], None]) -> None:
        """The connection was taken from twisted.web (eventstreams.takeover):
        keep no reference to the request; end the response with finish()."""
        self._finish = finish
        self._write = self._raw_write

    def use_transport(self, transport: Any) -> None:
        """Write chunk-encoded frames to the connection directly (the response
        is chunked and its head is out): the shared bytes of an event go to
        every client without per-client framing work."""
        self._transport = transport
        self._raw_write = writer_for(transport)
        self._frame_key = FRAME_KEYS[self.ndjson, True]

    @property
    def transport(self) -> Optional[Any]:
        """The connection use_transport gave, None while writes go through the request."""
        return self._transport

    def write(self, data: bytes) -> None:
        self._emit(chunk(data) if self._transport is not None else data)

    def _emit(self, data: bytes) -> None:
        """Write bytes already in the connection's framing; count them."""
        self.quiet = False
        self.bytes_written += len(data)
        self.counters.bytes_sent += len(data)
        if self._transport is not None:
            self._raw_write(data)
        else:
            self._write(data)

    def send_batch(self, batch: Batch) -> None:
        matched = batch.matched
        if matched:
            # _emit, inlined: this runs once per client for every batch
            chunked = self._transport is not None
            data = batch.frames.get(self._frame_key) or batch_frame(batch, self.ndjson, chunked)
            if chunked:
                self._raw_write(data)
            else:
                self._write(data)
            self.quiet = False
            self.bytes_written += len(data)
            counters = self.counters
            counters.events_delivered += len(matched)
            counters.bytes_sent += len(data)
            if self.subscription is not None and self.subscription.state is LIVE:  # not a replay
                self.connections.delays.observe(batch, self.streams)
            if matched[-1] is batch.last:
                self.pending = None
                return
        if self.id_updates:
            if self.pending is None:
                self.connections.pending_ids.add(self)
            self.pending = batch.last

    def flush_id(self) -> None:
        entry, self.pending = self.pending, None
        if entry is not None and not self.closed:
            self.write(id_frame(entry))

    def heartbeat(self) -> None:
        if not self.started:  # still answering: an error may follow
            return
        if not self.quiet:
            self.quiet = True
            return
        if self.subscription is not None and self.subscription.paused:
            return
        self.write(NDJSON_HEARTBEAT if self.ndjson else HEARTBEAT)
        self.quiet = True

    def comment(self, text: str) -> None:
        if not self.ndjson:
            self.write(comment_frame(text))

    def current_id(self) -> Optional[str]:
        return self.subscription.id_text() if self.subscription is not None else None

    def fail(self, reason: str, status: int = 500, type: str = "internal_error") -> None:
        """End the stream with `event: error` (EventSource then reconnects)."""
        if self.closed:
            return
        body = ApiError(status, type, "Stream Error", reason).body("GET", self.uri)  # streams are GETs
        if self.ndjson:
            self.write(strictjson.dumps({"error": body}) + b"\n")
        else:
            self.write(error_frame(self.current_id(), body))
        self.close()

    def close(self) -> None:
        """End the response (max_lifetime, error or shutdown)."""
        if self.closed:
            return
        self.lost()
        self._finish()

    def lost(self) -> None:
        """The client went away, or we ended it: free everything it held."""
        if self.closed:
            return
        self.closed = True
        self.pending = None
        self.connections.remove(self)
        if self.subscription is not None:
            self.subscription.cancel()
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        if self.on_lost is not None:
            on_lost, self.on_lost = self.on_lost, None
            on_lost()


class Connections:
    """Every open stream response: limits, heartbeats and coalesced id updates."""

    def __init__(self, clock: IReactorTime, heartbeat: float, id_interval: float = 1.0):
        self.clock = clock
        self.counters = Counters()
        self.delays = DeliveryDelays(clock)
        self.sinks: set[ResponseSink] = set()
        self.per_ip: dict[str, int] = {}
        self.per_stream: dict[str, int] = {}
        self.pending_ids: set[ResponseSink] = set()
        self._heartbeat = LoopingCall(self._beat)
        self._heartbeat.clock = clock
        self._heartbeat_interval = heartbeat
        self._ids = LoopingCall(self._flush_ids)
        self._ids.clock = clock
        self._id_interval = id_interval

    def start(self) -> None:
        if self._heartbeat_interval > 0:
            self._heartbeat.start(self._heartbeat_interval, now=False)
        self._ids.start(self._id_interval, now=False)

    def stop(self) -> None:
        for loop in (self._heartbeat, self._ids):
            if loop.running:
                loop.stop()
        for sink in list(self.sinks):
            sink.close()

    def add(self, sink: ResponseSink) -> None:
        self.sinks.add(sink)
        self.counters.connections_total += 1
        self.per_ip[sink.client_ip] = self.per_ip.get(sink.client_ip, 0) + 1
        for name in sink.streams:
            self.per_stream[name] = self.per_stream.get(name, 0) + 1

    def remove(self, sink: ResponseSink) -> None:
        if sink not in self.sinks:
            return
        self.sinks.discard(sink)
        self.pending_ids.discard(sink)
        count = self.per_ip[sink.client_ip] - 1
        if count:
            self.per_ip[sink.client_ip] = count
        else:
            del self.per_ip[sink.client_ip]
        for name in sink.streams:
            self.per_stream[name] -= 1

    def count_for(self, ip: str) -> int:
        return self.per_ip.get(ip, 0)

    def _beat(self) -> None:
        for sink in list(self.sinks):
            sink.heartbeat()

    def _flush_ids(self) -> None:
        pending, self.pending_ids = self.pending_ids, set()
        for sink in pending:
            sink.flush_id()

