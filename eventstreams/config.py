"""The INI configuration, parsed once into frozen, typed objects.

Every mistake becomes one ConfigError naming file, section, key and why, so
the daemon can refuse to start with a single readable line.
"""
from __future__ import annotations

import configparser
import os
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Callable, Iterable, Optional, TypeVar

from . import values

T = TypeVar("T")

# The core's sections; `[stream:NAME]` sections name the streams.
CORE_SECTIONS = ("eventstreams", "embedded", "kafka", "intake", "demo", "metrics", "log")

# Sections declared by the bridges (see declare_section), by name: the
# bridge's keys and their parsers. load() lets them through; the bridge
# parses its own (with parse_values) when the service tree is built.
BRIDGE_SECTIONS: dict[str, dict[str, Callable]] = {}


def declare_section(name: str, fields: dict[str, Callable]) -> dict[str, Callable]:
    """A bridge's `[name]` section and its keys' parsers (eventstreams.values),
    declared when the bridge is imported; returns `fields`."""
    if name in CORE_SECTIONS or name.startswith("stream:"):
        raise ValueError(f"[{name}] is a section of the core")
    BRIDGE_SECTIONS[name] = fields
    return fields


def known_sections() -> tuple[str, ...]:
    return CORE_SECTIONS + tuple(BRIDGE_SECTIONS)


class ConfigError(Exception):
    """`origin` is where the value came from: the file, or the `--set ITEM`
    of the command line that set it (see `blame`)."""

    def __init__(self, path: str, section: Optional[str], key: Optional[str], reason: str):
        self.path, self.section, self.key, self.reason = path, section, key, reason
        self.origin = path
        super().__init__(path, section, key, reason)

    def __str__(self) -> str:
        if self.section is None:
            return f"{self.origin}: {self.reason}"
        where = f"[{self.section}]" + (f" {self.key}" if self.key else "")
        return f"{self.origin}: {where}: {self.reason}"

    def blame(self, set_by: dict[tuple[str, Optional[str]], str]) -> "ConfigError":
        """Name the `--set` item behind the section and key, if one set them."""
        item = set_by.get((self.section or "", self.key))
        if item is None and self.key is None:
            item = next((i for (s, _), i in set_by.items() if s == self.section), None)
        if item is not None:
            self.origin = f"--set {item}"
        return self


@dataclass(frozen=True)
class StreamConfig:
    name: str
    topics: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    description: str = ""
    schema_title: str = ""


@dataclass(frozen=True)
class ServiceConfig:
    listen: str = "tcp:8092"
    backend: str = "embedded"
    heartbeat: float = 15.0
    id_updates: bool = True
    client_ip_header: Optional[str] = None
    client_ip_connection_limit: int = 0
    max_connections: int = 0
    workers: int = 1
    max_lifetime: float = 0.0
    ring_size: int = 10000
    ring_memory: int = 256 * 1024 * 1024
    max_stream_sets: int = 1000
    hub_linger: float = 10.0
    fan_out_interval: float = 0.0
    backend_timeout: float = 10.0
    catchup_consumers: int = 8
    cors_origin: str = "*"
    content_security_policy: str = (
        "default-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "style-src 'self'; script-src 'self'; frame-ancestors 'none'"
    )
    head_timeout: float = 10.0  # seconds for a whole request head, not reset per byte
    max_pending_heads: int = 1000  # connections waiting for a head, in all (the longest partial head is cut)
    max_pending_heads_per_ip: int = 100  # partial heads per peer address (more refused); 0: no bound
    request_rate_per_ip: float = 10.0  # request heads a second per peer address (429 beyond); 0: no bound
    request_burst_per_ip: int = 100  # of those, how many may come at once
    max_body: int = 1024 * 1024  # request body on the public listener (RCStream polling): 413 beyond


@dataclass(frozen=True)
class EmbeddedConfig:
    path: str = "var/eventstreams.sqlite"
    retention: float = 7 * 86400.0
    partitions: int = 1


@dataclass(frozen=True)
class IntakeConfig:
    listen: Optional[str] = "tcp:8192:interface=127.0.0.1"
    streams: Optional[tuple[str, ...]] = None  # None: every configured stream
    max_body: int = 4 * 1024 * 1024
    head_timeout: float = 10.0  # seconds for a whole request head, not reset per byte
    timeout: float = 5.0  # seconds before a write the log cannot take is answered 503
    dedupe_window: float = 86400.0  # seconds a meta.id is remembered; 0 = no deduplication
    dedupe_max: int = 1_000_000  # ids remembered in memory (Kafka) within the window
    schemas: Optional[str] = None  # schema repository (jsonschema/<title>/<version>); None = no validation


@dataclass(frozen=True)
class DemoConfig:
    stream: Optional[str] = None  # None: no demo feed
    file: Optional[str] = None  # None: the bundled sample events
    rate: float = 25.0


@dataclass(frozen=True)
class MetricsConfig:
    listen: Optional[str] = None


@dataclass(frozen=True)
class Config:
    path: str
    service: ServiceConfig
    embedded: EmbeddedConfig
    kafka: dict[str, str]
    streams: dict[str, StreamConfig]
    intake: IntakeConfig
    demo: DemoConfig
    metrics: MetricsConfig
    sections: dict[str, dict[str, str]] = field(default_factory=dict)
    overrides: tuple[str, ...] = ()  # the --set items, for worker processes to load the same
    set_by: dict[tuple[str, Optional[str]], str] = field(default_factory=dict)  # (section, key) -> --set item

    def error(self, section: str, key: Optional[str], reason: str) -> ConfigError:
        """A ConfigError about a value of this configuration, naming its origin."""
        return ConfigError(self.path, section, key, reason).blame(self.set_by)

    def bridge_values(self, name: str) -> Optional[dict]:
        """A bridge's section through the parsers it declared, None when
        the file has no such section (the bridge is off)."""
        given = self.sections.get(name)
        if given is None:
            return None
        return parse_values(self.path, name, given, BRIDGE_SECTIONS[name])

    def stream(self, name: str) -> Optional[StreamConfig]:
        """A stream by name or alias."""
        return find_stream(self.streams, name)


def find_stream(streams: dict[str, StreamConfig], name: str) -> Optional[StreamConfig]:
    found = streams.get(name)
    if found is not None:
        return found
    for stream in streams.values():
        if name in stream.aliases:
            return stream
    return None


# -- values only the core's sections have (the others: eventstreams.values) --


def _schemas(text: str) -> Optional[str]:
    """A schema repository directory; `bundled`: the schemas shipped in the package."""
    if text.lower() in ("", "none", "off"):
        return None
    if text.lower() == "bundled":
        return os.path.join(os.path.dirname(os.path.abspath(__file__)), "schemas")
    if not os.path.isdir(os.path.join(text, "jsonschema")):
        raise ValueError(f"{text!r} is not a schema repository (no jsonschema/ directory in it)")
    return text


MAX_WORKERS = 64


def _workers(text: str) -> int:
    value = values.count(text)
    if not 1 <= value <= MAX_WORKERS:
        raise ValueError(f"expected an integer from 1 to {MAX_WORKERS}, got {text!r}")
    return value


def parse_values(path: str, section: str, values: dict[str, str], fields: dict[str, Callable]) -> dict:
    """A section's keys through their parsers; unknown keys and bad values
    are ConfigErrors naming the key (bridges use it for their sections)."""
    parsed = {}
    for key, text in values.items():
        if key not in fields:
            raise ConfigError(path, section, key, "unknown key")
        try:
            parsed[key] = fields[key](text.strip())
        except ValueError as e:
            raise ConfigError(path, section, key, str(e)) from None
    return parsed


# -- loading ----------------------------------------------------------------


def apply_overrides(
    parser: configparser.ConfigParser, overrides: Iterable[str], path: str
) -> dict[tuple[str, Optional[str]], str]:
    """Apply `SECTION.KEY=VALUE` overrides; the section is the longest prefix
    naming a section in the file or a known one, else the text up to the
    first dot. Returns which item set each (section, key)."""
    set_by: dict[tuple[str, Optional[str]], str] = {}
    for item in overrides:
        name, sep, value = item.partition("=")
        if not sep or "." not in name:
            error = ConfigError(path, None, None, f"expected SECTION.KEY=VALUE, got {item!r}")
            error.origin = f"--set {item}"
            raise error
        sections = set(parser.sections()) | set(known_sections())
        section, key = name.split(".", 1)
        if section == parser.default_section:
            raise ConfigError(path, section, None, "unknown section").blame({(section, None): item})
        for candidate in sorted(sections, key=len, reverse=True):
            if name.startswith(candidate + ".") and len(name) > len(candidate) + 1:
                section, key = candidate, name[len(candidate) + 1 :]
                break
        if not parser.has_section(section):
            parser.add_section(section)
        parser.set(section, key, value)
        set_by[(section, key)] = item
    return set_by


def load(path: str, overrides: Iterable[str] = ()) -> Config:
    """Read and check a configuration file."""
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keep key case (librdkafka keys)
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f, source=path)
    except OSError as e:
        raise ConfigError(path, "-", None, f"cannot read the file: {e.strerror}") from None
    except configparser.Error as e:
        raise ConfigError(path, "-", None, " ".join(str(e).split())) from None
    except UnicodeDecodeError:
        raise ConfigError(path, "-", None, "the file is not UTF-8") from None
    overrides = tuple(overrides)
    set_by = apply_overrides(parser, overrides, path)
    try:
        return _build(parser, path, overrides, set_by)
    except ConfigError as e:
        raise e.blame(set_by) from None


def _build(
    parser: configparser.ConfigParser, path: str, overrides: tuple[str, ...] = (),
    set_by: Optional[dict[tuple[str, Optional[str]], str]] = None,
) -> Config:
    if parser.defaults():
        raise ConfigError(path, parser.default_section, None, "unknown section")
    known = known_sections()
    for name in parser.sections():
        if name not in known and not name.startswith("stream:"):
            raise ConfigError(path, name, None, "unknown section")

    def section(name: str, cls: Callable[..., T], fields: dict[str, Callable]) -> T:
        given = dict(parser[name]) if parser.has_section(name) else {}
        return cls(**parse_values(path, name, given, fields))

    service = section(
        "eventstreams",
        ServiceConfig,
        {
            "listen": values.endpoint,
            "backend": values.text,
            "heartbeat": values.seconds,
            "id_updates": values.boolean,
            "client_ip_header": values.header_name,
            "client_ip_connection_limit": values.count,
            "max_connections": values.count,
            "workers": _workers,
            "max_lifetime": values.seconds,
            "ring_size": values.positive_count,
            "ring_memory": values.size,
            "max_stream_sets": values.count,
            "hub_linger": values.seconds,
            "fan_out_interval": values.interval,
            "backend_timeout": values.seconds,
            "catchup_consumers": values.positive_count,
            "cors_origin": values.text,
            "content_security_policy": values.text,
            "head_timeout": values.positive_duration,
            "max_pending_heads": values.count,
            "max_pending_heads_per_ip": values.count,
            "request_rate_per_ip": values.number,
            "request_burst_per_ip": values.count,
            "max_body": values.size,
        },
    )
    if service.backend not in ("embedded", "kafka"):
        raise ConfigError(
            path, "eventstreams", "backend", f"expected embedded or kafka, got {service.backend!r}"
        )
    if service.workers > 1 and service.listen.split(":", 1)[0].lower() not in ("tcp", "tcp6"):
        # Worker processes adopt the listening socket: TLS (ssl:) would be
        # lost, and a worker stopping would unlink a unix: socket's path.
        raise ConfigError(
            path, "eventstreams", "listen",
            f"workers > 1 needs a tcp: or tcp6: endpoint (the workers adopt its socket), got {service.listen!r}",
        )
    embedded = section(
        "embedded",
        EmbeddedConfig,
        {"path": values.text, "retention": values.duration, "partitions": values.positive_count},
    )
    if not embedded.path:
        raise ConfigError(path, "embedded", "path", "must not be empty")
    intake = section(
        "intake",
        IntakeConfig,
        {"listen": values.optional_endpoint, "streams": values.names, "max_body": values.size,
         "head_timeout": values.positive_duration, "timeout": values.positive_seconds,
         "dedupe_window": values.duration, "dedupe_max": values.positive_count,
         "schemas": _schemas},
    )
    demo = section(
        "demo",
        DemoConfig,
        {
            "stream": lambda t: t or None,
            "file": lambda t: t or None,
            "rate": values.number,
        },
    )
    metrics = section("metrics", MetricsConfig, {"listen": values.optional_endpoint})
    kafka = dict(parser["kafka"]) if parser.has_section("kafka") else {}

    streams: dict[str, StreamConfig] = {}
    for name in parser.sections():
        if not name.startswith("stream:"):
            continue
        stream_name = name[len("stream:") :]
        try:
            values.names(stream_name)
        except ValueError as e:
            raise ConfigError(path, name, None, str(e)) from None
        streams[stream_name] = section(
            name,
            partial(StreamConfig, name=stream_name),
            {
                "topics": values.names,
                "aliases": values.names,
                "description": values.text,
                "schema_title": values.text,
            },
        )
        if not streams[stream_name].topics:
            raise ConfigError(path, name, "topics", "a stream needs at least one topic")
    if not streams:
        raise ConfigError(path, "stream:NAME", None, "no stream is configured")
    seen: dict[str, str] = {}
    for stream in streams.values():
        for alias in (stream.name,) + stream.aliases:
            if alias in seen and seen[alias] != stream.name:
                raise ConfigError(
                    path, f"stream:{stream.name}", "aliases",
                    f"{alias!r} already names stream {seen[alias]!r}",
                )
            seen[alias] = stream.name

    def check_stream(section_name: str, key: str, name: Optional[str]) -> Optional[str]:
        if name is None:
            return None
        stream = find_stream(streams, name)
        if stream is None:
            raise ConfigError(path, section_name, key, f"no stream named {name!r}")
        return stream.name

    if demo.stream:
        demo = DemoConfig(stream=check_stream("demo", "stream", demo.stream), file=demo.file, rate=demo.rate)
        if demo.rate <= 0:
            raise ConfigError(path, "demo", "rate", "must be above 0 events per second")
    if intake.streams is not None:
        intake = replace(intake, streams=tuple(check_stream("intake", "streams", n) or n for n in intake.streams))

    return Config(
        path=path,
        service=service,
        embedded=embedded,
        kafka=kafka,
        streams=streams,
        intake=intake,
        demo=demo,
        metrics=metrics,
        sections={s: dict(parser[s]) for s in parser.sections()},
        overrides=overrides,
        set_by=set_by or {},
    )
