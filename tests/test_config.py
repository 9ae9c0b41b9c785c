"""The INI configuration: the shipped file, every kind of mistake (one line
naming file, section, key and why), value syntaxes and --set overrides.
Every test reads a real file."""
from __future__ import annotations

import os

from twisted.trial import unittest

import bridges  # noqa: F401  (the shipped files configure the bridges, which declare their sections)
from bridges.irc import irc_config
from bridges.rcstream.config import parse as rcstream_config
from eventstreams import config as config_module
from eventstreams.config import (
    Config,
    ConfigError,
    DemoConfig,
    EmbeddedConfig,
    IntakeConfig,
    ServiceConfig,
    StreamConfig,
    declare_section,
    load,
)
from eventstreams.values import count

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(REPO, "etc", "streams.ini")

MINIMAL = """
[stream:mediawiki.recentchange]
topics = eqiad.mediawiki.recentchange,codfw.mediawiki.recentchange
aliases = recentchange

[stream:test]
topics = eqiad.test.event
"""


class ConfigTestCase(unittest.SynchronousTestCase):
    def write(self, text: str) -> str:
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "streams.ini")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def load_text(self, text: str, overrides: tuple[str, ...] = ()) -> Config:
        return load(self.write(text), overrides)

    def assertConfigError(
        self,
        text: str,
        section: str,
        key: str | None,
        reason: str,
        overrides: tuple[str, ...] = (),
        path: str | None = None,
        origin: str | None = None,
    ) -> ConfigError:
        """Loading fails with one line naming the origin (the file, or the
        `--set ITEM` that set the value), [section], key and reason."""
        path = path or self.write(text)
        with self.assertRaises(ConfigError) as caught:
            load(path, overrides)
        error = caught.exception
        message = str(error)
        self.assertNotIn("\n", message)
        self.assertTrue(message.startswith((origin or path) + ": "), message)
        self.assertEqual(error.origin, origin or path)
        self.assertIn(f"[{section}]", message)
        if key is not None:
            self.assertIn(f"[{section}] {key}: ", message)
        self.assertIn(reason, message)
        self.assertEqual((error.path, error.section, error.key), (path, section, key))
        return error


class ShippedConfig(ConfigTestCase):
    def test_shipped_file_loads_with_recentchange_alias_topics_and_demo(self):
        config = load(SHIPPED)
        self.assertEqual(config.path, SHIPPED)
        rc = config.streams["mediawiki.recentchange"]
        self.assertEqual(rc.topics, ("eqiad.mediawiki.recentchange", "codfw.mediawiki.recentchange"))
        self.assertEqual(rc.aliases, ("recentchange",))
        self.assertEqual(rc.schema_title, "mediawiki/recentchange")
        self.assertIs(config.stream("recentchange"), rc)
        self.assertIs(config.stream("mediawiki.recentchange"), rc)
        self.assertEqual(config.demo.stream, "mediawiki.recentchange")
        self.assertEqual(config.demo.rate, 25.0)
        self.assertIsNone(config.demo.file)

    def test_shipped_file_service_embedded_intake_and_metrics_values(self):
        config = load(SHIPPED)
        self.assertEqual(config.service.listen, "tcp:8092")
        self.assertEqual(config.service.backend, "embedded")
        self.assertEqual(config.service.heartbeat, 15.0)
        self.assertEqual(config.service.client_ip_connection_limit, 20)
        self.assertEqual(config.service.max_connections, 20000)
        self.assertEqual(config.service.ring_size, 10000)
        self.assertEqual(config.service.ring_memory, 256 * 1024 * 1024)
        self.assertEqual(config.service.max_stream_sets, 1000)
        # One day of the demo feed (about 300 MB), not seven.
        self.assertEqual(config.embedded, EmbeddedConfig(path="var/eventstreams.sqlite", retention=86400.0, partitions=1))
        self.assertEqual(config.intake.listen, "tcp:8192:interface=127.0.0.1")
        self.assertIsNone(config.intake.streams)
        self.assertEqual(config.intake.max_body, 4 * 1024 * 1024)
        # The Debian configuration's port: 9092 is Kafka's.
        self.assertEqual(config.metrics.listen, "tcp:9102:interface=127.0.0.1")
        self.assertEqual(config.streams["test"].aliases, ("test.event",))

    def test_minimal_file_takes_defaults(self):
        config = self.load_text(MINIMAL)
        self.assertEqual(config.service, ServiceConfig())
        self.assertEqual(config.embedded, EmbeddedConfig())
        self.assertEqual(config.intake, IntakeConfig())
        self.assertEqual(config.demo, DemoConfig())
        self.assertEqual(config.kafka, {})
        self.assertEqual(
            config.streams["test"], StreamConfig(name="test", topics=("eqiad.test.event",))
        )


class ConfigErrors(ConfigTestCase):
    def test_unreadable_file(self):
        path = os.path.join(self.mktemp(), "missing.ini")
        with self.assertRaises(ConfigError) as caught:
            load(path)
        message = str(caught.exception)
        self.assertEqual(message, f"{path}: [-]: cannot read the file: No such file or directory")

    def test_directory_instead_of_a_file(self):
        path = self.mktemp()
        os.makedirs(path)
        with self.assertRaises(ConfigError) as caught:
            load(path)
        self.assertEqual(str(caught.exception), f"{path}: [-]: cannot read the file: Is a directory")

    def test_file_that_is_not_utf8(self):
        path = self.write("")
        with open(path, "wb") as f:
            f.write(b"[eventstreams]\nlisten = tcp:80\xff\n")
        with self.assertRaises(ConfigError) as caught:
            load(path)
        self.assertEqual(str(caught.exception), f"{path}: [-]: the file is not UTF-8")

    def test_syntax_error_is_one_line_with_the_line_number(self):
        path = self.write("[eventstreams]\nlisten = tcp:1\nthis line has no equals sign\n" + MINIMAL)
        with self.assertRaises(ConfigError) as caught:
            load(path)
        message = str(caught.exception)
        self.assertNotIn("\n", message)
        self.assertTrue(message.startswith(f"{path}: [-]: "), message)
        self.assertIn("[line 3]", message)
        self.assertIn("this line has no equals sign", message)

    def test_key_before_any_section_is_a_syntax_error(self):
        path = self.write("listen = tcp:1\n" + MINIMAL)
        with self.assertRaises(ConfigError) as caught:
            load(path)
        message = str(caught.exception)
        self.assertNotIn("\n", message)
        self.assertIn(path, message)
        self.assertIn("line: 1", message)
        self.assertIn("no section headers", message)

    def test_duplicate_key_is_a_syntax_error(self):
        path = self.write("[eventstreams]\nheartbeat = 1\nheartbeat = 2\n" + MINIMAL)
        with self.assertRaises(ConfigError) as caught:
            load(path)
        message = str(caught.exception)
        self.assertNotIn("\n", message)
        self.assertIn(path, message)
        self.assertIn("'heartbeat'", message)
        self.assertIn("'eventstreams'", message)
        self.assertIn("already exists", message)

    def test_unknown_section(self):
        self.assertConfigError("[frobnicate]\nx = 1\n" + MINIMAL, "frobnicate", None, "unknown section")

    def test_default_section_is_reported_as_an_unknown_section(self):
        # configparser copies [DEFAULT] keys into every section; the error
        # must name [DEFAULT], not a section the key was never written in.
        self.assertConfigError("[DEFAULT]\nfoo = 1\n" + MINIMAL, "DEFAULT", None, "unknown section")

    def test_unknown_key(self):
        self.assertConfigError("[eventstreams]\nlisten_port = 80\n" + MINIMAL, "eventstreams", "listen_port", "unknown key")

    def test_unknown_key_in_a_stream_section(self):
        self.assertConfigError(
            MINIMAL + "topic = misspelt\n", "stream:test", "topic", "unknown key"
        )

    def test_bad_number(self):
        self.assertConfigError(
            "[eventstreams]\nheartbeat = abc\n" + MINIMAL, "eventstreams", "heartbeat", "expected a number, got 'abc'"
        )

    def test_negative_number(self):
        self.assertConfigError(
            "[eventstreams]\nmax_lifetime = -5\n" + MINIMAL,
            "eventstreams", "max_lifetime", "expected a non-negative number, got '-5'",
        )

    def test_not_a_number_and_infinity_are_rejected(self):
        for text in ("nan", "inf"):
            self.assertConfigError(
                f"[eventstreams]\nheartbeat = {text}\n" + MINIMAL,
                "eventstreams", "heartbeat", f"expected a non-negative number, got '{text}'",
            )

    def test_negative_count(self):
        self.assertConfigError(
            "[eventstreams]\nmax_connections = -1\n" + MINIMAL,
            "eventstreams", "max_connections", "expected a non-negative integer, got '-1'",
        )

    def test_zero_ring_size(self):
        self.assertConfigError(
            "[eventstreams]\nring_size = 0\n" + MINIMAL, "eventstreams", "ring_size", "expected an integer >= 1, got '0'"
        )

    def test_ring_memory_is_a_size_and_max_stream_sets_a_count(self):
        self.assertConfigError(
            "[eventstreams]\nring_memory = lots\n" + MINIMAL,
            "eventstreams", "ring_memory", "expected a size such as 4096, 64k or 4M, got 'lots'",
        )
        self.assertConfigError(
            "[eventstreams]\nmax_stream_sets = -5\n" + MINIMAL,
            "eventstreams", "max_stream_sets", "expected a non-negative integer, got '-5'",
        )

    def test_fan_out_interval_is_at_most_a_second(self):
        self.assertConfigError(
            "[eventstreams]\nfan_out_interval = 2\n" + MINIMAL,
            "eventstreams", "fan_out_interval", "expected at most 1 (second), got '2'",
        )
        self.assertConfigError(
            "[eventstreams]\nfan_out_interval = -0.1\n" + MINIMAL,
            "eventstreams", "fan_out_interval", "expected a non-negative number, got '-0.1'",
        )

    def test_bad_boolean(self):
        self.assertConfigError(
            "[eventstreams]\nid_updates = maybe\n" + MINIMAL,
            "eventstreams", "id_updates", "expected true or false, got 'maybe'",
        )

    def test_bad_duration(self):
        self.assertConfigError(
            "[embedded]\nretention = 7x\n" + MINIMAL,
            "embedded", "retention", "expected a duration such as 30s, 12h or 7d, got '7x'",
        )

    def test_bad_size(self):
        self.assertConfigError(
            "[intake]\nmax_body = 4 lots\n" + MINIMAL,
            "intake", "max_body", "expected a size such as 4096, 64k or 4M, got '4 lots'",
        )

    def test_bad_endpoint_string(self):
        error = self.assertConfigError(
            "[eventstreams]\nlisten = nope:1\n" + MINIMAL,
            "eventstreams", "listen", "not a valid endpoint string 'nope:1'",
        )
        self.assertIn("nope", error.reason)

    def test_bad_tcp_port_in_endpoint(self):
        self.assertConfigError(
            "[metrics]\nlisten = tcp:http\n" + MINIMAL, "metrics", "listen", "not a valid endpoint string 'tcp:http'"
        )

    def test_empty_listen(self):
        self.assertConfigError(
            "[eventstreams]\nlisten =\n" + MINIMAL,
            "eventstreams", "listen", "expected a Twisted endpoint string such as tcp:8092",
        )

    def test_intake_and_metrics_listen_can_be_turned_off(self):
        config = self.load_text("[intake]\nlisten = none\n[metrics]\nlisten = off\n" + MINIMAL)
        self.assertIsNone(config.intake.listen)
        self.assertIsNone(config.metrics.listen)

    def test_backend_must_be_embedded_or_kafka(self):
        self.assertConfigError(
            "[eventstreams]\nbackend = redis\n" + MINIMAL,
            "eventstreams", "backend", "expected embedded or kafka, got 'redis'",
        )

    def test_kafka_backend_is_accepted_by_the_config(self):
        config = self.load_text("[eventstreams]\nbackend = kafka\n" + MINIMAL)
        self.assertEqual(config.service.backend, "kafka")

    def test_empty_embedded_path(self):
        self.assertConfigError("[embedded]\npath =\n" + MINIMAL, "embedded", "path", "must not be empty")

    def test_no_stream(self):
        self.assertConfigError(
            "[eventstreams]\nlisten = tcp:1\n", "stream:NAME", None, "no stream is configured"
        )

    def test_stream_with_empty_topics(self):
        self.assertConfigError(
            "[stream:lonely]\ntopics =\n", "stream:lonely", "topics", "a stream needs at least one topic"
        )

    def test_stream_without_a_topics_key(self):
        # A stream section that never mentions topics is the same mistake as
        # an empty topics list, and must be reported the same way.
        self.assertConfigError(
            "[stream:lonely]\ndescription = no topics here\n",
            "stream:lonely", "topics", "a stream needs at least one topic",
        )

    def test_bad_stream_name(self):
        self.assertConfigError(
            "[stream:bad name]\ntopics = t\n", "stream:bad name", None, "'bad name' is not a valid name"
        )

    def test_bad_topic_name(self):
        self.assertConfigError(
            "[stream:s]\ntopics = good,not/good\n", "stream:s", "topics", "'not/good' is not a valid name"
        )

    def test_alias_used_by_two_streams(self):
        error = self.assertConfigError(
            "[stream:a]\ntopics = ta\naliases = shared\n[stream:b]\ntopics = tb\naliases = shared\n",
            "stream:b", "aliases", "'shared' already names stream 'a'",
        )
        self.assertEqual(error.reason, "'shared' already names stream 'a'")

    def test_alias_equal_to_another_streams_name(self):
        self.assertConfigError(
            "[stream:a]\ntopics = ta\n[stream:b]\ntopics = tb\naliases = a\n",
            "stream:b", "aliases", "'a' already names stream 'a'",
        )

    def test_demo_stream_not_configured(self):
        self.assertConfigError(
            "[demo]\nstream = nosuch\n" + MINIMAL, "demo", "stream", "no stream named 'nosuch'"
        )

    def test_demo_rate_zero(self):
        self.assertConfigError(
            "[demo]\nstream = recentchange\nrate = 0\n" + MINIMAL,
            "demo", "rate", "must be above 0 events per second",
        )

    def test_demo_stream_by_alias_is_resolved_to_the_stream_name(self):
        config = self.load_text("[demo]\nstream = recentchange\nrate = 2.5\nfile = /tmp/x.jsonl\n" + MINIMAL)
        self.assertEqual(config.demo, DemoConfig(stream="mediawiki.recentchange", file="/tmp/x.jsonl", rate=2.5))

    def test_empty_demo_stream_means_no_demo(self):
        config = self.load_text("[demo]\nstream =\n" + MINIMAL)
        self.assertIsNone(config.demo.stream)

    def test_intake_streams_naming_an_unknown_stream(self):
        self.assertConfigError(
            "[intake]\nstreams = test,nosuch\n" + MINIMAL, "intake", "streams", "no stream named 'nosuch'"
        )

    def test_intake_streams_aliases_are_resolved(self):
        config = self.load_text("[intake]\nstreams = recentchange, test\n" + MINIMAL)
        self.assertEqual(config.intake.streams, ("mediawiki.recentchange", "test"))


class ValueSyntax(ConfigTestCase):
    def retention(self, text: str) -> float:
        return self.load_text(f"[embedded]\nretention = {text}\n" + MINIMAL).embedded.retention

    def max_body(self, text: str) -> int:
        return self.load_text(f"[intake]\nmax_body = {text}\n" + MINIMAL).intake.max_body

    def test_durations(self):
        self.assertEqual(self.retention("30s"), 30.0)
        self.assertEqual(self.retention("5m"), 300.0)
        self.assertEqual(self.retention("12h"), 12 * 3600.0)
        self.assertEqual(self.retention("7d"), 7 * 86400.0)
        self.assertEqual(self.retention("1w"), 604800.0)
        self.assertEqual(self.retention("90"), 90.0)
        self.assertEqual(self.retention("1.5h"), 5400.0)
        self.assertEqual(self.retention("0"), 0.0)

    def test_sizes(self):
        self.assertEqual(self.max_body("4096"), 4096)
        self.assertEqual(self.max_body("64k"), 64 * 1024)
        self.assertEqual(self.max_body("4M"), 4 * 1024 * 1024)
        self.assertEqual(self.max_body("1G"), 1024**3)
        self.assertEqual(self.max_body("64KiB"), 64 * 1024)

    def test_booleans(self):
        for text, value in [("true", True), ("yes", True), ("on", True), ("1", True),
                            ("False", False), ("no", False), ("off", False), ("0", False)]:
            config = self.load_text(f"[eventstreams]\nid_updates = {text}\n" + MINIMAL)
            self.assertIs(config.service.id_updates, value, text)

    def test_names_lists_are_trimmed_and_skip_empty_items(self):
        config = self.load_text("[stream:s]\ntopics =  a , b,,c \naliases = x\n")
        self.assertEqual(config.streams["s"].topics, ("a", "b", "c"))

    def test_client_ip_header(self):
        config = self.load_text("[eventstreams]\nclient_ip_header = X-Client-IP\n" + MINIMAL)
        self.assertEqual(config.service.client_ip_header, "X-Client-IP")
        self.assertConfigError(
            "[eventstreams]\nclient_ip_header = X Client\n" + MINIMAL,
            "eventstreams", "client_ip_header", "'X Client' is not an HTTP header name",
        )

    def test_every_duration_takes_the_same_units(self):
        """Keys that took a plain number of seconds take units too, and
        keys that took units take any number: one syntax for durations."""
        config = self.load_text(
            "[eventstreams]\nheartbeat = 1m\nmax_lifetime = 2h\nhub_linger = 0.5m\nbackend_timeout = 10s\n"
            "fan_out_interval = 0.5s\n[intake]\ntimeout = 1m\n[embedded]\nretention = 1e3\n"
            "[irc]\nlisten = tcp:0\nping_interval = 2m\nping_timeout = 1h\nflush_interval = 0.2s\n"
            "[rcstream]\nheartbeat = 10\nsession_timeout = 1.5m\n" + MINIMAL)
        service = config.service
        self.assertEqual((service.heartbeat, service.max_lifetime, service.hub_linger, service.backend_timeout,
                          service.fan_out_interval, config.intake.timeout, config.embedded.retention),
                         (60.0, 7200.0, 30.0, 10.0, 0.5, 60.0, 1000.0))
        irc = irc_config(config)
        self.assertEqual((irc.ping_interval, irc.ping_timeout, irc.flush_interval), (120.0, 3600.0, 0.2))
        rcstream = rcstream_config(config)
        self.assertEqual((rcstream.heartbeat, rcstream.session_timeout), (10.0, 90.0))

    def test_a_duration_with_a_unit_keeps_its_checks(self):
        self.assertConfigError("[eventstreams]\nfan_out_interval = 2s\n" + MINIMAL,
                               "eventstreams", "fan_out_interval", "expected at most 1 (second), got '2s'")
        self.assertConfigError("[eventstreams]\nheartbeat = 5x\n" + MINIMAL,
                               "eventstreams", "heartbeat", "expected a number, got '5x'")
        self.assertConfigError("[intake]\ntimeout = 0s\n" + MINIMAL,
                               "intake", "timeout", "expected a number above 0, got '0s'")

    def test_kafka_section_keeps_dotted_keys_and_case(self):
        config = self.load_text("[kafka]\nbootstrap.servers = k1:9092,k2:9092\nssl.CA.location = /etc/ca.pem\n" + MINIMAL)
        self.assertEqual(config.kafka, {"bootstrap.servers": "k1:9092,k2:9092", "ssl.CA.location": "/etc/ca.pem"})


class Overrides(ConfigTestCase):
    def test_plain_override_replaces_a_key(self):
        config = self.load_text("[eventstreams]\nlisten = tcp:8092\n" + MINIMAL, ("eventstreams.listen=tcp:1234",))
        self.assertEqual(config.service.listen, "tcp:1234")

    def test_value_may_contain_equals_signs(self):
        config = self.load_text(MINIMAL, ("eventstreams.listen=tcp:1234:interface=127.0.0.1",))
        self.assertEqual(config.service.listen, "tcp:1234:interface=127.0.0.1")

    def test_override_adds_a_key_to_a_missing_section(self):
        path = self.write(MINIMAL)
        config = load(path, ("eventstreams.heartbeat=2.5", "embedded.retention=12h"))
        self.assertEqual(config.service.heartbeat, 2.5)
        self.assertEqual(config.embedded.retention, 12 * 3600.0)
        self.assertEqual(config.sections["eventstreams"], {"heartbeat": "2.5"})

    def test_last_override_of_a_key_wins(self):
        config = self.load_text(MINIMAL, ("eventstreams.heartbeat=1", "eventstreams.heartbeat=3"))
        self.assertEqual(config.service.heartbeat, 3.0)

    def test_stream_section_with_dots_uses_the_longest_prefix(self):
        config = self.load_text(MINIMAL, ("stream:mediawiki.recentchange.topics=a,b",))
        self.assertEqual(config.streams["mediawiki.recentchange"].topics, ("a", "b"))
        self.assertEqual(config.streams["mediawiki.recentchange"].aliases, ("recentchange",))
        self.assertEqual(set(config.streams), {"mediawiki.recentchange", "test"})

    def test_kafka_override_keeps_the_dotted_librdkafka_key_and_its_case(self):
        config = self.load_text(
            MINIMAL, ("kafka.bootstrap.servers=host:9092", "kafka.sasl.Mechanism=PLAIN")
        )
        self.assertEqual(config.kafka, {"bootstrap.servers": "host:9092", "sasl.Mechanism": "PLAIN"})

    def test_kafka_override_replaces_a_key_from_the_file(self):
        config = self.load_text("[kafka]\nbootstrap.servers = old:9092\n" + MINIMAL, ("kafka.bootstrap.servers=new:9092",))
        self.assertEqual(config.kafka, {"bootstrap.servers": "new:9092"})

    def test_new_stream_section_by_override(self):
        config = self.load_text(MINIMAL, ("stream:new.topics=x",))
        self.assertEqual(config.streams["new"], StreamConfig(name="new", topics=("x",)))

    def test_override_can_be_the_only_stream(self):
        config = self.load_text("[eventstreams]\nheartbeat = 1\n", ("stream:only.topics=t1,t2",))
        self.assertEqual(list(config.streams), ["only"])
        self.assertEqual(config.streams["only"].topics, ("t1", "t2"))

    def test_override_value_is_checked_like_the_file(self):
        path = self.write(MINIMAL)
        self.assertConfigError(
            "", "eventstreams", "heartbeat", "expected a number, got 'abc'",
            overrides=("eventstreams.heartbeat=abc",), path=path, origin="--set eventstreams.heartbeat=abc",
        )

    def test_override_into_an_unknown_section(self):
        path = self.write(MINIMAL)
        self.assertConfigError(
            "", "nosuch", None, "unknown section", overrides=("nosuch.key=1",), path=path, origin="--set nosuch.key=1"
        )

    def test_override_with_an_unknown_key(self):
        path = self.write(MINIMAL)
        self.assertConfigError(
            "", "eventstreams", "listen_port", "unknown key", overrides=("eventstreams.listen_port=1",), path=path,
            origin="--set eventstreams.listen_port=1",
        )

    def test_malformed_override_without_equals(self):
        path = self.write(MINIMAL)
        with self.assertRaises(ConfigError) as caught:
            load(path, ("eventstreams.listen",))
        self.assertEqual(
            str(caught.exception), "--set eventstreams.listen: expected SECTION.KEY=VALUE, got 'eventstreams.listen'"
        )

    def test_override_into_the_default_section_is_a_config_error(self):
        path = self.write(MINIMAL)
        self.assertConfigError(
            "", "DEFAULT", None, "unknown section", overrides=("DEFAULT.x=1",), path=path, origin="--set DEFAULT.x=1"
        )

    def test_malformed_override_without_a_section(self):
        path = self.write(MINIMAL)
        with self.assertRaises(ConfigError) as caught:
            load(path, ("listen=tcp:1",))
        self.assertEqual(str(caught.exception), "--set listen=tcp:1: expected SECTION.KEY=VALUE, got 'listen=tcp:1'")

    def test_a_value_from_the_file_still_names_the_file_when_other_keys_are_set(self):
        path = self.write("[demo]\nrate = fast\n" + MINIMAL)
        self.assertConfigError(
            "", "demo", "rate", "expected a number, got 'fast'", overrides=("eventstreams.heartbeat=1",), path=path
        )

    def test_the_last_set_of_a_key_is_named(self):
        path = self.write(MINIMAL)
        self.assertConfigError(
            "", "eventstreams", "workers", "expected an integer from 1 to 64, got '0'",
            overrides=("eventstreams.workers=2", "eventstreams.workers=0"), path=path,
            origin="--set eventstreams.workers=0",
        )

    def test_port_out_of_range(self):
        self.assertConfigError(
            "[intake]\nlisten = tcp:65536:interface=127.0.0.1\n" + MINIMAL, "intake", "listen",
            "port 65536 is out of range (0-65535)",
        )

    def test_overrides_do_not_change_the_file(self):
        path = self.write(MINIMAL)
        load(path, ("eventstreams.heartbeat=7",))
        with open(path, encoding="utf-8") as f:
            self.assertEqual(f.read(), MINIMAL)
        self.assertEqual(load(path).service.heartbeat, 15.0)


class RequestHeadLimits(ConfigTestCase):
    """[eventstreams] head_timeout / max_pending_heads(_per_ip), [intake] head_timeout."""

    def test_shipped_files_set_the_defaults(self):
        for path in (SHIPPED, os.path.join(REPO, "debian", "streams.ini")):
            config = load(path)
            self.assertEqual((config.service.head_timeout, config.service.max_pending_heads,
                              config.service.max_pending_heads_per_ip), (10.0, 1000, 100), path)
            self.assertEqual(config.intake.head_timeout, 10.0, path)
            self.assertEqual(config.service.max_body, 1024 * 1024, path)
            self.assertEqual((config.service.request_rate_per_ip, config.service.request_burst_per_ip),
                             (10.0, 100), path)

    def test_values_are_durations_and_counts(self):
        config = self.load_text(MINIMAL, ("eventstreams.head_timeout=1m", "eventstreams.max_pending_heads=0",
                                          "eventstreams.max_pending_heads_per_ip=3", "intake.head_timeout=5s"))
        self.assertEqual(config.service.head_timeout, 60.0)
        self.assertEqual(config.service.max_pending_heads, 0)
        self.assertEqual(config.service.max_pending_heads_per_ip, 3)
        self.assertEqual(config.intake.head_timeout, 5.0)

    def test_the_request_rate_is_a_number_and_its_burst_a_count(self):
        config = self.load_text(MINIMAL, ("eventstreams.request_rate_per_ip=0.5",
                                          "eventstreams.request_burst_per_ip=3"))
        self.assertEqual((config.service.request_rate_per_ip, config.service.request_burst_per_ip), (0.5, 3))
        self.assertConfigError(MINIMAL, "eventstreams", "request_rate_per_ip", "expected a non-negative number",
                               ("eventstreams.request_rate_per_ip=-1",),
                               origin="--set eventstreams.request_rate_per_ip=-1")

    def test_a_head_without_a_deadline_is_refused(self):
        for section in ("eventstreams", "intake"):
            self.assertConfigError(MINIMAL, section, "head_timeout", "expected a duration above 0",
                                   (f"{section}.head_timeout=0",), origin=f"--set {section}.head_timeout=0")


class BridgeSections(ConfigTestCase):
    """A bridge declares its section; the core lists only its own."""

    def test_the_core_does_not_list_the_bridges(self):
        self.assertNotIn("irc", config_module.CORE_SECTIONS)
        self.assertNotIn("rcstream", config_module.CORE_SECTIONS)
        self.assertIn("irc", config_module.BRIDGE_SECTIONS)
        self.assertIn("rcstream", config_module.BRIDGE_SECTIONS)

    def test_a_declared_section_loads_and_is_parsed_by_its_fields(self):
        self.assertConfigError("[example]\nsize = 3\n" + MINIMAL, "example", None, "unknown section")
        declare_section("example", {"size": count})
        self.addCleanup(config_module.BRIDGE_SECTIONS.pop, "example")
        config = self.load_text("[example]\nsize = 3\n" + MINIMAL)
        self.assertEqual(config.bridge_values("example"), {"size": 3})
        bad = self.load_text("[example]\nsize = three\n" + MINIMAL)
        with self.assertRaises(ConfigError) as caught:
            bad.bridge_values("example")
        self.assertIn("[example] size: expected a non-negative integer, got 'three'", str(caught.exception))
        self.assertIsNone(self.load_text(MINIMAL).bridge_values("example"))

    def test_a_bridge_cannot_take_a_core_section(self):
        for name in ("eventstreams", "stream:x"):
            with self.assertRaises(ValueError):
                declare_section(name, {})
