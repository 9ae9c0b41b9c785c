"""What the fan-out costs per delivery outside the socket, many sets against one.

`python -m bench.setcost [--clients N] [--events E]`: in this process, no
network and no log, the shared rings, hubs and SSE sinks of the server
(transports that only count bytes) get E recentchange records one at a
time, one pass each, as at `bench combos`' 50 events/s; the clients ask
for the same sets as bench combos' (random stream and partition subsets,
then all on one set). It prints the CPU per delivery and per set and
event: the part of the server's CPU per delivery that the number of sets
changes, without the network (`bench combos` measures the whole;
`bench.fanout` one set's loop with 10,000 clients).

CPU time on a shared machine swings by half from run to run: `--repeat`
prints the run that took least, and `--instructions` counts instead of
timing, under valgrind's callgrind (the same count every run): the
instructions per event, from two runs of different lengths so that what
is made once (the hubs, the clients) drops out.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import re
import subprocess
import sys
import time
from typing import Any

from twisted.internet.task import Clock

from eventstreams.backends.base import Record
from eventstreams.hub import Hub
from eventstreams.rings import Rings
from eventstreams.sse import Connections, ResponseSink

from .combos import PARTITIONS, STREAMS

SAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "eventstreams", "data",
                       "recentchange-combined.jsonl")


class CountingTransport:
    """A connection that takes every write: what a send() would cost is left out."""

    def __init__(self) -> None:
        self.written = 0
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)
        self.writes += 1


def client_sets(count: int, one_set: bool, seed: int = 20) -> list[tuple[tuple[str, ...], list[tuple[str, int]]]]:
    """(streams, partitions) per client, as bench combos' requests ask."""
    topic = "combo.s{}".format
    everything = list(range(STREAMS))
    if one_set:
        return [(tuple(f"s{s}" for s in everything), [(topic(s), p) for s in everything for p in range(PARTITIONS)])
                ] * count
    chooser = random.Random(seed)
    out = []
    for _ in range(count):  # the same draws as combos.requests
        streams = sorted(chooser.sample(range(STREAMS), chooser.randint(1, STREAMS)))
        tps = [(topic(s), p) for s in streams for p in range(PARTITIONS)]
        if chooser.random() < 0.5:
            tps = chooser.sample(tps, chooser.randint(1, len(tps)))
        out.append((tuple(f"s{s}" for s in streams), tps))
    return out


def run(clients: int, events: int, one_set: bool) -> dict[str, Any]:
    clock = Clock()
    clock.advance(time.time())
    rings = Rings(None, 10000, clock)  # type: ignore[arg-type]
    connections = Connections(clock, 0)
    connections.delays.stream_of_topic = {f"combo.s{s}": f"s{s}" for s in range(STREAMS)}
    hubs: dict[tuple, Hub] = {}
    transports = []
    for streams, tps in client_sets(clients, one_set):
        key = tuple(sorted(tps))
        hub = hubs.get(key)
        if hub is None:
            for tp in key:
                rings.ring(tp)
            hub = hubs[key] = Hub(None, key, 10000, clock, 0.0, rings)  # type: ignore[arg-type]
            hub._attach()
        sink = ResponseSink(lambda data: None, lambda: None, False, True, connections, streams, "127.0.0.1")
        connections.add(sink)
        transport = CountingTransport()
        transports.append(transport)
        sink.use_transport(transport)
        sink.started = True
        sink.subscription = hub.subscribe(sink)
    clock.advance(0)  # the clients go live
    with open(SAMPLES, "rb") as f:
        values = [line.strip() for line in f if line.strip()][:1000]
    chooser = random.Random(1)
    offsets = {tp: 0 for tp in rings.rings}
    records = []
    for n in range(events):
        tp = (f"combo.s{n % STREAMS}", chooser.randrange(PARTITIONS))
        records.append(Record(tp[0], tp[1], offsets[tp], int(clock.seconds() * 1000), None, values[n % len(values)]))
        offsets[tp] += 1
    counters = connections.counters
    gc.collect()
    started = time.process_time()
    for record in records:
        rings.on_records([record])
        clock.advance(0)  # the pass
        clock.advance(0.001)
    cpu = time.process_time() - started
    connections.delays.flush()
    entries = sum(len(rings.rings[tp]) for tp in rings.rings)
    set_passes = sum(len(ring.hubs) * len(ring) for ring in rings.rings.values())
    assert entries == events
    return {"sets": len(hubs), "deliveries": counters.events_delivered, "cpu": cpu, "set_passes": set_passes,
            "writes": sum(t.writes for t in transports), "bytes": counters.bytes_sent}


def instructions(mode: str, clients: int, events: tuple[int, int] = (20, 60)) -> dict[str, Any]:
    """Instructions per event of `mode`, counted by callgrind."""
    counts, result = [], {}
    for n in events:
        out = subprocess.run(
            ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, "-m", "bench.setcost",
             "--clients", str(clients), "--events", str(n), "--mode", mode],
            capture_output=True, text=True, check=True, env={**os.environ, "PYTHONHASHSEED": "0"})
        counts.append(int(re.search(r"Collected : (\d+)", out.stderr).group(1)))  # type: ignore[union-attr]
        result = json.loads(out.stdout)
    per_event = (counts[1] - counts[0]) / (events[1] - events[0])
    return {"mode": result["mode"], "instructions_per_event": round(per_event),
            "sets_per_event": result["sets_per_event"], "deliveries_per_event": result["deliveries_per_event"]}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.setcost", description=__doc__)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--mode", choices=["both", "random", "one"], default="both")
    parser.add_argument("--repeat", type=int, default=1, help="runs per mode; the one that took least CPU is printed "
                        "(a shared machine's noise only ever adds)")
    parser.add_argument("--instructions", action="store_true",
                        help="count instructions under valgrind instead of timing (slow: about a minute a mode)")
    args = parser.parse_args()
    if args.instructions:
        for mode in {"both": ("random", "one"), "random": ("random",), "one": ("one",)}[args.mode]:
            print(json.dumps(instructions(mode, args.clients)), flush=True)
        return
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)  # the daemon's before issue 12 (10,000 now); RESULTS' counts used this
    for one_set in {"both": (False, True), "random": (False,), "one": (True,)}[args.mode]:
        r = min((run(args.clients, args.events, one_set) for _ in range(args.repeat)), key=lambda r: r["cpu"])
        print(json.dumps({"mode": "one set" if one_set else "random sets", **r,
                          "us_per_delivery": round(r["cpu"] / r["deliveries"] * 1e6, 2),
                          "us_per_set_and_event": round(r["cpu"] / max(1, r["set_passes"]) * 1e6, 2),
                          "deliveries_per_event": r["deliveries"] / args.events,
                          "sets_per_event": r["set_passes"] / args.events}), flush=True)


if __name__ == "__main__":
    main()
