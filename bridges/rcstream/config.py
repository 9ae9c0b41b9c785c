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
    max_sessions: int = 0  # 0: no limit
    listen: Optional[str] = None  # None: mounted on the [eventstreams] listener
    flush_interval: float = 0.1  # seconds a change may wait to be coalesced (0: each hub batch at once)


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
