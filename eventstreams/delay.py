"""The delivery-delay histogram: how long after its record's timestamp each
event was written to a client, per stream (the number an SLO is written
against). Only live deliveries count: a replay for a resume or a `since`
is late on purpose. Record timestamps are the log's (the embedded log's
append time, Kafka's record timestamp), so clocks must agree across hosts."""
from __future__ import annotations

from bisect import bisect_left
from typing import Any, Sequence

NAME = "eventstreams_delivery_delay_seconds"
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class _Histogram:
    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)  # the last: above every bound
        self.sum = 0.0


class DeliveryDelays:
    """Per-stream histograms, fed by the sinks as they write."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.stream_of_topic: dict[str, str] = {}  # for clients of several streams
        self.streams: dict[str, _Histogram] = {}

    def observe(self, entries: Sequence[Any], streams: tuple[str, ...]) -> None:
        """Entries just written to a client of `streams`."""
        now_ms = self.clock.seconds() * 1000.0
        single = streams[0] if len(streams) == 1 else None
        for entry in entries:
            record = entry.record
            stream = single or self.stream_of_topic.get(record.topic)
            if stream is None:
                continue
            histogram = self.streams.get(stream)
            if histogram is None:
                histogram = self.streams[stream] = _Histogram()
            delay = max(0.0, (now_ms - record.timestamp) / 1000.0)
            histogram.counts[bisect_left(BUCKETS, delay)] += 1
            histogram.sum += delay

    def samples(self, stream_names: Sequence[str]) -> list[tuple]:
        """Prometheus samples (cumulative buckets), every configured stream."""
        out: list[tuple] = []
        help_text = "Seconds from an event's record timestamp to its write to a live client."
        for name in stream_names:
            histogram = self.streams.get(name) or _Histogram()
            total = 0
            for bound, count in zip((*BUCKETS, float("inf")), histogram.counts):
                total += count
                le = "+Inf" if bound == float("inf") else repr(bound)
                out.append((NAME + "_bucket", "histogram", help_text, {"stream": name, "le": le}, total))
            out.append((NAME + "_sum", "histogram", help_text, {"stream": name}, histogram.sum))
            out.append((NAME + "_count", "histogram", help_text, {"stream": name}, total))
        return out
