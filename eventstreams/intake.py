"""`POST /v1/events`: EventGate-compatible intake into the event log.

It listens on its own endpoint (loopback by default) so the public site
never accepts writes unless an operator says so.
"""
from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from typing import Any, Optional

from klein import Klein
from twisted.internet.defer import ensureDeferred
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.server import Request, Site

from .backends.base import Backend
from .config import Config

log = Logger()


class Counts:
    def __init__(self) -> None:
        self.accepted = 0
        self.invalid = 0
        self.failed = 0


class LimitedRequest(Request):
    """Stops buffering a body once it is larger than the site's limit."""

    too_large = False
    _received = 0

    def gotLength(self, length: Optional[int]) -> None:
        limit = self.channel.site.max_body
        if length is not None and length > limit:
            self.too_large = True
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.too_large:
            return
        self._received += len(data)
        if self._received > self.channel.site.max_body:
            self.too_large = True
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


class Intake:
    app = Klein()

    def __init__(self, config: Config, backend: Backend):
        self.config = config
        self.backend = backend
        streams = config.intake.streams
        self.allowed = set(config.streams if streams is None else streams)
        self.counts = Counts()

    def resource(self) -> Any:
        return self.app.resource()

    def _reply(self, request: IRequest, status: int, body: dict) -> bytes:
        request.setResponseCode(status)
        request.setHeader("content-type", "application/json; charset=utf-8")
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    @app.route("/v1/events", methods=["POST"])
    def post(self, request: IRequest) -> Any:
        if getattr(request, "too_large", False):
            return self._reply(request, 413, {
                "status": 413, "type": "payload_too_large", "title": "Payload Too Large",
                "detail": f"the body is larger than {self.config.intake.max_body} bytes",
            })
        try:
            body = json.loads(request.content.read())
        except (ValueError, RecursionError) as e:
            return self._reply(request, 400, {
                "status": 400, "type": "invalid_json", "title": "Invalid JSON",
                "detail": f"the body is not JSON: {e}",
            })
        events = body if isinstance(body, list) else [body]
        hasty = request.args.get(b"hasty", [b""])[0].lower() in (b"true", b"1")
        d = ensureDeferred(self._write(events))
        if hasty:
            d.addErrback(lambda f: log.failure("hasty intake write failed", f))
            return self._reply(request, 202, {"accepted": len(events)})
        return d.addCallback(lambda result: self._reply(request, *result))

    def _check(self, event: Any) -> tuple[Optional[str], str]:
        """(topic, '') for a good event, (None, why) for a bad one."""
        if not isinstance(event, dict):
            return None, "an event must be a JSON object"
        meta = event.get("meta")
        if not isinstance(meta, dict):
            return None, "the event has no 'meta' object"
        name = meta.get("stream")
        if not isinstance(name, str) or not name:
            return None, "'meta.stream' must name a stream"
        stream = self.config.stream(name)
        if stream is None or stream.name not in self.allowed:
            return None, f"stream {name!r} is not accepted here"
        for key in ("dt", "id"):
            if key in meta and not isinstance(meta[key], str):
                return None, f"'meta.{key}' must be a string"
        meta.setdefault("dt", now_iso())
        meta.setdefault("id", str(uuid.uuid4()))
        return stream.topics[0], ""

    async def _write(self, events: list) -> tuple[int, dict]:
        invalid: list[dict] = []
        by_topic: dict[str, list[tuple[None, bytes]]] = {}
        for index, event in enumerate(events):
            topic, why = self._check(event)
            if topic is None:
                invalid.append({"index": index, "status": "invalid", "event": event, "context": why})
                continue
            data = json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
            by_topic.setdefault(topic, []).append((None, data))
        errors: list[dict] = []
        accepted = 0
        for topic, values in by_topic.items():
            try:
                await self.backend.append(topic, values)
                accepted += len(values)
            except Exception as e:
                log.failure("intake write to {topic} failed", topic=topic)
                errors.append({"topic": topic, "status": "error", "count": len(values), "context": str(e)})
        self.counts.accepted += accepted
        self.counts.invalid += len(invalid)
        self.counts.failed += sum(e["count"] for e in errors)
        body = {"accepted": accepted, "invalid": invalid, "error": errors}
        if not invalid and not errors:
            return 201, body
        if accepted:
            return 207, body
        return (500 if errors and not invalid else 400), body
