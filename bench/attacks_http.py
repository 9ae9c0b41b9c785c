"""The HTTP attacks of `python -m bench abuse` (issue 12), each a blocking
function that runs its own asyncio loop for `seconds` and returns what the
server answered (a status tally and counts).

- header drip: connections that send one byte of a request head every
  2 s, reopened when the server closes them (items 5);
- HEAD pipelining: HEAD on a stream followed by GET /_info on one
  connection, again and again (item 6);
- huge Last-Event-ID: heads over the size limit, and ids of 60 KB of junk
  (item 7);
- bad paths: /v2/stream/%ff and malformed request lines (item 8).

Attackers connect from 127.0.2.x, so per-address limits apply to them and
not to the healthy clients (127.0.0.2-11).
"""
from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any, Awaitable, Callable, Coroutine

SOURCES = [f"127.0.2.{i}" for i in range(1, 21)]
DRIP_HEAD = b"GET /v2/stream/recentchange HTTP/1.1\r\nHost: bench\r\nX-Drip: " + b"a" * 4000 + b"\r\n\r\n"


def _status(data: bytes) -> int:
    try:
        return int(data.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return 0  # closed without an answer


async def _exchange(host: str, port: int, source: str, raw: bytes, responses: int = 1,
                    timeout: float = 10) -> list[int]:
    """Send raw bytes on a new connection; the statuses of the answers read
    until `responses` heads arrived, the server closed, or the timeout."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, local_addr=(source, 0)), timeout)
    data = b""
    try:
        writer.write(raw)
        deadline = time.monotonic() + timeout
        while data.count(b"HTTP/1.1 ") < responses and time.monotonic() < deadline:
            chunk = await asyncio.wait_for(reader.read(65536), max(0.01, deadline - time.monotonic()))
            if not chunk:
                break
            data += chunk
    finally:
        writer.transport.abort()
    statuses = [_status(b"HTTP/1.1 " + part) for part in data.split(b"HTTP/1.1 ")[1:]]
    return statuses or [0]


def _run(main: Callable[[], Coroutine[Any, Any, dict]]) -> dict:
    return asyncio.run(main())


async def _loop(seconds: float, connections: int, attempt: Callable[[int], Awaitable[list[int]]],
                per_second: float) -> dict:
    """`connections` loops of attempt() for `seconds`, each at most `per_second` a second."""
    tally: Counter = Counter()
    errors = 0
    end = time.monotonic() + seconds

    async def one(i: int) -> None:
        nonlocal errors
        while time.monotonic() < end:
            started = time.monotonic()
            try:
                tally.update(await attempt(i))
            except (OSError, asyncio.TimeoutError):
                errors += 1
            await asyncio.sleep(max(0.0, 1 / per_second - (time.monotonic() - started)))

    await asyncio.gather(*(one(i) for i in range(connections)))
    return {"statuses": dict(tally), "connect_errors": errors}


def run_header_drip(host: str, port: int, seconds: float, connections: int = 400, interval: float = 2.0) -> dict:
    """Dripping connections from 20 addresses, reopened as the server closes them."""

    async def main() -> dict:
        tally: Counter = Counter()
        opened = errors = 0
        end = time.monotonic() + seconds
        longest = 0.0

        async def dripper(i: int) -> None:
            nonlocal opened, errors, longest
            while time.monotonic() < end:
                try:
                    reader, writer = await asyncio.wait_for(
                        asyncio.open_connection(host, port, local_addr=(SOURCES[i % len(SOURCES)], 0)), 10)
                except (OSError, asyncio.TimeoutError):
                    errors += 1
                    await asyncio.sleep(interval)
                    continue
                opened += 1
                started = time.monotonic()
                answer = b""
                sent = 0
                while time.monotonic() < end and sent < len(DRIP_HEAD):
                    writer.write(DRIP_HEAD[sent:sent + 1])
                    sent += 1
                    try:
                        chunk = await asyncio.wait_for(reader.read(4096), interval)
                    except asyncio.TimeoutError:
                        continue
                    except OSError:
                        break
                    answer += chunk
                    if not chunk:
                        break
                longest = max(longest, time.monotonic() - started)
                tally[_status(answer) if answer else 0] += 1
                writer.transport.abort()

        await asyncio.gather(*(dripper(i) for i in range(connections)))
        return {"statuses": dict(tally), "opened": opened, "connect_errors": errors,
                "longest_connection_s": round(longest, 1)}

    return _run(main)


def run_head_pipelining(host: str, port: int, seconds: float, connections: int = 10) -> dict:
    """HEAD on a stream and GET /_info pipelined on one connection: both
    must be answered (200, 200)."""
    raw = (b"HEAD /v2/stream/recentchange HTTP/1.1\r\nHost: bench\r\n\r\n"
           b"GET /_info HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
    return _run(lambda: _loop(seconds, connections,
                              lambda i: _exchange(host, port, SOURCES[i % len(SOURCES)], raw, 2), 10))


def run_huge_last_event_id(host: str, port: int, seconds: float, connections: int = 10) -> dict:
    """Heads over the size limit (431) and 60 KB ids of junk (400)."""
    too_big = b"[" + b"1," * 50_000 + b"1]"
    junk = b'[{"topic":"' + b"x" * 60_000 + b'","partition":0,"offset":1}]'

    def request(i: int) -> bytes:
        value = too_big if i % 2 else junk
        return (b"GET /v2/stream/recentchange HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n"
                b"Last-Event-ID: " + value + b"\r\n\r\n")

    return _run(lambda: _loop(seconds, connections,
                              lambda i: _exchange(host, port, SOURCES[i % len(SOURCES)], request(i)), 10))


def run_bad_paths(host: str, port: int, seconds: float, connections: int = 10) -> dict:
    """Paths that are not UTF-8, and request lines that are not HTTP."""
    requests = [b"GET /v2/stream/%ff HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n",
                b"GET /v2/stream/recentchange%c3%28 HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n",
                b"NONSENSE\r\n\r\n",
                b"GET /_info HTTP/1.1\r\nNo colon\r\n\r\n"]
    return _run(lambda: _loop(seconds, connections,
                              lambda i: _exchange(host, port, SOURCES[i % len(SOURCES)], requests[i % len(requests)]),
                              20))


ATTACKS = {
    "header drip": run_header_drip,
    "HEAD pipelining": run_head_pipelining,
    "huge Last-Event-ID": run_huge_last_event_id,
    "bad paths": run_bad_paths,
}
