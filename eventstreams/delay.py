"""The delivery-delay histogram: how long after its record's timestamp each
event was written to a client, per stream (the number an SLO is written
against). Only live deliveries count: a replay for a resume or a `since`
is late on purpose. Record timestamps are the log's (the embedded log's
append time, Kafka's record timestamp), so clocks must agree across hosts."""
from __future__ import annotations

from bisect import bisect_left
from typing import Any, Optional, Sequence

from .metrics import Sample

NAME = "eventstreams_delivery_delay_seconds"
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class _Histogram:
    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)  # the last: above every bound
        self.sum = 0.0


# Writes of one batch to many clients within this many seconds are counted
# as one write at the first one's time (well below the smallest bucket).
SAME_WRITE = 0.001


class DeliveryDelays:
    """Per-stream histograms, fed by the sinks as they write.

    The fan-out writes the same batch to every live client of a filter
    group in one pass: those writes are counted together (one clock read
    and one comparison per client, the per-entry work once per batch)."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.stream_of_topic: dict[str, str] = {}  # for clients of several streams
        self.streams: dict[str, _Histogram] = {}
        self._run: Optional[list] = None  # [batch, streams, first write time, clients]

    def observe(self, batch: Any, streams: tuple[str, ...]) -> None:
        """A batch's matched entries were just written to a client of `streams`."""
        now = self.clock.seconds()
        run = self._run
        if run is not None and run[0] is batch and run[1] == streams and now - run[2] < SAME_WRITE:
            run[3] += 1
            return
        self.flush()
        self._run = [batch, streams, now, 1]

    def flush(self) -> None:
        """Count the writes observed so far."""
        run, self._run = self._run, None
        if run is None:
            return
        batch, streams, now, clients = run
        now_ms = now * 1000.0
        single = streams[0] if len(streams) == 1 else None
        for entry in batch.matched:
            record = entry.record
            stream = single or self.stream_of_topic.get(record.topic)
            if stream is None:
                continue
            histogram = self.streams.get(stream)
            if histogram is None:
                histogram = self.streams[stream] = _Histogram()
            delay = max(0.0, (now_ms - record.timestamp) / 1000.0)
            histogram.counts[bisect_left(BUCKETS, delay)] += clients
            histogram.sum += delay * clients

    def samples(self, stream_names: Sequence[str]) -> list[Sample]:
        """Prometheus samples (cumulative buckets), every configured stream."""
        self.flush()
        out: list[Sample] = []
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
