"""Sessions of the `/rc` namespace, whatever the protocol, and the fan-out of
changes to them.

A session owns a bounded queue of encoded packets; a transport (a WebSocket,
or one held polling request at a time) takes them. A session that falls more
than `max_queue` packets behind is closed: the client reconnects and
subscribes again. Protocol differences live in the subclasses Sio09Session
(Socket.IO 0.9) and EioSession (Engine.IO 3/4), and in the session's
`generation` (packets.SIO09, EIO3, EIO4): its framing and event encoding.

The feed hands over a hub batch at a time (Bridge.on_batch): each change is
encoded once per protocol, and the sessions of one protocol and one
subscription list share one Outgoing (the batch's packets for them); a
WebSocket turns it into frames once and every such session's socket gets
the same bytes in one write.

Coalescing with a bounded delay: a flush starts no sooner than twice the
last flush's duration after that one started (so fan-out takes at most about
half of the core, and a send() per session, most of the cost, carries more
changes when there are many sessions) and never waits more than
`flush_interval`; with few sessions flushes are quick and changes go out at
once. At 2,000 WebSocket sessions and 30 changes/s, 0.1 s costs about half
a core against 3/4 with 0 (each hub batch at once), for ~30 ms more at p50.
"""
from __future__ import annotations

import json
import re
import secrets
from collections import OrderedDict, deque
from fnmatch import translate
from itertools import islice
from typing import Any, Callable, Iterator, Optional, Protocol, TypeVar

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from eventstreams.buckets import Buckets
from eventstreams.metrics import Sample
from eventstreams.pacing import Pacer

from . import packets as P
from .config import RCStreamConfig

log = Logger()

NAMESPACE = "/rc"
TOO_MANY = "Too many subscriptions"
TOO_LONG = "Subscription pattern too long"
TICK_SLICE = 500  # sessions ticked (heartbeat, expiry) per reactor turn
# refusals of a new session (Bridge.refusal)
FULL = "Too many sessions"
FULL_FOR_ADDRESS = "Too many sessions from this address"
TOO_FAST = "Too many handshakes"
PATTERNS_TOO_FAST = "Too many new subscription patterns, try again in a second"
COMPILED_CACHE = 4096  # compiled patterns kept for reuse by any session


class Outgoing:
    """The packets of one batch for every session with the same protocol and
    subscriptions; `frames` are their WebSocket frames joined, built by the
    first WebSocket that sends them and reused by the others."""

    __slots__ = ("packets", "frames")

    def __init__(self, packets: list[str]):
        self.packets = packets
        self.frames: Optional[bytes] = None


class Transport(Protocol):
    ready: bool  # can take packets now

    def deliver(self, packets: list[str]) -> None: ...

    def deliver_shared(self, out: Outgoing) -> None:
        """Like deliver(out.packets); the same `out` goes to many transports."""

    def close(self) -> None: ...


class Session:
    generation: P.Generation  # the protocol this session speaks

    def __init__(self, bridge: "Bridge", sid: str):
        self.bridge = bridge
        self.config = bridge.config
        self.sid = sid
        self.address = ""  # the client's, set by Bridge.create
        self.queue: deque[str] = deque()
        self.transport: Optional[Transport] = None
        self.subscriptions: list[str] = []
        self.matchers: dict[str, re.Pattern] = {}  # pattern → compiled, for each subscription
        self.rc_connected = False
        self.closed = False
        self.upgrading = False  # Engine.IO: a WebSocket probe is under way
        self.binary = False  # Engine.IO 3: the client posts binary payloads, so it reads them too
        now = bridge.clock.seconds()
        self.last_seen = now
        self.last_beat = now

    # -- output -------------------------------------------------------------------

    def send(self, packet: str) -> None:
        if self.closed:
            return
        self.queue.append(packet)
        if not self._too_slow():
            self.flush()

    def send_shared(self, out: Outgoing) -> None:
        """Packets shared with other sessions: straight to a ready transport
        that has nothing of ours waiting (a WebSocket writes the shared
        frames), else queued like send()."""
        if self.closed:
            return
        transport = self.transport
        if transport is not None and transport.ready and not self.queue:
            shared = getattr(transport, "deliver_shared", None)
            if shared is not None:
                shared(out)
            else:
                transport.deliver(list(out.packets))
            return
        self.queue.extend(out.packets)
        if not self._too_slow():
            self.flush()

    def _too_slow(self) -> bool:
        """Close the session when its queue is over max_queue."""
        if len(self.queue) <= self.config.max_queue:
            return False
        self.bridge.counters["slow"] += 1
        log.info("rcstream: session {sid} closed: more than {n} packets queued", sid=self.sid,
                 n=self.config.max_queue)
        self.close()
        return True

    def flush(self) -> None:
        transport = self.transport
        if transport is not None and transport.ready and self.queue:
            batch = list(self.queue)
            self.queue.clear()
            transport.deliver(batch)

    def attach(self, transport: Transport) -> None:
        """A transport takes the queued and future packets (a previous one is let go)."""
        old, self.transport = self.transport, transport
        if old is not None and old is not transport:
            old.close()
        self.touch()
        self.flush()

    def detach(self, transport: Transport) -> None:
        if self.transport is transport:
            self.transport = None

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.bridge.forget(self)
        transport, self.transport = self.transport, None
        self.queue.clear()
        if transport is not None:
            transport.close()

    # -- input --------------------------------------------------------------------

    def touch(self) -> None:
        self.last_seen = self.bridge.clock.seconds()

    def receive(self, text: str) -> None:
        """One packet from the client."""
        raise NotImplementedError

    def encode(self, packets: list[str]) -> str:
        """A polling body of packets, framed as this session's protocol frames them."""
        return self.generation.encode(packets)

    def decode(self, body: str) -> list[str]:
        """The packets of a polling body (PacketError when it is not framed right)."""
        return self.generation.decode(body)

    def tick(self, now: float) -> None:
        if self.closed:
            return
        if now - self.last_seen > self.config.session_timeout:
            log.info("rcstream: session {sid} expired", sid=self.sid)
            self.close()

    # -- the /rc namespace --------------------------------------------------------

    def rc_event(self, name: str, args: list) -> Optional[str]:
        """Apply subscribe/unsubscribe; returns an error text for the client."""
        if name not in ("subscribe", "unsubscribe"):
            return None  # other events are ignored, as RCStream did
        patterns = args[0] if args else None
        if isinstance(patterns, str):
            patterns = [patterns]
        if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
            return "Invalid subscription"
        if name == "unsubscribe":
            gone = set(patterns)
            self.subscriptions = [p for p in self.subscriptions if p not in gone]
            self.matchers = {p: self.matchers[p] for p in self.subscriptions}
            return None
        added = [p for p in dict.fromkeys(patterns) if p not in self.matchers]
        if len(self.subscriptions) + len(added) > self.config.max_subscriptions:
            return TOO_MANY
        if any(len(p) > self.config.max_pattern_length for p in added):
            return TOO_LONG
        matchers = [self.bridge.matcher(p, self.address) for p in added]
        if None in matchers:
            return PATTERNS_TOO_FAST
        self.matchers.update(zip(added, matchers))  # type: ignore[arg-type]
        self.subscriptions += added
        return None

    def rc_disconnect(self) -> None:
        self.rc_connected = False
        self.subscriptions = []
        self.matchers = {}


AnySession = TypeVar("AnySession", bound=Session)


class Sio09Session(Session):
    """Socket.IO 0.9: `1::` on open, `2::` heartbeats, `5::/rc:{…}` events."""

    generation = P.SIO09

    def __init__(self, bridge: "Bridge", sid: str):
        super().__init__(bridge, sid)
        self.queue.append(str(P.Packet(P.Sio09Type.CONNECT)))

    def tick(self, now: float) -> None:
        if now - self.last_beat >= self.config.heartbeat:
            self.last_beat = now
            self.send(str(P.Packet(P.Sio09Type.HEARTBEAT)))
        super().tick(now)

    def receive(self, text: str) -> None:
        self.touch()
        try:
            packet = P.Packet.parse(text)
        except P.PacketError:
            self.send(P.error_packet())
            return
        handler = getattr(self, f"handle_{packet.type.name.lower()}", None)
        if handler is not None:
            handler(packet)

    def _known(self, packet: P.Packet) -> bool:
        if packet.namespace in ("", NAMESPACE):
            return True
        self.send(P.error_packet(packet.endpoint, P.REASON_UNAUTHORIZED))
        return False

    def handle_connect(self, packet: P.Packet) -> None:
        if packet.namespace == "" or not self._known(packet):
            return
        if not self.rc_connected:
            self.rc_connected = True
            self.send(str(P.Packet(P.Sio09Type.CONNECT, "", NAMESPACE)))

    def handle_disconnect(self, packet: P.Packet) -> None:
        if packet.namespace == NAMESPACE:
            self.rc_disconnect()
        elif packet.namespace == "":
            self.close()

    def handle_event(self, packet: P.Packet) -> None:
        if not self._known(packet):
            return
        try:
            name, args = packet.event(self.config.max_json_depth)
        except P.PacketError:
            self.send(P.error_packet(packet.endpoint))
            return
        error = self.rc_event(name, args) if packet.namespace == NAMESPACE else None
        if error is not None:
            self.send(P.event_packet(NAMESPACE, "error", P.ascii_json(["subscribe_error", error])))
        if packet.id:
            self.send(P.ack_packet(packet.endpoint, packet.id, [None]))


class EioSession(Session):
    """Engine.IO 3 (Socket.IO v4 packets, the client pings) or Engine.IO 4
    (Socket.IO v5 packets, the server pings)."""

    def __init__(self, bridge: "Bridge", sid: str, version: int):
        super().__init__(bridge, sid)
        self.generation = P.EIO[version]
        self.version = version

    def open_packet(self, upgrades: list[str]) -> str:
        c = self.config
        return f"{P.EioType.OPEN}" + P.ascii_json({
            "sid": self.sid,
            "upgrades": upgrades,
            "pingInterval": int(c.heartbeat * 1000),
            "pingTimeout": int((c.session_timeout - c.heartbeat) * 1000),
            "maxPayload": c.max_post,
        })

    def opening(self, upgrades: list[str]) -> list[str]:
        """What a new session sends first (EIO3 servers also connect `/`)."""
        first = [self.open_packet(upgrades)]
        if self.version == 3:
            first.append(f"{P.EioType.MESSAGE}{P.SioType.CONNECT}")
        return first

    def tick(self, now: float) -> None:
        if self.version == 4 and now - self.last_beat >= self.config.heartbeat:
            self.last_beat = now
            self.send(str(P.EioType.PING))
        super().tick(now)

    def receive(self, text: str) -> None:
        self.touch()
        kind = text[:1]
        if kind == str(P.EioType.PING):
            self.send(f"{P.EioType.PONG}{text[1:]}")
        elif kind == str(P.EioType.MESSAGE):
            self.message(text[1:])
        elif kind == str(P.EioType.CLOSE):
            self.close()
        # PONG, UPGRADE, NOOP: only the touch; anything else is ignored

    def _sio(self, packet: P.SioPacket) -> None:
        self.send(f"{P.EioType.MESSAGE}{packet}")

    def message(self, text: str) -> None:
        try:
            packet = P.SioPacket.parse(text, self.config.max_json_depth)
        except P.PacketError as e:
            self._sio(P.SioPacket(P.SioType.CONNECT_ERROR, e.namespace, None, self._error(str(e))))
            return
        if packet.namespace not in ("/", NAMESPACE):
            self._sio(P.SioPacket(P.SioType.CONNECT_ERROR, packet.namespace, None, self._error("Invalid namespace")))
            return
        if packet.type == P.SioType.CONNECT:
            if packet.namespace == NAMESPACE:
                self.rc_connected = True
            data = {"sid": self.sid} if self.version == 4 else None
            self._sio(P.SioPacket(P.SioType.CONNECT, packet.namespace, None, data))
        elif packet.type == P.SioType.DISCONNECT:
            if packet.namespace == NAMESPACE:
                self.rc_disconnect()
        elif packet.type == P.SioType.EVENT:
            try:
                name, args = packet.event()
            except P.PacketError:
                return
            error = self.rc_event(name, args) if packet.namespace == NAMESPACE else None
            if error is not None:
                self.send(P.eio_event(NAMESPACE, "error", P.ascii_json(["subscribe_error", error])))
            if packet.id is not None:
                self._sio(P.SioPacket(P.SioType.ACK, packet.namespace, packet.id, [None]))

    def _error(self, message: str) -> Any:
        return {"message": message} if self.version == 4 else message


class Bridge(Service):
    """All sessions; fed a hub batch at a time by a StreamFeed (on_batch)."""

    def __init__(self, config: RCStreamConfig, clock: IReactorTime):
        self.config = config
        self.clock = clock
        self.sessions: dict[str, Session] = {}
        self.per_address: dict[str, int] = {}  # open sessions by client address
        self.handshakes = Buckets(config.max_handshakes_per_second)
        self.new_patterns = Buckets(config.max_patterns_per_second)
        self.compiled: OrderedDict[str, re.Pattern] = OrderedDict()  # the last COMPILED_CACHE patterns
        self.counters = {"sessions": 0, "changes": 0, "slow": 0, "refused": 0}
        self._loop: Optional[LoopingCall] = None
        self._ticking: Optional[Iterator[Session]] = None  # the sessions a tick pass has left
        self._pending: list[tuple[str, dict]] = []  # (server name, event) of the changes to flush
        self._pacer = Pacer(clock, config.flush_interval, self._flush_pending)

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self.tick)
        self._loop.clock = self.clock
        self._loop.start(min(1.0, self.config.heartbeat / 2), now=False)

    def stopService(self) -> Any:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._pacer.cancel()
        self._pending = []
        self._ticking = None
        for session in list(self.sessions.values()):
            session.close()

    def refusal(self, address: str) -> Optional[str]:
        """Why a handshake from address gets no session (None: it may have
        one); takes one of the address's max_handshakes_per_second tokens."""
        reason = None if self.handshakes.take(address, self.clock.seconds()) else TOO_FAST
        reason = reason or self._full(address)
        if reason is not None:
            self.counters["refused"] += 1
        return reason

    def _full(self, address: str) -> Optional[str]:
        c = self.config
        if c.max_sessions and len(self.sessions) >= c.max_sessions:
            return FULL
        if c.max_sessions_per_address and self.per_address.get(address, 0) >= c.max_sessions_per_address:
            return FULL_FOR_ADDRESS
        return None

    def create(self, factory: Callable[["Bridge", str], AnySession], address: str = "") -> Optional[AnySession]:
        """A new session, or None when the session caps are reached (the
        handshake was let through by refusal() first)."""
        if self._full(address) is not None:
            return None
        sid = secrets.token_hex(10)
        session = factory(self, sid)
        session.address = address
        self.sessions[sid] = session
        self.per_address[address] = self.per_address.get(address, 0) + 1
        self.counters["sessions"] += 1
        return session

    def matcher(self, pattern: str, address: str) -> Optional[re.Pattern]:
        """The compiled pattern (fnmatch's semantics), or None when address
        has compiled max_patterns_per_second new ones: a compile costs up
        to a few ms, so each address gets a bounded share of the reactor."""
        compiled = self.compiled.get(pattern)
        if compiled is not None:
            self.compiled.move_to_end(pattern)
            return compiled
        if not self.new_patterns.take(address, self.clock.seconds()):
            return None
        compiled = self.compiled[pattern] = re.compile(translate(pattern))
        if len(self.compiled) > COMPILED_CACHE:
            self.compiled.popitem(last=False)
        return compiled

    def forget(self, session: Session) -> None:
        """A closed session leaves the tables."""
        if self.sessions.pop(session.sid, None) is None:
            return
        left = self.per_address.get(session.address, 1) - 1
        if left > 0:
            self.per_address[session.address] = left
        else:
            self.per_address.pop(session.address, None)

    def tick(self) -> None:
        """Heartbeats and expiry for every session, TICK_SLICE sessions per
        reactor turn (a mass expiry never stalls the others)."""
        if self._ticking is not None:
            return  # the last pass has not finished
        now = self.clock.seconds()
        self.handshakes.prune(now)
        self.new_patterns.prune(now)
        self._ticking = iter(list(self.sessions.values()))
        self._tick_slice()

    def _tick_slice(self) -> None:
        if self._ticking is None:
            return
        now, ticked = self.clock.seconds(), 0
        for session in islice(self._ticking, TICK_SLICE):
            session.tick(now)
            ticked += 1
        if ticked < TICK_SLICE:
            self._ticking = None
        else:
            self.clock.callLater(0, self._tick_slice)

    def on_batch(self, events: list[tuple[dict, Any]]) -> None:
        """StreamFeed's batch callback: the changes wait for the next flush."""
        changes = self._pending
        for event, _ in events:
            raw_meta = event.get("meta")
            meta: dict = raw_meta if isinstance(raw_meta, dict) else {}
            domain = meta.get("domain")
            if domain == "canary":
                continue
            server_name = event.get("server_name")
            if not isinstance(server_name, str):
                server_name = domain if isinstance(domain, str) else ""
            changes.append((server_name, event))
        if changes:
            self._pacer.request()

    def flush(self) -> None:
        """Send the pending changes now."""
        self._pacer.run()

    def _flush_pending(self) -> None:
        """Each pending change encoded once per protocol; sessions with the
        same protocol and subscriptions get the same Outgoing."""
        changes, self._pending = self._pending, []
        if not changes:
            return
        batch = _BatchPackets(changes)
        groups: dict[tuple, Optional[Outgoing]] = {}
        for session in list(self.sessions.values()):
            if not session.subscriptions:
                continue
            key = (session.generation, *session.subscriptions)
            if key in groups:
                out = groups[key]
            else:
                out = groups[key] = batch.outgoing(session.generation, session.matchers)
            if out is not None:
                session.send_shared(out)
                self.counters["changes"] += len(out.packets)

    def status(self) -> dict:
        return {
            "connected_clients": len(self.sessions),
            "queue_size": sum(len(s.queue) for s in self.sessions.values()),
        }

    def status_json(self) -> bytes:
        return json.dumps(self.status(), separators=(",", ":")).encode()

    def samples(self) -> list[Sample]:
        status = self.status()
        return [
            ("eventstreams_rcstream_sessions", "gauge", "Open RCStream (Socket.IO) sessions.", {},
             status["connected_clients"]),
            ("eventstreams_rcstream_queued_packets", "gauge", "Packets waiting in RCStream session queues.", {},
             status["queue_size"]),
            ("eventstreams_rcstream_sessions_total", "counter", "RCStream sessions opened.", {},
             self.counters["sessions"]),
            ("eventstreams_rcstream_changes_total", "counter", "Changes queued to RCStream sessions.", {},
             self.counters["changes"]),
            ("eventstreams_rcstream_slow_closed_total", "counter", "RCStream sessions closed for falling behind.",
             {}, self.counters["slow"]),
            ("eventstreams_rcstream_refused_total", "counter",
             "RCStream handshakes refused (session caps, handshake rate).", {}, self.counters["refused"]),
        ]


class _BatchPackets:
    """The packets of one batch of changes, each matched against a pattern
    and encoded for a protocol at most once."""

    def __init__(self, changes: list[tuple[str, dict]]):
        self.changes = changes
        self.matched: dict[str, list[bool]] = {}
        self.encoded: dict[tuple[P.Generation, int], str] = {}
        self.args: dict[int, str] = {}

    def outgoing(self, generation: P.Generation, matchers: dict[str, re.Pattern]) -> Optional[Outgoing]:
        """The packets for a session of this protocol and these patterns
        (compiled), or None when no change matches."""
        hits: Optional[list[bool]] = None
        for pattern, matcher in matchers.items():
            matched = self.matched.get(pattern)
            if matched is None:
                matched = self.matched[pattern] = [matcher.match(name) is not None for name, _ in self.changes]
            hits = matched if hits is None else [a or b for a, b in zip(hits, matched)]
        if not hits or not any(hits):
            return None
        return Outgoing([self.packet(generation, i) for i, hit in enumerate(hits) if hit])

    def packet(self, generation: P.Generation, i: int) -> str:
        packet = self.encoded.get((generation, i))
        if packet is None:
            args = self.args.get(i)
            if args is None:
                event = self.changes[i][1]
                change = {k: v for k, v in event.items() if k not in ("$schema", "meta")}
                args = self.args[i] = "[" + P.ascii_json(change) + "]"
            packet = self.encoded[(generation, i)] = generation.event(NAMESPACE, "change", args)
        return packet
