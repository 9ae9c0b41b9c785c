"""The read-only IRC server: clients register, join the channels the bot has
written to, and receive one PRIVMSG per recent change.

Each client sees only itself and the bot. Lines to a client go through the
transport while it keeps up, and into a bounded queue while the transport
asks us to pause (push producer); a full queue drops that client's lines.

The feed hands over a hub batch at a time (on_batch): each event is
formatted once, the lines of a channel are joined into one bytes object, and
each member gets that object in one write (write-through when nothing is
queued on its connection), so the cost per client is one send() per channel
per flush rather than a buffered write, two epoll_ctl calls and a send() per
line.

Coalescing with a bounded delay: a flush starts no sooner than twice the
last flush's duration after that one started (so fan-out takes at most about
half of the core, and the send() per client, most of the cost, carries more
lines when there are many clients) and never waits more than
`flush_interval`; with few clients flushes are quick and lines go out at once.

What one client may cost is bounded (issue 12): connections in all and per
address are capped, registration has a deadline, and commands run at most
`flood_rate` a second after a burst of `flood_burst` (a token bucket); the
commands received and not yet run are kept up to `flood_buffer` bytes,
beyond which the client is closed for Excess Flood. A client whose output is
paused is not read and its waiting commands are not run, so its replies
cannot pile up. Lines are cut at 510 bytes on input and 510 characters on
output, as RFC 2813 3.3 and IRCStream do.

Replies follow IRCStream (paravoid/ircstream), the server behind
irc.wikimedia.org: what a client sees of itself is `nick!user@servername`,
numerics and their parameters are IRCStream's; texts such as the welcome
and the MOTD are configuration.
"""
from __future__ import annotations

import collections
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from eventstreams import __version__
from eventstreams.buckets import Buckets
from eventstreams.fastwrite import no_delay, writer_for
from eventstreams.metrics import Sample
from eventstreams.pacing import Pacer
from eventstreams.transports import ITCPConnection

from .config import IRCConfig
from .flood import TokenBucket
from .message import Message
from .numerics import ERR, RPL
from .rcfmt import format_event

log = Logger()

VERSION = f"eventstreams-{__version__}"
CLOSE_TIMEOUT = 10.0  # seconds a closing connection may take to flush
THROTTLED = "Reconnecting too fast, throttled"  # (as ircds say it)
MAX_LINE = 510  # bytes of a client line (without CRLF) that are run; characters of a line sent
LINE_CAP = 512  # bytes kept of a line whose newline has not come yet
NICKLEN = 30
CHANNELLEN = 50
CHANLIMIT = 2000
RESUME_CHUNK = 65536  # bytes of queued lines written at once on resume
ISUPPORT = (
    "CASEMAPPING=rfc1459", f"CHANLIMIT=#:{CHANLIMIT}", "CHANMODES=b,k,l,mtns", f"NICKLEN={NICKLEN}",
    f"CHANNELLEN={CHANNELLEN}", "CHANTYPES=#", "PREFIX=(o)@", "SAFELIST",
)
PRE_REGISTRATION = {"CAP", "PASS", "USER", "NICK", "QUIT", "PING", "PONG"}
_NICK = re.compile(r"[\w\-\[\]'`^{}]{2,%d}" % NICKLEN)  # IRCStream's rule
_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ[]\\~", "abcdefghijklmnopqrstuvwxyz{}|^")


def irc_lower(name: str) -> str:
    """rfc1459 case mapping."""
    return name.translate(_LOWER)


def line(message: Message) -> bytes:
    """The wire form, cut at MAX_LINE characters, with CRLF."""
    return (str(message)[:MAX_LINE] + "\r\n").encode("utf-8")


def display_host(host: str) -> str:
    """An IPv6 address cannot start with ':' in a reply (it would read as a
    trailing parameter): `::1` is shown as `0::1`, as ircds do."""
    return "0" + host if host.startswith(":") else host


class IRCError(Exception):
    """A numeric reply that ends the handling of one command."""

    def __init__(self, numeric: ERR, *params: str):
        super().__init__(numeric, params)
        self.numeric, self.params = numeric, params


@dataclass(eq=False)  # compared and hashed by identity
class Channel:
    name: str
    created: int
    topic: str
    members: set = field(default_factory=set)


@dataclass
class Counters:
    clients_total: int = 0
    lines_sent: int = 0
    lines_dropped: int = 0
    refused: int = 0  # connections over max_clients or max_clients_per_address
    flooded: int = 0  # clients closed for Excess Flood


class IRCServer(Service):
    """Channels, connected clients and the bot; a Service for the keepalive
    timer and for closing every connection on stop."""

    def __init__(self, config: IRCConfig, clock: IReactorTime, wall: Callable[[], float] = time.time):
        self.config = config
        self.clock = clock
        self.wall = wall
        self.created = wall()
        self.channels: dict[str, Channel] = {}  # by irc_lower(name)
        self.clients: set[IRCClient] = set()
        self.per_address: dict[str, int] = {}  # connected clients by address
        self.connects = Buckets(config.connect_rate_per_address, config.connect_burst_per_address)
        self.counters = Counters()
        self.bot = f"{config.botname}!{config.botname}@{config.servername}"
        self.factory = _ClientFactory(self)
        self._keepalive = LoopingCall(self.keepalive)
        self._keepalive.clock = clock
        self._pending: dict[Channel, list[bytes]] = {}  # lines waiting for the next flush
        self._pacer = Pacer(clock, config.flush_interval, self._flush_pending)

    def startService(self) -> None:
        super().startService()
        self._keepalive.start(self.config.ping_interval, now=False)

    def stopService(self) -> Deferred:
        super().stopService()
        if self._keepalive.running:
            self._keepalive.stop()
        self._pacer.cancel()
        self._pending.clear()
        closing = [client.closed for client in self.clients]
        for client in list(self.clients):
            client.close("Server shutting down")
        return DeferredList(closing) if closing else succeed(None)

    # -- the feed ------------------------------------------------------------

    def on_batch(self, events: list[tuple[dict, Any]]) -> None:
        """StreamFeed's batch callback: the lines wait for the next flush,
        which writes each channel's lines joined, once per member."""
        lines = self._pending
        for event, _ in events:
            try:
                formatted = format_event(event)
            except Exception:  # a malformed event costs its own line only
                log.failure("IRC: cannot format an event")
                continue
            if formatted is not None:
                channel, data = self._line(*formatted)
                if channel.members:
                    lines.setdefault(channel, []).append(data)
        if lines:
            self._pacer.request()

    def flush(self) -> None:
        """Write the pending lines now: per channel, one write per member."""
        self._pacer.run()

    def _flush_pending(self) -> None:
        pending, self._pending = self._pending, {}
        for channel, lines in pending.items():
            self._send(channel, lines)

    def broadcast(self, name: str, text: str) -> None:
        """One line now (after any pending ones, in order)."""
        channel, data = self._line(name, text)
        if channel.members:
            self._pending.setdefault(channel, []).append(data)
            self.flush()

    def _line(self, name: str, text: str) -> tuple[Channel, bytes]:
        """The channel (created on first use) and the encoded bot line (empty
        when nobody is in the channel)."""
        channel = self.channels.get(irc_lower(name))
        if channel is None:
            channel = Channel(name, int(self.wall()), f"Stream for topic {name}")
            self.channels[irc_lower(name)] = channel
        if not channel.members:
            return channel, b""
        text = text.replace("\r", "").replace("\n", " ").replace("\x00", "")
        return channel, line(Message("PRIVMSG", (channel.name, text), self.bot, trailing=True))

    def _send(self, channel: Channel, lines: list[bytes]) -> None:
        """The same joined bytes object to every member."""
        joined = lines[0] if len(lines) == 1 else b"".join(lines)
        for client in channel.members:
            client.send_lines(joined, lines)

    # -- keepalive -----------------------------------------------------------

    def keepalive(self) -> None:
        now = self.clock.seconds()
        self.connects.prune(now)
        timeout = self.config.ping_timeout
        for client in list(self.clients):
            idle = now - client.last_pong
            if idle > timeout:
                client.close(f"Ping timeout: {int(idle)} seconds")
            elif client.registered:
                client.send(Message("PING", (self.config.servername,), trailing=True))

    def admit(self, address: Optional[str]) -> Optional[str]:
        """Why a new connection from address is refused, or None; takes one
        of the address's connect_rate_per_address tokens."""
        c = self.config
        if c.max_clients and len(self.clients) >= c.max_clients:
            return "Server is full, try later"
        if address is not None and c.max_clients_per_address \
                and self.per_address.get(address, 0) >= c.max_clients_per_address:
            return "Too many connections from your address"
        if address is not None and not self.connects.take(address, self.clock.seconds()):
            return THROTTLED
        return None

    # -- metrics -------------------------------------------------------------

    def samples(self) -> list[Sample]:
        c = self.counters
        return [
            ("eventstreams_irc_clients", "gauge", "Connected IRC clients.", {}, len(self.clients)),
            ("eventstreams_irc_connections_total", "counter", "IRC connections accepted.", {}, c.clients_total),
            ("eventstreams_irc_channels", "gauge", "IRC channels the bot has written to.", {}, len(self.channels)),
            ("eventstreams_irc_lines_sent_total", "counter", "Bot lines written to IRC clients.", {}, c.lines_sent),
            ("eventstreams_irc_lines_dropped_total", "counter",
             "Bot lines dropped because a client's queue was full.", {}, c.lines_dropped),
            ("eventstreams_irc_clients_dropping", "gauge", "Connected IRC clients that have lost lines.", {},
             sum(1 for client in self.clients if client.dropped)),
            ("eventstreams_irc_refused_total", "counter",
             "IRC connections refused (max_clients, max_clients_per_address, connect_rate_per_address).", {},
             c.refused),
            ("eventstreams_irc_excess_flood_total", "counter", "IRC clients closed for Excess Flood.", {}, c.flooded),
        ]


class _ClientFactory(Factory):
    def __init__(self, server: IRCServer):
        self.server = server

    def buildProtocol(self, addr: Any) -> Optional["IRCClient"]:
        if not self.server.running:
            return None  # stopping: refuse new clients
        client = IRCClient(self.server)
        client.factory = self
        return client


@implementer(IPushProducer)
class IRCClient(Protocol):
    transport: ITCPConnection  # (Twisted types it Optional[ITransport])

    def __init__(self, server: IRCServer):
        self.server = server
        self.config = server.config
        self.partial = b""  # the start of a line whose newline has not come (at most LINE_CAP bytes)
        self.waiting = b""  # complete lines received and not yet run
        self.bucket = TokenBucket(self.config.flood_rate, self.config.flood_burst, server.clock.seconds())
        self.nick: Optional[str] = None
        self.user: Optional[str] = None
        self.realname = ""
        self.address: Optional[str] = None  # the peer's IP address (for the per-address cap)
        self.host = "unknown"  # as shown in replies
        self.signon = 0
        self.registered = False
        self.counted = False  # in server.clients and per_address
        self.channels: set[Channel] = set()
        self.last_pong = 0.0
        self.paused = False
        self.queue: collections.deque[bytes] = collections.deque()
        self.closed: Deferred = Deferred()
        self.closing = False
        self.dropped = 0  # bot lines this client lost to a full queue
        self._abort: Any = None  # the delayed abort of a close that does not finish
        self._deadline: Any = None  # the registration deadline
        self._wakeup: Any = None  # the next run of waiting commands
        self._write: Callable[[bytes], None] = lambda data: None  # bot lines; set on connection

    # -- connection ------------------------------------------------------------

    def connectionMade(self) -> None:
        server, clock = self.server, self.server.clock
        peer = self.transport.getPeer()
        address = getattr(peer, "host", None)
        if address:
            address = address.removeprefix("::ffff:")  # an IPv4 client of an IPv6 listener
            self.host = display_host(address)
            self.address = address
        refused = server.admit(self.address)
        if refused is not None:
            server.counters.refused += 1
            if refused == THROTTLED and self.address is not None:
                # Told after a wait, unread meanwhile: a client that comes
                # back as soon as it is closed comes back at the rate.
                self.transport.pauseProducing()
                wait = min(CLOSE_TIMEOUT, max(1.0, server.connects.wait(self.address, clock.seconds())))
                self._deadline = clock.callLater(wait, self.close, refused)
                return
            self.close(refused)
            return
        self.counted = True
        server.clients.add(self)
        if self.address is not None:
            server.per_address[self.address] = server.per_address.get(self.address, 0) + 1
        server.counters.clients_total += 1
        self.last_pong = clock.seconds()
        self.signon = int(server.wall())
        self._deadline = clock.callLater(self.config.registration_timeout, self.close, "Registration timed out")
        self._write = writer_for(self.transport)
        no_delay(self.transport)
        self.transport.registerProducer(self, True)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        for call in (self._abort, self._deadline, self._wakeup):
            if call is not None and call.active():
                call.cancel()
        if self.counted:
            self.counted = False
            self.server.clients.discard(self)
            if self.address is not None:
                left = self.server.per_address.get(self.address, 1) - 1
                if left > 0:
                    self.server.per_address[self.address] = left
                else:
                    self.server.per_address.pop(self.address, None)
        if self.dropped:
            log.info("IRC: {nick} at {host} left; {dropped} lines were dropped for it",
                     nick=self.me, host=self.host, dropped=self.dropped)
        for channel in self.channels:
            channel.members.discard(self)
        self.channels.clear()
        self.queue.clear()
        self.waiting = b""
        if not self.closed.called:
            self.closed.callback(None)

    def close(self, reason: str) -> None:
        """ERROR :Closing Link: (reason), then close once it is written."""
        if self.closing:
            return
        self.queue.clear()
        self.waiting = b""
        self.send(Message("ERROR", (f"Closing Link: ({reason})",)))
        self.closing = True
        if self.counted:
            self.transport.unregisterProducer()
        if self.paused:  # it does not read: nothing more will reach it
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()
            self._abort = self.server.clock.callLater(CLOSE_TIMEOUT, self.transport.abortConnection)

    # -- output ------------------------------------------------------------------

    @property
    def me(self) -> str:
        return self.nick or "*"

    @property
    def mask(self) -> str:
        """What the client is shown of itself (IRCStream reveals no address)."""
        return f"{self.nick}!{self.user}@{self.config.servername}"

    def send(self, message: Message) -> None:
        if not self.closing:
            self.transport.write(line(message))

    def reply(self, numeric: Any, *params: str, trailing: bool = True) -> None:
        """A numeric to this client; the last parameter is text (after ':')
        unless trailing is False."""
        self.send(Message(str(numeric), (self.me,) + params, self.config.servername, trailing))

    def send_lines(self, joined: bytes, lines: list[bytes]) -> None:
        """Bot lines (joined: the same lines as one bytes object, shared by
        every member): one write now, or queued line by line while paused;
        the lines that do not fit in the queue are dropped."""
        if self.closing:
            return
        if self.paused:
            room = self.config.queue_size - len(self.queue)
            if room < len(lines):
                if not self.dropped:
                    log.warn("IRC: {nick} at {host} does not keep up; dropping its lines", nick=self.me, host=self.host)
                lost = len(lines) - max(room, 0)
                self.dropped += lost
                self.server.counters.lines_dropped += lost
                lines = lines[: max(room, 0)]
            self.queue.extend(lines)
            return
        self._write(joined)
        self.server.counters.lines_sent += len(lines)

    def pauseProducing(self) -> None:
        """The transport's buffer is full: queue bot lines, and stop reading
        this client and running its commands so its replies cannot pile up."""
        self.paused = True
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        """Write the queued lines, a chunk at a time so that a transport that
        pauses again keeps the rest in the (bounded) queue; then the commands
        that were waiting."""
        self.paused = False
        self.transport.resumeProducing()
        queue = self.queue
        while queue and not self.paused and not self.closing:
            chunk, size = [], 0
            while queue and size < RESUME_CHUNK:
                data = queue.popleft()
                chunk.append(data)
                size += len(data)
            self._write(b"".join(chunk))
            self.server.counters.lines_sent += len(chunk)
        self._run_waiting()

    def stopProducing(self) -> None:
        self.queue.clear()

    # -- input -------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        """Keep the complete lines for _run_waiting, and of a line whose
        newline has not come only its first LINE_CAP bytes; more than
        flood_buffer bytes of commands not yet run is Excess Flood. Only C
        calls here, whatever the size of data."""
        if self.closing or not self.counted:
            return
        last = data.rfind(b"\n")
        if last < 0:
            if len(self.partial) < LINE_CAP:
                self.partial = (self.partial + data[:LINE_CAP])[:LINE_CAP]
            return
        first = data.find(b"\n")
        head = (self.partial + data[: min(first, LINE_CAP)])[:LINE_CAP]
        self.waiting = b"".join((self.waiting, head, data[first : last + 1]))
        self.partial = data[last + 1 : last + 1 + LINE_CAP]
        if len(self.waiting) > self.config.flood_buffer:
            self.server.counters.flooded += 1
            self.close("Excess Flood")
            return
        self._run_waiting()

    def _run_waiting(self) -> None:
        """Run waiting commands (each cut at MAX_LINE bytes) while there are
        tokens and the output flows: at most flood_burst in one go."""
        if self._wakeup is not None and self._wakeup.active():
            self._wakeup.cancel()
        self._wakeup = None
        clock, bucket = self.server.clock, self.bucket
        while self.waiting and not self.paused and not self.closing:
            if not bucket.take(clock.seconds()):
                self._wakeup = clock.callLater(bucket.wait(clock.seconds()), self._run_waiting)
                return
            end = self.waiting.find(b"\n")
            raw, self.waiting = self.waiting[:end], self.waiting[end + 1 :]
            try:
                self.line_received(raw.rstrip(b"\r")[:MAX_LINE].decode("utf-8", "replace"))
            except Exception:
                log.failure("IRC: a command from {host} failed", host=self.host)

    def line_received(self, line: str) -> None:
        message = Message.parse(line)
        if message is None:
            return
        handler = getattr(self, "handle_" + message.command, None)
        try:
            if not self.registered and message.command not in PRE_REGISTRATION:
                raise IRCError(ERR.NOTREGISTERED, "You have not registered")
            if handler is None or not message.command.isalpha():
                raise IRCError(ERR.UNKNOWNCOMMAND, message.command, "Unknown command")
            handler(message.params)
        except IRCError as e:
            self.reply(e.numeric, *e.params)

    # -- registration --------------------------------------------------------------

    def handle_CAP(self, params: tuple[str, ...]) -> None:
        pass

    def handle_PASS(self, params: tuple[str, ...]) -> None:
        if self.registered:
            raise IRCError(ERR.ALREADYREGISTRED, "You may not reregister")

    def handle_NICK(self, params: tuple[str, ...]) -> None:
        if not params or not params[0]:
            raise IRCError(ERR.NONICKNAMEGIVEN, "No nickname given")
        nick = params[0]
        if not _NICK.fullmatch(nick):
            raise IRCError(ERR.ERRONEUSNICKNAME, nick, "Erroneous nickname")
        if irc_lower(nick) == irc_lower(self.config.botname):
            raise IRCError(ERR.NICKNAMEINUSE, nick, "Nickname is already in use")
        if self.registered:
            self.send(Message("NICK", (nick,), self.mask))
        self.nick = nick
        self._try_register()

    def handle_USER(self, params: tuple[str, ...]) -> None:
        if len(params) < 4:
            raise IRCError(ERR.NEEDMOREPARAMS, "USER", "Not enough parameters")
        if self.user is not None:
            raise IRCError(ERR.ALREADYREGISTRED, "You may not reregister")
        self.user = params[0]
        self.realname = params[3]
        self._try_register()

    def _try_register(self) -> None:
        if self.registered or self.nick is None or self.user is None:
            return
        self.registered = True
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self.last_pong = self.server.clock.seconds()
        c = self.config
        created = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.server.created))
        self.reply(RPL.WELCOME, f"Welcome to the {c.network} IRC Network {self.nick}!{self.user}@{self.host}")
        self.reply(RPL.YOURHOST, f"Your host is {c.servername}, running version {VERSION}")
        self.reply(RPL.CREATED, f"This server was created {created}")
        self.reply(RPL.MYINFO, c.servername, VERSION, "i", "bklmtns", trailing=False)
        self.reply(RPL.ISUPPORT, f"NETWORK={c.network}", *ISUPPORT, "are available on this server")
        self.reply(RPL.UMODEIS, "+i", trailing=False)
        self.handle_MOTD(())

    def handle_QUIT(self, params: tuple[str, ...]) -> None:
        self.close(f"Quit: {params[0] if params else 'No reason'}")

    def handle_PING(self, params: tuple[str, ...]) -> None:
        if not params or not params[0]:
            raise IRCError(ERR.NOORIGIN, "No origin specified")
        servername = self.config.servername
        destination = params[1] if len(params) > 1 else servername
        self.send(Message("PONG", (destination, params[0]), servername))

    def handle_PONG(self, params: tuple[str, ...]) -> None:
        self.last_pong = self.server.clock.seconds()

    # -- channels ------------------------------------------------------------------

    def _channel(self, name: str) -> Channel:
        channel = self.server.channels.get(irc_lower(name))
        if channel is None:
            raise IRCError(ERR.NOSUCHCHANNEL, name, "No such channel")
        return channel

    def _joined(self, name: str) -> Channel:
        """A channel this client is in; 442 otherwise (even when it does not exist)."""
        channel = self.server.channels.get(irc_lower(name))
        if channel is None or channel not in self.channels:
            raise IRCError(ERR.NOTONCHANNEL, name, "You're not on that channel")
        return channel

    def _each(self, names: str, action: Callable[[str], None]) -> None:
        """An action per name of a comma list; an IRCError answers one name."""
        for name in names.split(","):
            if not name:
                continue
            try:
                action(name)
            except IRCError as e:
                self.reply(e.numeric, *e.params)

    def _need(self, params: tuple[str, ...], n: int, command: str) -> None:
        if len(params) < n or not params[0]:
            raise IRCError(ERR.NEEDMOREPARAMS, command, "Not enough parameters")

    def handle_JOIN(self, params: tuple[str, ...]) -> None:
        self._need(params, 1, "JOIN")
        self._each(params[0], self._join)

    def _join(self, name: str) -> None:
        channel = self._channel(name)
        if channel in self.channels:
            return
        if len(self.channels) >= CHANLIMIT:
            raise IRCError(ERR.TOOMANYCHANNELS, name, "You have joined too many channels")
        self.channels.add(channel)
        channel.members.add(self)
        self.send(Message("JOIN", (channel.name,), self.mask))
        self._topic(channel)
        self._names(channel)

    def _topic(self, channel: Channel) -> None:
        self.reply(RPL.TOPIC, channel.name, channel.topic)
        self.reply(RPL.TOPICWHOTIME, channel.name, self.server.bot, str(channel.created), trailing=False)

    def _names(self, channel: Channel) -> None:
        names = ([self.nick] if channel in self.channels and self.nick is not None else []) + ["@" + self.config.botname]
        self.reply(RPL.NAMREPLY, "=", channel.name, " ".join(names))
        self.reply(RPL.ENDOFNAMES, channel.name, "End of /NAMES list")

    def handle_PART(self, params: tuple[str, ...]) -> None:
        self._need(params, 1, "PART")
        self._each(params[0], self._part)

    def _part(self, name: str) -> None:
        channel = self._joined(name)
        self.send(Message("PART", (channel.name,), self.mask))
        self.channels.discard(channel)
        channel.members.discard(self)

    def handle_LIST(self, params: tuple[str, ...]) -> None:
        """No 321 (IRCStream sends none); the count includes the requester
        when it is in the channel."""
        if params and params[0]:
            wanted = {irc_lower(n) for n in params[0].split(",")}
            channels = [c for key, c in self.server.channels.items() if key in wanted]
        else:
            channels = list(self.server.channels.values())
        for channel in sorted(channels, key=lambda c: c.name):
            self.reply(RPL.LIST, channel.name, "2" if channel in self.channels else "1", channel.topic)
        self.reply(RPL.LISTEND, "End of /LIST")

    def handle_NAMES(self, params: tuple[str, ...]) -> None:
        if not params or not params[0]:
            self.reply(RPL.ENDOFNAMES, "*", "End of /NAMES list")
            return
        for name in params[0].split(","):
            channel = self.server.channels.get(irc_lower(name))
            if channel is None:
                self.reply(RPL.ENDOFNAMES, name, "End of /NAMES list")
            else:
                self._names(channel)

    def handle_TOPIC(self, params: tuple[str, ...]) -> None:
        self._need(params, 1, "TOPIC")
        channel = self._joined(params[0])
        if len(params) > 1:
            raise IRCError(ERR.CHANOPRIVSNEEDED, channel.name, "You're not a channel operator")
        self._topic(channel)

    def handle_MODE(self, params: tuple[str, ...]) -> None:
        self._need(params, 1, "MODE")
        target = params[0]
        modes = params[1] if len(params) > 1 else None
        if target.startswith("#"):
            channel = self._channel(target)
            if modes is None:
                self.reply(RPL.CHANNELMODEIS, channel.name, "+mts", trailing=False)
            elif modes.lstrip("+") == "b":
                self.reply(RPL.ENDOFBANLIST, channel.name, "End of channel ban list")
            else:
                raise IRCError(ERR.CHANOPRIVSNEEDED, channel.name, "You're not a channel operator")
        elif modes:
            pass  # user modes cannot be changed; ignored (clients send one at start-up)
        elif irc_lower(target) == irc_lower(self.nick or ""):
            self.reply(RPL.UMODEIS, "+i", trailing=False)
        elif irc_lower(target) == irc_lower(self.config.botname):
            raise IRCError(ERR.USERSDONTMATCH, "Can't change mode for other users")
        else:
            raise IRCError(ERR.NOSUCHNICK, target, "No such nick/channel")

    # -- users ---------------------------------------------------------------------

    def _known(self, nick: str) -> Optional[tuple[str, str, str, str, int]]:
        """(nick, user, host, realname, signon) of this client or the bot."""
        if irc_lower(nick) == irc_lower(self.nick or ""):
            return self.nick or "", self.user or "", self.host, self.realname, self.signon
        if irc_lower(nick) == irc_lower(self.config.botname):
            bot = self.config.botname
            return bot, bot, self.config.servername, bot, int(self.server.created)
        return None

    def handle_WHO(self, params: tuple[str, ...]) -> None:
        self.reply(RPL.ENDOFWHO, params[0] if params else "*", "End of /WHO list.")

    def handle_WHOIS(self, params: tuple[str, ...]) -> None:
        if not params or not params[-1]:
            raise IRCError(ERR.NONICKNAMEGIVEN, "No nickname given")
        nicks = params[-1]  # WHOIS [server] nick
        nick = nicks.split(",")[0]  # the first of a list only, as many networks do
        known = self._known(nick)
        if known is None:
            self.reply(ERR.NOSUCHNICK, nick, "No such nick/channel")
        else:
            name, user, host, realname, signon = known
            self.reply(RPL.WHOISUSER, name, user, host, "*", realname)
            self.reply(RPL.WHOISSERVER, name, self.config.servername, self.config.network)
            self.reply(RPL.WHOISIDLE, name, "0", str(signon), "seconds idle, signon time")
        self.reply(RPL.ENDOFWHOIS, nicks, "End of /WHOIS list")

    def handle_WHOWAS(self, params: tuple[str, ...]) -> None:
        if not params or not params[0]:
            raise IRCError(ERR.NONICKNAMEGIVEN, "No nickname given")
        self.reply(ERR.WASNOSUCHNICK, params[0], "There was no such nickname")
        self.reply(RPL.ENDOFWHOWAS, params[0], "End of WHOWAS")

    def handle_USERHOST(self, params: tuple[str, ...]) -> None:
        self._need(params, 1, "USERHOST")
        replies = []
        for nick in params[:5]:
            known = self._known(nick)
            if known is not None:
                name, user, host, _, _ = known
                op = "*" if name == self.config.botname else ""
                replies.append(f"{name}{op}=+{user}@{host}")
        self.reply(RPL.USERHOST, " ".join(replies))

    def handle_MOTD(self, params: tuple[str, ...]) -> None:
        motd = self.config.motd
        if not motd:
            raise IRCError(ERR.NOMOTD, "MOTD File is missing")
        self.reply(RPL.MOTDSTART, f"- {self.config.servername} Message of the day - ")
        for text in motd:
            self.reply(RPL.MOTD, f"- {text}")
        self.reply(RPL.ENDOFMOTD, "End of /MOTD command.")

    def handle_PRIVMSG(self, params: tuple[str, ...]) -> None:
        if len(params) < 2:
            raise IRCError(ERR.NEEDMOREPARAMS, "PRIVMSG", "Not enough parameters")
        for target in params[0].split(","):
            if target.startswith("#"):
                channel = self.server.channels.get(irc_lower(target))
                if channel is None:
                    self.reply(ERR.NOSUCHNICK, target, "No such nick/channel")
                else:
                    self.reply(ERR.CANNOTSENDTOCHAN, channel.name, "Cannot send to channel")
            elif irc_lower(target) == irc_lower(self.nick or ""):
                self.send(Message("PRIVMSG", (self.nick or "", params[1]), self.mask))  # echoed
            elif irc_lower(target) != irc_lower(self.config.botname):  # the bot drops what it gets
                self.reply(ERR.NOSUCHNICK, target, "No such nick/channel")

    def handle_NOTICE(self, params: tuple[str, ...]) -> None:
        """Never answered with an error (RFC 2812 3.3.2), but echoed to oneself."""
        if len(params) < 2:
            raise IRCError(ERR.NEEDMOREPARAMS, "NOTICE", "Not enough parameters")
        if irc_lower(self.nick or "") in {irc_lower(t) for t in params[0].split(",")}:
            self.send(Message("NOTICE", (self.nick or "", params[1]), self.mask))
