"""The IRC server without sockets: in-memory transports, a fake clock."""
from __future__ import annotations

import dataclasses

import os

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from bridges.irc import IRCConfig, IRCServer, irc_config
from bridges.irc.message import Message
from bridges.irc.numerics import ERR, RPL
from eventstreams.config import ConfigError, load

from .support import write_config

BOT = ":rc-pmtpa!rc-pmtpa@irc.wikimedia.org"


class Client:
    """One protocol instance over a StringTransport."""

    def __init__(self, server: IRCServer, transport: StringTransport | None = None):
        protocol = server.factory.buildProtocol(None)
        assert protocol is not None, "the server is not running"
        self.protocol = protocol
        self.transport = transport if transport is not None else StringTransport(
            peerAddress=IPv4Address("TCP", "10.0.0.7", 4242))
        self.protocol.makeConnection(self.transport)

    def send(self, *lines: str) -> None:
        for line in lines:
            self.protocol.dataReceived(line.encode("utf-8") + b"\r\n")

    def lines(self) -> list[str]:
        """What the server wrote since the last call."""
        data = self.transport.value().decode("utf-8")
        self.transport.clear()
        return data.split("\r\n")[:-1]

    def register(self, nick: str = "alice") -> list[str]:
        self.send(f"NICK {nick}", "USER al 0 * :Alice Liddell")
        return self.lines()

    def lose(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionError("gone")))


class ServerTestCase(unittest.TestCase):
    config = IRCConfig(motd=("Hello", "world"), ping_interval=45, ping_timeout=180, queue_size=3, flush_interval=0)

    def setUp(self) -> None:
        self.clock = Clock()
        self.server = IRCServer(self.config, self.clock, wall=lambda: 1700000000.0)
        self.server.startService()
        self.addCleanup(self.stop)
        self.server.broadcast("#en.wikipedia", "first line")  # the channel exists from now on

    def stop(self):
        d = self.server.stopService()
        for protocol in list(self.server.clients):  # StringTransport never closes by itself
            protocol.connectionLost(Failure(ConnectionError("closed")))
        return d

    def client(self, register: bool = True) -> Client:
        client = Client(self.server)
        if register:
            client.register()
        return client


class Messages(unittest.TestCase):
    def test_numerics_are_their_wire_form(self):
        self.assertEqual(str(RPL.WELCOME), "001")
        self.assertEqual(str(ERR.NOSUCHCHANNEL), "403")
        self.assertEqual(f"{ERR.CANNOTSENDTOCHAN}", "404")

    def test_parse_prefix_params_trailing_and_tags(self):
        self.assertEqual(Message.parse(":nick!u@h privmsg #a :hello  world"),
                         Message("PRIVMSG", ("#a", "hello  world"), "nick!u@h"))
        self.assertEqual(Message.parse("@time=x JOIN #a,#b"), Message("JOIN", ("#a,#b",)))
        self.assertEqual(Message.parse("USER a 0 *  :"), Message("USER", ("a", "0", "*", "")))
        self.assertIsNone(Message.parse("   "))

    def test_format_uses_a_trailing_parameter_only_when_needed_or_asked(self):
        self.assertEqual(str(Message("004", ("me", "srv", "v1", "i", "bklmtns"), "srv")), ":srv 004 me srv v1 i bklmtns")
        self.assertEqual(str(Message("332", ("me", "#a", "a topic"))), "332 me #a :a topic")
        self.assertEqual(str(Message("PING", ("srv",), trailing=True)), "PING :srv")
        self.assertEqual(str(Message("X", ("",))), "X :")


class Config(unittest.TestCase):
    def load(self, *overrides: str):
        return irc_config(load(write_config(self.mktemp()), overrides))

    def test_no_section_means_no_bridge(self):
        self.assertIsNone(self.load())
        self.assertIsNone(self.load("irc.listen=none"))

    def test_defaults_and_alias_resolution(self):
        config = self.load("irc.listen=tcp:6667", "irc.stream=recentchange")
        self.assertEqual(config.stream, "mediawiki.recentchange")
        self.assertEqual((config.servername, config.botname, config.ping_interval, config.ping_timeout),
                         ("irc.wikimedia.org", "rc-pmtpa", 45.0, 180.0))
        self.assertEqual(config.flush_interval, 0.1)
        self.assertEqual(self.load("irc.listen=tcp:6667", "irc.flush_interval=0").flush_interval, 0)

    def test_multi_line_motd(self):
        path = write_config(self.mktemp(), "\n[irc]\nlisten = tcp:6667\nmotd = first line\n  second line\n\n")
        self.assertEqual(irc_config(load(path)).motd, ("first line", "second line"))

    def test_bad_values_are_one_config_error_each(self):
        cases = {
            "irc.bogus=1": "[irc] bogus: unknown key",
            "irc.ping_interval=soon": "[irc] ping_interval: expected a number",
            "irc.ping_timeout=0": "[irc] ping_timeout: must be above 0",
            "irc.queue_size=0": "[irc] queue_size: expected an integer >= 1",
            "irc.stream=nope": "[irc] stream: no stream named 'nope'",
            "irc.listen=bogus:1": "[irc] listen: not a valid endpoint",
            "irc.botname=two words": "[irc] botname: expected one word",
            "irc.flush_interval=2": "[irc] flush_interval: must be at most 1 second",
            "irc.flush_interval=-1": "[irc] flush_interval: expected a non-negative number",
        }
        for override, message in cases.items():
            with self.assertRaises(ConfigError) as caught:
                self.load("irc.listen=tcp:6667", override)
            self.assertIn(message, str(caught.exception), override)
            self.assertNotIn("\n", str(caught.exception))

    def test_the_shipped_configuration_enables_irc_on_loopback_6667(self):
        path = os.path.join(os.path.dirname(__file__), "..", "etc", "streams.ini")
        config = irc_config(load(path))
        self.assertEqual(config.listen, "tcp:6667:interface=127.0.0.1")
        self.assertEqual(config.stream, "mediawiki.recentchange")


class Registration(ServerTestCase):
    def test_welcome_burst_after_nick_and_user_in_either_order(self):
        for order in (("NICK alice", "USER al 0 * :Alice Liddell"), ("USER al 0 * :Alice Liddell", "NICK alice")):
            client = self.client(register=False)
            client.send(*order)
            self.assertEqual(client.lines(), [
                ":irc.wikimedia.org 001 alice :Welcome to the Wikimedia IRC Network alice!al@10.0.0.7",
                ":irc.wikimedia.org 002 alice :Your host is irc.wikimedia.org, running version eventstreams-0.1.0",
                ":irc.wikimedia.org 003 alice :This server was created 2023-11-14 22:13:20 UTC",
                ":irc.wikimedia.org 004 alice irc.wikimedia.org eventstreams-0.1.0 i bklmtns",
                ":irc.wikimedia.org 005 alice NETWORK=Wikimedia CASEMAPPING=rfc1459 CHANLIMIT=#:2000 "
                "CHANMODES=b,k,l,mtns NICKLEN=30 CHANNELLEN=50 CHANTYPES=# PREFIX=(o)@ SAFELIST "
                ":are available on this server",
                ":irc.wikimedia.org 221 alice +i",
                ":irc.wikimedia.org 375 alice :- irc.wikimedia.org Message of the day - ",
                ":irc.wikimedia.org 372 alice :- Hello",
                ":irc.wikimedia.org 372 alice :- world",
                ":irc.wikimedia.org 376 alice :End of /MOTD command.",
            ])

    def test_cap_is_ignored_and_other_commands_need_registration(self):
        client = self.client(register=False)
        client.send("CAP LS 302", "PING x", "JOIN #en.wikipedia", "USER a b c")
        self.assertEqual(client.lines(), [
            ":irc.wikimedia.org PONG irc.wikimedia.org x",
            ":irc.wikimedia.org 451 * :You have not registered",
            ":irc.wikimedia.org 461 * USER :Not enough parameters",
        ])

    def test_bad_nicks_and_reregistration(self):
        client = self.client(register=False)
        client.send("NICK", "NICK a|b", "NICK rc-pmtpa", "NICK " + "a" * 31)
        self.assertEqual(client.lines(), [
            ":irc.wikimedia.org 431 * :No nickname given",
            ":irc.wikimedia.org 432 * a|b :Erroneous nickname",
            ":irc.wikimedia.org 433 * rc-pmtpa :Nickname is already in use",
            ":irc.wikimedia.org 432 * " + "a" * 31 + " :Erroneous nickname",
        ])
        client.register()
        client.send("USER x 0 * :x", "NICK bob")
        self.assertEqual(client.lines(), [
            ":irc.wikimedia.org 462 alice :You may not reregister",
            ":alice!al@irc.wikimedia.org NICK bob",
        ])

    def test_unknown_command(self):
        client = self.client()
        client.send("FROB x", "handle_join #a")
        self.assertEqual(client.lines(), [
            ":irc.wikimedia.org 421 alice FROB :Unknown command",
            ":irc.wikimedia.org 421 alice HANDLE_JOIN :Unknown command",
        ])

    def test_quit_sends_error_and_closes(self):
        client = self.client()
        client.send("QUIT :see you")
        self.assertEqual(client.lines(), ["ERROR :Closing Link: (Quit: see you)"])
        self.assertTrue(client.transport.disconnecting)
        client.send("PING x")
        self.assertEqual(client.lines(), [])


class Channels(ServerTestCase):
    def test_join_existing_and_missing_channels(self):
        client = self.client()
        client.send("JOIN #EN.wikipedia,#nope")
        self.assertEqual(client.lines(), [
            ":alice!al@irc.wikimedia.org JOIN #en.wikipedia",
            ":irc.wikimedia.org 332 alice #en.wikipedia :Stream for topic #en.wikipedia",
            ":irc.wikimedia.org 333 alice #en.wikipedia rc-pmtpa!rc-pmtpa@irc.wikimedia.org 1700000000",
            ":irc.wikimedia.org 353 alice = #en.wikipedia :alice @rc-pmtpa",
            ":irc.wikimedia.org 366 alice #en.wikipedia :End of /NAMES list",
            ":irc.wikimedia.org 403 alice #nope :No such channel",
        ])
        client.send("JOIN #en.wikipedia")  # already there: nothing
        self.assertEqual(client.lines(), [])

    def test_bot_lines_reach_joined_clients_only(self):
        joined, other = self.client(), self.client()
        joined.send("JOIN #en.wikipedia")
        joined.lines()
        self.server.broadcast("#en.wikipedia", "a line")
        self.server.broadcast("#de.wikipedia", "elsewhere")
        self.assertEqual(joined.lines(), [f"{BOT} PRIVMSG #en.wikipedia :a line"])
        self.assertEqual(other.lines(), [])
        self.assertEqual(self.server.counters.lines_sent, 1)

    def test_events_become_lines_through_the_formatter(self):
        client = self.client()
        edit = {"type": "edit", "title": "T", "server_name": "de.wikipedia.org", "user": "U"}
        self.server.on_batch([(edit, None)])
        self.server.flush()
        client.send("JOIN #de.wikipedia")
        client.lines()
        self.server.on_batch([(edit, None), ({"type": "categorize", "title": "T", "server_name": "de.wikipedia.org"}, None)])
        self.server.flush()
        self.assertEqual(client.lines(), [
            f"{BOT} PRIVMSG #de.wikipedia :\x0314[[\x0307T\x0314]]\x034 \x0310 \x0302\x03 \x035*\x03 "
            "\x0303U\x03 \x035*\x03  \x0310\x03"
        ])

    def test_part(self):
        client = self.client()
        client.send("JOIN #en.wikipedia")
        client.lines()
        client.send("PART #en.wikipedia :bye", "PART #en.wikipedia", "PART #nope")
        self.assertEqual(client.lines(), [
            ":alice!al@irc.wikimedia.org PART #en.wikipedia",
            ":irc.wikimedia.org 442 alice #en.wikipedia :You're not on that channel",
            ":irc.wikimedia.org 442 alice #nope :You're not on that channel",
        ])
        self.server.broadcast("#en.wikipedia", "after part")
        self.assertEqual(client.lines(), [])

    def test_list_names_topic_mode(self):
        self.server.broadcast("#de.wikipedia", "x")
        client = self.client()
        client.send("JOIN #de.wikipedia")
        client.lines()
        client.send("LIST", "NAMES #de.wikipedia", "NAMES", "TOPIC #de.wikipedia", "TOPIC #de.wikipedia :mine",
                    "TOPIC #en.wikipedia",
                    "MODE #de.wikipedia", "MODE #de.wikipedia b", "MODE #de.wikipedia +o alice", "MODE alice",
                    "MODE alice +i", "MODE alice +o", "MODE rc-pmtpa", "MODE bob", "MODE #nope")
        self.assertEqual(client.lines(), [
            ":irc.wikimedia.org 322 alice #de.wikipedia 2 :Stream for topic #de.wikipedia",
            ":irc.wikimedia.org 322 alice #en.wikipedia 1 :Stream for topic #en.wikipedia",
            ":irc.wikimedia.org 323 alice :End of /LIST",
            ":irc.wikimedia.org 353 alice = #de.wikipedia :alice @rc-pmtpa",
            ":irc.wikimedia.org 366 alice #de.wikipedia :End of /NAMES list",
            ":irc.wikimedia.org 366 alice * :End of /NAMES list",
            ":irc.wikimedia.org 332 alice #de.wikipedia :Stream for topic #de.wikipedia",
            ":irc.wikimedia.org 333 alice #de.wikipedia rc-pmtpa!rc-pmtpa@irc.wikimedia.org 1700000000",
            ":irc.wikimedia.org 482 alice #de.wikipedia :You're not a channel operator",
            ":irc.wikimedia.org 442 alice #en.wikipedia :You're not on that channel",
            ":irc.wikimedia.org 324 alice #de.wikipedia +mts",
            ":irc.wikimedia.org 368 alice #de.wikipedia :End of channel ban list",
            ":irc.wikimedia.org 482 alice #de.wikipedia :You're not a channel operator",
            ":irc.wikimedia.org 221 alice +i",
            ":irc.wikimedia.org 502 alice :Can't change mode for other users",
            ":irc.wikimedia.org 401 alice bob :No such nick/channel",
            ":irc.wikimedia.org 403 alice #nope :No such channel",
        ])

    def test_privmsg_is_refused_in_channels_and_dropped_for_the_bot(self):
        client = self.client()
        client.send("PRIVMSG #en.wikipedia :hello", "PRIVMSG rc-pmtpa :hello", "PRIVMSG bob :hi",
                    "PRIVMSG #nope :x", "NOTICE #en.wikipedia :x", "PRIVMSG", "PRIVMSG rc-pmtpa", "PRIVMSG :",
                    "NOTICE :", "PRIVMSG alice :to myself", "NOTICE bob,ALICE :me too")
        self.assertEqual(client.lines(), [
            ":irc.wikimedia.org 404 alice #en.wikipedia :Cannot send to channel",
            ":irc.wikimedia.org 401 alice bob :No such nick/channel",
            ":irc.wikimedia.org 401 alice #nope :No such nick/channel",
            ":irc.wikimedia.org 461 alice PRIVMSG :Not enough parameters",
            ":irc.wikimedia.org 461 alice PRIVMSG :Not enough parameters",
            ":irc.wikimedia.org 461 alice PRIVMSG :Not enough parameters",
            ":irc.wikimedia.org 461 alice NOTICE :Not enough parameters",
            ":alice!al@irc.wikimedia.org PRIVMSG alice :to myself",
            ":alice!al@irc.wikimedia.org NOTICE alice :me too",
        ])


class Users(ServerTestCase):
    def test_each_client_sees_only_itself_and_the_bot(self):
        client = self.client()
        Client(self.server).register("bob")
        client.send("WHO #en.wikipedia", "WHOIS bob", "WHOIS alice", "WHOIS rc-pmtpa", "WHOWAS bob",
                    "USERHOST alice rc-pmtpa bob")
        self.assertEqual(client.lines(), [
            ":irc.wikimedia.org 315 alice #en.wikipedia :End of /WHO list.",
            ":irc.wikimedia.org 401 alice bob :No such nick/channel",
            ":irc.wikimedia.org 318 alice bob :End of /WHOIS list",
            ":irc.wikimedia.org 311 alice alice al 10.0.0.7 * :Alice Liddell",
            ":irc.wikimedia.org 312 alice alice irc.wikimedia.org :Wikimedia",
            ":irc.wikimedia.org 317 alice alice 0 1700000000 :seconds idle, signon time",
            ":irc.wikimedia.org 318 alice alice :End of /WHOIS list",
            ":irc.wikimedia.org 311 alice rc-pmtpa rc-pmtpa irc.wikimedia.org * :rc-pmtpa",
            ":irc.wikimedia.org 312 alice rc-pmtpa irc.wikimedia.org :Wikimedia",
            ":irc.wikimedia.org 317 alice rc-pmtpa 0 1700000000 :seconds idle, signon time",
            ":irc.wikimedia.org 318 alice rc-pmtpa :End of /WHOIS list",
            ":irc.wikimedia.org 406 alice bob :There was no such nickname",
            ":irc.wikimedia.org 369 alice bob :End of WHOWAS",
            ":irc.wikimedia.org 302 alice :alice=+al@10.0.0.7 rc-pmtpa*=+rc-pmtpa@irc.wikimedia.org",
        ])


class Input(ServerTestCase):
    def test_a_utf8_character_split_across_reads(self):
        client = self.client()
        data = "NICK zoë\r\n".encode("utf-8")
        split = data.index("ë".encode("utf-8")) + 1
        client.protocol.dataReceived(data[:split])
        client.protocol.dataReceived(data[split:])
        self.assertEqual(client.lines(), [":alice!al@irc.wikimedia.org NICK zoë"])  # \w: letters of any script

    def test_invalid_utf8_is_replaced_not_fatal(self):
        client = self.client()
        client.protocol.dataReceived(b"FOO\xff\xfe bar\r\nPING ok\n")
        self.assertEqual(client.lines(), [
            ":irc.wikimedia.org 421 alice FOO\ufffd\ufffd :Unknown command",
            ":irc.wikimedia.org PONG irc.wikimedia.org ok",
        ])
        self.assertFalse(client.transport.disconnecting)

    def test_lines_over_510_bytes_are_cut_and_run(self):
        """RFC 2813 3.3 and IRCStream: the first 510 bytes of a line (without
        CRLF) are the command; the answer is cut at 510 characters too."""
        client = self.client()
        client.send("PING " + "x" * 505)  # 510 bytes without CRLF: whole
        client.send("PING " + "y" * 506)
        client.protocol.dataReceived(b"PING " + b"z" * 600)  # no newline yet
        client.protocol.dataReceived(b"zzz" * 10000)  # still none: not kept
        self.assertLessEqual(len(client.protocol.partial), 512)
        client.protocol.dataReceived(b"zzz\r\nPING after\r\n")
        pong = ":irc.wikimedia.org PONG irc.wikimedia.org "
        self.assertEqual(client.lines(), [
            (pong + "x" * 505)[:510],
            (pong + "y" * 505)[:510],
            (pong + "z" * 505)[:510],
            pong + "after",
        ])
        self.assertFalse(client.transport.disconnecting)


class Keepalive(ServerTestCase):
    def test_ping_every_interval_and_drop_after_timeout_without_pong(self):
        quiet, answering, unregistered = self.client(), self.client(), self.client(register=False)
        for _ in range(4):
            self.clock.advance(45)
            self.assertEqual(quiet.lines(), ["PING :irc.wikimedia.org"])
            self.assertEqual(answering.lines(), ["PING :irc.wikimedia.org"])
            answering.send("PONG :irc.wikimedia.org")
        self.assertEqual(unregistered.lines(), ["ERROR :Closing Link: (Registration timed out)"])  # at 60 s
        self.clock.advance(45)  # 225 s without a PONG
        self.assertEqual(quiet.lines(), ["ERROR :Closing Link: (Ping timeout: 225 seconds)"])
        self.assertTrue(quiet.transport.disconnecting)
        self.assertTrue(unregistered.transport.disconnecting)
        self.assertEqual(answering.lines(), ["PING :irc.wikimedia.org"])
        self.assertFalse(answering.transport.disconnecting)


class Queue(ServerTestCase):
    def test_a_paused_client_queues_then_drops_its_own_lines_only(self):
        slow, fast = self.client(), self.client()
        for client in (slow, fast):
            client.send("JOIN #en.wikipedia")
            client.lines()
        slow.protocol.pauseProducing()  # what the transport does when its buffer is full
        self.assertEqual(slow.transport.producerState, "paused")  # no more reading of its commands
        for n in range(5):
            self.server.broadcast("#en.wikipedia", f"line {n}")
        self.assertEqual(slow.lines(), [])
        self.assertEqual(len(fast.lines()), 5)
        self.assertEqual(self.server.counters.lines_dropped, 2)  # queue_size = 3
        slow.protocol.resumeProducing()
        self.assertEqual(slow.transport.producerState, "producing")
        self.assertEqual(slow.lines(), [f"{BOT} PRIVMSG #en.wikipedia :line {n}" for n in range(3)])
        samples = {name: value for name, _, _, _, value in self.server.samples()}
        self.assertEqual(samples["eventstreams_irc_lines_dropped_total"], 2)
        self.assertEqual(samples["eventstreams_irc_lines_sent_total"], 8)
        self.assertEqual(samples["eventstreams_irc_clients"], 2)
        self.assertEqual(samples["eventstreams_irc_clients_dropping"], 1)
        self.assertEqual((slow.protocol.dropped, fast.protocol.dropped), (2, 0))

    def test_lost_clients_leave_channels_and_stop_closes_everyone(self):
        client, other = self.client(), self.client()
        client.send("JOIN #en.wikipedia")
        client.lose()
        self.assertEqual(self.server.channels["#en.wikipedia"].members, set())
        self.assertEqual(self.server.clients, {other.protocol})
        d = self.server.stopService()
        self.assertEqual(other.lines()[-1], "ERROR :Closing Link: (Server shutting down)")
        self.assertNoResult(d)
        other.lose()
        self.successResultOf(d)
        self.assertIsNone(self.server.factory.buildProtocol(None))

    def test_a_closed_client_that_does_not_read_is_aborted(self):
        paused, stuck = self.client(), self.client()
        paused.protocol.pauseProducing()
        self.clock.advance(181)  # ping timeout for both
        self.assertTrue(paused.transport.disconnected)  # aborted at once: it reads nothing
        self.assertTrue(stuck.transport.disconnecting)
        self.assertFalse(stuck.transport.disconnected)
        self.clock.advance(10)  # its close did not finish in time
        self.assertTrue(stuck.transport.disconnected)


class RecordingTransport(StringTransport):
    """A StringTransport that keeps each write (the bytes objects themselves)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.writes: list[bytes] = []
        self.cost = None  # (clock, seconds): each write moves the clock on (a slow send)

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)
        if self.cost is not None:
            clock, seconds = self.cost
            clock.rightNow += seconds


def edit(n: int, wiki: str = "de.wikipedia.org") -> dict:
    return {"type": "edit", "title": f"T{n}", "server_name": wiki, "user": "U"}


class Batches(ServerTestCase):
    """StreamFeed's on_batch: each member gets one write per channel per
    batch, the same bytes object for every member."""

    def recorded(self, *channels: str) -> tuple[Client, RecordingTransport]:
        transport = RecordingTransport(peerAddress=IPv4Address("TCP", "10.0.0.7", 4242))
        client = Client(self.server, transport)
        client.register()
        for channel in channels:
            client.send(f"JOIN {channel}")
        client.lines()
        transport.writes.clear()
        return client, transport

    def test_one_write_per_member_per_channel_per_batch(self):
        self.server.broadcast("#de.wikipedia", "creates the channel")
        both, both_t = self.recorded("#de.wikipedia", "#en.wikipedia")
        de, de_t = self.recorded("#de.wikipedia")
        nowhere, nowhere_t = self.recorded()
        events = [edit(n) for n in range(5)] + [edit(n, "en.wikipedia.org") for n in range(5, 7)]
        events.insert(2, {"type": "categorize", "title": "T", "server_name": "de.wikipedia.org"})  # no line
        self.server.on_batch([(event, None) for event in events])
        self.assertEqual(len(both_t.writes), 2)  # one per channel
        self.assertEqual(len(de_t.writes), 1)
        self.assertEqual(nowhere_t.writes, [])
        self.assertIs(both_t.writes[0], de_t.writes[0])  # formatted and joined once, shared
        de_lines = de.lines()
        self.assertEqual([line.split(":\x0314[[\x0307")[1].split("\x03")[0] for line in de_lines],
                         [f"T{n}" for n in range(5)])
        self.assertTrue(all(line.startswith(f"{BOT} PRIVMSG #de.wikipedia :") for line in de_lines))
        self.assertEqual([line.split()[2] for line in both.lines()], ["#de.wikipedia"] * 5 + ["#en.wikipedia"] * 2)
        self.assertEqual(self.server.counters.lines_sent, 5 + 7)

    def test_a_paused_member_queues_what_fits_of_a_batch_and_drops_the_rest(self):
        self.server.broadcast("#de.wikipedia", "creates the channel")
        slow, slow_t = self.recorded("#de.wikipedia")
        fast, fast_t = self.recorded("#de.wikipedia")
        slow.protocol.pauseProducing()
        self.server.on_batch([(edit(n), None) for n in range(2)])
        self.server.on_batch([(edit(n), None) for n in range(2, 5)])  # queue_size = 3: 4 is dropped
        self.assertEqual(slow_t.writes, [])
        self.assertEqual(len(fast_t.writes), 2)
        self.assertEqual((slow.protocol.dropped, self.server.counters.lines_dropped), (2, 2))
        slow.protocol.resumeProducing()
        self.assertEqual(len(slow_t.writes), 1)  # the queue in one write
        self.assertEqual([line.split("\x0307")[1].split("\x03")[0] for line in slow.lines()], ["T0", "T1", "T2"])
        self.assertEqual(self.server.counters.lines_sent, 5 + 3)

    def test_an_event_that_cannot_be_formatted_costs_its_own_line_only(self):
        self.server.broadcast("#de.wikipedia", "creates the channel")
        client, transport = self.recorded("#de.wikipedia")

        class Weird(dict):
            def get(self, *args):
                raise ValueError("bad event")

        self.server.on_batch([(edit(1), None), (Weird(type="edit"), None), (edit(2), None)])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertEqual(len(transport.writes), 1)
        self.assertEqual(len(client.lines()), 2)


class PacedBatches(ServerTestCase):
    """flush_interval > 0: flushes spaced by eventstreams.pacing."""

    config = dataclasses.replace(ServerTestCase.config, flush_interval=0.1)
    recorded = Batches.recorded

    def test_flushes_are_spaced_by_twice_their_duration_up_to_flush_interval(self):
        self.server.broadcast("#de.wikipedia", "creates the channel")
        client, transport = self.recorded("#de.wikipedia", "#en.wikipedia")
        self.clock.advance(1)
        self.server.on_batch([(edit(0), None)])  # quick flushes: each batch at once
        self.server.on_batch([(edit(1), None)])
        self.assertEqual(len(transport.writes), 2)
        transport.cost = (self.clock, 0.03)  # now a write takes 30 ms
        self.server.on_batch([(edit(2), None)])  # at once, and that flush took 30 ms
        self.clock.advance(0.01)
        self.server.on_batch([(edit(3), None)])  # waits for 2 x 30 ms after the last start
        self.server.on_batch([(edit(4, "en.wikipedia.org"), None), (edit(5), None)])
        self.assertEqual(len(transport.writes), 3)
        self.clock.advance(0.02)
        self.assertEqual(len(transport.writes), 5)  # one per channel; that flush took 60 ms
        self.assertEqual([line.split("\x0307")[1].split("\x03")[0] for line in client.lines()],
                         ["T0", "T1", "T2", "T3", "T5", "T4"])
        self.server.on_batch([(edit(6), None)])  # 2 x 60 ms, capped at flush_interval
        self.clock.advance(0.03)  # 90 ms after the last start
        self.assertEqual(len(transport.writes), 5)
        self.clock.advance(0.02)
        self.assertEqual(len(transport.writes), 6)
        client.lines()
        self.server.on_batch([(edit(7), None)])
        self.server.broadcast("#de.wikipedia", "now")  # after the pending line, at once
        seven, now = client.lines()
        self.assertIn("T7", seven)
        self.assertEqual(now, f"{BOT} PRIVMSG #de.wikipedia :now")
        self.server.on_batch([(edit(8), None)])
        self.server.stopService()  # a pending flush is dropped with the clients
        self.clock.advance(1)
        self.assertNotIn("T8", transport.value().decode())


class Limits(ServerTestCase):
    """Issue 12: what one client may cost (a fake clock, in-memory transports)."""

    config = dataclasses.replace(ServerTestCase.config, flood_rate=10, flood_burst=5, flood_buffer=1024,
                                 max_clients=4, max_clients_per_address=2, registration_timeout=30)

    def at(self, host: str) -> Client:
        return Client(self.server, StringTransport(peerAddress=IPv4Address("TCP", host, 4242)))

    def test_commands_beyond_the_burst_wait_for_tokens_and_all_run(self):
        client = self.client()
        self.clock.advance(1)  # the bucket is full again after NICK and USER
        client.protocol.dataReceived(b"".join(b"PING n%d\r\n" % n for n in range(8)))
        self.assertEqual([line.split()[-1] for line in client.lines()], ["n0", "n1", "n2", "n3", "n4"])
        self.clock.advance(0.1)  # one token back
        self.assertEqual([line.split()[-1] for line in client.lines()], ["n5"])
        self.clock.advance(0.2)
        self.assertEqual([line.split()[-1] for line in client.lines()], ["n6", "n7"])
        self.assertFalse(client.transport.disconnecting)

    def test_more_waiting_than_flood_buffer_is_excess_flood(self):
        client = self.client()
        client.protocol.dataReceived(b"LIST\r\n" * 150)  # 900 bytes: waits
        self.assertFalse(client.transport.disconnecting)
        client.lines()
        client.protocol.dataReceived(b"LIST\r\n" * 50)  # 1,200 bytes waiting
        self.assertEqual(client.lines(), ["ERROR :Closing Link: (Excess Flood)"])
        self.assertTrue(client.transport.disconnecting)
        self.assertEqual(client.protocol.waiting, b"")
        self.assertEqual(self.server.counters.flooded, 1)

    def test_a_flood_in_one_read_is_refused_before_any_command_runs(self):
        client = self.client(register=False)
        client.protocol.dataReceived(b"NICK a\r\nUSER a 0 * :a\r\n" + b"LIST\r\n" * 11000)
        self.assertEqual(client.lines(), ["ERROR :Closing Link: (Excess Flood)"])
        self.assertTrue(client.transport.disconnecting)

    def test_a_client_whose_output_is_paused_is_not_read_and_runs_nothing(self):
        client = self.client()
        client.protocol.pauseProducing()  # its transport's buffer is full
        self.assertEqual(client.transport.producerState, "paused")
        client.protocol.dataReceived(b"PING a\r\nPING b\r\n")  # what was already read
        self.assertEqual(client.lines(), [])
        client.protocol.resumeProducing()
        self.assertEqual(client.lines(), [":irc.wikimedia.org PONG irc.wikimedia.org a",
                                          ":irc.wikimedia.org PONG irc.wikimedia.org b"])

    def test_a_command_that_pauses_the_output_stops_the_ones_after_it(self):
        client = self.client()
        pause = client.protocol.pauseProducing
        client.protocol.handle_LIST = lambda params: pause()  # as a transport does when LIST fills it
        client.protocol.dataReceived(b"LIST\r\nPING a\r\n")
        self.assertEqual(client.lines(), [])
        client.protocol.resumeProducing()
        self.assertEqual(client.lines(), [":irc.wikimedia.org PONG irc.wikimedia.org a"])

    def test_connections_per_address_and_in_all_are_capped(self):
        a1, _, a3 = self.at("10.0.0.1"), self.at("10.0.0.1"), self.at("10.0.0.1")
        self.assertEqual(a3.lines(), ["ERROR :Closing Link: (Too many connections from your address)"])
        self.assertTrue(a3.transport.disconnecting)
        self.assertEqual((a1.lines(), a1.transport.disconnecting), ([], False))
        _, _, c1 = self.at("10.0.0.2"), self.at("10.0.0.2"), self.at("10.0.0.3")
        self.assertEqual(c1.lines(), ["ERROR :Closing Link: (Server is full, try later)"])
        self.assertEqual(len(self.server.clients), 4)
        samples = {name: value for name, _, _, _, value in self.server.samples()}
        self.assertEqual(samples["eventstreams_irc_refused_total"], 2)
        a3.lose()  # a refused client leaving changes nothing
        c1.lose()
        self.assertEqual(self.server.per_address, {"10.0.0.1": 2, "10.0.0.2": 2})
        a1.lose()
        a4 = self.at("10.0.0.1")
        self.assertEqual(a4.lines(), [])
        self.assertEqual(self.server.per_address, {"10.0.0.1": 2, "10.0.0.2": 2})

    def test_registration_deadline(self):
        slow, quick = self.client(register=False), self.client(register=False)
        self.clock.advance(29)
        quick.register()
        quick.lines()
        self.clock.advance(1)
        self.assertEqual(slow.lines(), ["ERROR :Closing Link: (Registration timed out)"])
        self.assertTrue(slow.transport.disconnecting)
        self.assertFalse(quick.transport.disconnecting)


class IPv6Hosts(ServerTestCase):
    def at(self, host: str) -> Client:
        return Client(self.server, StringTransport(peerAddress=IPv4Address("TCP", host, 4242)))

    def test_a_host_starting_with_a_colon_is_shown_with_a_zero(self):
        client = self.at("::1")
        welcome = client.register()
        self.assertEqual(welcome[0], ":irc.wikimedia.org 001 alice :Welcome to the Wikimedia IRC Network alice!al@0::1")
        client.send("WHOIS alice", "USERHOST alice")
        self.assertEqual(client.lines()[0], ":irc.wikimedia.org 311 alice alice al 0::1 * :Alice Liddell")
        self.assertEqual(self.server.per_address, {"::1": 1})

    def test_an_ipv4_mapped_address_is_shown_as_ipv4(self):
        client = self.at("::ffff:10.0.0.8")
        self.assertTrue(client.register()[0].endswith("alice!al@10.0.0.8"))
        self.assertEqual(self.server.per_address, {"10.0.0.8": 1})


class ConnectThrottle(ServerTestCase):
    """New connections a second per address (ircds' "throttle"): over it,
    the ERROR comes after a wait, the connection unread meanwhile."""

    config = dataclasses.replace(ServerTestCase.config, connect_rate_per_address=1, connect_burst_per_address=3)

    def at(self, host: str) -> Client:
        return Client(self.server, StringTransport(peerAddress=IPv4Address("TCP", host, 4242)))

    def test_connections_over_the_burst_are_told_after_a_wait_and_closed(self):
        first = [self.at("10.0.0.1") for _ in range(3)]
        fourth = self.at("10.0.0.1")
        self.assertEqual(fourth.lines(), [])  # not yet: held
        self.assertEqual(fourth.transport.producerState, "paused")  # and not read
        fourth.protocol.dataReceived(b"NICK a\r\nUSER a 0 * :a\r\n")  # (what was already read)
        self.assertEqual(fourth.lines(), [])
        self.clock.advance(1)
        self.assertEqual(fourth.lines(), ["ERROR :Closing Link: (Reconnecting too fast, throttled)"])
        self.assertTrue(fourth.transport.disconnecting)
        self.assertFalse(any(c.transport.disconnecting for c in first))
        self.assertNotIn(fourth.protocol, self.server.clients)
        other = self.at("10.0.0.2")  # another address: its own tokens
        self.assertFalse(other.transport.disconnecting)
        self.clock.advance(1)  # a token back
        self.assertFalse(self.at("10.0.0.1").transport.disconnecting)
        samples = {name: value for name, _, _, _, value in self.server.samples()}
        self.assertEqual(samples["eventstreams_irc_refused_total"], 1)

    def test_a_held_connection_that_goes_away_leaves_no_timer(self):
        for _ in range(3):
            self.at("10.0.0.1")
        held = self.at("10.0.0.1")
        held.protocol.connectionLost(None)
        self.assertEqual([c for c in self.clock.getDelayedCalls() if c.active() and c.getTime() <= 1.0], [])

    def test_full_buckets_are_dropped_at_the_keepalive(self):
        self.at("10.0.0.1")
        self.assertIn("10.0.0.1", self.server.connects.buckets)
        self.clock.advance(self.config.ping_interval)
        self.assertEqual(self.server.connects.buckets, {})


class LimitsConfig(unittest.TestCase):
    def load(self, *overrides: str):
        return irc_config(load(write_config(self.mktemp()), ("irc.listen=tcp:6667",) + overrides))

    def test_defaults(self):
        c = self.load()
        self.assertEqual((c.max_clients, c.max_clients_per_address, c.registration_timeout, c.flood_rate,
                          c.flood_burst, c.flood_buffer), (10000, 50, 60.0, 10.0, 20, 16384))
        self.assertEqual((c.connect_rate_per_address, c.connect_burst_per_address), (2.0, 20))

    def test_values_and_errors(self):
        c = self.load("irc.max_clients=0", "irc.max_clients_per_address=0", "irc.registration_timeout=2m",
                      "irc.flood_rate=2.5", "irc.flood_burst=5", "irc.flood_buffer=4k")
        self.assertEqual((c.max_clients, c.max_clients_per_address, c.registration_timeout, c.flood_rate,
                          c.flood_burst, c.flood_buffer), (0, 0, 120.0, 2.5, 5, 4096))
        cases = {
            "irc.max_clients=-1": "[irc] max_clients: expected a non-negative integer",
            "irc.flood_rate=0": "[irc] flood_rate: must be above 0",
            "irc.flood_burst=0": "[irc] flood_burst: expected an integer >= 1",
            "irc.flood_buffer=100": "[irc] flood_buffer: must be at least 512 bytes",
            "irc.registration_timeout=0": "[irc] registration_timeout: must be above 0",
        }
        for override, message in cases.items():
            with self.assertRaises(ConfigError) as caught:
                self.load(override)
            self.assertIn(message, str(caught.exception), override)

    def test_both_shipped_configurations_set_the_limits(self):
        for path in ("etc/streams.ini", "debian/streams.ini"):
            with open(os.path.join(os.path.dirname(__file__), "..", path)) as f:
                text = f.read()
            section = text[text.index("[irc]"):]
            for key in ("max_clients", "max_clients_per_address", "registration_timeout", "flood_rate",
                        "flood_burst", "flood_buffer", "connect_rate_per_address", "connect_burst_per_address"):
                self.assertIn(f"\n{key} = ", section, f"{path}: {key}")


class LineLength(ServerTestCase):
    def test_bot_lines_are_cut_at_510_characters_as_ircstream_sends_them(self):
        client = self.client()
        client.send("JOIN #en.wikipedia")
        client.lines()
        self.server.broadcast("#en.wikipedia", "é" * 600)
        (sent,) = client.lines()
        self.assertEqual(sent, (f"{BOT} PRIVMSG #en.wikipedia :" + "é" * 600)[:510])
