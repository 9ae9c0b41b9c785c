"""Load benchmarks: `python -m bench SCENARIO [--clients N] [--seconds S]`.

Starts the real daemon (twistd, embedded log, no demo feed) pinned to one
core, drives it from load-generator processes pinned to the other, and
prints one line per figure plus the server's CPU seconds and RSS.

Scenarios:
  idle       S1: ramp to N idle SSE clients (memory per client, connect rate)
  firehose   S2: N clients, 30 real recentchange events/s (deliveries/s, latency)
  broadcast  S3: N idle clients, one event a second (latency of one event to all)
  burst      S4: 300 events/s with N clients (latency under an input burst)
  stalled    S6: firehose where 10% of clients stop reading
  storm      S5: N clients at 10 events/s all reconnect with Last-Event-ID within 10 s
  iplimit    S7: firehose with a per-IP limit; N clients over 10 source addresses
  resume     T7: N clients resume from the ring, N/10 from the log (first event)
  irc        S8: N IRC clients on the [irc] bridge, 30 lines/s (bench/bridges.py)
  socketio   S8: N Socket.IO 0.9 WebSocket clients on the RCStream bridge, 30 changes/s
  engineio   S8: the same over Engine.IO 4 WebSockets
  abuse      issue 12: N SSE + N/10 IRC + N/10 Socket.IO healthy clients, quiet then every attack at once
             (bench/abuse.py)
  combos     issue 20: N clients over random stream and partition subsets (4 streams, 8 partitions each,
             50 events/s), then the same N on one set, then no client (what each event costs by
             itself): RSS over time, readers, CPU per delivery (bench/combos.py)
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid

from . import load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = os.path.join(ROOT, "eventstreams", "data", "recentchange-combined.jsonl")
CLK_TCK = os.sysconf("SC_CLK_TCK")

CONFIG = """
[eventstreams]
listen = tcp:{port}:interface=127.0.0.1:backlog=4096
heartbeat = 15
client_ip_connection_limit = {ip_limit}
# thousands of clients from a few loopback addresses: no request rate per address
request_rate_per_ip = 0
max_connections = 0
ring_size = 10000
workers = {workers}
backend = {backend}

[embedded]
path = {dir}/bench.sqlite
retention = 1h

[intake]
listen = tcp:{intake}:interface=127.0.0.1

[metrics]
listen = tcp:{metrics}:interface=127.0.0.1

[stream:mediawiki.recentchange]
topics = {prefix}eqiad.mediawiki.recentchange,{prefix}codfw.mediawiki.recentchange
aliases = recentchange
{kafka}"""

KAFKA_SECTION = """
[kafka]
bootstrap.servers = {bootstrap}
"""


def kafka_topics(bootstrap: str) -> str:
    """Create this run's recentchange topics (one partition each); their prefix."""
    from confluent_kafka.admin import AdminClient, NewTopic

    prefix = f"bench{os.getpid()}x{int(time.time())}."
    admin = AdminClient({"bootstrap.servers": bootstrap})
    topics = [prefix + "eqiad.mediawiki.recentchange", prefix + "codfw.mediawiki.recentchange"]
    for future in admin.create_topics([NewTopic(t, num_partitions=1, replication_factor=1) for t in topics]).values():
        future.result(30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        metadata = admin.list_topics(timeout=10)
        if all(t in metadata.topics and all(p.leader >= 0 for p in metadata.topics[t].partitions.values())
               for t in topics):
            break
        time.sleep(0.1)
    return prefix


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """The daemon under test, pinned to core 0 (with --workers, the process
    tree may use every core); CPU and RSS are summed over the tree."""

    def __init__(self, ip_limit: int = 0, workers: int = 1, kafka: str = "", sets: tuple = ()) -> None:
        self.dir = tempfile.mkdtemp(prefix="es-bench-")
        self.port, self.intake, self.metrics = free_port(), free_port(), free_port()
        path = os.path.join(self.dir, "streams.ini")
        self.prefix = kafka_topics(kafka) if kafka else ""
        with open(path, "w") as f:
            f.write(CONFIG.format(port=self.port, intake=self.intake, metrics=self.metrics, dir=self.dir,
                                  ip_limit=ip_limit, workers=workers, prefix=self.prefix,
                                  backend="kafka" if kafka else "embedded",
                                  kafka=KAFKA_SECTION.format(bootstrap=kafka) if kafka else ""))
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        self.proc = subprocess.Popen(
            ["taskset", "-c", "0" if workers == 1 else f"0-{(os.cpu_count() or 1) - 1}", twistd, "-n", "--pidfile=", "--logfile", os.path.join(self.dir, "log"),
             "eventstreams", "-c", path] + [arg for item in sets for arg in ("--set", item)],
            cwd=ROOT,
        )
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        deadline = time.monotonic() + 60
        while workers > 1 and time.monotonic() < deadline and self.metric("eventstreams_worker_processes") < workers - 1:
            time.sleep(0.1)

    def pids(self) -> list[int]:
        """The daemon and its worker processes."""
        found = [self.proc.pid]
        for name in os.listdir("/proc"):
            try:
                with open(f"/proc/{name}/stat") as f:
                    if name.isdigit() and int(f.read().rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                        found.append(int(name))
            except (OSError, ValueError):
                pass
        return found

    def cpu(self) -> float:
        """utime + stime of the tree (and of reaped workers, in the main's cutime + cstime)."""
        total = 0
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += sum(int(v) for v in fields[11:15 if pid == self.proc.pid else 13])
        return total / CLK_TCK

    def rss_kib(self) -> int:
        total = 0
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/status") as f:
                    total += next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
            except OSError:
                pass
        return total

    def open_files(self) -> list[int]:
        """Open descriptors per process (main first): how the clients spread."""
        out = []
        for pid in self.pids():
            try:
                out.append(len(os.listdir(f"/proc/{pid}/fd")))
            except OSError:
                pass
        return out

    def metric(self, name: str) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/", timeout=5).read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name + " ") or line.startswith(name + "{"))

    def connected(self) -> int:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/", timeout=5).read().decode()
        return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
                   if line.startswith("eventstreams_connected_clients{"))

    def wait_connected(self, n: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.connected() >= n:
                    return
            except OSError:  # the metrics listener is slow to answer during a ramp: ask again
                pass
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


class Publisher(threading.Thread):
    """Posts real recentchange events at a rate, stamped with bench_ts.

    Open loop, like a Kafka producer upstream: each post goes out on
    schedule from a pool of connections and does not wait for the previous
    one, so a busy server sees the rate it is given instead of slowing the
    publisher down (a closed loop hides saturation)."""

    def __init__(self, server: Server, rate: float, seconds: float, batch: int = 1):
        super().__init__(daemon=True)
        self.server, self.rate, self.seconds, self.batch = server, rate, seconds, batch
        with open(SAMPLES, "rb") as f:
            self.samples = [json.loads(line) for line in f][:2000]
        self.sent = 0
        self.failed = 0

    def _post(self, url: str, body: bytes) -> None:
        try:
            request = urllib.request.Request(url, body, {"content-type": "application/json"})
            urllib.request.urlopen(request, timeout=30).read()
        except OSError:
            self.failed += 1

    def run(self) -> None:
        url = f"http://127.0.0.1:{self.server.intake}/v1/events"
        interval = self.batch / self.rate
        end = time.monotonic() + self.seconds
        next_at = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            while time.monotonic() < end:
                events = []
                for _ in range(self.batch):
                    event = dict(self.samples[self.sent % len(self.samples)])
                    event["meta"] = dict(event["meta"], stream="mediawiki.recentchange", id=str(uuid.uuid4()))  # the intake stores an id once
                    event["bench_ts"] = time.time()
                    events.append(event)
                    self.sent += 1
                pool.submit(self._post, url, json.dumps(events).encode())
                next_at += interval
                time.sleep(max(0.0, next_at - time.monotonic()))


def percentile(values: list, p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


def report(name: str, value: object, unit: str = "") -> None:
    print(f"{name:<44} {value} {unit}".rstrip(), flush=True)


def run_scenario(args: argparse.Namespace) -> None:
    ip_limit = args.ip_limit if args.scenario == "iplimit" else 0
    server = Server(ip_limit, args.workers, args.kafka, tuple(args.set))
    try:
        rss0, cpu0 = server.rss_kib(), server.cpu()
        processes = max(1, min(4, (args.clients + 4999) // 5000))
        rate_per_event = args.rate or {"firehose": 30, "broadcast": 1, "burst": 300, "stalled": 30, "iplimit": 30,
                                       "storm": 10}.get(args.scenario, 0)
        hold = args.seconds + 5
        # about 6,000 parsed events per second in all: the load generator
        # has one core, and counting frames is cheap but parsing them is not
        sampled = max(5, min(200, 6000 // max(1, rate_per_event)))
        sample_every = max(1, args.clients // sampled)
        stalled_every = 10 if args.scenario == "stalled" else 0
        results: dict = {}

        def drive() -> None:
            results["load"] = load.run("127.0.0.1", server.port, "/v2/stream/recentchange", args.clients,
                                       processes, sample_every, hold, args.connect_rate, stalled_every,
                                       10.0 if args.scenario == "storm" else 0)

        t0 = time.monotonic()
        driver = threading.Thread(target=drive)
        driver.start()
        # S7: each source address may hold ip_limit streams; the rest get 429
        expected = min(args.clients, ip_limit * len(load.SOURCE_ADDRESSES)) if ip_limit else args.clients
        server.wait_connected(expected)
        ramp = time.monotonic() - t0
        rss1, cpu1 = server.rss_kib(), server.cpu()
        report("clients connected", server.connected())
        report("ramp time", f"{ramp:.1f}", "s")
        report("connect rate (server-side count / ramp)", f"{expected / ramp:.0f}", "conn/s")
        report("server RSS idle before / after", f"{rss0 // 1024} / {rss1 // 1024}", "MiB")
        report("server RSS per client", f"{(rss1 - rss0) / max(1, expected):.2f}", "KiB")
        if args.workers > 1:
            report("open files per server process", " / ".join(map(str, server.open_files())))
        if rate_per_event:
            # posts of 10 events from 300/s: one post per event would measure the intake
            publisher = Publisher(server, rate_per_event, args.seconds,
                                  batch=max(1, int(rate_per_event) // 30) if rate_per_event >= 300 else 1)
            publisher.start()
            publisher.join()
            cpu_pub, rss_pub = server.cpu(), server.rss_kib()
        driver.join()
        r = results["load"]
        cpu2 = server.cpu()
        report("load: connected (200) / failed", f"{r.connected} / {r.failed}")
        report("refused or cut: non-200 / closed unanswered",
               f"{sum(v for k, v in r.statuses.items() if k != 200)} {dict(sorted(r.statuses.items()))} / "
               f"{r.unanswered}")
        if args.scenario == "storm":
            report("resumed with Last-Event-ID (200)", f"{r.resumed} / {r.connected}")
            report("reconnect to response head p50 / p99 / max",
                   f"{percentile(r.resume_seconds, .5) * 1000:.1f} / {percentile(r.resume_seconds, .99) * 1000:.1f} / "
                   f"{max(r.resume_seconds, default=float('nan')) * 1000:.1f}", "ms")
        if ip_limit:
            report("per-IP limit x source addresses", f"{ip_limit} x {len(load.SOURCE_ADDRESSES)} = {expected}")
            report("responses 200 / 429 / other", f"{r.statuses.get(200, 0)} / {r.statuses.get(429, 0)} / "
                   f"{sum(v for k, v in r.statuses.items() if k not in (200, 429))}")
            report("limit held (200s == expected)", r.statuses.get(200, 0) == expected)
        if rate_per_event:
            report("events published (failed posts)", f"{publisher.sent} ({publisher.failed})")
            report("frames received", r.frames)
            report("deliveries per second (frames / publish time)", f"{r.frames / args.seconds:.0f}", "/s")
            report("server CPU during publishing", f"{cpu_pub - cpu1:.1f}", "s")
            report("deliveries per server CPU second", f"{r.frames / max(0.01, cpu_pub - cpu1):.0f}", "/s")
            report("latency p50 / p99 / max (sampled clients)",
                   f"{percentile(r.latencies, .5) * 1000:.1f} / {percentile(r.latencies, .99) * 1000:.1f} / "
                   f"{max(r.latencies, default=float('nan')) * 1000:.1f}", "ms")
            report("sampled latencies", len(r.latencies))
            report("gaps / duplicates (sampled clients)", f"{r.gaps} / {r.duplicates}")
            report("server RSS when publishing ends", rss_pub // 1024, "MiB")
            if r.stalled:
                report("stalled clients: frames after reading again / expected",
                       f"{r.stalled_frames} / {r.stalled * publisher.sent}")
                report("stalled clients: gaps / duplicates (all checked)", f"{r.stalled_gaps} / {r.stalled_duplicates}")
        report("server CPU total", f"{cpu2 - cpu0:.1f}", "s")
        report("server RSS at end", server.rss_kib() // 1024, "MiB")
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario", choices=["idle", "firehose", "broadcast", "burst", "stalled", "iplimit", "storm",
                                        "irc", "socketio", "engineio", "resume", "abuse", "combos"])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=20, help="publishing time (≤ 60)")
    parser.add_argument("--ip-limit", type=int, default=100, help="iplimit: streams per client address")
    parser.add_argument("--workers", type=int, default=1, help="server processes ([eventstreams] workers)")
    parser.add_argument("--kafka", default="", metavar="BOOTSTRAP",
                        help="serve from this Kafka broker (host:port; scripts/kafka start) instead of the embedded log")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a configuration override for the server (repeatable), e.g. eventstreams.fan_out_interval=0.1")
    parser.add_argument("--rate", type=float, default=0, help="events per second (default: the scenario's)")
    parser.add_argument("--attacks", default="", metavar="NAME,...",
                        help="abuse: only the attacks whose names contain one of these (e.g. drip,IRC); default all")
    parser.add_argument("--connect-rate", type=float, default=0, help="new connections per second (0 = as fast as possible)")
    args = parser.parse_args()
    args.seconds = min(args.seconds, 60)
    print(f"# {args.scenario}: {args.clients} clients, {args.seconds:.0f} s, {time.strftime('%Y-%m-%d %H:%M')}, "
          f"{os.cpu_count()} cores, {args.workers} server process(es)", flush=True)
    if args.scenario == "resume":
        from . import resume

        resume.run(args)
        return
    if args.scenario == "combos":
        from . import combos

        combos.run(args)
        return
    if args.scenario == "abuse":
        from . import abuse

        abuse.run(args)
        return
    if args.scenario in ("irc", "socketio", "engineio"):
        from . import bridges

        bridges.run(args)
        return
    run_scenario(args)


if __name__ == "__main__":
    main()
