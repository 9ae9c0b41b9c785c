"""systemd's readiness and watchdog protocol (`Type=notify`, `WatchdogSec=`).

The protocol is a few lines: one datagram of `KEY=VALUE` lines to the
AF_UNIX socket named by $NOTIFY_SOCKET (a leading `@` names an abstract
socket). Without $NOTIFY_SOCKET (not under systemd) nothing is sent.

- `READY=1` once every listener is bound and the event log is open: the
  `Notify` service is the last child of the service tree, so it starts
  after the log, and it waits for every listening port;
- `WATCHDOG=1` every half of $WATCHDOG_USEC, from a timer on the reactor:
  a blocked reactor stops the pings and systemd restarts the service;
- `STOPPING=1` first thing on shutdown.

The variables are removed from the environment once read, so the worker
processes neither notify nor ping.
"""
from __future__ import annotations

import os
import socket
from typing import Any, Iterable, MutableMapping, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

log = Logger()


class Notifier:
    """Sends notifications to systemd's socket (or nowhere)."""

    def __init__(self, address: Optional[str], watchdog_usec: int = 0) -> None:
        self.address: Optional[str | bytes] = None
        if address:
            # An abstract socket's name starts with a NUL byte.
            self.address = b"\0" + address[1:].encode() if address.startswith("@") else address
        self.watchdog_usec = watchdog_usec

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] = os.environ) -> "Notifier":
        """Reads (and removes) $NOTIFY_SOCKET, $WATCHDOG_USEC and $WATCHDOG_PID."""
        address = environ.pop("NOTIFY_SOCKET", None)
        usec_text = environ.pop("WATCHDOG_USEC", "")
        pid_text = environ.pop("WATCHDOG_PID", "")
        try:
            usec = int(usec_text) if usec_text else 0
            if pid_text and int(pid_text) != os.getpid():
                usec = 0  # the watchdog is another process's
        except ValueError:
            log.warn("ignoring WATCHDOG_USEC={usec!r} / WATCHDOG_PID={pid!r}: not numbers",
                     usec=usec_text, pid=pid_text)
            usec = 0
        return cls(address, max(usec, 0))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """One notification; never blocks, never raises (a lost ping is
        systemd's business)."""
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.setblocking(False)
                s.sendto("\n".join(fields).encode(), self.address)
            return True
        except OSError as e:
            log.warn("systemd notification {fields} failed: {error}", fields=" ".join(fields), error=e)
            return False


class Notify(Service):
    """READY=1 when the daemon is up, WATCHDOG=1 from the reactor, STOPPING=1 on stop."""

    def __init__(self, notifier: Notifier, listeners: Iterable[Any], reactor: Any) -> None:
        self.notifier = notifier
        self.listeners = list(listeners)
        self.reactor = reactor
        self.ready: Deferred[None] = Deferred()
        self.ping = LoopingCall(lambda: self.notifier.send("WATCHDOG=1"))
        self.ping.clock = reactor

    def startService(self) -> None:
        super().startService()
        if self.notifier.watchdog_usec > 0:
            self.ping.start(self.notifier.watchdog_usec / 2e6, now=True)
        ports = [listener.bound() for listener in self.listeners]
        gatherResults(ports, consumeErrors=True).addCallbacks(self._bound, self._failed)

    def _bound(self, ports: list[Any]) -> None:
        if not self.running:
            return
        addresses = ", ".join(str(getattr(p.getHost(), "port", p.getHost())) for p in ports)
        self.notifier.send("READY=1", f"STATUS=serving (listening on {addresses})")
        self.ready.callback(None)

    def _failed(self, failure: Any) -> None:
        # A port that cannot be bound stops start-up elsewhere; say why.
        self.notifier.send(f"STATUS=start-up failed: {failure.getErrorMessage()}")

    def stopService(self) -> Any:
        self.notifier.send("STOPPING=1")
        if self.ping.running:
            self.ping.stop()
        return super().stopService()
