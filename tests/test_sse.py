"""SSE and NDJSON framing, byte for byte, and record decoding."""
from __future__ import annotations

import json

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from eventstreams.backends.base import Record
from eventstreams.hub import Batch, Entry, decode_checked, decode_record
from eventstreams.sse import (Connections, ResponseSink, batch_frame, chunk, chunked_frame, comment_frame, error_frame,
                              event_frame, id_frame, ndjson_line)

TPS = (("eqiad.rc", 0), ("codfw.rc", 0))


def entry(value: bytes, key: bytes | None = None) -> Entry:
    record = Record("eqiad.rc", 0, 41, 1700000000122, key, value)
    event, data = decode_record(record)
    return Entry(7, record, event, data, TPS, ((42, (1700000000123, 0)), (5, None)))


class Framing(SynchronousTestCase):
    def test_event_frame_is_byte_exact(self):
        e = entry(b'{"title": "Z\xc3\xbcrich", "meta": {"id": "x"}}')
        self.assertEqual(
            event_frame(e),
            b"event: message\n"
            b'id: [{"topic":"eqiad.rc","partition":0,"offset":42,"timestamp":1700000000123},'
            b'{"topic":"codfw.rc","partition":0,"offset":5}]\n'
            b'data: {"title":"Z\xc3\xbcrich","meta":{"id":"x","topic":"eqiad.rc","partition":0,"offset":41}}\n\n',
        )

    def test_frames_are_encoded_once_and_shared(self):
        e = entry(b'{"a": 1}')
        self.assertIs(event_frame(e), event_frame(e))
        self.assertIs(id_frame(e), id_frame(e))
        self.assertIs(ndjson_line(e), ndjson_line(e))

    def test_id_only_block(self):
        e = entry(b"{}")
        self.assertEqual(
            id_frame(e),
            b'id: [{"topic":"eqiad.rc","partition":0,"offset":42,"timestamp":1700000000123},'
            b'{"topic":"codfw.rc","partition":0,"offset":5}]\n\n',
        )

    def test_ndjson_line(self):
        e = entry(b'{"a": [1, 2]}')
        self.assertEqual(ndjson_line(e), b'{"a":[1,2],"meta":{"topic":"eqiad.rc","partition":0,"offset":41}}\n')

    def test_newlines_in_values_stay_on_one_data_line(self):
        e = entry(b'{"comment": "line one\\nline two\\r\\n"}')
        frame = event_frame(e)
        self.assertEqual(frame.count(b"\n"), 4)
        self.assertNotIn(b"\r", frame)
        self.assertIn(b'"comment":"line one\\nline two\\r\\n"', frame)

    def test_chunked_frames_are_the_frames_in_one_http_chunk(self):
        # Chunks are joined in one go (not framed, then copied into a chunk):
        # the bytes must be exactly chunk(frame), however the frame was made.
        for value in (b'{"title": "Z\xc3\xbcrich"}', b"{}"):
            for ndjson in (False, True):
                fresh, framed = entry(value), entry(value)
                frame = ndjson_line(framed) if ndjson else event_frame(framed)  # cached first: reused
                self.assertEqual(chunked_frame(fresh, ndjson), chunk(frame))
                self.assertEqual(chunked_frame(framed, ndjson), chunk(frame))
                self.assertIs(chunked_frame(fresh, ndjson), chunked_frame(fresh, ndjson))
                one, two = entry(value), entry(b'{"b": 2}')
                batch = Batch([one, two], two)
                whole = b"".join(ndjson_line(e) if ndjson else event_frame(e) for e in (one, two))
                self.assertEqual(batch_frame(batch, ndjson, True), chunk(whole))
                self.assertEqual(batch_frame(Batch([one, two], two), ndjson, False), whole)
                self.assertEqual(batch_frame(Batch([one], two), ndjson, True), chunk(whole[:len(whole) - len(
                    ndjson_line(two) if ndjson else event_frame(two))]))

    def test_comment_frame_prefixes_every_line(self):
        self.assertEqual(comment_frame("one\ntwo\r"), b": one\n: two\n\n")

    def test_error_frame(self):
        self.assertEqual(
            error_frame('[{"topic":"t","partition":0,"offset":1}]', {"status": 500, "detail": "é"}),
            b'event: error\nid: [{"topic":"t","partition":0,"offset":1}]\ndata: {"status":500,"detail":"\xc3\xa9"}\n\n',
        )
        self.assertEqual(error_frame(None, {}), b"event: error\ndata: {}\n\n")


class Failing(SynchronousTestCase):
    def failed(self, ndjson: bool) -> dict:
        out: list[bytes] = []
        sink = ResponseSink(out.append, lambda: None, ndjson, False, Connections(Clock(), 15), ("s",), "127.0.0.1")
        sink.uri = "/v2/stream/s?since=2024-01-01"
        sink.begin()
        sink.fail("the event log could not be read: gone")
        last = b"".join(out).rstrip(b"\n").split(b"\n")[-1]
        return json.loads(last)["error"] if ndjson else json.loads(last.removeprefix(b"data: "))

    def test_a_failed_stream_says_why_in_the_api_error_shape_with_method_and_uri(self):
        expected = {"status": 500, "type": "internal_error", "title": "Stream Error",
                    "detail": "the event log could not be read: gone", "method": "get",
                    "uri": "/v2/stream/s?since=2024-01-01"}
        self.assertEqual(self.failed(ndjson=False), expected)
        self.assertEqual(self.failed(ndjson=True), expected)


class Decoding(SynchronousTestCase):
    def test_key_becomes_meta_key_as_a_string(self):
        e = entry(b'{"meta": {"dt": "2024"}}', key=b"Q42")
        self.assertEqual(e.event["meta"], {"dt": "2024", "topic": "eqiad.rc", "partition": 0, "offset": 41, "key": "Q42"})

    def test_event_without_meta_gets_one(self):
        self.assertEqual(entry(b'{"a": 1}').event["meta"]["offset"], 41)

    def test_values_that_are_not_json_objects_are_skipped(self):
        for value in (b"[1, 2]", b'"text"', b"42", b"not json", b"\xff\xfe", b"", None):
            record = Record("t", 0, 1, 1, None, value)
            self.assertEqual(decode_record(record), (None, None), value)

    def test_records_that_are_not_strict_json_are_skipped_with_a_reason(self):
        # Issue 14: a lone surrogate, NaN or an infinity is not JSON other
        # programs can read; such records are skipped like any non-JSON one.
        for value, reason in ((b'{"x": "\\ud800"}', "lone_surrogate"), (b'{"x": NaN}', "non_finite"),
                              (b'{"x": -Infinity}', "non_finite"), (b'{"x": 1e999}', "non_finite"),
                              (b"not json", "invalid_json"), (b"[1]", "not_object"), (None, "tombstone")):
            self.assertEqual(decode_checked(Record("t", 0, 1, 1, None, value)), (None, None, reason), value)
        self.assertEqual(decode_record(Record("t", 0, 1, 1, None, b'{"x": "\\ud83d\\ude00"}'))[1],
                         '{"x":"\U0001F600","meta":{"topic":"t","partition":0,"offset":1}}'.encode())
