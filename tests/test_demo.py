"""The demo feed: a real embedded log in a temp dir, the feed's clock is a
task.Clock the test advances one tick at a time."""
from __future__ import annotations

import json
import os
import time
import uuid
from datetime import datetime
from typing import cast

from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, Logger, formatEvent, globalLogPublisher
from twisted.trial import unittest

from eventstreams import demo
from eventstreams.backends.embedded import EmbeddedBackend
from eventstreams.config import StreamConfig
from eventstreams.demo import SAMPLE_EVENTS, TICK, DemoFeed, load_events, restamp

from .support import async_test, sleep, wait_for

RC = StreamConfig(
    name="mediawiki.recentchange",
    topics=("eqiad.mediawiki.recentchange", "codfw.mediawiki.recentchange"),
    aliases=("recentchange",),
)
EQIAD, CODFW = RC.topics
START = 1_700_000_000.25  # 2023-11-14T22:13:20.250Z
START_ISO = "2023-11-14T22:13:20.250Z"


def sample(n: int, topic: str | None = None, **extra) -> dict:
    meta = {"id": f"old-{n}", "dt": "2018-03-06T16:39:37+00:00", "stream": "old.stream",
            "partition": 3, "offset": 1000 + n, "domain": "en.wikipedia.org"}
    if topic is not None:
        meta["topic"] = topic
    return {"n": n, "timestamp": 1520354377, "meta": meta, **extra}


class DemoTestCase(unittest.TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.backend = EmbeddedBackend(os.path.join(self.directory, "log.sqlite"), 0, reactor=reactor)
        self.backend.start()
        self.addCleanup(self.backend.stop)
        self.clock = Clock()
        self.clock.advance(START)

    def write_file(self, lines: list) -> str:
        path = os.path.join(self.directory, f"events-{len(os.listdir(self.directory))}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for line in lines:
                f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
        return path

    def log_messages(self) -> list[str]:
        """The texts logged from now on: a log line can be the marker a test waits for."""
        messages: list[str] = []

        def observe(event: dict) -> None:
            messages.append(formatEvent(event) or "")

        observer = cast(ILogObserver, observe)  # (any callable of an event is one)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        return messages

    async def marker_write(self) -> None:
        """A write to another topic: the log writes one batch at a time, so
        once this is stored any write the feed had started is stored too."""
        await self.backend.append("marker", [(None, b"{}")])

    async def start(self, rate: float, path: str | None, stream: StreamConfig = RC) -> DemoFeed:
        """A started feed whose first tick (at START) has been written."""
        feed = DemoFeed(self.backend, stream, rate, path, self.clock)
        feed.startService()
        self.addCleanup(lambda: feed.stopService() if feed.running else None)
        await wait_for(lambda: feed.events, "the sample file to load")
        await self.settle(feed)
        return feed

    async def settle(self, feed: DemoFeed) -> None:
        """Wait for the write of the last tick to be stored."""
        await wait_for(lambda: not feed._busy, "the feed's write", interval=0.005)

    async def tick(self, feed: DemoFeed, ticks: int = 1) -> None:
        for _ in range(ticks):
            self.clock.advance(TICK)
            await self.settle(feed)

    async def stored(self, topic: str) -> list[dict]:
        records = await self.backend.read({(topic, 0): 0}, 100000)
        return [json.loads(r.value or b"") for r in records if r.topic == topic]

    async def all_stored(self) -> list[dict]:
        return await self.stored(EQIAD) + await self.stored(CODFW)


class Restamping(DemoTestCase):
    @async_test
    async def test_meta_dt_is_the_feeds_clock_time_in_iso_with_milliseconds(self):
        feed = await self.start(10, self.write_file([sample(0)]))
        await self.tick(feed)
        first, second = await self.stored(EQIAD)
        self.assertEqual(first["meta"]["dt"], START_ISO)
        dt = datetime.fromisoformat(second["meta"]["dt"].replace("Z", "+00:00"))
        self.assertAlmostEqual(dt.timestamp(), START + TICK, delta=0.002)
        self.assertEqual(first["timestamp"], int(START))

    @async_test
    async def test_meta_dt_is_recent_with_the_real_clock(self):
        feed = DemoFeed(self.backend, RC, 10, self.write_file([sample(0)]), reactor)
        before = time.time()
        feed.startService()
        self.addCleanup(lambda: feed.stopService() if feed.running else None)
        await wait_for(lambda: feed.written >= 1, "a real-time write")
        feed.stopService()
        after = time.time()
        event = (await self.stored(EQIAD))[0]
        self.assertRegex(event["meta"]["dt"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
        dt = datetime.fromisoformat(event["meta"]["dt"].replace("Z", "+00:00")).timestamp()
        self.assertGreaterEqual(dt, before - 0.001)
        self.assertLessEqual(dt, after)
        self.assertGreaterEqual(event["timestamp"], int(before))

    @async_test
    async def test_meta_id_is_a_new_uuid_every_time(self):
        feed = await self.start(10, self.write_file([sample(0)]))
        await self.tick(feed, 3)
        ids = [e["meta"]["id"] for e in await self.stored(EQIAD)]
        self.assertEqual(len(ids), 4)
        self.assertEqual(len(set(ids)), 4)
        for text in ids:
            self.assertEqual(uuid.UUID(text).version, 4)
            self.assertEqual(str(uuid.UUID(text)), text)

    @async_test
    async def test_meta_stream_is_the_feeds_stream_and_position_fields_are_dropped(self):
        original = sample(0, topic=EQIAD, user="Example")
        feed = await self.start(10, self.write_file([original]))
        event = (await self.stored(EQIAD))[0]
        self.assertEqual(event["meta"]["stream"], "mediawiki.recentchange")
        self.assertEqual(event["meta"]["domain"], "en.wikipedia.org")
        self.assertEqual(set(event["meta"]), {"id", "dt", "stream", "domain"})
        self.assertEqual((event["n"], event["user"]), (0, "Example"))
        # The loaded sample is left as it was, for the next lap.
        self.assertEqual(feed.events, [original])

    def test_restamp_does_not_touch_a_timestamp_that_is_not_an_integer(self):
        event = restamp({"timestamp": "yesterday", "meta": None}, "s", START)
        self.assertEqual(event["timestamp"], "yesterday")
        self.assertEqual(event["meta"]["dt"], START_ISO)
        self.assertEqual(event["meta"]["stream"], "s")


class Routing(DemoTestCase):
    @async_test
    async def test_sample_topic_of_the_stream_is_kept_others_go_to_the_first_topic(self):
        path = self.write_file([
            sample(0, topic=CODFW),
            sample(1, topic=EQIAD),
            sample(2, topic="eqiad.mediawiki.page-create"),
            sample(3),
            sample(4, topic=CODFW),
        ])
        feed = await self.start(50, path)  # 5 events in the first tick
        self.assertEqual(feed.written, 5)
        self.assertEqual([e["n"] for e in await self.stored(CODFW)], [0, 4])
        self.assertEqual([e["n"] for e in await self.stored(EQIAD)], [1, 2, 3])

    @async_test
    async def test_single_topic_stream_gets_everything(self):
        stream = StreamConfig(name="test", topics=("eqiad.test.event",))
        feed = await self.start(30, self.write_file([sample(0, topic=CODFW), sample(1)]), stream)
        self.assertEqual(feed.written, 3)
        stored = await self.stored("eqiad.test.event")
        self.assertEqual([e["n"] for e in stored], [0, 1, 0])
        self.assertEqual({e["meta"]["stream"] for e in stored}, {"test"})
        self.assertEqual(await self.stored(CODFW), [])


class Rate(DemoTestCase):
    @async_test
    async def test_writes_rate_events_per_second_of_the_clock(self):
        feed = await self.start(25, None)  # the bundled sample file
        self.assertEqual(feed.written, 2)  # the first tick, at start: int(2.5)
        for k in range(2, 12):
            await self.tick(feed)
            self.assertEqual(feed.written, int(2.5 * k), f"after {k} ticks")
        # 11 ticks = one second after the first write: 27 events.
        self.assertEqual(len(await self.all_stored()), 27)
        # Real time alone writes nothing: the feed follows its clock. Real
        # time passing is the case here, so this one waits for time.
        await sleep(3 * TICK)
        await self.marker_write()
        self.assertEqual(feed.written, 27)
        self.assertEqual(len(await self.all_stored()), 27)

    @async_test
    async def test_ten_seconds_at_rate_50(self):
        feed = await self.start(50, None)
        await self.tick(feed, 100)
        self.assertEqual(feed.written, 505)
        self.assertEqual(len(await self.all_stored()), 505)

    @async_test
    async def test_slow_writes_are_caught_up_not_lost(self):
        feed = await self.start(25, None)
        # Five ticks while the write of the first is still in its thread.
        self.clock.advance(TICK)
        for _ in range(4):
            self.clock.advance(TICK)
        await self.settle(feed)
        await self.tick(feed)
        self.assertEqual(feed.written, int(2.5 * 7))
        self.assertEqual(len(await self.all_stored()), 17)

    @async_test
    async def test_events_of_one_wiki_follow_the_file_in_order(self):
        feed = await self.start(25, None)
        await self.tick(feed, 3)
        self.assertEqual(feed.written, 10)
        samples = load_events(SAMPLE_EVENTS)[:10]  # all wikidatawiki
        self.assertEqual({e["wiki"] for e in samples}, {"wikidatawiki"})
        stored = [e for e in await self.all_stored() if e.get("wiki") == "wikidatawiki"]
        self.assertEqual([(e["id"], e["title"]) for e in stored], [(e["id"], e["title"]) for e in samples[:len(stored)]])

    @async_test
    async def test_stopped_feed_writes_nothing_more(self):
        feed = await self.start(25, None)
        await self.tick(feed, 2)
        written = feed.written
        feed.stopService()
        self.clock.advance(10)
        await self.marker_write()
        self.assertEqual(feed.written, written)
        self.assertEqual(len(await self.all_stored()), written)


class Interleaving(DemoTestCase):
    """The replay takes the wikis in turn, each wiki's events in file order,
    so a filter on any wiki of the sample sees events within seconds."""

    @async_test
    async def test_wikis_take_turns_and_each_keeps_its_order(self):
        lines = [sample(n, wiki="big") for n in range(5)] + [sample(5, wiki="small"), sample(6, wiki="small")]
        lines.insert(2, sample(7))  # no `wiki`: grouped by meta.domain
        feed = await self.start(10, self.write_file(lines))
        await self.tick(feed, 11)
        # in the order each first appears: big, en.wikipedia.org, small
        self.assertEqual([e["n"] for e in await self.stored(EQIAD)], [0, 7, 5, 1, 7, 6, 2, 7, 5, 3, 7, 6])

    @async_test
    async def test_a_canary_event_stays_with_the_event_before_it(self):
        canary = sample(9)
        canary["meta"]["domain"] = "canary"
        lines = [sample(0, wiki="a"), sample(1, wiki="b"), canary, sample(2, wiki="b"), sample(3, wiki="a")]
        feed = await self.start(10, self.write_file(lines))
        await self.tick(feed, 5)
        self.assertEqual([e["n"] for e in await self.stored(EQIAD)], [0, 1, 3, 9, 0, 2])

    @async_test
    async def test_every_wiki_of_the_bundled_sample_within_two_seconds(self):
        events = load_events(SAMPLE_EVENTS)
        wikis = {e["wiki"] for e in events if "wiki" in e}
        feed = await self.start(25, None)
        await self.tick(feed, 19)  # two seconds at the default rate
        stored = await self.all_stored()
        self.assertEqual(len(stored), 50)
        self.assertEqual({e["wiki"] for e in stored if "wiki" in e}, wikis)
        for wiki in ("enwiki", "dewiki"):
            titles = [e["title"] for e in stored if e.get("wiki") == wiki]
            self.assertEqual(titles, [e["title"] for e in events if e.get("wiki") == wiki][:len(titles)])


class SampleFile(DemoTestCase):
    @async_test
    async def test_loops_back_to_the_start_at_the_end_of_the_file(self):
        feed = await self.start(10, self.write_file([sample(0), sample(1), sample(2)]))
        await self.tick(feed, 6)
        self.assertEqual([e["n"] for e in await self.stored(EQIAD)], [0, 1, 2, 0, 1, 2, 0])

    @async_test
    async def test_loops_within_one_write(self):
        feed = await self.start(30, self.write_file([sample(0), sample(1)]))
        await self.tick(feed)
        self.assertEqual([e["n"] for e in await self.stored(EQIAD)], [0, 1, 0, 1, 0, 1])

    @async_test
    async def test_non_json_lines_are_skipped(self):
        warnings: list[dict] = []
        self.patch(demo, "log", Logger(observer=warnings.append))
        path = self.write_file([
            "this is not JSON",
            sample(0),
            "",
            "{broken",
            "[1, 2]",
            "42",
            "null",
            sample(1),
            "   ",
        ])
        self.assertEqual([e["n"] for e in load_events(path)], [0, 1])
        feed = await self.start(10, path)
        await self.tick(feed, 2)
        self.assertEqual([e["n"] for e in await self.stored(EQIAD)], [0, 1, 0])
        skipped = [(e["path"], e["number"]) for e in warnings if e.get("log_format", "").endswith("not JSON, skipped")]
        self.assertEqual(skipped, [(path, 1), (path, 4)] * 2)

    def test_bundled_sample_file(self):
        events = load_events(SAMPLE_EVENTS)
        self.assertEqual(len(events), 5856)
        self.assertTrue(all(isinstance(e.get("meta"), dict) for e in events))

    @async_test
    async def test_file_without_events_starts_nothing(self):
        messages = self.log_messages()
        feed = DemoFeed(self.backend, RC, 10, self.write_file(["not json", "[]"]), self.clock)
        feed.startService()
        self.addCleanup(feed.stopService)
        await wait_for(lambda: any("demo feed: no events" in m for m in messages), "the file to be read")
        self.clock.advance(1)
        await self.marker_write()
        self.assertEqual((feed.events, feed.written), ([], 0))
        self.assertEqual(await self.all_stored(), [])

    @async_test
    async def test_missing_file_is_logged_and_writes_nothing(self):
        messages = self.log_messages()
        feed = DemoFeed(self.backend, RC, 10, os.path.join(self.directory, "nosuch.jsonl"), self.clock)
        feed.startService()
        self.addCleanup(feed.stopService)
        await wait_for(lambda: any("demo feed: cannot read" in m for m in messages), "the failure to read")
        self.clock.advance(1)
        await self.marker_write()
        self.assertEqual(len(self.flushLoggedErrors(FileNotFoundError)), 1)
        self.assertEqual(feed.written, 0)
        self.assertEqual(await self.all_stored(), [])
