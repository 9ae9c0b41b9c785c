"""Worker mode (`[eventstreams] workers = N`): N processes serve one listener.

The main process (twistd) binds the public listener as always and serves it
too; it spawns N-1 workers (`python -m eventstreams.workers`), each handed
the listening socket as an inherited fd that it adopts: the kernel gives
each new connection to whichever process accepts first. A worker loads the
same configuration (file and --set items) and runs its own backend reader,
hubs and public API site; it binds nothing. Only the main process writes
the embedded log and runs the intake, demo feed, metrics and the bridges.

A worker's descriptors:
  0  control from the main process; EOF means the main process is gone,
     and the worker stops (no orphans even after a SIGKILL of the main)
  1  its log, JSON events the main process re-logs as [worker N ...]
  2  stray stderr (a traceback before logging starts), re-logged as text
  3  the listening socket
  4  the shared per-IP/max_connections table (iplimit), when limits are on
  5  reports to the main process: its metrics samples, once a second

Wake-up (embedded log): a worker's tails would notice the main process's
commits only by polling the file (poll_interval, 1 s). Instead the main
process writes each commit's new next-offsets to every worker's control
pipe (`watch_appends`); the worker raises its heads and its tails read the
new records at once. Measured (20 clients, 20 events/s, 2 cores): publish
to client p50 3.0 ms from the main process, 4.4 ms from a worker (a pipe
write, a thread hop and one SQLite read more); polling every 10 ms instead
added 5 ms at p50 and cost each idle worker 3.4% of a core (0.67 s CPU in
20 s, against 0.02 s with the pipe). The 1 s poll stays as a backstop.

Supervision: a worker that exits is logged and respawned after 1 s,
doubling up to 30 s while it keeps failing within a minute. Stopping the
main process sends SIGTERM to every worker, waits for them (SIGKILL after
STOP_TIMEOUT seconds), and only then lets the main process go on stopping.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from typing import TYPE_CHECKING, Any, Callable, Optional, cast

from twisted.application.service import MultiService, Service
from twisted.internet import defer, error
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import ProcessProtocol, Protocol, connectionDone
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    Logger,
    eventFromJSON,
    globalLogBeginner,
    globalLogPublisher,
    jsonFileLogObserver,
)
from twisted.python.failure import Failure

from zope.interface import implementer

import bridges  # noqa: F401  (a worker loads the same file: the bridges declare their sections)

from .backends.base import Record
from .config import ConfigError, load
from .core import Core, tune_gc
from .iplimit import SharedTable
from .metrics import Sample, collect

if TYPE_CHECKING:
    from twisted.internet.posixbase import PosixReactorBase
    from twisted.internet.process import Process

log = Logger()

CONTROL_FD, LISTEN_FD, TABLE_FD, REPORT_FD = 0, 3, 4, 5
REPORT_INTERVAL = 1.0  # seconds between a worker's metrics reports
STOP_TIMEOUT = 10.0  # seconds a stopping worker gets before SIGKILL
BACKOFF_FIRST, BACKOFF_MAX = 1.0, 30.0
HEALTHY_AFTER = 60.0  # a worker that ran this long restarts the backoff
MAX_LINE = 1 << 20  # a report line longer than this is dropped (bad input)

def merge_samples(samples: list[Sample]) -> list[Sample]:
    """Sum the samples that name the same series (one per process) into one."""
    merged: dict[tuple, Sample] = {}
    for name, kind, help_text, labels, value in samples:
        key = (name, tuple(sorted(labels.items())))
        if key in merged:
            merged[key] = (name, kind, help_text, labels, merged[key][4] + value)
        else:
            merged[key] = (name, kind, help_text, labels, value)
    return list(merged.values())


def _sample(item: Any) -> Sample:
    """A metrics sample as a worker reported it: (name, type, help, labels, value)."""
    name, kind, help_text, labels, value = item
    if not (isinstance(name, str) and isinstance(kind, str) and isinstance(help_text, str)
            and isinstance(labels, dict) and all(isinstance(v, str) for v in labels.values())
            and isinstance(value, (int, float)) and not isinstance(value, bool)):
        raise ValueError(f"not a sample: {item!r}")
    return (name, kind, help_text, labels, value)


class _Lines:
    """Splits a byte stream into lines, dropping absurdly long ones."""

    def __init__(self, on_line: Callable[[bytes], None]) -> None:
        self.buffer = b""
        self.on_line = on_line

    def feed(self, data: bytes) -> None:
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        if len(self.buffer) > MAX_LINE:
            self.buffer = b""
        for line in lines:
            if line:
                self.on_line(line)


# -- the main process's side --------------------------------------------------


@implementer(IPushProducer)
class _Worker(ProcessProtocol):
    transport: Process  # (Twisted's Optional: spawnProcess sets it first)
    """One worker process as the supervisor sees it (and the producer of
    its control pipe's head notices)."""

    def __init__(self, supervisor: "Workers", index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.pid: Optional[int] = None
        self.started = time.monotonic()
        self.ready = False
        self.paused = False
        self.samples: list[Sample] = []
        self.ended: defer.Deferred[None] = defer.Deferred()
        self._log = _Lines(self._log_line)
        self._err = _Lines(self._err_line)
        self._reports = _Lines(self._report_line)

    def connectionMade(self) -> None:
        self.pid = self.transport.pid
        # Head notices are cumulative: while a worker does not read its pipe
        # (over 64 KiB queued), skip them rather than queue without bound;
        # the next one, or the worker's 1 s poll, carries the same news.
        self.transport.pipes[CONTROL_FD].registerProducer(self, True)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.paused = True

    @property
    def system(self) -> str:
        return f"worker {self.index} pid {self.pid}"

    def childDataReceived(self, fd: int, data: bytes) -> None:
        {1: self._log, 2: self._err, REPORT_FD: self._reports}.get(fd, self._err).feed(data)

    def _log_line(self, line: bytes) -> None:
        try:
            event = eventFromJSON(line.lstrip(b"\x1e").decode("utf-8"))
        except ValueError:
            return self._err_line(line)
        event["log_system"] = self.system
        globalLogPublisher(event)

    def _err_line(self, line: bytes) -> None:
        log.warn("[{system}] {line}", system=self.system, line=line.decode("utf-8", "replace"))

    def _report_line(self, line: bytes) -> None:
        try:
            samples = [_sample(s) for s in json.loads(line)["samples"]]
        except (ValueError, KeyError, TypeError):
            log.warn("[{system}] unreadable report", system=self.system)
            return
        self.samples = samples
        if not self.ready:
            self.ready = True
            log.info("worker {index} (pid {pid}) is serving", index=self.index, pid=self.pid)

    def notify(self, line: bytes) -> None:
        if self.transport is not None and self.pid is not None and not self.paused:
            try:
                self.transport.writeToChild(CONTROL_FD, line)
            except (KeyError, OSError):
                pass  # the pipe is gone: the worker is exiting

    def processEnded(self, reason: Any) -> None:
        self.ready = False
        self.samples = []
        self.supervisor._ended(self, reason.value)
        self.ended.callback(None)


class Workers(Service):
    """Spawns, watches and stops the worker processes (main process only)."""

    def __init__(self, config: Any, reactor: Any, listener: Any, table: Optional[SharedTable]) -> None:
        self.config = config
        self.reactor = reactor
        self.listener = listener  # the API's tap.Listener
        self.table = table
        self.count = config.service.workers - 1
        self.workers: dict[int, _Worker] = {}
        self.restarts = 0
        self._listen_fd: Optional[int] = None
        self._backoff: dict[int, float] = {}
        self._timers: dict[int, Any] = {}

    # -- life cycle -----------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        # The port exists once the listener started (a failure has already
        # stopped start-up, loudly: nothing to do here).
        self.listener.bound().addCallbacks(self._listening, lambda failure: None)

    def _listening(self, port: Any) -> Any:
        self._listen_fd = port.fileno()
        if self.running:
            for index in range(1, self.count + 1):
                self._spawn(index)
        return port

    def stopService(self) -> defer.Deferred[Any]:
        super().stopService()
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()
        return defer.DeferredList([defer.ensureDeferred(self._stop(w)) for w in list(self.workers.values())])

    async def _stop(self, worker: _Worker) -> None:
        try:
            worker.transport.signalProcess("TERM")
        except error.ProcessExitedAlready:
            return
        timer = self.reactor.callLater(STOP_TIMEOUT, self._kill, worker)
        await worker.ended
        if timer.active():
            timer.cancel()

    def _kill(self, worker: _Worker) -> None:
        log.warn("worker {index} (pid {pid}) did not stop within {t} s: SIGKILL",
                 index=worker.index, pid=worker.pid, t=STOP_TIMEOUT)
        try:
            worker.transport.signalProcess("KILL")
        except error.ProcessExitedAlready:
            pass

    # -- processes ------------------------------------------------------------

    def argv(self, index: int) -> list[str]:
        """The worker's command line: the same configuration as this process."""
        argv = [sys.executable, "-m", "eventstreams.workers", "--config", os.path.abspath(self.config.path),
                "--index", str(index), "--listen-fd", str(LISTEN_FD)]
        for item in self.config.overrides:
            argv += ["--set", item]
        if self.table is not None:
            argv += ["--table-fd", str(TABLE_FD)]
        return argv

    def _spawn(self, index: int) -> None:
        self._timers.pop(index, None)
        if not self.running or self._listen_fd is None:
            return
        if self.table is not None:
            self.table.clear_process(index)  # a fresh process holds nothing
        child_fds: dict[int, Any] = {CONTROL_FD: "w", 1: "r", 2: "r", LISTEN_FD: self._listen_fd, REPORT_FD: "r"}
        if self.table is not None:
            child_fds[TABLE_FD] = self.table.fd
        env = dict(os.environ)
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        worker = _Worker(self, index)
        try:
            self.reactor.spawnProcess(worker, sys.executable, self.argv(index), env=env, childFDs=child_fds)
        except Exception:  # e.g. out of processes or descriptors: try again later
            log.failure("worker {index} could not be started", index=index)
            self._retry(index, 0.0)
            return
        self.workers[index] = worker
        log.info("worker {index} started (pid {pid})", index=index, pid=worker.pid)

    def _ended(self, worker: _Worker, reason: Any) -> None:
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        if self.table is not None:
            self.table.clear_process(worker.index)  # its clients are gone
        if not self.running:
            log.info("worker {index} (pid {pid}) stopped", index=worker.index, pid=worker.pid)
            return
        lived = time.monotonic() - worker.started
        self.restarts += 1
        how = (f"signal {reason.signal}" if getattr(reason, "signal", None)
               else f"status {getattr(reason, 'exitCode', '?')}")
        delay = self._retry(worker.index, lived)
        # Status 0: it was told to stop (say, a SIGTERM to the whole cgroup,
        # systemd's default, just before this process is told too).
        emit = log.warn if getattr(reason, "exitCode", None) == 0 else log.error
        emit("worker {index} (pid {pid}) exited unexpectedly ({how}) after {lived:.1f} s; "
             "restarting in {delay:.0f} s", index=worker.index, pid=worker.pid, how=how,
             lived=lived, delay=delay)

    def _retry(self, index: int, lived: float) -> float:
        """Spawn the worker again after a delay: 1 s, doubling to 30 s while it fails soon."""
        delay = BACKOFF_FIRST if lived >= HEALTHY_AFTER else min(
            BACKOFF_MAX, self._backoff.get(index, BACKOFF_FIRST / 2) * 2)
        self._backoff[index] = delay
        self._timers[index] = self.reactor.callLater(delay, self._spawn, index)
        return delay

    # -- what the main process tells and asks ---------------------------------

    def announce(self, records: list[Record]) -> None:
        """The main process committed records: tell every worker the new heads."""
        if not self.workers:
            return
        heads: dict[tuple[str, int], int] = {}
        for r in records:
            if r.offset + 1 > heads.get(r.tp, 0):
                heads[r.tp] = r.offset + 1
        line = json.dumps({"heads": [[t, p, n] for (t, p), n in heads.items()]}).encode() + b"\n"
        for worker in self.workers.values():
            worker.notify(line)

    def samples(self) -> list[Sample]:
        """The workers' latest metrics samples, plus their own gauges."""
        out: list[Sample] = [
            ("eventstreams_worker_processes", "gauge", "Worker processes serving (besides the main process).",
             {}, sum(1 for w in self.workers.values() if w.ready)),
            ("eventstreams_worker_restarts_total", "counter", "Worker processes restarted after an exit.",
             {}, self.restarts),
        ]
        for worker in self.workers.values():
            out += worker.samples
        return out


# -- the worker process's side ------------------------------------------------


class _Control(Protocol):
    """The pipe from the main process: head notices in, reports out."""

    def __init__(self, backend: Any, on_lost: Callable[[], None]) -> None:
        self.backend = backend
        self.on_lost = on_lost
        self.lines = _Lines(self._line)
        self.heads: dict[tuple[str, int], int] = {}

    def dataReceived(self, data: bytes) -> None:
        self.lines.feed(data)
        if self.heads:  # one wake-up per read, however many commits it held
            heads, self.heads = self.heads, {}
            notice = getattr(self.backend, "notice_heads", None)
            if notice is not None:
                notice(heads)

    def _line(self, line: bytes) -> None:
        try:
            for topic, partition, next_offset in json.loads(line)["heads"]:
                tp = (str(topic), int(partition))
                self.heads[tp] = max(self.heads.get(tp, 0), int(next_offset))
        except (ValueError, KeyError, TypeError):
            log.warn("unreadable control line from the main process: {line!r}", line=line[:200])

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.on_lost()


class _Adopted(Service):
    """Serves the inherited listening socket (this process binds nothing)."""

    def __init__(self, reactor: Any, fd: int, factory: Any) -> None:
        self.reactor, self.fd, self.factory = reactor, fd, factory
        self.port: Any = None

    def startService(self) -> None:
        super().startService()
        with socket.socket(fileno=os.dup(self.fd)) as inherited:
            family = inherited.family
        self.port = self.reactor.adoptStreamPort(self.fd, family, self.factory)  # dups the fd
        os.close(self.fd)

    def stopService(self) -> Any:
        super().stopService()
        if self.port is not None:
            return self.port.stopListening()


class _Reporter(Service):
    """Sends this process's metrics samples to the main process."""

    def __init__(self, reactor: Any, collect: Callable[[], list[Sample]], write: Callable[[bytes], None]) -> None:
        from twisted.internet.task import LoopingCall

        self.collect, self.write = collect, write
        self.loop = LoopingCall(self.report)
        self.loop.clock = reactor

    def report(self) -> None:
        self.write(json.dumps({"samples": self.collect()}, separators=(",", ":")).encode() + b"\n")

    def startService(self) -> None:
        super().startService()
        self.loop.start(REPORT_INTERVAL, now=True)

    def stopService(self) -> Any:
        super().stopService()
        if self.loop.running:
            self.loop.stop()


def build_worker(config: Any, reactor: Any, index: int, listen_fd: int, table: Optional[SharedTable],
                 on_lost: Callable[[], None]) -> MultiService:
    """A worker's services: the public API over the adopted socket; on_lost
    is called when the main process's control pipe closes."""
    from twisted.internet.stdio import StandardIO

    core = Core(config, reactor, table=table, index=index, writer=False)
    top = MultiService()
    core.lifecycle.setServiceParent(top)
    control = _Control(core.backend, on_lost)
    transport = StandardIO(control, stdin=CONTROL_FD, stdout=REPORT_FD, reactor=reactor)  # type: ignore[call-arg]  # mypy reads stdio's Windows branch
    _Reporter(reactor, lambda: collect(core.connections, core.hubs, None, config.streams) + core.head_budget.samples(),
              transport.write).setServiceParent(top)
    _Adopted(reactor, listen_fd, core.site).setServiceParent(top)  # last: serve once the log is open
    return top


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m eventstreams.workers`: started by the main process only."""
    parser = argparse.ArgumentParser(prog="python -m eventstreams.workers", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--listen-fd", type=int, required=True)
    parser.add_argument("--table-fd", type=int)
    args = parser.parse_args(argv)

    # The main process stops workers (SIGTERM); a terminal's ^C reaches the
    # whole process group, and must not let workers race the main's stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(jsonFileLogObserver(sys.stdout), [LogLevelFilterPredicate(LogLevel.info)])],
        redirectStandardIO=False,
    )

    from twisted.internet import reactor as installed

    # The default (epoll) reactor: its run() takes installSignalHandlers,
    # which IReactorCore does not name.
    reactor = cast("PosixReactorBase", installed)
    stopping: list[bool] = []

    def stop(why: str) -> None:
        # SIGTERM may come twice: from the main process and from a kill of the process group.
        if not stopping and reactor.running:
            stopping.append(True)
            log.info("{why}: stopping", why=why)
            reactor.stop()

    try:
        config = load(args.config, args.set)
        table = SharedTable.open(args.table_fd) if args.table_fd is not None else None
        service = build_worker(config, reactor, args.index, args.listen_fd, table,
                               lambda: stop("the main process is gone"))
    except ConfigError as e:
        log.error("configuration: {error}", error=str(e))
        return 2
    except Exception:
        log.failure("worker {index} failed to start", index=args.index)
        return 1

    failed: list[bool] = []

    def start() -> None:
        try:
            service.startService()
        except Exception:
            log.failure("worker {index} failed to start", index=args.index)
            failed.append(True)
            stop("start-up failed")
            return
        tune_gc()

    signal.signal(signal.SIGTERM, lambda *_: reactor.callFromThread(stop, "SIGTERM"))
    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", lambda: service.running and service.stopService())
    reactor.run(installSignalHandlers=False)  # ours: SIGTERM stops once; SIGINT and SIGHUP are ignored
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
