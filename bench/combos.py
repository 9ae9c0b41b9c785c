"""`python -m bench combos`: many clients over random stream and partition
subsets (issue 20), against the same clients on one set.

Four streams of one topic each, 8 partitions per topic, events posted to
the intake at --rate (default 50/s) spread over the streams. Each client
asks for a random non-empty subset of the streams and, half of the time, a
Last-Event-ID naming a random subset of their partitions (offset -1: from
the end), so almost every client is a distinct set. Then the same number
of clients all ask for every stream (one set), and then as many clients on
one set as random sets delivered each event to (the like-for-like cost of
the sets themselves). For both it reports server
RSS over time, log readers, sets, ring bytes, CPU per delivery, latency and
gaps/duplicates (sampled clients; both must be 0).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import json
import multiprocessing
import os
import random
import time
import uuid
from typing import Any

from . import __main__ as base
from . import load

STREAMS = 4
PARTITIONS = 8

CONFIG = """
[eventstreams]
listen = tcp:{port}:interface=127.0.0.1:backlog=4096
heartbeat = 15
client_ip_connection_limit = {ip_limit}
# thousands of clients from a few loopback addresses: no request rate per address
request_rate_per_ip = 0
max_connections = 0
ring_size = 10000
max_stream_sets = 5000
workers = {workers}
backend = {backend}

[embedded]
path = {dir}/bench.sqlite
retention = 1h
partitions = %d

[intake]
listen = tcp:{intake}:interface=127.0.0.1

[metrics]
listen = tcp:{metrics}:interface=127.0.0.1
{kafka}""" % PARTITIONS + "".join(
    f"\n[stream:s{n}]\ntopics = {{prefix}}combo.s{n}\n" for n in range(STREAMS))


def kafka_topics(bootstrap: str) -> str:
    """This run's topics, PARTITIONS each; their prefix."""
    from confluent_kafka.admin import AdminClient, NewTopic

    prefix = f"combo{os.getpid()}x{int(time.time())}."
    admin = AdminClient({"bootstrap.servers": bootstrap})
    topics = [f"{prefix}combo.s{n}" for n in range(STREAMS)]
    for future in admin.create_topics([NewTopic(t, num_partitions=PARTITIONS, replication_factor=1)
                                       for t in topics]).values():
        future.result(30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        metadata = admin.list_topics(timeout=10)
        if all(t in metadata.topics and len(metadata.topics[t].partitions) == PARTITIONS
               and all(p.leader >= 0 for p in metadata.topics[t].partitions.values()) for t in topics):
            break
        time.sleep(0.1)
    return prefix


class ComboServer(base.Server):
    """bench's Server (twistd, core 0) with the combos streams."""

    def __init__(self, kafka: str, sets: tuple) -> None:
        config, topics = base.CONFIG, base.kafka_topics
        base.CONFIG, base.kafka_topics = CONFIG, kafka_topics
        try:
            super().__init__(kafka=kafka, sets=sets)
        finally:
            base.CONFIG, base.kafka_topics = config, topics
        for _ in range(100):
            try:
                self.metric("eventstreams_hubs")
                break
            except OSError:
                time.sleep(0.1)


class Publisher(base.Publisher):
    """Posts real recentchange events round robin over the streams."""

    def run(self) -> None:
        url = f"http://127.0.0.1:{self.server.intake}/v1/events"
        interval = 1 / self.rate
        end = time.monotonic() + self.seconds
        next_at = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            while time.monotonic() < end:
                event = dict(self.samples[self.sent % len(self.samples)])
                event["meta"] = dict(event["meta"], stream=f"s{self.sent % STREAMS}", id=str(uuid.uuid4()))
                event["bench_ts"] = time.time()
                pool.submit(self._post, url, json.dumps([event]).encode())
                self.sent += 1
                next_at += interval
                time.sleep(max(0.0, next_at - time.monotonic()))


def requests(count: int, prefix: str, one_set: bool, seed: int = 20) -> list[tuple[str, str]]:
    """(path, extra headers) per client."""
    everything = ",".join(f"s{n}" for n in range(STREAMS))
    if one_set:
        return [(f"/v2/stream/{everything}", "")] * count
    chooser = random.Random(seed)
    out = []
    for _ in range(count):
        streams = sorted(chooser.sample(range(STREAMS), chooser.randint(1, STREAMS)))
        headers = ""
        if chooser.random() < 0.5:
            tps = [(f"{prefix}combo.s{s}", p) for s in streams for p in range(PARTITIONS)]
            named = chooser.sample(tps, chooser.randint(1, len(tps)))
            headers = "Last-Event-ID: " + json.dumps(
                [{"topic": t, "partition": p, "offset": -1} for t, p in named], separators=(",", ":")) + "\r\n"
        out.append(("/v2/stream/" + ",".join(f"s{s}" for s in streams), headers))
    return out


async def _worker(port: int, clients: list[tuple[str, str, bool]], hold: float, worker: int) -> load.WorkerResult:
    loop = asyncio.get_running_loop()
    result = load.WorkerResult()
    conns = []
    for i, (path, headers, sample) in enumerate(clients):
        source = load.SOURCE_ADDRESSES[(worker + i) % len(load.SOURCE_ADDRESSES)]
        try:
            _, client = await loop.create_connection(
                functools.partial(load.SSEClient, path, sample, result, headers), "127.0.0.1", port,
                local_addr=(source, 0))
            conns.append(client)
        except OSError:
            result.failed += 1
    statuses = await asyncio.gather(*(c.connected for c in conns))
    result.connected = sum(1 for s in statuses if s == 200)
    await asyncio.sleep(hold)
    for c in conns:
        c.transport.abort()
    return result


def _worker_main(args: tuple, queue: Any) -> None:
    if len(os.sched_getaffinity(0)) > 1:
        os.sched_setaffinity(0, {1})  # the server has core 0
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    queue.put(asyncio.run(_worker(*args)))


def run_one(args: Any, one_set: bool, count: int = 0, label: str = "") -> dict:
    server = ComboServer(args.kafka, tuple(args.set))
    label = label or ("one set" if one_set else "random sets")
    count = count or args.clients
    figures: dict = {}
    try:
        rss0 = server.rss_kib()
        every = max(1, count // 50)  # 50 sampled clients parse events
        clients = [(path, headers, i % every == 0)
                   for i, (path, headers) in enumerate(requests(count, server.prefix, one_set))]
        processes = max(1, min(4, (count + 4999) // 5000))
        hold = args.seconds + 8
        queue: Any = multiprocessing.Queue()
        procs = [multiprocessing.Process(target=_worker_main,
                                         args=((server.port, clients[i::processes], hold, i), queue))
                 for i in range(processes)]
        for p in procs:
            p.start()
        server.wait_connected(count, 120)
        time.sleep(1)
        rss1, cpu1 = server.rss_kib(), server.cpu()
        publisher = Publisher(server, args.rate or 50, args.seconds)
        rss_series: list[str] = []
        publisher.start()
        started = time.monotonic()
        while publisher.is_alive():
            publisher.join(max(1.0, args.seconds / 10))
            rss_series.append(f"{time.monotonic() - started:.0f}s:{server.rss_kib() // 1024}")
        cpu_pub = server.cpu() - cpu1
        readers, sets = server.metric("eventstreams_log_readers"), server.metric("eventstreams_hubs")
        ring_bytes = server.metric("eventstreams_ring_bytes")
        results = [queue.get() for _ in procs]
        for p in procs:
            p.join()
        r = load.merge(results)
        print(f"## {label}", flush=True)
        base.report("clients connected (200) / failed", f"{r.connected} / {r.failed}")
        base.report("distinct sets / log readers", f"{sets:.0f} / {readers:.0f}")
        base.report("server RSS before clients / with clients", f"{rss0 // 1024} / {rss1 // 1024}", "MiB")
        base.report("server RSS over publishing (t:MiB)", " ".join(rss_series))
        base.report("ring bytes at end", f"{ring_bytes / 2**20:.1f}", "MiB")
        base.report("events published (failed posts)", f"{publisher.sent} ({publisher.failed})")
        base.report("frames received", r.frames)
        base.report("server CPU during publishing", f"{cpu_pub:.1f}", "s")
        per = cpu_pub / max(1, r.frames) * 1e6
        base.report("server CPU per delivery", f"{per:.1f}", "µs")
        base.report("latency p50 / p99 / max (sampled clients)",
                    f"{base.percentile(r.latencies, .5) * 1000:.1f} / {base.percentile(r.latencies, .99) * 1000:.1f} / "
                    f"{max(r.latencies, default=float('nan')) * 1000:.1f}", "ms")
        base.report("gaps / duplicates (sampled clients)", f"{r.gaps} / {r.duplicates}")
        figures = {"cpu_per_delivery": per, "rss": server.rss_kib(), "gaps": r.gaps, "duplicates": r.duplicates,
                   "per_event": r.frames / max(1, publisher.sent), "cpu": cpu_pub, "events": publisher.sent,
                   "frames": r.frames}
    finally:
        server.stop()
    return figures


def event_cost(args: Any) -> float:
    """Server CPU per published event with no client connected."""
    server = ComboServer(args.kafka, tuple(args.set))
    try:
        time.sleep(1)
        cpu0 = server.cpu()
        publisher = Publisher(server, args.rate or 50, args.seconds)
        publisher.start()
        publisher.join()
        cpu = server.cpu() - cpu0  # measured as run_one does
        print("## no clients", flush=True)
        base.report("events published (failed posts)", f"{publisher.sent} ({publisher.failed})")
        base.report("server CPU during publishing", f"{cpu:.1f}", "s")
        per = cpu / max(1, publisher.sent)
        base.report("server CPU per event", f"{per * 1e3:.2f}", "ms")
    finally:
        server.stop()
    return per


def run(args: Any) -> None:
    random_sets = run_one(args, one_set=False)
    one_set = run_one(args, one_set=True)
    # Random sets deliver each event to fewer clients (those whose subset
    # holds its stream), so what every event costs once (intake, log,
    # reader) weighs more per delivery: one set with as many deliveries
    # per event separates that from what the sets themselves cost.
    matched = max(1, round(random_sets["per_event"]))
    like = run_one(args, one_set=True, count=matched, label=f"one set, {matched} clients")
    event_cpu = event_cost(args)  # seconds per event
    print("## compared", flush=True)
    base.report("CPU per delivery, random sets / one set",
                f"{random_sets['cpu_per_delivery'] / max(1e-9, one_set['cpu_per_delivery']):.2f}", "x")
    base.report(f"CPU per delivery, random sets / one set of {matched} (as many deliveries per event)",
                f"{random_sets['cpu_per_delivery'] / max(1e-9, like['cpu_per_delivery']):.2f}", "x")
    base.report("RSS at end, random sets - one set", f"{(random_sets['rss'] - one_set['rss']) // 1024}", "MiB")
    # What every event costs with no client, shared out over a leg's
    # deliveries per event; the rest is what delivering costs.
    for name, leg in (("random sets", random_sets), ("one set", one_set), (f"one set of {matched}", like)):
        share = event_cpu / max(1e-9, leg["per_event"]) * 1e6
        rest = (leg["cpu"] - event_cpu * leg["events"]) / max(1, leg["frames"]) * 1e6
        base.report(f"{name}: CPU per delivery, the events' own / delivering", f"{share:.1f} / {rest:.1f}", "µs")
