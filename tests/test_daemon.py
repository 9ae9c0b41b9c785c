"""The real daemon: `twistd -n eventstreams` as a child process, run from the
repository root so twisted/plugins/eventstreams_plugin.py is found."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import sys
import time
from datetime import datetime, timezone

from twisted.internet import defer, error, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IProcessTransport
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool
import treq

from .support import RC_TOPICS, async_test, free_port, open_stream, wait_for, write_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# `twistd` itself, whatever the venv layout: the same interpreter as the tests.
TWISTD = [sys.executable, "-c", "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()",
          "-n", "--pidfile="]
# `twist`, the other runner of the same plugin (`python -m twisted`).
TWIST = [sys.executable, "-m", "twisted"]
START_TIMEOUT = 15.0


class Child(ProcessProtocol):
    """Collects a child's output and how it ended."""

    transport: IProcessTransport  # (Twisted types it Optional)

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
        await wait_for(lambda: child.ended.called, lambda: f"the daemon to exit; output:\n{child.output[-2000:]}",
                       timeout, 0.05)
        return child

    async def wait_listening(self, child: Child, port: int, timeout: float = START_TIMEOUT) -> None:
        async def accepts() -> bool:
            if child.ended.called:
                self.fail(f"the daemon exited ({child.reason}); output:\n{child.output[-3000:]}")
            try:
                proto = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Protocol())
            except error.ConnectError:
                return False
            proto.transport.loseConnection()
            return True

        await wait_for(accepts, lambda: f"a listener on {port}; output:\n{child.output[-3000:]}", timeout, 0.1)

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
        path = write_config(os.path.abspath(self.mktemp()), extra="[demo]\nrate = fast\n")
        child = await self.finish(self.spawn("-c", path))
        self.assertEqual(child.exit_code, 1)
        self.assertOneLine(child, f"eventstreams: {path}: [demo] rate: expected a number, got 'fast'")
        self.assertEqual(child.out, b"")

    @async_test
    async def test_bad_value_from_the_command_line_names_the_set_option(self):
        path = write_config(os.path.abspath(self.mktemp()))
        child = await self.finish(self.spawn("-c", path, "--set", "eventstreams.heartbeat=abc"))
        self.assertEqual(child.exit_code, 1)
        self.assertOneLine(
            child, "eventstreams: --set eventstreams.heartbeat=abc: [eventstreams] heartbeat: expected a number, got 'abc'"
        )
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
        self.assertOneLine(child, "eventstreams: --set eventstreams.listen: expected SECTION.KEY=VALUE, got 'eventstreams.listen'")

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
    async def test_port_in_use_exits_non_zero_with_one_line(self):
        port = self.busy_port()
        path, overrides = self.good_config(eventstreams=port, intake=free_port(), metrics=free_port())
        child = await self.finish(self.spawn("-c", path, *overrides))
        self.assertEqual(child.exit_code, 1, child.output)
        self.assertIsNone(child.signal)
        endpoint = f"tcp:{port}:interface=127.0.0.1"
        self.assertOneLine(
            child, f"eventstreams: --set eventstreams.listen={endpoint}: [eventstreams] listen: "
            f"cannot listen on {endpoint}: Address already in use"
        )
        self.assertEqual(child.out, b"")

    @async_test
    async def test_port_in_use_from_the_file_names_the_file(self):
        port = self.busy_port()
        path = write_config(os.path.abspath(self.mktemp()), extra=f"[irc]\nlisten = tcp:{port}:interface=127.0.0.1\n")
        child = await self.finish(self.spawn("-c", path))
        self.assertOneLine(
            child, f"eventstreams: {path}: [irc] listen: cannot listen on tcp:{port}:interface=127.0.0.1: "
            "Address already in use"
        )

    @async_test
    async def test_port_out_of_range_exits_with_one_line(self):
        path = write_config(os.path.abspath(self.mktemp()))
        child = await self.finish(self.spawn("-c", path, "--set", "intake.listen=tcp:99999"))
        self.assertOneLine(
            child, "eventstreams: --set intake.listen=tcp:99999: [intake] listen: port 99999 is out of range (0-65535)"
        )
        # An endpoint the configuration cannot check fails when it is bound: one line too.
        child = await self.finish(self.spawn("-c", path, "--set", "metrics.listen=tcp6:99999"))
        self.assertOneLine(
            child, "eventstreams: --set metrics.listen=tcp6:99999: [metrics] listen: "
            "cannot listen on tcp6:99999: bind(): port must be 0-65535."
        )

    @async_test
    async def test_unreadable_demo_file_exits_with_one_line(self):
        directory = os.path.abspath(self.mktemp())
        missing = os.path.join(directory, "nosuch.jsonl")
        path = write_config(directory, extra=f"[demo]\nstream = recentchange\nfile = {missing}\n")
        child = await self.finish(self.spawn("-c", path))
        self.assertOneLine(child, f"eventstreams: {path}: [demo] file: cannot read {missing!r}: No such file or directory")
        child = await self.finish(self.spawn("-c", path, "--set", f"demo.file={directory}"))
        self.assertOneLine(
            child, f"eventstreams: --set demo.file={directory}: [demo] file: cannot read {directory!r}: Is a directory"
        )

    @async_test
    async def test_embedded_log_that_cannot_open_exits_with_one_line(self):
        directory = os.path.abspath(self.mktemp())
        path = write_config(directory)
        not_a_log = os.path.join(directory, "streams.ini")  # a text file, not SQLite
        child = await self.finish(self.spawn("-c", path, "--set", f"embedded.path={not_a_log}"))
        self.assertOneLine(
            child, f"eventstreams: --set embedded.path={not_a_log}: [embedded] path: cannot use: file is not a database"
        )
        under_a_file = os.path.join(not_a_log, "log.sqlite")
        child = await self.finish(self.spawn("-c", path, "--set", f"embedded.path={under_a_file}"))
        self.assertEqual(child.exit_code, 1, child.output)
        self.assertOneLine(child, child.output.strip())
        self.assertTrue(
            child.output.startswith(f"eventstreams: --set embedded.path={under_a_file}: [embedded] path: "
                                    f"cannot create directory {not_a_log!r}: "), child.output)

    @async_test
    async def test_twist_runner_exits_when_a_port_is_in_use(self):
        # `python -m twisted eventstreams`: the same one line, before any
        # service (or thread of the embedded log) starts.
        port = self.busy_port()
        path, overrides = self.good_config(eventstreams=free_port(), intake=port, metrics=free_port())
        child = await self.finish(self.spawn("-c", path, *overrides, runner=TWIST))
        endpoint = f"tcp:{port}:interface=127.0.0.1"
        self.assertOneLine(
            child, f"eventstreams: --set intake.listen={endpoint}: [intake] listen: "
            f"cannot listen on {endpoint}: Address already in use"
        )

    @async_test
    async def test_twist_runner_bad_config_exits_with_one_line(self):
        path = write_config(os.path.abspath(self.mktemp()))
        child = await self.finish(self.spawn("-c", path, "--set", "eventstreams.heartbeat=abc", runner=TWIST))
        self.assertOneLine(
            child, "eventstreams: --set eventstreams.heartbeat=abc: [eventstreams] heartbeat: expected a number, got 'abc'"
        )


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


class ListenerLine(DaemonTestCase):
    @async_test
    async def test_one_line_lists_every_listener_by_role_with_a_url_that_answers(self):
        api, intake, metrics, irc = free_port(), free_port(), free_port(), free_port()
        path, overrides = self.good_config(eventstreams=api, intake=intake, metrics=metrics)
        child = self.spawn("-c", path, *overrides, "--set", f"irc.listen=tcp:{irc}:interface=127.0.0.1",
                           "--set", "rcstream.stream=recentchange")
        await self.wait_listening(child, api)
        expected = (
            f"EventStreams http://127.0.0.1:{api}/v2/ui · RCStream http://127.0.0.1:{api}/rcstream_status"
            f" · intake http://127.0.0.1:{intake}/v1/events · IRC irc://127.0.0.1:{irc}"
            f" · metrics http://127.0.0.1:{metrics}/metrics"
        )
        await wait_for(lambda: expected in child.output,
                       lambda: f"the listener line {expected!r} in:\n{child.output[-3000:]}", START_TIMEOUT, 0.1)
        [line] = [line for line in child.output.splitlines() if "EventStreams http" in line]
        self.assertTrue(line.endswith(expected), line)
        pool = HTTPConnectionPool(reactor, persistent=False)
        for url in re.findall(r"http://\S+", expected):
            response = await treq.get(url, pool=pool)
            await response.content()
            self.assertEqual(response.code, 405 if url.endswith("/v1/events") else 200, url)
