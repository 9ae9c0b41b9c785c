"""End to end in a real browser: Debian's chromium, headless, driven by
playwright-core from a Node script in tests/browser (never a downloaded
browser), against the daemon running in the test's reactor.

- The browser's own `EventSource`, with the server ending every response
  after `max_lifetime`: the browser reconnects by itself with Last-Event-ID,
  and across at least three reconnects it sees every offset of every
  partition exactly once (plain, filtered, two streams).
- The stream browser page at /v2/ui.

The Node script reports on stdout (one JSON object a line) and is told on
stdin how many events to wait for. Each test waits for the script and its
browser to end, and for the server to see their sockets close, before the
daemon stops. Missing chromium or node_modules fail the tests (with the
install command), they are not skipped.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
from typing import Any, Callable, Optional

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IProcessTransport
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.python import log

from .support import Daemon, async_test, rc_event, server_connections, wait_for
from .test_stream import StreamTestCase

BROWSER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "browser")
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
INSTALL = "apt-get install -y chromium && npm ci --prefix tests/browser"
UI_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "eventstreams", "ui")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class NodeScript(ProcessProtocol):
    """A Node script of tests/browser: JSON lines out, JSON lines in."""

    transport: IProcessTransport  # (Twisted types it Optional)

    def __init__(self, name: str):
        self.name = name
        self.messages: list[dict] = []
        self.stderr = b""
        self._buffer = b""
        self.code: Optional[int] = None
        self.ended: Deferred = Deferred()

    def outReceived(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            if line.strip():
                self.messages.append(json.loads(line))

    def errReceived(self, data: bytes) -> None:
        self.stderr += data

    def processEnded(self, reason: Any) -> None:
        self.code = getattr(reason.value, "exitCode", None)
        self.ended.callback(None)

    @property
    def running(self) -> bool:
        return not self.ended.called

    @property
    def opened(self) -> int:
        return max([m["opened"] for m in self.messages if "opened" in m], default=0)

    @property
    def result(self) -> Optional[dict]:
        return next((m["result"] for m in self.messages if "result" in m), None)

    def send(self, message: dict) -> None:
        self.transport.write(json.dumps(message).encode() + b"\n")

    def describe(self) -> str:
        return f"{self.name} exited {self.code}; stderr: {self.stderr.decode(errors='replace')[-2000:]}"


class BrowserTestCase(StreamTestCase):
    timeout = 150

    def setUp(self) -> None:
        if not os.access(CHROMIUM, os.X_OK):
            self.fail(f"{CHROMIUM} is missing: the browser tests need Debian's chromium ({INSTALL})")
        if not os.path.isdir(os.path.join(BROWSER_DIR, "node_modules", "playwright-core")):
            self.fail(f"tests/browser/node_modules is missing: run `npm ci --prefix tests/browser` ({INSTALL})")
        self.node = shutil.which("node")
        if self.node is None:
            self.fail("Node.js (`node`) is not on PATH; it drives chromium through playwright-core")

    def script(self, d: Daemon, name: str, *args: str, timeout: float = 100) -> NodeScript:
        """Start tests/browser/<name>; it is killed after `timeout` seconds and
        reaped (with its browser) before the daemon stops."""
        assert self.node is not None  # (setUp fails without it)
        run = NodeScript(name)
        argv = [self.node, os.path.join(BROWSER_DIR, name), *args, "--timeout", str(timeout - 10)]
        env = {**os.environ, "CHROMIUM": CHROMIUM}
        reactor.spawnProcess(run, self.node, argv, env=env, path=BROWSER_DIR)
        killer = reactor.callLater(timeout, self._kill, run)
        self.addCleanup(self._reap, d, run, killer)
        return run

    def _kill(self, run: NodeScript) -> None:
        if run.running:
            run.transport.signalProcess("TERM")  # playwright closes its browser on SIGTERM

    async def _reap(self, d: Daemon, run: NodeScript, killer: Any) -> None:
        if killer.active():
            killer.cancel()
        if run.running:
            self._kill(run)
            try:
                await wait_for(lambda: not run.running, "the script to end on SIGTERM", 10, 0.05)
            except AssertionError:
                run.transport.signalProcess("KILL")
        await run.ended
        port = d.ports["api"]
        await wait_for(lambda: not server_connections(port), "the server to see the browser's connections close", 5)

    async def until(self, run: NodeScript, predicate: Callable[[], Any], what: str, timeout: float) -> Any:
        """wait_for, failing at once with the script's report if it ends first."""

        def check() -> Any:
            value = predicate()
            if not value and not run.running:
                self.fail(f"while waiting for {what}: {run.describe()}")
            return value

        return await wait_for(check, lambda: f"{what}; {run.stderr.decode(errors='replace')}", timeout, 0.05)

    async def feeding(self, run: NodeScript, write: Callable[[], Any], interval: float = 0.05) -> None:
        """Write an event every `interval` seconds while the script runs: the
        page sees events arrive all along (a rate of the workload, not a wait)."""
        loop = LoopingCall(lambda: ensureDeferred(write()))
        done = loop.start(interval)
        await run.ended
        if loop.running:  # else a write failed: `done` says how
            loop.stop()
        await done

    async def outcome(self, run: NodeScript) -> dict:
        await run.ended
        self.assertEqual(run.code, 0, run.describe())
        if run.result is None:
            self.fail(run.describe())
        return run.result


class BrowserEventSource(BrowserTestCase):
    """A page's plain `new EventSource(path)`, cut every 1.5 s by the server."""

    overrides = ("eventstreams.max_lifetime=1.5",)
    RECONNECTS = 3

    async def reconnecting(
        self, path: str, feed: Callable[[Daemon, int], tuple[str, dict]], matches: Callable[[dict], bool]
    ) -> dict:
        d = await self.daemon()
        run = self.script(d, "eventsource.mjs", "--base", d.url(""), "--path", path)
        await self.until(run, lambda: run.opened >= 1, "the first open", 30)
        expected: dict[tuple[str, int], list[int]] = {}
        written = 0

        async def write_one() -> bool:
            nonlocal written
            topic, event = feed(d, written)
            [record] = await d.append(topic, [event])
            written += 1
            if matches(event):
                expected.setdefault((record.topic, record.partition), []).append(record.offset)
            return matches(event)

        async def written_and_reconnected() -> bool:
            await write_one()
            return run.opened >= self.RECONNECTS + 1

        # Events keep coming while the browser is connected, cut off and away.
        await self.until(run, written_and_reconnected, f"{self.RECONNECTS + 1} opens", 60)
        for _ in range(20):
            await write_one()
        # Last, a matching sentinel: once the page has counted every expected
        # event, a duplicate would have taken the place of one of them.
        while not (await write_one()):
            pass
        run.send({"expect": sum(len(v) for v in expected.values())})
        result = await self.outcome(run)

        seen: dict[tuple[str, int], list[int]] = {}
        for m in result["seen"]:
            seen.setdefault((m["topic"], m["partition"]), []).append(m["offset"])
        self.assertEqual(sorted(seen), sorted(expected))
        for tp, offsets in expected.items():
            # every offset, in order, exactly once: no gap, no duplicate
            self.assertEqual(seen[tp], offsets, f"partition {tp}")
        self.assertGreaterEqual(result["opened"], self.RECONNECTS + 1)
        headers = [r["last_event_id"] for r in result["requests"]]
        self.assertEqual(len(headers), result["opened"])
        self.assertIsNone(headers[0])
        for header in headers[1:]:  # each reconnect resumes from an id over every partition
            self.assertIsNotNone(header, headers)
            self.assertLessEqual({t for t, _ in expected}, {p["topic"] for p in json.loads(header)})
        self.assertEqual(result["console_errors"], [])
        summary = {
            "path": path,
            "reconnects": result["opened"] - 1,
            "written": written,
            "received": len(result["seen"]),
            "per_partition": {f"{t}/{p}": len(o) for (t, p), o in sorted(seen.items())},
        }
        log.msg("browser EventSource: " + json.dumps(summary))
        with open(os.path.join(self.mktemp() + ".json"), "w") as f:
            json.dump(summary, f)
        return summary

    @async_test
    async def test_reconnects_resume_every_offset_exactly_once(self):
        def feed(d: Daemon, n: int) -> tuple[str, dict]:
            return d.rc[n % 2], rc_event(n)

        summary = await self.reconnecting("/v2/stream/recentchange", feed, lambda e: True)
        self.assertEqual(summary["received"], summary["written"])

    @async_test
    async def test_reconnects_with_a_filter(self):
        wikis = ("enwiki", "dewiki", "wikidatawiki")

        def feed(d: Daemon, n: int) -> tuple[str, dict]:
            return d.rc[n % 2], rc_event(n, wiki=wikis[n % 3], bot=n % 4 == 0)

        def matches(e: dict) -> bool:
            return e["wiki"] in ("dewiki", "wikidatawiki") and not e["bot"]

        summary = await self.reconnecting(
            "/v2/stream/recentchange?filter.wiki=dewiki,wikidatawiki&filter.bot!=true", feed, matches
        )
        self.assertLess(summary["received"], summary["written"])

    @async_test
    async def test_reconnects_with_two_streams(self):
        def feed(d: Daemon, n: int) -> tuple[str, dict]:
            topics = (d.rc[0], d.rc[1], d.topic("eqiad.test.event"))
            return topics[n % 3], rc_event(n)

        summary = await self.reconnecting("/v2/stream/recentchange,test", feed, lambda e: True)
        self.assertEqual(len(summary["per_partition"]), 3)


class StreamBrowserPage(BrowserTestCase):
    """/v2/ui in chromium, with events arriving all along."""

    @async_test
    async def test_page_lists_streams_shows_events_and_filters(self):
        d = await self.daemon()
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        shot = os.path.join(directory, "ui.png")
        shot_empty = os.path.join(directory, "ui-nothing-matches.png")
        run = self.script(d, "ui.mjs", "--base", d.url(""), "--stream", "mediawiki.recentchange",
                          "--screenshot", shot, "--screenshot-empty", shot_empty, timeout=90)
        wikis = ("enwiki", "dewiki", "wikidatawiki")
        n = 0

        async def write() -> None:
            nonlocal n
            k, n = n, n + 1
            event = rc_event(k, wiki=wikis[k % 3], bot=k % 4 == 0)
            event["length"] = {"old": 100, "new": 100 + (k % 7) - 3}
            await d.append(d.rc[k % 2], [event])

        await self.feeding(run, write)
        r = await self.outcome(run)

        self.assertEqual(r["console_errors"], [])
        self.assertEqual(r["failed_requests"], [])
        self.assertEqual(r["status"], 200)
        self.assertIn("script-src 'self'", r["csp"])
        self.assertEqual([s["name"] for s in r["streams"]], ["mediawiki.recentchange", "test"])
        self.assertEqual(r["streams"][0]["description"], "Mediawiki RecentChanges feed.")
        self.assertIn("recentchange", r["streams"][0]["label"])  # the alias
        self.assertEqual(r["labelled"], [], "controls without a label")
        self.assertGreaterEqual(r["rows"], 5)
        self.assertIn("Page ", r["first_row"])
        self.assertTrue(r["status_open"].startswith("Open"), r["status_open"])
        self.assertEqual(r["hash"], "#stream=mediawiki.recentchange")
        self.assertTrue(r["filtered_wikis"])
        self.assertEqual(set(r["filtered_wikis"]), {"dewiki"})
        self.assertEqual(r["filtered_hash"], "#stream=mediawiki.recentchange&filter.wiki=dewiki&filter.bot!=true")
        self.assertEqual(r["expanded"], {"wiki": "dewiki", "bot": False})
        # The bare page opened the first stream by itself.
        self.assertEqual(r["auto"]["hash"], "#stream=mediawiki.recentchange")
        self.assertEqual(r["auto"]["checked"], ["mediawiki.recentchange"])
        self.assertTrue(r["auto"]["status"].startswith("Open"), r["auto"])
        # A row open for reading stayed in place while events arrived; closing it resumed.
        self.assertTrue(r["open_row"]["stays"], r["open_row"])
        self.assertEqual(r["open_row"]["pressed"], "true")
        self.assertRegex(r["open_row"]["counts"], r"paused while a row is open: [1-9]\d* not shown")
        self.assertEqual(r["open_row"]["after_close"], "false")
        # A filter nothing matches: the view says the filter skipped the events.
        nothing = r["nothing"]
        self.assertEqual(nothing["hash"], "#stream=mediawiki.recentchange&filter.wiki=nosuchwiki")
        self.assertEqual(nothing["rows"], 0)
        self.assertRegex(nothing["skipped"], r"^[1-9][\d,]* skipped by the filter$")
        self.assertTrue(nothing["empty_visible"])
        self.assertRegex(nothing["empty"], r"^No event has matched the filter yet; [1-9][\d,]* others went by\.$")
        self.assertTrue(nothing["status"].startswith("Open"), nothing)
        self.assertEqual(
            r["curl"],
            f"curl -s -H 'Accept: text/event-stream' "
            f"'{d.url('/v2/stream/mediawiki.recentchange?filter.wiki=dewiki&filter.bot!=true')}'",
        )
        self.assertTrue(r["paused_same_top"])
        self.assertGreater(r["rate"], 0)
        self.assertEqual(r["status_stopped"], "Stopped")
        refused = r["refused"]
        self.assertEqual(refused["checked"], ["mediawiki.recentchange"])  # the alias, resolved
        self.assertEqual(refused["custom_field"], "meta..domain")
        self.assertEqual(refused["state"], "closed")
        self.assertRegex(refused["error"], r"^400 Invalid Filter: .*empty segment")
        with open(shot, "rb") as f:
            png = f.read()
        self.assertTrue(png.startswith(PNG_MAGIC), "the screenshot is not a PNG")
        self.assertGreater(len(png), 10_000)
        width, height = struct.unpack(">II", png[16:24])  # IHDR
        self.assertEqual(width, 1280)
        log.msg(f"stream browser screenshot: {shot} ({len(png)} bytes, {width}x{height})")
        with open(shot_empty, "rb") as f:
            self.assertTrue(f.read(8) == PNG_MAGIC)
        log.msg(f"stream browser screenshot, nothing matching: {shot_empty}")


class StreamBrowserFiles(StreamTestCase):
    """The page's files over HTTP, without a browser."""

    @async_test
    async def test_ui_files_are_served_with_the_strict_csp(self):
        d = await self.daemon()
        for path, kind in [
            ("/v2/ui", "text/html; charset=utf-8"),
            ("/v2/ui/", "text/html; charset=utf-8"),
            ("/v2/ui/app.js", "text/javascript; charset=utf-8"),
            ("/v2/ui/style.css", "text/css; charset=utf-8"),
            ("/v2/ui/favicon.svg", "image/svg+xml"),
        ]:
            response = await self.get(d.url(path))
            body = await response.content()
            self.assertEqual(response.code, 200, path)
            self.assertEqual(response.headers.getRawHeaders("content-type"), [kind], path)
            csp = response.headers.getRawHeaders("content-security-policy")[0]
            self.assertIn("script-src 'self'", csp)
            self.assertIn("style-src 'self'", csp)
            self.assertEqual(response.headers.getRawHeaders("x-content-type-options"), ["nosniff"])
            self.assertTrue(body)
        for path in ("/v2/ui/nothing.js", "/v2/ui/.hidden.css", "/v2/ui/README"):
            response = await self.get(d.url(path))
            await response.content()
            self.assertEqual(response.code, 404, path)
        response = await self.get(d.url("/"), allow_redirects=False)
        await response.content()
        self.assertEqual((response.code, response.headers.getRawHeaders("location")), (303, ["/v2/ui"]))

    def test_page_has_no_inline_script_or_style_and_no_remote_assets(self):
        with open(os.path.join(UI_DIR, "index.html"), encoding="utf-8") as f:
            html = f.read()
        self.assertNotRegex(html, r"<script(?![^>]*\bsrc=)[^>]*>")
        self.assertNotRegex(html, r"<style\b")
        self.assertNotRegex(html, r"\sstyle=")
        self.assertNotRegex(html, r"\son[a-z]+=")
        for name in os.listdir(UI_DIR):
            with open(os.path.join(UI_DIR, name), encoding="utf-8") as f:
                text = f.read()
            urls = [u for u in re.findall(r"https?://[^\s'\"`)]+", text) if "w3.org/2000/svg" not in u]
            self.assertEqual(urls, [], name)



class SwaggerDocPage(BrowserTestCase):
    """/?doc: Swagger UI over /?spec in chromium, under the strict CSP."""

    @async_test
    async def test_doc_lists_every_stream_and_try_it_out_streams_events(self):
        d = await self.daemon()
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        shot = os.path.join(directory, "doc.png")
        run = self.script(d, "doc.mjs", "--base", d.url(""), "--streams", "mediawiki.recentchange,test",
                          "--screenshot", shot, timeout=90)
        n = 0

        async def write() -> None:  # events all along: Try it out shows some
            nonlocal n
            k, n = n, n + 1
            await d.append((d.rc[0], d.topic("eqiad.test.event"))[k % 2], [rc_event(k)])

        await self.feeding(run, write)
        r = await self.outcome(run)

        self.assertEqual(r["console_errors"], [])  # a CSP violation is a console error
        self.assertEqual(r["failed_requests"], [])
        self.assertEqual([u for u in r["requests"] if not u.startswith(d.url("/"))], [])  # nothing remote
        self.assertEqual(r["status"], 200)
        self.assertEqual(r["csp"], d.config.service.content_security_policy)
        self.assertIn("EventStreams", r["title"])
        names = ["mediawiki.recentchange", "recentchange", "test"]  # every stream and alias
        self.assertLessEqual({"/v2/stream/{streams}", *(f"/v2/stream/{name}" for name in names)}, set(r["paths"]))
        self.assertEqual(sorted(r["offered"]), names)
        self.assertEqual(r["request_url"], d.url("/v2/stream/mediawiki.recentchange,test"))
        self.assertEqual(r["response_status"], "200")
        body = r["response_body"]
        self.assertTrue(body.startswith(":ok"), body[:200])
        events = [json.loads(line[len("data: "):]) for line in body.splitlines() if line.startswith("data: ")]
        self.assertGreater(len(events), 0, body[:500])
        self.assertLessEqual({e["meta"]["topic"] for e in events}, {d.rc[0], d.topic("eqiad.test.event")})
        self.assertIn("text/event-stream", r["response_headers"])
        with open(shot, "rb") as f:
            self.assertTrue(f.read().startswith(PNG_MAGIC))
        log.msg(f"/?doc screenshot: {shot}; Try it out got {len(events)} events")


class SwaggerDocFiles(StreamTestCase):
    """/?doc's files over HTTP, without a browser; / and /v2/ui around it."""

    @async_test
    async def test_doc_page_and_files_are_served_with_the_strict_csp(self):
        d = await self.daemon()
        for path, kind in [
            ("/?doc", "text/html; charset=utf-8"),
            ("/?doc&path=doc.js", "text/javascript; charset=utf-8"),
            ("/?doc&path=doc.css", "text/css; charset=utf-8"),
            ("/?doc&path=swagger-ui-bundle.js", "text/javascript; charset=utf-8"),
            ("/?doc&path=swagger-ui.css", "text/css; charset=utf-8"),
            ("/?doc&path=favicon-32x32.png", "image/png"),
        ]:
            response = await self.get(d.url(path))
            body = await response.content()
            self.assertEqual(response.code, 200, path)
            self.assertEqual(response.headers.getRawHeaders("content-type"), [kind], path)
            self.assertEqual(response.headers.getRawHeaders("content-security-policy"),
                             [d.config.service.content_security_policy], path)
            self.assertTrue(body, path)
        for path in ("/?doc&path=index.j2", "/?doc&path=../web.py", "/?doc&path=oauth2-redirect.html"):
            response = await self.get(d.url(path))
            await response.content()
            self.assertEqual(response.code, 404, path)
        response = await self.get(d.url("/"), allow_redirects=False)
        await response.content()
        self.assertEqual((response.code, response.headers.getRawHeaders("location")), (303, ["/v2/ui"]))
        ui = await (await self.get(d.url("/v2/ui"))).text()
        self.assertIn('href="/?doc"', ui)

    def test_doc_page_has_no_inline_script_or_style_and_no_remote_assets(self):
        directory = os.path.join(os.path.dirname(UI_DIR), "doc")
        with open(os.path.join(directory, "index.html"), encoding="utf-8") as f:
            html = f.read()
        self.assertNotRegex(html, r"<script(?![^>]*\bsrc=)[^>]*>")
        self.assertNotRegex(html, r"<style\b")
        self.assertNotRegex(html, r"\sstyle=")
        for name in os.listdir(directory):
            with open(os.path.join(directory, name), encoding="utf-8") as f:
                self.assertEqual(re.findall(r"https?://[^\s'\"`)]+", f.read()), [], name)
