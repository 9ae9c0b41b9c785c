"""Hostile IRC clients against the real daemon (`twistd -n eventstreams` as a
child process, issue 12): while the attack runs, a healthy client must not
notice. Each test measures a quiet baseline first and then, during the attack:
`/_info` on the SSE port answers every probe and within a generous ratio of
its quiet latency; an IRC client in a channel keeps receiving the bot's
lines, again within a ratio of its quiet latency; the daemon's RSS stays
bounded; its log holds no traceback."""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Any, cast

from twisted.internet import defer, error, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.python import log
from twisted.python.failure import Failure

from eventstreams.transports import ITCPConnection

from .support import async_test, free_port, sleep, write_config
from .test_daemon import REPO, Child, DaemonTestCase
from .test_irc import RawIRC

PROBE_TIMEOUT = 5.0  # a probe not answered within this is a failure (the reactor stalled)
RATIO = 20  # generous: the machine is shared and noisy
FLOOR = 0.005  # seconds; quiet latencies below this are timer noise
MAX_GROWTH = 50 * 2**20  # bytes of RSS an attack may add (before the fix: 90-230 MiB)
CHANNELS = 20  # channels the bot has written to: each LIST answers all of them


class _HTTP(Protocol):
    transport: ITCPConnection  # (Twisted types it Optional[ITransport])

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.data = b""
        self.done: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.done.callback(self.data)


async def http(port: int, method: str, path: str, body: bytes = b"", timeout: float = PROBE_TIMEOUT) -> tuple[int, bytes]:
    """One HTTP/1.0-style request (Connection: close); raises on timeout."""
    head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    protocol = _HTTP(head + body)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=timeout)
    await endpoint.connect(ClientFactory.forProtocol(lambda: protocol))
    call = reactor.callLater(timeout, protocol.transport.abortConnection)
    data = await protocol.done
    if not call.active():
        raise TimeoutError(f"{method} {path} not answered within {timeout} s")
    call.cancel()
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def event(n: int, host: str = "en.wikipedia.org") -> dict:
    return {"$schema": "/mediawiki/recentchange/1.0.0", "meta": {"stream": "mediawiki.recentchange", "domain": host},
            "type": "edit", "namespace": 0, "title": f"T{n}", "user": "U", "bot": False,
            "server_name": host, "comment": f"sent:{time.time():.6f}"}


class IRCAbuseTestCase(DaemonTestCase):
    timeout = 120

    async def start(self, *sets: str) -> Child:
        self.api, self.intake, metrics, self.irc = free_port(), free_port(), free_port(), free_port()
        directory = os.path.abspath(self.mktemp())
        path = write_config(directory, f"\n[irc]\nlisten = tcp:{self.irc}:interface=127.0.0.1\n")
        overrides = ["--set", f"eventstreams.listen=tcp:{self.api}:interface=127.0.0.1",
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
        status, body = await http(self.intake, "POST", "/v1/events", json.dumps(events).encode(), timeout=30)
        self.assertEqual(status, 201, body)

    async def irc_client(self, nick: str = "healthy") -> "TimedIRC":
        client = TimedIRC()
        await TCP4ClientEndpoint(reactor, "127.0.0.1", self.irc).connect(ClientFactory.forProtocol(lambda: client))
        self.addCleanup(lambda: None if client.done else client.transport.abortConnection())
        client.send(f"NICK {nick}", f"USER {nick} 0 * :A healthy bot")
        await client.wait_line(0, lambda line: " 376 " in line or " 422 " in line)
        return client

    async def healthy_in_channel(self) -> "TimedIRC":
        """Channels for LIST to answer, and a client in #en.wikipedia."""
        await self.post([event(0, f"w{n}.wikipedia.org") for n in range(CHANNELS - 1)] + [event(0)])
        client = await self.irc_client()
        deadline = time.monotonic() + 10
        while True:
            start = len(client.lines)
            client.send("JOIN #en.wikipedia")
            await client.wait_line(start, lambda line: " 366 " in line or " 403 " in line)
            if any(" 366 " in line for line in client.lines[start:]):
                return client
            self.assertLess(time.monotonic(), deadline, "the channel never appeared")
            await sleep(0.1)

    async def measure(self, client: "TimedIRC", seconds: float) -> dict[str, Any]:
        """For `seconds`: /_info probes one after another, a bot line posted
        every 0.1 s, the daemon's RSS sampled; latencies and the peak RSS."""
        pid = self.child.transport.pid
        probes: list[float] = []
        failures: list[str] = []
        peak = rss(pid)
        stop = time.monotonic() + seconds
        start_line = len(client.lines)
        posted = 0

        async def probe() -> None:
            while time.monotonic() < stop:
                began = time.monotonic()
                try:
                    status, _ = await http(self.api, "GET", "/_info")
                    self.assertEqual(status, 200)
                    probes.append(time.monotonic() - began)
                except (TimeoutError, error.ConnectError) as e:
                    failures.append(str(e))
                await sleep(0.02)

        async def publish() -> None:
            nonlocal posted
            while time.monotonic() < stop:
                try:
                    await self.post([event(posted)])
                except TimeoutError as e:
                    failures.append(f"intake: {e}")
                    continue
                posted += 1
                await sleep(0.1)

        async def memory() -> None:
            nonlocal peak
            while time.monotonic() < stop:
                peak = max(peak, rss(pid))
                await sleep(0.1)

        cpu = cpu_seconds(pid)
        await defer.gatherResults([defer.ensureDeferred(f()) for f in (probe, publish, memory)],
                                  consumeErrors=True)
        log.msg(f"daemon CPU: {(cpu_seconds(pid) - cpu) / seconds:.0%} of a core, RSS peak {peak / 2**20:.0f} MiB, "
                f"failures {failures}")
        self.assertEqual(failures, [], "the daemon stopped answering")
        await client.wait_for(lambda: sum("PRIVMSG" in line for line in client.lines[start_line:]) >= posted,
                              timeout=PROBE_TIMEOUT)
        return {"probes": probes, "failures": failures, "peak": peak, "lines": line_latencies(client, start_line),
                "posted": posted}

    def assertHealthy(self, quiet: dict[str, Any], attacked: dict[str, Any]) -> None:
        log.msg(format="%(test)s: /_info median %(q).1f -> %(a).1f ms, IRC line median %(ql).1f -> %(al).1f ms, "
                "RSS peak %(qr).0f -> %(ar).0f MiB", test=self.id(),
                q=statistics.median(quiet["probes"]) * 1000, a=statistics.median(attacked["probes"]) * 1000,
                ql=statistics.median(quiet["lines"]) * 1000, al=statistics.median(attacked["lines"]) * 1000,
                qr=quiet["peak"] / 2**20, ar=attacked["peak"] / 2**20)
        for key, what in (("probes", "/_info"), ("lines", "IRC line")):
            before = max(statistics.median(quiet[key]), FLOOR)
            during = statistics.median(attacked[key])
            self.assertLess(during, RATIO * before,
                            f"{what} latency during the attack {during * 1000:.1f} ms, quiet {before * 1000:.1f} ms")
        self.assertEqual(len(attacked["lines"]), attacked["posted"], "the healthy IRC client lost lines")
        growth = attacked["peak"] - quiet["peak"]
        self.assertLess(growth, MAX_GROWTH, f"RSS grew by {growth / 2**20:.0f} MiB during the attack")


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
        self._check()


class CommandFlood(IRCAbuseTestCase):
    @async_test
    async def test_registered_clients_flooding_list_without_reading(self):
        """10 clients, each 64 KiB of `LIST\\r\\n`, never reading (issue 12 item 1)."""
        await self.start()
        client = await self.healthy_in_channel()
        quiet = await self.measure(client, 3)
        attacker = self.attack("run_irc_flood", 6, 10)
        attacked = await self.measure(client, 6)
        counts = json.loads((await self.finish(attacker, 30)).out)
        log.msg(f"attack counts: {counts}")
        self.assertGreater(counts["bytes_sent"], 0)
        self.assertHealthy(quiet, attacked)
        self.assertFalse(client.done, "the healthy client was dropped")


class NoNewline(IRCAbuseTestCase):
    @async_test
    async def test_clients_sending_megabytes_without_a_newline(self):
        """Bounded buffering: a line that never ends costs 512 bytes."""
        await self.start()
        client = await self.healthy_in_channel()
        quiet = await self.measure(client, 3)
        senders = [await self.flooder() for _ in range(10)]
        chunk = b"PRIVMSG x :" + b"y" * 65536

        def feed() -> None:
            for sender in senders:
                if not sender.done and sender.sent < 8 * 2**20:  # bounded on our side too
                    sender.transport.write(chunk)
            if time.monotonic() < stop:
                calls.append(reactor.callLater(0.01, feed))

        stop = time.monotonic() + 6
        calls: list[Any] = []
        self.addCleanup(lambda: [call.cancel() for call in calls if call.active()])
        feed()
        attacked = await self.measure(client, 6)
        sent = sum(s.sent for s in senders)
        self.assertHealthy(quiet, attacked)
        self.assertGreater(sent, 0)

    async def flooder(self) -> "Flooder":
        sender = Flooder()
        await TCP4ClientEndpoint(reactor, "127.0.0.1", self.irc).connect(ClientFactory.forProtocol(lambda: sender))
        self.addCleanup(lambda: None if sender.done else sender.transport.abortConnection())
        return sender


class Flooder(Protocol):
    transport: ITCPConnection  # (Twisted types it Optional[ITransport])

    done = False
    sent = 0

    def connectionMade(self) -> None:
        self.transport.pauseProducing()  # never reads
        original = self.transport.write

        def write(data: bytes) -> None:
            self.sent += len(data)
            original(data)

        cast(Any, self.transport).write = write  # counts what goes out
        write(b"NICK nonl\r\nUSER nonl 0 * :x\r\n")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.done = True


class ConnectionFlood(IRCAbuseTestCase):
    @async_test
    async def test_many_idle_connections_from_one_address_are_capped(self):
        """Connections that never register: the per-address cap refuses the
        excess at once and the registration deadline ends the others."""
        await self.start("irc.max_clients_per_address=30", "irc.registration_timeout=2")
        client = await self.healthy_in_channel()
        quiet = await self.measure(client, 3)
        idle: list[RawIRC] = []

        def abort(c: RawIRC) -> None:
            if not c.done:
                c.transport.abortConnection()

        async def open_idle() -> None:
            for _ in range(200):
                c = RawIRC()
                await TCP4ClientEndpoint(reactor, "127.0.0.1", self.irc).connect(ClientFactory.forProtocol(lambda: c))  # noqa: B023 (used at once)
                idle.append(c)
                self.addCleanup(abort, c)

        opening = defer.ensureDeferred(open_idle())
        attacked = await self.measure(client, 4)
        await opening
        self.assertHealthy(quiet, attacked)
        refused = [c for c in idle if c.lines == ["ERROR :Closing Link: (Too many connections from your address)"]]
        self.assertGreaterEqual(len(refused), 200 - 30)
        await defer.gatherResults([c.wait_for(lambda c=c: c.done, timeout=10) for c in idle])
        self.assertTrue(all(c.lines[-1].startswith("ERROR :Closing Link: (") for c in idle))
        self.assertIn("ERROR :Closing Link: (Registration timed out)", [c.lines[-1] for c in idle])
        self.assertFalse(client.done)

