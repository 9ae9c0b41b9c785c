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
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from eventstreams import __version__
from eventstreams.fastwrite import no_delay, writer_for
from eventstreams.pacing import Pacer

from .config import IRCConfig
from .message import Message
from .numerics import ERR, RPL
from .rcfmt import format_event

log = Logger()

VERSION = f"eventstreams-{__version__}"
CLOSE_TIMEOUT = 10.0  # seconds a closing connection may take to flush
MAX_INPUT = 512  # bytes of one client line, CRLF included
NICKLEN = 30
CHANNELLEN = 50
CHANLIMIT = 2000
RESUME_CHUNK = 65536  # bytes of queued lines written at once on resume
ISUPPORT = (
    "CASEMAPPING=rfc1459", f"CHANLIMIT=#:{CHANLIMIT}", "CHANMODES=b,k,l,mtns", f"NICKLEN={NICKLEN}",
    f"CHANNELLEN={CHANNELLEN}", "CHANTYPES=#", "PREFIX=(o)@", "SAFELIST",
)
PRE_REGISTRATION = {"CAP", "PASS", "USER", "NICK", "QUIT", "PING", "PONG"}
_NICK = re.compile(r"[A-Za-z\[\]\\`_^{|}][A-Za-z0-9\[\]\\`_^{|}-]{0,%d}" % (NICKLEN - 1))
_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ[]\\~", "abcdefghijklmnopqrstuvwxyz{}|^")


def irc_lower(name: str) -> str:
    """rfc1459 case mapping."""
    return name.translate(_LOWER)


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

    def on_event(self, event: dict, entry: Any = None) -> None:
        """StreamFeed's callback: one bot line per wanted event."""
        formatted = format_event(event)
        if formatted is not None:
            self.broadcast(*formatted)

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
            channel = Channel(name, int(self.wall()), f"Stream for topic {name[1:]}")
            self.channels[irc_lower(name)] = channel
        if not channel.members:
            return channel, b""
        text = text.replace("\r", "").replace("\n", " ").replace("\x00", "")
        data = (str(Message("PRIVMSG", (channel.name, text), self.bot, trailing=True)) + "\r\n").encode("utf-8")
        return channel, data

    def _send(self, channel: Channel, lines: list[bytes]) -> None:
        """The same joined bytes object to every member."""
        joined = lines[0] if len(lines) == 1 else b"".join(lines)
        for client in channel.members:
            client.send_lines(joined, lines)

    # -- keepalive -----------------------------------------------------------

    def keepalive(self) -> None:
        now = self.clock.seconds()
        timeout = self.config.ping_timeout
        for client in list(self.clients):
            idle = now - client.last_pong
            if idle > timeout:
                client.close(f"Ping timeout: {int(idle)} seconds")
            elif client.registered:
                client.send(Message("PING", (self.config.servername,), trailing=True))

    # -- metrics -------------------------------------------------------------

    def samples(self) -> list[tuple[str, str, str, dict[str, str], float]]:
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
    def __init__(self, server: IRCServer):
        self.server = server
        self.config = server.config
        self.buffer = b""
        self.discarding = False  # inside an over-long line
        self.nick: Optional[str] = None
        self.user: Optional[str] = None
        self.realname = ""
        self.host = "unknown"
        self.registered = False
        self.channels: set[Channel] = set()
        self.last_pong = 0.0
        self.paused = False
        self.queue: collections.deque[bytes] = collections.deque()
        self.closed: Deferred = Deferred()
        self.closing = False
        self.dropped = 0  # bot lines this client lost to a full queue
        self._abort: Any = None  # the delayed abort of a close that does not finish
        self._write: Callable[[bytes], None] = lambda data: None  # bot lines; set on connection

    # -- connection ------------------------------------------------------------

    def connectionMade(self) -> None:
        self.server.clients.add(self)
        self.server.counters.clients_total += 1
        self.last_pong = self.server.clock.seconds()
        peer = self.transport.getPeer()
        self.host = getattr(peer, "host", None) or "unknown"
        self._write = writer_for(self.transport)
        no_delay(self.transport)
        self.transport.registerProducer(self, True)

    def connectionLost(self, reason: Any) -> None:
        if self._abort is not None and self._abort.active():
            self._abort.cancel()
        self.server.clients.discard(self)
        if self.dropped:
            log.info("IRC: {nick} at {host} left; {dropped} lines were dropped for it",
                     nick=self.me, host=self.host, dropped=self.dropped)
        for channel in self.channels:
            channel.members.discard(self)
        self.channels.clear()
        self.queue.clear()
        if not self.closed.called:
            self.closed.callback(None)

    def close(self, reason: str) -> None:
        """ERROR :Closing Link, then close once it is written."""
        if self.closing:
            return
        self.queue.clear()
        self.send(Message("ERROR", (f"Closing Link: {self.host} ({reason})",)))
        self.closing = True
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
        return f"{self.nick}!{self.user}@{self.host}"

    def send(self, message: Message) -> None:
        if not self.closing:
            self.transport.write((str(message) + "\r\n").encode("utf-8"))

    def reply(self, numeric: Any, *params: str, trailing: bool = True) -> None:
        """A numeric to this client; the last parameter is text (after ':')
        unless trailing is False."""
        self.send(Message(str(numeric), (self.me,) + params, self.config.servername, trailing))

    def send_line(self, data: bytes) -> None:
        """A bot line: written now, queued while paused, dropped when the queue is full."""
        self.send_lines(data, [data])

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
        this client's commands so its replies cannot pile up either."""
        self.paused = True
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        """Write the queued lines, a chunk at a time so that a transport that
        pauses again keeps the rest in the (bounded) queue."""
        self.paused = False
        self.transport.resumeProducing()
        queue = self.queue
        while queue and not self.paused and not self.closing:
            chunk, size = [], 0
            while queue and size < RESUME_CHUNK:
                line = queue.popleft()
                chunk.append(line)
                size += len(line)
            self._write(b"".join(chunk))
            self.server.counters.lines_sent += len(chunk)

    def stopProducing(self) -> None:
        self.queue.clear()

    # -- input -------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while not self.closing:
            end = self.buffer.find(b"\n")
            if end < 0:
                if len(self.buffer) > MAX_INPUT:
                    self._too_long()
                    self.buffer = b""
                    self.discarding = True
                return
            raw, self.buffer = self.buffer[:end], self.buffer[end + 1 :]
            if self.discarding:
                self.discarding = False
                continue
            if len(raw) + 1 > MAX_INPUT:  # with the CR (or LF padding) of a CRLF line
                self._too_long()
                continue
            try:
                self.line_received(raw.rstrip(b"\r").decode("utf-8", "replace"))
            except Exception:
                log.failure("IRC: a command from {host} failed", host=self.host)

    def _too_long(self) -> None:
        self.reply(ERR.INPUTTOOLONG, "Input line was too long")

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
        pass

    def handle_NICK(self, params: tuple[str, ...]) -> None:
        if not params or not params[0]:
            raise IRCError(ERR.NONICKNAMEGIVEN, "No nickname given")
        nick = params[0]
        if not _NICK.fullmatch(nick):
            raise IRCError(ERR.ERRONEUSNICKNAME, nick, "Erroneous nickname")
        if irc_lower(nick) == irc_lower(self.config.botname):
            raise IRCError(ERR.NICKNAMEINUSE, nick, "Nickname is already in use")
        if self.registered:
            self.send(Message("NICK", (nick,), self.mask, trailing=True))
        self.nick = nick
        self._try_register()

    def handle_USER(self, params: tuple[str, ...]) -> None:
        if self.registered:
            raise IRCError(ERR.ALREADYREGISTRED, "You may not reregister")
        if len(params) < 4 or not params[0]:
            raise IRCError(ERR.NEEDMOREPARAMS, "USER", "Not enough parameters")
        self.user = params[0][:10]
        self.realname = params[3]
        self._try_register()

    def _try_register(self) -> None:
        if self.registered or self.nick is None or self.user is None:
            return
        self.registered = True
        self.last_pong = self.server.clock.seconds()
        c = self.config
        created = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.server.created))
        self.reply(RPL.WELCOME, f"Welcome to the {c.network} IRC Network {self.mask}")
        self.reply(RPL.YOURHOST, f"Your host is {c.servername}, running version {VERSION}")
        self.reply(RPL.CREATED, f"This server was created {created}")
        self.reply(RPL.MYINFO, c.servername, VERSION, "i", "bklmtns", trailing=False)
        self.reply(RPL.ISUPPORT, f"NETWORK={c.network}", *ISUPPORT, "are available on this server")
        self.reply(RPL.UMODEIS, "+i", trailing=False)
        self.handle_MOTD(())

    def handle_QUIT(self, params: tuple[str, ...]) -> None:
        self.close(params[0] if params and params[0] else "Client Quit")

    def handle_PING(self, params: tuple[str, ...]) -> None:
        if not params:
            raise IRCError(ERR.NEEDMOREPARAMS, "PING", "Not enough parameters")
        servername = self.config.servername
        self.send(Message("PONG", (servername, params[0]), servername, trailing=True))

    def handle_PONG(self, params: tuple[str, ...]) -> None:
        self.last_pong = self.server.clock.seconds()

    # -- channels ------------------------------------------------------------------

    def _channel(self, name: str) -> Channel:
        channel = self.server.channels.get(irc_lower(name))
        if channel is None:
            raise IRCError(ERR.NOSUCHCHANNEL, name, "No such channel")
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
        self.reply(RPL.TOPICWHOTIME, channel.name, self.config.botname, str(channel.created), trailing=False)

    def _names(self, channel: Channel) -> None:
        names = ([self.nick] if channel in self.channels else []) + ["@" + self.config.botname]
        self.reply(RPL.NAMREPLY, "=", channel.name, " ".join(names))
        self.reply(RPL.ENDOFNAMES, channel.name, "End of /NAMES list.")

    def handle_PART(self, params: tuple[str, ...]) -> None:
        self._need(params, 1, "PART")
        reason = params[1:2]
        self._each(params[0], lambda name: self._part(name, reason))

    def _part(self, name: str, reason: tuple[str, ...]) -> None:
        channel = self._channel(name)
        if channel not in self.channels:
            raise IRCError(ERR.NOTONCHANNEL, channel.name, "You're not on that channel")
        self.send(Message("PART", (channel.name,) + reason, self.mask, bool(reason)))
        self.channels.discard(channel)
        channel.members.discard(self)

    def handle_LIST(self, params: tuple[str, ...]) -> None:
        if params and params[0]:
            wanted = {irc_lower(n) for n in params[0].split(",")}
            channels = [c for key, c in self.server.channels.items() if key in wanted]
        else:
            channels = list(self.server.channels.values())
        self.reply(RPL.LISTSTART, "Channel", "Users  Name")
        for channel in sorted(channels, key=lambda c: c.name):
            self.reply(RPL.LIST, channel.name, "1", channel.topic)
        self.reply(RPL.LISTEND, "End of /LIST")

    def handle_NAMES(self, params: tuple[str, ...]) -> None:
        if not params or not params[0]:
            self.reply(RPL.ENDOFNAMES, "*", "End of /NAMES list.")
            return
        for name in params[0].split(","):
            channel = self.server.channels.get(irc_lower(name))
            if channel is None:
                self.reply(RPL.ENDOFNAMES, name, "End of /NAMES list.")
            else:
                self._names(channel)

    def handle_TOPIC(self, params: tuple[str, ...]) -> None:
        self._need(params, 1, "TOPIC")
        channel = self._channel(params[0])
        if len(params) > 1:
            raise IRCError(ERR.CHANOPRIVSNEEDED, channel.name, "You're not channel operator")
        self._topic(channel)

    def handle_MODE(self, params: tuple[str, ...]) -> None:
        self._need(params, 1, "MODE")
        target = params[0]
        if target.startswith("#"):
            channel = self._channel(target)
            if len(params) == 1:
                self.reply(RPL.CHANNELMODEIS, channel.name, "+mts", trailing=False)
                self.reply(RPL.CREATIONTIME, channel.name, str(channel.created), trailing=False)
            elif params[1].lstrip("+") == "b":
                self.reply(RPL.ENDOFBANLIST, channel.name, "End of channel ban list")
            else:
                raise IRCError(ERR.CHANOPRIVSNEEDED, channel.name, "You're not channel operator")
        elif irc_lower(target) != irc_lower(self.nick or ""):
            raise IRCError(ERR.USERSDONTMATCH, "Cant change mode for other users")
        elif len(params) == 1:
            self.reply(RPL.UMODEIS, "+i", trailing=False)
        elif set(params[1]) - set("+-i"):
            raise IRCError(ERR.UMODEUNKNOWNFLAG, "Unknown MODE flag")

    # -- users ---------------------------------------------------------------------

    def _known(self, nick: str) -> Optional[tuple[str, str, str, str]]:
        """(nick, user, host, realname) of this client or the bot."""
        if irc_lower(nick) == irc_lower(self.nick or ""):
            return self.nick or "", self.user or "", self.host, self.realname
        if irc_lower(nick) == irc_lower(self.config.botname):
            bot = self.config.botname
            return bot, bot, self.config.servername, bot
        return None

    def handle_WHO(self, params: tuple[str, ...]) -> None:
        self.reply(RPL.ENDOFWHO, params[0] if params else "*", "End of /WHO list.")

    def handle_WHOIS(self, params: tuple[str, ...]) -> None:
        self._need(params, 1, "WHOIS")
        nick = params[-1]
        known = self._known(nick)
        if known is None:
            self.reply(ERR.NOSUCHNICK, nick, "No such nick/channel")
        else:
            name, user, host, realname = known
            self.reply(RPL.WHOISUSER, name, user, host, "*", realname)
            self.reply(RPL.WHOISSERVER, name, self.config.servername, self.config.network)
            if name == self.config.botname:
                self.reply(RPL.WHOISOPERATOR, name, "is a bot")
        self.reply(RPL.ENDOFWHOIS, nick, "End of /WHOIS list.")

    def handle_WHOWAS(self, params: tuple[str, ...]) -> None:
        self._need(params, 1, "WHOWAS")
        self.reply(ERR.WASNOSUCHNICK, params[0], "There was no such nickname")
        self.reply(RPL.ENDOFWHOWAS, params[0], "End of WHOWAS")

    def handle_USERHOST(self, params: tuple[str, ...]) -> None:
        self._need(params, 1, "USERHOST")
        replies = []
        for nick in params[:5]:
            known = self._known(nick)
            if known is not None:
                name, user, host, _ = known
                op = "*" if name == self.config.botname else ""
                replies.append(f"{name}{op}=+{user}@{host}")
        self.reply(RPL.USERHOST, " ".join(replies))

    def handle_MOTD(self, params: tuple[str, ...]) -> None:
        motd = self.config.motd
        if not motd:
            raise IRCError(ERR.NOMOTD, "MOTD File is missing")
        self.reply(RPL.MOTDSTART, f"- {self.config.servername} Message of the day - ")
        for line in motd:
            self.reply(RPL.MOTD, f"- {line}")
        self.reply(RPL.ENDOFMOTD, "End of /MOTD command.")

    def handle_PRIVMSG(self, params: tuple[str, ...]) -> None:
        if not params or not params[0]:
            raise IRCError(ERR.NORECIPIENT, "No recipient given (PRIVMSG)")
        if len(params) < 2 or not params[1]:
            raise IRCError(ERR.NOTEXTTOSEND, "No text to send")
        for target in params[0].split(","):
            if target.startswith("#"):
                channel = self.server.channels.get(irc_lower(target))
                if channel is None:
                    self.reply(ERR.NOSUCHNICK, target, "No such nick/channel")
                else:
                    self.reply(ERR.CANNOTSENDTOCHAN, channel.name, "Cannot send to channel")
            elif self._known(target) is None:
                self.reply(ERR.NOSUCHNICK, target, "No such nick/channel")
            # to the bot or to oneself: silently dropped

    def handle_NOTICE(self, params: tuple[str, ...]) -> None:
        pass  # never answered (RFC 2812 3.3.2)
