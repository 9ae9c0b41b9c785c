"""parse_stream_request: path, query and headers in, a StreamRequest or the
ApiError the client gets out. Pure: no daemon, no reactor."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, cast

from twisted.trial import unittest

from eventstreams.config import Config, load
from eventstreams.errors import ApiError
from eventstreams.positions import Assignment
from eventstreams.streamrequest import StreamRequest, parse_stream_request, wants_ndjson

CONFIG = """
[stream:mediawiki.recentchange]
topics = eqiad.mediawiki.recentchange,codfw.mediawiki.recentchange
aliases = recentchange

[stream:mediawiki.page-create]
topics = eqiad.mediawiki.page-create,eqiad.mediawiki.recentchange
"""


class ParseStreamRequest(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "streams.ini")
        with open(path, "w", encoding="utf-8") as f:
            f.write(CONFIG)
        self.config: Config = load(path)

    def parse(self, names: str, args: dict | None = None, **headers) -> StreamRequest:
        return parse_stream_request(self.config, names, args or {}, **headers)

    def error(self, names: str, args: dict | None = None, **headers) -> ApiError:
        with self.assertRaises(ApiError) as caught:
            self.parse(names, args, **headers)
        return caught.exception

    def test_a_plain_request(self):
        wanted = self.parse("mediawiki.recentchange")
        self.assertEqual(wanted, StreamRequest(
            streams=("mediawiki.recentchange",),
            topics=("eqiad.mediawiki.recentchange", "codfw.mediawiki.recentchange"),
            filter=None, since=None, assignments=None, ndjson=False, head=False,
        ))

    def test_aliases_resolve_and_names_and_topics_are_each_kept_once_in_order(self):
        wanted = self.parse("recentchange,mediawiki.page-create,mediawiki.recentchange")
        self.assertEqual(wanted.streams, ("mediawiki.recentchange", "mediawiki.page-create"))
        self.assertEqual(wanted.topics, ("eqiad.mediawiki.recentchange", "codfw.mediawiki.recentchange",
                                         "eqiad.mediawiki.page-create"))

    def test_the_request_is_frozen(self):
        wanted = self.parse("recentchange")
        with self.assertRaises(dataclasses.FrozenInstanceError):
            wanted.since = 5

    def test_unknown_streams_are_named_in_the_error(self):
        error = self.error("recentchange,nope,other")
        self.assertEqual((error.status, error.type, error.detail), (400, "not_found", "Invalid streams: nope,other"))

    def test_an_empty_name_is_an_unknown_stream(self):
        error = self.error("")
        self.assertEqual((error.status, error.detail), (400, "Invalid streams: "))

    def test_a_query_that_is_not_utf8(self):
        error = self.error("recentchange", {b"filter.wiki": [b"\xff"]})
        self.assertEqual((error.status, error.type, error.detail),
                         (400, "invalid_query", "the query string is not UTF-8"))

    def test_filters(self):
        wanted = self.parse("recentchange", {b"filter.wiki": [b"enwiki,dewiki"], b"other": [b"x"]})
        self.assertIsNotNone(wanted.filter)
        self.assertTrue(wanted.filter.matches({"wiki": "dewiki"}))
        self.assertFalse(wanted.filter.matches({"wiki": "frwiki"}))

    def test_a_bad_filter(self):
        error = self.error("recentchange", {b"filter.": [b"x"]})
        self.assertEqual((error.status, error.type), (400, "invalid_filter"))
        self.assertIn("empty", error.detail)

    def test_since(self):
        self.assertEqual(self.parse("recentchange", {b"since": [b"1700000000000"]}).since, 1700000000000)
        self.assertEqual(self.parse("recentchange", {b"since": [b"2023-11-14T22:13:20Z"]}).since, 1700000000000)

    def test_a_bad_since(self):
        error = self.error("recentchange", {b"since": [b"yesterday"]})
        self.assertEqual((error.status, error.type), (400, "invalid_timestamp"))

    def test_last_event_id(self):
        header = b'[{"topic":"eqiad.mediawiki.recentchange","partition":0,"offset":5}]'
        wanted = self.parse("recentchange", last_event_id=header)
        self.assertEqual(wanted.assignments, (Assignment("eqiad.mediawiki.recentchange", 0, 5, None),))

    def test_a_bad_last_event_id(self):
        error = self.error("recentchange", last_event_id=b"not json")
        self.assertEqual((error.status, error.type), (400, "invalid_last_event_id"))
        self.assertIn("not JSON", error.detail)
        error = self.error("recentchange", last_event_id=b"\xff")
        self.assertEqual(error.detail, "the header is not UTF-8")

    def test_the_first_error_wins_in_the_order_clients_know(self):
        bad = dict(args={b"filter.": [b"x"], b"since": [b"yesterday"]}, last_event_id=b"nope")
        self.assertEqual(self.error("nope", **bad).type, "not_found")
        self.assertEqual(self.error("recentchange", **bad).type, "invalid_filter")
        self.assertEqual(self.error("recentchange", {b"since": [b"x"]}, last_event_id=b"nope").type,
                         "invalid_timestamp")

    def test_ndjson_by_the_first_accepted_type(self):
        self.assertTrue(self.parse("recentchange", accept=b"application/json").ndjson)
        self.assertTrue(self.parse("recentchange", accept=b"Application/JSON; q=1, text/event-stream").ndjson)
        self.assertFalse(self.parse("recentchange", accept=b"text/event-stream, application/json").ndjson)
        self.assertFalse(self.parse("recentchange", accept=None).ndjson)
        self.assertFalse(wants_ndjson(b"*/*"))

    def test_head(self):
        self.assertTrue(self.parse("recentchange", method=b"HEAD").head)
        self.assertFalse(self.parse("recentchange", method=b"GET").head)


class StreamResponseAdmission(unittest.SynchronousTestCase):
    """StreamResponse takes a slot at admit(), holds it through its sink,
    and gives it back once, when the sink is lost."""

    def setUp(self) -> None:
        from twisted.internet.task import Clock

        from eventstreams.config import ServiceConfig
        from eventstreams.iplimit import make_limits
        from eventstreams.sse import Connections

        self.clock = Clock()
        self.connections = Connections(self.clock, 0)
        self.service = ServiceConfig(client_ip_connection_limit=1)
        self.limits = make_limits(self.connections, 0, 1, None, 0)
        self.wanted = StreamRequest(("s",), ("t",), None, None, None, False, False)

    def response(self, ip: str = "192.0.2.1"):
        from twisted.web.test.requesthelper import DummyRequest

        from eventstreams.streamresponse import StreamResponse

        return StreamResponse(DummyRequest([b"v2", b"stream", b"s"]), self.wanted, ip, service=self.service,
                              backend=cast(Any, None), hubs=cast(Any, None), connections=self.connections, clock=self.clock,
                              limits=self.limits, common_headers=lambda request: None)

    def test_a_slot_is_held_from_admission_to_the_sinks_loss(self):
        first = self.response()
        first.admit()
        sink = first.open()
        with self.assertRaises(ApiError) as caught:
            self.response().admit()
        self.assertEqual((caught.exception.status, caught.exception.retry_after), (429, 10))
        self.response("192.0.2.2").admit()  # another address has its own slots
        sink.lost()
        sink.lost()  # once only
        self.assertEqual(self.connections.count_for("192.0.2.1"), 0)
        self.response().admit()
