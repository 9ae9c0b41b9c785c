"""What the servers' protocols need of their transports, as types.

A server connection's transport is a tcp.Connection in service and a
StringTransport in tests: an ITCPTransport that is also a consumer (the
protocol registers itself as the producer) and a push producer (reading is
paused and resumed). An interface type cannot say "all three", and Twisted
types `Protocol.transport` as Optional; protocols declare this instead.
"""
from __future__ import annotations

from typing import Any, Protocol

from twisted.internet.interfaces import IAddress


class ServerTransport(Protocol):
    def write(self, data: bytes) -> None: ...

    def writeSequence(self, data: Any) -> None: ...

    def loseConnection(self) -> None: ...

    def abortConnection(self) -> None: ...

    def getPeer(self) -> IAddress: ...

    def getHost(self) -> IAddress: ...

    def registerProducer(self, producer: Any, streaming: bool) -> None: ...

    def unregisterProducer(self) -> None: ...

    def pauseProducing(self) -> None: ...

    def resumeProducing(self) -> None: ...
