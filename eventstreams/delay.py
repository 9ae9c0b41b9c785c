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
    and one comparison per client, the per-entry work once per batch).
    A batch of one event counts with the writes of that event to other
    sets (each set has its own batch, as its ids are its own): with many
    sets, one event goes out in many one-event batches in a row."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.stream_of_topic: dict[str, str] = {}  # for clients of several streams
        self.streams: dict[str, _Histogram] = {}
        # [batch, streams, first write time, clients, record, stream]: the
        # last batch written and its clients' streams; for a run of one-event
        # batches also their record and the stream it counts for
        self._run: Optional[list] = None

    def observe(self, batch: Any, streams: tuple[str, ...]) -> None:
        """A batch's matched entries were just written to a client of `streams`."""
        now = self.clock.seconds()
        run = self._run
        if run is not None and now - run[2] < SAME_WRITE:
            if run[0] is batch and run[1] == streams:
                run[3] += 1
                return
            record = run[4]
            if record is not None:  # the same event in another set's batch?
                matched = batch.matched
                if len(matched) == 1 and matched[0].record is record and run[5] == self._stream_of(record, streams):
                    run[0], run[1] = batch, streams  # its next clients take the first test
                    run[3] += 1
                    return
        self.flush()
        matched = batch.matched
        if len(matched) == 1:
            record = matched[0].record
            self._run = [batch, streams, now, 1, record, self._stream_of(record, streams)]
        else:
            self._run = [batch, streams, now, 1, None, None]

    def flush(self) -> None:
        """Count the writes observed so far."""
        run, self._run = self._run, None
        if run is None:
            return
        batch, streams, now, clients, record, stream = run
        now_ms = now * 1000.0
        if record is not None:
            self._count(record, stream, now_ms, clients)
            return
        for entry in batch.matched:
            self._count(entry.record, self._stream_of(entry.record, streams), now_ms, clients)

    def _stream_of(self, record: Any, streams: tuple[str, ...]) -> Optional[str]:
        """The stream a record counts for: the client's, or its topic's when
        the client follows several."""
        return streams[0] if len(streams) == 1 else self.stream_of_topic.get(record.topic)

    def _count(self, record: Any, stream: Optional[str], now_ms: float, clients: int) -> None:
        if stream is None:
            return
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
