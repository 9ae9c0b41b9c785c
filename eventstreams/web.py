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
from twisted.web.server import Request

from . import __version__, doc
from .backends.base import Backend
from .config import Config
from .errors import ApiError
from .hub import Hubs
from .iplimit import Limits
from .logs import stream_finished
from .spec import openapi_spec
from .sse import Connections
from .streamrequest import parse_stream_request
from .streamresponse import Opened, StreamResponse, opened_body

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
        if error.retry_after:
            request.setHeader("retry-after", str(error.retry_after))
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
    def stream(self, request: Request, names: str) -> Deferred:
        # The coroutine only sets the stream up and returns: an open stream
        # holds no coroutine frame (nor its context copy), only `done`.
        started = self.clock.seconds()

        def rejected(result: Any) -> Any:  # the access line of a stream that did not start
            if not isinstance(result, Opened):
                status = 499 if request.code == 200 else request.code  # 499: the client left first
                stream_finished(client_ip(request, self.service.client_ip_header), names, status,
                                len(result) if isinstance(result, bytes) else 0, self.clock.seconds() - started,
                                request.uri.decode("utf-8", "replace"))
            return result

        return ensureDeferred(self._stream(request, names)).addCallback(rejected).addCallback(opened_body)

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

    async def _stream(self, request: IRequest, names_text: str) -> Any:
        """Parse, then hand the request to its StreamResponse (which owns
        the rest of its life); an ApiError is answered here."""
        try:
            wanted = parse_stream_request(
                self.config, names_text, request.args, request.getHeader(b"last-event-id"),
                request.getHeader(b"accept"), request.method,
            )
            response = StreamResponse(
                request, wanted, client_ip(request, self.service.client_ip_header),
                service=self.service, backend=self.backend, hubs=self.hubs, connections=self.connections,
                clock=self.clock, limits=self.limits, common_headers=self._common_headers,
            )
            return await response.run()
        except ApiError as e:
            return self._error(request, e)
