"""`POST /v1/events`: EventGate-compatible intake into the event log.

It listens on its own endpoint (loopback by default) so the public site
never accepts writes unless an operator says so.

An answer is a promise: every event of a POST is listed as stored (with its
position), duplicate (stored earlier, with that position), invalid (with
the reason) or not stored, and a write the log cannot take is a 503 within
`[intake] timeout` seconds. Sending a batch again is always safe: events are
stored once per `meta.id` (see eventstreams.dedupe).

Parsing, the checks and schema validation of a body run in a thread (a 4 MB
body is tens of milliseconds of work); the reactor thread only answers.
"""
from __future__ import annotations

import json
import time
import uuid
from datetime import datetime, timezone
from typing import Any, NamedTuple, Optional, cast

from klein import Klein
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, gatherResults
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.server import Request, Site

from . import strictjson
from .backends.base import Backend, BackendUnavailable
from .config import Config
from .errors import ApiError
from .dedupe import Outcome, Store, UniqueIndexStore, WindowStore
from .validation import SchemaRepository, describe

log = Logger()

WRITE_SHARE = 0.8  # of the timeout for the log's write; the rest is for the answer
RETRY_AFTER = {"log_unavailable": 5, "log_full": 60, "starting": 1}


class Counts:
    """Events posted, by (stream, result): accepted, duplicate, invalid, failed."""

    def __init__(self) -> None:
        self.by_stream: dict[tuple[str, str], int] = {}

    def add(self, stream: str, result: str, n: int = 1) -> None:
        key = (stream, result)
        self.by_stream[key] = self.by_stream.get(key, 0) + n


class LimitedRequest(Request):
    """Stops buffering a body once it is larger than the site's limit."""

    too_large = False
    _received = 0

    def _limit(self) -> int:
        # Site.buildProtocol gives the channel its site (Twisted's types do
        # not say so), and intake_site its limit.
        return cast(Any, self.channel).site.max_body

    def gotLength(self, length: Optional[int]) -> None:
        limit = self._limit()
        if length is not None and length > limit:
            self.too_large = True
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.too_large:
            return
        self._received += len(data)
        if self._received > self._limit():
            self.too_large = True
            assert self.content is not None  # gotLength made it
            self.content.seek(0)
            self.content.truncate()
            return
        super().handleContentChunk(data)


def intake_site(resource: Any, max_body: int) -> Site:
    site = Site(resource, requestFactory=LimitedRequest)
    site.max_body = max_body  # type: ignore[attr-defined]
    return site


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class BadBody(Exception):
    """The body as a whole is not JSON."""


class Prepared:
    """A body after the checks: what to write, per topic, and what is invalid."""

    def __init__(self) -> None:
        self.count = 0
        self.streams: dict[int, str] = {}  # index -> stream name (metrics)
        self.invalid: list[dict] = []
        self.by_topic: dict[str, list[tuple[int, Optional[str], bytes]]] = {}  # (index, meta.id, value)


class TimedOut(Exception):
    pass


def _within(d: Deferred, seconds: float, clock: Any) -> Deferred:
    """d's result, or TimedOut after `seconds` (d itself goes on)."""
    out: Deferred = Deferred()

    def expire() -> None:
        if not out.called:
            out.errback(TimedOut())

    call = clock.callLater(max(0.0, seconds), expire)

    def done(result: Any) -> None:
        if call.active():
            call.cancel()
        if out.called:
            return
        if isinstance(result, Failure):
            out.errback(result)
        else:
            out.callback(result)

    d.addBoth(done)
    return out


class Intake(Service):
    app = Klein()

    def __init__(self, config: Config, backend: Backend, reactor: Any = None):
        if reactor is None:
            from twisted.internet import reactor
        self.config = config
        self.backend = backend
        self.reactor = reactor
        intake = config.intake
        streams = intake.streams
        self.allowed = set(config.streams if streams is None else streams)
        self.counts = Counts()
        self.schemas = SchemaRepository(intake.schemas) if intake.schemas else None
        self.store: Store
        if hasattr(backend, "append_unique"):
            self.store = UniqueIndexStore(backend, intake.dedupe_window)
        else:
            topics = [config.streams[name].topics[0] for name in sorted(self.allowed)]
            self.store = WindowStore(backend, topics, intake.dedupe_window, intake.dedupe_max, reactor)
        self._last_failure = ""

    def startService(self) -> None:
        super().startService()
        self.store.start()

    def stopService(self) -> Any:
        stop = getattr(self.store, "stop", None)
        if stop is not None:
            stop()
        return super().stopService()

    def resource(self) -> Any:
        return self.app.resource()

    # -- answers ------------------------------------------------------------------

    def _reply(self, request: IRequest, answer: ApiError, **fields: Any) -> bytes:
        """Every answer, errors and outcomes alike, in the API's shape
        (ApiError.body: with the request's method and URI), with its
        Retry-After, and a POST's per-event fields."""
        request.setResponseCode(answer.status)
        request.setHeader("content-type", "application/json; charset=utf-8")
        if answer.retry_after:
            request.setHeader("retry-after", str(answer.retry_after))
        body = answer.body(request.method.decode("ascii", "replace"), request.uri.decode("utf-8", "replace"))
        return strictjson.dumps({**body, **fields})

    @app.handle_errors(Exception)
    def unexpected(self, request: IRequest, failure: Any) -> bytes:
        if failure.check(CancelledError):
            return b""
        from werkzeug.exceptions import HTTPException

        if failure.check(HTTPException):
            e = failure.value
            if e.code == 404:
                return self._reply(request, ApiError(404, "not_found", "Not Found",
                                                     "no such resource: events are posted to /v1/events"))
            if e.code == 405:
                request.setHeader("allow", ", ".join(getattr(e, "valid_methods", None) or ["POST"]))
                return self._reply(request, ApiError(405, "method_not_allowed", "Method Not Allowed",
                                                     "/v1/events takes POST only"))
            return self._reply(request, ApiError(e.code, "http_error", e.name, e.description or e.name))
        log.failure("intake request failed", failure)
        return self._reply(request, ApiError(500, "internal_error", "Internal Server Error",
                                             "the request could not be handled; nothing is known to be stored"))

    # -- POST /v1/events -----------------------------------------------------------

    @app.route("/v1/events", methods=["POST"])
    def post(self, request: IRequest) -> Any:
        if getattr(request, "too_large", False):
            return self._reply(request, ApiError(413, "payload_too_large", "Payload Too Large",
                                                 f"the body is larger than {self.config.intake.max_body} bytes"))
        hasty = request.args.get(b"hasty", [b""])[0].lower() in (b"true", b"1")
        return ensureDeferred(self._post(request, request.content.read(), hasty))

    async def _post(self, request: IRequest, raw: bytes, hasty: bool) -> bytes:
        started = time.monotonic()
        timeout = self.config.intake.timeout
        if not self.store.ready:
            try:
                await _within(self.store.when_ready(), timeout * WRITE_SHARE, self.reactor)
            except TimedOut:
                pass
        if not self.store.ready:
            return self._reply(request, ApiError(503, "log_unavailable", "Service Unavailable",
                                                 "the intake is reading the recent event ids back from the log; "
                                                 "nothing was stored", RETRY_AFTER["starting"]),
                               accepted=0, stored=[], duplicate=[], invalid=[], error=[])
        try:
            prepared = await deferToThread(self._prepare, raw)
        except BadBody as e:
            return self._reply(request, ApiError(400, "invalid_json", "Invalid JSON", f"the body is not JSON: {e}"))
        for item in prepared.invalid:
            self.counts.add(prepared.streams.get(item["index"], "-"), "invalid")
        writes = gatherResults(
            [self.store.write(topic, [(i, v) for _, i, v in items], started + timeout * WRITE_SHARE)
             for topic, items in prepared.by_topic.items()],
            consumeErrors=True,
        )
        if hasty:
            writes.addCallback(lambda results: self._outcomes(prepared, results))
            writes.addErrback(lambda f: log.failure("hasty intake write failed", f))
            queued = sum(len(items) for items in prepared.by_topic.values())
            return self._reply(request, ApiError(202, "queued", "Accepted",
                                                 f"{queued} events are being written (hasty: their outcome is not reported)"),
                               accepted=queued, invalid=prepared.invalid)
        try:
            results = await _within(writes, started + timeout - time.monotonic(), self.reactor)
        except TimedOut:
            results = [[Outcome(None, False, _timed_out(timeout))] * len(items)
                       for items in prepared.by_topic.values()]
        return self._answer(request, prepared, self._outcomes(prepared, results))

    def _outcomes(self, prepared: Prepared, results: list[list[Outcome]]) -> dict[int, tuple[str, Outcome]]:
        """index -> (topic, outcome), counted by stream."""
        out: dict[int, tuple[str, Outcome]] = {}
        for (topic, items), outcomes in zip(prepared.by_topic.items(), results):
            for (index, _, _), outcome in zip(items, outcomes):
                out[index] = (topic, outcome)
                result = "failed" if outcome.error else "duplicate" if outcome.duplicate else "accepted"
                self.counts.add(prepared.streams[index], result)
        return out

    def _answer(self, request: IRequest, prepared: Prepared, outcomes: dict[int, tuple[str, Outcome]]) -> bytes:
        stored: list[dict] = []
        duplicate: list[dict] = []
        errors: list[dict] = []
        kinds: set[str] = set()
        for index in sorted(outcomes):
            topic, outcome = outcomes[index]
            if outcome.error is not None:
                kinds.add(outcome.error.kind)
                unknown = outcome.error.maybe_stored
                errors.append({"index": index, "status": "unknown" if unknown else "not_stored",
                               "context": str(outcome.error)})
                continue
            record = outcome.record
            assert record is not None
            where = {"index": index, "topic": topic, "partition": record.partition, "offset": record.offset}
            if outcome.duplicate:
                duplicate.append(where)
            else:
                stored.append(where)
        invalid = prepared.invalid
        fields = {"accepted": len(stored), "stored": stored, "duplicate": duplicate, "invalid": invalid,
                  "error": errors}
        summary = (f"{len(stored)} of {prepared.count} events stored, {len(duplicate)} already stored "
                   f"(duplicate meta.id), {len(invalid)} invalid, {len(errors)} not stored")
        if errors and not stored and not duplicate:
            kind = "log_full" if "log_full" in kinds else "log_unavailable"
            self._report(errors[0]["context"])
            unsure = any(e["status"] == "unknown" for e in errors)
            detail = ("the log is full; " if kind == "log_full" else "the log cannot take writes now; ") + summary + (
                "; some may have reached the log: sending them again is safe (duplicates are recognised)"
                if unsure else "; sending them again is safe")
            return self._reply(request, ApiError(503, kind, "Service Unavailable", detail, RETRY_AFTER[kind]), **fields)
        if errors or invalid:
            if stored or duplicate:
                if errors:
                    self._report(errors[0]["context"])
                return self._reply(request, ApiError(207, "partial", "Multi-Status", summary), **fields)
            return self._reply(request, ApiError(400, "invalid_events", "Invalid Events", summary), **fields)
        kind = "duplicate" if duplicate and not stored else "accepted"
        return self._reply(request, ApiError(201, kind, "Created", summary), **fields)

    def _report(self, context: str) -> None:
        if context != self._last_failure:  # once per distinct problem, not per POST
            self._last_failure = context
            log.warn("intake: events not stored: {context}", context=context)

    # -- the checks (in a thread) ---------------------------------------------------

    def _prepare(self, raw: bytes) -> Prepared:
        try:
            # NaN and Infinity are read here so that the event holding them
            # is refused alone; strictjson.dumps below refuses it.
            body = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise BadBody(str(e)) from None
        events = body if isinstance(body, list) else [body]
        prepared = Prepared()
        prepared.count = len(events)
        for index, event in enumerate(events):
            checked = self._check(event)
            if checked.stream:
                prepared.streams[index] = checked.stream
            if checked.data is None:
                item: dict[str, Any] = {"index": index, "status": "invalid", "context": checked.why}
                if checked.problems:
                    item["errors"] = checked.problems
                if strictjson.problem(event) is None:
                    item["event"] = event
                prepared.invalid.append(item)
                continue
            prepared.by_topic.setdefault(checked.topic, []).append((index, checked.event_id, checked.data))
        return prepared

    def _check(self, event: Any) -> "Checked":
        if not isinstance(event, dict):
            return Checked(why="an event must be a JSON object")
        meta = event.get("meta")
        if not isinstance(meta, dict):
            return Checked(why="the event has no 'meta' object")
        name = meta.get("stream")
        if not isinstance(name, str) or not name:
            return Checked(why="'meta.stream' must name a stream")
        stream = self.config.stream(name)
        if stream is None or stream.name not in self.allowed:
            return Checked(why=f"stream {name!r} is not accepted here")
        for key in ("dt", "id"):
            if key in meta and not isinstance(meta[key], str):
                return Checked(stream.name, why=f"'meta.{key}' must be a string")
        event_id = meta.get("id")  # only a producer's own id can come again
        meta.setdefault("dt", now_iso())
        meta.setdefault("id", str(uuid.uuid4()))
        try:
            data = strictjson.dumps(event)
        except strictjson.NotStrictJSON as e:
            return Checked(stream.name, why=e.detail)
        if self.schemas is not None:
            problems = self.schemas.validate(event)
            if problems:
                return Checked(stream.name, why=describe(problems), problems=problems)
        return Checked(stream.name, stream.topics[0], event_id, data)


class Checked(NamedTuple):
    """One event after the checks: `data` (its JSON) when it is good, else `why`."""

    stream: str = ""
    topic: str = ""
    event_id: Optional[str] = None
    data: Optional[bytes] = None
    why: str = ""
    problems: Optional[list] = None


def _timed_out(timeout: float) -> BackendUnavailable:
    error = BackendUnavailable(f"no answer from the log within {timeout:g} s")
    error.maybe_stored = True
    return error

