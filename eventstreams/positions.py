"""Event ids, the Last-Event-ID header and the `since` parameter.

A client resumes a stream by sending back the last `id:` it saw as the
Last-Event-ID header; the header is untrusted input, so it is parsed
strictly and every rejection says exactly what is wrong (the message goes
back to the client in a 400 `invalid_last_event_id`).

An id entry is upstream's `{topic, partition, offset, timestamp}` (offset:
the next to read; timestamp: the last delivered record's + 1 ms) plus two
keys of our own, so that it resumes exactly in a mirrored cluster too:
`n`, how many records of the millisecond `timestamp - 1` the client already
has (absent: none, the position is at a millisecond boundary), and, on the
first entry, `cluster`, the log whose offsets these are (see README "Two
datacenters").
"""

from __future__ import annotations

import email.utils
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

__all__ = [
    "Assignment",
    "PositionError",
    "TimestampError",
    "Mark",
    "advance",
    "encode_id",
    "id_fragment",
    "parse_last_event_id",
    "parse_since",
]

MAX_ID_BYTES = 64 * 1024
MAX_ID_ENTRIES = 1000

# Kafka partitions are int32 and offsets/timestamps int64; anything larger
# cannot be a real position and would only fail later, deeper in the stack.
MAX_PARTITION = 2**31 - 1
MAX_INT64 = 2**63 - 1

# JavaScript's largest Date (ms); upstream cannot express a later `since`.
MAX_SINCE_MS = 8_640_000_000_000_000
MAX_CLUSTER = 255  # characters of a cluster name in an id

# Where a partition stands in time: (the timestamp to resume at, i.e. the
# last delivered record's + 1, and how many records of the millisecond
# before it were delivered; 0 = at the millisecond boundary).
Mark = tuple[int, int]


def advance(mark: "Mark | None", timestamp: int) -> Mark:
    """The mark after delivering a record with this timestamp.

    Counting the records of one millisecond in offset order is what lets a
    mirrored cluster (same order, same timestamps) find the same place. An
    unknown mark counts from 1: if earlier records shared the millisecond, a
    resume elsewhere repeats them rather than skipping any.
    """
    if mark is not None and mark[0] == timestamp + 1:
        return (mark[0], mark[1] + 1)
    return (timestamp + 1, 1)


class PositionError(ValueError):
    """A Last-Event-ID that cannot be used; str(e) says what is wrong."""


class TimestampError(ValueError):
    """A `since` value that is neither epoch milliseconds nor a date."""


@dataclass(frozen=True, slots=True)
class Assignment:
    """Where a client asks to resume one partition (or a whole topic)."""

    topic: str
    partition: int | None  # None: every partition of the topic (topic-name form)
    offset: int | None  # next offset to read; None when absent or -1
    timestamp: int | None  # epoch ms; kept even with an offset (offset wins)
    count: int = 0  # `n`: records of the millisecond timestamp - 1 already delivered
    cluster: str | None = None  # the log the offset belongs to; None: upstream's format


def _describe(value: object) -> str:
    """Short JSON text of an offending value, for error messages."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _kind(value: object) -> str:
    """The JSON type name of a decoded value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _reject_constant(name: str) -> object:
    # json.loads accepts NaN and Infinity by default; they are not JSON.
    raise ValueError(f"{name} is not valid JSON")


def _unique_pairs(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # A key given twice is ambiguous (which offset did the client mean?).
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r} in an object")
        result[key] = value
    return result


_DIGITS = re.compile(r"[0-9]+")


def _integer(entry: dict, key: str, where: str, minimum: int, maximum: int,
             what: str, digit_string: bool = False) -> int:
    """entry[key] as a strict JSON integer in [minimum, maximum]."""
    value = entry[key]
    if digit_string and isinstance(value, str):
        if not _DIGITS.fullmatch(value):
            raise PositionError(
                f"{where}: {key!r} must be {what} or a string of digits, "
                f"got {_describe(value)}")
        if len(value) > 20 or int(value) > maximum:
            raise PositionError(
                f"{where}: {key!r} must be at most {maximum}, got {_describe(value)}")
        value = int(value)
    if type(value) is not int or value < minimum:
        raise PositionError(f"{where}: {key!r} must be {what}, got {_describe(value)}")
    if value > maximum:
        raise PositionError(f"{where}: {key!r} must be at most {maximum}, got {value}")
    return value


def parse_last_event_id(text: str) -> list[Assignment]:
    """Parse a Last-Event-ID header into assignments, in the given order.

    Entries are numbered from 1 in messages ("entry 2: ...").
    """
    if len(text) > MAX_ID_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
        raise PositionError(f"Last-Event-ID is longer than {MAX_ID_BYTES} bytes")
    if not text.strip():
        raise PositionError("Last-Event-ID is empty")
    try:
        items = json.loads(text, parse_constant=_reject_constant,
                           object_pairs_hook=_unique_pairs)
    except RecursionError:
        raise PositionError("Last-Event-ID is not JSON: nested too deeply") from None
    except ValueError as e:
        raise PositionError(f"Last-Event-ID is not JSON: {e}") from None
    if not isinstance(items, list):
        raise PositionError(f"Last-Event-ID must be a JSON array, got {_kind(items)}")
    if not items:
        raise PositionError("Last-Event-ID must not be an empty array")
    if len(items) > MAX_ID_ENTRIES:
        raise PositionError(
            f"Last-Event-ID has {len(items)} entries, at most {MAX_ID_ENTRIES} are allowed")

    result: list[Assignment] = []
    cluster: str | None = None  # named on an entry, it holds for the ones after it
    by_name: set[str] = set()  # topics given by name
    by_object: set[str] = set()  # topics given as objects
    pairs: set[tuple[str, int]] = set()
    for number, item in enumerate(items, 1):
        where = f"entry {number}"
        if isinstance(item, str):
            if not item:
                raise PositionError(f"{where}: topic name must not be empty")
            if item in by_name:
                raise PositionError(f"{where}: topic {item!r} is given twice")
            if item in by_object:
                raise PositionError(
                    f"{where}: topic {item!r} is given both by name and with partitions")
            by_name.add(item)
            result.append(Assignment(item, None, None, None))
            continue
        if not isinstance(item, dict):
            raise PositionError(
                f"{where}: must be a topic name or an object, got {_kind(item)}")

        topic = item.get("topic")
        if "topic" not in item:
            raise PositionError(f"{where}: 'topic' is missing")
        if not isinstance(topic, str) or not topic:
            raise PositionError(
                f"{where}: 'topic' must be a non-empty string, got {_describe(topic)}")
        if "partition" not in item:
            raise PositionError(f"{where}: 'partition' is missing")
        partition = _integer(item, "partition", where, 0, MAX_PARTITION,
                             "a non-negative integer")

        # null means "not given", as -1 does for offsets.
        offset = None
        if item.get("offset") is not None:
            offset = _integer(item, "offset", where, -1, MAX_INT64, "an integer >= -1")
            if offset == -1:
                offset = None
        timestamp = None
        if item.get("timestamp") is not None:
            timestamp = _integer(item, "timestamp", where, 0, MAX_INT64,
                                 "a non-negative integer", digit_string=True)

        count = 0
        if item.get("n") is not None:
            count = _integer(item, "n", where, 0, MAX_INT64, "a non-negative integer")
            if count and timestamp is None:
                raise PositionError(f"{where}: 'n' needs a 'timestamp'")
            if count and timestamp == 0:
                raise PositionError(f"{where}: 'n' needs a 'timestamp' above 0")
        if item.get("cluster") is not None:
            cluster = item["cluster"]
            if not isinstance(cluster, str) or not cluster or len(cluster) > MAX_CLUSTER:
                raise PositionError(
                    f"{where}: 'cluster' must be a string of 1 to {MAX_CLUSTER} characters, "
                    f"got {_describe(cluster)}")

        if topic in by_name:
            raise PositionError(
                f"{where}: topic {topic!r} is given both by name and with partitions")
        if (topic, partition) in pairs:
            raise PositionError(
                f"{where}: topic {topic!r} partition {partition} is given twice")
        by_object.add(topic)
        pairs.add((topic, partition))
        result.append(Assignment(topic, partition, offset, timestamp, count, cluster))
    return result


_ISO = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})"
    r"(?:[Tt ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d{1,9}))?)?"
    r"([Zz]|[+-]\d{2}:?\d{2})?)?"
)
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _to_ms(moment: datetime) -> int:
    """Epoch milliseconds of an aware datetime, exact (no float rounding)."""
    return (moment - _EPOCH) // timedelta(milliseconds=1)


def _parse_iso(match: re.Match[str]) -> datetime:
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    tz = timezone.utc
    if zone and zone.upper() != "Z":
        digits = zone[1:].replace(":", "")
        hours, minutes = int(digits[:2]), int(digits[2:])
        if hours > 23 or minutes > 59:
            raise ValueError(f"offset {zone} is out of range")
        delta = timedelta(hours=hours, minutes=minutes)
        tz = timezone(-delta if zone[0] == "-" else delta)
    micros = int((fraction or "0")[:6].ljust(6, "0"))
    return datetime(int(year), int(month), int(day), int(hour or 0), int(minute or 0),
                    int(second or 0), micros, tzinfo=tz)


def parse_since(text: str) -> int:
    """Parse `since` (epoch ms, ISO-8601 or RFC 2822) into epoch milliseconds.

    Dates without a zone are UTC (JavaScript would use the server's local
    time for date-times, which nobody can rely on).
    """
    value = text.strip()
    if not value:
        raise TimestampError(f"invalid since value {text!r}: it is empty")
    if _DIGITS.fullmatch(value):
        if len(value) > 20 or int(value) > MAX_SINCE_MS:
            raise TimestampError(f"invalid since value {text!r}: too far in the future")
        return int(value)
    match = _ISO.fullmatch(value)
    try:
        if match:
            moment = _parse_iso(match)
        else:
            moment = email.utils.parsedate_to_datetime(value)
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=timezone.utc)
    except (ValueError, TypeError, OverflowError, IndexError):
        raise TimestampError(
            f"invalid since value {text!r}: expected epoch milliseconds, "
            "an ISO-8601 date or an RFC 2822 date") from None
    ms = _to_ms(moment)
    if ms < 0:
        raise TimestampError(f"invalid since value {text!r}: before 1970")
    return ms


_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def id_fragment(topic: str, partition: int, offset: int, mark: "int | Mark | None") -> str:
    """One partition's entry of an id, without the closing brace (so the
    first can take `cluster`): the same for every set that includes the
    partition, so it is made once per record and ids are joins of fragments."""
    text = '{"topic":%s,"partition":%d,"offset":%d' % (_dumps(topic), partition, offset)
    if isinstance(mark, tuple):
        text += ',"timestamp":%d' % mark[0]
        if mark[1]:
            text += ',"n":%d' % mark[1]
    elif mark is not None:
        text += ',"timestamp":%d' % mark
    return text


def cluster_suffix(cluster: str | None) -> str:
    """What closes the first fragment of an id: the cluster, when known."""
    return "}" if cluster is None else ',"cluster":%s}' % _dumps(cluster)


def join_fragments(fragments: "list[str] | tuple[str, ...]", suffix: str) -> str:
    """The id text of fragments (see id_fragment), the first closed by suffix."""
    if not fragments:
        return "[]"
    return "[" + fragments[0] + suffix + "".join(["," + f + "}" for f in fragments[1:]]) + "]"


def encode_id(entries: Iterable[tuple[str, int, int, "int | Mark | None"]],
              cluster: str | None = None) -> str:
    """The `id:` of an SSE event: compact JSON of (topic, partition, offset,
    timestamp or mark); the first entry names the cluster, when known."""
    return join_fragments([id_fragment(*entry) for entry in entries], cluster_suffix(cluster))


class Partitions(tuple):
    """A hub's partitions, with the name of the cluster their offsets
    belong to (which every id the hub makes carries)."""

    cluster: str | None

    def __new__(cls, tps: Iterable[tuple[str, int]], cluster: str | None = None) -> "Partitions":
        self = super().__new__(cls, tps)
        self.cluster = cluster
        return self
