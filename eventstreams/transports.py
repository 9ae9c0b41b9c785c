"""What our protocols need of a TCP connection's transport, as one type.

Twisted types `Protocol.transport` as Optional[ITransport]; a connection's
transport is a tcp.Connection in service (a StringTransport in tests): a TCP
transport that is also a consumer (a protocol registers itself as its
producer) and a push producer (reading is paused and resumed). Protocols
declare `transport: ITCPConnection` to say so.
"""
from __future__ import annotations

from twisted.internet.interfaces import IConsumer, IPushProducer, ITCPTransport


class ITCPConnection(ITCPTransport, IConsumer, IPushProducer):
    """ITCPTransport, IConsumer and IPushProducer at once (for types only)."""
