"""Worker mode (`[eventstreams] workers = N`): real twistd processes on
loopback sockets. Which process serves a connection is read from /proc (the
process holding the server side of the socket), never from timing."""
from __future__ import annotations

import json
import os
import random
import signal
import uuid
from typing import Any, Optional

import treq
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool

from eventstreams.config import ConfigError, load
from eventstreams.iplimit import ADMITTED, AT_CAPACITY, OVER_IP_LIMIT, SharedLimits, SharedTable, _key
from eventstreams.backends.base import Record
from eventstreams.workers import REPORT_FD, Workers, _Control, _Worker, merge_samples

from bridges.rcstream import config as rcstream_config

from .support import (
    KAFKA, RC_TOPICS, TEST_TOPIC, async_test, create_topics, free_port, open_stream, rc_event, wait_for, write_config,
)
from .test_daemon import START_TIMEOUT, Child, DaemonTestCase

WAIT = 20.0  # bound of every wait for a condition (seconds)


# -- /proc ------------------------------------------------------------------------


def children(pid: int) -> set[int]:
    """Live (not zombie) child processes of pid."""
    found = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(name))
    return found


def alive(pid: int) -> bool:
    """The process exists and is not a zombie waiting for a reaper."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def server_socket_inode(server_port: int, client_port: int) -> Optional[int]:
    """The inode of the accepted socket whose peer is 127.0.0.1:client_port."""
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], int(fields[9])
            if int(local.split(":")[1], 16) == server_port and int(remote.split(":")[1], 16) == client_port:
                return inode
    return None


def holder(pids: set[int], inode: int) -> Optional[int]:
    """Which of pids has the socket open."""
    target = f"socket:[{inode}]"
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    return pid
            except OSError:
                continue
    return None


# -- configuration ----------------------------------------------------------------


class WorkersConfig(unittest.SynchronousTestCase):
    def path(self, extra: str = "") -> str:
        return write_config(os.path.abspath(self.mktemp()), extra)

    def assertOneLine(self, error: ConfigError, path: str, section: str, key: str, reason: str,
                      origin: str | None = None) -> None:
        """One line naming the origin of the value (the file, or the --set item)."""
        message = str(error)
        self.assertNotIn("\n", message)
        self.assertEqual((error.path, error.section, error.key), (path, section, key))
        self.assertTrue(message.startswith(f"{origin or path}: [{section}] {key}: "), message)
        self.assertIn(reason, message)

    def test_default_is_one_process(self):
        self.assertEqual(load(self.path()).service.workers, 1)

    def test_workers_is_an_integer_from_1_to_64(self):
        path = self.path()
        self.assertEqual(load(path, ["eventstreams.workers=64"]).service.workers, 64)
        for bad in ("0", "65", "two", "-1", "1.5", ""):
            with self.assertRaises(ConfigError) as caught:
                load(path, [f"eventstreams.workers={bad}"])
            self.assertOneLine(caught.exception, path, "eventstreams", "workers", "",
                               origin=f"--set eventstreams.workers={bad}")
        with self.assertRaises(ConfigError) as caught:
            load(path, ["eventstreams.workers=65"])
        self.assertIn("expected an integer from 1 to 64, got '65'", str(caught.exception))

    def test_workers_need_a_tcp_listener(self):
        path = self.path()
        self.assertEqual(load(path, ["eventstreams.workers=2", "eventstreams.listen=tcp6:0"]).service.workers, 2)
        for listen in ("unix:/tmp/es.sock", "unix:/tmp/es.sock:mode=660"):
            with self.assertRaises(ConfigError) as caught:
                load(path, ["eventstreams.workers=2", f"eventstreams.listen={listen}"])
            self.assertOneLine(caught.exception, path, "eventstreams", "listen",
                               "workers > 1 needs a tcp: or tcp6: endpoint", origin=f"--set eventstreams.listen={listen}")
        # one process may listen anywhere, as before
        self.assertEqual(load(path, ["eventstreams.listen=unix:/tmp/es.sock"]).service.workers, 1)

    def test_rcstream_needs_its_own_listener_with_workers(self):
        path = self.path("\n[rcstream]\nstream = recentchange\n")
        self.assertIsNone(rcstream_config.parse(load(path)).listen)  # mounted on the API site
        with self.assertRaises(ConfigError) as caught:
            rcstream_config.parse(load(path, ["eventstreams.workers=2"]))
        self.assertOneLine(caught.exception, path, "rcstream", "listen", "required with [eventstreams] workers > 1")
        parsed = rcstream_config.parse(load(path, ["eventstreams.workers=2", "rcstream.listen=tcp:0"]))
        self.assertEqual(parsed.listen, "tcp:0")
        with self.assertRaises(ConfigError) as caught:
            rcstream_config.parse(load(path, ["rcstream.listen=nonsense:x"]))
        self.assertOneLine(caught.exception, path, "rcstream", "listen", "not a valid endpoint string")

    def test_the_set_items_are_kept_for_the_workers(self):
        config = load(self.path(), ["eventstreams.workers=3", "eventstreams.heartbeat=5"])
        self.assertEqual(config.overrides, ("eventstreams.workers=3", "eventstreams.heartbeat=5"))


# -- the shared table -------------------------------------------------------------


class Table(unittest.SynchronousTestCase):
    def table(self, processes: int = 3, capacity: int = 16) -> SharedTable:
        table = SharedTable.create(processes, capacity)
        self.addCleanup(os.close, table.fd)
        self.addCleanup(table.close)
        return table

    def test_counts_per_address_span_processes(self):
        table = self.table()
        worker = SharedTable.open(os.dup(table.fd))  # as a worker maps the inherited fd
        self.addCleanup(worker.close)
        main, other = SharedLimits(table, 0, 0, 2), SharedLimits(worker, 1, 0, 2)
        self.assertEqual(main.acquire("10.0.0.1"), ADMITTED)
        self.assertEqual(other.acquire("10.0.0.1"), ADMITTED)
        self.assertEqual(other.acquire("10.0.0.1"), OVER_IP_LIMIT)
        self.assertEqual(main.acquire("10.0.0.1"), OVER_IP_LIMIT)
        self.assertEqual(main.acquire("10.0.0.2"), ADMITTED)
        other.release("10.0.0.1")
        self.assertEqual(main.acquire("10.0.0.1"), ADMITTED)
        self.assertEqual(table.totals(), [3, 0, 0])

    def test_max_connections_counts_every_process(self):
        table = self.table()
        a, b = SharedLimits(table, 0, 3, 0), SharedLimits(table, 2, 3, 0)
        self.assertEqual([a.acquire("x"), b.acquire("y"), b.acquire("z")], [ADMITTED] * 3)
        self.assertEqual(a.acquire("w"), AT_CAPACITY)
        b.release("y")
        self.assertEqual(a.acquire("w"), ADMITTED)

    def test_a_dead_process_column_is_cleared(self):
        table = self.table()
        main, worker = SharedLimits(table, 0, 0, 1), SharedLimits(table, 1, 0, 1)
        for n in range(5):
            self.assertEqual(worker.acquire(f"10.0.0.{n}"), ADMITTED)
        self.assertEqual(main.acquire("10.0.0.0"), OVER_IP_LIMIT)
        self.assertEqual(main.acquire("10.0.0.9"), ADMITTED)
        self.assertEqual(table.clear_process(1), 5)
        self.assertEqual(table.used, 1)
        self.assertEqual(main.acquire("10.0.0.0"), ADMITTED)
        self.assertEqual(table.totals(), [2, 0, 0])

    def test_random_operations_match_a_model(self):
        # Few rows, many colliding addresses: exercises probing and the
        # backward-shift deletion against a plain dict.
        table = self.table(processes=2, capacity=16)
        limits = [SharedLimits(table, p, 0, 3) for p in range(2)]
        rng = random.Random(7)
        model: dict[tuple[str, int], int] = {}
        for _ in range(5000):
            ip, p = f"ip{rng.randrange(10)}", rng.randrange(2)
            total = model.get((ip, 0), 0) + model.get((ip, 1), 0)
            if rng.random() < 0.55:
                expected = ADMITTED if total < 3 else OVER_IP_LIMIT
                self.assertEqual(limits[p].acquire(ip), expected)
                if expected == ADMITTED:
                    model[(ip, p)] = model.get((ip, p), 0) + 1
            elif model.get((ip, p)):
                limits[p].release(ip)
                model[(ip, p)] -= 1
        live = {ip for (ip, _), n in model.items() if n}
        self.assertEqual(table.used, len(live))
        for ip in live:
            index, found = table.find(_key(ip))
            self.assertTrue(found)
            self.assertEqual(table.row_counts(index), [model.get((ip, 0), 0), model.get((ip, 1), 0)])

    def test_a_full_table_admits_without_a_count(self):
        table = self.table(processes=1, capacity=4)  # room for 3 addresses
        limits = SharedLimits(table, 0, 0, 1)
        self.assertEqual([limits.acquire(f"a{n}") for n in range(5)], [ADMITTED] * 5)
        self.assertEqual(limits.untracked, 2)
        self.assertEqual(table.used, 3)

    def test_merge_sums_the_same_series(self):
        merged = merge_samples([
            ("c", "gauge", "h", {"stream": "a"}, 2), ("t", "counter", "h", {}, 5),
            ("c", "gauge", "h", {"stream": "a"}, 3), ("c", "gauge", "h", {"stream": "b"}, 1),
        ])
        self.assertEqual(merged, [("c", "gauge", "h", {"stream": "a"}, 5), ("t", "counter", "h", {}, 5),
                                  ("c", "gauge", "h", {"stream": "b"}, 1)])


class HeadNotices(unittest.SynchronousTestCase):
    """The wake-up path: the main process's commit → a line on each worker's
    control pipe → one notice_heads per read in the worker."""

    def test_announce_writes_the_new_heads_to_every_worker(self):
        class Worker:
            def __init__(self):
                self.lines = []

            def notify(self, line):
                self.lines.append(line)

        supervisor = Workers.__new__(Workers)
        supervisor.workers = {1: Worker(), 2: Worker()}
        supervisor.announce([Record("t", 0, 4, 1, None, b"{}"), Record("t", 0, 5, 1, None, b"{}"),
                             Record("u", 1, 0, 1, None, b"{}")])
        for worker in supervisor.workers.values():
            self.assertEqual([json.loads(line) for line in worker.lines], [{"heads": [["t", 0, 6], ["u", 1, 1]]}])
            self.assertTrue(worker.lines[0].endswith(b"\n"))

    def test_reports_are_checked_before_metrics_use_them(self):
        worker = _Worker(None, 1)
        good = [["eventstreams_hubs", "gauge", "Running hubs.", {}, 2]]
        worker.childDataReceived(REPORT_FD, json.dumps({"samples": good}).encode() + b"\n")
        self.assertTrue(worker.ready)
        for bad in (b"{", b'{"samples": [["x", "gauge", "h", {}, "2"]]}', b'{"samples": [["x", "gauge"]]}',
                    b'{"samples": [["x", "gauge", "h", {"a": 1}, 2]]}', b'{"other": 1}'):
            worker.childDataReceived(REPORT_FD, bad + b"\n")
        self.assertEqual(worker.samples, [("eventstreams_hubs", "gauge", "Running hubs.", {}, 2)])

    def test_control_merges_a_read_into_one_wake_up(self):
        class Backend:
            def __init__(self):
                self.notices = []

            def notice_heads(self, heads):
                self.notices.append(heads)

        backend, lost = Backend(), []
        control = _Control(backend, lambda: lost.append(True))
        control.dataReceived(b'{"heads": [["t", 0, 6]]}\n{"heads": [["t", 0, 9], ["u", 1, 1]]}\n{"heads": [["t", 0')
        self.assertEqual(backend.notices, [{("t", 0): 9, ("u", 1): 1}])
        control.dataReceived(b', 12]]}\nnot json\n')  # a bad line is logged and skipped
        self.assertEqual(backend.notices[1:], [{("t", 0): 12}])
        self.flushLoggedErrors()
        control.connectionLost(None)
        self.assertEqual(lost, [True])


# -- the daemon with workers ------------------------------------------------------


class WorkerDaemon(DaemonTestCase):
    timeout = 120

    async def start(self, workers: int, *sets: str, extra: str = "", prefix: str = "") -> tuple[Child, dict[str, int]]:
        ports = {"eventstreams": free_port(), "intake": free_port(), "metrics": free_port()}
        path = write_config(os.path.abspath(self.mktemp()), extra, prefix)
        args = ["-c", path, "--set", f"eventstreams.workers={workers}"]
        for name, port in ports.items():
            args += ["--set", f"{name}.listen=tcp:{port}:interface=127.0.0.1"]
        for item in sets:
            args += ["--set", item]
        child = self.spawn(*args)
        await self.wait_listening(child, ports["eventstreams"])
        self.ports = ports
        await self.wait_workers(child, workers - 1)
        return child, ports

    async def http(self, method: str, port: int, path: str, **kwargs: Any) -> tuple[int, bytes]:
        pool = HTTPConnectionPool(reactor, persistent=False)
        response = await treq.request(method, f"http://127.0.0.1:{port}{path}", pool=pool, **kwargs)
        return response.code, await response.content()

    async def metric(self, name: str) -> float:
        _, body = await self.http("GET", self.ports["metrics"], "/")
        for line in body.decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    async def until(self, what: str, check: Any, child: Optional[Child] = None) -> Any:
        """wait_for, at most WAIT seconds, with the child's output when it fails."""
        return await wait_for(check, lambda: f"{what}\n{child.output[-3000:] if child is not None else ''}", WAIT, 0.05)

    def workers_of(self, child: Child) -> set[int]:
        return children(child.transport.pid)

    async def wait_workers(self, child: Child, n: int) -> set[int]:
        await self.until(f"{n} workers serving", lambda: self._serving(n), child)
        return self.workers_of(child)

    async def _serving(self, n: int) -> bool:
        return await self.metric("eventstreams_worker_processes") == n

    async def stream(self, path: str = "/v2/stream/recentchange", headers: Optional[dict] = None) -> Any:
        client = await open_stream(self.ports["eventstreams"], path, headers)
        self.addCleanup(lambda: client.transport.loseConnection())
        return client

    def served_by(self, child: Child, client: Any) -> int:
        inode = server_socket_inode(self.ports["eventstreams"], client.transport.getHost().port)
        if inode is None:
            self.fail("the connection's server socket was not found")
        pid = holder({child.transport.pid} | self.workers_of(child), inode)
        if pid is None:
            self.fail("no process of the daemon holds the connection")
        return pid

    async def stream_on_new_process(self, child: Child, seen: set[int], headers: Optional[dict] = None,
                                    tries: int = 200) -> tuple[Any, int]:
        """Open streams (closing the others) until one lands on a process not in seen."""
        for _ in range(tries):
            client = await self.stream(headers=headers)
            self.assertEqual(client.status, 200, client.body)
            pid = self.served_by(child, client)
            if pid not in seen:
                return client, pid
            await client.close()
        self.fail(f"{tries} connections all landed on {seen}")

    async def post(self, events: list[dict]) -> None:
        code, body = await self.http("POST", self.ports["intake"], "/v1/events", data=json.dumps(events).encode(),
                                     headers={"content-type": "application/json"})
        self.assertIn(code, (200, 201, 202), body)

    @async_test
    async def test_every_process_serves_and_gets_every_event(self):
        await self.every_process_gets_every_event()

    @async_test
    async def test_every_process_gets_every_event_over_kafka(self):
        if not KAFKA:
            message = "no Kafka broker: set EVENTSTREAMS_KAFKA (make test starts one with scripts/kafka)"
            if os.environ.get("CI") == "true":
                self.fail(message)
            raise unittest.SkipTest(message)
        prefix = f"t{uuid.uuid4().hex[:10]}."
        await deferToThread(create_topics, {prefix + t: 1 for t in RC_TOPICS + (TEST_TOPIC,)})
        await self.every_process_gets_every_event(
            "eventstreams.backend=kafka", f"kafka.bootstrap.servers={KAFKA}", prefix=prefix)

    async def every_process_gets_every_event(self, *sets: str, prefix: str = "") -> None:
        child, ports = await self.start(3, *sets, prefix=prefix)
        main = child.transport.pid
        workers = self.workers_of(child)
        self.assertEqual(len(workers), 2)
        # Clients spread over the processes; keep one on each of the three.
        clients: list[Any] = []
        pids: set[int] = set()
        while len(pids) < 3:
            client, pid = await self.stream_on_new_process(child, pids)
            clients.append(client)
            pids.add(pid)
        self.assertEqual(pids, {main} | workers)
        more = [await self.stream() for _ in range(20)]
        await self.post([rc_event(n) for n in range(3)])
        for client in clients + more:
            await client.wait_events(3, timeout=WAIT)
            self.assertEqual([e["id"] for e in client.events], [0, 1, 2])
        # Metrics sum the processes (the workers report once a second).
        await self.until("metrics summing every process",
                         lambda: self._metric_equals('eventstreams_connected_clients{stream="mediawiki.recentchange"}',
                                                     len(clients) + len(more)), child)
        # Each worker's other routes work too.
        for _ in range(5):
            code, body = await self.http("GET", ports["eventstreams"], "/v2/streams")
            self.assertEqual(code, 200)
        self.assertNotIn("Traceback", child.output)

    async def _metric_equals(self, series: str, value: float) -> bool:
        _, body = await self.http("GET", self.ports["metrics"], "/")
        return f"{series} {value}" in body.decode() or f"{series} {int(value)}" in body.decode()

    @async_test
    async def test_the_per_ip_limit_spans_processes(self):
        child, _ = await self.start(3, "eventstreams.client_ip_connection_limit=3")
        # Three streams of 127.0.0.1, at least two processes holding them,
        # so no single process has three of its own.
        held, pids = [], set()
        while len(pids) < 2:
            client, pid = await self.stream_on_new_process(child, pids)
            held.append(client)
            pids.add(pid)
        held.append(await self.stream())
        self.assertEqual([c.status for c in held], [200, 200, 200])
        for _ in range(6):  # wherever they land, the fourth and later are refused
            extra = await self.stream()
            self.assertEqual(extra.status, 429, extra.body)
            await extra.close()
        await held[0].close()  # frees a slot once the server sees the close
        await self.until("a freed slot", lambda: self._status_is(200), child)

    async def _status_is(self, status: int) -> bool:
        client = await self.stream()
        if client.status == status:
            return True
        await client.close()
        return False

    @async_test
    async def test_a_killed_worker_is_respawned_and_its_slots_freed(self):
        child, ports = await self.start(2, "eventstreams.client_ip_connection_limit=1",
                                        "eventstreams.client_ip_header=X-Client-IP")
        (worker,) = self.workers_of(child)
        # Streams with distinct addresses until one is held by the worker.
        n = 0
        while True:
            n += 1
            client = await self.stream(headers={"X-Client-IP": f"10.0.0.{n}"})
            self.assertEqual(client.status, 200)
            if self.served_by(child, client) == worker:
                break
            self.assertLess(n, 200)
        again = await self.stream(headers={"X-Client-IP": f"10.0.0.{n}"})
        self.assertEqual(again.status, 429)
        os.kill(worker, signal.SIGKILL)
        await client.closed  # the kernel closed the dead worker's connection
        (new,) = await self.until("a respawned worker", lambda: self.workers_of(child) - {worker} or None, child)
        self.assertNotEqual(new, worker)
        await self.wait_workers(child, 1)
        self.assertIn("exited unexpectedly (signal 9)", child.output)
        self.assertEqual(await self.metric("eventstreams_worker_restarts_total"), 1)
        # The main process cleared the dead worker's count: the address may connect again.
        back = await self.stream(headers={"X-Client-IP": f"10.0.0.{n}"})
        self.assertEqual(back.status, 200, back.body)
        # The listener kept serving throughout, and serves on the new worker too.
        replacement, pid = await self.stream_on_new_process(
            child, {child.transport.pid}, headers={"X-Client-IP": "10.1.0.1"})
        self.assertEqual(pid, new)

    @async_test
    async def test_stopping_the_main_process_stops_every_worker(self):
        child, _ = await self.start(3)
        workers = self.workers_of(child)
        self.assertEqual(len(workers), 2)
        client = await self.stream()
        child.transport.signalProcess("TERM")
        await self.finish(child)
        self.assertIn((child.exit_code, child.signal), [(0, None), (None, signal.SIGTERM)], child.output[-3000:])
        self.assertEqual([pid for pid in workers if alive(pid)], [])
        self.assertIn("worker 1 (pid", child.output)
        self.assertRegex(child.output, r"\[worker 2 pid \d+\] SIGTERM: stopping")
        self.assertNotIn("Traceback", child.output)
        self.assertNotIn("exited unexpectedly", child.output)
        await client.wait_for(lambda: client.done, timeout=WAIT)

    @async_test
    async def test_workers_exit_when_the_main_process_dies(self):
        child, _ = await self.start(3)
        workers = self.workers_of(child)
        child.transport.signalProcess("KILL")
        await self.finish(child)
        await self.until("the orphaned workers to exit", lambda: not any(alive(pid) for pid in workers))

    @async_test
    async def test_rcstream_on_its_own_listener_in_the_main_process(self):
        rc = free_port()
        child, ports = await self.start(2, f"rcstream.listen=tcp:{rc}:interface=127.0.0.1",
                                        extra="\n[rcstream]\nstream = recentchange\n")
        code, body = await self.http("GET", rc, "/rcstream_status")
        self.assertEqual(code, 200, body)
        code, _ = await self.http("GET", ports["eventstreams"], "/rcstream_status")
        self.assertEqual(code, 404)

    @async_test
    async def test_workers_without_an_rcstream_listener_exit_with_one_line(self):
        path = write_config(os.path.abspath(self.mktemp()), "\n[rcstream]\nstream = recentchange\n")
        child = await self.finish(self.spawn("-c", path, "--set", "eventstreams.workers=2"), START_TIMEOUT)
        self.assertEqual(child.exit_code, 1)
        lines = [line for line in child.output.splitlines() if line.strip()]
        self.assertEqual(lines, [f"eventstreams: {path}: [rcstream] listen: required with [eventstreams] workers > 1 "
                                 "(a listener of its own, served by the main process)"])

    @async_test
    async def test_bad_workers_value_exits_with_one_line(self):
        path = write_config(os.path.abspath(self.mktemp()))
        child = await self.finish(self.spawn("-c", path, "--set", "eventstreams.workers=100"), START_TIMEOUT)
        self.assertEqual(child.exit_code, 1)
        lines = [line for line in child.output.splitlines() if line.strip()]
        self.assertEqual(lines, ["eventstreams: --set eventstreams.workers=100: [eventstreams] workers: "
                                 "expected an integer from 1 to 64, got '100'"])
