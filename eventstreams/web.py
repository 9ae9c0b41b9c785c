"""The public HTTP API: streams, spec, stream list, service info, CORS."""
from __future__ import annotations

import json
import os
from typing import Any, Optional

from klein import Klein
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from . import __version__, doc
from .assignment import resolve
from .backends.base import Backend, BackendUnavailable
from .config import Config
from .errors import ApiError, bad_last_event_id, not_found, unavailable
from .filters import FilterError, parse_filters
from .hub import Hubs, TooManySets
from .iplimit import AT_CAPACITY, OVER_IP_LIMIT, Limits
from .logs import stream_finished
from .positions import PositionError, TimestampError, parse_last_event_id, parse_since
from .spec import openapi_spec
from .sse import Connections, ResponseSink
from .takeover import take_over

log = Logger()

SETS_RETRY_AFTER = 30  # seconds: lingering sets close within hub_linger

# The stream browser's static files (eventstreams/ui), served at /v2/ui/<name>.
UI_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ui")
UI_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}

SERVICE_INFO = {
    "name": "eventstreams",
    "version": __version__,
    "description": "Streams of JSON events over HTTP Server-Sent Events",
    "home": "https://wikitech.wikimedia.org/wiki/Event_Platform/EventStreams_HTTP_Service",
}


def header_text(request: IRequest, name: str) -> Optional[str]:
    """A request header as text; bytes that are not UTF-8 raise UnicodeDecodeError."""
    value = request.getHeader(name.encode("ascii"))
    return None if value is None else value.decode("utf-8")


def load_ui_files() -> dict[str, tuple[str, bytes]]:
    """The browser page's files by name: (content type, bytes)."""
    files = {}
    for name in os.listdir(UI_DIR):
        kind = UI_TYPES.get(os.path.splitext(name)[1])
        path = os.path.join(UI_DIR, name)
        if kind is not None and not name.startswith(".") and os.path.isfile(path):
            with open(path, "rb") as f:
                files[name] = (kind, f.read())
    return files


def client_ip(request: IRequest, header: Optional[str]) -> str:
    """The trusted client address: a configured proxy header, else the peer."""
    if header:
        value = request.getHeader(header.encode("ascii"))
        if value:
            return value.split(b",")[0].strip().decode("latin-1")
    address = request.getClientAddress()
    return getattr(address, "host", None) or "local"


def wants_ndjson(request: IRequest) -> bool:
    accept = (request.getHeader(b"accept") or b"").decode("latin-1").lower()
    first = accept.split(",")[0].split(";")[0].strip()
    return first == "application/json"


class _Open:
    """What the stream set-up returns once the response is streaming: the
    Deferred that fires when it ends (wrapped, as a coroutine cannot return
    a Deferred)."""

    __slots__ = ("done",)

    def __init__(self, done: Deferred) -> None:
        self.done = done


def _open_body(result: Any) -> Any:
    return result.done if isinstance(result, _Open) else result


class Api:
    """Routes of the public site; one instance per daemon."""

    app = Klein()

    def __init__(
        self,
        config: Config,
        backend: Backend,
        hubs: Hubs,
        connections: Connections,
        clock: IReactorTime,
        limits: Limits,
    ):
        self.config = config
        self.service = config.service
        self.backend = backend
        self.hubs = hubs
        self.connections = connections
        self.clock = clock
        self.limits = limits
        self.spec = json.dumps(openapi_spec(config), separators=(",", ":")).encode()
        self.ui_files = load_ui_files()  # read once: no file I/O on the reactor thread
        self.doc_files = doc.load(UI_TYPES)  # /?doc, the same
        self.stream_list = json.dumps(
            [
                {
                    "name": s.name,
                    "aliases": list(s.aliases),
                    "topics": list(s.topics),
                    "description": s.description,
                    "schema_title": s.schema_title,
                }
                for s in config.streams.values()
            ],
            separators=(",", ":"),
        ).encode()

    def resource(self) -> Any:
        return self.app.resource()

    # -- helpers --------------------------------------------------------------

    def _json(self, request: IRequest, body: Any, status: int = 200) -> bytes:
        request.setResponseCode(status)
        request.setHeader("content-type", "application/json; charset=utf-8")
        self._common_headers(request)
        if isinstance(body, bytes):
            return body
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    def _common_headers(self, request: IRequest) -> None:
        """CORS and upstream's security headers (service-runner's app.js
        sends them on every response; the prefixed CSP names are for old
        browsers)."""
        request.setHeader("access-control-allow-origin", self.service.cors_origin)
        csp = self.service.content_security_policy
        request.setHeader("content-security-policy", csp)
        request.setHeader("x-content-security-policy", csp)
        request.setHeader("x-webkit-csp", csp)
        request.setHeader("x-content-type-options", "nosniff")
        request.setHeader("x-frame-options", "SAMEORIGIN")
        request.setHeader("x-xss-protection", "1; mode=block")

    def _error(self, request: IRequest, error: ApiError) -> bytes:
        key = (error.status, error.type)
        self.connections.counters.rejected[key] = self.connections.counters.rejected.get(key, 0) + 1
        retry_after = getattr(error, "retry_after", None)
        if retry_after:
            request.setHeader("retry-after", str(retry_after))
        uri = request.uri.decode("utf-8", "replace")
        method = request.method.decode("ascii", "replace")
        return self._json(request, error.body(method, uri), error.status)

    # -- routes ---------------------------------------------------------------

    @app.route("/", methods=["GET", "HEAD"])
    def root(self, request: IRequest) -> Any:
        query = request.uri.partition(b"?")[2]
        if doc.query_value(query, b"spec") is not None:
            return self._json(request, self.spec)
        if doc.query_value(query, b"doc") is not None:
            return self.doc_file(request, (doc.query_value(query, b"path") or b"").decode("latin-1"))
        request.setResponseCode(303)
        request.setHeader("location", "/v2/ui")
        return b""

    @app.route("/v2/ui", methods=["GET", "HEAD"])
    @app.route("/v2/ui/", methods=["GET", "HEAD"])
    def ui(self, request: IRequest) -> bytes:
        return self.ui_file(request, "index.html")

    @app.route("/v2/ui/<string:name>", methods=["GET", "HEAD"])
    def ui_file(self, request: IRequest, name: str) -> bytes:
        return self._file(request, self.ui_files, name)

    def doc_file(self, request: IRequest, name: str) -> bytes:
        """/?doc, Swagger UI, and its files (/?doc&path=NAME)."""
        return self._file(request, self.doc_files, name)

    def _file(self, request: IRequest, files: dict[str, tuple[str, bytes]], name: str) -> bytes:
        """One of the files read at start-up (the UI's or the doc page's)."""
        found = files.get(name)
        if found is None:
            return self._error(request, ApiError(404, "not_found", "Not Found", "no such resource"))
        kind, body = found
        request.setHeader("content-type", kind)
        request.setHeader("cache-control", "no-cache")
        self._common_headers(request)
        return body

    @app.route("/v2/streams", methods=["GET", "HEAD"])
    def streams(self, request: IRequest) -> bytes:
        return self._json(request, self.stream_list)

    @app.route("/_info", methods=["GET", "HEAD"])
    def info(self, request: IRequest) -> bytes:
        return self._json(request, SERVICE_INFO)

    @app.route("/_info/<string:field>", methods=["GET", "HEAD"])
    def info_field(self, request: IRequest, field: str) -> bytes:
        if field not in SERVICE_INFO:
            return self._error(request, ApiError(404, "not_found", "Not Found", f"no such field {field!r}"))
        return self._json(request, {field: SERVICE_INFO[field]})

    @app.route("/robots.txt", methods=["GET", "HEAD"])
    def robots(self, request: IRequest) -> bytes:
        request.setHeader("content-type", "text/plain; charset=utf-8")
        return b"User-agent: *\nDisallow: /\n"

    @app.route("/", branch=True, methods=["OPTIONS"])
    def options(self, request: IRequest) -> bytes:
        request.setResponseCode(204)
        self._common_headers(request)
        request.setHeader("access-control-allow-methods", "GET, HEAD, OPTIONS")
        requested = request.getHeader(b"access-control-request-headers")
        request.setHeader(
            b"access-control-allow-headers",
            requested or b"Accept, Last-Event-ID, Cache-Control, Content-Type",
        )
        request.setHeader("access-control-max-age", "86400")
        return b""

    @app.route("/v2/stream/<string:names>", methods=["GET", "HEAD"])
    def stream(self, request: IRequest, names: str) -> Deferred:
        # The coroutine only sets the stream up and returns: an open stream
        # holds no coroutine frame (nor its context copy), only `done`.
        started = self.clock.seconds()

        def rejected(result: Any) -> Any:  # the access line of a stream that did not start
            if not isinstance(result, _Open):
                status = 499 if request.code == 200 else request.code  # 499: the client left first
                stream_finished(client_ip(request, self.service.client_ip_header), names, status,
                                len(result) if isinstance(result, bytes) else 0, self.clock.seconds() - started,
                                request.uri.decode("utf-8", "replace"))
            return result

        return ensureDeferred(self._stream(request, names)).addCallback(rejected).addCallback(_open_body)

    @app.handle_errors(Exception)
    def unexpected(self, request: IRequest, failure: Any) -> bytes:
        if failure.check(CancelledError):
            return b""
        from werkzeug.exceptions import HTTPException

        if failure.check(HTTPException):
            e = failure.value
            code = e.code
            if code == 405 and set(getattr(e, "valid_methods", None) or ()) <= {"OPTIONS"}:
                code = 404  # only the CORS catch-all matched: the path does not exist
            if code == 404:
                return self._error(request, ApiError(404, "not_found", "Not Found", "no such resource"))
            return self._error(request, ApiError(code, "http_error", e.name, e.description or e.name))
        log.failure("request failed", failure)
        return self._error(request, ApiError(500, "internal_error", "Internal Server Error",
                                             "the request could not be handled"))

    # -- the stream -----------------------------------------------------------

    def _stream_headers(self, request: IRequest, ndjson: bool) -> None:
        """The head of a stream response. `Connection: close`: a stream ends
        with its connection, so pooled clients must not reuse it."""
        request.setResponseCode(200)
        request.setHeader("content-type", "application/json; charset=utf-8" if ndjson else "text/event-stream; charset=utf-8")
        request.setHeader("cache-control", "no-cache")
        request.setHeader("connection", "close")
        request.setHeader("x-accel-buffering", "no")
        self._common_headers(request)

    async def _stream(self, request: IRequest, names_text: str) -> Any:
        config, service = self.config, self.service
        names = [n for n in names_text.split(",")]
        streams = [config.stream(n) for n in names]
        unknown = [n for n, s in zip(names, streams) if s is None]
        if unknown or not names:
            return self._error(request, not_found(unknown or [names_text]))
        stream_names = tuple(dict.fromkeys(s.name for s in streams if s is not None))
        topics = list(dict.fromkeys(t for s in streams if s is not None for t in s.topics))
        try:
            args = [
                (k.decode("utf-8"), v.decode("utf-8")) for k, vs in request.args.items() for v in vs
            ]
        except UnicodeDecodeError:
            return self._error(request, ApiError(400, "invalid_query", "Invalid Query", "the query string is not UTF-8"))
        try:
            flt = parse_filters(args)
        except FilterError as e:
            return self._error(request, ApiError(400, "invalid_filter", "Invalid Filter", str(e)))
        since = None
        since_args = request.args.get(b"since")
        if since_args:
            try:
                since = parse_since(since_args[0].decode("utf-8"))
            except (TimestampError, UnicodeDecodeError) as e:
                return self._error(request, ApiError(400, "invalid_timestamp", "Invalid Timestamp", str(e)))
        assignments = None
        try:
            header = header_text(request, "last-event-id")
            if header is not None:
                assignments = parse_last_event_id(header)
        except PositionError as e:
            return self._error(request, bad_last_event_id(str(e)))
        except UnicodeDecodeError:
            return self._error(request, bad_last_event_id("the header is not UTF-8"))

        ip = client_ip(request, service.client_ip_header)
        admission = self.limits.acquire(ip)  # counted from here until the request ends
        if admission == AT_CAPACITY:
            return self._error(request, unavailable("the server is at its connection limit", 30))
        if admission == OVER_IP_LIMIT:
            error = ApiError(429, "too_many_requests", "Too Many Requests",
                             f"at most {service.client_ip_connection_limit} concurrent connections per client address")
            error.retry_after = 10  # type: ignore[attr-defined]
            return self._error(request, error)
        ndjson = wants_ndjson(request)
        if request.method == b"HEAD":
            # What a GET would get, without the stream: the connection stays
            # usable for the next request.
            self.limits.release(ip)
            try:
                await resolve(self.backend, topics, assignments, since)
            except ApiError as e:
                return self._error(request, e)
            except BackendUnavailable as e:
                return self._error(request, unavailable(f"the event log is unavailable: {e}", 10))
            self._stream_headers(request, ndjson)
            if getattr(request.channel, "persistent", False):
                request.responseHeaders.removeHeader(b"connection")  # it serves the next request
            return b""

        done: Deferred[bytes] = Deferred()

        def finish() -> None:
            if not done.called:
                # Close the connection too: some old clients read below the
                # chunked framing and would never see the response end.
                request.persistent = False
                done.callback(b"")

        sink = ResponseSink(
            request.write, finish, ndjson, service.id_updates, self.connections, stream_names, ip
        )
        self.connections.add(sink)
        started, uri = self.clock.seconds(), request.uri.decode("utf-8", "replace")

        def ended() -> None:  # once, however the stream ends
            self.limits.release(ip)
            if sink.started:  # else the answer was an error, logged by stream()
                stream_finished(ip, ",".join(stream_names), 200, sink.bytes_written, self.clock.seconds() - started, uri)

        sink.on_lost = ended
        request.notifyFinish().addBoth(lambda _: sink.lost())
        try:
            start = await resolve(self.backend, topics, assignments, since)
            hub = await self.hubs.get(start.tps)
        except ApiError as e:
            sink.lost()
            return self._error(request, e)
        except BackendUnavailable as e:
            sink.lost()
            self.connections.counters.backend_unavailable += 1
            return self._error(request, unavailable(f"the event log is unavailable: {e}", 10))
        except TooManySets as e:
            # A safety valve (max_stream_sets): per-set state stays bounded.
            sink.lost()
            return self._error(request, unavailable(f"too many distinct stream sets: {e}; retry later or "
                                                    "ask for a more common combination", SETS_RETRY_AFTER))
        except CancelledError:
            sink.lost()
            raise
        if sink.closed:  # the client left while we looked things up
            return b""

        self._stream_headers(request, ndjson)
        sink.begin()
        if getattr(request, "chunked", False) and request.channel is not None:
            sink.use_transport(request.channel.transport)
        for note in start.notes:
            sink.comment(note)
        sub = hub.subscribe(sink, start.offsets, start.stamps, flt)
        sink.subscription = sub
        if sink.closed:
            return _Open(done)
        if service.max_lifetime > 0:
            sink.timer = self.clock.callLater(service.max_lifetime, sink.close)
        if take_over(request, sink, sub):
            # twisted.web no longer knows this connection: `done` never fires
            # and goes, with the request, once this returns.
            return _Open(done)
        request.registerProducer(sub, True)

        def ended(result: Any) -> Any:
            if not sink.closed:
                sink.lost()
            if request.channel is not None and request.producer is sub:
                request.unregisterProducer()
            return result

        done.addBoth(ended)
        return _Open(done)
