"""The one seam to Twisted's private internals.

The hot path leans on a few things Twisted does not promise; every use goes
through this module, which checks at import that each still exists and
behaves as relied on, and otherwise answers with the public path (slower or
plainer, never wrong). tests/test_compat.py names the attribute that
disappeared, so an upgrade that breaks one fails loudly in the tests and
quietly in production.

- `tcp.Connection`'s send buffers (`_tempDataBuffer`, `dataBuffer`,
  `offset`) and `socket`: eventstreams.fastwrite sends at once when nothing
  is queued. Public path: `transport.write`.
- `tcp.Connection` reading `self.protocol` for each read and on loss:
  eventstreams.takeover swaps it to detach a stream from twisted.web.
  Public path: the stream stays on twisted.web (more memory per client).
- `twisted.internet.endpoints._parseServer`: config checks an endpoint
  string (and its port) without listening. Public path: `serverFromString`
  with an inert reactor, which checks the syntax.
- `HTTPChannel._respondToBadRequestAndDisconnect`, which httpchannel
  overrides for a JSON 400, and the parsed request line (`_command`,
  `_path`) it reads. Public path: twisted.web's bare 400; no method/uri in
  the error.

The listeners (tap.Listener) and the WebSocket bridge use public API only:
`endpoint.listen` and autobahn's `websocket_extensions_in_use`; the bridge
extends autobahn's `sendCloseFrame` (documented, not underscored) to stop
reading a client it fails with 1009, which tests/test_abuse.py checks.
"""
from __future__ import annotations

import socket
from typing import Any, Callable, Optional

from twisted.internet import endpoints, tcp
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web import http

# -- tcp.Connection -----------------------------------------------------------


class _ProbeReactor:
    """Just enough of a reactor for a Connection that never joins a loop."""

    def removeReader(self, reader: Any) -> None:
        pass

    def removeWriter(self, writer: Any) -> None:
        pass


class _Seen(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True


def _probe_connection() -> tuple[Optional[str], Optional[str]]:
    """(what write-through misses, what the protocol swap misses): None when
    a real Connection over a socket pair behaves as relied on."""
    a, b = socket.socketpair()
    try:
        conn = tcp.Connection(a, _Seen(), _ProbeReactor())  # type: ignore[arg-type]
        write_missing = next(
            (name for name, kind in (("_tempDataBuffer", list), ("dataBuffer", bytes), ("offset", int),
                                     ("socket", socket.socket))
             if not isinstance(getattr(conn, name, None), kind)),
            None,
        )
        swapped = _Seen()
        conn.protocol = swapped
        b.sendall(b"probe")
        conn.doRead()
        conn.connectionLost(Failure(ConnectionError("probe")))
        swap_missing = None if swapped.data == b"probe" and swapped.lost else "protocol"
    except Exception as e:  # any change in the shape of Connection
        return f"Connection ({e!r})", f"Connection ({e!r})"
    finally:
        a.close()
        b.close()
    return write_missing, swap_missing


WRITE_THROUGH_MISSING, PROTOCOL_SWAP_MISSING = _probe_connection()
WRITE_THROUGH = WRITE_THROUGH_MISSING is None
PROTOCOL_SWAP = PROTOCOL_SWAP_MISSING is None


def swap_protocol(transport: Any, protocol: Any) -> None:
    """Make protocol the receiver of a tcp.Connection's reads and its loss.
    Only called when PROTOCOL_SWAP."""
    transport.protocol = protocol


# -- endpoint strings -----------------------------------------------------------

_parse_server: Optional[Callable[..., Any]] = getattr(endpoints, "_parseServer", None)
PARSE_SERVER = callable(_parse_server)


class _InertReactor:
    """serverFromString only keeps its reactor: nothing here is ever called."""


def parse_endpoint(text: str) -> tuple[str, tuple[Any, ...]]:
    """(kind, positional arguments) of a server endpoint string; raises
    (anything) when the string is not valid. Without _parseServer the kind
    is the prefix and the arguments are not known: ()."""
    if _parse_server is not None:
        kind, args, _ = _parse_server(text, None)
        return str(kind), tuple(args)
    endpoints.serverFromString(_InertReactor(), text)
    return text.split(":", 1)[0].upper(), ()


# -- HTTPChannel ------------------------------------------------------------------

BAD_REQUEST_HOOK = "_respondToBadRequestAndDisconnect"
HTTP_BAD_REQUEST_HOOK = callable(getattr(http.HTTPChannel, BAD_REQUEST_HOOK, None))


def request_line(channel: Any) -> tuple[str, str]:
    """The method and uri twisted.web parsed of the request being read
    ('' before the request line, or when Twisted no longer keeps them)."""
    method = getattr(channel, "_command", b"")
    uri = getattr(channel, "_path", b"")
    return (method.decode("ascii", "replace") if isinstance(method, bytes) else "",
            uri.decode("utf-8", "replace") if isinstance(uri, bytes) else "")
