"""End to end: the daemon with the IRC bridge on a loopback port, events
posted to the intake, raw-socket clients and a jaraco `irc` bot."""
from __future__ import annotations

import json
import os
import threading
import time
from typing import Any, Callable, Optional

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure

from bridges.irc import IRCServer
from eventstreams.transports import ITCPConnection

from .support import Daemon, Waiters, async_test, rc_event, wait_for
from .test_stream import StreamTestCase

IRC = ("irc.listen=tcp:0:interface=127.0.0.1",)
BOT = ":rc-pmtpa!rc-pmtpa@irc.wikimedia.org"
GOLDEN = os.path.join(os.path.dirname(__file__), "data", "irc", "ircstream-rcfmt")


def golden_event(name: str) -> dict:
    with open(os.path.join(GOLDEN, name + ".json"), encoding="utf-8") as f:
        return json.load(f)


def golden(name: str) -> tuple[dict, str, str]:
    """The event, its channel and its line."""
    event = golden_event(name)
    with open(os.path.join(GOLDEN, name + ".out"), encoding="utf-8") as f:
        channel, line = f.read().rstrip("\n").split("\t ", 1)
    return event, channel, line


class RawIRC(Waiters, Protocol):
    """Lines as the server sent them (CRLF-split bytes, decoded)."""

    transport: ITCPConnection  # (Twisted types it Optional[ITransport])

    def __init__(self) -> None:
        super().__init__()
        self.buffer = b""
        self.lines: list[str] = []
        self.closed: Deferred = Deferred()
        self.done = False

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        *complete, self.buffer = self.buffer.split(b"\r\n")
        self.lines += [line.decode("utf-8") for line in complete]
        self._check_waiters()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.done = True
        self.closed.callback(None)
        self._check_waiters()

    def send(self, *lines: str) -> None:
        self.transport.write(b"".join(line.encode("utf-8") + b"\r\n" for line in lines))

    def progress(self) -> str:
        return f"got {self.lines[-10:]!r}"

    def wait_line(self, start: int, test: Callable[[str], bool], timeout: Optional[float] = None) -> Deferred:
        """Fires when a line after index start passes test."""
        return self.wait_for(lambda: any(test(line) for line in self.lines[start:]), timeout)

    def numerics(self) -> list[str]:
        return [line.split()[1] for line in self.lines]


class IRCTestCase(StreamTestCase):
    timeout = 60

    async def irc_daemon(self, *overrides: str) -> Daemon:
        return await self.daemon(*IRC, *overrides)

    async def connect(self, d: Daemon) -> RawIRC:
        client = RawIRC()
        await TCP4ClientEndpoint(reactor, "127.0.0.1", d.ports["irc"]).connect(ClientFactory.forProtocol(lambda: client))

        async def close() -> None:
            if not client.done:
                client.transport.loseConnection()
            await client.closed

        self.addCleanup(close)
        return client

    async def registered(self, d: Daemon, nick: str = "alice") -> RawIRC:
        client = await self.connect(d)
        client.send(f"NICK {nick}", f"USER {nick} 0 * :Test client")
        await client.wait_line(0, lambda line: " 376 " in line)
        return client

    async def post(self, d: Daemon, events: list[dict]) -> None:
        response = await self.request("POST", d.url("/v1/events", "intake"), data=json.dumps(events).encode(),
                                      headers={"Content-Type": "application/json"})
        body = await response.json()
        self.assertEqual((response.code, body["accepted"]), (201, len(events)), body)

    async def channel_exists(self, client: RawIRC, channel: str) -> None:
        """Polls LIST until the channel shows (the bot has written to it)."""

        async def listed() -> bool:
            start = len(client.lines)
            client.send("LIST")
            await client.wait_line(start, lambda line: " 323 " in line)
            return any(f" 322 {client_nick(client)} {channel} " in line for line in client.lines[start:])

        await wait_for(listed, f"{channel} in LIST", interval=0.05)


def client_nick(client: RawIRC) -> str:
    return client.lines[0].split()[2]


class RawSockets(IRCTestCase):
    @async_test
    async def test_the_bridge_is_off_without_an_irc_section(self):
        d = await self.daemon()
        self.assertNotIn("irc", d.ports)

    @async_test
    async def test_registration_burst(self):
        d = await self.irc_daemon("irc.network=TestNet")
        client = await self.registered(d)
        self.assertEqual(client.numerics()[:6], ["001", "002", "003", "004", "005", "221"])
        self.assertEqual(client.numerics()[6], "375")
        self.assertEqual(client.numerics()[-1], "376")
        self.assertEqual(client.lines[0], ":irc.wikimedia.org 001 alice :Welcome to the TestNet IRC Network alice!alice@127.0.0.1")
        self.assertTrue(client.lines[4].startswith(":irc.wikimedia.org 005 alice NETWORK=TestNet CASEMAPPING=rfc1459 "))
        self.assertIn(" PREFIX=(o)@ SAFELIST :are available on this server", client.lines[4])

    @async_test
    async def test_join_an_existing_and_a_missing_channel_then_receive_the_exact_line(self):
        d = await self.irc_daemon()
        client = await self.registered(d)
        await self.post(d, [rc_event(1)])  # the bot writes to #en.wikipedia: it exists from now on
        await self.channel_exists(client, "#en.wikipedia")
        start = len(client.lines)
        client.send("JOIN #en.wikipedia,#xx.wikipedia")
        await client.wait_line(start, lambda line: " 403 " in line)
        self.assertEqual(client.lines[start:], [
            ":alice!alice@irc.wikimedia.org JOIN #en.wikipedia",
            ":irc.wikimedia.org 332 alice #en.wikipedia :Stream for topic #en.wikipedia",
            client.lines[start + 2],
            ":irc.wikimedia.org 353 alice = #en.wikipedia :alice @rc-pmtpa",
            ":irc.wikimedia.org 366 alice #en.wikipedia :End of /NAMES list",
            ":irc.wikimedia.org 403 alice #xx.wikipedia :No such channel",
        ])
        self.assertRegex(client.lines[start + 2], r"^:irc.wikimedia.org 333 alice #en.wikipedia rc-pmtpa!rc-pmtpa@irc.wikimedia.org \d+$")

        event, channel, line = golden("02-edit")
        self.assertEqual(channel, "#en.wikipedia")
        start = len(client.lines)
        await self.post(d, [golden_event("04-type-categorize"), event, golden_event("05-type-new")])
        # The wikidata line goes to a channel alice did not join; a later
        # #en.wikipedia line shows that it would have arrived by now.
        await self.post(d, [rc_event(7)])
        await client.wait_line(start, lambda line: "Page 7" in line)
        self.assertEqual(client.lines[start:-1], [f"{BOT} PRIVMSG #en.wikipedia :{line}"])
        self.assertTrue(client.lines[-1].startswith(f"{BOT} PRIVMSG #en.wikipedia :"), client.lines[-1])

    @async_test
    async def test_privmsg_is_refused_and_unknown_commands_answered(self):
        d = await self.irc_daemon()
        client = await self.registered(d)
        await self.post(d, [rc_event(1)])
        await self.channel_exists(client, "#en.wikipedia")
        start = len(client.lines)
        client.send("JOIN #en.wikipedia", "PRIVMSG #en.wikipedia :hello", "PRIVMSG rc-pmtpa :hello", "FROB")
        await client.wait_line(start, lambda line: " 421 " in line)
        self.assertIn(":irc.wikimedia.org 404 alice #en.wikipedia :Cannot send to channel", client.lines[start:])
        self.assertEqual(client.lines[-1], ":irc.wikimedia.org 421 alice FROB :Unknown command")

    @async_test
    async def test_quit_closes_with_an_error_line(self):
        d = await self.irc_daemon()
        client = await self.registered(d)
        client.send("QUIT :done here")
        await client.closed
        self.assertEqual(client.lines[-1], "ERROR :Closing Link: (Quit: done here)")

    @async_test
    async def test_ping_timeout_drops_a_silent_client_and_keeps_an_answering_one(self):
        d = await self.irc_daemon("irc.ping_interval=0.2", "irc.ping_timeout=0.7")
        silent = await self.registered(d, "silent")
        answering = await self.registered(d, "answering")

        def pong() -> None:
            if not answering.done:
                answering.send("PONG :irc.wikimedia.org")
                calls.append(reactor.callLater(0.1, pong))

        calls = [reactor.callLater(0.1, pong)]
        self.addCleanup(lambda: [c.cancel() for c in calls if c.active()])
        await silent.wait_for(lambda: silent.done, timeout=5)
        self.assertIn("PING :irc.wikimedia.org", silent.lines)
        self.assertRegex(silent.lines[-1], r"^ERROR :Closing Link: \(Ping timeout: \d+ seconds\)$")
        self.assertFalse(answering.done)
        self.assertIn("PING :irc.wikimedia.org", answering.lines)

    @async_test
    async def test_a_utf8_character_split_across_tcp_reads(self):
        d = await self.irc_daemon()
        client = await self.registered(d)
        data = "PING :zoë ☺\r\n".encode("utf-8")
        cut = data.index("ë".encode("utf-8")) + 1  # inside the two bytes of ë
        start = len(client.lines)
        client.transport.setTcpNoDelay(True)
        client.transport.write(data[:cut])
        (server,) = [s for s in d.service if isinstance(s, IRCServer)]
        await wait_for(lambda: any(c.partial == data[:cut] for c in server.clients), "the first part at the server")
        client.transport.write(data[cut:] + b"PING :\xff\r\n")
        await client.wait_line(start, lambda line: line.endswith("\ufffd"))
        self.assertEqual(client.lines[start:], [
            ":irc.wikimedia.org PONG irc.wikimedia.org :zoë ☺",
            ":irc.wikimedia.org PONG irc.wikimedia.org \ufffd",
        ])

    @async_test
    async def test_stopping_the_daemon_closes_the_clients(self):
        d = Daemon(self.mktemp(), IRC)
        await d.start()
        client = await self.registered(d)
        await d.stop()
        await client.closed
        self.assertEqual(client.lines[-1], "ERROR :Closing Link: (Server shutting down)")

    @async_test
    async def test_metrics_count_clients_and_lines(self):
        d = await self.irc_daemon()
        client = await self.registered(d)
        await self.post(d, [rc_event(1)])
        await self.channel_exists(client, "#en.wikipedia")
        start = len(client.lines)
        client.send("JOIN #en.wikipedia")
        await client.wait_line(start, lambda line: " 366 " in line)
        await self.post(d, [rc_event(2), rc_event(3)])
        await client.wait_for(lambda: sum("PRIVMSG" in line for line in client.lines) == 2)
        response = await self.get(d.url("/metrics", "metrics"))
        text = (await response.content()).decode()
        self.assertIn("eventstreams_irc_clients 1\n", text)
        self.assertIn("eventstreams_irc_lines_sent_total 2\n", text)
        self.assertIn("eventstreams_irc_lines_dropped_total 0\n", text)


def run_bot(port: int, channel: str, joined: threading.Event, wanted: int, timeout: float = 15) -> dict:
    """A jaraco `irc` bot (blocking, for a thread): joins, collects channel
    messages until it has `wanted` of them, then quits."""
    import irc.client

    seen: dict[str, Any] = {"messages": [], "names": [], "features": None, "errors": []}
    client_reactor = irc.client.Reactor()
    connection = client_reactor.server()

    def on_welcome(conn: Any, event: Any) -> None:
        conn.join(channel)

    def on_join(conn: Any, event: Any) -> None:
        joined.set()

    client_reactor.add_global_handler("welcome", on_welcome)
    client_reactor.add_global_handler("join", on_join)
    client_reactor.add_global_handler("namreply", lambda c, e: seen["names"].extend(e.arguments[-1].split()))
    client_reactor.add_global_handler("pubmsg", lambda c, e: seen["messages"].append((e.source, e.target, e.arguments[0])))
    client_reactor.add_global_handler("nosuchchannel", lambda c, e: seen["errors"].append(e.arguments))
    connection.connect("127.0.0.1", port, "jaraco")
    try:
        deadline = time.monotonic() + timeout
        while len(seen["messages"]) < wanted and time.monotonic() < deadline and connection.is_connected():
            client_reactor.process_once(0.05)
        seen["features"] = (connection.features.network, dict(connection.features.prefix))
        if connection.is_connected():
            connection.quit("bye")
            end = time.monotonic() + 2
            while connection.is_connected() and time.monotonic() < end:
                client_reactor.process_once(0.05)
    finally:
        connection.close()
    return seen


class JaracoBot(IRCTestCase):
    @async_test
    async def test_a_jaraco_irc_bot_joins_and_receives_the_lines(self):
        d = await self.irc_daemon()
        watcher = await self.registered(d, "watcher")
        event, channel, line = golden("10-szdiff-negative-large")
        await self.post(d, [rc_event(1, wiki="wikidatawiki")])
        await self.channel_exists(watcher, channel)

        joined = threading.Event()
        bot = deferToThread(run_bot, d.ports["irc"], channel, joined, 2)
        self.assertTrue(await deferToThread(joined.wait, 10), "the bot did not join")
        await self.post(d, [event, golden("01-log")[0], golden("05-type-new")[0]])
        seen = await bot
        self.assertEqual(seen["features"], ("Wikimedia", {"@": "o"}))  # 005 parsed: no "+"
        self.assertEqual(seen["names"], ["jaraco", "@rc-pmtpa"])
        self.assertEqual(seen["messages"], [
            ("rc-pmtpa!rc-pmtpa@irc.wikimedia.org", channel, line),
            ("rc-pmtpa!rc-pmtpa@irc.wikimedia.org", channel, golden("05-type-new")[2]),
        ])


class IRCStreamReplies(IRCTestCase):
    """Issue 15: what a bot sees is what IRCStream (the server behind
    irc.wikimedia.org) sends, over IPv4 here and IPv6 (::1) below."""

    listen = "tcp:0:interface=127.0.0.1"
    host = "127.0.0.1"
    shown = "127.0.0.1"  # the client's host in replies

    async def irc_daemon(self, *overrides: str) -> Daemon:
        return await self.daemon(f"irc.listen={self.listen}", *overrides)

    async def connect(self, d: Daemon) -> RawIRC:
        client = RawIRC()
        endpoint = (TCP6ClientEndpoint if ":" in self.host else TCP4ClientEndpoint)(reactor, self.host, d.ports["irc"])
        await endpoint.connect(ClientFactory.forProtocol(lambda: client))
        self.addCleanup(lambda: None if client.done else client.transport.abortConnection())
        return client

    async def exchange(self, client: RawIRC, *lines: str) -> list[str]:
        """Send lines and a PING marker; the lines answered before its PONG."""
        self.marker = getattr(self, "marker", 0) + 1
        start = len(client.lines)
        client.send(*lines, f"PING end{self.marker}")
        pong = f":irc.wikimedia.org PONG irc.wikimedia.org end{self.marker}"
        await client.wait_line(start, lambda line: line == pong)
        return client.lines[start : client.lines.index(pong, start)]

    async def in_channel(self) -> tuple[Daemon, RawIRC]:
        d = await self.irc_daemon()
        client = await self.registered(d, "alice")
        await self.post(d, [rc_event(1)])
        await self.channel_exists(client, "#en.wikipedia")
        return d, client

    @async_test
    async def test_registration_numerics_and_the_client_as_it_sees_itself(self):
        d = await self.irc_daemon()
        client = await self.connect(d)
        self.assertEqual(await self.exchange(client, "NICK a", "NICK a|b", "NICK " + "n" * 31, "USER a b", "PING"), [
            ":irc.wikimedia.org 432 * a :Erroneous nickname",
            ":irc.wikimedia.org 432 * a|b :Erroneous nickname",
            f":irc.wikimedia.org 432 * {'n' * 31} :Erroneous nickname",
            ":irc.wikimedia.org 461 * USER :Not enough parameters",
            ":irc.wikimedia.org 409 * :No origin specified",
        ])
        welcome = await self.exchange(client, "NICK zoë", "USER averylongusername 0 * :Zoë Test")
        self.assertEqual(welcome[0], f":irc.wikimedia.org 001 zoë :Welcome to the Wikimedia IRC Network "
                                     f"zoë!averylongusername@{self.shown}")
        lines = await self.exchange(client, "PASS x", "USER a b", "USER a b c d", "WHOIS", "WHOWAS",
                                    "WHOIS zoë", "USERHOST zoë", "NICK zoe2")
        self.assertRegex(lines[7], r"^:irc\.wikimedia\.org 317 zoë zoë 0 \d+ :seconds idle, signon time$")
        lines[7] = "317"
        self.assertEqual(lines, [
            ":irc.wikimedia.org 462 zoë :You may not reregister",
            ":irc.wikimedia.org 461 zoë USER :Not enough parameters",
            ":irc.wikimedia.org 462 zoë :You may not reregister",
            ":irc.wikimedia.org 431 zoë :No nickname given",
            ":irc.wikimedia.org 431 zoë :No nickname given",
            f":irc.wikimedia.org 311 zoë zoë averylongusername {self.shown} * :Zoë Test",
            ":irc.wikimedia.org 312 zoë zoë irc.wikimedia.org :Wikimedia",
            "317",
            ":irc.wikimedia.org 318 zoë zoë :End of /WHOIS list",
            f":irc.wikimedia.org 302 zoë :zoë=+averylongusername@{self.shown}",
            ":zoë!averylongusername@irc.wikimedia.org NICK zoe2",
        ])

    @async_test
    async def test_ping_pong_and_long_lines_are_cut_at_510(self):
        d = await self.irc_daemon()
        client = await self.registered(d)
        pong = ":irc.wikimedia.org PONG irc.wikimedia.org "
        self.assertEqual(await self.exchange(client, "PING x", "PING :a b", "PING x y.example", "PING " + "z" * 600), [
            pong + "x",
            pong + ":a b",
            ":irc.wikimedia.org PONG y.example x",
            (pong + "z" * 505)[:510],  # the input was cut at 510 bytes, the reply at 510 characters
        ])
        # A JOIN of more channels than fit: what fits in 510 bytes is run, no 417.
        await self.post(d, [rc_event(1)])
        await self.channel_exists(client, "#en.wikipedia")
        command = "JOIN #en.wikipedia," + ",".join(f"#x{n:03}" for n in range(100))
        lines = await self.exchange(client, command)
        self.assertEqual(lines[0], ":alice!alice@irc.wikimedia.org JOIN #en.wikipedia")
        fits = (len(command[:510]) - len("JOIN #en.wikipedia,") + 1) // 6  # "#xNNN," each
        self.assertEqual([line.split()[3] for line in lines if " 403 " in line], [f"#x{n:03}" for n in range(fits)])
        self.assertNotIn(" 417 ", " ".join(lines))

    @async_test
    async def test_channel_replies(self):
        d, client = await self.in_channel()
        self.assertEqual(await self.exchange(
            client, "PART #en.wikipedia", "TOPIC #en.wikipedia", "TOPIC #nope", "JOIN #en.wikipedia"), [
            ":irc.wikimedia.org 442 alice #en.wikipedia :You're not on that channel",
            ":irc.wikimedia.org 442 alice #en.wikipedia :You're not on that channel",
            ":irc.wikimedia.org 442 alice #nope :You're not on that channel",
            ":alice!alice@irc.wikimedia.org JOIN #en.wikipedia",
            ":irc.wikimedia.org 332 alice #en.wikipedia :Stream for topic #en.wikipedia",
            client.lines[-4],
            ":irc.wikimedia.org 353 alice = #en.wikipedia :alice @rc-pmtpa",
            ":irc.wikimedia.org 366 alice #en.wikipedia :End of /NAMES list",
        ])
        self.assertRegex(client.lines[-4], r"^:irc\.wikimedia\.org 333 alice #en\.wikipedia "
                                           r"rc-pmtpa!rc-pmtpa@irc\.wikimedia\.org \d+$")
        self.assertEqual(await self.exchange(
            client, "LIST", "TOPIC #en.wikipedia :mine", "MODE #en.wikipedia", "MODE #en.wikipedia b",
            "MODE #en.wikipedia +o alice", "MODE alice", "MODE rc-pmtpa", "MODE bob", "PRIVMSG alice :hi me",
            "NOTICE alice :note", "PRIVMSG :", "NOTICE :", "PRIVMSG #en.wikipedia :hello", "PART #en.wikipedia"), [
            ":irc.wikimedia.org 322 alice #en.wikipedia 2 :Stream for topic #en.wikipedia",
            ":irc.wikimedia.org 323 alice :End of /LIST",
            ":irc.wikimedia.org 482 alice #en.wikipedia :You're not a channel operator",
            ":irc.wikimedia.org 324 alice #en.wikipedia +mts",
            ":irc.wikimedia.org 368 alice #en.wikipedia :End of channel ban list",
            ":irc.wikimedia.org 482 alice #en.wikipedia :You're not a channel operator",
            ":irc.wikimedia.org 221 alice +i",
            ":irc.wikimedia.org 502 alice :Can't change mode for other users",
            ":irc.wikimedia.org 401 alice bob :No such nick/channel",
            ":alice!alice@irc.wikimedia.org PRIVMSG alice :hi me",
            ":alice!alice@irc.wikimedia.org NOTICE alice note",
            ":irc.wikimedia.org 461 alice PRIVMSG :Not enough parameters",
            ":irc.wikimedia.org 461 alice NOTICE :Not enough parameters",
            ":irc.wikimedia.org 404 alice #en.wikipedia :Cannot send to channel",
            ":alice!alice@irc.wikimedia.org PART #en.wikipedia",
        ])
        self.assertEqual(await self.exchange(client, "LIST #en.wikipedia"), [
            ":irc.wikimedia.org 322 alice #en.wikipedia 1 :Stream for topic #en.wikipedia",
            ":irc.wikimedia.org 323 alice :End of /LIST",
        ])

    @async_test
    async def test_quit_texts(self):
        d = await self.irc_daemon()
        for command, reason in (("QUIT :bye now", "Quit: bye now"), ("QUIT", "Quit: No reason")):
            client = await self.registered(d)
            client.send(command)
            await client.closed
            self.assertEqual(client.lines[-1], f"ERROR :Closing Link: ({reason})")

    @async_test
    async def test_excess_flood_closes_and_paced_commands_all_run(self):
        d = await self.irc_daemon("irc.flood_burst=5", "irc.flood_rate=50", "irc.flood_buffer=1k")
        client = await self.registered(d)
        lines = await self.exchange(client, *[f"PING n{n}" for n in range(30)])  # 30 x 10 bytes: waits, runs
        self.assertEqual(lines, [f":irc.wikimedia.org PONG irc.wikimedia.org n{n}" for n in range(30)])
        client.send(*["LIST"] * 400)  # 2,400 bytes at once
        await client.closed
        self.assertEqual(client.lines[-1], "ERROR :Closing Link: (Excess Flood)")


class IRCStreamRepliesIPv6(IRCStreamReplies):
    listen = r"tcp6:0:interface=\:\:1"
    host = "::1"
    shown = "0::1"  # a host cannot start with ':' in a reply
