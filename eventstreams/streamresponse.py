"""One stream response's life, from its connection slot to its release.

The order matters, and it is written once, in StreamResponse.run:

1. admit: take a slot (max_connections, client_ip_connection_limit), or
   answer 503/429; a HEAD gives it back at once and answers what a GET would;
2. open: the sink, counted in Connections, and the one release hook that
   gives the slot back however the response ends (client gone, error,
   max_lifetime, shutdown);
3. look up: where the client starts and its hub (503 beyond
   max_stream_sets); an error here releases and answers it (the head is
   not out yet);
4. headers: the 200 head and the first bytes; from here the sink writes
   chunks straight to the connection when it can;
5. subscribe: the hub replays and then sends live batches; max_lifetime
   starts;
6. take over: the connection leaves twisted.web (eventstreams.takeover), or
   stays with it, the subscription as the request's producer;
7. release: the sink's on_lost, once.

Web-level concerns (routing, the error body, the access line of a stream
that did not start) stay in eventstreams.web.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime

from .assignment import Start, resolve
from .backends.base import Backend, BackendUnavailable
from .config import ServiceConfig
from .errors import ApiError, unavailable
from .hub import TooManySets
from .iplimit import AT_CAPACITY, OVER_IP_LIMIT, Limits
from .logs import stream_finished
from .sse import Connections, ResponseSink
from .streamrequest import StreamRequest
from .takeover import take_over

SETS_RETRY_AFTER = 30  # seconds: lingering sets close within hub_linger

if TYPE_CHECKING:
    from .hub import Hub, Hubs


class Opened:
    """What StreamResponse.run returns once the response is streaming: the
    Deferred that fires when it ends (wrapped, as a coroutine cannot return
    a Deferred)."""

    __slots__ = ("done",)

    def __init__(self, done: Deferred) -> None:
        self.done = done


def opened_body(result: Any) -> Any:
    """The route's result: an open stream's `done`, else the answer itself."""
    return result.done if isinstance(result, Opened) else result


class StreamResponse:
    """Owns one stream request from admission to release. `run` raises the
    ApiError to answer when the stream does not start. It lives as long as
    the stream (the sink's on_lost), hence the slots."""

    __slots__ = ("request", "wanted", "ip", "service", "backend", "hubs", "connections", "clock", "limits",
                 "common_headers", "done", "sink", "started", "uri")

    def __init__(
        self,
        request: Any,
        wanted: StreamRequest,
        ip: str,
        *,
        service: ServiceConfig,
        backend: Backend,
        hubs: "Hubs",
        connections: Connections,
        clock: IReactorTime,
        limits: Limits,
        common_headers: Callable[[Any], None],
    ) -> None:
        self.request = request
        self.wanted = wanted
        self.ip = ip
        self.service = service
        self.backend = backend
        self.hubs = hubs
        self.connections = connections
        self.clock = clock
        self.limits = limits
        self.common_headers = common_headers
        self.done: Optional[Deferred[bytes]] = Deferred()
        self.sink: Optional[ResponseSink] = None
        self.started = 0.0  # the clock when the sink opened
        self.uri = ""

    async def run(self) -> Any:
        """The life of the response, in its order (see the module's docstring)."""
        done = self.done
        assert done is not None
        self.admit()
        if self.wanted.head:
            return await self.answer_head()
        sink = self.open()
        start, hub = await self.look_up()
        if sink.closed:  # the client left while we looked things up
            return b""
        self.headers()
        self.begin(start)
        sub = self.subscribe(start, hub)
        if sink.closed:
            return Opened(done)
        self.limit_lifetime()
        if self.take_over(sub):
            # twisted.web no longer knows this connection: `done` never fires
            # and goes, with the request, once this returns.
            return Opened(done)
        self.produce_through_request(sub)
        return Opened(done)

    # -- 1. admission ------------------------------------------------------

    def admit(self) -> None:
        """Take a connection slot, counted from here until the request ends."""
        admission = self.limits.acquire(self.ip)
        if admission == AT_CAPACITY:
            raise unavailable("the server is at its connection limit", 30)
        if admission == OVER_IP_LIMIT:
            error = ApiError(429, "too_many_requests", "Too Many Requests",
                             f"at most {self.service.client_ip_connection_limit} concurrent connections per client address",
                             retry_after=10)
            raise error

    async def answer_head(self) -> bytes:
        """HEAD: what a GET would get, without the stream; the connection
        stays usable for the next request."""
        self.limits.release(self.ip)
        wanted = self.wanted
        try:
            await resolve(self.backend, list(wanted.topics), _listed(wanted), wanted.since)
        except BackendUnavailable as e:
            raise unavailable(f"the event log is unavailable: {e}", 10) from None
        self.headers()
        if getattr(self.request.channel, "persistent", False):
            self.request.responseHeaders.removeHeader(b"connection")  # it serves the next request
        return b""

    # -- 2. the sink and its release --------------------------------------

    def open(self) -> ResponseSink:
        """The sink, counted in Connections; release() runs once when it is lost."""
        request, done = self.request, self.done
        assert done is not None

        def finish() -> None:
            if not done.called:
                # Close the connection too (the head says so): some old
                # clients read below the chunked framing and would never see
                # the response end. twisted.web asks the channel.
                if request.channel is not None:
                    request.channel.persistent = False
                done.callback(b"")

        sink = self.sink = ResponseSink(
            request.write, finish, self.wanted.ndjson, self.service.id_updates, self.connections,
            self.wanted.streams, self.ip,
        )
        self.connections.add(sink)
        self.started = self.clock.seconds()
        self.uri = request.uri.decode("utf-8", "replace")
        sink.on_lost = self.release
        request.notifyFinish().addBoth(lambda _: sink.lost())
        return sink

    # -- 3. where to start -------------------------------------------------

    async def look_up(self) -> tuple[Start, "Hub"]:
        """The client's start and its hub; on an error the sink is lost
        (releasing the slot) before the error is answered."""
        sink, wanted = self.sink, self.wanted
        assert sink is not None
        try:
            start = await resolve(self.backend, list(wanted.topics), _listed(wanted), wanted.since)
            hub = await self.hubs.get(start.tps)
        except ApiError:
            sink.lost()
            raise
        except BackendUnavailable as e:
            sink.lost()
            self.connections.counters.backend_unavailable += 1
            raise unavailable(f"the event log is unavailable: {e}", 10) from None
        except TooManySets as e:
            # A safety valve (max_stream_sets): per-set state stays bounded.
            sink.lost()
            raise unavailable(f"too many distinct stream sets: {e}; retry later or "
                              "ask for a more common combination", SETS_RETRY_AFTER) from None
        except CancelledError:
            sink.lost()
            raise
        return start, hub

    # -- 4. the head and the first bytes -----------------------------------

    def headers(self) -> None:
        """The head of a stream response. `Connection: close`: a stream ends
        with its connection, so pooled clients must not reuse it."""
        request = self.request
        request.setResponseCode(200)
        request.setHeader("content-type", "application/json; charset=utf-8" if self.wanted.ndjson
                          else "text/event-stream; charset=utf-8")
        request.setHeader("cache-control", "no-cache")
        request.setHeader("connection", "close")
        request.setHeader("x-accel-buffering", "no")
        self.common_headers(request)

    def begin(self, start: Start) -> None:
        """The first bytes; then chunks go straight to the connection when
        the response is chunked (the head is out with the first write)."""
        sink, request = self.sink, self.request
        assert sink is not None
        sink.begin()
        if getattr(request, "chunked", False) and request.channel is not None:
            sink.use_transport(request.channel.transport)
        for note in start.notes:
            sink.comment(note)

    # -- 5. the subscription -----------------------------------------------

    def subscribe(self, start: Start, hub: "Hub") -> Any:
        sink = self.sink
        assert sink is not None
        sub = hub.subscribe(sink, start.offsets, start.stamps, self.wanted.filter)
        sink.subscription = sub
        return sub

    def limit_lifetime(self) -> None:
        sink = self.sink
        assert sink is not None
        if self.service.max_lifetime > 0:
            sink.timer = self.clock.callLater(self.service.max_lifetime, sink.close)

    # -- 6. whose connection it is -----------------------------------------

    def take_over(self, sub: Any) -> bool:
        """Detach the connection from twisted.web (eventstreams.takeover);
        False when it stays with twisted.web."""
        assert self.sink is not None
        if not take_over(self.request, self.sink, sub):
            return False
        # Hold neither the request nor `done` (the routing chain waits on
        # it): an open stream keeps no HTTP object alive.
        self.request = self.done = None
        return True

    def produce_through_request(self, sub: Any) -> None:
        """The connection stays with twisted.web: the subscription is the
        request's producer until the response ends."""
        request, sink = self.request, self.sink
        assert sink is not None
        request.registerProducer(sub, True)

        def ended(result: Any) -> Any:
            if not sink.closed:
                sink.lost()
            if request.channel is not None and request.producer is sub:
                request.unregisterProducer()
            return result

        assert self.done is not None
        self.done.addBoth(ended)

    # -- 7. release ----------------------------------------------------------

    def release(self) -> None:
        """Once, however the stream ends: the slot goes back; a stream that
        started logs its access line (one that did not is logged by the
        route, with its error status)."""
        self.limits.release(self.ip)
        sink = self.sink
        if sink is not None and sink.started:
            stream_finished(self.ip, ",".join(self.wanted.streams), 200, sink.bytes_written,
                            self.clock.seconds() - self.started, self.uri)


def _listed(wanted: StreamRequest) -> Any:
    """resolve() takes the assignments as a list (None: no Last-Event-ID)."""
    return None if wanted.assignments is None else list(wanted.assignments)
