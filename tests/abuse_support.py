"""The abuse tests' harness: a real daemon in a child process, a healthy
client measured before and during an attack, and the checks every abuse test
makes (the daemon kept answering, its memory stayed bounded, its log holds no
traceback).

The daemon runs as `twistd -n eventstreams` in its own process, so the
attacker (in the test's reactor) costs the daemon only what it makes the
daemon do, and the daemon's RSS and log are its own. Healthy traffic comes
from 127.0.0.1 and attackers from another loopback address (ATTACKER), so
per-address limits tell them apart as they would on the internet.

Latency is compared as a ratio of the same client's figures in the same
test (quiet, then under attack), never against an absolute time; waits have
deadlines, not fixed sleeps.

Used by tests/test_abuse.py and meant for the bridges' abuse tests too:

    daemon = await AbuseDaemon.start(self, extra=...)
    healthy = await Healthy.start(daemon)
    quiet = await healthy.measure(3)
    ... start the attack ...
    during = await healthy.measure(5)
    check_healthy(self, quiet, during)
    daemon.check_log(self)
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from twisted.internet import defer, error, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IProcessTransport
from twisted.internet.protocol import ProcessProtocol, Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from eventstreams.transports import ITCPConnection

from .support import StreamClient, cancelling, free_port, sleep, write_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# `twistd -n`, optionally under a lower open-files limit (RLIMIT_NOFILE).
RUN_TWISTD = ("import resource, sys; n = int(sys.argv.pop(1)); "
              "n and resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)); "
              "sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()")
HEALTHY = "127.0.0.1"
ATTACKER = "127.0.0.2"  # another source address: per-address limits apply to it alone
START_TIMEOUT = 30.0
PROBE_TIMEOUT = 10.0  # a probe that takes longer counts as unanswered


# -- raw HTTP ------------------------------------------------------------------


class Raw(Protocol):
    """A connection whose bytes the test writes and reads as they are."""

    transport: ITCPConnection  # (Twisted types it Optional[ITransport])

    def __init__(self) -> None:
        self.received = b""
        self.closed: defer.Deferred = defer.Deferred()
        self.connected_at = time.monotonic()
        self.closed_at: Optional[float] = None
        self._waiters: list[tuple[Callable[[], bool], defer.Deferred]] = []

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self._check()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed_at = time.monotonic()
        self.closed.callback(None)
        self._check()

    @property
    def is_closed(self) -> bool:
        return self.closed_at is not None

    def send(self, data: bytes) -> None:
        if not self.is_closed:
            self.transport.write(data)

    def _check(self) -> None:
        for item in list(self._waiters):
            if item[0]():
                self._waiters.remove(item)
                item[1].callback(self)

    def wait_for(self, predicate: Callable[[], bool], timeout: float = PROBE_TIMEOUT) -> defer.Deferred:
        """Fires with self when predicate() holds, with TimeoutError after timeout seconds."""
        d: defer.Deferred = defer.Deferred()
        if predicate():
            d.callback(self)
            return d
        item = (predicate, d)
        self._waiters.append(item)

        def expire() -> None:
            if not d.called:
                self._waiters.remove(item)
                d.errback(TimeoutError(f"timed out; received {self.received[-300:]!r}"))

        call = reactor.callLater(timeout, expire)
        d.addBoth(cancelling(call))
        return d

    def close(self) -> None:
        if not self.is_closed:
            self.transport.abortConnection()


async def connect(port: int, source: str = HEALTHY, protocol: Optional[Protocol] = None) -> Any:
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=int(PROBE_TIMEOUT), bindAddress=(source, 0))
    return await connectProtocol(endpoint, protocol if protocol is not None else Raw())


@dataclass
class Response:
    status: int
    reason: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def parse_responses(data: bytes, head_only: tuple[bool, ...] = ()) -> list[Response]:
    """The complete responses in data (Content-Length or chunked framing;
    head_only[i]: the i-th answers a HEAD, so it has no body)."""
    found: list[Response] = []
    while True:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            return found
        status_line, *lines = head.decode("latin-1").split("\r\n")
        version, _, status_reason = status_line.partition(" ")
        status, _, reason = status_reason.partition(" ")
        headers = {}
        for line in lines:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        index = len(found)
        if index < len(head_only) and head_only[index]:
            body = b""
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while True:
                size_line, sep, rest = rest.partition(b"\r\n")
                if not sep:
                    return found
                size = int(size_line.split(b";")[0], 16)
                if len(rest) < size + 2:
                    return found
                body, rest = body + rest[:size], rest[size + 2:]
                if size == 0:
                    break
        elif "content-length" in headers:
            size = int(headers["content-length"])
            if len(rest) < size:
                return found
            body, rest = rest[:size], rest[size:]
        else:  # ends with the connection
            body, rest = rest, b""
        found.append(Response(int(status), reason, headers, body))
        data = rest


async def request(port: int, raw: bytes, source: str = HEALTHY, responses: int = 1,
                  head_only: tuple[bool, ...] = (), timeout: float = PROBE_TIMEOUT) -> list[Response]:
    """Send raw request bytes and wait for `responses` complete answers (or
    the connection's end); the connection is then closed."""
    conn = await connect(port, source)
    conn.send(raw)
    try:
        await conn.wait_for(lambda: conn.is_closed or len(parse_responses(conn.received, head_only)) >= responses,
                            timeout)
    finally:
        conn.close()
    return parse_responses(conn.received, head_only)


async def get(port: int, path: str, headers: Optional[dict[str, str]] = None, source: str = HEALTHY,
              method: str = "GET", timeout: float = PROBE_TIMEOUT) -> Response:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")
    found = await request(port, raw, source, 1, (method == "HEAD",), timeout)
    if not found:
        raise AssertionError(f"no complete answer to {method} {path}")
    return found[0]


# -- the daemon ------------------------------------------------------------------


class _Child(ProcessProtocol):
    transport: IProcessTransport  # (Twisted types it Optional)

    def __init__(self) -> None:
        self.output = b""
        self.ended: defer.Deferred = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(reason.value)


class AbuseDaemon:
    """`twistd -n eventstreams` in a child process on free loopback ports,
    over the embedded log (support.BASE_CONFIG plus `extra`)."""

    def __init__(self, directory: str, extra: str = "", overrides: tuple[str, ...] = (), nofile: int = 0) -> None:
        self.nofile = nofile  # 0: the inherited open-files limit
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        self.config = write_config(directory, extra)
        self.log_path = os.path.join(directory, "daemon.log")
        self.ports = {"api": free_port(), "intake": free_port()}
        self.args = ["-c", self.config,
                     "--set", f"eventstreams.listen=tcp:{self.ports['api']}:interface=127.0.0.1",
                     "--set", f"intake.listen=tcp:{self.ports['intake']}:interface=127.0.0.1",
                     "--set", "metrics.listen=none"]
        for item in overrides:
            self.args += ["--set", item]
        self.child = _Child()
        self.process: Any = None

    @classmethod
    async def start(cls, case: Any, extra: str = "", overrides: tuple[str, ...] = (),
                    nofile: int = 0) -> "AbuseDaemon":
        """Start a daemon for a trial test case; it is killed in the case's cleanup."""
        daemon = cls(os.path.abspath(case.mktemp()), extra, overrides, nofile)
        daemon.spawn()
        case.addCleanup(lambda: defer.ensureDeferred(daemon.stop()))
        await daemon.wait_ready()
        return daemon

    def spawn(self) -> None:
        argv = [sys.executable, "-c", RUN_TWISTD, str(self.nofile), "-n", "--pidfile=", "--logfile", self.log_path,
                "eventstreams", *self.args]
        self.process = reactor.spawnProcess(self.child, sys.executable, argv, env=dict(os.environ), path=REPO)

    async def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.child.ended.called:
                raise AssertionError(f"the daemon exited: {self.child.output[-2000:]!r}\n{self.log()[-3000:]}")
            try:
                if (await get(self.ports["api"], "/_info", timeout=2)).status == 200:
                    return
            except (error.ConnectError, TimeoutError, AssertionError, ConnectionError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"the daemon did not answer within {START_TIMEOUT} s:\n{self.log()[-3000:]}")
            await sleep(0.1)

    async def stop(self) -> None:
        if self.process is None or self.child.ended.called:
            return
        try:
            self.process.signalProcess("TERM")
        except error.ProcessExitedAlready:
            return
        deadline = reactor.callLater(10, lambda: self.child.ended.called or self.process.signalProcess("KILL"))
        await self.child.ended
        if deadline.active():
            deadline.cancel()

    @property
    def port(self) -> int:
        return self.ports["api"]

    def rss_mib(self) -> float:
        """The daemon's resident memory now."""
        with open(f"/proc/{self.process.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))

    def log(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def log_lines(self, containing: str) -> list[str]:
        return [line for line in self.log().splitlines() if containing in line]

    def check_log(self, case: Any) -> None:
        """No traceback, no unhandled error in the daemon's log."""
        text = self.log()
        for marker in ("Traceback", "Unhandled Error", "Unhandled error"):
            if marker in text:
                at = text.index(marker)
                case.fail(f"the daemon logged {marker!r}:\n{text[max(0, at - 500):at + 2500]}")

    async def post_events(self, events: list[dict]) -> None:
        body = json.dumps(events).encode()
        raw = (b"POST /v1/events HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n" % len(body)) + body
        found = await request(self.ports["intake"], raw)
        if not found or found[0].status not in (201, 202):
            raise AssertionError(f"the intake refused events: {found}")


# -- the healthy side --------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Window:
    """What the healthy clients saw during one measurement."""

    latencies: list[float] = field(default_factory=list)  # feed event: written → received (s)
    probes: list[float] = field(default_factory=list)  # /_info round trips (s)
    failed_probes: int = 0
    rss_mib: list[float] = field(default_factory=list)

    @property
    def p50(self) -> float:
        return percentile(self.latencies, 0.5)

    @property
    def p99(self) -> float:
        return percentile(self.latencies, 0.99)

    @property
    def probe_p50(self) -> float:
        return percentile(self.probes, 0.5)

    def __str__(self) -> str:
        return (f"{len(self.latencies)} events p50 {self.p50 * 1000:.1f} ms p99 {self.p99 * 1000:.1f} ms; "
                f"{len(self.probes)} probes p50 {self.probe_p50 * 1000:.1f} ms, {self.failed_probes} failed; "
                f"RSS {min(self.rss_mib, default=0):.0f}-{max(self.rss_mib, default=0):.0f} MiB")


class _TimedStream(StreamClient):
    """A stream client that hands each new event to on_event as it arrives."""

    on_event: Callable[[dict], None] = staticmethod(lambda event: None)
    _seen = 0

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        events = [b for b in self.blocks[self._seen:] if b.get("event") == "message"]
        self._seen = len(self.blocks)
        for block in events:
            self.on_event(json.loads(block["data"]))


class Healthy:
    """A feed written through the intake at `rate` events/s, one SSE client
    of it, and a /_info probe every `probe_interval` s, all from 127.0.0.1."""

    def __init__(self, daemon: AbuseDaemon, rate: float = 20.0, probe_interval: float = 0.2) -> None:
        self.daemon = daemon
        self.rate = rate
        self.probe_interval = probe_interval
        self.window: Optional[Window] = None
        self.received = 0
        self.sent = 0
        self.stream: Optional[_TimedStream] = None
        self._feed = LoopingCall(self._post)
        self._probe = LoopingCall(self._probe_once)
        self._posting = False
        self._probing = False

    @classmethod
    async def start(cls, daemon: AbuseDaemon, **kwargs: Any) -> "Healthy":
        healthy = cls(daemon, **kwargs)
        stream = _TimedStream("/v2/stream/test", {})
        stream.on_event = healthy._on_event
        await connect(daemon.port, HEALTHY, stream)
        await stream.head_received
        assert stream.status == 200, stream.status
        healthy.stream = stream
        healthy._feed.start(1 / healthy.rate, now=True)
        healthy._probe.start(healthy.probe_interval, now=True)
        await healthy.wait_for(lambda: healthy.received > 0, "the first event")
        return healthy

    def _on_event(self, event: dict) -> None:
        self.received += 1
        if self.window is not None and "sent" in event:
            self.window.latencies.append(time.time() - event["sent"])

    def _post(self) -> None:
        if self._posting:  # one post at a time: a stalled intake must not pile up posts
            return
        self._posting = True
        self.sent += 1
        event = {"meta": {"stream": "test"}, "sent": time.time(), "n": self.sent}

        def done(result: Any) -> None:
            self._posting = False

        defer.ensureDeferred(self.daemon.post_events([event])).addErrback(lambda f: None).addBoth(done)

    def _probe_once(self) -> None:
        if self._probing:
            return
        self._probing = True
        started = time.monotonic()

        async def probe() -> None:
            try:
                ok = (await get(self.daemon.port, "/_info", timeout=PROBE_TIMEOUT)).status == 200
            except Exception:
                ok = False
            window = self.window
            if window is not None:
                if ok:
                    window.probes.append(time.monotonic() - started)
                else:
                    window.failed_probes += 1
                window.rss_mib.append(self.daemon.rss_mib())
            self._probing = False

        defer.ensureDeferred(probe())

    async def wait_for(self, predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await sleep(0.05)

    async def measure(self, seconds: float) -> Window:
        """Collect a window of `seconds` (then wait for the probe in flight)."""
        window = self.window = Window()
        await sleep(seconds)
        await self.wait_for(lambda: not self._probing, "the last probe", PROBE_TIMEOUT + 5)
        self.window = None
        return window

    def stop(self) -> None:
        for loop in (self._feed, self._probe):
            if loop.running:
                loop.stop()
        if self.stream is not None and self.stream.transport is not None:
            self.stream.transport.abortConnection()


def check_healthy(case: Any, quiet: Window, during: Window, factor: float = 20.0,
                  max_growth_mib: float = 100.0) -> None:
    """The healthy clients kept being served during the attack: every probe
    answered, events kept arriving, and the median latencies stayed within
    `factor` times the quiet ones (ratios of one run; the floor of 20 ms
    keeps a sub-millisecond quiet figure from making the bound pure noise);
    the daemon's RSS grew by less than `max_growth_mib`."""
    where = f"quiet: {quiet}\nduring: {during}"
    if quiet.rss_mib and during.rss_mib:
        case.assertLess(max(during.rss_mib) - min(quiet.rss_mib), max_growth_mib, f"RSS growth\n{where}")
    case.assertEqual(during.failed_probes, 0, f"/_info probes went unanswered\n{where}")
    case.assertTrue(during.probes, f"no /_info probe completed\n{where}")
    case.assertTrue(during.latencies, f"the healthy stream received nothing\n{where}")
    case.assertLessEqual(during.p50, factor * max(quiet.p50, 0.02), f"stream latency\n{where}")
    case.assertLessEqual(during.probe_p50, factor * max(quiet.probe_p50, 0.02), f"/_info latency\n{where}")
