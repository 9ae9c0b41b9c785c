"""The real daemon: `twistd -n eventstreams` as a child process, run from the
repository root so twisted/plugins/eventstreams_plugin.py is found."""
from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import sys
import time
from datetime import datetime, timezone

from twisted.internet import defer, error, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.trial import unittest

from .support import RC_TOPICS, async_test, free_port, open_stream, sleep, write_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# `twistd` itself, whatever the venv layout: the same interpreter as the tests.
TWISTD = [sys.executable, "-c", "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()",
          "-n", "--pidfile="]
# `twist`, the other runner of the same plugin (`python -m twisted`).
TWIST = [sys.executable, "-m", "twisted"]
START_TIMEOUT = 15.0


class Child(ProcessProtocol):
    """Collects a child's output and how it ended."""

    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.reason = None
        self.ended: defer.Deferred = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason) -> None:
        self.reason = reason.value
        self.ended.callback(reason.value)

    @property
    def exit_code(self):
        return getattr(self.reason, "exitCode", None)

    @property
    def signal(self):
        return getattr(self.reason, "signal", None)

    @property
    def output(self) -> str:
        return (self.out + self.err).decode("utf-8", "replace")


class DaemonTestCase(unittest.TestCase):
    timeout = 90

    def spawn(self, *args: str, runner: list[str] = TWISTD) -> Child:
        """Start `twistd -n --pidfile= eventstreams ARGS`; always killed in cleanup."""
        child = Child()
        argv = runner + ["eventstreams", *args]
        process = reactor.spawnProcess(child, sys.executable, argv, env=dict(os.environ), path=REPO)

        async def reap() -> None:
            if not child.ended.called:
                try:
                    process.signalProcess("KILL")
                except error.ProcessExitedAlready:
                    pass
                await child.ended

        self.addCleanup(lambda: defer.ensureDeferred(reap()))
        return child

    async def finish(self, child: Child, timeout: float = START_TIMEOUT) -> Child:
        """Wait for the child to exit by itself."""
        deadline = time.monotonic() + timeout
        while not child.ended.called:
            if time.monotonic() > deadline:
                self.fail(f"the daemon did not exit within {timeout} s; output:\n{child.output[-2000:]}")
            await sleep(0.05)
        return child

    async def wait_listening(self, child: Child, port: int, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if child.ended.called:
                self.fail(f"the daemon exited ({child.reason}); output:\n{child.output[-3000:]}")
            try:
                proto = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Protocol())
            except error.ConnectError:
                if time.monotonic() > deadline:
                    self.fail(f"nothing listens on {port} after {timeout} s; output:\n{child.output[-3000:]}")
                await sleep(0.1)
                continue
            proto.transport.loseConnection()
            return

    def good_config(self, **ports: int) -> tuple[str, list[str]]:
        directory = os.path.abspath(self.mktemp())
        path = write_config(directory)
        overrides = []
        for name in ("eventstreams", "intake", "metrics"):
            overrides += ["--set", f"{name}.listen=tcp:{ports[name]}:interface=127.0.0.1"]
        return path, overrides


class Help(DaemonTestCase):
    @async_test
    async def test_help_documents_config_and_set(self):
        child = await self.finish(self.spawn("--help"))
        self.assertEqual(child.exit_code, 0, child.output)
        out = child.out.decode()
        self.assertIn("eventstreams [-c FILE] [--set SECTION.KEY=VALUE ...]", out)
        self.assertIn("-c, --config=", out)
        self.assertIn("The configuration file (INI). [default: etc/streams.ini]", out)
        self.assertIn("--set=", out)
        self.assertIn("Override a configuration key: SECTION.KEY=VALUE (repeatable).", out)
        self.assertNotIn("Traceback", child.output)


class BadStart(DaemonTestCase):
    def assertOneLine(self, child: Child, expected: str) -> None:
        self.assertNotEqual(child.exit_code, 0, child.output)
        self.assertNotIn("Traceback", child.output)
        lines = [line for line in child.output.splitlines() if line.strip()]
        self.assertEqual(lines, [expected])

    @async_test
    async def test_bad_value_exits_non_zero_with_one_line(self):
        path = write_config(os.path.abspath(self.mktemp()))
        child = await self.finish(self.spawn("-c", path, "--set", "eventstreams.heartbeat=abc"))
        self.assertEqual(child.exit_code, 1)
        self.assertOneLine(child, f"eventstreams: {path}: [eventstreams] heartbeat: expected a number, got 'abc'")
        self.assertEqual(child.out, b"")

    @async_test
    async def test_missing_config_file_exits_non_zero_with_one_line(self):
        path = os.path.join(os.path.abspath(self.mktemp()), "nosuch.ini")
        child = await self.finish(self.spawn("-c", path))
        self.assertOneLine(child, f"eventstreams: {path}: [-]: cannot read the file: No such file or directory")

    @async_test
    async def test_malformed_set_exits_non_zero_with_one_line(self):
        path = write_config(os.path.abspath(self.mktemp()))
        child = await self.finish(self.spawn("-c", path, "--set", "eventstreams.listen"))
        self.assertOneLine(child, f"eventstreams: {path}: [--set]: expected SECTION.KEY=VALUE, got 'eventstreams.listen'")

    @async_test
    async def test_stream_without_topics_exits_with_one_line(self):
        path = write_config(os.path.abspath(self.mktemp()), extra="\n[stream:lonely]\ndescription = x\n")
        child = await self.finish(self.spawn("-c", path))
        self.assertOneLine(child, f"eventstreams: {path}: [stream:lonely] topics: a stream needs at least one topic")

    @async_test
    async def test_kafka_backend_without_bootstrap_servers_exits_with_one_line(self):
        path = write_config(os.path.abspath(self.mktemp()))
        child = await self.finish(self.spawn("-c", path, "--set", "eventstreams.backend=kafka"))
        self.assertNotEqual(child.exit_code, 0, child.output)
        self.assertNotIn("Traceback", child.output)
        lines = [line for line in child.output.splitlines() if line.strip()]
        self.assertEqual(len(lines), 1, child.output)
        self.assertTrue(lines[0].startswith(f"eventstreams: {path}: [kafka] bootstrap.servers: "), lines[0])

    def busy_port(self) -> int:
        """A loopback port something else is listening on."""
        busy = socket.socket()
        self.addCleanup(busy.close)
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        return busy.getsockname()[1]

    @async_test
    async def test_port_in_use_exits_non_zero(self):
        port = self.busy_port()
        path, overrides = self.good_config(eventstreams=port, intake=free_port(), metrics=free_port())
        child = await self.finish(self.spawn("-c", path, *overrides))
        self.assertNotEqual(child.exit_code, 0, child.output)
        self.assertIsNone(child.signal)
        self.assertIn(f"Couldn't listen on 127.0.0.1:{port}", child.output)
        self.assertIn("Address already in use", child.output)

    @async_test
    async def test_twist_runner_exits_when_a_port_is_in_use(self):
        # `python -m twisted eventstreams` starts services in startService:
        # the embedded log's threads are already running when the listener
        # fails, and must not keep the failed process alive.
        port = self.busy_port()
        path, overrides = self.good_config(eventstreams=port, intake=free_port(), metrics=free_port())
        child = await self.finish(self.spawn("-c", path, *overrides, runner=TWIST))
        self.assertNotEqual(child.exit_code, 0, child.output)
        self.assertIn("Address already in use", child.output)

    @async_test
    async def test_twist_runner_bad_config_exits_with_one_line(self):
        path = write_config(os.path.abspath(self.mktemp()))
        child = await self.finish(self.spawn("-c", path, "--set", "eventstreams.heartbeat=abc", runner=TWIST))
        self.assertOneLine(child, f"eventstreams: {path}: [eventstreams] heartbeat: expected a number, got 'abc'")


class GoodStart(DaemonTestCase):
    @async_test
    async def test_serves_the_demo_feed_live_and_stops_cleanly_on_sigterm(self):
        api, intake, metrics = free_port(), free_port(), free_port()
        path, overrides = self.good_config(eventstreams=api, intake=intake, metrics=metrics)
        db = os.path.join(os.path.dirname(path), "log.sqlite")
        started = time.monotonic()
        child = self.spawn(
            "-c", path, *overrides, "--set", "demo.stream=recentchange", "--set", "demo.rate=50"
        )
        await self.wait_listening(child, api)
        client = await open_stream(api, "/v2/stream/recentchange")
        self.addCleanup(lambda: client.transport.loseConnection())
        self.assertEqual(client.status, 200)
        self.assertEqual(client.headers["content-type"], "text/event-stream; charset=utf-8")
        await client.wait_events(3, timeout=max(1.0, START_TIMEOUT - (time.monotonic() - started)))
        self.assertTrue(client.body.startswith(b":ok\n\n"), client.body[:50])
        now = datetime.now(timezone.utc)
        ids = set()
        for event in client.events[:3]:
            meta = event["meta"]
            self.assertEqual(meta["stream"], "mediawiki.recentchange")
            self.assertIn(meta["topic"], RC_TOPICS)
            dt = datetime.fromisoformat(meta["dt"].replace("Z", "+00:00"))
            self.assertLess(abs((now - dt).total_seconds()), 30, meta["dt"])
            ids.add(meta["id"])
        self.assertEqual(len(ids), 3)
        block_ids = [json.loads(b["id"]) for b in client.blocks if b.get("event") == "message"]
        self.assertEqual([p["topic"] for p in block_ids[0]], list(RC_TOPICS))

        child.transport.signalProcess("TERM")
        await self.finish(child)
        # twistd (Twisted >= 20.3) shuts down cleanly, then re-raises the
        # signal it received on itself, so a clean stop is either exit
        # status 0 or "terminated by SIGTERM" (shell status 143, which
        # systemd counts as a clean exit); anything else is a crash.
        self.assertIn(
            (child.exit_code, child.signal), [(0, None), (None, signal.SIGTERM)], child.output[-3000:]
        )
        self.assertNotIn("Traceback", child.output)
        self.assertIn("Main loop terminated.", child.output)
        self.assertIn("Server Shut Down.", child.output)
        # The server closed the stream when it stopped.
        await client.wait_for(lambda: client.done, timeout=5)
        # The events it served were durably stored in the embedded log.
        with sqlite3.connect(db) as conn:
            (count,) = conn.execute("SELECT COUNT(*) FROM records").fetchone()
        self.assertGreaterEqual(count, 3)
