"""Prometheus text exposition of the daemon's counters and gauges.

Every part that counts something reports it as `Sample`s (a `samples()`
method, or collect() below); this module imports nothing of theirs at run
time, so any of them can use the type.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Callable, Iterable

from twisted.web.resource import Resource

if TYPE_CHECKING:
    from .hub import Hubs
    from .intake import Counts
    from .sse import Connections

Sample = tuple[str, str, str, dict[str, str], float]  # name, type, help, labels, value


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items())) + "}"


def render(samples: Iterable[Sample]) -> bytes:
    lines: list[str] = []
    seen: set[str] = set()
    for name, kind, help_text, labels, value in samples:
        family = re.sub(r"_(bucket|sum|count)$", "", name) if kind == "histogram" else name
        if family not in seen:
            seen.add(family)
            lines.append(f"# HELP {family} {help_text}")
            lines.append(f"# TYPE {family} {kind}")
        lines.append(f"{name}{_labels(labels)} {value}")
    return ("\n".join(lines) + "\n").encode("utf-8")


def collect(connections: Connections, hubs: Hubs, intake: Counts | None, stream_names: Iterable[str]) -> list[Sample]:
    stream_names = list(stream_names)
    c = connections.counters
    samples: list[Sample] = []
    for name in stream_names:
        samples.append(("eventstreams_connected_clients", "gauge", "Open stream responses per stream.",
                        {"stream": name}, connections.per_stream.get(name, 0)))
    samples += [
        ("eventstreams_connections_total", "counter", "Stream responses started.", {}, c.connections_total),
        ("eventstreams_events_delivered_total", "counter", "Events written to stream clients.", {}, c.events_delivered),
        ("eventstreams_bytes_sent_total", "counter", "Bytes written to stream clients.", {}, c.bytes_sent),
        ("eventstreams_hubs", "gauge", "Distinct stream and partition sets served (one hub each).", {}, len(hubs.hubs)),
        ("eventstreams_stream_sets_refused_total", "counter",
         "Stream requests refused because max_stream_sets distinct sets were served.", {}, hubs.refused),
        ("eventstreams_log_readers", "gauge", "Log readers (one per partition, shared by every set).", {},
         len(hubs.rings.readers)),
        ("eventstreams_ring_bytes", "gauge", "Bytes held by the partition rings (bounded by ring_memory).", {},
         hubs.rings.bytes),
    ]
    for (status, reason), count in sorted(c.rejected.items()):
        samples.append(("eventstreams_requests_rejected_total", "counter", "Stream requests answered with an error.",
                        {"status": str(status), "reason": reason}, count))
    samples.append(("eventstreams_backend_unavailable_total", "counter",
                    "Stream requests answered 503 because the event log could not be reached.", {},
                    c.backend_unavailable))
    for hub in hubs.hubs.values():
        label = {"partitions": ",".join(f"{t}/{p}" for t, p in hub.tps)}
        samples.append(("eventstreams_catchup_cursors", "gauge", "Clients reading behind the live head.", label, hub.catching_up))
        samples.append(("eventstreams_live_clients", "gauge", "Clients fed from the live head.", label,
                        sum(len(s) for _, s in hub.groups.values())))
        for reason, count in sorted((hub.skipped_reasons or {"invalid_json": 0}).items()):
            samples.append(("eventstreams_records_skipped_total", "counter",
                            "Records that were not strict JSON objects, by reason.", {**label, "reason": reason}, count))
    for (topic, partition), ring in sorted(hubs.rings.rings.items()):
        samples.append(("eventstreams_ring_entries", "gauge", "Records held in a partition's ring.",
                        {"partition": f"{topic}/{partition}"}, len(ring)))
    samples += connections.delays.samples(list(stream_names))
    if intake is not None:
        # Every stream's counters exist from the start (0 until an event comes).
        counts = {(stream, "accepted"): 0 for stream in stream_names}
        counts.update(intake.by_stream)
        for (stream, result), count in sorted(counts.items()):
            samples.append(("eventstreams_intake_events_total", "counter",
                            "Events posted to /v1/events by stream and result (accepted, duplicate, invalid, failed).",
                            {"result": result, "stream": stream}, count))
    return samples


class MetricsResource(Resource):
    isLeaf = True

    def __init__(self, collect: Callable[[], list[Sample]]):
        super().__init__()
        self.collect = collect

    def render_GET(self, request) -> bytes:
        request.setHeader("content-type", "text/plain; version=0.0.4; charset=utf-8")
        return render(self.collect())
