"""S8: the bridges under load (issue 7, target T11).

`python -m bench irc --clients N --seconds S`: N IRC clients (raw sockets,
NICK/USER, wait for 001, JOIN the channel, answer PING) on the [irc]
bridge, 30 recentchange lines a second.

`python -m bench socketio --clients N --seconds S`: N Socket.IO 0.9
WebSocket clients of the RCStream bridge (`GET /socket.io/1/` handshake, then
`/socket.io/1/websocket/SID`, connect `/rc`, `subscribe` to `*.wikidata.org`
with an ack, answer heartbeats), 30 `change` events a second.
`python -m bench engineio …` is the same over Engine.IO 4 (`/socket.io/?EIO=4
&transport=websocket`, `40/rc,`, `42/rc,1["subscribe",…]`, answer pings).

How the figures are measured:

- The publisher posts the sample recentchange events (all www.wikidata.org,
  so all go to `#wikidata.wikipedia` and match `*.wikidata.org`), each
  stamped with `bench_seq` (0, 1, …) and `bench_ts` (publish wall time), and
  with `bench:SEQ:TS ` put in front of its comment (`log_action_comment` for
  log entries), which is where the IRC formatter (bridges/irc/rcfmt.py)
  shows it; Socket.IO changes carry `bench_seq`/`bench_ts` themselves.
- One primer event is published before the clients connect: an IRC channel
  exists only once the bot has written to it.
- Every client counts the bot lines / change events it gets; the no-loss
  check is "every client got exactly as many as were published". Sampled
  clients (1 in N/200) parse every line/event: latency = receive wall time -
  publish time, and the sequence numbers they saw must be 0 … published-1
  exactly once each (missing / duplicate counts).
"""
from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import json
import multiprocessing
import os
import re
import time
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from . import __main__ as base
from . import load

CHANNEL = "#wikidata.wikipedia"  # the channel of every sample event (wiki = wikidatawiki)
PATTERN = "*.wikidata.org"  # the RCStream subscription matching every sample event
RATE = 30  # lines (events) a second
MARK = re.compile(rb"bench:(\d+):([0-9.]+)")

IRC_SECTION = """
[irc]
listen = tcp:{irc}:interface=127.0.0.1:backlog=4096
stream = mediawiki.recentchange
ping_interval = 45
ping_timeout = 180
queue_size = 1000
max_clients = 0
max_clients_per_address = 0
connect_rate_per_address = 0
connect_burst_per_address = 0
"""

RCSTREAM_SECTION = """
[rcstream]
stream = mediawiki.recentchange
heartbeat = 25s
session_timeout = 60s
poll_timeout = 20s
max_subscriptions = 10
max_queue = 1000
# every load client comes from loopback: no per-address caps (issue 12's)
max_sessions = 0
max_sessions_per_address = 0
max_handshakes_per_second = 0
"""


class BridgeServer(base.Server):
    """bench's Server (twistd, embedded log, core 0) with a bridge section."""

    def __init__(self, section: str, sets: tuple[str, ...] = ()) -> None:
        self.irc = base.free_port()
        config = base.CONFIG
        base.CONFIG = config + section.replace("{irc}", str(self.irc)).replace("{", "{{").replace("}", "}}")
        try:
            super().__init__(sets=sets)
        finally:
            base.CONFIG = config
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/", timeout=1).read()
                break
            except OSError:
                time.sleep(0.1)

    def metric(self, name: str) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/", timeout=5).read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name + " ") or line.startswith(name + "{"))


class MarkedPublisher(base.Publisher):
    """bench's Publisher, each event marked with its sequence number and
    publish time (in `bench_seq`/`bench_ts` and in front of the comment)."""

    def marked(self, seq: int, sample: int) -> dict:
        event = dict(self.samples[sample % len(self.samples)])
        event["meta"] = dict(event["meta"], stream="mediawiki.recentchange", id=str(uuid.uuid4()))  # the intake stores an id once
        ts = time.time()
        key = "log_action_comment" if event.get("type") == "log" else "comment"
        event[key] = f"bench:{seq}:{ts:.6f} {event.get(key) or ''}"
        event["bench_seq"], event["bench_ts"] = seq, ts
        return event

    def post(self, events: list) -> None:
        url = f"http://127.0.0.1:{self.server.intake}/v1/events"
        request = urllib.request.Request(url, json.dumps(events).encode(), {"content-type": "application/json"})
        try:
            urllib.request.urlopen(request, timeout=30).read()
        except OSError:
            self.failed_posts += 1

    def prime(self) -> None:
        """One event before the clients come: it creates the IRC channel."""
        self.failed_posts = 0
        self.post([self.marked(-1, len(self.samples) - 1)])

    def run(self) -> None:
        """Open loop: each post leaves on schedule from a pool of connections,
        whether or not the server has answered the previous ones."""
        interval = 1 / self.rate
        end = time.monotonic() + self.seconds
        next_at = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            while time.monotonic() < end:
                pool.submit(self.post, [self.marked(self.sent, self.sent)])
                self.sent += 1
                next_at += interval
                time.sleep(max(0.0, next_at - time.monotonic()))


def core_times() -> dict:
    """{core: (busy, total)} jiffies from /proc/stat."""
    times = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                name, *values = line.split()
                numbers = [int(v) for v in values]
                idle = numbers[3] + numbers[4]
                times[int(name[3:])] = (sum(numbers) - idle, sum(numbers))
    return times


def busy(before: dict, after: dict, core: int) -> float:
    return (after[core][0] - before[core][0]) / max(1, after[core][1] - before[core][1])


# -- the load generator's side ---------------------------------------------------


@dataclass
class Result:
    connected: int = 0  # registered and joined / subscribed
    failed: int = 0
    lines: int = 0  # bot lines or change events received, all clients
    counts: list = field(default_factory=list)  # per client
    latencies: list = field(default_factory=list)  # sampled clients
    sampled: int = 0
    missing: int = 0  # sampled clients: sequence numbers never received
    duplicates: int = 0
    pings: int = 0  # PINGs / heartbeats answered
    errors: list = field(default_factory=list)


class Client(asyncio.Protocol):
    """What both kinds share: a ready future, counting, the sampled checks."""

    transport: asyncio.Transport  # set by connection_made

    def __init__(self, result: Result, sample: bool):
        self.result = result
        self.sample = sample
        self.count = 0
        self.seqs: list = []
        self.ready = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc) -> None:
        if not self.ready.done():
            self.ready.set_result(False)

    def mark(self, seq: int, ts: float, now: float) -> None:
        if seq >= 0:
            self.seqs.append(seq)
            self.result.latencies.append(now - ts)


class IRCClient(Client):
    TAIL = len(b" PRIVMSG #") - 1

    def __init__(self, result: Result, sample: bool, nick: str):
        super().__init__(result, sample)
        self.nick = nick
        self.buffer = b""
        self.joined = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(f"NICK {self.nick}\r\nUSER {self.nick} 0 * :bench\r\n".encode())

    def data_received(self, data: bytes) -> None:
        if not self.joined or self.sample:
            self.buffer += data
            self._lines()
            return
        # a joined client that is not sampled: count bot lines, keep a tail
        # in case a PRIVMSG is cut between two reads
        joined = self.buffer + data
        n = joined.count(b" PRIVMSG #")
        self.count += n
        self.result.lines += n
        if b"\nPING " in joined or joined.startswith(b"PING "):
            self.transport.write(b"PONG :bench\r\n")  # the server only notes the time of a PONG
            self.result.pings += 1
        self.buffer = joined[-self.TAIL:]

    def _lines(self) -> None:
        *lines, self.buffer = self.buffer.split(b"\r\n")
        now = time.time()
        for line in lines:
            if line.startswith(b"PING "):
                self.transport.write(b"PONG " + line[5:] + b"\r\n")
                self.result.pings += 1
                continue
            parts = line.split(b" ", 3)
            if len(parts) < 2:
                continue
            command = parts[1]
            if command == b"PRIVMSG":
                self.count += 1
                self.result.lines += 1
                if self.sample:
                    match = MARK.search(line)
                    if match:
                        self.mark(int(match.group(1)), float(match.group(2)), now)
            elif command == b"001":
                self.transport.write(f"JOIN {CHANNEL}\r\n".encode())
            elif command == b"366":  # end of NAMES: joined
                self.joined = True
                if not self.ready.done():
                    self.ready.set_result(True)
            elif command in (b"403", b"433", b"432", b"451") or line.startswith(b"ERROR"):
                if len(self.result.errors) < 5:
                    self.result.errors.append(line.decode("utf-8", "replace"))
                if not self.ready.done():
                    self.ready.set_result(False)
        if self.joined and not self.sample:
            self.buffer = b"\r\n" + self.buffer  # the partial line, for the counting path


class WebSocketClient(Client):
    """A minimal RFC 6455 client: masked text frames out, unmasked frames in."""

    CHANGE = {"sio09": b'5::/rc:{"name":"change"', "eio4": b'42/rc,["change"'}

    def __init__(self, result: Result, sample: bool, path: str, protocol: str):
        super().__init__(result, sample)
        self.path = path
        self.protocol = protocol
        self.change = self.CHANGE[protocol]
        self.buffer = bytearray()
        self.open = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write((f"GET {self.path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                         f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                         f"Origin: http://127.0.0.1\r\n\r\n").encode())

    def send(self, text: str, opcode: int = 1) -> None:
        payload = text.encode()
        mask = os.urandom(4)
        n = len(payload)
        head = bytes([0x80 | opcode]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big"))
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.transport.write(head + mask + masked)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        if not self.open:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(buffer[:end]).split(b" ", 2)[1]
            if status != b"101":
                self._fail(f"websocket handshake answered {status.decode()}")
                return
            self.open = True
            del buffer[:end + 4]
        pos, size = 0, len(buffer)
        now = 0.0
        while size - pos >= 2:
            opcode, length = buffer[pos] & 0x0F, buffer[pos + 1] & 0x7F
            start = pos + 2
            if length == 126:
                if size - pos < 4:
                    break
                length, start = int.from_bytes(buffer[pos + 2:pos + 4], "big"), pos + 4
            elif length == 127:
                if size - pos < 10:
                    break
                length, start = int.from_bytes(buffer[pos + 2:pos + 10], "big"), pos + 10
            end = start + length
            if end > size:
                break
            if opcode == 1 and buffer.startswith(self.change, start):
                self.count += 1
                self.result.lines += 1
                if self.sample:
                    now = now or time.time()
                    self._sampled(bytes(buffer[start:end]), now)
            elif opcode == 1:
                self.message(bytes(buffer[start:end]).decode("utf-8", "replace"))
            elif opcode == 9:
                self.send(bytes(buffer[start:end]).decode("latin-1"), 10)
            elif opcode == 8:
                self._fail("closed by the server")
            pos = end
        del buffer[:pos]

    def _sampled(self, payload: bytes, now: float) -> None:
        if self.protocol == "sio09":
            change = json.loads(payload[len(b"5::/rc:"):])["args"][0]
        else:
            change = json.loads(payload[len(b"42/rc,"):])[1]
        self.mark(change["bench_seq"], change["bench_ts"], now)

    def message(self, text: str) -> None:
        if self.protocol == "sio09":
            if text == "1::":
                self.send("1::/rc")
            elif text == "1::/rc":
                self.send('5:1+:/rc:{"name":"subscribe","args":["%s"]}' % PATTERN)
            elif text.startswith("6:::1+") or text.startswith("6::/rc:1+"):
                self._subscribed(text)
            elif text == "2::":
                self.send("2::")
                self.result.pings += 1
            elif text.startswith("7:") or text.startswith("0:"):
                self._fail(text)
        else:
            if text.startswith("0{"):
                self.send("40/rc,")
            elif text.startswith("40/rc,"):
                self.send('42/rc,1["subscribe","%s"]' % PATTERN)
            elif text.startswith("43/rc,1"):
                self._subscribed(text)
            elif text == "2":
                self.send("3")
                self.result.pings += 1
            elif text.startswith("44") or text.startswith("1"):
                self._fail(text)

    def _subscribed(self, text: str) -> None:
        if "[null]" not in text:
            self._fail(f"subscribe answered {text}")
        elif not self.ready.done():
            self.ready.set_result(True)

    def _fail(self, why: str) -> None:
        if len(self.result.errors) < 5:
            self.result.errors.append(why)
        if not self.ready.done():
            self.ready.set_result(False)
        self.transport.abort()


async def sio09_handshake(host: str, port: int, source: str) -> str:
    """`GET /socket.io/1/` on a connection of its own: the session id."""
    reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
    writer.write(b"GET /socket.io/1/ HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    if b" 200 " not in head.split(b"\r\n", 1)[0]:
        raise OSError(f"handshake answered {head[:40]!r}")
    return body.decode().split(":", 1)[0]


async def run_worker(kind: str, host: str, port: int, count: int, sample_every: int, worker: int,
                     ready_queue, stop, progress, result: Result | None = None) -> Result:
    loop = asyncio.get_running_loop()
    result = Result() if result is None else result  # given: e.g. with latencies kept apart
    clients: list = []

    async def connect(i: int) -> None:
        source = load.SOURCE_ADDRESSES[(worker + i) % len(load.SOURCE_ADDRESSES)]
        sample = i % sample_every == 0
        factory: Callable[[], Client]
        try:
            if kind == "irc":
                factory = lambda: IRCClient(result, sample, f"b{worker}x{i}")  # noqa: E731
            elif kind == "socketio":
                sid = await sio09_handshake(host, port, source)
                factory = lambda: WebSocketClient(result, sample, f"/socket.io/1/websocket/{sid}", "sio09")  # noqa: E731
            else:
                factory = lambda: WebSocketClient(result, sample, "/socket.io/?EIO=4&transport=websocket", "eio4")  # noqa: E731
            _, client = await loop.create_connection(factory, host, port, local_addr=(source, 0))
            clients.append(client)
        except OSError as e:
            result.failed += 1
            if len(result.errors) < 5:
                result.errors.append(str(e))

    # at most 100 handshakes in flight
    for first in range(0, count, 100):
        await asyncio.gather(*(connect(i) for i in range(first, min(count, first + 100))))
    if clients:
        await asyncio.wait([c.ready for c in clients], timeout=60)
    result.connected = sum(1 for c in clients if c.ready.done() and c.ready.result())
    result.failed += len(clients) - result.connected
    ready_queue.put(worker)
    while not stop.is_set():
        progress.value = result.lines
        await asyncio.sleep(0.1)
    progress.value = result.lines
    for c in clients:
        c.transport.abort()
        if c.ready.done() and c.ready.result():
            result.counts.append(c.count)
        if c.sample and c.ready.done() and c.ready.result():
            result.sampled += 1
            seen = Counter(c.seqs)
            result.duplicates += sum(n - 1 for n in seen.values() if n > 1)
            result.missing += len(set(range(stop.published.value)) - set(seen))
    return result


class Stop:
    """A stop flag and the number of events published, shared with workers."""

    def __init__(self) -> None:
        self.event = multiprocessing.Event()
        self.published = multiprocessing.Value("q", 0, lock=False)

    def is_set(self) -> bool:
        return self.event.is_set()


def _worker_main(args: tuple[str, str, int, int, int, int], result_queue, ready_queue, stop, progress) -> None:
    import uvloop

    if len(os.sched_getaffinity(0)) > 1:
        os.sched_setaffinity(0, {1})  # the server has core 0
    uvloop.install()
    result_queue.put(asyncio.run(run_worker(*args, ready_queue, stop, progress)))


# -- the scenario ---------------------------------------------------------------------


def run(args) -> None:
    kind = args.scenario
    server = BridgeServer(IRC_SECTION if kind == "irc" else RCSTREAM_SECTION)
    report = base.report
    try:
        publisher = MarkedPublisher(server, RATE, args.seconds)
        publisher.prime()
        rss0, cpu0 = server.rss_kib(), server.cpu()
        port = server.irc if kind == "irc" else server.port
        processes = max(1, min(4, (args.clients + 2499) // 2500))
        per = [args.clients // processes + (1 if i < args.clients % processes else 0) for i in range(processes)]
        sample_every = max(1, args.clients // 200)
        result_queue: multiprocessing.Queue = multiprocessing.Queue()
        ready_queue: multiprocessing.Queue = multiprocessing.Queue()
        stop = Stop()
        progress = [multiprocessing.Value("q", 0, lock=False) for _ in per]
        t0 = time.monotonic()
        procs = [multiprocessing.Process(target=_worker_main, args=(
            (kind, "127.0.0.1", port, n, sample_every, i), result_queue, ready_queue, stop, progress[i]))
            for i, n in enumerate(per)]
        for p in procs:
            p.start()
        for _ in procs:
            ready_queue.get(timeout=180)
        ramp = time.monotonic() - t0
        rss1, cpu1 = server.rss_kib(), server.cpu()
        gauge = "eventstreams_irc_clients" if kind == "irc" else "eventstreams_rcstream_sessions"
        held = int(server.metric(gauge))
        lines0 = sum(v.value for v in progress)
        cores0, wall0 = core_times(), time.monotonic()
        publisher.start()
        publisher.join()
        cpu_pub, cores1, wall1 = server.cpu(), core_times(), time.monotonic()
        published = publisher.sent - publisher.failed_posts
        stop.published.value = published
        # drain: until every client has every line, or 5 s without progress (at most 30 s)
        t_pub = time.monotonic()
        last, last_change = -1, time.monotonic()
        while time.monotonic() - t_pub < 30 and time.monotonic() - last_change < 5:
            total = sum(v.value for v in progress)
            if total >= published * held + lines0:
                break
            if total != last:
                last, last_change = total, time.monotonic()
            time.sleep(0.1)
        drain = time.monotonic() - t_pub
        cpu2 = server.cpu()
        server_lines = server.metric("eventstreams_irc_lines_sent_total") if kind == "irc" else \
            server.metric("eventstreams_rcstream_changes_total")
        dropped = server.metric("eventstreams_irc_lines_dropped_total") if kind == "irc" else \
            server.metric("eventstreams_rcstream_slow_closed_total")
        rss2 = server.rss_kib()
        stop.event.set()
        results = [result_queue.get(timeout=120) for _ in procs]
        for p in procs:
            p.join()
        r = load.merge(results)
        unit = "lines" if kind == "irc" else "events"
        complete = sum(1 for c in r.counts if c == published)
        report("clients ready (joined / subscribed) / failed", f"{r.connected} / {r.failed}")
        report("server-side count (" + gauge + ")", held)
        report("ramp time", f"{ramp:.1f}", "s")
        report("connect rate (ready clients / ramp)", f"{r.connected / ramp:.0f}", "conn/s")
        report("server RSS before / after ramp", f"{rss0 // 1024} / {rss1 // 1024}", "MiB")
        report("server RSS per client", f"{(rss1 - rss0) / max(1, r.connected):.2f}", "KiB")
        report(f"{unit} published (at {RATE}/s for {args.seconds:.0f} s; failed posts)",
               f"{published} ({publisher.failed_posts})")
        report(f"{unit} received / expected", f"{r.lines} / {published * r.connected}")
        report(f"clients with every {unit[:-1]} (count == published)", f"{complete} / {r.connected}")
        report("per-client count min / max", f"{min(r.counts, default=0)} / {max(r.counts, default=0)}")
        report(f"server: {'lines sent / dropped' if kind == 'irc' else 'changes queued / slow sessions closed'}",
               f"{server_lines:.0f} / {dropped:.0f}")
        report("deliveries per second (received / publish time)", f"{r.lines / args.seconds:.0f}", "/s")
        report("drain after the last publish", f"{drain:.1f}", "s")
        report("server CPU during publishing", f"{cpu_pub - cpu1:.1f}", "s")
        report("core 0 busy / of it the server (shared machine)",
               f"{busy(cores0, cores1, 0) * 100:.0f}% / {(cpu_pub - cpu1) / (wall1 - wall0) * 100:.0f}%")
        report("core 1 busy (load generator and others)", f"{busy(cores0, cores1, 1) * 100:.0f}%")
        report("deliveries per server CPU second", f"{r.lines / max(0.01, cpu2 - cpu1):.0f}", "/s")
        report("latency p50 / p99 / max (sampled clients)",
               f"{base.percentile(r.latencies, .5) * 1000:.1f} / {base.percentile(r.latencies, .99) * 1000:.1f} / "
               f"{max(r.latencies, default=float('nan')) * 1000:.1f}", "ms")
        report("sampled clients / latencies", f"{r.sampled} / {len(r.latencies)}")
        report("missing / duplicates (sampled clients)", f"{r.missing} / {r.duplicates}")
        report("pings answered", r.pings)
        if r.errors:
            report("first errors", "; ".join(r.errors[:5]))
        report("server CPU total", f"{cpu2 - cpu0:.1f}", "s")
        report("server RSS at end", rss2 // 1024, "MiB")
    finally:
        server.stop()
