"""The request-head budget (eventstreams.httpchannel) on a fake clock and
in-memory transports: deadlines, bounds, and the refusals' wire form."""
from __future__ import annotations

import json
from typing import Any, Optional

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest
from twisted.web.server import Site
from twisted.web.resource import Resource

from eventstreams.httpchannel import (
    MAX_HEAD_BYTES, PRUNE_ABOVE, ApiRequest, HeadBudget, Throttled, guard, not_counted, reason,
)

REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request) -> bytes:
        if request.path == b"/poll":  # (as an RCStream session's poll says)
            not_counted(request)
        return b"hello"


class SiteCase(unittest.TestCase):
    """A guarded site on a fake clock (its HeadBudget made of budget_args),
    and in-memory connections to it."""

    budget_args: dict[str, Any] = {}

    def setUp(self) -> None:
        self.clock = Clock()
        self.budget, self.site = self.budgeted(**self.budget_args)

    def budgeted(self, **budget_args: Any) -> tuple[HeadBudget, Site]:
        budget = HeadBudget(self.clock, **budget_args)
        return budget, guard(Site(Hello(), reactor=self.clock), budget, ApiRequest, max_body=1000)

    def connect(self, host: str = "192.0.2.1", site: Optional[Site] = None):
        channel = (site or self.site).buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", host, 40000))
        channel.makeConnection(transport)
        return channel, transport


class Budgeted(SiteCase):
    budget_args = {"deadline": 10, "max_pending": 3, "max_per_address": 2}

    def answer(self, transport: StringTransport) -> tuple[bytes, dict]:
        head, _, body = transport.value().partition(b"\r\n\r\n")
        return head.split(b"\r\n")[0], json.loads(body)

    def test_a_dripped_head_is_cut_at_the_deadline_not_reset_per_byte(self):
        channel, transport = self.connect()
        for byte in REQUEST[:-1]:
            channel.dataReceived(bytes([byte]))
            self.clock.advance(1)  # well within any idle timeout
            if transport.disconnecting:
                break
        self.assertTrue(transport.disconnecting)
        status, body = self.answer(transport)
        self.assertEqual(status, b"HTTP/1.1 408 Request Timeout")
        self.assertEqual(body["type"], "request_timeout")
        self.assertEqual(set(body), {"status", "type", "title", "detail", "method", "uri"})
        self.assertEqual(self.budget.pending, {})
        self.assertEqual(self.budget.timed_out, 1)

    def test_cut_heads_are_counted_as_metrics_samples_by_listener_and_reason(self):
        budget = HeadBudget(self.clock, deadline=10, max_pending=3, max_per_address=2, listener="intake")
        zero = {("refused", 0), ("evicted", 0), ("timed_out", 0), ("over_rate", 0)}
        self.assertEqual({(labels["reason"], n) for _, _, _, labels, n in budget.samples()}, zero)
        channel, transport = self.connect()
        self.clock.advance(10)
        self.assertTrue(transport.disconnecting)
        counted = {(name, kind, labels["listener"], labels["reason"], n) for name, kind, _, labels, n in self.budget.samples()}
        self.assertIn(("eventstreams_request_heads_cut_total", "counter", "api", "timed_out", 1), counted)
        self.assertIn(("eventstreams_request_heads_cut_total", "counter", "api", "refused", 0), counted)
        self.assertEqual({labels["listener"] for _, _, _, labels, _ in budget.samples()}, {"intake"})

    def test_a_whole_head_is_answered_and_the_next_one_has_a_deadline_again(self):
        channel, transport = self.connect()
        channel.dataReceived(REQUEST)
        self.assertIn(b"hello", transport.value())
        self.assertEqual(list(self.budget.pending), [channel])  # waiting for the next head
        transport.clear()
        channel.dataReceived(b"GET / HT")
        self.clock.advance(10)
        self.assertTrue(transport.disconnecting)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 408 "))

    def test_an_idle_keep_alive_connection_is_closed_without_an_answer(self):
        # A pooled client would read an unsolicited 408 as its next answer.
        channel, transport = self.connect()
        channel.dataReceived(REQUEST)
        transport.clear()
        self.clock.advance(10)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")

    def test_a_pipelined_head_in_the_same_bytes_is_answered(self):
        channel, transport = self.connect()
        channel.dataReceived(REQUEST + REQUEST)
        self.assertEqual(transport.value().count(b"hello"), 2)
        self.assertFalse(transport.disconnecting)

    def test_over_the_per_address_bound_a_new_connection_is_refused(self):
        for _ in range(2):
            channel, _ = self.connect()
            channel.dataReceived(b"GET / HT")  # a partial head counts against the address
        channel, transport = self.connect()
        self.assertTrue(transport.disconnecting)
        status, body = self.answer(transport)
        self.assertEqual(status, b"HTTP/1.1 503 Service Unavailable")
        self.assertIn(b"Retry-After: 10", transport.value())
        self.assertEqual(len(self.budget.pending), 2)
        _, other = self.connect("192.0.2.2")  # another address still gets in
        self.assertFalse(other.disconnecting)

    def test_over_the_per_address_bound_a_connection_starting_a_head_is_refused(self):
        connections = [self.connect() for _ in range(3)]  # not read yet: none counts
        self.assertFalse(any(t.disconnecting for _, t in connections))
        for channel, _ in connections:
            channel.dataReceived(b"GET / HT")
        self.assertEqual([t.disconnecting for _, t in connections], [False, False, True])
        self.assertEqual(self.answer(connections[2][1])[0], b"HTTP/1.1 503 Service Unavailable")

    def test_a_burst_not_read_yet_is_let_in_and_served(self):
        # More connections than either bound, accepted before any is read.
        connections = [self.connect() for _ in range(5)]
        for channel, transport in connections:
            self.assertFalse(transport.disconnecting)
            channel.dataReceived(REQUEST)
            self.assertIn(b"hello", transport.value())
        self.assertEqual(self.budget.evicted + self.budget.refused, 0)

    def test_over_the_total_the_oldest_partial_head_is_cut(self):
        idle, idle_transport = self.connect("192.0.2.1")
        partial, partial_transport = self.connect("192.0.2.2")
        partial.dataReceived(b"GET / HT")
        self.connect("192.0.2.3")
        newest, newest_transport = self.connect("192.0.2.4")
        self.assertTrue(partial_transport.disconnecting)
        self.assertEqual(self.answer(partial_transport)[0], b"HTTP/1.1 408 Request Timeout")
        self.assertFalse(idle_transport.disconnecting)
        self.assertFalse(newest_transport.disconnecting)
        self.assertEqual(len(self.budget.pending), 3)
        self.assertEqual(self.budget.evicted, 1)

    def test_over_the_total_the_oldest_past_its_grace_is_cut(self):
        oldest, oldest_transport = self.connect("192.0.2.1")
        self.clock.advance(self.budget.grace)
        self.connect("192.0.2.2")
        self.connect("192.0.2.3")
        newest, newest_transport = self.connect("192.0.2.4")
        self.assertTrue(oldest_transport.disconnecting)
        self.assertEqual(oldest_transport.value(), b"")  # it sent nothing: closed without an answer
        self.assertFalse(newest_transport.disconnecting)
        self.assertNotIn(oldest, self.budget.pending)
        self.assertEqual(self.budget.evicted, 1)

    def test_over_twice_the_total_the_oldest_is_cut_however_young(self):
        # (the open-files limit: a burst may not take more than half of it)
        connections = [self.connect(f"192.0.2.{n}") for n in range(7)]
        self.assertEqual([t.disconnecting for _, t in connections], [True] + [False] * 6)
        self.assertEqual(len(self.budget.pending), 6)

    def test_one_timer_serves_every_deadline_and_none_is_left(self):
        first, first_transport = self.connect("192.0.2.1")
        self.clock.advance(4)
        second, second_transport = self.connect("192.0.2.2")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1 + 2)  # the budget's, and twisted.web's idle timers
        self.clock.advance(6)
        self.assertEqual((first_transport.disconnecting, second_transport.disconnecting), (True, False))
        self.clock.advance(4)
        self.assertTrue(second_transport.disconnecting)
        self.assertEqual(self.budget.timed_out, 2)
        self.assertIsNone(self.budget._timer)

    def test_a_head_over_the_limit_gets_a_431(self):
        channel, transport = self.connect()
        channel.dataReceived(b"GET / HTTP/1.1\r\nLast-Event-ID: " + b"x" * MAX_HEAD_BYTES + b"\r\n")
        status, body = self.answer(transport)
        self.assertEqual(status, b"HTTP/1.1 431 Request Header Fields Too Large")
        self.assertEqual(body["type"], "request_header_fields_too_large")
        self.assertTrue(transport.disconnecting)

    def test_a_head_just_under_the_limit_is_served(self):
        channel, transport = self.connect()
        filler = b"x" * (MAX_HEAD_BYTES - 200)
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\nLast-Event-ID: " + filler + b"\r\n\r\n")
        self.assertIn(b"hello", transport.value())

    def test_a_malformed_request_line_is_a_json_400(self):
        channel, transport = self.connect()
        channel.dataReceived(b"NONSENSE\r\n\r\n")
        status, body = self.answer(transport)
        self.assertEqual(status, b"HTTP/1.1 400 Bad Request")
        self.assertEqual(body["type"], "bad_request")
        self.assertEqual(self.budget.pending, {})

    def test_a_declared_body_over_the_limit_is_refused_before_it_is_read(self):
        channel, transport = self.connect()
        channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n" + b"x" * 5000)
        status, body = self.answer(transport)
        self.assertEqual(status, b"HTTP/1.1 413 " + reason(413))  # RFC 9110 renamed it; either is standard
        self.assertEqual((body["type"], body["method"], body["uri"]), ("payload_too_large", "post", "/"))
        self.assertTrue(transport.disconnecting)

    def test_a_chunked_body_over_the_limit_is_refused(self):
        channel, transport = self.connect()
        channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(5):
            channel.dataReceived(b"190\r\n" + b"x" * 400 + b"\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 413 "))
        self.assertTrue(transport.disconnecting)

    def test_closing_gives_back_the_slot(self):
        channel, transport = self.connect()
        channel.connectionLost(None)
        self.assertEqual(self.budget.pending, {})
        self.assertEqual(self.budget.per_address, {})
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_path_that_is_not_utf8_is_a_json_400(self):
        channel, transport = self.connect()
        channel.dataReceived(b"GET /v2/stream/%ff HTTP/1.1\r\nHost: x\r\n\r\n")
        status, body = self.answer(transport)
        self.assertEqual(status, b"HTTP/1.1 400 Bad Request")
        self.assertEqual(body["uri"], "/v2/stream/%ff")
        self.assertEqual(body["type"], "invalid_path")


class RequestRate(SiteCase):
    """Request heads a second per address: a token bucket taken at a head's
    request line, so the headers of the requests over it are never parsed."""

    budget_args = {"deadline": 10, "max_pending": 100, "max_per_address": 100, "request_rate": 2, "request_burst": 3}

    def test_pipelined_requests_over_the_burst_get_a_429_a_second_later_and_the_connection_closes(self):
        channel, transport = self.connect()
        channel.dataReceived(REQUEST * 10)
        self.assertEqual(transport.value().count(b"hello"), 3)
        # The 429 waits (the connection unread, still counted): a flood
        # that comes back as soon as it is answered comes back at the rate.
        self.assertEqual(transport.producerState, "paused")
        self.assertFalse(transport.disconnecting)
        self.assertIn(channel, self.budget.pending)
        self.clock.advance(1)
        answers = transport.value().split(b"HTTP/1.1 ")[1:]
        self.assertEqual([a.split(b"\r\n")[0] for a in answers], [b"200 OK"] * 3 + [b"429 Too Many Requests"])
        self.assertIn(b"Retry-After: 1\r\n", answers[3])
        body = json.loads(answers[3].partition(b"\r\n\r\n")[2])
        self.assertEqual(body["type"], "too_many_requests")
        self.assertEqual(set(body), {"status", "type", "title", "detail", "method", "uri"})
        self.assertEqual((body["method"], body["uri"]), ("get", "/"))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.budget.over_rate, 1)
        self.assertIn(("over_rate", 1), {(labels["reason"], n) for _, _, _, labels, n in self.budget.samples()})

    def test_new_connections_count_too_and_other_addresses_are_not_touched(self):
        statuses = []
        for _ in range(5):
            channel, transport = self.connect()
            channel.dataReceived(b"GET /a?b HTTP/1.1\r\nHost: x\r\n\r\n")
            self.clock.advance(0)
            statuses.append(transport)
        self.clock.advance(1)
        statuses = [t.value().split(b"\r\n")[0] for t in statuses]
        self.assertEqual(json.loads(transport.value().partition(b"\r\n\r\n")[2])["uri"], "/a?b")
        self.assertEqual(statuses, [b"HTTP/1.1 200 OK"] * 3 + [b"HTTP/1.1 429 Too Many Requests"] * 2)
        channel, transport = self.connect("192.0.2.2")
        channel.dataReceived(REQUEST)
        self.assertIn(b"hello", transport.value())

    def test_tokens_come_back_at_the_rate(self):
        channel, transport = self.connect()
        channel.dataReceived(REQUEST * 3)
        self.clock.advance(1)  # two more
        channel.dataReceived(REQUEST * 3)
        self.assertEqual(transport.value().count(b"hello"), 5)
        self.clock.advance(1)
        self.assertTrue(transport.value().endswith(b"}"))  # the sixth: the 429's JSON body
        self.assertTrue(transport.disconnecting)

    def test_a_held_refusal_cut_by_the_deadline_is_answered_then_and_closed(self):
        budget, site = self.budgeted(deadline=0.5, max_pending=100, max_per_address=100,
                                     request_rate=0.1, request_burst=1)
        channel, transport = self.connect(site=site)
        channel.dataReceived(REQUEST * 2)
        self.clock.advance(0.5)  # the head deadline, before the token's 10 s
        self.assertIn(b"429 Too Many Requests", transport.value())
        self.assertTrue(transport.disconnecting)
        self.assertEqual(budget.pending, {})
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_connection_lost_while_its_refusal_is_held_leaves_no_timer(self):
        channel, transport = self.connect()
        channel.dataReceived(REQUEST * 4)
        channel.connectionLost(None)
        self.assertEqual([c for c in self.clock.getDelayedCalls() if c.active()], [])
        self.assertEqual(self.budget.pending, {})

    def test_a_connection_takes_its_token_with_its_request_line(self):
        # Not at its first byte: a head dripped byte by byte gets its 408 at
        # the deadline, not a 429 at once that sends it back at once.
        for _ in range(10):
            self.connect()  # sends nothing
        for _ in range(5):
            channel, transport = self.connect()
            channel.dataReceived(b"GET /")  # sends part of a request line
        channel, transport = self.connect()
        channel.dataReceived(REQUEST)
        self.assertIn(b"hello", transport.value())
        self.assertEqual(self.budget.over_rate, 0)

    def test_a_request_that_says_it_does_not_count_gives_its_token_back(self):
        channel, transport = self.connect()
        channel.dataReceived(b"GET /poll HTTP/1.1\r\nHost: x\r\n\r\n" * 20)
        self.assertEqual(transport.value().count(b"hello"), 20)
        self.assertFalse(transport.disconnecting)

    def test_full_buckets_are_dropped_when_there_are_many(self):
        for n in range(PRUNE_ABOVE + 1):
            channel, _ = self.connect(f"10.0.{n // 250}.{n % 250}")
            channel.dataReceived(REQUEST)
        self.assertEqual(len(self.budget.requests.buckets), PRUNE_ABOVE + 1)
        self.clock.advance(2)  # every bucket full again (burst 3 at 2 a second)
        channel, _ = self.connect("192.0.2.9")
        channel.dataReceived(REQUEST)
        self.assertEqual(list(self.budget.requests.buckets), ["192.0.2.9"])

    def test_no_rate_no_bound(self):
        budget, site = self.budgeted(deadline=10, max_pending=100, max_per_address=100)
        channel, transport = self.connect(site=site)
        channel.dataReceived(REQUEST * 200)
        self.assertEqual(transport.value().count(b"hello"), 200)
        self.assertEqual(budget.requests.buckets, {})


class Phrases(unittest.TestCase):
    def test_every_status_has_its_standard_reason(self):
        self.assertEqual(reason(429), b"Too Many Requests")
        self.assertEqual(reason(431), b"Request Header Fields Too Large")
        self.assertEqual(reason(503), b"Service Unavailable")


class ThrottledLog(unittest.TestCase):
    def test_at_most_burst_lines_per_interval_then_a_count(self):
        from twisted.logger import globalLogPublisher

        seen: list[dict] = []
        globalLogPublisher.addObserver(seen.append)
        self.addCleanup(globalLogPublisher.removeObserver, seen.append)
        clock = Clock()
        throttled = Throttled(clock, burst=3, interval=10)
        for _ in range(50):
            throttled.info("refused {n}", n=1)
        self.assertEqual(len(seen), 3)
        clock.advance(10)
        throttled.info("refused {n}", n=1)
        self.assertEqual(len(seen), 4)
        self.assertEqual(seen[-1]["suppressed"], 47)
