"""The seam to Twisted's internals (eventstreams.compat): one test per
internal, whose failure names what disappeared, and the public paths taken
when one does."""
from __future__ import annotations

import socket
from typing import cast

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.compress import PerMessageDeflateOfferAccept
from twisted.internet import defer, error, reactor, tcp
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.trial import unittest
from twisted.web import http

from eventstreams import compat, fastwrite
from eventstreams.values import endpoint
from eventstreams.tap import Listener


class Internals(unittest.TestCase):
    """Fails on the Twisted (or autobahn) release that changed what we rely on."""

    def test_tcp_connection_keeps_its_send_buffers(self):
        self.assertTrue(compat.WRITE_THROUGH,
                        f"tcp.Connection lost {compat.WRITE_THROUGH_MISSING}: fastwrite falls back to transport.write")

    def test_tcp_connection_reads_the_protocol_we_swap_in(self):
        self.assertTrue(compat.PROTOCOL_SWAP,
                        f"tcp.Connection no longer delivers to a swapped {compat.PROTOCOL_SWAP_MISSING}: "
                        "streams stay on twisted.web")

    def test_endpoints_has_parse_server(self):
        self.assertTrue(compat.PARSE_SERVER, "twisted.internet.endpoints._parseServer is gone: "
                                             "config no longer checks endpoint ports")
        self.assertEqual(compat.parse_endpoint("tcp:8092:interface=127.0.0.1"), ("TCP", (8092, None)))

    def test_http_channel_has_the_bad_request_hook(self):
        self.assertTrue(compat.HTTP_BAD_REQUEST_HOOK,
                        f"HTTPChannel.{compat.BAD_REQUEST_HOOK} is gone: malformed requests get a bare 400")

    def test_http_channel_keeps_the_request_line_while_reading_headers(self):
        channel = http.HTTPChannel()
        channel.makeConnection(StringTransport())
        self.assertEqual(compat.request_line(channel), ("", ""))
        channel.dataReceived(b"GET /v2/stream/test HTTP/1.1\r\nHost: x\r\n")
        self.assertEqual(compat.request_line(channel), ("GET", "/v2/stream/test"),
                         "HTTPChannel no longer keeps _command/_path: refusals lose their method and uri")

    def test_autobahn_lists_the_extensions_in_use(self):
        # Public, but bridges/rcstream writes its own frames only while it is empty.
        def opened(offer: bool) -> WebSocketServerProtocol:
            factory = WebSocketServerFactory()
            factory.protocol = WebSocketServerProtocol
            factory.setProtocolOptions(openHandshakeTimeout=0, perMessageCompressionAccept=lambda offers: (
                PerMessageDeflateOfferAccept(offers[0]) if offers else None))
            protocol = cast(WebSocketServerProtocol, factory.buildProtocol(None))
            protocol.makeConnection(StringTransport())
            protocol.dataReceived(
                b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                + (b"Sec-WebSocket-Extensions: permessage-deflate\r\n" if offer else b"") + b"\r\n")
            self.assertEqual(protocol.state, protocol.STATE_OPEN)
            return protocol

        self.assertEqual(opened(False).websocket_extensions_in_use, [])
        self.assertNotEqual(opened(True).websocket_extensions_in_use, [],
                            "autobahn no longer lists permessage-deflate in websocket_extensions_in_use")


class PublicPaths(unittest.TestCase):
    """What runs when an internal is gone."""

    def test_without_write_through_a_connection_writes_through_twisted(self):
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        conn = tcp.Connection(a, None, None)
        self.assertNotEqual(fastwrite.writer_for(conn), conn.write)
        self.patch(compat, "WRITE_THROUGH", False)
        self.assertEqual(fastwrite.writer_for(conn), conn.write)

    def test_without_parse_server_endpoints_are_still_checked(self):
        self.patch(compat, "_parse_server", None)
        self.assertEqual(compat.parse_endpoint("tcp:8092"), ("TCP", ()))
        self.assertEqual(endpoint("unix:/run/x.sock"), "unix:/run/x.sock")
        with self.assertRaises(ValueError):
            endpoint("nosuchkind:1")

    @defer.inlineCallbacks
    def test_a_listener_binds_at_once_on_public_api_and_reports_a_port_in_use_there(self):
        first = Listener(reactor, "tcp:0:interface=127.0.0.1", Factory.forProtocol(Protocol))
        waiting = first.bound()  # asked before binding: fires once bound
        first.privilegedStartService()
        port = yield waiting
        self.assertIs(port, first.port)
        self.assertIs((yield first.bound()), port)  # asked after
        first.startService()  # the runner's start: no second bind
        taken = port.getHost().port
        second = Listener(reactor, f"tcp:{taken}:interface=127.0.0.1", Factory.forProtocol(Protocol))
        with self.assertRaises(error.CannotListenError):
            second.privilegedStartService()
        yield self.assertFailure(second.bound(), error.CannotListenError)
        yield first.stopService()
        again = Listener(reactor, f"tcp:{taken}:interface=127.0.0.1", Factory.forProtocol(Protocol))
        again.privilegedStartService()  # stopped listening: the port is free
        yield again.stopService()
