"""The [irc] section, parsed into a frozen IRCConfig (None: the bridge is off)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional

from eventstreams import values
from eventstreams.config import Config, ConfigError, declare_section

_WORD = re.compile(r"[^\s:,\x00\x07]+")


def _word(text: str) -> str:
    if not _WORD.fullmatch(text):
        raise ValueError(f"expected one word without spaces, ':' or ',', got {text!r}")
    return text


def _motd(text: str) -> tuple[str, ...]:
    """One MOTD line per line of the value (INI continuation lines)."""
    lines = [line.strip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    while lines and not lines[0]:
        lines.pop(0)
    return tuple(lines)


@dataclass(frozen=True)
class IRCConfig:
    listen: str = "tcp:6667"
    servername: str = "irc.wikimedia.org"
    botname: str = "rc-pmtpa"
    network: str = "Wikimedia"
    stream: str = "mediawiki.recentchange"  # resolved to the stream's name
    motd: tuple[str, ...] = (
        "*******************************************************",
        "This is the Wikimedia RC->IRC gateway",
        "*******************************************************",
        "Sending messages to channels is not allowed.",
        "",
        "A channel exists for all Wikimedia wikis which have been",
        "changed since the last time the server was restarted. In",
        "general, the name is just the domain name with the .org",
        "left off. For example, the changes on the English Wikipedia",
        "are available at #en.wikipedia",
    )
    ping_interval: float = 45.0
    ping_timeout: float = 180.0
    queue_size: int = 1000  # lines waiting for one slow client
    flush_interval: float = 0.1  # seconds a line may wait to be coalesced (0: write each batch at once)
    # What one client may cost (issue 12); 0 = no limit for the counts.
    max_clients: int = 10000  # connections in all
    max_clients_per_address: int = 50  # connections from one address
    connect_rate_per_address: float = 2.0  # new connections a second from one address (ircd "throttle")
    connect_burst_per_address: int = 20  # of those, how many at once
    registration_timeout: float = 60.0  # seconds from connect to NICK + USER done
    flood_rate: float = 10.0  # commands a second, sustained (token bucket refill)
    flood_burst: int = 20  # commands at once (bucket size)
    flood_buffer: int = 16384  # bytes of received commands waiting their turn; beyond: Excess Flood


FIELDS: dict[str, Callable] = declare_section("irc", {
    "listen": values.endpoint,
    "servername": _word,
    "botname": _word,
    "network": _word,
    "stream": values.text,
    "motd": _motd,
    "ping_interval": values.seconds,
    "ping_timeout": values.seconds,
    "queue_size": values.positive_count,
    "flush_interval": values.seconds,
    "max_clients": values.count,
    "max_clients_per_address": values.count,
    "connect_rate_per_address": values.number,
    "connect_burst_per_address": values.count,
    "registration_timeout": values.duration,
    "flood_rate": values.number,
    "flood_burst": values.positive_count,
    "flood_buffer": values.size,
})


def irc_config(config: Config) -> Optional[IRCConfig]:
    """The bridge's settings, or None without an [irc] section (or with
    `listen = none`). Raises ConfigError, like the core sections."""
    given = config.sections.get("irc")
    if given is None or given.get("listen", "").strip().lower() in ("none", "off", "no"):
        return None
    kwargs = config.bridge_values("irc") or {}
    if "listen" not in kwargs:
        raise ConfigError(config.path, "irc", "listen", "required (an endpoint string such as tcp:6667)")
    result = IRCConfig(**kwargs)
    stream = config.stream(result.stream)
    if stream is None:
        raise ConfigError(config.path, "irc", "stream", f"no stream named {result.stream!r}")
    if result.ping_interval <= 0:
        raise ConfigError(config.path, "irc", "ping_interval", "must be above 0 seconds")
    if result.ping_timeout <= 0:
        raise ConfigError(config.path, "irc", "ping_timeout", "must be above 0 seconds")
    if result.registration_timeout <= 0:
        raise ConfigError(config.path, "irc", "registration_timeout", "must be above 0 seconds")
    if result.flood_rate <= 0:
        raise ConfigError(config.path, "irc", "flood_rate", "must be above 0 commands a second")
    if result.flood_buffer < 512:
        raise ConfigError(config.path, "irc", "flood_buffer", "must be at least 512 bytes (one IRC line)")
    if result.flush_interval > 1:
        raise ConfigError(config.path, "irc", "flush_interval", "must be at most 1 second")
    return IRCConfig(**{**kwargs, "stream": stream.name})

