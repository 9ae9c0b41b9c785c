"""The twisted.web side: `/socket.io/` (Socket.IO 0.9 under `1/`, Engine.IO
3/4 at the root with `?EIO=`), `/rcstream_status`, and the WebSocket protocol.

Polling: one held GET per session takes the queued packets or, after
poll_timeout, a noop; a newer GET releases the older one with a noop.
"""
from __future__ import annotations

from typing import Any, Optional, cast
from urllib.parse import parse_qs

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from eventstreams.fastwrite import no_delay, writer_for
from eventstreams.httpchannel import not_counted
from eventstreams.transports import ITCPConnection
from eventstreams.web import client_ip

from . import packets as P
from .sessions import TOO_FAST, Bridge, EioSession, Outgoing, Session, Sio09Session

log = Logger()

TRANSPORTS_09 = "websocket,xhr-polling,jsonp-polling"
NOT_HANDSHAKEN = P.error_packet("", P.REASON_CLIENT_NOT_HANDSHAKEN, P.ADVICE_RECONNECT)


def arg(request: Any, name: str) -> Optional[str]:
    values = request.args.get(name.encode())
    return values[0].decode("utf-8", "replace") if values else None


def cors(request: Any) -> None:
    origin = request.getHeader(b"origin")
    if origin:
        request.setHeader(b"access-control-allow-origin", origin)
        request.setHeader(b"access-control-allow-credentials", b"true")
    else:
        request.setHeader(b"access-control-allow-origin", b"*")


def reply(request: Any, body: str | bytes, status: int = 200,
          content_type: bytes = b"text/plain; charset=UTF-8") -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", content_type)
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"x-content-type-options", b"nosniff")
    if status in (429, 503):
        request.setHeader(b"retry-after", b"1")
        # A refused client reconnects: a flood pipelined over one keep-alive
        # connection would otherwise cost it nothing but the request.
        request.setHeader(b"connection", b"close")
        if getattr(request, "channel", None) is not None:
            request.channel.persistent = False
    cors(request)
    return body if isinstance(body, bytes) else body.encode("utf-8")


OCTET_STREAM = b"application/octet-stream"


def payload(session: Session, packets: list[str], binary: bool) -> tuple[str | bytes, bytes]:
    """A polling body and its content type: EIO3's binary framing when the
    client reads it, else the session's text framing."""
    if binary:
        return P.encode_eio3_binary_payload(packets), OCTET_STREAM
    return session.encode(packets), b"text/plain; charset=UTF-8"


def wants_binary(request: Any, session: Session) -> bool:
    """EIO3 polling answers in binary framing to a client that posts in it
    (python-engineio 3.x, XHR2 browsers) unless it asks for b64=1; other
    clients get text framing, as the reference server sends for text packets."""
    return session.generation is P.EIO3 and session.binary and arg(request, "b64") is None


def preflight(request: Any) -> bytes:
    request.setHeader(b"access-control-allow-methods", b"GET, POST, OPTIONS")
    wanted = request.getHeader(b"access-control-request-headers")
    if wanted:
        request.setHeader(b"access-control-allow-headers", wanted)
    request.setHeader(b"access-control-max-age", b"86400")
    return reply(request, "", 204)


def normalise_origin(request: Any) -> None:
    """Node's socket.io-client 0.9 sends `Origin: host:port`; autobahn refuses
    an Origin without a scheme, so give it one."""
    origins = request.requestHeaders.getRawHeaders(b"origin")
    if origins and b"://" not in origins[0] and origins[0] != b"null":
        request.requestHeaders.setRawHeaders(b"origin", [b"http://" + origins[0]])


def noop(session: Session) -> str:
    return session.generation.noop()


class PollTransport:
    """One held polling GET."""

    def __init__(self, request: Any, session: Session, clock: IReactorTime, timeout: float,
                 jsonp: Optional[str] = None, binary: bool = False):
        self.request, self.session, self.jsonp, self.binary = request, session, jsonp, binary
        self.ready = True
        self._timer: Optional[IDelayedCall] = clock.callLater(timeout, self._expire)
        request.notifyFinish().addBoth(self._gone)

    def deliver(self, packets: list[str]) -> None:
        if self.jsonp is not None:
            body: str | bytes = P.jsonp_body(self.jsonp, packets)
            kind = b"text/javascript; charset=UTF-8"
        else:
            body, kind = payload(self.session, packets, self.binary)
        self._finish(body, kind)

    def deliver_shared(self, out: Outgoing) -> None:
        self.deliver(out.packets)

    def close(self) -> None:
        self.deliver([noop(self.session)])

    def _expire(self) -> None:
        self._timer = None
        if self.ready:
            self.close()

    def _finish(self, body: str | bytes, kind: bytes) -> None:
        if not self.ready:
            return
        self.ready = False
        self.session.detach(self)
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self.request.write(reply(self.request, body, 200, kind))
        self.request.finish()

    def _gone(self, _: Any) -> None:
        if self.ready:  # the client went away before an answer
            self.ready = False
            self.session.detach(self)
            if self._timer is not None and self._timer.active():
                self._timer.cancel()


def read_body(request: Any, limit: int) -> Optional[bytes]:
    """The POST body, or None when too big."""
    data = request.content.read(limit + 1)
    return None if len(data) > limit else data


class Polling:
    """GET and POST of a polling transport, common to all protocols."""

    def __init__(self, bridge: Bridge, clock: IReactorTime):
        self.bridge, self.clock = bridge, clock

    def get(self, request: Any, session: Session, jsonp: Optional[str] = None) -> Any:
        session.touch()
        if session.transport is not None and not isinstance(session.transport, PollTransport):
            return reply(request, "transport in use by a WebSocket", 400)
        binary = wants_binary(request, session)
        if session.upgrading:  # the client is moving to a WebSocket: do not hold it
            body, kind = payload(session, [noop(session)], binary)
            return reply(request, body, 200, kind)
        session.attach(PollTransport(request, session, self.clock, self.bridge.config.poll_timeout, jsonp, binary))
        return NOT_DONE_YET

    def post(self, request: Any, session: Session, jsonp: bool = False, ok: str = "1") -> bytes:
        data = read_body(request, self.bridge.config.max_post)
        if data is None:
            return reply(request, "payload too large", 400)
        try:
            if session.generation is P.EIO3 and data[:1] in (b"\x00", b"\x01"):
                session.binary = True  # EIO3 binary framing (python-engineio 3.x, XHR2)
                packets = [p for p in P.decode_eio3_binary_payload(data) if p is not None]
            else:
                body = data.decode("utf-8")
                if jsonp:
                    form = parse_qs(body, keep_blank_values=True)
                    body = P.jsonp_post_data(form.get("d", [""])[0])
                packets = session.decode(body)
        except UnicodeDecodeError:
            return reply(request, "payload not UTF-8", 400)
        except P.PacketError as e:
            return reply(request, f"bad payload: {e}", 400)
        for packet in packets:
            if session.closed:
                break
            session.receive(packet)
        return reply(request, ok)


class _TransportResource(Resource):
    """What both generations share: CORS preflight, GET and POST to one dispatcher."""

    isLeaf = True

    def __init__(self, bridge: Bridge, clock: IReactorTime, websocket: WebSocketResource,
                 ip_header: Optional[str] = None):
        super().__init__()
        self.bridge, self.websocket, self.ip_header = bridge, websocket, ip_header
        self.polling = Polling(bridge, clock)

    def address(self, request: Any) -> str:
        return client_ip(request, self.ip_header)

    def render_OPTIONS(self, request: Any) -> bytes:
        return preflight(request)

    def render_GET(self, request: Any) -> Any:
        return self._render(request)

    def render_POST(self, request: Any) -> Any:
        return self._render(request)

    def _render(self, request: Any) -> Any:
        raise NotImplementedError


class Sio09Resource(_TransportResource):
    """`/socket.io/1/…`: handshake, websocket, xhr-polling, jsonp-polling."""

    def _render(self, request: Any) -> Any:
        path = [p.decode("utf-8", "replace") for p in request.postpath]
        if path in ([], [""]):
            return self.handshake(request)
        transport, sid = path[0], (path[1] if len(path) > 1 else "")
        if transport == "websocket":
            normalise_origin(request)
            return self.websocket.render(request)
        if transport not in ("xhr-polling", "jsonp-polling"):
            return reply(request, P.error_packet("", P.REASON_TRANSPORT_NOT_SUPPORTED), 400)
        jsonp = arg(request, "i") or "0" if transport == "jsonp-polling" else None
        if jsonp is not None and not jsonp.isdigit():
            return reply(request, "bad i", 400)
        session = self.bridge.sessions.get(sid)
        if session is None or session.generation is not P.SIO09:
            if jsonp is not None:
                return reply(request, P.jsonp_body(jsonp, [NOT_HANDSHAKEN]), 200, b"text/javascript; charset=UTF-8")
            return reply(request, NOT_HANDSHAKEN)
        not_counted(request)
        if request.method == b"POST":
            return self.polling.post(request, session, jsonp is not None)
        if arg(request, "disconnect") is not None:
            session.close()
            return reply(request, str(P.Packet(P.Sio09Type.DISCONNECT)))
        return self.polling.get(request, session, jsonp)

    def handshake(self, request: Any) -> bytes:
        address = self.address(request)
        refusal = self.bridge.refusal(address)
        session = self.bridge.create(Sio09Session, address) if refusal is None else None
        if session is None:
            return reply(request, refusal or "Too many sessions", 429 if refusal == TOO_FAST else 503)
        c = self.bridge.config
        timeout = int(c.session_timeout)
        text = f"{session.sid}:{timeout}:{timeout}:{TRANSPORTS_09}"
        jsonp = arg(request, "jsonp")
        if jsonp is not None and jsonp.isdigit():
            return reply(request, P.jsonp_body(jsonp, [text]), 200, b"text/javascript; charset=UTF-8")
        return reply(request, text)


class EioResource(_TransportResource):
    """`/socket.io/?EIO=3|4&transport=polling|websocket[&sid=…]`."""

    def _render(self, request: Any) -> Any:
        version = arg(request, "EIO")
        if version not in ("3", "4"):
            return self._error(request, 5, "Unsupported protocol version")
        transport = arg(request, "transport")
        sid = arg(request, "sid")
        if transport not in ("websocket", "polling"):
            return self._error(request, 0, "Transport unknown")
        if sid is None:  # a handshake: a new session, unless refused
            if request.method != b"GET":
                return self._error(request, 2, "Bad handshake method")
            refusal = self.bridge.refusal(self.address(request))
            if refusal is not None:
                return self._error(request, 3, refusal, 429 if refusal == TOO_FAST else 503)
        if transport == "websocket":
            normalise_origin(request)
            return self.websocket.render(request)  # the session is created once open
        if sid is None:
            created = self.bridge.create(lambda bridge, sid: EioSession(bridge, sid, int(version)),
                                         self.address(request))
            if created is None:
                return self._error(request, 3, "Too many sessions", 503)
            return reply(request, created.encode(created.opening(["websocket"])))
        session = self.bridge.sessions.get(sid)
        if session is None or session.generation is not P.EIO.get(int(version)):
            return self._error(request, 1, "Session ID unknown")
        not_counted(request)
        if request.method == b"POST":
            return self.polling.post(request, session, ok="ok")
        return self.polling.get(request, session)

    def _error(self, request: Any, code: int, message: str, status: int = 400) -> bytes:
        return reply(request, P.ascii_json({"code": code, "message": message}), status,
                     b"application/json")


class SocketProtocol(WebSocketServerProtocol):
    """A WebSocket of any protocol; the request path says which.

    Packets go out as text frames that autobahn builds (prepareMessage) and
    we write ourselves, all of a delivery in one write (write-through on a
    plain TCP socket): server frames are unmasked and, without
    permessage-deflate, the same bytes for every client, so the frames of a
    shared Outgoing are built once for all its sessions. Anything else
    (compression negotiated, autobahn's own send queue in use) goes through
    sendMessage.
    """

    transport: ITCPConnection  # (Twisted types it Optional[ITransport])
    bridge: Bridge
    ip_header: Optional[str] = None
    address = ""
    session: Optional[Session] = None
    ready = False
    probing = False  # Engine.IO upgrade from polling in progress
    _write: Any = None  # write-through for the frames, set on open

    def onConnect(self, request: Any) -> None:
        self.path = request.path
        self.params = request.params
        forwarded = request.headers.get(self.ip_header.lower()) if self.ip_header else None
        peer = getattr(self.transport.getPeer(), "host", None) or "local"  # as client_ip() has it
        self.address = forwarded.split(",")[0].strip() if forwarded else peer

    def onOpen(self) -> None:
        if getattr(self.transport, "producer", None) is not None:
            self.transport.unregisterProducer()  # the HTTP channel we took the socket from
        self.registerProducer(self, True)
        self._write = writer_for(self.transport)
        no_delay(self.transport)
        self.ready = True
        parts = self.path.strip("/").split("/")
        if len(parts) >= 3 and parts[-3:-1] == ["1", "websocket"]:
            session = self.bridge.sessions.get(parts[-1])
            if session is None or session.generation is not P.SIO09:
                self.sendMessage(NOT_HANDSHAKEN.encode())
                self.sendClose()
                return
            self.session = session
            session.attach(self)
            return
        version = (self.params.get("EIO") or [""])[0]
        sid = (self.params.get("sid") or [None])[0]
        if version not in ("3", "4"):
            self.sendClose()
            return
        if sid is None:
            created = self.bridge.create(lambda bridge, sid: EioSession(bridge, sid, int(version)), self.address)
            if created is None:
                self.sendClose()
                return
            self.session = created
            for packet in created.opening([]):
                self.sendMessage(packet.encode())
            created.attach(self)
            return
        existing = self.bridge.sessions.get(sid)
        if existing is None or existing.generation is not P.EIO.get(int(version)):
            self.sendClose()
            return
        self.session, self.probing = existing, True

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        session = self.session
        if session is None or session.closed or isBinary:
            return
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:  # RFC 6455: fail the connection
            self.dropConnection(abort=False)
            return
        if self.probing:
            if text == f"{P.EioType.PING}probe":
                session.upgrading = True
                self.sendMessage(f"{P.EioType.PONG}probe".encode())
                if isinstance(session.transport, PollTransport):
                    session.transport.close()  # the client pauses polling
            elif text == str(P.EioType.UPGRADE):
                self.probing = session.upgrading = False
                session.attach(self)
            return
        session.receive(text)

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        self.ready = False
        session = self.session
        if session is not None and self.probing:
            session.upgrading = False  # the upgrade failed: polling goes on
        if session is not None and session.transport is self:
            session.detach(self)
            session.close()  # clients open a new session to reconnect

    def sendCloseFrame(self, code: Optional[int] = None, reasonUtf8: Optional[bytes] = None,
                       isReply: bool = False) -> None:
        super().sendCloseFrame(code, reasonUtf8, isReply)
        if code == self.CLOSE_STATUS_CODE_MESSAGE_TOO_BIG and not isReply:
            # Failing the connection (RFC 6455 7.1.7): the close frame goes
            # out, and nothing more the client sends is read. Waiting for its
            # close frame read (and dropped) whatever it kept sending, up to
            # autobahn's 1 s close-handshake timeout: tens of MiB a time.
            self.dropConnection(abort=False)

    # -- Transport (sessions.py) ---------------------------------------------------

    def deliver(self, packets: list[str]) -> None:
        if self._raw():
            self._write(b"".join(self._frame(packet) for packet in packets))
        else:
            self._each(packets)

    def deliver_shared(self, out: Outgoing) -> None:
        if self._raw():
            if out.frames is None:
                out.frames = b"".join(self._frame(packet) for packet in out.packets)
            self._write(out.frames)
        else:
            self._each(out.packets)

    def _raw(self) -> bool:
        """Whether our own frames may go straight to the transport."""
        return (
            self._write is not None
            and self.state == self.STATE_OPEN
            and not self.websocket_extensions_in_use  # e.g. permessage-deflate: frames are autobahn's
            and not self.send_queue
        )

    def _frame(self, packet: str) -> bytes:
        return self.factory.prepareMessage(packet.encode("utf-8"), doNotCompress=True).payloadHybi

    def _each(self, packets: list[str]) -> None:
        if self.state != self.STATE_OPEN:
            return  # closing: nothing more reaches the client
        for packet in packets:
            self.sendMessage(packet.encode("utf-8"))

    def close(self) -> None:
        self.ready = False
        if self.state == self.STATE_OPEN:
            self.sendClose()

    # -- IPushProducer: a full socket buffer keeps packets in the session queue --

    def pauseProducing(self) -> None:
        self.ready = False

    def resumeProducing(self) -> None:
        if self.state == self.STATE_OPEN and not self.probing:
            self.ready = True
            if self.session is not None:
                self.session.flush()

    def stopProducing(self) -> None:
        self.ready = False


class StatusResource(Resource):
    isLeaf = True

    def __init__(self, bridge: Bridge):
        super().__init__()
        self.bridge = bridge

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"application/json; charset=utf-8")
        request.setHeader(b"access-control-allow-origin", b"*")
        request.setHeader(b"cache-control", b"no-store")
        return self.bridge.status_json()


class SocketIOResource(Resource):
    """`/socket.io`: `1/` is Socket.IO 0.9, the rest Engine.IO."""

    def __init__(self, bridge: Bridge, clock: IReactorTime, ip_header: Optional[str] = None):
        super().__init__()
        factory = WebSocketServerFactory()
        factory.protocol = cast("type[SocketProtocol]", type("BridgeSocketProtocol", (SocketProtocol,),
                                                            {"bridge": bridge, "ip_header": ip_header}))
        limit = bridge.config.max_message  # more: closed with 1009 (message too big), not buffered
        # UTF-8 is checked once per whole message by onMessage's decode (C,
        # bounded by the limit), not frame by frame in autobahn's validator:
        # under a flood of big messages that was a tenth of the reactor's time.
        factory.setProtocolOptions(autoFragmentSize=0, maxMessagePayloadSize=limit, maxFramePayloadSize=limit,
                                  failByDrop=False,  # a client over a limit gets a close frame saying why
                                  utf8validateIncoming=False)
        websocket = WebSocketResource(factory)
        self.v09 = Sio09Resource(bridge, clock, websocket, ip_header)
        self.eio = EioResource(bridge, clock, websocket, ip_header)

    def getChild(self, name: bytes, request: Any) -> Resource:
        if name == b"1":
            return self.v09
        request.postpath.insert(0, request.prepath.pop())
        return self.eio

    def render(self, request: Any) -> Any:
        return self.eio.render(request)


class Mount(Resource):
    """Sends some top-level names to our resources and everything else, path
    untouched, to the wrapped site root (the Klein app)."""

    def __init__(self, fallback: Resource, mounted: dict[bytes, Resource]):
        super().__init__()
        self.fallback, self.mounted = fallback, mounted

    def getChildWithDefault(self, name: bytes, request: Any) -> Resource:
        if name in self.mounted:
            return self.mounted[name]
        request.postpath.insert(0, request.prepath.pop())
        return self.fallback

    def render(self, request: Any) -> Any:
        return self.fallback.render(request)


def mount(root: Resource, bridge: Bridge, clock: IReactorTime, ip_header: Optional[str] = None) -> Resource:
    """The site root with `/socket.io/` and `/rcstream_status` added;
    `ip_header` names the trusted proxy's client-address header."""
    return Mount(root, {b"socket.io": SocketIOResource(bridge, clock, ip_header),
                        b"rcstream_status": StatusResource(bridge)})


