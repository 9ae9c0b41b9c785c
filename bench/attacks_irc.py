"""The IRC command flood of issue 12, reusable by `bench abuse` and the abuse
tests: `clients` connections each register and send 64 KiB of `LIST\\r\\n`,
and never read what the server answers. A connection the server closes is
opened again until the time is up, so the pressure lasts `seconds`.

The attackers never read: their sockets pause reading as soon as they are
connected, so a server that parses ahead of its output piles up the
answers. A closed connection shows when a further write fails; a write is
attempted every WRITE_INTERVAL seconds (with nothing buffered on our side
beyond HIGH_WATER bytes).

    from bench.attacks_irc import run_irc_flood
    counts = run_irc_flood("127.0.0.1", 6667, 30)   # blocking: call it from a thread
"""
from __future__ import annotations

import asyncio
import itertools
from typing import Any, Optional

FLOOD = b"LIST\r\n" * (65536 // 6)  # 64 KiB of commands
WRITE_INTERVAL = 0.2
HIGH_WATER = 256 * 1024
_names = itertools.count()


class _Attacker(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: Optional[asyncio.Transport] = None
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.pause_reading()  # never read anything the server sends

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        if not self.lost.done():
            self.lost.set_result(None)


async def _one(host: str, port: int, deadline: float, counts: dict[str, int], source: str = "") -> None:
    loop = asyncio.get_running_loop()
    while loop.time() < deadline:
        try:
            _, attacker = await asyncio.wait_for(
                loop.create_connection(_Attacker, host, port, local_addr=(source, 0) if source else None),
                max(0.1, deadline - loop.time()))
        except (OSError, asyncio.TimeoutError):
            counts["connect_failed"] += 1
            await asyncio.sleep(WRITE_INTERVAL)
            continue
        counts["connections"] += 1
        transport = attacker.transport
        assert transport is not None
        n = next(_names)
        transport.write(f"NICK flood{n}\r\nUSER flood 0 * :flood\r\n".encode())
        while loop.time() < deadline and not attacker.lost.done():
            if transport.get_write_buffer_size() < HIGH_WATER:
                transport.write(FLOOD)
                counts["bytes_sent"] += len(FLOOD)
            try:
                await asyncio.wait_for(asyncio.shield(attacker.lost), WRITE_INTERVAL)
            except asyncio.TimeoutError:
                pass
        if attacker.lost.done():
            counts["closed_by_server"] += 1
        else:
            transport.abort()


async def irc_flood(host: str, port: int, seconds: float, clients: int = 10, source: str = "") -> dict[str, int]:
    """Run the flood for `seconds` (from the local address `source` if
    given); returns counts: connections made, connect_failed, bytes_sent,
    closed_by_server (connections the server ended)."""
    counts = {"connections": 0, "connect_failed": 0, "bytes_sent": 0, "closed_by_server": 0}
    deadline = asyncio.get_running_loop().time() + seconds
    await asyncio.gather(*(_one(host, port, deadline, counts, source) for _ in range(clients)))
    return counts


def run_irc_flood(host: str, port: int, seconds: float, clients: int = 10, source: str = "") -> dict[str, int]:
    """irc_flood in an event loop of its own (blocking; safe in a thread)."""
    return asyncio.run(irc_flood(host, port, seconds, clients, source))
