"""systemd's notify protocol: READY=1 after every listener is bound, WATCHDOG=1
from the reactor at half of WATCHDOG_USEC, STOPPING=1 on shutdown.

The notify socket is a real AF_UNIX datagram socket that the test binds and
reads, as systemd does; the daemon is the real `twistd -n eventstreams`."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
import time
from typing import Any

from twisted.internet import error, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import DatagramProtocol, Protocol
from twisted.internet.task import Clock
from twisted.trial import unittest

from eventstreams.systemd import Notifier, Notify

from .support import async_test, free_port, sleep, wait_for
from .test_daemon import DaemonTestCase


def bound_socket(directory: str) -> tuple[socket.socket, str]:
    path = os.path.join(directory, "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(5)
    return s, path


class NotifierProtocol(unittest.TestCase):
    def setUp(self) -> None:
        # AF_UNIX paths are short (108 bytes): not under _trial_temp.
        self.directory = tempfile.mkdtemp(prefix="es-notify-")
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.sock, self.path = bound_socket(self.directory)
        self.addCleanup(self.sock.close)

    def test_sends_one_datagram_of_lines(self):
        self.assertTrue(Notifier(self.path).send("READY=1", "STATUS=serving"))
        self.assertEqual(self.sock.recv(4096), b"READY=1\nSTATUS=serving")

    def test_abstract_socket_address(self):
        name = f"eventstreams-test-{os.getpid()}-{time.monotonic_ns()}"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.bind("\0" + name)
            s.settimeout(5)
            self.assertTrue(Notifier("@" + name).send("WATCHDOG=1"))
            self.assertEqual(s.recv(4096), b"WATCHDOG=1")

    def test_no_socket_sends_nothing_and_a_gone_one_does_not_raise(self):
        self.assertFalse(Notifier(None).send("READY=1"))
        self.assertFalse(Notifier(os.path.join(self.directory, "nobody")).send("READY=1"))

    def test_environment_is_read_once_and_removed(self):
        environ = {"NOTIFY_SOCKET": self.path, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid()),
                   "OTHER": "x"}
        notifier = Notifier.from_environ(environ)
        self.assertEqual((notifier.address, notifier.watchdog_usec), (self.path, 30_000_000))
        self.assertEqual(environ, {"OTHER": "x"})  # worker processes neither notify nor ping

    def test_watchdog_of_another_pid_or_garbage_is_ignored(self):
        other = Notifier.from_environ({"NOTIFY_SOCKET": self.path, "WATCHDOG_USEC": "1000",
                                       "WATCHDOG_PID": str(os.getpid() + 1)})
        self.assertEqual(other.watchdog_usec, 0)
        garbage = Notifier.from_environ({"NOTIFY_SOCKET": self.path, "WATCHDOG_USEC": "soon"})
        self.assertEqual(garbage.watchdog_usec, 0)


class _Port:
    def __init__(self, port: int) -> None:
        self.port = port

    def getHost(self) -> Any:
        return self


class _Listener:
    """What Notify reads of a tap.Listener: bound(), a port some time later."""

    def __init__(self) -> None:
        from twisted.internet.defer import Deferred

        self.port: Deferred = Deferred()

    def bound(self) -> Any:
        return self.port


class NotifyService(unittest.TestCase):
    """The service's state machine on a fake clock."""

    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="es-notify-")
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.sock, self.path = bound_socket(self.directory)
        self.addCleanup(self.sock.close)
        self.sock.settimeout(0)

    def received(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.sock.recv(4096))
            except BlockingIOError:
                return out

    def test_ready_only_once_every_listener_is_bound_and_pings_only_while_the_clock_runs(self):
        clock = Clock()
        a, b = _Listener(), _Listener()
        service = Notify(Notifier(self.path, watchdog_usec=30_000_000), [a, b], clock)
        service.startService()
        self.assertEqual(self.received(), [b"WATCHDOG=1"])  # the first ping at once
        a.port.callback(_Port(8092))
        self.assertEqual(self.received(), [])  # b is not bound yet
        b.port.callback(_Port(8192))
        self.assertEqual(self.received(), [b"READY=1\nSTATUS=serving (listening on 8092, 8192)"])
        clock.advance(14.9)
        self.assertEqual(self.received(), [])  # a reactor that does not turn does not ping
        clock.advance(0.1)  # half of WatchdogSec=30
        self.assertEqual(self.received(), [b"WATCHDOG=1"])
        clock.advance(15)
        self.assertEqual(self.received(), [b"WATCHDOG=1"])
        service.stopService()
        self.assertEqual(self.received(), [b"STOPPING=1"])
        clock.advance(60)
        self.assertEqual(self.received(), [])

    def test_a_listener_that_fails_sends_a_status_not_ready(self):
        clock = Clock()
        a = _Listener()
        service = Notify(Notifier(self.path), [a], clock)
        service.startService()
        a.port.errback(error.CannotListenError("", 8092, OSError("in use")))
        [message] = self.received()
        self.assertTrue(message.startswith(b"STATUS=start-up failed"), message)
        self.assertNotIn(b"READY=1", message)
        self.assertFalse(service.ready.called)


class Datagrams(DatagramProtocol):
    def __init__(self) -> None:
        self.messages: list[tuple[float, bytes]] = []

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.messages.append((time.monotonic(), data))

    def first(self, field: bytes) -> float | None:
        return next((t for t, m in self.messages if field in m.split(b"\n")), None)


class DaemonNotifies(DaemonTestCase):
    """`twistd -n eventstreams` under a fake systemd: NOTIFY_SOCKET and WATCHDOG_USEC."""

    @async_test
    async def test_ready_after_listeners_watchdog_pings_and_stopping(self):
        directory = tempfile.mkdtemp(prefix="es-notify-")
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, "notify.sock")
        received = Datagrams()
        port = reactor.listenUNIXDatagram(path, received)
        self.addCleanup(port.stopListening)
        api, intake, metrics = free_port(), free_port(), free_port()
        config, overrides = self.good_config(eventstreams=api, intake=intake, metrics=metrics)
        watchdog = 0.6  # seconds: a ping every 0.3 s
        os.environ.update(NOTIFY_SOCKET=path, WATCHDOG_USEC=str(int(watchdog * 1e6)))
        try:
            child = self.spawn("-c", config, *overrides)
        finally:
            del os.environ["NOTIFY_SOCKET"], os.environ["WATCHDOG_USEC"]

        await wait_for(lambda: received.first(b"READY=1") is not None or child.ended.called,
                       lambda: f"READY=1; got {received.messages}; output:\n{child.output[-3000:]}", 30, 0.01)
        self.assertFalse(child.ended.called, child.output[-3000:])
        # Ready means ready: every listener accepts at once.
        for listener in (api, intake, metrics):
            proto = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", listener), Protocol())
            proto.transport.loseConnection()
        ready = [m for _, m in received.messages if b"READY=1" in m.split(b"\n")]
        self.assertEqual(len(ready), 1)
        self.assertIn(f"listening on {api}, {intake}, {metrics}".encode(), ready[0])

        since = time.monotonic()

        def pings_since() -> list[float]:
            return [t for t, m in received.messages if m == b"WATCHDOG=1" and t >= since]

        # One per 0.3 s: five come in well under 10 s, never twice the
        # watchdog interval apart.
        pings = await wait_for(lambda: len(pings_since()) >= 5 and pings_since(), "five watchdog pings", 10, 0.05)
        self.assertLess(max(b - a for a, b in zip(pings, pings[1:])), watchdog * 2, pings)

        # Stopped for a while (as a blocked process would be): no pings.
        os.kill(child.transport.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        await sleep(1.5)  # the process stopped for a while is the case under test
        os.kill(child.transport.pid, signal.SIGCONT)
        resumed = time.monotonic()
        # First a ping after SIGCONT (any sent before the stop has arrived by then) ...
        await wait_for(lambda: [t for t, m in received.messages if m == b"WATCHDOG=1" and t > resumed],
                       "a ping after SIGCONT", 10, 0.05)
        # ... then none while it was stopped.
        gap = [t for t, m in received.messages if m == b"WATCHDOG=1" and stopped + 0.05 < t < stopped + 1.5]
        self.assertEqual(gap, [])

        child.transport.signalProcess("TERM")
        await self.finish(child)
        stopping = received.first(b"STOPPING=1")
        self.assertIsNotNone(stopping, received.messages)
        self.assertGreater(stopping, received.first(b"READY=1"))
        self.assertNotIn("Traceback", child.output)
