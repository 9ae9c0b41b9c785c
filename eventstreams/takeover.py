"""Once a stream response is under way, the connection belongs to the stream.

twisted.web keeps an HTTPChannel, a Request (with its header tables,
notification Deferreds and the routing chain waiting on it) for as long as a
response is open: most of the memory of an idle stream client. A stream
response never ends by itself and never reads the connection again, so once
its head and first bytes are out the connection is handed to a small
protocol that only notices the client leaving; the sink writes chunks to
the transport directly (eventstreams.fastwrite) and ends the response
itself. The HTTP objects are then unreachable and freed.

Only plain TCP connections are taken over (TLS and test transports keep the
twisted.web path, which behaves the same, with more memory per client), and
only while Twisted's Connection still reads the protocol we swap in
(eventstreams.compat checks it at import).
"""
from __future__ import annotations

from typing import Any

from twisted.internet import tcp
from twisted.internet.interfaces import IProtocol, IPushProducer
from twisted.python.failure import Failure
from zope.interface import implementer

from . import compat
from .sse import ResponseSink

LAST_CHUNK = b"0\r\n\r\n"


@implementer(IProtocol)
class StreamConnection:
    """The protocol of a taken-over connection: the client sends nothing
    that matters any more (pipelined requests are dropped, as they would
    wait forever behind an endless response); its leaving ends the stream."""

    __slots__ = ("sink", "transport")

    def __init__(self, sink: ResponseSink, transport: Any):
        self.sink = sink
        self.transport = transport

    def makeConnection(self, transport: Any) -> None:
        """(IProtocol's: the connection is handed over already made.)"""
        self.transport = transport

    def connectionMade(self) -> None:
        pass

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure) -> None:
        self.sink.lost()

    def finish(self) -> None:
        """End the response (its last chunk) and close, like a finished
        request whose connection is not kept alive."""
        transport = self.transport
        transport.unregisterProducer()
        transport.write(LAST_CHUNK)
        transport.loseConnection()


def take_over(request: Any, sink: ResponseSink, producer: IPushProducer) -> bool:
    """Detach a started, chunked stream response from twisted.web; False
    (nothing changed) when the connection is not one we can take over."""
    channel = getattr(request, "channel", None)
    transport = getattr(channel, "transport", None)
    if (
        not compat.PROTOCOL_SWAP
        or not getattr(request, "chunked", False)
        or sink.transport is not transport  # its frames must already go to the socket
        or not isinstance(transport, tcp.Connection)
        or transport.protocol is not channel
        or transport.producer is not channel
        or not transport.connected
        or transport.disconnecting
    ):
        return False
    connection = StreamConnection(sink, transport)
    request.channel.setTimeout(None)  # (`channel` is typed IProtocol by the test above)
    transport.unregisterProducer()
    compat.swap_protocol(transport, connection)
    transport.registerProducer(producer, True)
    transport.startReading()  # HTTPChannel may have paused it; we must see EOF
    sink.detach(connection.finish)
    return True
