"""The HTTP connection with a budget: how long and how large a request head
may be, how many connections may be sending one, and what every refusal
looks like on the wire.

twisted.web's channel restarts its idle timer on every byte and counts a
client against the per-address stream limit only once its head is parsed,
so a client sending a byte every few seconds holds a connection (a file
descriptor) forever; enough of them and accept() fails for everyone. Here a
head has a total deadline from the moment the connection waits for it (not
reset per byte), and connections still waiting for a head are counted in
all, those that have sent part of one also per peer address: an address
over its bound has new connections refused at once; over the total, the
connection that has held a partial head longest is cut, else the oldest
that has had a second to send anything. A burst of connections the reactor
has not read yet is let in (up to half the open-files limit), so a client
whose head arrives in one go always gets in. Heads are also counted per
address a second (a token bucket, at the request line): over the rate, a
429 before the headers are parsed.

Every refusal is a JSON error in the API's documented shape with the
standard reason phrase, and logs at most one line (fewer under a flood).
Of twisted.web's channel this overrides one private method,
`_respondToBadRequestAndDisconnect` (its bare 400 for a malformed request
or a head over `totalHeadersSize`), reads the request line it parsed for
the error's method and uri (through eventstreams.compat, which checks
them) and its head size (`_receivedHeaderSize`, with getattr), and sets the
public line limits `MAX_LENGTH` and `totalHeadersSize`.
"""
from __future__ import annotations

import json
import math
from collections import OrderedDict
from http import HTTPStatus
from typing import Any, Optional, cast
from urllib.parse import unquote_to_bytes

from twisted.internet.interfaces import IPushProducer, IReactorTime, ITransport
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server

from . import compat
from .buckets import Buckets
from .errors import ApiError
from .metrics import Sample
from .positions import MAX_ID_BYTES

log = Logger()

# A head must carry any id the server emits (as Last-Event-ID) plus the usual headers.
MAX_HEAD_BYTES = MAX_ID_BYTES + 16 * 1024
PRUNE_ABOVE = 1000  # addresses with a request bucket before full ones are dropped (at most once a second)
TOO_MANY_HEADS = ApiError(503, "too_many_connections", "Service Unavailable",
                          "too many connections from this address are sending a request head", 10)


def reason(code: int) -> bytes:
    """The standard reason phrase (twisted.web lacks some, e.g. 429 and 431)."""
    try:
        return HTTPStatus(code).phrase.encode("ascii")
    except ValueError:
        return http.RESPONSES.get(code, b"Unknown Status")


def error_bytes(error: ApiError, method: str, uri: str) -> bytes:
    """A whole HTTP/1.1 error response that closes the connection, for
    refusals made before there is a request object to answer."""
    body = json.dumps(error.body(method, uri), separators=(",", ":")).encode("utf-8")
    head = [b"HTTP/1.1 %d %s" % (error.status, reason(error.status)),
            b"Content-Type: application/json; charset=utf-8",
            b"Content-Length: %d" % len(body),
            b"Connection: close"]
    if error.retry_after:
        head.append(b"Retry-After: %d" % error.retry_after)
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def request_line_of(head: bytes) -> tuple[str, str]:
    """The method and uri of a head's first line ('' if it has none yet)."""
    parts = head.partition(b"\n")[0].rstrip(b"\r").split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
        return "", ""
    return parts[0].decode("ascii", "replace"), parts[1].decode("utf-8", "replace")


class Throttled:
    """At most `burst` log lines per `interval` seconds; the rest are counted
    and reported with the next line that gets through."""

    def __init__(self, clock: IReactorTime, burst: int = 10, interval: float = 10.0) -> None:
        self.clock, self.burst, self.interval = clock, burst, interval
        self.window_start = float("-inf")
        self.used = 0
        self.suppressed = 0

    def info(self, format: str, **kwargs: Any) -> None:
        suppressed = self.admit()
        if suppressed is None:
            return
        if suppressed:
            format += " ({suppressed} similar lines suppressed)"
            kwargs["suppressed"] = suppressed
        log.info(format, **kwargs)

    def admit(self) -> Optional[int]:
        """None: suppress the next line; else it may go, and this many
        before it were suppressed since the last that went."""
        now = self.clock.seconds()
        if now - self.window_start >= self.interval:
            self.window_start, self.used = now, 0
        if self.used >= self.burst:
            self.suppressed += 1
            return None
        self.used += 1
        suppressed, self.suppressed = self.suppressed, 0
        return suppressed


class HeadBudget:
    """Connections of one listener that are waiting for or reading a
    request head: a deadline for each, a bound in all and, on those that
    have sent part of a head, per peer address; and a rate of heads per
    peer address, taken at a head's request line, so that a few addresses
    cannot spend the reactor on cheap requests: over it, a 429, after a
    wait (BudgetedChannel.refuse), and the connection closed, nothing more
    of it parsed.

    A connection accepted but not read yet is no evidence of a slow client
    (a burst of connects outruns any reactor), so it is never refused or cut
    for a bound in its first `grace` seconds, unless `max_waiting` (half the
    open-files limit) are waiting: then the oldest goes whatever its age.
    One timer serves every deadline: connections wait in the order they
    started, so the next to expire is always the first."""

    def __init__(self, clock: IReactorTime, deadline: float, max_pending: int, max_per_address: int,
                 grace: float = 1.0, max_waiting: int = 0, listener: str = "api",
                 request_rate: float = 0, request_burst: int = 0) -> None:
        self.clock = clock
        self.listener = listener  # the label of its metrics
        self.deadline = deadline
        self.max_pending = max_pending  # 0: no bound
        self.max_per_address = max_per_address  # 0: no bound
        self.grace = grace
        self.max_waiting = max_waiting or 2 * max_pending  # 0 (and max_pending 0): no bound
        self.pending: OrderedDict[Any, float] = OrderedDict()  # channel → when it began to wait, oldest first
        self.partial: OrderedDict[Any, str] = OrderedDict()  # of those, the ones that sent part of a head → peer
        self.per_address: dict[str, int] = {}  # partial heads per peer address
        self.requests = Buckets(request_rate, request_burst)  # heads a second per peer address (0: no bound)
        self.counted: set[Any] = set()  # of the pending, those whose request line took its token
        self._pruned = clock.seconds()
        self.refused = 0  # over the per-address bound
        self.over_rate = 0  # over the per-address rate
        self.evicted = 0  # cut to make room (over the total)
        self.timed_out = 0  # past the deadline
        self.log = Throttled(clock)
        self._timer: Any = None

    def samples(self) -> list[Sample]:
        labels = {"listener": self.listener}
        return [("eventstreams_request_heads_cut_total", "counter",
                 "Connections cut while sending a request head: refused (over the per-address bound), "
                 "evicted (the longest waiting, over the total), timed_out, or over_rate (over the "
                 "per-address request rate).", {**labels, "reason": reason}, n)
                for reason, n in (("refused", self.refused), ("evicted", self.evicted), ("timed_out", self.timed_out),
                                  ("over_rate", self.over_rate))]

    def start(self, channel: Any, address: str) -> bool:
        """Count a connection as waiting for a head; False: refuse it (its
        address already has its bound of partial heads)."""
        if self._over_address(address):
            return False
        if self.max_pending and len(self.pending) >= self.max_pending:
            self._make_room()
        self.pending[channel] = self.clock.seconds()
        if self.deadline and self._timer is None:
            self._timer = self.clock.callLater(self.deadline, self._expire)
        return True

    def begun(self, channel: Any, address: str) -> bool:
        """A waiting connection has sent part of its head; False: refuse it."""
        if channel in self.partial or channel not in self.pending:
            return True
        if self._over_address(address):
            return False
        self.partial[channel] = address
        self.per_address[address] = self.per_address.get(address, 0) + 1
        return True

    def request_line(self, channel: Any, address: str) -> Optional[ApiError]:
        """A waiting connection's head has its request line, which takes
        one of its address's tokens: None, or the 429 to refuse it with.
        (Not at the first byte: a client dripping its head would get its
        429 at once and come back at once, a connection a turn.)"""
        if channel in self.counted or channel not in self.pending:
            return None
        now = self.clock.seconds()
        if len(self.requests.buckets) > PRUNE_ABOVE and now - self._pruned >= 1:
            self._pruned = now
            self.requests.prune(now)
        if not self.requests.take(address, now):
            self.over_rate += 1
            self.log.info("refused a request from {address}: over {n:g} requests a second",
                          address=address, n=self.requests.rate)
            return ApiError(429, "too_many_requests", "Too Many Requests",
                            f"more than {self.requests.rate:g} requests a second from this address",
                            max(1, math.ceil(self.requests.wait(address, now))))
        self.counted.add(channel)
        return None

    def give_back(self, address: str) -> None:
        self.requests.give_back(address)

    def is_partial(self, channel: Any) -> bool:
        return channel in self.partial

    def _over_address(self, address: str) -> bool:
        if not self.max_per_address or self.per_address.get(address, 0) < self.max_per_address:
            return False
        self.refused += 1
        self.log.info("refused a connection from {address}: {n} connections of it are still sending "
                      "a request head", address=address, n=self.max_per_address)
        return True

    def _make_room(self) -> None:
        """Cut the connection that has held a partial head longest, else the
        oldest past its grace, else (over max_waiting) the oldest."""
        now = self.clock.seconds()
        while len(self.pending) >= self.max_pending:
            if self.partial:
                victim = next(iter(self.partial))
            else:
                victim, started = next(iter(self.pending.items()))
                if now - started < self.grace and not (self.max_waiting and len(self.pending) >= self.max_waiting):
                    return  # a burst the reactor has not read yet: let it in
            self.evicted += 1
            self.log.info("closed the connection that waited longest for its request head: "
                          "{n} connections are sending one", n=len(self.pending))
            victim.head_refused(408, "request_timeout", "the request head was not sent in time")
            self.done(victim)  # (head_refused did; the loop must end whatever it did)

    def _expire(self) -> None:
        """Cut every connection past the deadline; wait for the next one."""
        self._timer = None
        now = self.clock.seconds()
        while self.pending:
            channel, started = next(iter(self.pending.items()))
            if started + self.deadline > now + 1e-6:
                self._timer = self.clock.callLater(started + self.deadline - now, self._expire)
                return
            self.timed_out += 1
            self.log.info("closed a connection from {address}: no complete request head within {s} s",
                          address=channel.peer(), s=self.deadline)
            channel.head_refused(408, "request_timeout", "the request head was not sent in time")
            self.done(channel)

    def done(self, channel: Any) -> None:
        if self.pending.pop(channel, None) is None:
            return
        self.counted.discard(channel)
        if not self.pending:
            self.stop()
        address = self.partial.pop(channel, None)
        if address is None:
            return
        count = self.per_address[address] - 1
        if count:
            self.per_address[address] = count
        else:
            del self.per_address[address]

    def stop(self) -> None:
        """No timer while nothing waits (none left behind a listener)."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


class BudgetedChannel(http.HTTPChannel):
    """HTTPChannel whose request heads live within the site's HeadBudget
    (`site.head_budget`) and whose refusals are JSON errors. It keeps no
    state of its own beyond `_refusing` (and `_held`, on a connection
    refused): idle streams are many, and each attribute is paid per client."""

    MAX_LENGTH = MAX_HEAD_BYTES  # one header line (LineReceiver's limit)
    totalHeadersSize = MAX_HEAD_BYTES  # over it: a 431 (Twisted's answer is a bare 400)

    transport: ITransport  # (Twisted's Optional: set before any of this runs)
    _refusing = False
    _held: Any = None  # the delayed call of a refusal held back (over the request rate)

    @property
    def _budget(self) -> Optional[HeadBudget]:
        return getattr(self.factory, "head_budget", None)

    def connectionMade(self) -> None:
        super().connectionMade()
        self._await_head()

    def peer(self) -> str:
        return getattr(self.transport.getPeer(), "host", None) or "local"

    def _await_head(self) -> None:
        """The connection now waits for a request head: the deadline starts."""
        budget = self._budget
        if budget is not None and self not in budget.pending and not budget.start(self, self.peer()):
            self._refuse_address()

    def _refuse_address(self) -> None:
        self.refuse(TOO_MANY_HEADS)

    def _head_received(self) -> None:
        budget = self._budget
        if budget is not None:
            budget.done(self)

    def head_refused(self, status: int, type: str, detail: str) -> None:
        """Cut a connection waiting for a head: with an answer once the head
        has begun; an idle keep-alive connection is only closed (a client
        reusing it would read an unsolicited answer as the next one's)."""
        budget = self._budget
        if budget is not None and budget.is_partial(self):
            self.refuse(ApiError(status, type, reason(status).decode(), detail))
        else:
            self.refuse(None)

    def refuse(self, error: Optional[ApiError], head: bytes = b"", after: float = 0.0) -> None:
        """Answer an error of the connection (no request to answer yet), or
        nothing, and close; `head`: the request line refused, which Twisted
        has not parsed. With `after`, the answer waits that long, the
        connection unread and still counted among those sending a head: a
        client that comes back as soon as it is answered (a flood's loop)
        then comes back at that pace, not as fast as the server refuses."""
        if self._refusing:
            if self._held is not None and self._held.active():
                self._held.reset(0)  # cut meanwhile (a bound, the deadline): the answer goes now
            return
        self._refusing = True
        answer = b""
        if error is not None:
            method, uri = request_line_of(head) if head else compat.request_line(self)
            answer = error_bytes(error, method, uri)
        self.setTimeout(None)
        self.persistent = False
        budget = self._budget
        if after > 0 and budget is not None:
            cast(IPushProducer, self.transport).pauseProducing()  # (a FileDescriptor: it is one)
            self._held = budget.clock.callLater(min(after, budget.deadline or after), self._close_with, answer)
            return
        self._close_with(answer)

    def _close_with(self, answer: bytes) -> None:
        self._held = None
        self._head_received()
        if answer:
            self.transport.write(answer)
        self.transport.loseConnection()

    # -- twisted.web's parser ---------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._refusing:
            return
        # Bytes of an awaited head: the connection counts against its
        # address until the head is whole (at once, if these hold it).
        budget = self._budget
        if budget is not None and self in budget.pending and not budget.begun(self, self.peer()):
            self._refuse_address()
            return
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if self._refusing:
            return
        budget = self._budget
        if budget is not None and self in budget.pending:
            error = budget.request_line(self, self.peer())
            if error is not None:
                self.refuse(error, line, after=error.retry_after or 1)
                return
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._too_large()

    def _too_large(self) -> None:
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
        # twisted.web's answer to a malformed request line or header, or to
        # a head over totalHeadersSize, is a bare "400 Bad Request": answer
        # in the API's shape instead.
        if getattr(self, "_receivedHeaderSize", 0) > self.totalHeadersSize:
            self._too_large()
            return
        self.refuse(ApiError(400, "bad_request", "Bad Request", "the request is not valid HTTP/1.1"))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._held is not None:
            self._held.cancel()
            self._held = None
        self._head_received()
        super().connectionLost(reason)


def not_counted(request: Any) -> None:
    """The request does not count against its address's request rate (an
    RCStream session's polls: the session caps bound those)."""
    channel = getattr(request, "channel", None)
    budget = getattr(getattr(channel, "factory", None), "head_budget", None)
    if isinstance(channel, BudgetedChannel) and budget is not None:
        budget.give_back(channel.peer())


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
