"""The daemon's log: `[log] format = json` (one object a line, parsed here),
the access line of every finished stream request, rate-limited warnings and
errors; the real `twistd -n eventstreams` for the end-to-end checks."""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from datetime import datetime

from twisted.internet import reactor
from twisted.logger import Logger, LogLevel, LogPublisher
from twisted.trial import unittest
from twisted.web.client import Agent, readBody

from eventstreams.config import ConfigError, load
from eventstreams.logs import JSONLines, LogConfig, RateLimited, _log_file, event_as_json, parse

from .support import async_test, free_port, open_stream, wait_for, write_config
from .test_daemon import DaemonTestCase


class Captured:
    def __init__(self) -> None:
        self.events: list[dict] = []

    def __call__(self, event: dict) -> None:
        self.events.append(event)


class Lines:
    def __init__(self) -> None:
        self.text = ""

    def write(self, text: str) -> None:
        self.text += text

    def flush(self) -> None:
        pass


class JSONFormat(unittest.TestCase):
    def test_an_event_is_one_json_object_with_its_fields(self):
        out = Lines()
        publisher = LogPublisher(JSONLines(out))
        log = Logger(namespace="eventstreams.access", observer=publisher)
        log.info("{client} GET {uri} {status}", client="192.0.2.1", uri="/v2/stream/a?x=\"\n", status=200,
                 stream="a", bytes=123, duration=1.5, blob=object())
        [line] = out.text.splitlines()
        self.assertTrue(out.text.endswith("\n"))
        record = json.loads(line)
        self.assertEqual(record["level"], "info")
        self.assertEqual(record["namespace"], "eventstreams.access")
        self.assertEqual(record["message"], '192.0.2.1 GET /v2/stream/a?x="\n 200')
        self.assertEqual((record["client"], record["stream"], record["status"], record["bytes"], record["duration"]),
                         ("192.0.2.1", "a", 200, 123, 1.5))
        self.assertTrue(record["blob"].startswith("<object object"))  # repr of what JSON cannot hold
        self.assertTrue(record["time"].endswith("Z"))
        datetime.fromisoformat(record["time"].replace("Z", "+00:00"))
        self.assertFalse([k for k in record if k.startswith("log_")])

    def test_a_failure_carries_its_traceback(self):
        out = Lines()
        log = Logger(namespace="x", observer=LogPublisher(JSONLines(out)))
        try:
            _ = 1 / 0
        except ZeroDivisionError:
            log.failure("request failed")
        record = json.loads(out.text)
        self.assertEqual((record["level"], record["message"]), ("critical", "request failed"))
        self.assertIn("ZeroDivisionError", record["traceback"])

    def test_legacy_log_msg_events(self):
        from twisted.python import log as legacy

        event = {"message": ("plain old line",), "isError": 0, "system": "-", "time": time.time()}
        from twisted.logger._legacy import publishToNewObserver

        captured = Captured()
        publishToNewObserver(captured, event, legacy.textFromEventDict)
        record = json.loads(event_as_json(captured.events[0]))
        self.assertEqual(record["message"], "plain old line")
        self.assertNotIn("isError", record)


class RateLimit(unittest.TestCase):
    def setUp(self) -> None:
        self.now = 0.0
        self.seen = Captured()
        self.limited = RateLimited(self.seen, limit=3, window=60, clock=lambda: self.now)
        self.log = Logger(namespace="eventstreams.test", observer=LogPublisher(self.limited))

    def test_errors_of_one_kind_are_limited_per_window_and_the_count_is_reported(self):
        for n in range(50):
            self.log.error("backend down: {n}", n=n)
        self.assertEqual([e["n"] for e in self.seen.events], [0, 1, 2])
        self.now = 61
        self.log.error("backend down: {n}", n=50)
        [last] = self.seen.events[3:]
        self.assertEqual(last["suppressed"], 47)
        self.assertIn("47 similar lines suppressed", json.loads(event_as_json(last))["message"])
        self.log.error("backend down: {n}", n=51)
        self.assertNotIn("suppressed", self.seen.events[-1])

    def test_kinds_are_counted_apart_and_info_is_never_limited(self):
        for n in range(10):
            self.log.warn("slow client {n}", n=n)
            self.log.error("other error {n}", n=n)
            self.log.info("access {n}", n=n)
        levels = [e["log_level"] for e in self.seen.events]
        self.assertEqual(levels.count(LogLevel.warn), 3)
        self.assertEqual(levels.count(LogLevel.error), 3)
        self.assertEqual(levels.count(LogLevel.info), 10)

    def test_lines_written_to_stderr_are_not_limited(self):
        # twistd logs what is written to stderr, a traceback line by line: keep it whole.
        for n in range(30):
            self.limited({"log_level": LogLevel.error, "log_namespace": "stderr", "log_format": "{log_io}",
                          "log_io": f"line {n}", "log_time": 0})
        self.assertEqual(len(self.seen.events), 30)

    def test_zero_means_no_limit(self):
        limited = RateLimited(self.seen, limit=0)
        log = Logger(observer=LogPublisher(limited))
        for _ in range(100):
            log.error("x")
        self.assertEqual(len(self.seen.events), 100)


class Settings(unittest.TestCase):
    def config(self, *overrides: str):
        return load(write_config(self.mktemp()), overrides)

    def test_defaults_and_values(self):
        self.assertEqual(parse(self.config()), LogConfig("text", 10))
        self.assertEqual(parse(self.config("log.format=json", "log.rate_limit=0")), LogConfig("json", 0))

    def test_bad_values_name_the_key(self):
        for override, key in (("log.format=xml", "format"), ("log.rate_limit=-1", "rate_limit"),
                              ("log.colour=yes", "colour")):
            with self.assertRaises(ConfigError) as e:
                parse(self.config(override))
            self.assertEqual((e.exception.section, e.exception.key), ("log", key))


class Destination(unittest.TestCase):
    """Where the observer writes: where twistd itself would."""

    def options(self, runner: type, *argv: str):
        options = runner()
        options.parseOptions([*argv, "eventstreams", "-c", "etc/streams.ini"])
        return options.subOptions

    def test_twistd_nodaemon_is_stdout_and_logfile_is_the_file(self):
        from twisted.scripts.twistd import ServerOptions

        self.assertIs(_log_file(self.options(ServerOptions, "-n")), sys.stdout)
        path = os.path.abspath(self.mktemp())
        out = _log_file(self.options(ServerOptions, "-n", "--logfile", path))
        self.addCleanup(out.close)
        self.assertEqual(out.path, path)
        self.assertIsNone(_log_file(self.options(ServerOptions, "-n", "--syslog")))

    def test_twist_opens_no_file(self):
        from twisted.application.twist._options import TwistOptions

        cwd = os.getcwd()
        self.assertIs(_log_file(self.options(TwistOptions)), sys.stdout)
        self.assertFalse(os.path.exists(os.path.join(cwd, "twistd.log")))


class DaemonJSONLog(DaemonTestCase):
    @async_test
    async def test_every_line_is_json_and_each_finished_stream_has_an_access_line(self):
        api, intake, metrics = free_port(), free_port(), free_port()
        config, overrides = self.good_config(eventstreams=api, intake=intake, metrics=metrics)
        child = self.spawn("-c", config, *overrides, "--set", "log.format=json",
                           "--set", "demo.stream=recentchange", "--set", "demo.rate=50")
        await self.wait_listening(child, api)
        client = await open_stream(api, "/v2/stream/recentchange?filter.type=edit,log,new,categorize")
        await client.wait_events(3, timeout=20)
        client.transport.loseConnection()
        agent = Agent(reactor)
        response = await agent.request(b"GET", f"http://127.0.0.1:{api}/v2/stream/nosuchstream".encode())
        await readBody(response)
        self.assertEqual(response.code, 400)

        def access() -> list[dict]:
            return [json.loads(line) for line in child.out.decode().splitlines()
                    if '"eventstreams.access"' in line]

        await wait_for(lambda: len(access()) >= 2, lambda: f"two access lines; output:\n{child.output[-3000:]}", 20)

        child.transport.signalProcess("TERM")
        await self.finish(child)
        self.assertIn((child.exit_code, child.signal), [(0, None), (None, signal.SIGTERM)], child.output[-2000:])
        lines = child.out.decode().splitlines()
        records = [json.loads(line) for line in lines]  # every line: one JSON object
        self.assertGreater(len(records), 5)
        for record in records:
            self.assertLessEqual({"time", "level", "namespace", "message"}, set(record), record)
        self.assertTrue(any(r["message"] == "Main loop terminated." for r in records))
        lines_by_status = {r["status"]: r for r in access()}
        ok = lines_by_status[200]
        self.assertEqual(ok["level"], "info")
        self.assertEqual((ok["client"], ok["stream"]), ("127.0.0.1", "mediawiki.recentchange"))
        self.assertEqual(ok["uri"], "/v2/stream/recentchange?filter.type=edit,log,new,categorize")
        self.assertGreaterEqual(ok["bytes"], len(client.body))
        self.assertGreater(ok["duration"], 0)
        bad = lines_by_status[400]
        self.assertEqual((bad["stream"], bad["client"]), ("nosuchstream", "127.0.0.1"))
        self.assertGreater(bad["bytes"], 0)
        # Stream requests have the one access line, not twisted.web's as well.
        self.assertFalse([r for r in records if "GET /v2/stream/" in r["message"]
                          and r["namespace"] != "eventstreams.access"])

    @async_test
    async def test_text_is_the_default(self):
        api, intake, metrics = free_port(), free_port(), free_port()
        config, overrides = self.good_config(eventstreams=api, intake=intake, metrics=metrics)
        child = self.spawn("-c", config, *overrides)
        await self.wait_listening(child, api)
        client = await open_stream(api, "/v2/stream/test")
        client.transport.loseConnection()
        await wait_for(lambda: b"GET /v2/stream/test 200" in child.out,
                       lambda: f"the access line; output:\n{child.output[-3000:]}", 20)
        child.transport.signalProcess("TERM")
        await self.finish(child)
        self.assertFalse(child.out.lstrip().startswith(b"{"))
        self.assertRegex(child.out.decode(), r"\[eventstreams\.access#info\] 127\.0\.0\.1 GET /v2/stream/test 200 \d+ bytes")
