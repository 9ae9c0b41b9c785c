"""eventstreams_delivery_delay_seconds: record timestamp -> written to a live client, per stream."""
from __future__ import annotations

import re
import time

from twisted.internet.task import Clock
from twisted.trial import unittest

from eventstreams.backends.base import Record
from eventstreams.delay import BUCKETS, DeliveryDelays

from .support import async_test, rc_event
from .test_stream import StreamTestCase


class _Entry:
    def __init__(self, topic: str, timestamp: int) -> None:
        self.record = Record(topic, 0, 0, timestamp, None, b"{}")


class _Batch:
    def __init__(self, *entries: _Entry) -> None:
        self.matched = list(entries)


def series(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Samples of one metric from Prometheus text: labels -> value."""
    out = {}
    for line in text.splitlines():
        match = re.fullmatch(name + r"(?:\{(.*)\})? (\S+)", line)
        if match:
            labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', match.group(1) or "")))
            out[labels] = float(match.group(2))
    return out


class Histogram(unittest.TestCase):
    def test_buckets_are_cumulative_per_stream(self):
        clock = Clock()
        clock.advance(1_000_000)
        delays = DeliveryDelays(clock)
        delays.stream_of_topic = {"a1": "a", "b1": "b"}
        now_ms = 1_000_000_000
        delays.observe(_Batch(_Entry("a1", now_ms - 3), _Entry("a1", now_ms - 700), _Entry("b1", now_ms - 70_000)),
                       ("a", "b"))
        delays.observe(_Batch(_Entry("zz", now_ms + 50)), ("a",))  # one stream: its topic needs no lookup; no negatives
        samples = {(name, tuple(sorted(labels.items()))): value
                   for name, _, _, labels, value in delays.samples(["a", "b", "c"])}
        bucket = "eventstreams_delivery_delay_seconds_bucket"
        self.assertEqual(samples[bucket, (("le", "0.005"), ("stream", "a"))], 2)
        self.assertEqual(samples[bucket, (("le", "0.5"), ("stream", "a"))], 2)
        self.assertEqual(samples[bucket, (("le", "1.0"), ("stream", "a"))], 3)
        self.assertEqual(samples[bucket, (("le", "+Inf"), ("stream", "a"))], 3)
        self.assertEqual(samples["eventstreams_delivery_delay_seconds_count", (("stream", "a"),)], 3)
        self.assertAlmostEqual(samples["eventstreams_delivery_delay_seconds_sum", (("stream", "a"),)], 0.703)
        self.assertEqual(samples[bucket, (("le", "60.0"), ("stream", "b"))], 0)
        self.assertEqual(samples[bucket, (("le", "300.0"), ("stream", "b"))], 1)
        self.assertEqual(samples["eventstreams_delivery_delay_seconds_count", (("stream", "c"),)], 0)
        self.assertEqual(len([k for k in samples if k[0] == bucket and ("stream", "c") in k[1]]), len(BUCKETS) + 1)

    def test_one_batch_written_to_many_clients_is_counted_per_client(self):
        clock = Clock()
        clock.advance(1_000)
        delays = DeliveryDelays(clock)
        streams = ("a",)
        batch = _Batch(_Entry("a1", 1_000_000 - 20), _Entry("a1", 1_000_000 - 2_000))
        for _ in range(1000):
            delays.observe(batch, tuple(list(streams)))  # each client has its own tuple
        clock.advance(0.5)  # the same batch, later (a client catching the pass late): its own delay
        delays.observe(batch, streams)
        later = _Batch(_Entry("a1", 1_000_500))
        delays.observe(later, streams)
        samples = {(name, labels.get("le")): value for name, _, _, labels, value in delays.samples(["a"])}
        self.assertEqual(samples["eventstreams_delivery_delay_seconds_count", None], 2003)
        self.assertEqual(samples["eventstreams_delivery_delay_seconds_bucket", "0.025"], 1001)  # 1000 + `later`
        self.assertEqual(samples["eventstreams_delivery_delay_seconds_bucket", "0.5"], 1001)
        self.assertEqual(samples["eventstreams_delivery_delay_seconds_bucket", "1.0"], 1002)  # the late write
        self.assertEqual(samples["eventstreams_delivery_delay_seconds_bucket", "2.5"], 2003)
        self.assertAlmostEqual(samples["eventstreams_delivery_delay_seconds_sum", None],
                               1000 * 2.02 + 0.52 + 2.5, places=6)


    def test_one_event_in_many_sets_batches_is_counted_per_client(self):
        # With many sets each set sends an event in a batch of its own (its
        # ids are its own): the writes of one event count together, each
        # client once, for the stream the event counts for.
        clock = Clock()
        clock.advance(1_000)
        delays = DeliveryDelays(clock)
        delays.stream_of_topic = {"a1": "a", "b1": "b"}
        event = _Entry("a1", 1_000_000 - 20)
        for streams in [("a",), ("a", "b"), ("a",), ("b", "a"), ("a", "b")]:
            batch = _Batch(event)
            for _ in range(3):  # the clients of one set
                delays.observe(batch, streams)
        delays.observe(_Batch(event), ("b",))  # a one-stream client of b counts it under b
        delays.observe(_Batch(_Entry("a1", 1_000_000 - 20)), ("a",))  # another record: its own
        clock.advance(0.5)
        delays.observe(_Batch(event), ("a",))  # the same event, written later: its own delay
        delays.observe(_Batch(event, _Entry("b1", 1_000_500 - 2_000)), ("a", "b"))
        samples = {(name, labels["stream"], labels.get("le")): value
                   for name, _, _, labels, value in delays.samples(["a", "b"])}
        count, bucket = "eventstreams_delivery_delay_seconds_count", "eventstreams_delivery_delay_seconds_bucket"
        self.assertEqual(samples[count, "a", None], 15 + 1 + 1 + 1)
        self.assertEqual(samples[bucket, "a", "0.025"], 16)
        self.assertEqual(samples[bucket, "a", "0.5"], 16)
        self.assertEqual(samples[bucket, "a", "1.0"], 18)
        self.assertEqual(samples[count, "b", None], 2)
        self.assertEqual(samples[bucket, "b", "0.025"], 1)
        self.assertEqual(samples[bucket, "b", "2.5"], 2)
        self.assertAlmostEqual(samples["eventstreams_delivery_delay_seconds_sum", "a", None],
                               16 * 0.02 + 2 * 0.52, places=6)


class DelayMetric(StreamTestCase):
    @async_test
    async def test_live_deliveries_are_measured_and_replays_are_not(self):
        d = await self.daemon()
        old = int(time.time() * 1000) - 3_600_000
        await d.append(d.rc[0], [rc_event(0)], timestamp=old)  # an hour old: replayed below, not counted
        replay = await self.stream(d, "/v2/stream/recentchange?since=" + str(old - 1000))
        await replay.wait_events(1)
        live = await self.stream(d, "/v2/stream/recentchange,test")
        await live.wait_for(lambda: live.body.startswith(b":ok"))
        two_seconds_ago = int(time.time() * 1000) - 2000
        await d.append(d.rc[1], [rc_event(1)], timestamp=two_seconds_ago)
        await d.append(d.topic("eqiad.test.event"), [rc_event(2)])
        await live.wait_events(2)
        await replay.wait_events(2)

        text = await (await self.get(d.url("/metrics", "metrics"))).text()
        self.assertEqual(text.count("# TYPE eventstreams_delivery_delay_seconds histogram"), 1)
        count = series(text, "eventstreams_delivery_delay_seconds_count")
        # recentchange: the 2 s old event, to both clients (the hour-old one was a replay)
        self.assertEqual(count[(("stream", "mediawiki.recentchange"),)], 2)
        self.assertEqual(count[(("stream", "test"),)], 1)
        buckets = series(text, "eventstreams_delivery_delay_seconds_bucket")
        rc = "mediawiki.recentchange"
        self.assertEqual(buckets[(("le", "1.0"), ("stream", rc))], 0)
        self.assertEqual(buckets[(("le", "300.0"), ("stream", rc))], 2)  # generous: a slow machine
        total = series(text, "eventstreams_delivery_delay_seconds_sum")[(("stream", rc),)]
        self.assertGreaterEqual(total, 4.0)
        self.assertLess(total, 600)
