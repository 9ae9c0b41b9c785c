"""The daemon's log: text or JSON lines, warnings and errors rate-limited,
and the access log of stream requests.

twistd builds its log observer after makeService, from an `ILogObserver`
component of the application when there is one (the documented way for a
.tac file): `LoggingRoot`, the service makeService returns, sets that
component when twistd attaches it to the application. `[log] format = json`
writes one JSON object per line, for journald, Logstash or Loki: `time`
(ISO 8601, UTC), `level`, `namespace`, `message` (the formatted text), and
every field of the event (an access line has client, stream, status, bytes
and duration), plus `system` and `traceback` when the event has them.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import IO, Any, Callable, Optional

from twisted.application.service import MultiService
from twisted.logger import (
    ILogObserver,
    LogLevel,
    Logger,
    formatEvent,
    textFileLogObserver,
)
from twisted.web.server import Site
from zope.interface import implementer

from . import values
from .config import Config, parse_values
from .httpchannel import Throttled

access = Logger(namespace="eventstreams.access")

FORMATS = ("text", "json")
RATE_WINDOW = 60.0  # seconds over which `rate_limit` lines of one kind are let through


@dataclass(frozen=True)
class LogConfig:
    format: str = "text"
    rate_limit: int = 10  # warnings/errors of one kind per minute; 0 = no limit


def _format(text: str) -> str:
    if text not in FORMATS:
        raise ValueError(f"expected text or json, got {text!r}")
    return text


def parse(config: Config) -> LogConfig:
    """The `[log]` section (all keys optional)."""
    given = config.sections.get("log", {})
    return LogConfig(**parse_values(config.path, "log", given, {"format": _format, "rate_limit": values.count}))


# -- JSON lines ----------------------------------------------------------------

# Keys of twisted's (and twisted.python.log's legacy) events that are not the
# event's own fields.
_INTERNAL = {"message", "format", "isError", "why", "failure", "system", "time", "printed"}


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)


def event_as_json(event: dict) -> str:
    """One log event as one line of JSON (no newline in it)."""
    stamp = event.get("log_time") or time.time()
    level = event.get("log_level") or LogLevel.info
    out: dict[str, Any] = {
        "time": datetime.fromtimestamp(stamp, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "level": level.name,
        "namespace": event.get("log_namespace", "-"),
        "message": formatEvent(event),
    }
    for key, value in event.items():
        if not key.startswith("log_") and key not in _INTERNAL and key not in out:
            out[key] = _jsonable(value)
    system = event.get("log_system")
    if system and system != "-":
        out["system"] = system
    failure = event.get("log_failure")
    if failure is not None:
        out["traceback"] = failure.getTraceback()
    return json.dumps(out, ensure_ascii=False, separators=(",", ":"), default=repr)


@implementer(ILogObserver)
class JSONLines:
    """Writes each event as one JSON line and flushes (the journal reads a pipe)."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def __call__(self, event: dict) -> None:
        try:
            line = event_as_json(event)
        except Exception as e:  # a log line must never take the daemon down
            line = json.dumps({"level": "error", "namespace": "eventstreams.logs",
                               "message": f"unloggable event: {e!r}"})
        self.out.write(line + "\n")
        self.out.flush()


# -- rate limit ----------------------------------------------------------------


@implementer(ILogObserver)
class RateLimited:
    """Passes every event below `warn` (and what was written to stdout or
    stderr); of warnings and errors, at most `limit`
    of one kind (namespace and format string) per `window` seconds. The first
    line of a kind after some were dropped carries `suppressed`, the count."""

    def __init__(self, observer: Callable[[dict], None], limit: int, window: float = RATE_WINDOW,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.observer, self.limit, self.window, self.clock = observer, limit, window, clock
        self.kinds: dict[tuple[str, str], list] = {}  # kind -> [window start, passed, suppressed]

    def __call__(self, event: dict) -> None:
        level = event.get("log_level")
        if self.limit <= 0 or level is None or level < LogLevel.warn or "log_io" in event:
            return self.observer(event)  # (stderr's lines, a traceback's among them, pass whole)
        key = (str(event.get("log_namespace")), str(event.get("log_format")))
        now = self.clock()
        state = self.kinds.get(key)
        if state is None or now - state[0] >= self.window:
            suppressed = state[2] if state is not None else 0
            if state is None and len(self.kinds) >= 1000:  # bounded: forget old kinds
                self.kinds = {k: s for k, s in self.kinds.items() if now - s[0] < self.window}
            state = self.kinds[key] = [now, 0, suppressed]
        if state[1] >= self.limit:
            state[2] += 1
            return None
        state[1] += 1
        if state[2]:
            event = dict(event, suppressed=state[2])
            event["log_format"] = str(event.get("log_format") or "") + " ({suppressed} similar lines suppressed)"
            state[2] = 0
        return self.observer(event)


def observer_for(settings: LogConfig, out: IO[str]) -> ILogObserver:
    """The daemon's observer: text (twistd's own format) or JSON lines."""
    base = JSONLines(out) if settings.format == "json" else textFileLogObserver(out)
    return RateLimited(base, settings.rate_limit)


def _log_file(options: Any) -> Optional[IO[str]]:
    """Where twistd would log (--logfile; standard output with --nodaemon;
    else twistd.log), or None for --syslog (twistd's own observer)."""
    parent = getattr(options, "parent", None)  # twistd's options (`twist` has its own)
    if parent is None or "nodaemon" not in parent:
        return sys.stdout
    if parent.get("syslog"):
        return None
    name = parent.get("logfile")
    if (name == "-" or not name) and parent.get("nodaemon"):
        return sys.stdout
    from twisted.python.logfile import LogFile

    return LogFile.fromFullPath(name if name and name != "-" else "twistd.log")


class LoggingRoot(MultiService):
    """The service makeService returns: sets the log observer on the
    application twistd attaches it to (runners without an application,
    such as `twist`, keep their own observer)."""

    def __init__(self, observer: Optional[ILogObserver] = None) -> None:
        super().__init__()
        self.observer = observer

    def setServiceParent(self, parent: Any) -> None:
        set_component = getattr(parent, "setComponent", None)
        if self.observer is not None and set_component is not None:
            set_component(ILogObserver, self.observer)
        super().setServiceParent(parent)


def root_for(config: Config, options: Any) -> LoggingRoot:
    """The root service for twistd, logging as `[log]` says (ConfigError if it is wrong)."""
    settings = parse(config)
    out = _log_file(options)
    return LoggingRoot(observer_for(settings, out) if out is not None else None)


# -- the access log ------------------------------------------------------------


def stream_finished(client: str, streams: str, status: int, sent: int, duration: float, uri: str) -> None:
    """One line per finished stream request, at info."""
    access.info(
        "{client} GET {uri} {status} {bytes} bytes {duration:.3f} s",
        client=client, stream=streams, status=status, bytes=sent, duration=round(duration, 3), uri=uri,
    )


class ApiSite(Site):
    """twisted.web's access line for every request but the streams, which
    have their own, with their fields (stream_finished)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.refusals = Throttled(self.reactor)  # refusals come in floods: a few lines, then a count

    def log(self, request: Any) -> None:
        if getattr(request, "path", b"").startswith(b"/v2/stream/"):
            return
        if getattr(request, "code", None) in (429, 503):
            suppressed = self.refusals.admit()
            if suppressed is None:
                return
            if suppressed:
                access.info("{n} refused requests (429 or 503) not logged", n=suppressed)
        super().log(request)

