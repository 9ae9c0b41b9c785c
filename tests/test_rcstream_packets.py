"""RCStream bridge units: wire formats, configuration, sessions (fake clock)."""
from __future__ import annotations

import json

from autobahn.twisted.websocket import WebSocketServerFactory
from twisted.internet.task import Clock
from twisted.trial import unittest

from bridges.rcstream import packets as P
from bridges.rcstream.config import RCStreamConfig, parse
from bridges.rcstream.sessions import Bridge, EioSession, Sio09Session
from bridges.rcstream.web import SocketProtocol
from eventstreams.config import ConfigError, load

from .support import rc_event, write_config


class Sio09Packets(unittest.TestCase):
    def test_parses_the_packets_clients_send(self):
        self.assertEqual(P.Packet.parse("1::/rc"), P.Packet(P.Sio09Type.CONNECT, "", "/rc", None))
        self.assertEqual(P.Packet.parse("1::/rc:"), P.Packet(P.Sio09Type.CONNECT, "", "/rc", ""))
        self.assertEqual(P.Packet.parse("2::"), P.Packet(P.Sio09Type.HEARTBEAT))
        self.assertEqual(P.Packet.parse("2:::"), P.Packet(P.Sio09Type.HEARTBEAT, data=""))
        packet = P.Packet.parse('5:3+:/rc:{"name":"subscribe","args":["a:b"]}')
        self.assertEqual((packet.type, packet.id, packet.endpoint), (P.Sio09Type.EVENT, "3+", "/rc"))
        self.assertEqual(packet.event(), ("subscribe", ["a:b"]))
        self.assertEqual(P.Packet.parse("1::/rc?x=1:").namespace, "/rc")

    def test_formats_packets(self):
        self.assertEqual(str(P.Packet(P.Sio09Type.CONNECT)), "1::")
        self.assertEqual(str(P.Packet(P.Sio09Type.CONNECT, "", "/rc")), "1::/rc")
        self.assertEqual(P.ack_packet("/rc", "12+", [None]), "6::/rc:12+[null]")
        self.assertEqual(P.ack_packet("/rc", "12", [None]), "6::/rc:12")
        self.assertEqual(P.error_packet("", 1, 0), "7:::1+0")
        self.assertEqual(P.error_packet(), "7:::")
        self.assertEqual(P.event_packet("/rc", "change", '[{"a":"\\u00e9"}]'),
                         '5::/rc:{"name":"change","args":[{"a":"\\u00e9"}]}')

    def test_rejects_bad_packets(self):
        for text in ["", "x", "9::", "12::", "1:", "1:a:", ":::", "5::/rc"]:
            if text == "5::/rc":
                with self.assertRaises(P.PacketError):
                    P.Packet.parse(text).event()
                continue
            with self.assertRaises(P.PacketError, msg=text):
                P.Packet.parse(text)
        for data in ["{", "[]", '{"args":[]}', '{"name":"x","args":{}}']:
            with self.assertRaises(P.PacketError, msg=data):
                P.Packet(P.Sio09Type.EVENT, "", "/rc", data).event()

    def test_payload_framing_round_trips_and_counts_utf16_units(self):
        packets = ["1::", '5::/rc:{"name":"x","args":["\U0001F600é"]}', ""]
        body = P.encode_payload(packets)
        self.assertTrue(body.startswith("\ufffd3\ufffd1::\ufffd"))
        self.assertIn("\ufffd34\ufffd", body)  # the emoji is two UTF-16 units
        self.assertEqual(P.decode_payload(body), packets)
        self.assertEqual(P.encode_payload(["2::"]), "2::")
        self.assertEqual(P.decode_payload("2::"), ["2::"])
        self.assertEqual(P.decode_payload(""), [])

    def test_bad_framing_is_refused(self):
        for body in ["\ufffd", "\ufffdx\ufffd1::", "\ufffd9\ufffd1::", "\ufffd3\ufffd1::x",
                     "\ufffd-1\ufffd", "\ufffd\ufffd", "\ufffd1\ufffd\U0001F600", "\ufffd99999999999\ufffd"]:
            with self.assertRaises(P.PacketError, msg=repr(body)):
                P.decode_payload(body)

    def test_jsonp_bodies(self):
        self.assertEqual(P.jsonp_body("3", ["1::"]), 'io.j[3]("1::");')
        body = P.jsonp_body("0", ['5::/rc:{"a":"\\u00e9</script>"}', "2::"])
        self.assertEqual(body, 'io.j[0]("\ufffd30\ufffd5::/rc:{\\"a\\":\\"\\\\u00e9\\u003c/script>\\"}\ufffd3\ufffd2::");')
        self.assertEqual(P.jsonp_post_data('"1::/rc:"'), "1::/rc:")
        self.assertEqual(P.jsonp_post_data("2::"), "2::")
        for bad in ['"unterminated', '"a" "b"']:
            with self.assertRaises(P.PacketError):
                P.jsonp_post_data(bad)


class EioPackets(unittest.TestCase):
    def test_parses_socketio_packets(self):
        self.assertEqual(P.SioPacket.parse("0/rc,"), P.SioPacket(P.SioType.CONNECT, "/rc"))
        self.assertEqual(P.SioPacket.parse("0/rc"), P.SioPacket(P.SioType.CONNECT, "/rc"))
        self.assertEqual(P.SioPacket.parse("0"), P.SioPacket(P.SioType.CONNECT, "/"))
        self.assertEqual(P.SioPacket.parse('2/rc,7["subscribe","*"]'),
                         P.SioPacket(P.SioType.EVENT, "/rc", 7, ["subscribe", "*"]))
        self.assertEqual(P.SioPacket.parse('2["x"]').event(), ("x", []))

    def test_formats_socketio_packets(self):
        self.assertEqual(str(P.SioPacket(P.SioType.CONNECT, "/rc", None, {"sid": "a"})), '0/rc,{"sid":"a"}')
        self.assertEqual(str(P.SioPacket(P.SioType.CONNECT, "/rc")), "0/rc")
        self.assertEqual(str(P.SioPacket(P.SioType.ACK, "/rc", 7, [None])), "3/rc,7[null]")
        self.assertEqual(P.eio_event("/rc", "change", '[{"a":1}]'), '42/rc,["change",{"a":1}]')
        self.assertEqual(P.eio_event("/rc", "x", "[]"), '42/rc,["x"]')

    def test_rejects_bad_socketio_packets(self):
        for text in ["", "x", "9", "5/rc,", '2/rc,["a"', "2/rc,1" + "9" * 20]:
            with self.assertRaises(P.PacketError, msg=text):
                P.SioPacket.parse(text)
        with self.assertRaises(P.PacketError):
            P.SioPacket.parse("2/rc,{}").event()

    def test_payloads(self):
        self.assertEqual(P.encode_eio4_payload(["2", "40"]), "2\x1e40")
        self.assertEqual(P.decode_eio4_payload("2\x1e40"), ["2", "40"])
        self.assertEqual(P.encode_eio3_payload(["2", "4\U0001F600"]), "1:23:4\U0001F600")
        self.assertEqual(P.decode_eio3_payload("1:23:4\U0001F600"), ["2", "4\U0001F600"])
        for bad in ["1", "x:2", "5:2", ":", "2:2"]:
            with self.assertRaises(P.PacketError, msg=bad):
                P.decode_eio3_payload(bad)


class Generations(unittest.TestCase):
    """Each protocol generation frames polling bodies and change events its
    own way; a session speaks one."""

    def test_each_generation_frames_and_reads_its_payloads(self):
        packets = ["2::", "5::/rc:{\"name\":\"x\"}"]
        self.assertEqual(P.SIO09.encode(packets), P.encode_payload(packets))
        self.assertEqual(P.EIO3.encode(["2", "40"]), "1:22:40")
        self.assertEqual(P.EIO4.encode(["2", "40"]), "2\x1e40")
        for generation in (P.SIO09, P.EIO3, P.EIO4):
            self.assertEqual(generation.decode(generation.encode(packets)), packets, generation)

    def test_change_events_and_noops(self):
        self.assertEqual(P.SIO09.event("/rc", "change", "[1]"), P.event_packet("/rc", "change", "[1]"))
        self.assertEqual(P.EIO3.event("/rc", "change", "[1]"), '42/rc,["change",1]')
        self.assertEqual(P.EIO4.event("/rc", "change", "[1]"), '42/rc,["change",1]')
        self.assertEqual((P.SIO09.noop(), P.EIO3.noop(), P.EIO4.noop()), ("8::", "6", "6"))

    def test_a_session_speaks_the_generation_of_its_handshake(self):
        bridge = Bridge(RCStreamConfig(), Clock())
        self.assertIs(Sio09Session(bridge, "a").generation, P.SIO09)
        self.assertIs(EioSession(bridge, "b", 3).generation, P.EIO3)
        self.assertIs(EioSession(bridge, "c", 4).generation, P.EIO4)


class Config(unittest.TestCase):
    def load(self, *overrides):
        return load(write_config(self.mktemp()), overrides)

    def test_off_without_the_section_and_defaults_with_it(self):
        self.assertIsNone(parse(self.load()))
        self.assertEqual(parse(self.load("rcstream.stream=recentchange")), RCStreamConfig())

    def test_values_are_parsed(self):
        c = parse(self.load("rcstream.heartbeat=5s", "rcstream.session_timeout=1m", "rcstream.max_post=1k",
                            "rcstream.max_subscriptions=3", "rcstream.stream=test", "rcstream.flush_interval=0.2"))
        self.assertEqual((c.heartbeat, c.session_timeout, c.max_post, c.max_subscriptions, c.stream, c.flush_interval),
                         (5.0, 60.0, 1024, 3, "test", 0.2))

    def test_mistakes_name_the_key(self):
        for override, key in [("rcstream.stream=nope", "stream"), ("rcstream.heartbeat=0", "heartbeat"),
                              ("rcstream.heartbeat=90", "heartbeat"), ("rcstream.max_queue=0", "max_queue"),
                              ("rcstream.colour=red", "colour"), ("rcstream.poll_timeout=soon", "poll_timeout"),
                              ("rcstream.flush_interval=2s", "flush_interval")]:
            with self.assertRaises(ConfigError, msg=override) as caught:
                parse(self.load(override))
            self.assertEqual((caught.exception.section, caught.exception.key), ("rcstream", key))


class Recorder:
    """A Transport that keeps what it is given."""

    def __init__(self):
        self.ready = True
        self.packets: list[str] = []
        self.closed = False

    def deliver(self, packets):
        self.packets += packets

    def close(self):
        self.closed = True


def deliver(bridge: Bridge, event: dict) -> None:
    """One change, sent at once: a batch of one from the feed, then the flush."""
    bridge.on_batch([(event, None)])
    bridge.flush()


class Sessions(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.bridge = Bridge(RCStreamConfig(max_queue=5), self.clock)
        self.bridge.startService()
        self.addCleanup(self.bridge.stopService)

    def open(self, factory=Sio09Session):
        session = self.bridge.create(factory)
        transport = Recorder()
        session.attach(transport)
        return session, transport

    def test_connect_is_answered_once_and_subscriptions_match_by_server_name(self):
        session, t = self.open()
        for packet in ["1::/rc:", "1::/rc", '5:1+:/rc:{"name":"subscribe","args":[["*.wikipedia.org"]]}']:
            session.receive(packet)
        self.assertEqual(t.packets, ["1::", "1::/rc", "6::/rc:1+[null]"])
        event = rc_event(1, "dewiki")
        event["title"] = "Bär"
        deliver(self.bridge, event)
        deliver(self.bridge, rc_event(2, "wikidatawiki"))
        canary = rc_event(3, "enwiki")
        canary["meta"]["domain"] = "canary"
        deliver(self.bridge, canary)
        self.assertEqual(len(t.packets), 4)
        self.assertTrue(t.packets[3].startswith('5::/rc:{"name":"change","args":[{'))
        self.assertIn('"title":"B\\u00e4r"', t.packets[3])
        change = json.loads(t.packets[3].split(":", 3)[3])["args"][0]
        self.assertNotIn("meta", change)
        self.assertNotIn("$schema", change)
        self.assertEqual(change["id"], 1)

    def test_too_many_subscriptions_adds_nothing_and_unsubscribe_removes(self):
        session, t = self.open()
        eight = json.dumps([f"a{i}" for i in range(8)])
        session.receive(f'5::/rc:{{"name":"subscribe","args":[{eight}]}}')
        session.receive('5::/rc:{"name":"subscribe","args":[["b1","b2","b3"]]}')
        self.assertEqual(len(session.subscriptions), 8)
        self.assertEqual(t.packets[-1], '5::/rc:{"name":"error","args":["subscribe_error","Too many subscriptions"]}')
        session.receive('5::/rc:{"name":"unsubscribe","args":["a0"]}')
        session.receive('5::/rc:{"name":"subscribe","args":[["b1","b2"]]}')
        self.assertEqual(len(session.subscriptions), 9)
        session.receive("0::/rc")
        self.assertEqual(session.subscriptions, [])

    def test_bad_input_gets_error_packets(self):
        session, t = self.open()
        session.receive("garbage")
        session.receive("1::/other")
        session.receive("5::/rc:{")
        session.receive('5::/other:{"name":"subscribe","args":["*"]}')
        self.assertEqual(t.packets[1:], ["7:::", "7::/other:2", "7::/rc:", "7::/other:2"])
        self.assertEqual(session.subscriptions, [])

    def test_heartbeats_and_expiry(self):
        session, t = self.open()
        self.clock.advance(25)
        self.assertEqual(t.packets[-1], "2::")
        session.receive("2::")
        self.clock.pump([1] * 59)
        self.assertFalse(session.closed)
        self.clock.pump([1] * 3)
        self.assertTrue(session.closed)
        self.assertTrue(t.closed)
        self.assertEqual(self.bridge.status(), {"connected_clients": 0, "queue_size": 0})

    def test_a_session_that_falls_behind_is_closed(self):
        session, t = self.open()
        session.receive('5::/rc:{"name":"subscribe","args":["*"]}')
        t.ready = False
        for n in range(4):
            deliver(self.bridge, rc_event(n))
        self.assertEqual(self.bridge.status(), {"connected_clients": 1, "queue_size": 4})
        deliver(self.bridge, rc_event(5))
        deliver(self.bridge, rc_event(6))
        self.assertTrue(session.closed)
        self.assertEqual(self.bridge.status()["connected_clients"], 0)
        self.assertEqual(dict((s[0], s[4]) for s in self.bridge.samples())["eventstreams_rcstream_slow_closed_total"], 1)

    def test_eio4_namespace_events_acks_and_pings(self):
        session, t = self.open(lambda bridge, sid: EioSession(bridge, sid, 4))
        session.receive("40/rc,")
        session.receive('42/rc,1["subscribe","de.*"]')
        session.receive("40/nope,")
        session.receive("4garbage")
        self.assertEqual(t.packets, [f'40/rc,{{"sid":"{session.sid}"}}', "43/rc,1[null]",
                                     '44/nope,{"message":"Invalid namespace"}',
                                     '44{"message":"not a Socket.IO packet: \'garbage\'"}'])
        deliver(self.bridge, rc_event(1, "dewiki"))
        self.assertTrue(t.packets[-1].startswith('42/rc,["change",{'))
        self.clock.advance(25)
        self.assertEqual(t.packets[-1], "2")
        session.receive("1")
        self.assertTrue(session.closed)

    def test_eio3_answers_pings(self):
        session, t = self.open(lambda bridge, sid: EioSession(bridge, sid, 3))
        self.assertEqual(session.opening(["websocket"])[1], "40")
        session.receive("2")
        session.receive("2probe")
        session.receive("40/rc")
        self.assertEqual(t.packets, ["3", "3probe", "40/rc"])
        self.clock.advance(25)
        self.assertEqual(t.packets[-1], "40/rc")  # EIO3: the client pings


class SharedRecorder(Recorder):
    """A Transport that takes shared batches (as the WebSocket does)."""

    def __init__(self):
        super().__init__()
        self.shared: list = []

    cost = None  # (clock, seconds): each delivery moves the clock on (a slow send)

    def deliver_shared(self, out):
        self.shared.append(out)
        self.packets += out.packets
        if self.cost is not None:
            clock, seconds = self.cost
            clock.rightNow += seconds

    def deliver(self, packets):
        super().deliver(packets)
        if self.cost is not None:
            clock, seconds = self.cost
            clock.rightNow += seconds


class Batches(unittest.TestCase):
    """Bridge.on_batch: one Outgoing per protocol and subscription list,
    shared by the sessions that have them."""

    def setUp(self):
        self.clock = Clock()
        self.bridge = Bridge(RCStreamConfig(max_queue=5, flush_interval=0), self.clock)
        self.bridge.startService()
        self.addCleanup(self.bridge.stopService)

    def open(self, subscribe, factory=Sio09Session):
        session = self.bridge.create(factory)
        transport = SharedRecorder()
        session.attach(transport)
        session.rc_event("subscribe", [subscribe])
        del transport.packets[:]
        return session, transport

    def test_sessions_with_the_same_subscriptions_share_one_outgoing(self):
        a, ta = self.open(["*.wikipedia.org"])
        b, tb = self.open(["*.wikipedia.org"])
        c, tc = self.open(["de.*"])
        e, te = self.open(["*.wikipedia.org"], lambda bridge, sid: EioSession(bridge, sid, 4))
        none, tn = self.open(["*.wiktionary.org"])
        canary = rc_event(4, "dewiki")
        canary["meta"]["domain"] = "canary"
        events = [rc_event(1, "dewiki"), rc_event(2, "wikidatawiki"), rc_event(3, "enwiki"), canary]
        self.bridge.on_batch([(event, None) for event in events])
        self.assertEqual(len(ta.shared), 1)
        self.assertIs(ta.shared[0], tb.shared[0])
        self.assertEqual([json.loads(p.split(":", 3)[3])["args"][0]["id"] for p in ta.packets], [1, 3])
        self.assertIs(ta.packets[0], tc.packets[0])  # the same change, encoded once
        self.assertEqual(len(tc.packets), 1)
        self.assertEqual([json.loads(p[len('42/rc,'):])[1]["id"] for p in te.packets], [1, 3])
        self.assertEqual((tn.packets, tn.shared), ([], []))
        self.assertEqual(self.bridge.counters["changes"], 2 + 2 + 1 + 2)

    def test_a_batch_is_queued_behind_waiting_packets_and_bounded(self):
        slow, t = self.open(["*"])
        t.ready = False
        self.bridge.on_batch([(rc_event(n), None) for n in range(3)])
        slow.send("2::")
        self.assertEqual(len(slow.queue), 4)
        t.ready = True
        self.bridge.on_batch([(rc_event(3), None)])  # behind the queue: flushed in order
        self.assertEqual(t.shared, [])
        self.assertEqual(t.packets[3], "2::")
        self.assertEqual(len(t.packets), 5)
        t.ready = False
        self.bridge.on_batch([(rc_event(n), None) for n in range(4, 10)])  # 6 > max_queue
        self.assertTrue(slow.closed)
        self.assertEqual(self.bridge.counters["slow"], 1)

    def test_websocket_frames_are_rfc6455_text_frames(self):
        factory = WebSocketServerFactory()
        protocol = SocketProtocol()
        protocol.factory = factory
        for size, header in [(5, b"\x81\x05"), (126, b"\x81\x7e\x00\x7e"), (70000, b"\x81\x7f" + (70000).to_bytes(8, "big"))]:
            frame = protocol._frame("x" * size)
            self.assertEqual(frame, header + b"x" * size)


class PacedBatches(unittest.TestCase):
    """flush_interval > 0: flushes spaced by eventstreams.pacing."""

    open = Batches.open

    def setUp(self):
        self.clock = Clock()
        self.bridge = Bridge(RCStreamConfig(max_queue=5, flush_interval=0.1), self.clock)
        self.bridge.startService()
        self.addCleanup(self.bridge.stopService)

    def test_flushes_are_spaced_by_twice_their_duration_up_to_flush_interval(self):
        session, t = self.open(["*"])
        self.clock.advance(1)
        self.bridge.on_batch([(rc_event(0), None)])  # quick flushes: each batch at once
        self.bridge.on_batch([(rc_event(1), None)])
        self.assertEqual(len(t.shared), 2)
        t.cost = (self.clock, 0.03)  # now a delivery takes 30 ms
        self.bridge.on_batch([(rc_event(2), None)])  # at once, and that flush took 30 ms
        self.bridge.on_batch([(rc_event(3), None)])  # waits for 2 x 30 ms after its start
        self.bridge.on_batch([(rc_event(4), None)])
        self.assertEqual(len(t.shared), 3)
        self.clock.advance(0.03)
        self.assertEqual(len(t.shared), 4)
        self.assertEqual(len(t.shared[3].packets), 2)
        self.clock.advance(1)
        t.cost = (self.clock, 0.08)
        self.bridge.on_batch([(rc_event(5), None)])  # at once; that flush took 80 ms
        self.bridge.on_batch([(rc_event(6), None)])  # 2 x 80 ms, capped at flush_interval
        self.clock.advance(0.019)
        self.assertEqual(len(t.shared), 5)
        self.clock.advance(0.002)
        self.assertEqual(len(t.shared), 6)
        t.cost = None
        self.bridge.on_batch([(rc_event(7), None)])  # waits: the last flush took 80 ms
        t.cost = (self.clock, 0.03)
        deliver(self.bridge, rc_event(8))  # at once, after the pending one
        self.assertEqual([json.loads(p.split(":", 3)[3])["args"][0]["id"] for p in t.packets], list(range(9)))
        self.bridge.on_batch([(rc_event(9), None)])
        self.bridge.stopService()  # a pending flush is dropped with the sessions
        self.clock.advance(1)
        self.assertEqual(len(t.packets), 9)


class JsonpDeclaredLengths(unittest.TestCase):
    """Issue 15: every framed packet of a jsonp body decodes to exactly its
    declared length, whether the client unescapes the JS string first (JS,
    JSON) or each framed part after splitting (socketIO-client 0.5.7.4,
    with Python's unicode_escape)."""

    PACKETS = [P.event_packet("/rc", "change", P.ascii_json([{"comment": text}]))
               for text in ['<span>a</span>', 'say "hi"', "back\\slash", "\U0001F600 \u00e4 \u2603", "</script>"]]

    def test_split_then_unescape_gives_the_declared_lengths(self):
        import codecs

        body = P.jsonp_body("1", self.PACKETS)
        inner = body[len('io.j[1]("'):-len('");')]
        parts = inner.split(P.BOUNDARY)[1:]
        decoded = [codecs.getdecoder("unicode_escape")(part)[0] for part in parts[1::2]]
        self.assertEqual([int(n) for n in parts[0::2]], [len(text) for text in decoded])
        self.assertEqual(decoded, self.PACKETS)

    def test_unescape_then_split_gives_the_packets(self):
        body = P.jsonp_body("1", self.PACKETS)
        text = json.loads(body[len('io.j[1]('):-len(');')])
        self.assertEqual(P.decode_payload(text), self.PACKETS)
        self.assertNotIn("</", body)


class Eio3BinaryPayloads(unittest.TestCase):
    def test_round_trip_and_python_engineio_3_bytes(self):
        packets = ["40/rc", '42/rc,["subscribe","\u00e4"]', "2"]
        data = P.encode_eio3_binary_payload(packets)
        # byte for byte what python-engineio 3.14's Payload.encode() gives (24 UTF-8 bytes: digits 2, 4)
        self.assertEqual(data, b'\x00\x05\xff40/rc\x00\x02\x04\xff42/rc,["subscribe","\xc3\xa4"]\x00\x01\xff2')
        self.assertEqual(P.decode_eio3_binary_payload(data), packets)
        self.assertEqual(P.decode_eio3_binary_payload(b"\x01\x03\xff\x04ab\x00\x01\xff2"), [None, "2"])

    def test_bad_binary_framing_is_refused(self):
        for data in [b"\x00\xff", b"\x00\x0a\xff", b"\x00\x01", b"\x00\x05\xff40", b"\x02\x01\xff2",
                     b"\x00" + b"\x01" * 12 + b"\xff", b"\x00\x02\xff\xc3("]:
            with self.assertRaises(P.PacketError, msg=repr(data)):
                P.decode_eio3_binary_payload(data)


class JsonDepth(unittest.TestCase):
    def test_nesting_over_the_limit_is_a_packet_error(self):
        self.assertEqual(P.loads('[["a", {"b": [1]}], "[[[[[["]', 4), [["a", {"b": [1]}], "[[[[[["])
        for text in ["[" * 30_000 + "]" * 30_000, '{"a":' * 5000 + "1" + "}" * 5000]:
            with self.assertRaises(P.PacketError):
                P.loads(text)
        with self.assertRaises(P.PacketError):
            P.SioPacket.parse("2/rc," + "[" * 40 + "]" * 40)
        with self.assertRaises(P.PacketError):
            P.Packet.parse('5::/rc:{"name":"x","args":' + "[" * 40 + "]" * 40 + "}").event()


class Limits(unittest.TestCase):
    """Issue 12: what one client address can make the bridge do, on a Clock."""

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1000)
        self.config = RCStreamConfig(max_sessions=6, max_sessions_per_address=4, max_handshakes_per_second=3,
                                     max_pattern_length=20, max_patterns_per_second=5)
        self.bridge = Bridge(self.config, self.clock)
        self.bridge.startService()
        self.addCleanup(self.bridge.stopService)

    def handshake(self, address):
        refusal = self.bridge.refusal(address)
        return refusal if refusal is not None else self.bridge.create(Sio09Session, address)

    def test_handshakes_per_second_then_sessions_per_address_then_in_all(self):
        from bridges.rcstream.sessions import FULL, FULL_FOR_ADDRESS, TOO_FAST

        first = [self.handshake("a") for _ in range(4)]
        self.assertEqual(first[3], TOO_FAST)  # 3 a second, the burst too
        self.clock.advance(1 / 3)
        self.assertIsInstance(self.handshake("a"), Sio09Session)
        self.clock.advance(1)
        self.assertEqual(self.handshake("a"), FULL_FOR_ADDRESS)
        self.assertIsInstance(self.handshake("b"), Sio09Session)
        self.assertIsInstance(self.handshake("b"), Sio09Session)
        self.assertEqual(self.handshake("c"), FULL)
        first[0].close()  # a closed session frees its places
        self.clock.advance(1)
        self.assertIsInstance(self.handshake("a"), Sio09Session)
        self.assertEqual(self.bridge.per_address, {"a": 4, "b": 2})
        self.assertEqual(dict((s[0], s[4]) for s in self.bridge.samples())["eventstreams_rcstream_refused_total"], 3)
        self.clock.advance(10)
        self.bridge.tick()
        self.assertEqual(self.bridge.handshakes.buckets, {})  # full buckets are forgotten

    def test_long_patterns_and_too_many_new_patterns_are_refused(self):
        session = self.bridge.create(Sio09Session, "a")
        t = Recorder()
        session.attach(t)
        session.receive('5::/rc:{"name":"subscribe","args":["' + "a*" * 11 + '"]}')
        self.assertEqual(t.packets[-1], '5::/rc:{"name":"error","args":["subscribe_error","Subscription pattern too long"]}')
        session.receive('5::/rc:{"name":"subscribe","args":[["1","2","3","4","5","6"]]}')
        self.assertIn("Too many new subscription patterns", t.packets[-1])
        self.assertEqual(session.subscriptions, [])
        self.clock.advance(1)
        other = self.bridge.create(Sio09Session, "a")
        other.attach(Recorder())
        other.receive('5::/rc:{"name":"subscribe","args":[["1","2","3","4","5"]]}')  # compiled once for all
        session.receive('5::/rc:{"name":"subscribe","args":[["1","2","3","4","5"]]}')
        self.assertEqual(session.subscriptions, ["1", "2", "3", "4", "5"])
        self.assertIs(session.matchers["1"], other.matchers["1"])

    def test_ticks_are_sliced_across_reactor_turns(self):
        from bridges.rcstream.sessions import TICK_SLICE

        bridge = Bridge(RCStreamConfig(max_sessions=0, max_sessions_per_address=0, max_handshakes_per_second=0),
                        self.clock)
        for _ in range(TICK_SLICE * 2 + 10):
            bridge.create(Sio09Session, "a")
        self.clock.advance(61)
        bridge.tick()
        self.assertEqual(len(bridge.sessions), TICK_SLICE + 10)  # one slice expired this turn
        bridge.tick()  # a pass under way: no second one
        self.assertEqual(len(bridge.sessions), TICK_SLICE + 10)
        self.clock.advance(0)  # the next turns (callLater(0) each)
        self.assertEqual(len(bridge.sessions), 0)
        self.assertIsNone(bridge._ticking)
        self.assertEqual(bridge.per_address, {})
