"""The intake a producer never has to second-guess (issue 14): strict JSON in
and out, one answer shape, deduplication by meta.id, schema validation, and
503 instead of an acknowledgement the log cannot keep. End to end against
the real service tree, over the embedded log and the test Kafka broker."""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import time
import uuid
from typing import cast

import treq
from twisted.internet import reactor
from twisted.internet.protocol import ClientFactory
from twisted.internet.threads import deferToThread
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.web.client import HTTPConnectionPool

from eventstreams import strictjson

from .support import KAFKA, async_test, create_topics, free_port, open_stream, rc_event, sleep, wait_for, write_config
from .test_daemon import DaemonTestCase
from .test_intake import IntakeTestCase, RawResponse, TEST_TOPIC, intake_event
from .test_rcstream import RCStreamCase
from .test_irc import IRC, IRCTestCase

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMAS = os.path.join(REPO, "eventstreams", "schemas")
SCRIPT = os.path.join(REPO, "scripts", "kafka")
SHAPE = {"status", "type", "title", "detail", "method", "uri"}


def kafka_script(*args: str) -> str:
    # On a loaded machine a broker restart has taken over a minute: give it
    # five, so that the tests after this one find the broker back.
    env = dict(os.environ, KAFKA_START_TIMEOUT=os.environ.get("KAFKA_START_TIMEOUT", "300"))
    return subprocess.run([SCRIPT, *args], check=True, capture_output=True, text=True, timeout=400, env=env).stdout


def ev(n: int, **meta) -> dict:
    """A test event with its own meta.id (as a producer that retries sends it)."""
    return intake_event(n, id=meta.pop("id", f"ev-{n}"), **meta)


class Collector:
    """Log events emitted while the test runs."""

    def __init__(self, case) -> None:
        self.events: list[dict] = []
        observer = cast(ILogObserver, self.events.append)  # (any callable of an event is one)
        globalLogPublisher.addObserver(observer)
        case.addCleanup(globalLogPublisher.removeObserver, observer)

    def critical(self) -> list[dict]:
        return [e for e in self.events if getattr(e.get("log_level"), "name", "") == "critical"]


class TrustCase(IntakeTestCase):
    """Helpers for both engines."""

    async def post_raw(self, d, body: bytes):
        return await self.post(d, body)

    async def topic_events(self, d, topic: str) -> list[dict]:
        topic = d.topic(topic)
        records = await d.backend.read({(topic, 0): 0}, 10000)
        if d.kafka:  # a pooled consumer answers what it has: read until the end
            records = list(records)
            low, high = await d.backend.watermarks((topic, 0))
            while records and records[-1].offset + 1 < high:
                records += await d.backend.read({(topic, 0): records[-1].offset + 1}, 10000)
        return [json.loads(r.value) for r in records if r.topic == topic]

    async def metrics(self, d) -> str:
        response = await self.get(d.url("/metrics", "metrics"))
        return (await response.content()).decode()

    def assertShape(self, body: dict, status: int) -> None:
        self.assertLessEqual(SHAPE, set(body), body)
        self.assertEqual(body["status"], status)
        self.assertEqual((body["method"], body["uri"]), ("post", "/v1/events"))


class StrictJSON(TrustCase):
    @async_test
    async def test_nan_infinity_overflow_and_lone_surrogates_are_rejected_per_event(self):
        d = await self.daemon()
        body = (
            b'[{"meta":{"stream":"test"},"n":0},'
            b'{"meta":{"stream":"test"},"m":NaN},'
            b'{"meta":{"stream":"test"},"length":{"old":1,"new":Infinity}},'
            b'{"meta":{"stream":"test"},"m":-Infinity},'
            b'{"meta":{"stream":"test"},"m":1e999},'
            b'{"meta":{"stream":"test"},"title":"a\\ud800b"},'
            b'{"meta":{"stream":"test"},"n":6}]'
        )
        code, answer, _ = await self.post(d, body)
        self.assertEqual(code, 207, answer)
        self.assertShape(answer, 207)
        self.assertEqual(answer["accepted"], 2)
        reasons = {i["index"]: i["context"] for i in answer["invalid"]}
        self.assertEqual(sorted(reasons), [1, 2, 3, 4, 5])
        self.assertIn("'m' is NaN", reasons[1])
        self.assertIn("'length.new' is an infinity", reasons[2])
        self.assertIn("'m' is an infinity", reasons[3])
        self.assertIn("'m' is an infinity", reasons[4])
        self.assertIn("'title' holds a lone surrogate", reasons[5])
        self.assertEqual([e["index"] for e in answer["stored"]], [0, 6])
        self.assertEqual([e.get("n") for e in await self.topic_events(d, TEST_TOPIC)], [0, 6])

    @async_test
    async def test_a_lone_surrogate_in_the_second_event_is_not_a_500(self):
        d = await self.daemon()
        code, answer, response = await self.post(
            d, b'[{"meta":{"stream":"test","id":"s-1"},"n":1},{"meta":{"stream":"test","id":"s-2"},"t":"\\udc00"}]')
        self.assertEqual(code, 207, answer)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json; charset=utf-8"])
        self.assertEqual(answer["stored"][0]["index"], 0)
        self.assertEqual(answer["invalid"][0]["index"], 1)
        # The producer retries the whole batch: nothing is stored twice.
        code, answer, _ = await self.post(
            d, b'[{"meta":{"stream":"test","id":"s-1"},"n":1},{"meta":{"stream":"test","id":"s-2"},"t":"\\udc00"}]')
        self.assertEqual((code, answer["accepted"]), (207, 0), answer)
        self.assertEqual([x["index"] for x in answer["duplicate"]], [0])
        self.assertEqual([e.get("n") for e in await self.topic_events(d, TEST_TOPIC)], [1])

    @async_test
    async def test_every_answer_is_strict_json(self):
        d = await self.daemon()
        _, _, response = await self.post(d, b'{"meta":{"stream":"test"},"m":NaN}')
        raw = await response.content()
        answer = strictjson.loads(raw)  # raises on NaN
        self.assertEqual(answer["invalid"][0]["context"], "'m' is NaN, which is not JSON")
        self.assertNotIn("event", answer["invalid"][0])  # it cannot be sent back as JSON

    @async_test
    async def test_records_that_are_not_strict_json_are_skipped_counted_and_passed(self):
        d = await self.daemon()
        sse = await self.stream(d, "/v2/stream/test")
        ndjson = await self.stream(d, "/v2/stream/test", {"Accept": "application/json"})
        await d.backend.append(d.topic(TEST_TOPIC), [
            (None, b'{"meta":{"stream":"test"},"n":1}'),
            (None, b'{"meta":{"stream":"test"},"m":NaN}'),
            (None, b'{"meta":{"stream":"test"},"length":{"old":NaN,"new":Infinity}}'),
            (None, b'{"meta":{"stream":"test"},"t":"\\ud800"}'),
            (None, b'{"meta":{"stream":"test"},"m":1e999}'),
            (None, b'{"meta":{"stream":"test"},"n":2}'),
        ])
        await sse.wait_events(2)
        await ndjson.wait_for(lambda: ndjson.body.count(b"\n") >= 3)
        self.assertEqual([e["n"] for e in sse.events], [1, 2])
        self.assertEqual(json.loads(sse.last_id)[0]["offset"], 6)
        for body in (sse.body, ndjson.body):
            self.assertNotIn(b"NaN", body)
            self.assertNotIn(b"Infinity", body)
            self.assertNotIn(b"\\ud800", body)
        self.assertEqual([json.loads(line)["n"] for line in ndjson.body.split(b"\n") if line.strip()], [1, 2])
        text = await self.metrics(d)
        counts = {}
        for line in text.splitlines():
            if line.startswith("eventstreams_records_skipped_total{"):
                reason = line.split('reason="')[1].split('"')[0]
                counts[reason] = counts.get(reason, 0) + float(line.rsplit(" ", 1)[1])
        self.assertEqual(len(d.hubs.hubs), 1)
        self.assertEqual(counts, {"non_finite": 3, "lone_surrogate": 1})
        self.flushLoggedErrors()


class Bridges(IRCTestCase, RCStreamCase):
    """The IRC and RCStream bridges never see a record that is not strict JSON."""

    overrides = RCStreamCase.overrides + IRC

    @async_test
    async def test_irc_and_rcstream_get_the_good_events_only(self):
        d = await self.daemon()
        irc = await self.registered(d)
        await self.post(d, [rc_event(1)])
        await self.channel_exists(irc, "#en.wikipedia")
        irc.send("JOIN #en.wikipedia")
        await irc.wait_line(0, lambda line: " 366 " in line)
        _, _, body = await self.text("GET", d.url("/socket.io/1/"))
        url = d.url(f"/socket.io/1/xhr-polling/{body.split(':')[0]}")
        await self.text("GET", url)
        subscribe = '5:1+:/rc:{"name":"subscribe","args":["*"]}'
        await self.text("POST", url, data=f"\ufffd6\ufffd1::/rc\ufffd{len(subscribe)}\ufffd{subscribe}".encode())
        await self.text("GET", url)
        await self.wait_subscribed(d)
        start = len(irc.lines)
        nan = json.dumps(rc_event(2)).replace('"namespace": 0', '"namespace": NaN').encode()
        big = json.dumps(rc_event(3)).replace('"namespace": 0', '"length": {"old": 1, "new": Infinity}').encode()
        surrogate = json.dumps(rc_event(4)).replace('Page 4', 'Page \\ud800').encode()
        self.assertIn(b"NaN", nan)
        self.assertIn(b"\\ud800", surrogate)
        await d.backend.append(d.rc[0], [(None, nan), (None, big), (None, surrogate),
                                         (None, json.dumps(rc_event(5)).encode())])
        received = ""
        deadline = time.monotonic() + 20
        while '"title":"Page 5"' not in received and time.monotonic() < deadline:
            received += (await self.text("GET", url))[2]
        self.assertIn('"title":"Page 5"', received)
        for page in ("Page 2", "Page 3", "Page \\ud800"):
            self.assertNotIn(page, received)
        self.assertNotIn("NaN", received)
        await irc.wait_line(start, lambda line: "Page 5" in line)
        self.assertEqual([line for line in irc.lines[start:] if "PRIVMSG" in line and "Page" in line],
                         [next(line for line in irc.lines[start:] if "Page 5" in line)])
        self.flushLoggedErrors()


class Answers(TrustCase):
    @async_test
    async def test_every_answer_has_the_error_shape_with_method_and_uri(self):
        d = await self.daemon()
        code, body, _ = await self.post(d, [ev(1)])
        self.assertEqual(code, 201)
        self.assertShape(body, 201)
        self.assertEqual(body["accepted"], 1)
        self.assertEqual([(s["index"], s["topic"], s["partition"]) for s in body["stored"]],
                         [(0, d.topic(TEST_TOPIC), 0)])
        code, body, _ = await self.post(d, [ev(2), {"n": 1}])
        self.assertShape(body, 207)
        code, body, _ = await self.post(d, [{"n": 1}])
        self.assertShape(body, 400)
        self.assertEqual(body["type"], "invalid_events")
        code, body, _ = await self.post(d, b"{nope")
        self.assertShape(body, 400)
        self.assertEqual(body["type"], "invalid_json")
        code, body, _ = await self.post(d, b"[" + b" " * 70000 + b"]")
        self.assertShape(body, 413)

    @async_test
    async def test_get_on_the_intake_root_is_a_json_404_and_get_on_events_a_json_405(self):
        d = await self.daemon()
        for path, status in (("/", 404), ("/nope", 404), ("/v1/events", 405)):
            response = await self.get(d.url(path, "intake"))
            body = json.loads(await response.content())
            self.assertEqual(response.code, status)
            self.assertEqual((body["status"], body["method"], body["uri"]), (status, "get", path))

    @async_test
    async def test_metrics_count_accepted_invalid_and_duplicate_by_stream(self):
        d = await self.daemon()
        await self.post(d, [ev(1), ev(2), rc_event(3), {"meta": {"stream": "test"}, "x": float("nan")}])
        await self.post(d, [ev(1)])
        text = await self.metrics(d)
        self.assertIn('eventstreams_intake_events_total{result="accepted",stream="test"} 2', text)
        self.assertIn('eventstreams_intake_events_total{result="accepted",stream="mediawiki.recentchange"} 1', text)
        self.assertIn('eventstreams_intake_events_total{result="invalid",stream="test"} 1', text)
        self.assertIn('eventstreams_intake_events_total{result="duplicate",stream="test"} 1', text)


class Deduplication(TrustCase):
    @async_test
    async def test_a_batch_sent_twice_is_stored_once_and_the_answer_gives_the_positions(self):
        d = await self.daemon()
        batch = [ev(n) for n in range(5)] + [rc_event(9)]
        code, first, _ = await self.post(d, batch)
        self.assertEqual((code, first["accepted"]), (201, 6), first)
        code, again, _ = await self.post(d, batch)
        self.assertEqual((code, again["accepted"]), (201, 0), again)
        self.assertEqual(again["type"], "duplicate")
        self.assertEqual([x["index"] for x in again["duplicate"]], list(range(6)))
        stored = {s["index"]: (s["topic"], s["partition"], s["offset"]) for s in first["stored"]}
        self.assertEqual({x["index"]: (x["topic"], x["partition"], x["offset"]) for x in again["duplicate"]}, stored)
        self.assertEqual([e["n"] for e in await self.topic_events(d, TEST_TOPIC)], list(range(5)))

    @async_test
    async def test_the_same_id_twice_in_one_batch_is_stored_once(self):
        d = await self.daemon()
        code, body, _ = await self.post(d, [ev(1), ev(2, id="ev-1"), ev(3)])
        self.assertEqual((code, body["accepted"]), (201, 2), body)
        self.assertEqual([x["index"] for x in body["duplicate"]], [1])
        self.assertEqual([e["n"] for e in await self.topic_events(d, TEST_TOPIC)], [1, 3])

    @async_test
    async def test_two_concurrent_posts_of_one_batch_store_it_once(self):
        d = await self.daemon()
        batch = [ev(n) for n in range(50)]
        results = [self.post(d, batch) for _ in range(3)]
        answers = [await r for r in results]
        self.assertEqual(sorted(a[1]["accepted"] for a in answers), [0, 0, 50])
        self.assertEqual([e["n"] for e in await self.topic_events(d, TEST_TOPIC)], list(range(50)))

    @async_test
    async def test_events_without_an_id_are_never_duplicates(self):
        d = await self.daemon()
        await self.post(d, [intake_event(1)])
        code, body, _ = await self.post(d, [intake_event(1)])
        self.assertEqual((code, body["accepted"]), (201, 1))
        self.assertEqual(len(await self.topic_events(d, TEST_TOPIC)), 2)


class Schemas(TrustCase):
    overrides = (f"intake.schemas={SCHEMAS}",)

    @async_test
    async def test_schema_invalid_events_are_rejected_naming_the_path_and_the_rule(self):
        d = await self.daemon()
        bad = rc_event(2)
        bad["bot"] = "yes"
        worse = rc_event(3)
        worse["meta"]["dt"] = "yesterday"
        worse["length"] = {"old": "x", "new": 2}
        code, body, _ = await self.post(d, [rc_event(1), bad, worse])
        self.assertEqual(code, 207, body)
        self.assertEqual([i["index"] for i in body["invalid"]], [1, 2])
        self.assertIn("bot", body["invalid"][0]["context"])
        self.assertIn("type", body["invalid"][0]["context"])
        self.assertEqual(body["invalid"][0]["errors"][0]["path"], "bot")
        self.assertEqual(body["invalid"][0]["errors"][0]["rule"], "type")
        paths = {(e["path"], e["rule"]) for e in body["invalid"][1]["errors"]}
        self.assertEqual(paths, {("length.old", "type"), ("meta.dt", "format")})

    @async_test
    async def test_missing_unknown_and_malformed_schema_uris_are_invalid(self):
        d = await self.daemon()
        none = {"meta": {"stream": "test"}, "n": 1}
        unknown = dict(none, **{"$schema": "/test/event/9.9.9"})
        outside = dict(none, **{"$schema": "/../../etc/passwd"})
        code, body, _ = await self.post(d, [none, unknown, outside, intake_event(4)])
        self.assertEqual(code, 207, body)
        contexts = [i["context"] for i in body["invalid"]]
        self.assertIn("$schema", contexts[0])
        self.assertIn("/test/event/9.9.9", contexts[1])
        self.assertEqual(len(contexts), 3)
        self.assertEqual([e["n"] for e in await self.topic_events(d, TEST_TOPIC)], [4])

    def test_a_schema_repository_that_cannot_be_used_stops_start_up_with_one_line(self):
        from eventstreams.config import ConfigError

        from .support import Daemon

        broken = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(broken, "jsonschema", "test", "event"))
        with open(os.path.join(broken, "jsonschema", "test", "event", "1.0.0.json"), "w") as f:
            f.write('{"type": "no such type"}')
        with self.assertRaises(ConfigError) as caught:
            Daemon(self.mktemp(), (f"intake.schemas={broken}",))
        self.assertIn("[intake] schemas: schema /test/event/1.0.0:", str(caught.exception))
        with self.assertRaises(ConfigError) as caught:
            Daemon(self.mktemp(), (f"intake.schemas={broken}/nowhere",))
        self.assertIn("[intake] schemas:", str(caught.exception))

    @async_test
    async def test_the_demo_feeds_events_would_pass(self):
        from eventstreams.demo import SAMPLE_EVENTS, load_events, restamp
        from eventstreams.validation import SchemaRepository

        repo = SchemaRepository(SCHEMAS)
        events = load_events(SAMPLE_EVENTS)
        self.assertGreater(len(events), 5000)
        for event in events:
            problems = repo.validate(restamp(event, "mediawiki.recentchange", time.time()))
            self.assertEqual(problems, [], event["meta"])


class EmbeddedLog(TrustCase):
    @async_test
    async def test_the_database_file_removed_is_a_503_and_one_critical_line(self):
        log = Collector(self)
        d = await self.daemon()
        code, _, _ = await self.post(d, [ev(1)])
        self.assertEqual(code, 201)
        path = d.config.embedded.path
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(path + suffix):
                os.unlink(path + suffix)
        for n in (2, 3):
            code, body, response = await self.post(d, [ev(n)])
            self.assertEqual(code, 503, body)
            self.assertShape(body, 503)
            self.assertEqual(body["type"], "log_unavailable")
            self.assertEqual(body["accepted"], 0)
            self.assertTrue(response.headers.getRawHeaders("retry-after"))
        self.assertEqual(len(log.critical()), 1, [e.get("log_format") for e in log.critical()])
        self.assertFalse(os.path.exists(path))

    @async_test
    async def test_the_database_file_replaced_is_a_503(self):
        d = await self.daemon()
        await self.post(d, [ev(1)])
        path = d.config.embedded.path
        shutil.copy(path, path + ".copy")
        os.replace(path + ".copy", path)
        code, body, _ = await self.post(d, [ev(2)])
        self.assertEqual((code, body["type"]), (503, "log_unavailable"), body)
        self.flushLoggedErrors()

    @async_test
    async def test_a_full_disk_is_a_503_log_full_and_writes_resume_when_there_is_room(self):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", directory], capture_output=True)
        if result.returncode != 0:
            message = f"cannot mount a small tmpfs (needs root): {result.stderr.decode().strip()}"
            if os.environ.get("CI") == "true":
                self.fail(message)
            self.skipTest(message)
        self.addCleanup(subprocess.run, ["umount", "-l", directory])
        filler = os.path.join(directory, "filler")
        d = await self.daemon(f"embedded.path={directory}/log.sqlite")
        with open(filler, "wb") as f:  # leave a little room only
            try:
                f.write(b"\0" * (1024 * 1024))
            except OSError:
                pass
        full = None
        for n in range(200):
            code, body, response = await self.post(d, [ev(n, pad="x" * 8000)])
            if code != 201:
                full = (code, body, response)
                break
        self.assertIsNotNone(full, "the disk never filled up")
        code, body, response = full
        self.assertEqual((code, body["type"]), (503, "log_full"), body)
        self.assertShape(body, 503)
        self.assertTrue(response.headers.getRawHeaders("retry-after"))
        os.unlink(filler)
        code, body, _ = await self.post(d, [ev(n, pad="x" * 8000)])
        self.assertEqual(code, 201, body)
        self.assertEqual(len(await self.topic_events(d, TEST_TOPIC)), n + 1)
        self.flushLoggedErrors()

    @async_test
    async def test_a_locked_log_answers_503_within_the_timeout_and_stores_nothing(self):
        d = await self.daemon("intake.timeout=1")
        blocker = sqlite3.connect(d.config.embedded.path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            started = time.monotonic()
            code, body, response = await self.post(d, [ev(1)])
            took = time.monotonic() - started
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        self.assertEqual((code, body["type"]), (503, "log_unavailable"), body)
        self.assertLess(took, 5)
        self.assertTrue(response.headers.getRawHeaders("retry-after"))
        # The log writes one batch at a time: once a later batch is stored,
        # the refused one can no longer land (the marker for "stores nothing").
        code, body, _ = await self.post(d, [ev(2)])
        self.assertEqual((code, body["accepted"]), (201, 1), body)
        self.assertEqual([e["n"] for e in await self.topic_events(d, TEST_TOPIC)], [2])
        code, body, _ = await self.post(d, [ev(1)])
        self.assertEqual((code, body["accepted"]), (201, 1), body)
        self.flushLoggedErrors()

    @async_test
    async def test_a_producer_that_hangs_up_during_a_write_leaves_no_error_behind(self):
        log = Collector(self)
        d = await self.daemon("intake.timeout=1")
        blocker = sqlite3.connect(d.config.embedded.path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            body = json.dumps([ev(1)]).encode()
            raw = RawResponse(b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                              b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            reactor.connectTCP("127.0.0.1", d.ports["intake"], ClientFactory.forProtocol(lambda: raw))
            writer = d.backend._writer  # the log's one writer thread
            await wait_for(lambda: writer.working, "the write to wait for the lock")
            raw.transport.loseConnection()
            await raw.closed
            await wait_for(lambda: not writer.working, "the write to give up at the timeout")
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        self.assertEqual(log.critical(), [])
        self.assertEqual(self.flushLoggedErrors(), [])
        code, body, _ = await self.post(d, [ev(1)])
        self.assertEqual((code, body["accepted"]), (201, 1), body)


class OverKafka:
    backend = "kafka"


class KafkaStrictJSON(OverKafka, StrictJSON):
    pass


class KafkaAnswers(OverKafka, Answers):
    pass


class KafkaDeduplication(OverKafka, Deduplication):
    pass


class KafkaSchemas(OverKafka, Schemas):
    pass


class KafkaOutage(OverKafka, TrustCase):
    """Stops and restarts the shared test broker."""

    timeout = 600

    def setUp(self):
        if not os.environ.get("KAFKA_STATE"):
            if os.environ.get("CI") == "true":
                self.fail("KAFKA_STATE is not set")
            self.skipTest("the broker's state dir (KAFKA_STATE) is not known")

    @async_test
    async def test_broker_stopped_is_a_503_within_the_timeout_and_a_retry_stores_once(self):
        d = await self.daemon("intake.timeout=3")
        code, _, _ = await self.post(d, [ev(0)])
        self.assertEqual(code, 201)
        await deferToThread(kafka_script, "stop-broker")
        try:
            started = time.monotonic()
            code, body, response = await self.post(d, [ev(1), ev(2)])
            took = time.monotonic() - started
            self.assertEqual((code, body["type"]), (503, "log_unavailable"), body)
            self.assertShape(body, 503)
            self.assertEqual(body["accepted"], 0)
            self.assertEqual(body["stored"], [])
            self.assertTrue(response.headers.getRawHeaders("retry-after"))
            self.assertLess(took, 3 + 2)
        finally:
            await deferToThread(kafka_script, "start-broker")
        answers: list = []

        async def stored() -> bool:
            code, body, _ = await self.post(d, [ev(1), ev(2)])
            answers.append((code, body))
            return code == 201

        await wait_for(stored, lambda: f"the intake to store again after the restart (answers: {answers[-3:]})", 60, 1)
        # Nothing of the refused batch arrives on its own: the producer keeps
        # a partition's order, so anything of it still queued would have come
        # before the batch just stored.
        self.assertEqual([e["n"] for e in await self.topic_events(d, TEST_TOPIC)], [0, 1, 2])
        self.flushLoggedErrors()


class Killed(DaemonTestCase):
    """The real daemon SIGKILLed while it writes a batch; the producer sends
    the batch again to the restarted daemon: every event is there once."""

    timeout = 180
    kafka = False

    async def run_case(self) -> None:
        directory = os.path.abspath(self.mktemp())
        prefix = f"t{uuid.uuid4().hex[:10]}." if self.kafka else ""
        path = write_config(directory, prefix=prefix)
        ports = {name: free_port() for name in ("eventstreams", "intake", "metrics")}
        args = ["-c", path]
        for name, port in ports.items():
            args += ["--set", f"{name}.listen=tcp:{port}:interface=127.0.0.1"]
        args += ["--set", "intake.max_body=4M"]
        if self.kafka:
            if not KAFKA:
                if os.environ.get("CI") == "true":
                    self.fail("no Kafka broker")
                self.skipTest("no Kafka broker: set EVENTSTREAMS_KAFKA")
            await deferToThread(create_topics, {prefix + t: 1 for t in (
                "eqiad.mediawiki.recentchange", "codfw.mediawiki.recentchange", "eqiad.test.event")})
            args += ["--set", "eventstreams.backend=kafka", "--set", f"kafka.bootstrap.servers={KAFKA}"]
        batch = [ev(n, id=f"kill-{n}") for n in range(3000)]
        data = json.dumps(batch).encode()
        url = f"http://127.0.0.1:{ports['intake']}/v1/events"
        pool = HTTPConnectionPool(reactor, persistent=False)
        headers: dict[bytes | str, bytes | str] = {"Content-Type": "application/json"}

        for attempt in range(3):  # kill mid-write: each time after a little longer
            child = self.spawn(*args)
            await self.wait_listening(child, ports["intake"])
            posted = treq.post(url, data=data, headers=headers, pool=pool)
            posted.addErrback(lambda f: None)  # the connection dies with the daemon
            # The kill lands at a different point of the write each time: the
            # delay is the case under test, not a wait for something.
            await sleep(0.05 + 0.15 * attempt)
            child.transport.signalProcess("KILL")
            await child.ended
            await posted
        child = self.spawn(*args)
        await self.wait_listening(child, ports["intake"])

        async def answered() -> tuple:
            response = await treq.post(url, data=data, headers=headers, pool=pool)
            body = json.loads(await response.content())
            return (response.code, body) if response.code != 503 else ()

        code, body = await wait_for(answered, "an answer other than 503 from the restarted daemon", 60, 0.5)
        self.assertEqual(code, 201, body)
        # Read the whole topic back through the public stream, from the start,
        # up to a sentinel written after it: any duplicate comes before it.
        client = await open_stream(ports["eventstreams"], "/v2/stream/test?since=0")
        self.addCleanup(lambda: client.transport.loseConnection())
        sentinel = await treq.post(url, data=json.dumps([ev(3000, id="sentinel")]).encode(),
                                   headers=headers, pool=pool)
        self.assertEqual(sentinel.code, 201, await sentinel.content())
        await client.wait_for(lambda: bool(client.events) and client.events[-1]["meta"]["id"] == "sentinel", timeout=60)
        ids = [e["meta"]["id"] for e in client.events[:-1]]
        self.assertEqual(len(ids), 3000, f"{len(ids) - len(set(ids))} duplicates")
        self.assertEqual(sorted(ids), sorted(e["meta"]["id"] for e in batch))
        self.assertEqual(body["accepted"] + len(body["duplicate"]), 3000)
        self.stored_before_the_resend = len(body["duplicate"])
        child.transport.signalProcess("TERM")
        await child.ended



class KilledBeforeTheAnswer(Killed):
    @async_test
    async def test_embedded_every_event_exactly_once(self):
        await self.run_case()


class KafkaKilledBeforeTheAnswer(Killed):
    kafka = True

    @async_test
    async def test_kafka_every_event_exactly_once(self):
        await self.run_case()
