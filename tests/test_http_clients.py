"""HTTP details real clients see (issue 15): reason phrases and Retry-After,
`Connection: close` on streams, upstream's security headers, HEAD on a
stream over a pooled connection, the spec's x-monitor and externalDocs.
Python `requests` runs in a reactor thread, npm `eventsource` as a Node
process (tests/js/client.mjs), against the daemon in the test's reactor."""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, cast

import requests
from requests.adapters import HTTPAdapter
from twisted.internet.utils import getProcessOutputAndValue

from .support import async_test, rc_event, wait_for
from .test_clients import JS_DIR, NODE_CLIENT, READ_TIMEOUT, ClientTestCase, T0

# Node's fetch (what eventsource 3 uses): the status line and Retry-After of a refused stream.
FETCH_STATUS = ("fetch(process.argv[1]).then(r => { console.log(JSON.stringify({status: r.status, "
                "statusText: r.statusText, retryAfter: r.headers.get('retry-after')})); r.body?.cancel(); })")
SECURITY_HEADERS = ("content-security-policy", "x-content-security-policy", "x-webkit-csp",
                    "x-content-type-options", "x-frame-options", "x-xss-protection")


def open_and_hold(url: str) -> requests.Response:
    """A stream response whose first bytes have arrived (the caller closes it)."""
    response = requests.get(url, stream=True, timeout=READ_TIMEOUT)
    body = response.iter_content(chunk_size=None)
    next(body)  # ":ok"
    cast(Any, response).body = body  # kept: dropping it closes the response
    return response


def refused(url: str) -> tuple[str, dict]:
    """What requests makes of a refused stream: raise_for_status's message and the headers."""
    with requests.get(url, stream=True, timeout=READ_TIMEOUT) as response:
        try:
            response.raise_for_status()
        except requests.HTTPError as e:
            return str(e), dict(response.headers)
    raise AssertionError(f"not refused: {response.status_code}")


def head_then_get(base: str) -> tuple[requests.Response, requests.Response, int]:
    """HEAD on a stream, then GET /_info, over one pooled connection."""
    with requests.Session() as session:
        head = session.head(base + "/v2/stream/test", timeout=READ_TIMEOUT)
        info = session.get(base + "/_info", timeout=READ_TIMEOUT)
        connections = len(cast(HTTPAdapter, session.adapters["http://"]).poolmanager.pools)
        return head, info, connections


class HttpDetails(ClientTestCase):
    async def refused_over_a_limit(self, limit: str, expected: str) -> None:
        """With `limit` at 1 and one stream held open, requests is refused a
        second with the status line `expected` and a Retry-After."""
        d = await self.daemon(f"eventstreams.{limit}=1")
        url = d.url("/v2/stream/test")
        held = await self.in_thread(open_and_hold, url)
        try:
            message, headers = await self.in_thread(refused, url)
        finally:
            held.close()
        self.assertTrue(message.startswith(f"{expected} for url"), message)
        self.assertTrue(headers["Retry-After"].isdigit(), headers)

    @async_test
    async def test_requests_sees_429_too_many_requests_with_retry_after(self):
        await self.refused_over_a_limit("client_ip_connection_limit", "429 Client Error: Too Many Requests")

    @async_test
    async def test_requests_sees_503_service_unavailable_with_retry_after(self):
        await self.refused_over_a_limit("max_connections", "503 Server Error: Service Unavailable")

    @async_test
    async def test_eventsource_and_node_fetch_see_429_too_many_requests(self):
        d = await self.daemon("eventstreams.client_ip_connection_limit=1")
        url = d.url("/v2/stream/test")
        held = await self.in_thread(open_and_hold, url)
        node = shutil.which("node")
        self.assertIsNotNone(node, "Node.js runs the npm eventsource client")
        try:
            out, err, code = await self._track(getProcessOutputAndValue(
                node, [NODE_CLIENT, url, "1", "--timeout", "10"], env=os.environ, path=JS_DIR))
            # eventsource 3 words its own message; the reason phrase is what
            # its fetch (Node's undici) hands over as statusText.
            fetched, _, fetch_code = await self._track(getProcessOutputAndValue(
                node, ["-e", FETCH_STATUS, url], env=os.environ, path=JS_DIR))
        finally:
            held.close()
        self.assertEqual(code, 3, err)  # a non-200 answer: EventSource gives up
        errors = [json.loads(line[len("error "):]) for line in err.decode().splitlines() if line.startswith("error ")]
        self.assertEqual(errors[0]["code"], 429, errors)
        self.assertEqual(fetch_code, 0)
        self.assertEqual(json.loads(fetched), {"status": 429, "statusText": "Too Many Requests", "retryAfter": "10"})

    @async_test
    async def test_stream_response_says_connection_close_and_carries_the_security_headers(self):
        d = await self.daemon()
        response = await self.in_thread(open_and_hold, d.url("/v2/stream/test"))
        response.close()
        headers = response.headers
        self.assertEqual(headers["Connection"], "close")
        self.assertEqual(headers["Content-Type"], "text/event-stream; charset=utf-8")
        for name in SECURITY_HEADERS:
            self.assertIn(name, headers)
        self.assertEqual(headers["X-Frame-Options"], "SAMEORIGIN")
        self.assertEqual(headers["X-XSS-Protection"], "1; mode=block")
        self.assertEqual(headers["Content-Security-Policy"], d.config.service.content_security_policy)

    @async_test
    async def test_head_on_a_stream_leaves_a_pooled_connection_usable(self):
        d = await self.daemon()
        head, info, pools = await self.in_thread(head_then_get, d.url(""))
        self.assertEqual(head.status_code, 200)
        self.assertEqual(head.headers["Content-Type"], "text/event-stream; charset=utf-8")
        self.assertEqual(head.content, b"")
        self.assertEqual(info.status_code, 200)
        self.assertEqual(info.json()["name"], "eventstreams")

    @async_test
    async def test_eventsource_still_receives_events_over_connection_close(self):
        d = await self.daemon()
        messages_d = self.node(d.url("/v2/stream/recentchange"), 2)
        # Subscribed, not just admitted: the stream starts at the log's end
        # when it subscribes, and what came before is not sent.
        await wait_for(lambda: any(s.subscription for s in d.service.connections.sinks), "the client to subscribe", 10)
        await d.append(T0, [rc_event(1), rc_event(2)])
        messages, _ = await messages_d
        self.assertEqual([m.json["id"] for m in messages], [1, 2])

    @async_test
    async def test_spec_has_x_monitor_false_on_streams_and_external_docs(self):
        d = await self.daemon()
        spec = (await self.in_thread(requests.get, d.url("/?spec"), timeout=READ_TIMEOUT)).json()
        self.assertTrue(spec["externalDocs"]["url"].startswith("https://wikitech.wikimedia.org/"))
        for path, item in spec["paths"].items():
            operation = item["get"]
            if path.startswith("/v2/stream/"):
                self.assertIs(operation["x-monitor"], False, path)
            else:  # what service-checker needs to probe the others
                self.assertIn("x-amples", operation, path)
