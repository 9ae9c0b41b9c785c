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

Used by tests/test_abuse.py; the HTTP attacks are measured so:

    daemon = await AbuseDaemon.start(self, extra=...)
    healthy = await Healthy.start(daemon)
    quiet = await healthy.measure(3)
    ... start the attack ...
    during = await healthy.measure(5)
    check_healthy(self, quiet, during)
    daemon.check_log(self)

The sections at the end hold the IRC and RCStream cases' harnesses (a
daemon with the bridge, a healthy client of that protocol, the attack from
bench/attacks_*.py in a process of its own).
"""
from __future__ import annotations

import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, cast

from twisted.internet import defer, error, reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import ClientFactory, ProcessProtocol, Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThread
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.python import log
from twisted.python.failure import Failure

from bench.attacks_rcstream import _eio4
from eventstreams.transports import ITCPConnection

from .rcstream_clients import ROOT
from .support import StreamClient, Waiters, free_port, rc_event, sleep, write_config
from .test_daemon import Child, DaemonTestCase
from .test_irc import RawIRC
from .test_rcstream import RCStreamCase, close_handshake_timers

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


class Raw(Waiters, Protocol):
    """A connection whose bytes the test writes and reads as they are."""

    transport: ITCPConnection  # (Twisted types it Optional[ITransport])
    wait_timeout = PROBE_TIMEOUT
    timeout_error = TimeoutError

    def __init__(self) -> None:
        super().__init__()
        self.received = b""
        self.closed: defer.Deferred = defer.Deferred()
        self.connected_at = time.monotonic()
        self.closed_at: Optional[float] = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self._check_waiters()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed_at = time.monotonic()
        self.closed.callback(None)
        self._check_waiters()

    @property
    def is_closed(self) -> bool:
        return self.closed_at is not None

    def send(self, data: bytes) -> None:
        if not self.is_closed:
            self.transport.write(data)

    def progress(self) -> str:
        return f"received {self.received[-300:]!r}"

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

# -- IRC (the [irc] bridge's listener) ------------------------------------------------
#
# The daemon in a child process (test_daemon.DaemonTestCase); attacks from
# bench/attacks_irc.py in a process of their own; a healthy IRC client in a
# channel and /_info probes, measured quiet and then under attack.

IRC_PROBE_TIMEOUT = 5.0  # a probe not answered within this is a failure (the reactor stalled)
IRC_RATIO = 20  # generous: the machine is shared and noisy
IRC_FLOOR = 0.005  # seconds; quiet latencies below this are timer noise
IRC_MAX_GROWTH = 50 * 2**20  # bytes of RSS an attack may add (before the fix: 90-230 MiB)
IRC_CHANNELS = 20  # channels the bot has written to: each LIST answers all of them


async def http_call(port: int, method: str, path: str, body: bytes = b"", timeout: float = IRC_PROBE_TIMEOUT) -> tuple[int, bytes]:
    """One request (Connection: close); TimeoutError when not answered in time."""
    head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    found = await request(port, head + body, timeout=timeout)
    if not found:
        raise TimeoutError(f"{method} {path} not answered")
    return found[0].status, found[0].body


def rss_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def irc_event(n: int, host: str = "en.wikipedia.org") -> dict:
    return {"$schema": "/mediawiki/recentchange/1.0.0", "meta": {"stream": "mediawiki.recentchange", "domain": host},
            "type": "edit", "namespace": 0, "title": f"T{n}", "user": "U", "bot": False,
            "server_name": host, "comment": f"sent:{time.time():.6f}"}


class IRCAbuseTestCase(DaemonTestCase):
    timeout = 120

    async def start(self, *sets: str) -> Child:
        self.api, self.intake, metrics, self.irc = free_port(), free_port(), free_port(), free_port()
        directory = os.path.abspath(self.mktemp())
        path = write_config(directory, f"\n[irc]\nlisten = tcp:{self.irc}:interface=127.0.0.1\n")
        # (request_rate_per_ip off: /_info is probed back to back from one
        # address to catch any stall, which the HTTP request rate would refuse)
        overrides = ["--set", f"eventstreams.listen=tcp:{self.api}:interface=127.0.0.1",
                     "--set", "eventstreams.request_rate_per_ip=0",
                     "--set", f"intake.listen=tcp:{self.intake}:interface=127.0.0.1",
                     "--set", f"metrics.listen=tcp:{metrics}:interface=127.0.0.1",
                     "--set", "intake.max_body=4M"]
        for item in sets:
            overrides += ["--set", item]
        self.child = self.spawn("-c", path, *overrides)
        await self.wait_listening(self.child, self.api)
        await self.wait_listening(self.child, self.irc)
        self.addCleanup(self.no_traceback)
        return self.child

    def attack(self, function: str, *args: Any) -> Child:
        """bench.attacks_irc.FUNCTION(host, port, *args) in a process of its own
        (not in this one: the attack must not slow the healthy clients' side);
        its counts are the child's output (JSON)."""
        child = Child()
        code = (f"import json; from bench.attacks_irc import {function}; "
                f"print(json.dumps({function}('127.0.0.1', {self.irc}, *{args!r})))")
        process = reactor.spawnProcess(child, sys.executable, [sys.executable, "-c", code], env=dict(os.environ),
                                       path=REPO)
        self.addCleanup(lambda: None if child.ended.called else process.signalProcess("KILL"))
        return child

    def no_traceback(self) -> None:
        self.assertNotIn("Traceback", self.child.output, self.child.output[-3000:])

    async def post(self, events: list[dict]) -> None:
        status, body = await http_call(self.intake, "POST", "/v1/events", json.dumps(events).encode(), timeout=30)
        self.assertEqual(status, 201, body)

    async def irc_client(self, nick: str = "healthy") -> "TimedIRC":
        client = TimedIRC()
        await TCP4ClientEndpoint(reactor, "127.0.0.1", self.irc).connect(ClientFactory.forProtocol(lambda: client))
        self.addCleanup(lambda: None if client.done else client.transport.abortConnection())
        client.send(f"NICK {nick}", f"USER {nick} 0 * :A healthy bot")
        await client.wait_line(0, lambda line: " 376 " in line or " 422 " in line)
        return client

    async def healthy_in_channel(self) -> "TimedIRC":
        """Channels for LIST to answer, and a client in #en.wikipedia. The
        bridge follows the stream from when its feed has started, which the
        listening ports do not tell: the channels' events are posted again
        (without a `sent:` time, so no latency counts them) until the
        channel is there."""
        channels = [irc_event(0, f"w{n}.wikipedia.org") for n in range(IRC_CHANNELS - 1)] + [irc_event(0)]
        await self.post(channels)
        client = await self.irc_client()
        deadline = time.monotonic() + 10
        posted = time.monotonic()
        while True:
            start = len(client.lines)
            client.send("JOIN #en.wikipedia")
            await client.wait_line(start, lambda line: " 366 " in line or " 403 " in line)
            if any(" 366 " in line for line in client.lines[start:]):
                return client
            self.assertLess(time.monotonic(), deadline, "the channel never appeared")
            if time.monotonic() - posted > 1:
                await self.post([dict(event, comment="again") for event in channels])
                posted = time.monotonic()
            await sleep(0.1)

    async def measure(self, client: "TimedIRC", seconds: float) -> dict[str, Any]:
        """For `seconds`: /_info probes one after another, a bot line posted
        every 0.1 s, the daemon's RSS sampled; latencies and the peak RSS."""
        pid = self.child.transport.pid
        probes: list[float] = []
        failures: list[str] = []
        peak = rss_of(pid)
        stop = time.monotonic() + seconds
        start_line = len(client.lines)
        posted = 0

        async def probe() -> None:
            while time.monotonic() < stop:
                began = time.monotonic()
                try:
                    status, _ = await http_call(self.api, "GET", "/_info")
                    self.assertEqual(status, 200)
                    probes.append(time.monotonic() - began)
                except (TimeoutError, error.ConnectError) as e:
                    failures.append(str(e))
                await sleep(0.02)

        async def publish() -> None:
            nonlocal posted
            while time.monotonic() < stop:
                try:
                    await self.post([irc_event(posted)])
                except TimeoutError as e:
                    failures.append(f"intake: {e}")
                    continue
                posted += 1
                await sleep(0.1)

        async def memory() -> None:
            nonlocal peak
            while time.monotonic() < stop:
                peak = max(peak, rss_of(pid))
                await sleep(0.1)

        cpu = cpu_seconds(pid)
        await defer.gatherResults([defer.ensureDeferred(f()) for f in (probe, publish, memory)],
                                  consumeErrors=True)
        log.msg(f"daemon CPU: {(cpu_seconds(pid) - cpu) / seconds:.0%} of a core, RSS peak {peak / 2**20:.0f} MiB, "
                f"failures {failures}")
        self.assertEqual(failures, [], "the daemon stopped answering")
        await client.wait_for(lambda: sum("PRIVMSG" in line for line in client.lines[start_line:]) >= posted,
                              timeout=IRC_PROBE_TIMEOUT)
        return {"probes": probes, "failures": failures, "peak": peak, "lines": line_latencies(client, start_line),
                "posted": posted}

    def assertHealthy(self, quiet: dict[str, Any], attacked: dict[str, Any]) -> None:
        log.msg(format="%(test)s: /_info median %(q).1f -> %(a).1f ms, IRC line median %(ql).1f -> %(al).1f ms, "
                "RSS peak %(qr).0f -> %(ar).0f MiB", test=self.id(),
                q=statistics.median(quiet["probes"]) * 1000, a=statistics.median(attacked["probes"]) * 1000,
                ql=statistics.median(quiet["lines"]) * 1000, al=statistics.median(attacked["lines"]) * 1000,
                qr=quiet["peak"] / 2**20, ar=attacked["peak"] / 2**20)
        for key, what in (("probes", "/_info"), ("lines", "IRC line")):
            before = max(statistics.median(quiet[key]), IRC_FLOOR)
            during = statistics.median(attacked[key])
            self.assertLess(during, IRC_RATIO * before,
                            f"{what} latency during the attack {during * 1000:.1f} ms, quiet {before * 1000:.1f} ms")
        self.assertEqual(len(attacked["lines"]), attacked["posted"], "the healthy IRC client lost lines")
        growth = attacked["peak"] - quiet["peak"]
        self.assertLess(growth, IRC_MAX_GROWTH, f"RSS grew by {growth / 2**20:.0f} MiB during the attack")


def line_latencies(client: "TimedIRC", start: int) -> list[float]:
    """Per bot line: when it arrived minus when its event was posted."""
    return [client.arrivals[i] - float(line.rsplit("sent:", 1)[1].split("\x03")[0])
            for i, line in enumerate(client.lines[start:], start) if "PRIVMSG" in line and "sent:" in line]


class TimedIRC(RawIRC):
    """RawIRC that also records when each line arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.arrivals: list[float] = []

    def dataReceived(self, data: bytes) -> None:
        before = len(self.lines)
        now = time.time()
        self.buffer += data
        *complete, self.buffer = self.buffer.split(b"\r\n")
        self.lines += [line.decode("utf-8") for line in complete]
        self.arrivals += [now] * (len(self.lines) - before)
        self._check_waiters()


# -- RCStream (Socket.IO / Engine.IO) -----------------------------------------------
#
# The daemon in this process (test_rcstream.RCStreamCase), the attack in a
# subprocess (bench/attacks_rcstream.py), and beside it a healthy Engine.IO 4
# WebSocket client subscribed to `*` and a /_info prober, in threads.

RC_RATIO = 20  # how much worse than quiet the healthy client may fare under attack
RC_FLOOR = 0.05  # the least baseline: quiet loopback figures of a few ms make ratios noise
MiB = 1 << 20


def own_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def p90(values: list[float]) -> float:
    values = sorted(values)
    return values[int(len(values) * 0.9)] if values else 0.0


class RCStreamHealthy:
    """A feed of one change every 0.1 s, an EIO4 WebSocket client of `*`
    and a `/_info` prober (threads: they see the reactor from outside), and
    RSS samples. Phases are marked by time; figures are taken per phase."""

    def __init__(self, d: Any):
        self.d = d
        self.sent: dict[int, float] = {}
        self.received: dict[int, float] = {}
        self.probes: list[tuple[float, float]] = []  # (start, latency)
        self.rss: list[tuple[float, int]] = []
        self.stop = threading.Event()
        self.n = 0
        self.ws = _eio4("127.0.0.1", d.ports["api"], None)
        self.ws.send('42/rc,1["subscribe","*"]')
        self.feed = LoopingCall(self._append)
        self.threads = [threading.Thread(target=self._client, daemon=True),
                        threading.Thread(target=self._probe, daemon=True)]

    async def start(self) -> None:
        for thread in self.threads:
            thread.start()
        bridge = self.d.service.rcstream
        for _ in range(200):
            if any(s.subscriptions for s in bridge.sessions.values()):
                break
            await sleep(0.05)
        self.feed.start(0.1)

    def _append(self) -> None:
        self.n += 1
        self.sent[self.n] = time.monotonic()
        ensureDeferred(self.d.append(self.d.rc[0], [rc_event(self.n)]))

    def _client(self) -> None:
        self.ws.sock.settimeout(1)
        while not self.stop.is_set():
            try:
                text = self.ws.recv()
            except OSError:
                continue
            if text is None:
                return
            if text.startswith('42/rc,["change",'):
                self.received[json.loads(text[len("42/rc,"):])[1]["id"]] = time.monotonic()

    def _probe(self) -> None:
        port = self.d.ports["api"]
        while not self.stop.is_set():
            start = time.monotonic()
            self.rss.append((start, own_rss()))
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            try:
                connection.request("GET", "/_info")
                response = connection.getresponse()
                response.read()
                ok = response.status == 200
            except OSError:
                ok = False
            finally:
                connection.close()
            self.probes.append((start, time.monotonic() - start if ok else float("inf")))
            self.stop.wait(0.1)

    async def close(self) -> None:
        if self.feed.running:
            self.feed.stop()
        self.stop.set()
        self.ws.close()

        def join() -> None:
            for t in self.threads:
                t.join(10)

        await deferToThread(join)

    def latencies(self, start: float, end: float) -> list[float]:
        """Delivery latency of the changes sent in [start, end); a change
        not received counts as infinitely late."""
        return [self.received.get(n, float("inf")) - t for n, t in self.sent.items() if start <= t < end]

    def probe_latencies(self, start: float, end: float) -> list[float]:
        return [latency for t, latency in self.probes if start <= t < end]

    def peak_rss(self, start: float, end: float) -> int:
        return max((value for t, value in self.rss if start <= t < end), default=0)


class RCStreamAbuseCase(RCStreamCase):
    timeout = 240

    def setUp(self) -> None:
        self.failures: list[str] = []

        def observe(event: dict) -> None:
            if event.get("log_failure") is not None or event.get("isError"):
                failure = event.get("log_failure")
                self.failures.append(str(failure.getTraceback() if failure else event)[-2000:])

        observer = cast(ILogObserver, observe)  # (any callable of an event is one)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        # After the test's own cleanups (newest run first): the attacks' WebSockets close in
        # this process's daemon, and autobahn's close-handshake timers outlive them.
        self.addCleanup(lambda: ensureDeferred(close_handshake_timers()))

    async def attack(self, d: Any, name: str, arg: Any) -> dict:
        """Run bench/attacks_rcstream.py's attack in a process of its own,
        from ATTACKER (the healthy clients' per-address limits are theirs)."""
        argv = [sys.executable, "-m", "bench.attacks_rcstream", name, "127.0.0.1", str(d.ports["api"]), str(arg),
                ATTACKER]
        result = await deferToThread(subprocess.run, argv, cwd=str(ROOT), capture_output=True, text=True,
                                     timeout=180)
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        return json.loads(result.stdout)

    async def healthy(self, d: Any, quiet: float = 3.0) -> tuple[RCStreamHealthy, float]:
        """A started healthy client and the start of its `quiet` seconds of baseline."""
        h = await deferToThread(RCStreamHealthy, d)
        self.addCleanup(lambda: ensureDeferred(h.close()))
        await h.start()
        quiet_start = time.monotonic()
        await sleep(quiet)
        return h, quiet_start

    async def check(self, h: RCStreamHealthy, quiet_start: float, start: float, rss_slack: int) -> dict:
        """The healthy client's experience from `start` on against its quiet
        baseline before it; returns the figures (for the failure message)."""
        await sleep(max(1.5, start + 4 - time.monotonic()))  # the last changes of the attack arrive
        end = time.monotonic() - 1
        quiet_changes, changes = h.latencies(quiet_start, start), h.latencies(start, end)
        quiet_info, info = h.probe_latencies(quiet_start, start), h.probe_latencies(start, end)
        baseline = max(p90(quiet_changes), p90(quiet_info), RC_FLOOR)
        figures = {
            "baseline_s": round(baseline, 3),
            "changes_quiet": len(quiet_changes), "changes_attack": len(changes),
            "change_max_s": round(max(changes, default=0), 3),
            "info_probes": len(info), "info_max_s": round(max(info, default=0), 3),
            "rss_quiet_MiB": h.peak_rss(quiet_start, start) // MiB,
            "rss_attack_MiB": h.peak_rss(start, end + 1) // MiB,
        }
        self.assertGreater(len(quiet_changes), 5, figures)
        self.assertLess(max(quiet_changes), float("inf"), figures)
        self.assertGreater(len(changes), 5, figures)
        self.assertLessEqual(max(changes), RC_RATIO * baseline, figures)  # includes: none lost
        self.assertGreater(len(info), 3, figures)
        self.assertLessEqual(max(info), RC_RATIO * baseline, figures)
        self.assertLess(h.peak_rss(start, end + 1) - h.peak_rss(quiet_start, start), rss_slack, figures)
        self.assertEqual(self.failures, [])
        return figures
