"""The `[rcstream]` configuration section."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from eventstreams.config import (
    Config,
    ConfigError,
    _count,
    _duration,
    _optional_endpoint,
    _positive_count,
    _size,
    find_stream,
    parse_values,
)


@dataclass(frozen=True)
class RCStreamConfig:
    stream: str = "mediawiki.recentchange"
    heartbeat: float = 25.0  # seconds between server heartbeats / pings
    session_timeout: float = 60.0  # a session silent this long is closed
    poll_timeout: float = 20.0  # an idle long-poll is answered after this
    max_subscriptions: int = 10
    max_queue: int = 1000  # packets waiting for a slow session; more closes it
    max_post: int = 64 * 1024  # bytes of one polling POST body
    max_sessions: int = 10000  # 0: no limit
    listen: Optional[str] = None  # None: mounted on the [eventstreams] listener
    flush_interval: float = 0.1  # seconds a change may wait to be coalesced (0: each hub batch at once)
    # Limits on what one client can make the server do (issue 12); 0: no limit.
    max_sessions_per_address: int = 100  # open sessions of one client address
    max_handshakes_per_second: int = 10  # new sessions a second from one address (the burst too)
    max_pattern_length: int = 255  # characters of one subscription pattern
    max_patterns_per_second: int = 100  # new patterns compiled a second for one address
    max_message: int = 64 * 1024  # bytes of one WebSocket message (and frame)
    max_json_depth: int = 32  # nesting of the JSON in one packet from a client


def _seconds(text: str) -> float:
    value = _duration(text)
    if value <= 0:
        raise ValueError(f"expected a duration above 0, got {text!r}")
    return value


FIELDS: dict[str, Callable] = {
    "stream": lambda t: t,
    "heartbeat": _seconds,
    "session_timeout": _seconds,
    "poll_timeout": _seconds,
    "max_subscriptions": _positive_count,
    "max_queue": _positive_count,
    "max_post": _size,
    "max_sessions": _count,
    "listen": _optional_endpoint,
    "flush_interval": _duration,
    "max_sessions_per_address": _count,
    "max_handshakes_per_second": _count,
    "max_pattern_length": _positive_count,
    "max_patterns_per_second": _count,
    "max_message": _size,
    "max_json_depth": _positive_count,
}


def parse(config: Config) -> Optional[RCStreamConfig]:
    """The bridge's settings, or None when `[rcstream]` is absent (bridge off)."""
    values = config.sections.get("rcstream")
    if values is None:
        return None
    kwargs = parse_values(config.path, "rcstream", values, FIELDS)
    result = RCStreamConfig(**kwargs)
    stream = find_stream(config.streams, result.stream)
    if stream is None:
        raise ConfigError(config.path, "rcstream", "stream", f"no stream named {result.stream!r}")
    if result.flush_interval > 1:
        raise ConfigError(config.path, "rcstream", "flush_interval", "must be at most 1 second")
    if result.heartbeat >= result.session_timeout:
        raise ConfigError(config.path, "rcstream", "heartbeat", "must be shorter than session_timeout")
    if result.listen is None and config.service.workers > 1:
        # A Socket.IO session spans many requests; on the shared listener
        # they would land on different processes.
        raise ConfigError(config.path, "rcstream", "listen",
                          "required with [eventstreams] workers > 1 (a listener of its own, served by the main process)")
    return RCStreamConfig(**{**kwargs, "stream": stream.name})
