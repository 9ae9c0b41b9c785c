"""RCStream bridge end to end: the daemon with `[rcstream]`, the wire protocol
by hand (treq, raw sockets) and the real clients the issue names, each
installed in its own environment under .cache/ (tests/rcstream_clients.py)."""
from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
from typing import Any, Callable, cast

import treq
from twisted.internet import reactor
from twisted.internet.base import DelayedCall
from twisted.internet.defer import ensureDeferred
from twisted.internet.threads import deferToThread
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool
from txaio._common import _BatchedTimer  # autobahn's timers (tests only)

from eventstreams.feed import StreamFeed

from . import rcstream_clients
from .support import async_test, rc_event, server_connections, turn, wait_for
from .test_stream import StreamTestCase


def change_of(event: dict) -> dict:
    return {k: v for k, v in event.items() if k not in ("$schema", "meta")}


def mixed_events() -> tuple[list[dict], list[dict]]:
    """Events to feed and the ones `*.wikipedia.org` subscribers must get."""
    bar = rc_event(2, "dewiki")
    bar["title"] = "B\u00e4r \u2603 \U0001F600"
    canary = rc_event(3, "enwiki")
    canary["meta"]["domain"] = "canary"
    events = [rc_event(1, "wikidatawiki"), bar, canary, rc_event(4, "commonswiki"), rc_event(5, "enwiki"),
              rc_event(6, "dewiki")]
    return events, [bar, events[4], events[5]]


async def close_handshake_timers() -> None:
    """Until autobahn's close-handshake timers have run. They outlive the
    connection (connectionLost does not cancel them) and fire within their
    1 s timeout: a test that closed a WebSocket ends with a clean reactor."""
    await wait_for(lambda: not any(isinstance(getattr(cast(DelayedCall, call).func, "__self__", None), _BatchedTimer)
                                   for call in reactor.getDelayedCalls()),
                   "autobahn's close handshake timer", timeout=5, interval=0.05)


class RCStreamCase(StreamTestCase):
    overrides: tuple[str, ...] = ("rcstream.stream=recentchange", "rcstream.poll_timeout=1")

    async def wait_subscribed(self, d, sessions: int = 1, timeout: float = 60) -> None:
        """Until `sessions` sessions have subscribed and the bridge's feed
        follows the log: what is appended from then on reaches them."""
        bridge = d.service.rcstream
        (feed,) = [s for s in d.service if isinstance(s, StreamFeed) and s.on_batch == bridge.on_batch]
        await wait_for(lambda: feed.subscription is not None
                       and sum(1 for s in bridge.sessions.values() if s.subscriptions) >= sessions,
                       f"{sessions} subscribed session(s)", timeout)

    async def text(self, method: str, url: str, **kwargs) -> tuple[int, dict, str]:
        pool = HTTPConnectionPool(reactor, persistent=False)
        response = await treq.request(method, url, pool=pool, **kwargs)
        body = (await response.content()).decode("utf-8")
        headers = {k.decode().lower(): v[0].decode() for k, v in response.headers.getAllRawHeaders()}
        return response.code, headers, body


class Handshake(RCStreamCase):
    @async_test
    async def test_handshake_echoes_origin_and_lists_transports(self):
        d = await self.daemon()
        code, headers, body = await self.text("GET", d.url("/socket.io/1/?t=1"), headers={"Origin": "http://a.example"})
        self.assertEqual(code, 200)
        self.assertTrue(headers["content-type"].startswith("text/plain"))
        sid, heartbeat, close, transports = body.split(":")
        self.assertEqual((heartbeat, close, transports), ("60", "60", "websocket,xhr-polling,jsonp-polling"))
        self.assertIn(sid, d.service.rcstream.sessions)
        self.assertEqual(headers["access-control-allow-origin"], "http://a.example")
        self.assertEqual(headers["access-control-allow-credentials"], "true")
        code, headers, body = await self.text("GET", d.url("/socket.io/1/"))
        self.assertEqual(headers["access-control-allow-origin"], "*")
        code, headers, body = await self.text("GET", d.url("/rcstream_status"))
        self.assertEqual(json.loads(body), {"connected_clients": 2, "queue_size": 2})
        code, _, body = await self.text("GET", d.url("/v2/stream", "api").replace("/v2/stream", "/v2/streams"))
        self.assertNotEqual(code, 500)  # the rest of the site still answers

    @async_test
    async def test_metrics_count_sessions(self):
        d = await self.daemon()
        await self.text("GET", d.url("/socket.io/1/"))
        _, _, body = await self.text("GET", d.url("/metrics", "metrics"))
        self.assertIn("eventstreams_rcstream_sessions 1", body)

    @async_test
    async def test_off_without_the_section(self):
        self.overrides = ()
        d = await self.daemon()
        code, _, _ = await self.text("GET", d.url("/socket.io/1/"))
        self.assertEqual(code, 404)


class XhrPollingByHand(RCStreamCase):
    @async_test
    async def test_connect_subscribe_ack_change_and_idle_noop(self):
        d = await self.daemon()
        _, _, body = await self.text("GET", d.url("/socket.io/1/"))
        url = d.url(f"/socket.io/1/xhr-polling/{body.split(':')[0]}")
        self.assertEqual((await self.text("GET", url))[2], "1::")
        subscribe = '5:7+:/rc:{"name":"subscribe","args":["de.*"]}'
        framed = f"\ufffd6\ufffd1::/rc\ufffd{len(subscribe)}\ufffd{subscribe}"
        code, _, body = await self.text("POST", url, data=framed.encode())
        self.assertEqual((code, body), (200, "1"))
        self.assertEqual((await self.text("GET", url))[2], "\ufffd6\ufffd1::/rc\ufffd15\ufffd6::/rc:7+[null]")
        poll = ensureDeferred(self.text("GET", url))  # sent now, held by the server
        session = d.service.rcstream.sessions[url.rsplit("/", 1)[1]]
        await wait_for(lambda: session.transport is not None, "the poll to wait at the server")
        await d.append(d.rc[0], [rc_event(1, "enwiki"), rc_event(2, "dewiki")])
        _, _, body = await poll
        self.assertTrue(body.startswith('5::/rc:{"name":"change","args":[{'), body)
        self.assertEqual(json.loads(body.split(":", 3)[3])["args"][0], change_of(rc_event(2, "dewiki")))
        started = reactor.seconds()
        self.assertEqual((await self.text("GET", url))[2], "8::")
        self.assertGreater(reactor.seconds() - started, 0.8)

    @async_test
    async def test_bad_requests_never_crash(self):
        d = await self.daemon("rcstream.max_post=1k")
        _, _, body = await self.text("GET", d.url("/socket.io/1/"))
        url = d.url(f"/socket.io/1/xhr-polling/{body.split(':')[0]}")
        self.assertEqual((await self.text("GET", d.url("/socket.io/1/xhr-polling/nope")))[2], "7:::1+0")
        self.assertEqual((await self.text("POST", url, data=b"x" * 2000))[0], 400)
        self.assertEqual((await self.text("POST", url, data="\ufffd9\ufffd1::".encode()))[0], 400)
        self.assertEqual((await self.text("POST", url, data=b"\xff\xfe"))[0], 400)
        self.assertEqual((await self.text("POST", url, data=b"bogus\x00"))[2], "1")
        self.assertEqual((await self.text("GET", d.url("/socket.io/1/flash/x")))[0], 400)
        self.assertEqual((await self.text("GET", url))[2], "\ufffd3\ufffd1::\ufffd4\ufffd7:::")
        self.assertEqual((await self.text("GET", d.url("/socket.io/?EIO=9&transport=polling")))[0], 400)
        self.assertEqual((await self.text("GET", d.url("/socket.io/?EIO=4&transport=polling&sid=x")))[0], 400)

    @async_test
    async def test_silent_sessions_expire(self):
        d = await self.daemon("rcstream.heartbeat=0.2", "rcstream.session_timeout=0.5")
        await self.text("GET", d.url("/socket.io/1/"))
        self.assertEqual(d.service.rcstream.status()["connected_clients"], 1)
        await wait_for(lambda: d.service.rcstream.status() == {"connected_clients": 0, "queue_size": 0},
                       "the silent session to expire", timeout=5)


    @async_test
    async def test_heartbeats_reach_the_poll_and_a_session_that_does_not_poll_is_closed(self):
        d = await self.daemon("rcstream.heartbeat=0.3", "rcstream.max_queue=5")
        _, _, body = await self.text("GET", d.url("/socket.io/1/"))
        url = d.url(f"/socket.io/1/xhr-polling/{body.split(':')[0]}")
        self.assertEqual((await self.text("GET", url))[2], "1::")
        self.assertEqual((await self.text("GET", url))[2], "2::")
        await self.text("POST", url, data=b'5::/rc:{"name":"subscribe","args":["*"]}')
        await d.append(d.rc[0], [rc_event(n) for n in range(10)])
        await wait_for(lambda: d.service.rcstream.status() == {"connected_clients": 0, "queue_size": 0},
                       "the session that does not poll to be closed", timeout=5)
        self.assertEqual((await self.text("GET", url))[2], "7:::1+0")


class RequestRate(RCStreamCase):
    @async_test
    async def test_a_sessions_polls_do_not_count_against_the_request_rate(self):
        # A polling client asks again as soon as it is answered: its polls
        # are bounded by the session caps, not by [eventstreams]
        # request_rate_per_ip, which other requests from its address meet.
        d = await self.daemon("eventstreams.request_rate_per_ip=0.5", "eventstreams.request_burst_per_ip=3")
        _, _, body = await self.text("GET", d.url("/socket.io/1/"))
        url = d.url(f"/socket.io/1/xhr-polling/{body.split(':')[0]}")
        answers = [await self.text("POST", url, data=b"2::") for _ in range(10)]
        self.assertEqual([(code, body) for code, _, body in answers], [(200, "1")] * 10)
        codes = [(await self.text("GET", d.url("/_info", "api")))[0] for _ in range(3)]
        self.assertEqual(codes, [200, 200, 429])


class EngineIOByHand(RCStreamCase):
    @async_test
    async def test_eio4_polling_handshake_connect_and_event(self):
        d = await self.daemon()
        code, headers, body = await self.text("GET", d.url("/socket.io/?EIO=4&transport=polling&t=x"))
        self.assertEqual(body[0], "0")
        opened = json.loads(body[1:])
        self.assertEqual((opened["upgrades"], opened["pingInterval"], opened["pingTimeout"]), (["websocket"], 25000, 35000))
        url = d.url(f"/socket.io/?EIO=4&transport=polling&sid={opened['sid']}")
        code, _, body = await self.text("POST", url, data=b'40/rc,\x1e42/rc,1["subscribe","en.*"]')
        self.assertEqual((code, body), (200, "ok"))
        self.assertEqual((await self.text("GET", url))[2], f'40/rc,{{"sid":"{opened["sid"]}"}}\x1e43/rc,1[null]')
        await d.append(d.rc[0], [rc_event(1, "dewiki"), rc_event(2, "enwiki")])
        _, _, body = await self.text("GET", url)
        self.assertEqual(body, '42/rc,["change",' + json.dumps(change_of(rc_event(2, "enwiki")), separators=(",", ":")) + "]")

    @async_test
    async def test_eio3_polling_uses_text_framing(self):
        d = await self.daemon()
        _, headers, body = await self.text("GET", d.url("/socket.io/?EIO=3&transport=polling&b64=1"))
        length, _, rest = body.partition(":")
        self.assertTrue(headers["content-type"].startswith("text/plain"))
        self.assertTrue(rest[:int(length)].startswith('0{"sid":'))
        self.assertEqual(rest[int(length):], "2:40")
        sid = json.loads(rest[1:int(length)])["sid"]
        url = d.url(f"/socket.io/?EIO=3&transport=polling&sid={sid}")
        self.assertEqual((await self.text("POST", url, data=b"1:25:40/rc"))[2], "ok")
        self.assertEqual((await self.text("GET", url))[2], "1:35:40/rc")
        self.assertEqual((await self.text("POST", url, data=b"9:2"))[0], 400)


class JsonpPollingByHand(RCStreamCase):
    @async_test
    async def test_jsonp_wraps_payloads_and_takes_form_posts(self):
        d = await self.daemon()
        _, _, body = await self.text("GET", d.url("/socket.io/1/"))
        url = d.url(f"/socket.io/1/jsonp-polling/{body.split(':')[0]}")
        code, headers, body = await self.text("GET", url + "?i=3")
        self.assertEqual(body, 'io.j[3]("1::");')
        self.assertTrue(headers["content-type"].startswith("text/javascript"))
        packet = json.dumps('5:1+:/rc:{"name":"subscribe","args":["*"]}')
        code, _, body = await self.text("POST", url + "?i=3", data={"d": packet})
        self.assertEqual((code, body), (200, "1"))
        _, _, body = await self.text("GET", url + "?i=4")
        self.assertEqual(body, 'io.j[4]("6::/rc:1+[null]");')


def ws_open(port: int, path: str, origin: str) -> list[str]:
    """A raw WebSocket handshake and the text frames received in 2 s (blocking)."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        key = base64.b64encode(os.urandom(16)).decode()
        s.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                   f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                   f"Origin: {origin}\r\n\r\n").encode())
        data = b""
        try:
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        except (socket.timeout, ConnectionResetError):
            pass
    head, _, frames = data.partition(b"\r\n\r\n")
    result = [head.split(b"\r\n")[0].decode()]
    while len(frames) >= 2:
        opcode, size = frames[0] & 0x0F, frames[1] & 0x7F
        if opcode == 1:
            result.append(frames[2:2 + size].decode())
        elif opcode == 8:
            result.append("<close>")
        frames = frames[2 + size:]
    return result


class WebSocketByHand(RCStreamCase):
    @async_test
    async def test_scheme_less_origin_is_accepted_and_unknown_sids_get_an_error(self):
        d = await self.daemon()
        _, _, body = await self.text("GET", d.url("/socket.io/1/"))
        port = d.ports["api"]
        frames = await deferToThread(ws_open, port, f"/socket.io/1/websocket/{body.split(':')[0]}",
                                     f"127.0.0.1:{port}")
        self.assertEqual(frames[:2], ["HTTP/1.1 101 Switching Protocols", "1::"])
        await wait_for(lambda: d.service.rcstream.status()["connected_clients"] == 0,
                       "the client's close to end the session")
        frames = await deferToThread(ws_open, port, "/socket.io/1/websocket/unknown", "http://a.example")
        self.assertEqual(frames, ["HTTP/1.1 101 Switching Protocols", "7:::1+0", "<close>"])
        await wait_for(lambda: not server_connections(port), "the server to see the sockets close")


def ws_frames(port: int, path: str, wanted: int, timeout: float = 10) -> list[tuple[int, bool, str]]:
    """A raw WebSocket handshake, then (opcode, fin, text) of the frames
    received until `wanted` text frames came (RFC 6455 5.2 lengths, checked
    unmasked) or the socket went quiet (blocking)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        key = base64.b64encode(os.urandom(16)).decode()
        s.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                   f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        data = b""
        frames: list[tuple[int, bool, str]] = []  # (opcode, fin, text)
        head = None
        while sum(1 for f in frames if f[0] == 1) < wanted:
            try:
                chunk = s.recv(1 << 20)
            except (socket.timeout, ConnectionResetError):
                break
            if not chunk:
                break
            data += chunk
            if head is None:
                if b"\r\n\r\n" not in data:
                    continue
                head, _, data = data.partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 101 "), head
            while len(data) >= 2:
                assert not data[1] & 0x80, "a server frame must not be masked"
                size, at = data[1] & 0x7F, 2
                if size == 126:
                    size, at = int.from_bytes(data[2:4], "big"), 4
                elif size == 127:
                    size, at = int.from_bytes(data[2:10], "big"), 10
                if len(data) < at + size:
                    break
                frames.append((data[0] & 0x0F, bool(data[0] & 0x80), data[at:at + size].decode("utf-8")))
                data = data[at + size:]
    return frames


class WebSocketBurst(RCStreamCase):
    @async_test
    async def test_a_burst_arrives_as_complete_in_order_frames_written_once(self):
        d = await self.daemon()
        bridge = d.service.rcstream
        _, _, body = await self.text("GET", d.url("/socket.io/1/"))
        sid = body.split(":")[0]
        events = [rc_event(n, "dewiki") for n in range(40)]
        events[5]["comment"] = "\u00e4" * 100  # frames of every length encoding
        events[-1]["comment"] = "y" * 70_000
        events.insert(7, rc_event(99, "enwiki"))  # not subscribed to
        wanted = 1 + 40  # 1:: and the changes
        received = deferToThread(ws_frames, d.ports["api"], f"/socket.io/1/websocket/{sid}", wanted)

        def attached():
            session = bridge.sessions.get(sid)
            return session if session is not None and session.transport is not None else None

        session = await wait_for(attached, "the WebSocket to attach to the session")
        session.receive('5::/rc:{"name":"subscribe","args":["de.*"]}')
        protocol = session.transport
        writes: list[int] = []
        write = protocol._write
        protocol._write = lambda data: (writes.append(len(data)), write(data))
        await d.append(d.rc[0], events)
        frames = await received
        self.assertEqual(frames[0], (1, True, "1::"))
        self.assertTrue(all(opcode == 1 and fin for opcode, fin, _ in frames))
        changes = [json.loads(text.split(":", 3)[3])["args"][0] for _, _, text in frames[1:]]
        self.assertEqual(changes, [change_of(e) for e in events if e["id"] != 99])
        self.assertLess(len(writes), 40, writes)  # a write per batch, not per change
        session.close()
        await close_handshake_timers()


class SlowWebSocket(RCStreamCase):
    @async_test
    async def test_a_websocket_that_does_not_read_is_closed(self):
        d = await self.daemon("rcstream.max_queue=5")
        bridge = d.service.rcstream
        _, _, body = await self.text("GET", d.url("/socket.io/1/"))
        sid = body.split(":")[0]
        slow = socket.create_connection(("127.0.0.1", d.ports["api"]))
        self.addCleanup(slow.close)
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        key = base64.b64encode(os.urandom(16)).decode()
        slow.sendall((f"GET /socket.io/1/websocket/{sid} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        session = bridge.sessions[sid]
        await wait_for(lambda: session.transport is not None, "the WebSocket to attach to the session")
        session.receive('5::/rc:{"name":"subscribe","args":["*"]}')
        big = rc_event(1)
        big["comment"] = "x" * 200_000
        sent = 0
        while sid in bridge.sessions and sent < 200:
            bridge.on_batch([(big, None)])
            bridge.flush()
            sent += 1
            await turn()  # the reactor writes what the socket takes
        self.assertNotIn(sid, bridge.sessions)
        self.assertGreater(sent, 6)  # the socket took some before it pushed back
        self.assertEqual(bridge.counters["slow"], 1)
        slow.close()
        await close_handshake_timers()


async def installed(install: Callable[[], Any]) -> Any:
    """What `install` makes (a client's environment), or a skip when it
    cannot be had (a failure under CI)."""
    try:
        return await deferToThread(install)
    except rcstream_clients.Unavailable as e:
        if os.environ.get("CI") == "true":
            raise
        raise unittest.SkipTest(str(e)) from None


class ClientRuns(RCStreamCase):
    """Runs a real client (installed under .cache/, subscribing to
    `*.wikipedia.org`) against a daemon, feeds the log once it has
    subscribed, and checks that the changes it printed are exactly the
    expected ones. Subclasses say what to feed."""

    timeout = 180
    changes = 3  # how many changes the client waits for

    async def feed(self, d) -> list[dict]:
        """Append the events; return those the client must get, in order."""
        raise NotImplementedError

    async def check(self, d, argv: list[str], cwd=None, ordered: bool = True) -> list[dict]:
        run = deferToThread(subprocess.run, argv, capture_output=True, text=True, timeout=60, cwd=cwd)
        await self.wait_subscribed(d)
        expected = await self.feed(d)
        result = await run
        lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
        changes = [line["change"] for line in lines if "change" in line]
        self.assertEqual(result.returncode, 0, result.stdout[-3000:] + result.stderr[-3000:])
        self.assertNotIn("invalid declared length", result.stderr)
        if not ordered:  # python-socketio calls each handler in a thread of its own
            changes.sort(key=lambda change: change["id"])
        self.assertEqual([json.dumps(c, sort_keys=True) for c in changes],
                         [json.dumps(change_of(e), sort_keys=True) for e in expected], result.stderr[-3000:])
        await wait_for(lambda: not server_connections(d.ports["api"]), "the server to see the client's sockets close")
        return lines

    async def python(self, env: str, script: str, transport: str, ordered: bool = True,
                     by_port: bool = False) -> list[dict]:
        python = await installed(lambda: rcstream_clients.python_env(env))
        d = await self.daemon()
        where = str(d.ports["api"]) if by_port else d.url("")
        return await self.check(d, [str(python), str(rcstream_clients.CLIENTS / script), where, transport,
                                    '"*.wikipedia.org"', str(self.changes), "30"], ordered=ordered)

    async def sio09(self, transport: str) -> list[dict]:
        return await self.python("sio09", "client_sio09.py", transport, by_port=True)

    async def node(self, version: str, transport: str) -> list[dict]:
        modules = await installed(rcstream_clients.node_modules)
        d = await self.daemon()
        return await self.check(d, ["node", "client.js", version, d.url(""), transport, '["*.wikipedia.org"]',
                                    str(self.changes), "30"], cwd=str(modules))


class RealClients(ClientRuns):
    """Each client subscribes to `*.wikipedia.org`, gets exactly the matching
    changes of a mixed batch fed to the log, and the change objects match."""

    async def feed(self, d) -> list[dict]:
        events, expected = mixed_events()
        self.assertEqual(expected[0]["title"], "B\u00e4r \u2603 \U0001F600")
        await d.append(d.rc[0], events[:3])
        await d.append(d.rc[1], events[3:])
        return expected

    async def sio5(self, transports: str) -> list[dict]:
        return await self.python("sio5", "client_sio5.py", transports, ordered=False)

    @async_test
    async def test_python_socketio_client_0_5_websocket(self):
        lines = await self.sio09("websocket")
        self.assertIn({"transport": "websocket"}, lines)

    @async_test
    async def test_python_socketio_client_0_5_xhr_polling(self):
        lines = await self.sio09("xhr-polling")
        self.assertIn({"transport": "xhr-polling"}, lines)

    @async_test
    async def test_python_socketio_client_0_5_jsonp_polling(self):
        lines = await self.sio09("jsonp-polling")
        self.assertIn({"transport": "jsonp-polling"}, lines)

    @async_test
    async def test_node_socket_io_client_0_9_websocket(self):
        lines = await self.node("0.9", "websocket")
        self.assertIn({"ack": [None]}, lines)
        self.assertIn({"transport": "websocket"}, lines)

    @async_test
    async def test_node_socket_io_client_0_9_xhr_polling(self):
        lines = await self.node("0.9", "xhr-polling")
        self.assertIn({"transport": "xhr-polling"}, lines)

    @async_test
    async def test_node_socket_io_client_4_websocket(self):
        lines = await self.node("4", "websocket")
        self.assertIn({"transport": "websocket"}, lines)

    @async_test
    async def test_node_socket_io_client_4_polling(self):
        lines = await self.node("4", "polling")
        self.assertIn({"transport": "polling"}, lines)

    @async_test
    async def test_node_socket_io_client_4_polling_upgraded_to_websocket(self):
        lines = await self.node("4", "upgrade")
        self.assertIn({"transport": "websocket"}, lines)

    @async_test
    async def test_node_socket_io_client_2_websocket(self):
        lines = await self.node("2", "websocket")
        self.assertIn({"transport": "websocket"}, lines)

    @async_test
    async def test_node_socket_io_client_2_polling(self):
        lines = await self.node("2", "polling")
        self.assertIn({"transport": "polling"}, lines)

    @async_test
    async def test_node_socket_io_client_2_polling_upgraded_to_websocket(self):
        lines = await self.node("2", "upgrade")
        self.assertIn({"transport": "websocket"}, lines)

    @async_test
    async def test_python_socketio_5_websocket(self):
        lines = await self.sio5("websocket")
        self.assertIn({"transport": "websocket"}, lines)

    @async_test
    async def test_python_socketio_5_polling(self):
        lines = await self.sio5("polling")
        self.assertIn({"transport": "polling"}, lines)

    @async_test
    async def test_python_socketio_5_polling_upgraded_to_websocket(self):
        lines = await self.sio5("polling,websocket")
        self.assertIn({"transport": "websocket"}, lines)


def hostile_events() -> list[dict]:
    """Changes whose text stresses every escaping layer (issue 15): `</span>`
    and `</script>`, quotes, backslashes, non-BMP characters; all on
    *.wikipedia.org."""
    texts = ['<span dir="auto"><span class="autocomment">Intro</span></span> tidy',
             'a "quoted" word and a back\\slash \\" \\\\ \\u0041',
             "non-BMP: \U0001F600 \U00010348 \U0001D11E, and \u00e4 \u2603 \ufffd",
             "</script><script>alert(1)</script> <\\/ </",
             'all: </span> "\\" \U0001F4A9']
    events = []
    for n, text in enumerate(texts * 2):
        event = rc_event(100 + n, "enwiki" if n % 2 else "dewiki")
        event["comment"] = text
        event["parsedcomment"] = text.replace("<", "&lt;")
        event["title"] = f"T\u00eatre {text[:12]} \U0001F3AD"
        events.append(event)
    return events


class LegacyClientsHostileText(ClientRuns):
    """Issue 15: the transports that lost data, and the clients the issue
    names, under a feed whose every change needs escaping. All the changes
    of one append arrive in one polling response (framed), where the
    declared lengths matter; each must arrive, equal to what was fed."""

    changes = 10

    async def feed(self, d) -> list[dict]:
        events = hostile_events()
        await d.append(d.rc[0], events)
        return events

    async def sio4(self, transports: str) -> list[dict]:
        return await self.python("sio4", "client_sio5.py", transports, ordered=False)

    @async_test
    async def test_python_socketio_client_0_5_jsonp_polling(self):
        lines = await self.sio09("jsonp-polling")
        self.assertIn({"transport": "jsonp-polling"}, lines)

    @async_test
    async def test_python_socketio_client_0_5_xhr_polling(self):
        lines = await self.sio09("xhr-polling")
        self.assertIn({"transport": "xhr-polling"}, lines)

    @async_test
    async def test_python_socketio_4_polling(self):
        lines = await self.sio4("polling")
        self.assertIn({"transport": "polling"}, lines)

    @async_test
    async def test_python_socketio_4_websocket(self):
        lines = await self.sio4("websocket")
        self.assertIn({"transport": "websocket"}, lines)

    @async_test
    async def test_python_socketio_4_polling_upgraded_to_websocket(self):
        lines = await self.sio4("polling,websocket")
        self.assertIn({"transport": "websocket"}, lines)

    @async_test
    async def test_node_socket_io_client_1_polling(self):
        lines = await self.node("1", "polling")
        self.assertIn({"transport": "polling"}, lines)

    @async_test
    async def test_node_socket_io_client_1_websocket(self):
        lines = await self.node("1", "websocket")
        self.assertIn({"transport": "websocket"}, lines)

    @async_test
    async def test_node_socket_io_client_1_polling_upgraded_to_websocket(self):
        lines = await self.node("1", "upgrade")
        self.assertIn({"transport": "websocket"}, lines)


class Eio3BinaryPollingByHand(RCStreamCase):
    @async_test
    async def test_binary_posts_are_read_and_answered_in_binary_unless_b64(self):
        d = await self.daemon()
        _, _, body = await self.text("GET", d.url("/socket.io/?EIO=3&transport=polling"))
        length, _, rest = body.partition(":")
        sid = json.loads(rest[1:int(length)])["sid"]
        url = d.url(f"/socket.io/?EIO=3&transport=polling&sid={sid}")
        posted = b"\x00\x05\xff40/rc\x00\x02\x07\xff42/rc,1[\"subscribe\",\"de.*\"]"  # python-engineio 3.x's
        code, _, answer = await self.text("POST", url, data=posted,
                                          headers={"Content-Type": "application/octet-stream"})
        self.assertEqual((code, answer), (200, "ok"))
        response = await self.request("GET", url)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/octet-stream"])
        self.assertEqual(await response.content(), b"\x00\x05\xff40/rc\x00\x01\x03\xff43/rc,1[null]")
        await d.append(d.rc[0], [rc_event(1, "dewiki")])
        _, headers, body = await self.text("GET", url + "&b64=1")  # b64=1: text framing
        self.assertTrue(headers["content-type"].startswith("text/plain"))
        self.assertRegex(body, r'^\d+:42/rc,\["change",\{"id":1,')
