"""The Python cost of one delivery, without the system call.

`python -m bench.fanout [--clients N]`: a real Hub with N live
ResponseSinks whose socket write is a no-op; 20 single-event fan-out passes
of a ~1.3 KB event. What it prints is the hub loop, `send_batch` and the
shared-frame lookup per client: the part of a delivery our code can still
make cheaper (the rest is the kernel's `send()`, see `bench.sendcost`).
"""
from __future__ import annotations

import argparse
import time

from twisted.internet.task import Clock

from eventstreams.backends.base import Record
from eventstreams.hub import Hub
from eventstreams.sse import Connections, ResponseSink


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fanout", description=__doc__)
    parser.add_argument("--clients", type=int, default=10_000)
    args = parser.parse_args()
    clock = Clock()
    connections = Connections(clock, 0)
    hub = Hub(None, [("t", 0)], 100, clock)  # type: ignore[arg-type]  # no backend: records are fed by hand
    hub.head = hub.ring_base = ((0, None),)
    for _ in range(args.clients):
        sink = ResponseSink(lambda data: None, lambda: None, False, True, connections, ("s",), "127.0.0.1")
        sink._transport, sink._raw_write = object(), lambda data: None  # a socket that takes anything at no cost
        sink.subscription = hub.subscribe(sink)
    clock.advance(0)  # every cursor starts at the head and goes live
    value = b'{"meta":{},"comment":"' + b"x" * 1300 + b'"}'
    records = [Record("t", 0, n, 1_000 + n, None, value) for n in range(21)]
    hub._on_records(records[:1])
    clock.advance(0)  # the first pass builds the frames
    started = time.perf_counter()
    for record in records[1:]:
        hub._on_records([record])
        clock.advance(0)
    seconds = time.perf_counter() - started
    print(f"live clients {len(hub.groups[''][1])}; "
          f"{seconds / (20 * args.clients) * 1e6:.2f} µs of Python per delivery (no system call)")


if __name__ == "__main__":
    main()
