"""The in-process stream subscriber the bridges use."""
from __future__ import annotations

from twisted.internet import reactor

from eventstreams.feed import StreamFeed

from .support import async_test, rc_event, wait_for
from .test_stream import StreamTestCase


class Feed(StreamTestCase):
    async def feed(self, d, retry: float = 0.1):
        seen: list[dict] = []
        feed = StreamFeed(d.backend, d.hubs, d.config.streams["mediawiki.recentchange"],
                          lambda events: seen.extend(event for event, _ in events), reactor, retry)
        feed.startService()
        self.addCleanup(feed.stopService)
        await wait_for(lambda: feed.subscription, "the feed's subscription")
        return feed, seen

    @async_test
    async def test_delivers_new_events_of_every_topic(self):
        d = await self.daemon()
        await d.append(d.rc[0], [rc_event(0)])  # before the feed: not delivered
        feed, seen = await self.feed(d)
        await d.append(d.rc[0], [rc_event(1)])
        await d.append(d.rc[1], [rc_event(2)])
        await wait_for(lambda: len(seen) >= 2, "two events")
        self.assertEqual([e["id"] for e in seen], [1, 2])
        self.assertEqual(seen[1]["meta"]["topic"], d.rc[1])

    @async_test
    async def test_resubscribes_where_it_stopped_after_a_failure(self):
        d = await self.daemon("eventstreams.ring_size=2")
        feed, seen = await self.feed(d)
        await d.append(d.rc[0], [rc_event(1)])
        await wait_for(lambda: seen, "the first event")
        broken = feed.subscription
        feed.fail("the log went away")  # what a subscription whose read failed does
        broken.cancel()
        await d.append(d.rc[0], [rc_event(n) for n in range(2, 8)])
        await wait_for(lambda: len(seen) >= 7, "seven events")
        self.assertEqual([e["id"] for e in seen], list(range(1, 8)))
        self.assertIsNotNone(feed.subscription)
        self.assertIsNot(feed.subscription, broken)


class Bridge:
    """A bridge's callback, as IRCServer and the RCStream Bridge have."""

    def __init__(self):
        self.batches: list[list[dict]] = []

    def on_batch(self, events):
        self.batches.append([event for event, _ in events])


class Batches(StreamTestCase):
    async def feed(self, d, **kwargs):
        feed = StreamFeed(d.backend, d.hubs, d.config.streams["mediawiki.recentchange"], clock=reactor, **kwargs)
        feed.startService()
        self.addCleanup(feed.stopService)
        await wait_for(lambda: feed.subscription, "the feed's subscription")
        return feed

    @async_test
    async def test_a_burst_reaches_on_batch_in_fewer_calls_in_order(self):
        d = await self.daemon()
        bridge = Bridge()
        await self.feed(d, on_batch=bridge.on_batch)
        await d.append(d.rc[0], [rc_event(n) for n in range(50)])
        await wait_for(lambda: sum(map(len, bridge.batches)) >= 50, "fifty events in batches")
        self.assertEqual([e["id"] for batch in bridge.batches for e in batch], list(range(50)))
        self.assertLess(len(bridge.batches), 50)

    @async_test
    async def test_a_failing_on_batch_costs_only_its_batch(self):
        d = await self.daemon()
        seen: list[int] = []

        def on_batch(events):
            seen.extend(event["id"] for event, _ in events)
            if len(seen) == 3:
                raise ValueError("a broken bridge")

        feed = await self.feed(d, on_batch=on_batch)
        await d.append(d.rc[0], [rc_event(n) for n in range(3)])
        await wait_for(lambda: len(seen) >= 3, "the failing batch")
        await d.append(d.rc[0], [rc_event(3)])  # the feed goes on after a failure
        await wait_for(lambda: len(seen) >= 4, "the event after the failure")
        self.assertEqual(seen, [0, 1, 2, 3])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertIsNotNone(feed.subscription)
