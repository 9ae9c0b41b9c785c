"""`python -m bench abuse`: every attack at once against healthy clients (issue 12).

One daemon (twistd, embedded log, core 0) with the IRC and RCStream
bridges and their per-address caps as shipped (CAPS, below), and the
public listener's request rate per address (request_rate); healthy clients on core 1: N SSE streams, N/10 IRC clients and
N/10 Socket.IO 0.9 WebSocket clients (`--clients N`, default 1,000), fed
30 events/s through the intake, and a /_info probe every 0.5 s. The run has
three phases of one publisher: quiet (`--seconds`), all attacks at once
(`--seconds`), then 10 s after. Each healthy latency is stamped with its
receive time and counted in the phase it arrived in, so "without
attackers" is the same run, the same clients, the same connections.

The attacks run as processes of their own, on core 1 too (the machine has
two cores) but at nice 19, so that the healthy clients there keep their
share of the core (on the internet the attackers have machines of their
own); what each attack got is printed, to show it still reached the
server's limits:
bench/attacks_http.py (header drip, HEAD pipelining, huge Last-Event-ID,
bad paths), bench/attacks_irc.py (`run_irc_flood`) and
bench/attacks_rcstream.py (`run_pattern_attack`, `run_big_ws_message`,
`run_handshake_flood`); a module that is missing is skipped with a note.

Target (issue 12): healthy p99 within 2x of quiet, RSS growth under
200 MiB, nothing lost.
"""
from __future__ import annotations

import asyncio
import importlib
import inspect
import multiprocessing
import os
import threading
import time
import urllib.request
from typing import Any

from eventstreams.config import ServiceConfig

from . import __main__ as base
from . import bridges, load

AFTER = 10.0  # seconds published after the attacks, before the end
RATE = bridges.RATE  # 30 events/s

# The bridges' per-address caps as shipped (etc/streams.ini): the attacks
# must meet them. Healthy clients come from load.SOURCE_ADDRESSES
# (127.0.0.2-11), the attackers from 127.0.3.x (IRC, RCStream, ATTACKERS)
# and 127.0.2.x (HTTP), so the caps tell them apart; only when N/10 bridge
# clients would put more than a cap on one healthy address is that cap
# raised to fit them (reported).
CAPS = {"irc": {"max_clients": 10000, "max_clients_per_address": 50, "connect_rate_per_address": 2,
                "connect_burst_per_address": 20},
        "rcstream": {"max_sessions": 10000, "max_sessions_per_address": 100, "max_handshakes_per_second": 10}}


def sections(bridge_count: int) -> tuple[str, list[str]]:
    """The [irc] and [rcstream] sections with the shipped caps; the caps
    raised for the healthy clients (if any)."""
    per_address = -(-bridge_count // len(load.SOURCE_ADDRESSES))
    text = (bridges.IRC_SECTION + bridges.RCSTREAM_SECTION).replace(
        "# every load client comes from loopback: no per-address caps (issue 12's)\n", "")
    raised = []
    for section, caps in CAPS.items():
        for key, value in caps.items():
            if key not in ("max_clients", "max_sessions", "connect_rate_per_address") and per_address > value:
                raised.append(f"{section}.{key}={per_address}")
                value = per_address
            old = f"\n{key} = 0\n"
            assert old in text, key
            text = text.replace(old, f"\n{key} = {value}\n", 1)
    return text, raised


def request_rate(sse_count: int, bridge_count: int) -> tuple[tuple[str, ...], list[str]]:
    """The public listener's request rate per address as shipped, its burst
    raised (if need be) to fit the healthy clients' connects from one
    address at the ramp: its SSE streams and two requests per Socket.IO
    client (handshake, WebSocket). bench's CONFIG turns the rate off."""
    shipped = ServiceConfig()
    addresses = len(load.SOURCE_ADDRESSES)
    ramp = -(-sse_count // addresses) + 2 * -(-bridge_count // addresses)
    burst = max(shipped.request_burst_per_ip, ramp)
    raised = [f"eventstreams.request_burst_per_ip={burst}"] if burst > shipped.request_burst_per_ip else []
    return (f"eventstreams.request_rate_per_ip={shipped.request_rate_per_ip:g}",
            f"eventstreams.request_burst_per_ip={burst}"), raised


class Stamped(list):
    """A latency list that keeps when each value arrived: (time, latency)."""

    def append(self, value: float) -> None:
        super().append((time.time(), value))


def split(stamped: list, bounds: list[tuple[float, float]]) -> list[list[float]]:
    return [[v for t, v in stamped if start <= t < end] for start, end in bounds]


def figures(values: list[float]) -> str:
    p = base.percentile
    return f"{p(values, .5) * 1000:.1f} / {p(values, .99) * 1000:.1f} ms ({len(values)})"


# -- healthy clients (processes on core 1) -------------------------------------------


def _pin() -> None:
    if len(os.sched_getaffinity(0)) > 1:
        os.sched_setaffinity(0, {1})


def _sse_main(port: int, count: int, hold: float, worker: int, queue: Any) -> None:
    import uvloop

    _pin()
    uvloop.install()
    result = load.WorkerResult(latencies=Stamped())
    queue.put(asyncio.run(load.run_worker("127.0.0.1", port, "/v2/stream/recentchange", count,
                                          max(1, count // 100), hold, 0, 0, worker, result)))


def _bridge_main(kind: str, port: int, count: int, worker: int, result_queue: Any, ready_queue: Any,
                 stop: Any, progress: Any) -> None:
    import uvloop

    _pin()
    uvloop.install()
    result = bridges.Result(latencies=Stamped())
    result_queue.put((kind, asyncio.run(bridges.run_worker(kind, "127.0.0.1", port, count, max(1, count // 50),
                                                           worker, ready_queue, stop, progress, result))))


class Probe(threading.Thread):
    """GET /_info every 0.5 s: (time, seconds or None when unanswered)."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.results: list[tuple[float, Any]] = []
        self.running = True

    def run(self) -> None:
        while self.running:
            started = time.monotonic()
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/_info", timeout=10).read()
                self.results.append((time.time(), time.monotonic() - started))
            except OSError:
                self.results.append((time.time(), None))
            time.sleep(max(0.0, 0.5 - (time.monotonic() - started)))


# -- attacks (processes on core 1) -------------------------------------------------------


# The bridges' attackers, one address each: one attack's share of a
# per-address cap (the handshake flood's of max_handshakes_per_second) would
# otherwise refuse another before it began.
ATTACKERS = {"irc": "127.0.3.1", "patterns": "127.0.3.2", "message": "127.0.3.3", "handshakes": "127.0.3.4"}


def attack_list(server: Any, seconds: float) -> list[tuple[str, str, str, tuple]]:
    """(name, module, function, args) of every attack."""
    api, irc = server.port, server.irc
    return [
        ("header drip", "bench.attacks_http", "run_header_drip", ("127.0.0.1", api, seconds)),
        ("HEAD pipelining", "bench.attacks_http", "run_head_pipelining", ("127.0.0.1", api, seconds)),
        ("huge Last-Event-ID", "bench.attacks_http", "run_huge_last_event_id", ("127.0.0.1", api, seconds)),
        ("bad paths", "bench.attacks_http", "run_bad_paths", ("127.0.0.1", api, seconds)),
        ("IRC flood", "bench.attacks_irc", "run_irc_flood", ("127.0.0.1", irc, seconds, 10, ATTACKERS["irc"])),
        ("subscription patterns", "bench.attacks_rcstream", "run_pattern_attack",
         ("127.0.0.1", api, seconds, 10, 60_000, 2.0, None, ATTACKERS["patterns"])),
        ("200 MB WebSocket message", "bench.attacks_rcstream", "run_big_ws_message",
         ("127.0.0.1", api, 200 << 20, 1 << 20, None, ATTACKERS["message"])),
        ("handshake flood", "bench.attacks_rcstream", "run_handshake_flood",
         ("127.0.0.1", api, seconds, 100, None, ATTACKERS["handshakes"])),
    ]


def _attack_main(name: str, module: str, function: str, args: tuple, seconds: float, queue: Any) -> None:
    """Run one attack for `seconds` (one without a duration is repeated);
    blocking functions and coroutine functions alike. At the lowest
    priority: on the internet the attackers run on machines of their own,
    here they share core 1 with the healthy clients, whose latency must
    measure the server, not the attackers' share of their core."""
    _pin()
    os.nice(19)
    try:
        f = getattr(importlib.import_module(module), function)
        end = time.monotonic() + seconds
        results = []
        refused = 0  # runs of a repeated attack the server refused (e.g. a 429 to its handshake)
        repeated = "seconds" not in inspect.signature(f).parameters
        while True:
            try:
                result = f(*args)
                if asyncio.iscoroutine(result):
                    result = asyncio.run(result)
                results.append(result)
            except ConnectionError:
                if not repeated:
                    raise
                refused += 1
                time.sleep(1)  # (Retry-After)
            if not repeated or time.monotonic() >= end:
                break
        summary = results[0] if len(results) == 1 and not refused else {
            "runs": len(results), "refused": refused, "last": results[-1] if results else None}
        queue.put((name, summary))
    except Exception as e:  # an attack that fails is reported, the run goes on
        queue.put((name, f"failed: {type(e).__name__}: {e}"))


def available(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False


# -- the scenario ---------------------------------------------------------------------


def run(args: Any) -> None:
    report = base.report
    seconds = args.seconds
    sse_count = args.clients
    bridge_count = max(1, args.clients // 10)
    section, raised = sections(bridge_count)
    rate_sets, raised_rate = request_rate(sse_count, bridge_count)
    raised += raised_rate
    for item in raised:
        print(f"# note: {item}, so that the healthy clients ({sse_count} SSE, {bridge_count} per bridge) "
              f"over {len(load.SOURCE_ADDRESSES)} addresses fit", flush=True)
    server = bridges.BridgeServer(section, rate_sets)
    procs: list = []
    try:
        publisher = bridges.MarkedPublisher(server, RATE, 2 * seconds + AFTER)
        publisher.prime()
        rss_start = server.rss_kib()
        # healthy clients
        sse_queue: Any = multiprocessing.Queue()
        result_queue: Any = multiprocessing.Queue()
        ready_queue: Any = multiprocessing.Queue()
        stop = bridges.Stop()
        progress = {kind: multiprocessing.Value("q", 0, lock=False) for kind in ("irc", "socketio")}
        hold = 2 * seconds + AFTER + 60  # the SSE clients' whole life; they end by themselves
        sse_processes = max(1, min(4, (sse_count + 2499) // 2500))
        per = [sse_count // sse_processes + (1 if i < sse_count % sse_processes else 0) for i in range(sse_processes)]
        sse = [multiprocessing.Process(target=_sse_main, args=(server.port, n, hold, i, sse_queue))
               for i, n in enumerate(per)]
        kinds = {"irc": server.irc, "socketio": server.port}
        bridge_procs = [multiprocessing.Process(target=_bridge_main, args=(
            kind, port, bridge_count, i, result_queue, ready_queue, stop, progress[kind]))
            for i, (kind, port) in enumerate(kinds.items())]
        procs = sse + bridge_procs
        t0 = time.monotonic()
        for p in procs:
            p.start()
        for _ in bridge_procs:
            ready_queue.get(timeout=300)
        server.wait_connected(sse_count, timeout=300)
        report("healthy clients ready (SSE server-side count)", f"{server.connected()} SSE, "
               f"{int(server.metric('eventstreams_irc_clients'))} IRC, "
               f"{int(server.metric('eventstreams_rcstream_sessions'))} Socket.IO")
        report("ramp time", f"{time.monotonic() - t0:.1f}", "s")
        probe = Probe(server.port)
        probe.start()
        cpu_start = server.cpu()
        rss = [(time.time(), server.rss_kib())]
        start = time.time()
        publisher.start()
        attacks = attack_list(server, seconds)
        wanted = [w.strip().lower() for w in getattr(args, "attacks", "").split(",") if w.strip()]
        if wanted:
            attacks = [a for a in attacks if any(w in a[0].lower() for w in wanted)]
            print(f"# only these attacks: {', '.join(a[0] for a in attacks)}", flush=True)
        skipped = sorted({m for _, m, _, _ in attacks if not available(m)})
        for module in skipped:
            print(f"# note: {module.replace('.', '/')}.py is missing: its attacks are skipped", flush=True)
        attack_queue: Any = multiprocessing.Queue()
        attackers = [multiprocessing.Process(target=_attack_main, args=(name, module, function, a, seconds,
                                                                       attack_queue))
                     for name, module, function, a in attacks if module not in skipped]
        attack_at = start + seconds
        after_at = attack_at + seconds
        end_at = after_at + AFTER
        while time.time() < attack_at:
            rss.append((time.time(), server.rss_kib()))
            time.sleep(1)
        rss_before, cpu_before = server.rss_kib(), server.cpu()
        for p in attackers:
            p.start()
        procs += attackers
        while time.time() < after_at:
            rss.append((time.time(), server.rss_kib()))
            time.sleep(1)
        cpu_attacked = server.cpu()
        attack_results = {}
        for _ in attackers:
            try:
                name, summary = attack_queue.get(timeout=120)
                attack_results[name] = summary
            except Exception:
                break
        for p in attackers:
            p.join(30)
            if p.is_alive():
                p.kill()
        while time.time() < end_at:
            rss.append((time.time(), server.rss_kib()))
            time.sleep(1)
        publisher.join()
        published = publisher.sent - publisher.failed_posts
        stop.published.value = published
        # drain: every bridge client has every line, or 10 s without progress
        last, last_change = -1, time.monotonic()
        while time.monotonic() - last_change < 10:
            total = sum(v.value for v in progress.values())
            if total >= published * 2 * bridge_count:
                break
            if total != last:
                last, last_change = total, time.monotonic()
            time.sleep(0.2)
        time.sleep(2)
        rss_after = server.rss_kib()
        probe.running = False
        stop.event.set()
        bridge_results = {}
        for _ in bridge_procs:
            kind, r = result_queue.get(timeout=120)
            bridge_results[kind] = r
        sse_results = [sse_queue.get(timeout=hold + 120) for _ in sse]
        for p in procs:
            p.join(30)
        sse_r = load.merge(sse_results)
        phases = [(start, attack_at), (attack_at, after_at), (after_at, float("inf"))]

        report("events published (failed posts)", f"{published} ({publisher.failed_posts}) at {RATE}/s, "
               f"{seconds:.0f} s quiet + {seconds:.0f} s attacked + {AFTER:.0f} s after")
        print("# healthy latency p50 / p99 (samples): quiet | under attack | after", flush=True)
        ratios = []
        rows = [("SSE", sse_r.latencies)] + [(k, bridge_results[k].latencies) for k in ("irc", "socketio")
                                             if k in bridge_results]
        for name, stamped in rows:
            quiet, attacked, after = split(stamped, phases)
            report(f"  {name}", f"{figures(quiet)} | {figures(attacked)} | {figures(after)}")
            ratios.append((name, base.percentile(attacked, .99) / max(1e-9, base.percentile(quiet, .99))))
        probes = [(t, v) for t, v in probe.results]
        for label, (a, b) in zip(("quiet", "under attack", "after"), phases):
            window = [v for t, v in probes if a <= t < b]
            answered = [v for v in window if v is not None]
            report(f"  /_info {label}", f"{figures(answered)}; unanswered {len(window) - len(answered)}")
        report("p99 under attack / quiet", ", ".join(f"{n} {r:.2f}x" for n, r in ratios))
        report("server CPU quiet / under attack", f"{cpu_before - cpu_start:.1f} / {cpu_attacked - cpu_before:.1f}",
               f"s (of {seconds:.0f} s each)")
        rss_during = max(v for t, v in rss if attack_at <= t < after_at)
        report("server RSS start / before attack / max during / after", f"{rss_start // 1024} / "
               f"{rss_before // 1024} / {rss_during // 1024} / {rss_after // 1024}", "MiB")
        expected_frames = published * sse_r.connected
        report("SSE: connected / failed / statuses", f"{sse_r.connected} / {sse_r.failed} / {sse_r.statuses}")
        report("SSE: events received / expected", f"{sse_r.frames} / {expected_frames}")
        report("SSE: gaps / duplicates (sampled clients)", f"{sse_r.gaps} / {sse_r.duplicates}")
        losses = (expected_frames - sse_r.frames) + sse_r.gaps
        for kind, r in bridge_results.items():
            complete = sum(1 for c in r.counts if c == published)
            report(f"{kind}: clients with every event / connected / failed",
                   f"{complete} / {r.connected} / {r.failed}")
            losses += bridge_count - r.connected  # a healthy client refused (a cap hit it) lost everything
            report(f"{kind}: missing / duplicates (sampled)", f"{r.missing} / {r.duplicates}")
            losses += sum(max(0, published - c) for c in r.counts) + r.missing
        report("losses (must be 0)", losses)
        report("refused by caps (attackers): IRC / RCStream", f"{int(server.metric('eventstreams_irc_refused_total'))} / "
               f"{int(server.metric('eventstreams_rcstream_refused_total'))}")
        for name, summary in attack_results.items():
            report(f"attack: {name}", summary)
        for name, module, _, _ in attacks:
            if module in skipped:
                report(f"attack: {name}", f"skipped ({module} missing)")
        worst = max((r for _, r in ratios), default=float("nan"))
        report("target: p99 within 2x / RSS growth < 200 MiB / no loss",
               f"{worst <= 2} ({worst:.2f}x) / {(rss_during - rss_before) < 200 * 1024} "
               f"({(rss_during - rss_before) // 1024} MiB) / {losses == 0}")
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        server.stop()

