"""The `[rcstream]` configuration section."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from eventstreams import values
from eventstreams.config import Config, ConfigError, declare_section, find_stream


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


FIELDS: dict[str, Callable] = declare_section("rcstream", {
    "stream": values.text,
    "heartbeat": values.positive_duration,
    "session_timeout": values.positive_duration,
    "poll_timeout": values.positive_duration,
    "max_subscriptions": values.positive_count,
    "max_queue": values.positive_count,
    "max_post": values.size,
    "max_sessions": values.count,
    "listen": values.optional_endpoint,
    "flush_interval": values.duration,
    "max_sessions_per_address": values.count,
    "max_handshakes_per_second": values.count,
    "max_pattern_length": values.positive_count,
    "max_patterns_per_second": values.count,
    "max_message": values.size,
    "max_json_depth": values.positive_count,
})


def parse(config: Config) -> Optional[RCStreamConfig]:
    """The bridge's settings, or None when `[rcstream]` is absent (bridge off)."""
    kwargs = config.bridge_values("rcstream")
    if kwargs is None:
        return None
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
