"""T7: how fast a client that resumes with Last-Event-ID gets its first event.

`python -m bench resume --clients N`: the log gets 12,000 real recentchange
events (the server's ring holds the last 10,000), then N clients resume one
after another at `--connect-rate` (default 500/s) from a random position
among the last 300 offsets (10 s at 30 events/s; served from the ring), then N/10 clients from a random position
among the first 2,000 offsets (no longer in the ring: read from the log).
Each client measures connect → first `event: message`, checks that the
first event is exactly the one after its Last-Event-ID, and closes.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import threading
import time
import urllib.request
import uuid

from . import __main__ as base

TOPIC = "eqiad.mediawiki.recentchange"  # where the intake writes recentchange events
OTHER = {"topic": "codfw.mediawiki.recentchange", "partition": 0, "offset": 0}  # the stream's other topic: empty
TOTAL = 12_000


class FirstEvent(asyncio.Protocol):
    """Sends one resume request, waits for the first event, closes."""

    def __init__(self, path: str, offset: int):
        self.request = (
            f"GET {path} HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n"
            f"Last-Event-ID: {json.dumps([{'topic': TOPIC, 'partition': 0, 'offset': offset}, OTHER])}\r\n\r\n"
        ).encode()
        self.buffer = b""
        self.started = time.monotonic()
        self.done = asyncio.get_running_loop().create_future()

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        start = self.buffer.find(b"\ndata: ")
        if start < 0:
            return
        end = self.buffer.find(b"\n", start + 7)
        if end < 0:
            return
        seconds = time.monotonic() - self.started
        offset = json.loads(self.buffer[start + 7:end])["meta"]["offset"]
        self.transport.abort()
        if not self.done.done():
            self.done.set_result((seconds, offset))

    def connection_lost(self, exc) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def resume_all(port: int, offsets: list[int], rate: float) -> tuple[list[float], int, int]:
    """(first-event seconds, exact resumes, failures)."""
    loop = asyncio.get_running_loop()

    async def one(i: int, offset: int):
        await asyncio.sleep(i / rate)
        try:
            _, client = await loop.create_connection(
                lambda: FirstEvent("/v2/stream/recentchange", offset), "127.0.0.1", port,
                local_addr=(base.load.SOURCE_ADDRESSES[i % len(base.load.SOURCE_ADDRESSES)], 0))
        except OSError:
            return None
        return await client.done, offset

    results = await asyncio.gather(*(one(i, o) for i, o in enumerate(offsets)))
    seconds = [r[0][0] for r in results if r and r[0]]
    exact = sum(1 for r in results if r and r[0] and r[0][1] == r[1])
    failed = sum(1 for r in results if not r or not r[0])
    return seconds, exact, failed


def _measure(port: int, offsets: list[int], rate: float) -> tuple[list[float], int, int]:
    import uvloop

    if len(os.sched_getaffinity(0)) > 1:
        os.sched_setaffinity(0, {1})  # the server has core 0
    return uvloop.run(resume_all(port, offsets, rate))


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(1 << 16):
            pass
    except OSError:
        pass


def run(args) -> None:
    report = base.report
    server = base.Server()
    try:
        with open(base.SAMPLES, "rb") as f:
            samples = [json.loads(line) for line in f][:2000]
        # A client from the start: its hub's ring fills as the events come
        # (a hub that starts later begins with an empty ring).
        keeper = socket.create_connection(("127.0.0.1", server.port))
        keeper.sendall(b"GET /v2/stream/recentchange HTTP/1.1\r\nHost: bench\r\n\r\n")
        threading.Thread(target=_drain, args=(keeper,), daemon=True).start()
        url = f"http://127.0.0.1:{server.intake}/v1/events"
        for start in range(0, TOTAL, 500):
            events = []
            for n in range(start, start + 500):
                event = dict(samples[n % len(samples)])
                event["meta"] = dict(event["meta"], stream="mediawiki.recentchange", id=str(uuid.uuid4()))  # the intake stores an id once
                events.append(event)
            request = urllib.request.Request(url, json.dumps(events).encode(), {"content-type": "application/json"})
            urllib.request.urlopen(request, timeout=30).read()
        rate = args.connect_rate or 500
        rng = random.Random(7)
        phases = [
            ("ring", [rng.randrange(TOTAL - 300, TOTAL - 10) for _ in range(args.clients)]),
            ("log", [rng.randrange(0, 2000) for _ in range(max(1, args.clients // 10))]),
        ]
        report("events in the log / ring size", f"{TOTAL} / 10000")
        for name, offsets in phases:
            cpu0 = server.cpu()
            seconds, exact, failed = _measure(server.port, offsets, rate)
            report(f"{name}: clients resumed (exact first event / failed)", f"{len(seconds)} ({exact} / {failed})")
            report(f"{name}: connect to first event p50 / p99 / max",
                   f"{base.percentile(seconds, .5) * 1000:.1f} / {base.percentile(seconds, .99) * 1000:.1f} / "
                   f"{max(seconds, default=float('nan')) * 1000:.1f}", "ms")
            report(f"{name}: server CPU", f"{server.cpu() - cpu0:.1f}", "s")
        report("server RSS at end", server.rss_kib() // 1024, "MiB")
        keeper.shutdown(socket.SHUT_RDWR)
        keeper.close()
    finally:
        server.stop()
