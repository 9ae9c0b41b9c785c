"""The HTTP connection with a budget: how long and how large a request head
may be, how many connections may be sending one, and what every refusal
looks like on the wire.

twisted.web's channel restarts its idle timer on every byte and counts a
client against the per-address stream limit only once its head is parsed,
so a client sending a byte every few seconds holds a connection (a file
descriptor) forever; enough of them and accept() fails for everyone. Here a
head has a total deadline from the moment the connection waits for it (not
reset per byte), and connections still sending a head are counted in all
and per peer address: over the per-address bound a new connection is
refused at once; over the total the one that has waited longest is cut, so
a client whose head arrives in one go always gets in.

Every refusal is a JSON error in the API's documented shape with the
standard reason phrase, and logs at most one line (fewer under a flood).
Of twisted.web's channel this overrides one private method,
`_respondToBadRequestAndDisconnect` (its bare 400 for a malformed request),
reads the request line it parsed for the error's method and uri (both
through eventstreams.compat, which checks them), and sets the public line
limits `MAX_LENGTH` and `totalHeadersSize`.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from http import HTTPStatus
from typing import Any, Optional
from urllib.parse import unquote_to_bytes

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web import http, server

from . import compat
from .errors import ApiError
from .positions import MAX_ID_BYTES

log = Logger()

# A head must carry any id the server emits (as Last-Event-ID) plus the usual headers.
MAX_HEAD_BYTES = MAX_ID_BYTES + 16 * 1024


def reason(code: int) -> bytes:
    """The standard reason phrase (twisted.web lacks some, e.g. 429 and 431)."""
    try:
        return HTTPStatus(code).phrase.encode("ascii")
    except ValueError:
        return http.RESPONSES.get(code, b"Unknown Status")


def error_bytes(error: ApiError, method: str = "", uri: str = "",
                retry_after: Optional[int] = None) -> bytes:
    """A whole HTTP/1.1 error response that closes the connection, for
    refusals made before there is a request object to answer."""
    body = json.dumps(error.body(method, uri), separators=(",", ":")).encode("utf-8")
    head = [b"HTTP/1.1 %d %s" % (error.status, reason(error.status)),
            b"Content-Type: application/json; charset=utf-8",
            b"Content-Length: %d" % len(body),
            b"Connection: close"]
    if retry_after:
        head.append(b"Retry-After: %d" % retry_after)
    return b"\r\n".join(head) + b"\r\n\r\n" + body


class Throttled:
    """At most `burst` log lines per `interval` seconds; the rest are counted
    and reported with the next line that gets through."""

    def __init__(self, clock: IReactorTime, burst: int = 10, interval: float = 10.0) -> None:
        self.clock, self.burst, self.interval = clock, burst, interval
        self.window_start = float("-inf")
        self.used = 0
        self.suppressed = 0

    def info(self, format: str, **kwargs: Any) -> None:
        now = self.clock.seconds()
        if now - self.window_start >= self.interval:
            self.window_start, self.used = now, 0
        if self.used >= self.burst:
            self.suppressed += 1
            return
        self.used += 1
        if self.suppressed:
            format += " ({suppressed} similar lines suppressed)"
            kwargs["suppressed"], self.suppressed = self.suppressed, 0
        log.info(format, **kwargs)


class HeadBudget:
    """Connections of one listener that are waiting for or reading a
    request head: a deadline for each, a bound in all and per peer address."""

    def __init__(self, clock: IReactorTime, deadline: float, max_pending: int, max_per_address: int) -> None:
        self.clock = clock
        self.deadline = deadline
        self.max_pending = max_pending  # 0: no bound
        self.max_per_address = max_per_address  # 0: no bound
        self.pending: OrderedDict[Any, str] = OrderedDict()  # channel → peer, oldest first
        self.per_address: dict[str, int] = {}
        self.refused = 0  # over the per-address bound
        self.evicted = 0  # cut to make room (over the total)
        self.timed_out = 0  # past the deadline
        self.log = Throttled(clock)

    def start(self, channel: Any, address: str) -> bool:
        """Count a connection as waiting for a head; False: refuse it."""
        if self.max_per_address and self.per_address.get(address, 0) >= self.max_per_address:
            self.refused += 1
            self.log.info("refused a connection from {address}: {n} connections of it are still sending "
                          "a request head", address=address, n=self.max_per_address)
            return False
        if self.max_pending:
            while len(self.pending) >= self.max_pending:
                oldest = next(iter(self.pending))
                self.evicted += 1
                self.log.info("closed the connection that waited longest for its request head: "
                              "{n} connections are sending one", n=len(self.pending))
                oldest.head_refused(408, "request_timeout", "the request head was not sent in time")
                self.done(oldest)  # (head_refused did; the loop must end whatever it did)
        self.pending[channel] = address
        self.per_address[address] = self.per_address.get(address, 0) + 1
        return True

    def done(self, channel: Any) -> None:
        address = self.pending.pop(channel, None)
        if address is None:
            return
        count = self.per_address[address] - 1
        if count:
            self.per_address[address] = count
        else:
            del self.per_address[address]


class BudgetedChannel(http.HTTPChannel):
    """HTTPChannel whose request heads live within the site's HeadBudget
    (`site.head_budget`) and whose refusals are JSON errors."""

    MAX_LENGTH = MAX_HEAD_BYTES  # one header line (LineReceiver's limit)
    totalHeadersSize = MAX_HEAD_BYTES  # checked here first, with a 431 (Twisted's gives a bare 400)

    _budget: Optional[HeadBudget] = None
    _head_timer: Any = None
    _head_bytes = 0
    _head_begun = False  # a byte of the awaited head has arrived
    _refusing = False

    def connectionMade(self) -> None:
        super().connectionMade()
        self._budget = getattr(self.factory, "head_budget", None)
        self._await_head()

    def _peer(self) -> str:
        return getattr(self.transport.getPeer(), "host", None) or "local"

    def _await_head(self) -> None:
        """The connection now waits for a request head: the deadline starts."""
        self._head_bytes = 0
        self._head_begun = False
        budget = self._budget
        if budget is None or self._head_timer is not None:
            return
        if not budget.start(self, self._peer()):
            self.refuse(ApiError(503, "too_many_connections", "Service Unavailable",
                                  "too many connections from this address are sending a request head"), 10)
            return
        if budget.deadline:
            self._head_timer = budget.clock.callLater(budget.deadline, self._head_late)

    def _head_received(self) -> None:
        if self._head_timer is not None:
            if self._head_timer.active():
                self._head_timer.cancel()
            self._head_timer = None
        if self._budget is not None:
            self._budget.done(self)

    def _head_late(self) -> None:
        self._head_timer = None
        if self._budget is not None:
            self._budget.timed_out += 1
            self._budget.log.info("closed a connection from {address}: no complete request head within {s} s",
                                  address=self._peer(), s=self._budget.deadline)
        self.head_refused(408, "request_timeout", "the request head was not sent in time")

    def head_refused(self, status: int, type: str, detail: str) -> None:
        """Cut a connection waiting for a head: with an answer once the head
        has begun; an idle keep-alive connection is only closed (a client
        reusing it would read an unsolicited answer as the next one's)."""
        if self._head_begun:
            self.refuse(ApiError(status, type, reason(status).decode(), detail))
        else:
            self.refuse(None)

    def refuse(self, error: Optional[ApiError], retry_after: Optional[int] = None) -> None:
        """Answer an error of the connection (no request to answer yet), or
        nothing, and close."""
        if self._refusing:
            return
        self._refusing = True
        self._head_received()
        if error is not None:
            method, uri = compat.request_line(self)
            self.transport.write(error_bytes(error, method, uri, retry_after))
        self.setTimeout(None)
        self.persistent = False
        self.transport.loseConnection()

    # -- twisted.web's parser ---------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if not self._refusing:
            self._head_begun = True  # (while a request is handled, the flag is not read)
            super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        self._head_begun = True
        self._head_bytes += len(line) + 2
        if self._head_bytes > MAX_HEAD_BYTES:
            self.lineLengthExceeded(line)
            return
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        self.refuse(ApiError(431, "request_header_fields_too_large", "Request Header Fields Too Large",
                              f"the request head is larger than {MAX_HEAD_BYTES} bytes"))

    def allHeadersReceived(self) -> None:
        self._head_received()
        super().allHeadersReceived()

    def requestDone(self, request: Any) -> None:
        # Start waiting before twisted.web replays pipelined bytes, which may
        # hold the next head whole.
        if self.persistent and not self._refusing:
            self._await_head()
        super().requestDone(request)

    def _respondToBadRequestAndDisconnect(self) -> None:
        # twisted.web's answer to a malformed request line or header is a
        # bare "400 Bad Request": answer in the API's shape instead.
        self.refuse(ApiError(400, "bad_request", "Bad Request", "the request is not valid HTTP/1.1"))

    def connectionLost(self, reason: Any) -> None:
        self._head_received()
        super().connectionLost(reason)


class ApiRequest(server.Request):
    """A request of the public site: standard reason phrases, a JSON 400 for
    a path that is not UTF-8, a JSON 500 (never a traceback page), and a
    bounded body (`site.max_body`; only RCStream polling sends one):
    twisted.web would spool any length to a temporary file."""

    _body_bytes = 0

    def _max_body(self) -> int:
        return getattr(getattr(self.channel, "site", None), "max_body", 0)

    def _too_large(self) -> None:
        refuse = getattr(self.channel, "refuse", None)
        if refuse is not None:
            refuse(ApiError(413, "payload_too_large", "Payload Too Large",
                            f"the body is larger than {self._max_body()} bytes"))

    def gotLength(self, length: Optional[int]) -> None:
        limit = self._max_body()
        if limit and length is not None and length > limit:
            self._too_large()
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        limit = self._max_body()
        self._body_bytes += len(data)
        if limit and self._body_bytes > limit:
            self._too_large()
            return
        super().handleContentChunk(data)

    def setResponseCode(self, code: int, message: Optional[bytes] = None) -> None:
        super().setResponseCode(code, message if message is not None else reason(code))

    def process(self) -> None:
        try:
            unquote_to_bytes(self.path).decode("utf-8")
        except UnicodeDecodeError:
            self.answer_error(ApiError(400, "invalid_path", "Invalid Path", "the path is not UTF-8"))
            return
        super().process()

    def answer_error(self, error: ApiError) -> None:
        body = error.body(self.method.decode("ascii", "replace"), self.uri.decode("utf-8", "replace"))
        data = json.dumps(body, separators=(",", ":")).encode("utf-8")
        self.setResponseCode(error.status)
        self.setHeader(b"content-type", b"application/json; charset=utf-8")
        self.setHeader(b"content-length", b"%d" % len(data))
        self.write(data)
        self.finish()

    def processingFailed(self, reason: Any) -> None:
        log.failure("request {uri} failed", reason, uri=self.uri.decode("utf-8", "replace"))
        if self.startedWriting:
            self.loseConnection()  # the head is out: only closing tells the client
            return
        self.responseHeaders.removeHeader(b"content-length")
        self.answer_error(ApiError(500, "internal_error", "Internal Server Error",
                                   "the request could not be handled"))


def guard(site: server.Site, budget: HeadBudget, request_factory: Any = None, max_body: int = 0) -> server.Site:
    """Serve `site` with budgeted connections (and a request factory, and
    ApiRequest's body limit)."""
    site.protocol = BudgetedChannel  # type: ignore[assignment]
    site.head_budget = budget  # type: ignore[attr-defined]
    site.max_body = max_body  # type: ignore[attr-defined]
    if request_factory is not None:
        site.requestFactory = request_factory
    return site
