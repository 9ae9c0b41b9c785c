"""The load generator: processes of asyncio+uvloop holding raw SSE connections.

Each worker opens its share of connections (spread over several 127.x
source addresses so one address never runs out of ports), counts frames on
every connection, and on sampled connections parses events to check
per-partition `meta.offset` continuity and measure publish→receive latency
from the `bench_ts` the publisher puts in each event.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import multiprocessing
import os
import socket
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Optional

SOURCE_ADDRESSES = [f"127.0.0.{i}" for i in range(2, 12)]
MARKER = b"event: message"
STALLED_DRAIN = 10.0  # S6: seconds the stalled clients read at the end


@dataclass
class WorkerResult:
    connected: int = 0
    failed: int = 0  # connect() failed
    unanswered: int = 0  # closed by the server before a response head (e.g. cut by a head budget)
    statuses: dict = field(default_factory=dict)
    frames: int = 0
    latencies: list = field(default_factory=list)
    gaps: int = 0
    duplicates: int = 0
    connect_seconds: float = 0.0
    first_byte: list = field(default_factory=list)  # seconds from connect to the first event
    resumed: int = 0  # S5: reconnections with Last-Event-ID answered 200
    resume_seconds: list = field(default_factory=list)  # S5: reconnect to response head
    stalled: int = 0  # S6: clients that stopped reading after the response head
    stalled_frames: int = 0  # what they got once they read again
    stalled_gaps: int = 0
    stalled_duplicates: int = 0


class SSEClient(asyncio.Protocol):
    def __init__(self, path: str, sample: bool, result: WorkerResult, headers: str = "", read: bool = True,
                 offsets: Optional[dict] = None, track_ids: bool = False):
        self.path = path
        self.sample = sample
        self.result = result
        self.headers = headers
        self.read = read
        self.buffer = b""
        self.tail = b""
        self.head_done = False
        self.offsets: dict = {} if offsets is None else offsets  # shared across reconnections (S5)
        self.track_ids = track_ids
        self.id_buffer = b""
        self.started = time.monotonic()
        self.got_first = False
        self.connected = asyncio.get_running_loop().create_future()
        self.last_id: Optional[str] = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(
            f"GET {self.path} HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n{self.headers}\r\n".encode()
        )

    def data_received(self, data: bytes) -> None:
        if not self.head_done:
            self.buffer += data
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            status = int(self.buffer.split(b" ", 2)[1])
            self.result.statuses[status] = self.result.statuses.get(status, 0) + 1
            self.head_done = True
            data = self.buffer[end + 4:]
            self.buffer = b""
            if not self.connected.done():
                self.connected.set_result(status)
            if not self.read:  # S6: stop reading until the end of the run
                self.transport.pause_reading()
                self.buffer = data
                return
        if self.track_ids:
            self._track_id(data)
        # Reads may cut a frame anywhere: count over the previous read's last
        # bytes too (too short to hold a whole marker, so none counts twice).
        count = (self.tail + data).count(MARKER)
        self.tail = data[-(len(MARKER) - 1):]
        if count:
            self.result.frames += count
            if not self.got_first:
                self.got_first = True
                self.result.first_byte.append(time.monotonic() - self.started)
        if self.sample:
            self.buffer += data
            self._parse()

    def read_again(self) -> None:
        """S6: a stalled client reads again, starting with what it held back."""
        self.read = True
        data, self.buffer = self.buffer, b""
        self.transport.resume_reading()
        if data:
            self.data_received(data)

    def _track_id(self, data: bytes) -> None:
        """Keep the last complete `id:` line (frames are whole chunks, but
        data_received may cut anywhere)."""
        buffer = self.id_buffer + data
        start = buffer.rfind(b"\nid: ")
        while start >= 0:
            end = buffer.find(b"\n", start + 5)
            if end >= 0:
                self.last_id = buffer[start + 5:end].decode()
                break
            start = buffer.rfind(b"\nid: ", 0, start)
        self.id_buffer = buffer[-8192:]

    def _parse(self) -> None:
        now = time.time()
        buffer = self.buffer
        pos = 0
        while True:
            start = buffer.find(b"\ndata: ", pos)
            if start < 0:
                break
            end = buffer.find(b"\n", start + 7)
            if end < 0:
                break
            line = buffer[start + 7:end]
            pos = end
            try:
                event = json.loads(line)
            except ValueError:
                continue  # a chunk-size line cut through the data: rare, skip
            meta = event.get("meta", {})
            tp = (meta.get("topic"), meta.get("partition"))
            offset = meta.get("offset")
            previous = self.offsets.get(tp)
            if previous is not None:
                if offset <= previous:
                    self.result.duplicates += 1
                elif offset > previous + 1:
                    self.result.gaps += 1
            self.offsets[tp] = offset
            if "bench_ts" in event:
                self.result.latencies.append(now - event["bench_ts"])
        self.buffer = buffer[pos:]

    def connection_lost(self, exc) -> None:
        if not self.connected.done():
            self.result.unanswered += 1
            self.connected.set_result(None)


async def run_worker(host: str, port: int, path: str, count: int, sample_every: int, hold: float,
                     rate: float, stalled_every: int, worker: int,
                     result: Optional[WorkerResult] = None) -> WorkerResult:
    loop = asyncio.get_running_loop()
    result = WorkerResult() if result is None else result  # given: e.g. with latencies kept apart
    clients = []
    started = time.monotonic()
    interval = 1.0 / rate if rate else 0
    stalled_result = WorkerResult()  # S6: the stalled clients count apart (all of them sampled)
    stalled = []
    for i in range(count):
        source = SOURCE_ADDRESSES[(worker + i) % len(SOURCE_ADDRESSES)]
        sample = sample_every and i % sample_every == 0
        read = not (stalled_every and i % stalled_every == stalled_every - 1)
        try:
            if read:
                _, client = await loop.create_connection(
                    partial(SSEClient, path, bool(sample), result), host, port, local_addr=(source, 0))
            else:
                # A small receive window: the server, not this kernel, holds what it does not read.
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.bind((source, 0))
                sock.setblocking(False)
                await loop.sock_connect(sock, (host, port))
                _, client = await loop.create_connection(
                    lambda: SSEClient(path, True, stalled_result, read=False), sock=sock)
                stalled.append(client)
            clients.append(client)
        except OSError:
            result.failed += 1
        if interval:
            await asyncio.sleep(interval)
    statuses = await asyncio.gather(*(c.connected for c in clients))
    result.connected = sum(1 for s in statuses if s == 200)
    result.connect_seconds = time.monotonic() - started
    await asyncio.sleep(hold)
    if stalled:
        for c in stalled:
            c.read_again()
        await asyncio.sleep(STALLED_DRAIN)
        result.stalled = len(stalled)
        result.stalled_frames = stalled_result.frames
        result.stalled_gaps = stalled_result.gaps
        result.stalled_duplicates = stalled_result.duplicates
        for k, v in stalled_result.statuses.items():
            result.statuses[k] = result.statuses.get(k, 0) + v
    for c in clients:
        c.transport.abort()
    return result


async def run_storm_worker(host: str, port: int, path: str, count: int, sample_every: int, hold: float,
                           storm: float, worker: int) -> WorkerResult:
    """S5: hold `count` streams, then close every one and reconnect it with
    its Last-Event-ID, spread over `storm` seconds; sampled clients check
    offset continuity across the reconnection."""
    loop = asyncio.get_running_loop()
    result = WorkerResult()
    started = time.monotonic()

    async def connect(i: int, headers: str = "", offsets: Optional[dict] = None) -> Optional[SSEClient]:
        source = SOURCE_ADDRESSES[(worker + i) % len(SOURCE_ADDRESSES)]
        sample = bool(sample_every and i % sample_every == 0)
        try:
            _, client = await loop.create_connection(
                lambda: SSEClient(path, sample, result, headers, offsets=offsets, track_ids=True),
                host, port, local_addr=(source, 0))
            return client
        except OSError:
            result.failed += 1
            return None

    clients = [await connect(i) for i in range(count)]
    statuses = await asyncio.gather(*(c.connected for c in clients if c is not None))
    result.connected = sum(1 for s in statuses if s == 200)
    result.connect_seconds = time.monotonic() - started
    await asyncio.sleep(3)  # events flow, every client has an id

    async def reconnect(i: int, old: SSEClient) -> Optional[SSEClient]:
        await asyncio.sleep(storm * i / max(1, count))
        old.transport.abort()
        headers = f"Last-Event-ID: {old.last_id}\r\n" if old.last_id else ""
        t0 = time.monotonic()
        new = await connect(i, headers, old.offsets)
        if new is not None and await new.connected == 200:
            result.resumed += 1
            result.resume_seconds.append(time.monotonic() - t0)
        return new

    end = time.monotonic() + hold
    clients = await asyncio.gather(*(reconnect(i, c) for i, c in enumerate(clients) if c is not None))
    await asyncio.sleep(max(1.0, end - time.monotonic()))
    for c in clients:
        if c is not None:
            c.transport.abort()
    return result


def _worker_main(args: tuple, queue: multiprocessing.Queue) -> None:
    import uvloop

    if len(os.sched_getaffinity(0)) > 1:
        os.sched_setaffinity(0, {1})  # the server has core 0
    uvloop.install()
    if args[0] == "storm":
        result = asyncio.run(run_storm_worker(*args[1:]))
    else:
        result = asyncio.run(run_worker(*args))
    queue.put(result)


def run(host: str, port: int, path: str, total: int, processes: int, sample_every: int, hold: float,
        rate: float = 0, stalled_every: int = 0, storm: float = 0) -> WorkerResult:
    """Open `total` connections from `processes` workers, hold them `hold` s
    (storm: reconnect them all with Last-Event-ID within `storm` s, S5)."""
    queue: multiprocessing.Queue = multiprocessing.Queue()
    per = [total // processes + (1 if i < total % processes else 0) for i in range(processes)]
    procs = [
        multiprocessing.Process(
            target=_worker_main,
            args=(("storm", host, port, path, n, sample_every, hold, storm, i) if storm else
                  (host, port, path, n, sample_every, hold, rate / processes if rate else 0, stalled_every, i), queue),
        )
        for i, n in enumerate(per)
    ]
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    return merge(results)


def merge(results: list) -> Any:
    """The load generator processes' results (dataclasses of one type) as
    one: counts add, lists join, status tallies add, durations take the max."""
    merged = type(results[0])()
    for result in results:
        for f in dataclasses.fields(merged):
            mine, theirs = getattr(merged, f.name), getattr(result, f.name)
            if isinstance(mine, dict):
                for k, v in theirs.items():
                    mine[k] = mine.get(k, 0) + v
            elif isinstance(mine, float):
                setattr(merged, f.name, max(mine, theirs))
            else:
                setattr(merged, f.name, mine + theirs)
    return merged


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))
