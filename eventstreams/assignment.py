"""Where a new client starts: Last-Event-ID, `since` or the end of the log.

An id entry's offset is used where it is valid: in the log the id names
(`cluster`), or when it names none (upstream's format, as before). An entry
from another cluster is resumed by time: the first record of its
millisecond here, plus the `n` records of that millisecond the client
already has. MirrorMaker copies each partition's records in order with
their timestamps, so that is exactly where the client left off. When this
log does not hold what the id says was delivered, the client is told in a
`:` comment and resumes at the millisecond's first record: some events may
come twice, none is skipped.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Optional, Sequence

from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from .backends.base import Backend, TopicPartition
from .errors import ApiError, bad_last_event_id, unavailable
from .positions import Assignment, Mark

log = Logger()

MIRROR_WAIT = 5.0  # seconds a resume waits for a lagging mirror to hold the id's records
MIRROR_POLL = 0.1  # seconds between its looks
LOOK_BACK = 100  # records read back to count the last millisecond's records before an offset
MARK_WAIT = 2.0  # seconds a new hub waits for those reads


@dataclass
class Start:
    tps: list[TopicPartition]
    offsets: dict[TopicPartition, int] = field(default_factory=dict)  # absent: the head
    stamps: dict[TopicPartition, Mark] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # told to the client as comments


def _ms_text(ms: int) -> str:
    try:
        return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="milliseconds")
    except (OverflowError, ValueError, OSError):
        return str(ms)


async def resolve(
    backend: Backend,
    topics: Sequence[str],
    assignments: Optional[list[Assignment]],
    since: Optional[int],
    clock: Any = None,
    mirror_wait: float = MIRROR_WAIT,
) -> Start:
    """Partitions to follow and their start offsets, clamped to what is retained."""
    here = await backend.identity()
    partitions: dict[str, list[int]] = {}
    for topic in topics:
        partitions[topic] = await backend.partitions(topic)
    if not any(partitions.values()):
        raise unavailable("none of the topics of the requested streams exist: " + ",".join(topics))

    start = Start(tps=[])
    by_time: dict[int, list[TopicPartition]] = {}  # first record at or after the time
    inside: list[tuple[TopicPartition, int, int]] = []  # (tp, ms, n): n records of ms delivered
    unmarked: list[TopicPartition] = []  # offsets whose mark is counted from the log
    if assignments is None:
        start.tps = [(t, p) for t in topics for p in partitions[t]]
        if since is not None:
            by_time[since] = list(start.tps)
    else:
        foreign_topics: dict[str, int] = {}  # topic -> earliest millisecond of its foreign entries
        for a in assignments:
            if a.topic not in partitions:
                raise ApiError(
                    404, "topic_not_found", "Topic Not Found",
                    f"topic {a.topic!r} is not part of the requested streams",
                )
            foreign = a.cluster is not None and a.cluster != here
            if foreign and a.timestamp is not None:
                ms = a.timestamp - 1 if a.count else a.timestamp
                foreign_topics[a.topic] = min(ms, foreign_topics.get(a.topic, ms))
            if a.partition is None:
                tps = [(a.topic, p) for p in partitions[a.topic]]
            elif a.partition in partitions[a.topic]:
                tps = [(a.topic, a.partition)]
            elif foreign and a.timestamp is not None:
                start.notes.append(
                    f"{a.topic} has no partition {a.partition} in this cluster: the mirrored topic "
                    f"has other partitions than in {a.cluster}; its partitions are resumed by time "
                    "(some events may repeat)")
                continue
            else:
                raise bad_last_event_id(f"topic {a.topic!r} has no partition {a.partition}")
            start.tps.extend(tps)
            tp = tps[0]
            if a.offset is not None and not foreign:
                start.offsets[tp] = a.offset
                if a.timestamp is not None:
                    start.stamps[tp] = (a.timestamp, a.count)
                else:
                    unmarked.append(tp)
            elif a.timestamp is not None:
                if a.count and a.partition is not None:
                    inside.append((tp, a.timestamp - 1, a.count))
                else:
                    by_time.setdefault(a.timestamp, []).extend(tps)
            elif a.offset is not None:
                low, _ = await backend.watermarks(tp)
                start.notes.append(
                    f"offset {a.offset} of {tp[0]}/{tp[1]} belongs to cluster {a.cluster} and the id "
                    f"has no timestamp for it; starting at the oldest record here ({low}); "
                    "some events may repeat")
                start.offsets[tp] = low
                unmarked.append(tp)
            elif since is not None:
                by_time.setdefault(since, []).extend(tps)
        # An id lists every partition of its topics; partitions it does not
        # name here mean the mirrored topic is partitioned differently.
        for topic, ms in foreign_topics.items():
            named = set(start.tps)
            missing = [(topic, p) for p in partitions[topic] if (topic, p) not in named]
            if missing:
                start.notes.append(
                    f"the id does not name partition(s) {','.join(str(p) for _, p in missing)} of "
                    f"{topic}, which this cluster has: resuming them at {_ms_text(ms)} "
                    "(some events may repeat)")
                start.tps.extend(missing)
                by_time.setdefault(ms, []).extend(missing)
        if not start.tps:
            raise bad_last_event_id("no partition of the requested streams is named")
    for ts, tps in by_time.items():
        found = await backend.offsets_for_time(tps, ts)
        for tp in tps:
            start.offsets[tp] = found[tp]
            start.stamps[tp] = (ts, 0)
    if inside:
        if clock is None:
            from twisted.internet import reactor as clock
        for tp, ms, n in inside:
            await _resume_inside(backend, start, tp, ms, n, clock, mirror_wait)

    for tp, offset in list(start.offsets.items()):
        low, high = await backend.watermarks(tp)
        if offset < low:
            start.notes.append(
                f"offset {offset} of {tp[0]}/{tp[1]} is no longer retained; "
                f"starting at the oldest retained offset {low}"
            )
            start.offsets[tp] = low
            start.stamps.pop(tp, None)
            unmarked.append(tp)
        elif offset > high:
            start.notes.append(
                f"offset {offset} of {tp[0]}/{tp[1]} is beyond the end; starting at the end ({high})"
            )
            start.offsets[tp] = high
            start.stamps.pop(tp, None)
            unmarked.append(tp)
    unmarked = list(dict.fromkeys(unmarked))
    for tp, (_, mark) in zip(unmarked, await marks_at(
            backend, unmarked, [(None, start.offsets[tp]) for tp in unmarked], clock)):
        if mark is not None:
            start.stamps[tp] = mark
    return start


async def _resume_inside(backend: Backend, start: Start, tp: TopicPartition, ms: int, n: int,
                         clock: Any, wait: float) -> None:
    """Start tp after the first n records of millisecond ms, if this log
    holds them; else at the first of them, saying so."""
    deadline = clock.seconds() + wait
    while True:
        first = (await backend.offsets_for_time([tp], ms))[tp]
        after = (await backend.offsets_for_time([tp], ms + 1))[tp]  # past the millisecond, or the end
        low, high = await backend.watermarks(tp)
        if first + n <= after or after < high or clock.seconds() >= deadline:
            break
        await deferLater(clock, MIRROR_POLL, lambda: None)  # the mirror lags: let it catch up
    where = f"{tp[0]}/{tp[1]}"
    problem = None
    if first + n > after:
        problem = (f"this cluster has {after - first} record(s) of {_ms_text(ms)} in {where}, "
                   f"the id counts {n} delivered")
        if after < high:
            problem += " (the mirror did not keep their order and timestamps)"
    elif first == low and low > 0:
        problem = f"the start of {_ms_text(ms)} in {where} may be no longer retained here"
    if problem is None:
        start.offsets[tp] = first + n
        start.stamps[tp] = (ms + 1, n)
        return
    start.notes.append(f"{problem}; resuming at the first record of that millisecond "
                       f"(offset {first}); some events may repeat")
    start.offsets[tp] = first
    start.stamps[tp] = (ms, 0)


async def mark_before(backend: Backend, tp: TopicPartition, offset: int,
                      low: Optional[int] = None) -> Optional[Mark]:
    """The mark of a position: the timestamp of the record before it + 1 and
    how many records in a row end there with that timestamp (at most
    LOOK_BACK are counted: fewer only means more may repeat elsewhere).
    None when nothing before it is retained."""
    if low is None:
        low, _ = await backend.watermarks(tp)
    if offset <= low:
        return None
    position = max(low, offset - LOOK_BACK)
    records = []
    while position < offset:
        got = sorted((r for r in await backend.read({tp: position}, offset - position)
                      if r.tp == tp and position <= r.offset < offset), key=lambda r: r.offset)
        if not got:
            break
        records += got
        position = got[-1].offset + 1
    if not records or records[-1].offset != offset - 1:
        return None
    timestamp = records[-1].timestamp
    n = 0
    for record in reversed(records):
        if record.timestamp != timestamp:
            break
        n += 1
    return (timestamp + 1, n)


async def marks_at(backend: Backend, tps: Sequence[TopicPartition],
                   positions: Sequence[tuple[Optional[int], int]],
                   clock: Any = None) -> list[tuple[int, Optional[Mark]]]:
    """(offset, mark) for each (first retained offset or None, offset): a
    new hub's starting slots, or a start whose id has no mark. The
    partitions are read at once, for at most MARK_WAIT seconds; one whose
    mark is not read by then goes without (its first id counts from 1)."""
    if clock is None:
        from twisted.internet import reactor as clock

    def without(failure: Failure, tp: TopicPartition) -> None:
        log.warn("cannot read the last records of {tp}: {error}", tp=tp, error=failure.getErrorMessage())

    reads = [ensureDeferred(mark_before(backend, tp, offset, low)).addTimeout(MARK_WAIT, clock)
             .addErrback(without, tp) for tp, (low, offset) in zip(tps, positions)]
    found = await gatherResults(reads)
    return [(offset, mark) for (_, offset), mark in zip(positions, found)]
