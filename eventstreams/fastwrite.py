"""Write-through for plain TCP connections.

Twisted buffers every write and sends it on the next reactor turn, adding
and removing the socket from epoll around each one: two epoll_ctl calls per
event per client, which dominated fan-out CPU. When nothing is queued on the
connection, sending at once costs one send() and no epoll change; whatever
the kernel does not take goes through the normal buffered path, so ordering,
flow control and producer pausing stay Twisted's. Reading the send buffers
is private to Twisted: eventstreams.compat checks it at import.
"""
from __future__ import annotations

from typing import Any, Callable

from twisted.internet import tcp

from . import compat


def writer_for(transport: Any) -> Callable[[bytes], None]:
    """A write function for transport: write-through when it is a plain TCP
    connection (not TLS, not a test transport), else transport.write."""
    if not compat.WRITE_THROUGH or not isinstance(transport, tcp.Connection) or not hasattr(transport, "socket"):
        return transport.write
    sock = transport.socket
    buffered = transport.write

    def write(data: bytes) -> None:
        if (
            transport.connected
            and not transport.disconnecting
            # Twisted's private send buffers, inline (the hot path): both
            # empty means nothing is queued. compat.WRITE_THROUGH vouches.
            and not transport._tempDataBuffer
            and len(transport.dataBuffer) == transport.offset
        ):
            try:
                sent = sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                sent = 0  # let the buffered path meet the error and close properly
            if sent == len(data):
                return
            data = data[sent:]
        buffered(data)

    return write


def no_delay(transport: Any) -> None:
    """TCP_NODELAY: our writes are already coalesced, and Nagle would hold one
    back until the client's (delayed, up to 40 ms or more) ACK of the last."""
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        try:
            set_no_delay(True)
        except OSError:
            pass
