"""End to end: POST /v1/events on the intake listener of the real service
tree, and what the public stream then shows."""
from __future__ import annotations

import json
import re
import uuid
from datetime import datetime, timezone

from twisted.internet import defer, reactor
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from eventstreams.transports import ITCPConnection

from .test_stream import StreamTestCase
from .support import RC_TOPICS, Daemon, async_test, rc_event

TEST_TOPIC = "eqiad.test.event"
MAX_BODY = 64 * 1024  # support.BASE_CONFIG: [intake] max_body = 64k
ISO_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def intake_event(n: int, **meta) -> dict:
    return {"$schema": "/test/event/1.0.0", "meta": {"stream": "test", **meta}, "n": n}


@implementer(IBodyProducer)
class ChunkedBody:
    """A body of unknown length, so the client sends it chunked."""

    length = UNKNOWN_LENGTH

    def __init__(self, data: bytes, chunk: int = 8192):
        self.data = data
        self.chunk = chunk

    def startProducing(self, consumer) -> defer.Deferred:
        for start in range(0, len(self.data), self.chunk):
            consumer.write(self.data[start : start + self.chunk])
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class RawResponse(Protocol):
    """Collects everything the server sends until it closes."""

    transport: ITCPConnection  # (Twisted types it Optional[ITransport])

    def __init__(self, request: bytes):
        self.request = request
        self.data = b""
        self.closed: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed.callback(self.data)


def padded(event: dict, size: int) -> bytes:
    """The event as JSON of exactly size bytes (padding in a field)."""
    event = dict(event, pad="")
    base = len(json.dumps(event).encode())
    event["pad"] = "x" * (size - base)
    data = json.dumps(event).encode()
    assert len(data) == size, (len(data), size)
    return data


class IntakeTestCase(StreamTestCase):
    timeout = 60

    async def post(self, d: Daemon, body, query: str = "", listener: str = "intake", **kwargs):
        """POST to /v1/events: (status, parsed JSON body, response)."""
        if not isinstance(body, (bytes, ChunkedBody)):
            body = json.dumps(body).encode()
        response = await self.request(
            "POST", d.url("/v1/events" + query, listener), data=body,
            headers={"Content-Type": "application/json"}, **kwargs,
        )
        content = await response.content()
        try:
            parsed = json.loads(content)
        except ValueError:
            parsed = None
        return response.code, parsed, response

    async def stored(self, d: Daemon, topic: str) -> list[dict]:
        records = await d.backend.read({(topic, 0): 0}, 1000)
        return [json.loads(r.value) for r in records if r.topic == topic]


class Accepting(IntakeTestCase):
    @async_test
    async def test_single_object_is_accepted_and_appears_on_the_stream(self):
        d = await self.daemon()
        client = await self.stream(d, "/v2/stream/recentchange")
        code, body, response = await self.post(d, rc_event(7))
        self.assertEqual(code, 201)
        self.assertEqual((body["status"], body["type"], body["accepted"], body["invalid"], body["error"]),
                         (201, "accepted", 1, [], []))
        self.assertEqual(body["stored"], [{"index": 0, "topic": RC_TOPICS[0], "partition": 0, "offset": 0}])
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json; charset=utf-8"])
        await client.wait_events(1)
        event = client.events[0]
        self.assertEqual(event["id"], 7)
        self.assertEqual(event["title"], "Page 7")
        self.assertEqual(event["meta"]["topic"], RC_TOPICS[0])
        self.assertEqual(event["meta"]["stream"], "mediawiki.recentchange")
        self.assertEqual((event["meta"]["partition"], event["meta"]["offset"]), (0, 0))

    @async_test
    async def test_array_of_three_is_accepted_in_order(self):
        d = await self.daemon()
        code, body, _ = await self.post(d, [rc_event(1), rc_event(2), rc_event(3)])
        self.assertEqual(code, 201)
        self.assertEqual(body["accepted"], 3)
        self.assertEqual(body["invalid"], [])
        self.assertEqual([e["id"] for e in await self.stored(d, RC_TOPICS[0])], [1, 2, 3])
        self.assertEqual(await self.stored(d, RC_TOPICS[1]), [])

    @async_test
    async def test_alias_in_meta_stream_writes_to_the_streams_first_topic(self):
        d = await self.daemon()
        event = rc_event(1)
        event["meta"]["stream"] = "recentchange"
        code, body, _ = await self.post(d, event)
        self.assertEqual((code, body["accepted"]), (201, 1))
        stored = await self.stored(d, RC_TOPICS[0])
        self.assertEqual(len(stored), 1)
        self.assertEqual(stored[0]["meta"]["stream"], "recentchange")

    @async_test
    async def test_events_of_two_streams_in_one_post(self):
        d = await self.daemon()
        code, body, _ = await self.post(d, [rc_event(1), intake_event(2), rc_event(3)])
        self.assertEqual((code, body["accepted"]), (201, 3))
        self.assertEqual([e["id"] for e in await self.stored(d, RC_TOPICS[0])], [1, 3])
        self.assertEqual([e["n"] for e in await self.stored(d, TEST_TOPIC)], [2])

    @async_test
    async def test_non_ascii_is_stored_as_utf8(self):
        d = await self.daemon()
        event = rc_event(1)
        event["title"] = "Zürich 東京"
        code, _, _ = await self.post(d, json.dumps(event, ensure_ascii=False).encode("utf-8"))
        self.assertEqual(code, 201)
        records = await d.backend.read({(RC_TOPICS[0], 0): 0}, 10)
        self.assertIn("Zürich 東京".encode("utf-8"), records[0].value)

    @async_test
    async def test_hasty_answers_202_and_still_writes(self):
        d = await self.daemon()
        client = await self.stream(d, "/v2/stream/test")
        code, body, _ = await self.post(d, [intake_event(1), intake_event(2)], query="?hasty=true")
        self.assertEqual(code, 202)
        self.assertEqual((body["status"], body["type"], body["accepted"], body["invalid"]), (202, "queued", 2, []))
        await client.wait_events(2)
        self.assertEqual([e["n"] for e in client.events], [1, 2])

    @async_test
    async def test_hasty_false_waits_for_the_write(self):
        d = await self.daemon()
        code, body, _ = await self.post(d, intake_event(1), query="?hasty=false")
        self.assertEqual(code, 201)
        self.assertEqual(body["accepted"], 1)


class MetaFields(IntakeTestCase):
    @async_test
    async def test_meta_dt_and_id_are_filled_in_when_missing(self):
        d = await self.daemon()
        before = datetime.now(timezone.utc)
        code, _, _ = await self.post(d, [intake_event(1), intake_event(2)])
        after = datetime.now(timezone.utc)
        self.assertEqual(code, 201)
        stored = await self.stored(d, TEST_TOPIC)
        self.assertEqual(len(stored), 2)
        for event in stored:
            dt = event["meta"]["dt"]
            self.assertRegex(dt, ISO_MS)
            when = datetime.fromisoformat(dt.replace("Z", "+00:00"))
            self.assertLessEqual(before.replace(microsecond=before.microsecond // 1000 * 1000), when)
            self.assertLessEqual(when, after)
            self.assertEqual(str(uuid.UUID(event["meta"]["id"])), event["meta"]["id"])
        self.assertNotEqual(stored[0]["meta"]["id"], stored[1]["meta"]["id"])

    @async_test
    async def test_meta_dt_and_id_are_kept_when_present(self):
        d = await self.daemon()
        event = intake_event(1, dt="2020-02-02T02:02:02Z", id="my-own-id")
        code, _, _ = await self.post(d, event)
        self.assertEqual(code, 201)
        stored = await self.stored(d, TEST_TOPIC)
        self.assertEqual(stored[0]["meta"], {"stream": "test", "dt": "2020-02-02T02:02:02Z", "id": "my-own-id"})

    @async_test
    async def test_meta_dt_that_is_not_a_string_is_invalid(self):
        d = await self.daemon()
        code, body, _ = await self.post(d, intake_event(1, dt=12345))
        self.assertEqual(code, 400)
        self.assertEqual(body["invalid"][0]["context"], "'meta.dt' must be a string")
        self.assertEqual(await self.stored(d, TEST_TOPIC), [])


class Rejecting(IntakeTestCase):
    @async_test
    async def test_mixed_valid_and_invalid_is_207_listing_each_invalid_event(self):
        d = await self.daemon()
        no_meta = {"n": 1}
        unknown = {"meta": {"stream": "nosuch"}, "n": 3}
        events = [intake_event(0), no_meta, intake_event(2), unknown, "a string"]
        code, body, _ = await self.post(d, events)
        self.assertEqual(code, 207)
        self.assertEqual(body["accepted"], 2)
        self.assertEqual(body["error"], [])
        self.assertEqual(
            [(i["index"], i["status"], i["context"]) for i in body["invalid"]],
            [
                (1, "invalid", "the event has no 'meta' object"),
                (3, "invalid", "stream 'nosuch' is not accepted here"),
                (4, "invalid", "an event must be a JSON object"),
            ],
        )
        self.assertEqual(body["invalid"][0]["event"], no_meta)
        self.assertEqual(body["invalid"][1]["event"], unknown)
        self.assertEqual([e["n"] for e in await self.stored(d, TEST_TOPIC)], [0, 2])

    @async_test
    async def test_all_invalid_is_400_and_nothing_is_stored(self):
        d = await self.daemon()
        code, body, _ = await self.post(d, [{"meta": {}}, {"meta": {"stream": ""}}])
        self.assertEqual(code, 400)
        self.assertEqual(body["accepted"], 0)
        self.assertEqual(
            [(i["index"], i["context"]) for i in body["invalid"]],
            [(0, "'meta.stream' must name a stream"), (1, "'meta.stream' must name a stream")],
        )
        self.assertEqual(await self.stored(d, TEST_TOPIC), [])

    @async_test
    async def test_not_json_is_400_invalid_json(self):
        d = await self.daemon()
        code, body, _ = await self.post(d, b"{not json")
        self.assertEqual(code, 400)
        self.assertEqual(body["type"], "invalid_json")
        self.assertEqual(body["status"], 400)
        self.assertTrue(body["detail"].startswith("the body is not JSON: "), body["detail"])

    @async_test
    async def test_body_that_is_not_utf8_is_400_invalid_json(self):
        d = await self.daemon()
        code, body, _ = await self.post(d, b'{"meta": {"stream": "test"}, "x": "\xff"}')
        self.assertEqual(code, 400)
        self.assertEqual(body["type"], "invalid_json")

    @async_test
    async def test_deeply_nested_json_is_400_invalid_json(self):
        # 30 kB of "[" is under max_body but deeper than json.loads can go
        # (it raises RecursionError, not ValueError).
        d = await self.daemon()
        code, body, _ = await self.post(d, b"[" * 30000)
        self.flushLoggedErrors(RecursionError)
        self.assertEqual(code, 400)
        self.assertEqual(body["type"], "invalid_json")

    @async_test
    async def test_empty_array_is_accepted_as_nothing(self):
        d = await self.daemon()
        code, body, _ = await self.post(d, [])
        self.assertEqual(code, 201)
        self.assertEqual((body["status"], body["accepted"], body["stored"], body["invalid"], body["error"]),
                         (201, 0, [], [], []))

    @async_test
    async def test_empty_body_is_400_invalid_json(self):
        d = await self.daemon()
        code, body, _ = await self.post(d, b"")
        self.assertEqual(code, 400)
        self.assertEqual(body["type"], "invalid_json")

    @async_test
    async def test_unknown_stream_is_invalid(self):
        d = await self.daemon()
        code, body, _ = await self.post(d, {"meta": {"stream": "nosuch"}})
        self.assertEqual(code, 400)
        self.assertEqual(body["invalid"][0]["index"], 0)
        self.assertEqual(body["invalid"][0]["context"], "stream 'nosuch' is not accepted here")

    @async_test
    async def test_missing_meta_is_invalid(self):
        d = await self.daemon()
        code, body, _ = await self.post(d, {"n": 1})
        self.assertEqual(code, 400)
        self.assertEqual(body["invalid"], [{"index": 0, "status": "invalid", "event": {"n": 1},
                                            "context": "the event has no 'meta' object"}])

    @async_test
    async def test_missing_meta_stream_is_invalid(self):
        d = await self.daemon()
        code, body, _ = await self.post(d, {"meta": {"dt": "2020-01-01T00:00:00Z"}})
        self.assertEqual(code, 400)
        self.assertEqual(body["invalid"][0]["context"], "'meta.stream' must name a stream")

    @async_test
    async def test_restricted_intake_rejects_other_streams(self):
        d = await self.daemon("intake.streams=test")
        code, body, _ = await self.post(d, [rc_event(1), intake_event(2)])
        self.assertEqual(code, 207)
        self.assertEqual(body["accepted"], 1)
        self.assertEqual(
            [(i["index"], i["context"]) for i in body["invalid"]],
            [(0, "stream 'mediawiki.recentchange' is not accepted here")],
        )
        self.assertEqual(await self.stored(d, RC_TOPICS[0]), [])
        self.assertEqual([e["n"] for e in await self.stored(d, TEST_TOPIC)], [2])

    @async_test
    async def test_restricted_intake_rejects_a_post_of_only_recentchange(self):
        d = await self.daemon("intake.streams=test")
        code, body, _ = await self.post(d, rc_event(1))
        self.assertEqual(code, 400)
        self.assertEqual(body["accepted"], 0)
        self.assertEqual(await self.stored(d, RC_TOPICS[0]), [])

    @async_test
    async def test_restricted_intake_by_alias_rejects_the_other_stream_by_alias(self):
        d = await self.daemon("intake.streams=recentchange")
        event = intake_event(1)
        code, body, _ = await self.post(d, [event, rc_event(2)])
        self.assertEqual(code, 207)
        self.assertEqual([i["index"] for i in body["invalid"]], [0])
        self.assertEqual([e["id"] for e in await self.stored(d, RC_TOPICS[0])], [2])


class BodyLimit(IntakeTestCase):
    @async_test
    async def test_body_of_exactly_max_body_is_accepted(self):
        d = await self.daemon()
        code, body, _ = await self.post(d, padded(intake_event(1), MAX_BODY))
        self.assertEqual(code, 201)
        self.assertEqual(body["accepted"], 1)

    @async_test
    async def test_body_over_max_body_with_content_length_is_413(self):
        d = await self.daemon()
        code, body, _ = await self.post(d, padded(intake_event(1), MAX_BODY + 1))
        self.assertEqual(code, 413)
        self.assertEqual(body["type"], "payload_too_large")
        self.assertEqual(body["detail"], f"the body is larger than {MAX_BODY} bytes")
        self.assertEqual(await self.stored(d, TEST_TOPIC), [])

    @async_test
    async def test_chunked_body_of_exactly_max_body_is_accepted(self):
        d = await self.daemon()
        code, body, _ = await self.post(d, ChunkedBody(padded(intake_event(1), MAX_BODY)))
        self.assertEqual(code, 201)
        self.assertEqual(body["accepted"], 1)

    @async_test
    async def test_chunked_body_over_max_body_is_413(self):
        d = await self.daemon()
        code, body, _ = await self.post(d, ChunkedBody(padded(intake_event(1), MAX_BODY + 1)))
        self.assertEqual(code, 413)
        self.assertEqual(body["type"], "payload_too_large")
        self.assertEqual(await self.stored(d, TEST_TOPIC), [])

    @async_test
    async def test_chunked_body_far_over_max_body_is_413(self):
        d = await self.daemon()
        events = [intake_event(n, pad="y" * 1000) for n in range(400)]  # ~420 kB
        code, body, _ = await self.post(d, ChunkedBody(json.dumps(events).encode()))
        self.assertEqual(code, 413)
        self.assertEqual(body["status"], 413)
        self.assertEqual(await self.stored(d, TEST_TOPIC), [])

    @async_test
    async def test_raw_chunked_upload_over_max_body_is_413(self):
        d = await self.daemon()
        data = padded(intake_event(1), MAX_BODY + 100)
        chunks = b"".join(
            b"%x\r\n%s\r\n" % (len(data[i : i + 4096]), data[i : i + 4096]) for i in range(0, len(data), 4096)
        )
        request = (
            b"POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunks + b"0\r\n\r\n"
        )
        raw = RawResponse(request)
        reactor.connectTCP("127.0.0.1", d.ports["intake"], ClientFactory.forProtocol(lambda: raw))
        response = await raw.closed
        self.assertTrue(response.startswith(b"HTTP/1.1 413 "), response[:200])
        self.assertIn(b'"type":"payload_too_large"', response)
        self.assertEqual(await self.stored(d, TEST_TOPIC), [])

    @async_test
    async def test_a_good_post_after_a_too_large_one_is_accepted(self):
        d = await self.daemon()
        code, _, _ = await self.post(d, padded(intake_event(1), MAX_BODY * 2))
        self.assertEqual(code, 413)
        code, body, _ = await self.post(d, intake_event(2))
        self.assertEqual((code, body["accepted"]), (201, 1))
        self.assertEqual([e["n"] for e in await self.stored(d, TEST_TOPIC)], [2])


class Listeners(IntakeTestCase):
    @async_test
    async def test_intake_is_not_served_on_the_public_listener(self):
        d = await self.daemon()
        self.assertNotEqual(d.ports["api"], d.ports["intake"])
        code, body, response = await self.post(d, rc_event(1), listener="api")
        self.assertIn(code, (404, 405))
        self.assertIsNotNone(body, "the public listener answers JSON")
        self.assertEqual(body["status"], code)
        # A later post to the intake is stored once the log has written
        # anything before it: the marker for "nothing was stored".
        code, body, _ = await self.post(d, rc_event(2))
        self.assertEqual((code, body["accepted"]), (201, 1), body)
        self.assertEqual([e["id"] for e in await self.stored(d, RC_TOPICS[0])], [2])

    @async_test
    async def test_intake_can_be_turned_off(self):
        d = await self.daemon("intake.listen=none")
        self.assertNotIn("intake", d.ports)
        self.assertEqual(set(d.ports), {"api", "metrics"})

    @async_test
    async def test_get_on_the_intake_listener_is_not_a_write(self):
        d = await self.daemon()
        response = await self.request("GET", d.url("/v1/events", "intake"))
        await response.content()
        self.assertEqual(response.code, 405)
