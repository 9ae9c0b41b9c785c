"""The demo feed: replays bundled sample events into a stream so it looks live.

The bundled sample is 97.6% wikidatawiki: replayed in file order, a filter on
any other wiki would wait minutes. The wikis take turns instead."""
from __future__ import annotations

import json
import os
import uuid
from datetime import datetime, timezone
from typing import Optional

from twisted.application.service import Service
from twisted.internet.defer import gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from .backends.base import Backend
from .config import StreamConfig

log = Logger()

SAMPLE_EVENTS = os.path.join(os.path.dirname(__file__), "data", "recentchange-combined.jsonl")
LEGACY_SCHEMA = "/mediawiki/recentchange/1.0.0"
TICK = 0.1  # seconds between writes; events per write follow the rate


def load_events(path: str) -> list[dict]:
    """JSON objects, one per line; other lines are skipped."""
    events = []
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except (ValueError, RecursionError):
                log.warn("{path}:{number}: not JSON, skipped", path=path, number=number)
                continue
            if isinstance(event, dict):
                events.append(event)
    return events


def by_wiki(events: list[dict]) -> list[list[dict]]:
    """The events grouped by wiki (`wiki`, else `meta.domain`), each group in
    file order, the groups in the order each first appears. Canary events
    (upstream's monitoring probes) stay with the event before them, as rare
    as in the file, not a wiki of their own."""
    groups: dict[object, list[dict]] = {}
    group: list[dict] = []
    for event in events:
        key = event.get("wiki") or (event.get("meta") or {}).get("domain")
        if key != "canary" or not group:
            group = groups.setdefault(key if isinstance(key, str) else None, [])
        group.append(event)
    return list(groups.values())


def restamp(event: dict, stream: str, now: float) -> dict:
    """A copy of a sample event that looks as if it just happened."""
    event = dict(event)
    meta = dict(event.get("meta") or {})
    for key in ("topic", "partition", "offset"):
        meta.pop(key, None)
    meta["id"] = str(uuid.uuid4())
    meta["dt"] = datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    meta["stream"] = stream
    event["meta"] = meta
    # The 2018 samples name their schema the old way (meta.schema_uri):
    # they are valid /mediawiki/recentchange/1.0.0 events (the intake's
    # schema validation checks each sample so in tests).
    event.setdefault("$schema", LEGACY_SCHEMA)
    if isinstance(event.get("timestamp"), int):
        event["timestamp"] = int(now)
    return event


class DemoFeed(Service):
    def __init__(
        self,
        backend: Backend,
        stream: StreamConfig,
        rate: float,
        path: Optional[str],
        clock: IReactorTime,
    ):
        self.backend = backend
        self.stream = stream
        self.rate = rate
        self.path = path or SAMPLE_EVENTS
        self.clock = clock
        self.events: list[dict] = []
        self.groups: list[list[dict]] = []  # the events by wiki, replayed in turn
        self.next = 0  # writes so far: the wiki is next % len(groups), its event next // len(groups)
        self.written = 0
        self._due = 0.0
        self._busy = False
        self._last_error = ""
        self._loop = LoopingCall(self._tick)
        self._loop.clock = clock

    def startService(self) -> None:
        super().startService()
        d = deferToThread(load_events, self.path)

        def loaded(events: list[dict]) -> None:
            if not events:
                log.error("demo feed: no events in {path}", path=self.path)
                return
            self.events = events
            self.groups = by_wiki(events)
            log.info("demo feed: replaying {n} events from {path} into {stream} at {rate}/s",
                     n=len(events), path=self.path, stream=self.stream.name, rate=self.rate)
            if self.running:
                self._loop.start(TICK, now=True)

        d.addCallbacks(loaded, lambda f: log.failure("demo feed: cannot read {path}", f, path=self.path))

    def stopService(self) -> None:
        if self._loop.running:
            self._loop.stop()
        return super().stopService()

    def sample(self) -> dict:
        """The next sample: the wikis take turns (a filter on any of them
        sees events within seconds), each cycling through its own events."""
        groups = self.groups
        group = groups[self.next % len(groups)]
        event = group[(self.next // len(groups)) % len(group)]
        self.next += 1
        return event

    def _tick(self) -> None:
        self._due += self.rate * TICK
        count = int(self._due)
        if count == 0 or self._busy:
            return
        self._due -= count
        now = self.clock.seconds()
        by_topic: dict[str, list[tuple[None, bytes]]] = {}
        topics = self.stream.topics
        for _ in range(count):
            sample = self.sample()
            sample_topic = (sample.get("meta") or {}).get("topic")
            topic = sample_topic if sample_topic in topics else topics[0]
            event = restamp(sample, self.stream.name, now)
            data = json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
            by_topic.setdefault(topic, []).append((None, data))
        self._busy = True
        pending = [self.backend.append(topic, values) for topic, values in by_topic.items()]
        def written(results: list) -> None:
            self._busy = False
            self._last_error = ""
            self.written += sum(len(r) for r in results)

        def failed(failure) -> None:
            self._busy = False
            if failure.getErrorMessage() != self._last_error:  # once per distinct problem
                self._last_error = failure.getErrorMessage()
                log.failure("demo feed: write failed", failure)

        gatherResults(pending, consumeErrors=True).addCallbacks(written, failed)
