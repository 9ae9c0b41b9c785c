"""Where a new client starts: Last-Event-ID, `since` or the end of the log."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from .backends.base import Backend, TopicPartition
from .errors import ApiError, bad_last_event_id, unavailable
from .positions import Assignment


@dataclass
class Start:
    tps: list[TopicPartition]
    offsets: dict[TopicPartition, int] = field(default_factory=dict)  # absent: the head
    stamps: dict[TopicPartition, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # told to the client as comments


async def resolve(
    backend: Backend,
    topics: Sequence[str],
    assignments: Optional[list[Assignment]],
    since: Optional[int],
) -> Start:
    """Partitions to follow and their start offsets, clamped to what is retained."""
    partitions: dict[str, list[int]] = {}
    for topic in topics:
        partitions[topic] = await backend.partitions(topic)
    if not any(partitions.values()):
        raise unavailable("none of the topics of the requested streams exist: " + ",".join(topics))

    start = Start(tps=[])
    by_time: list[TopicPartition] = []  # start at `since`
    stamp_lookups: dict[int, list[TopicPartition]] = {}
    if assignments is None:
        start.tps = [(t, p) for t in topics for p in partitions[t]]
        if since is not None:
            by_time = list(start.tps)
    else:
        for a in assignments:
            if a.topic not in partitions:
                raise ApiError(
                    404, "topic_not_found", "Topic Not Found",
                    f"topic {a.topic!r} is not part of the requested streams",
                )
            if a.partition is None:
                tps = [(a.topic, p) for p in partitions[a.topic]]
            else:
                if a.partition not in partitions[a.topic]:
                    raise bad_last_event_id(f"topic {a.topic!r} has no partition {a.partition}")
                tps = [(a.topic, a.partition)]
            start.tps.extend(tps)
            if a.offset is not None:
                start.offsets[tps[0]] = a.offset
                if a.timestamp is not None:
                    start.stamps[tps[0]] = a.timestamp
            elif a.timestamp is not None:
                stamp_lookups.setdefault(a.timestamp, []).extend(tps)
            elif since is not None:
                by_time.extend(tps)
        if not start.tps:
            raise bad_last_event_id("no partition of the requested streams is named")
    if by_time:
        stamp_lookups.setdefault(since, []).extend(by_time)  # type: ignore[arg-type]
    for ts, tps in stamp_lookups.items():
        found = await backend.offsets_for_time(tps, ts)
        for tp in tps:
            start.offsets[tp] = found[tp]
            start.stamps[tp] = ts

    for tp, offset in list(start.offsets.items()):
        low, high = await backend.watermarks(tp)
        if offset < low:
            start.notes.append(
                f"offset {offset} of {tp[0]}/{tp[1]} is no longer retained; "
                f"starting at the oldest retained offset {low}"
            )
            start.offsets[tp] = low
            start.stamps.pop(tp, None)
        elif offset > high:
            start.notes.append(
                f"offset {offset} of {tp[0]}/{tp[1]} is beyond the end; starting at the end ({high})"
            )
            start.offsets[tp] = high
            start.stamps.pop(tp, None)
    return start
