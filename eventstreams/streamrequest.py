"""What a stream request asks for, read from its path, query and headers.

A pure function: no I/O, no limits, no clock. Everything that can make a
request wrong is found here, before the request takes a connection slot
(eventstreams.streamresponse does the rest); the checks run in the order
clients have always seen their errors in.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from .config import Config
from .errors import ApiError, bad_last_event_id, not_found
from .filters import Filter, FilterError, parse_filters
from .positions import Assignment, PositionError, TimestampError, parse_last_event_id, parse_since


@dataclass(frozen=True, slots=True)
class StreamRequest:
    """A valid stream request (slots: an open stream keeps it)."""

    streams: tuple[str, ...]  # the streams' own names (aliases resolved), each once, in the asked order
    topics: tuple[str, ...]  # their topics, each once
    filter: Optional[Filter]  # None: every event
    since: Optional[int]  # epoch ms of `since`, None without it
    assignments: Optional[tuple[Assignment, ...]]  # Last-Event-ID, None without it
    ndjson: bool  # newline-delimited JSON (Accept: application/json) instead of SSE
    head: bool  # HEAD: what a GET would get, without the stream


def wants_ndjson(accept: Optional[bytes]) -> bool:
    """The first type of Accept is application/json."""
    first = (accept or b"").decode("latin-1").lower().split(",")[0].split(";")[0].strip()
    return first == "application/json"


def parse_stream_request(
    config: Config,
    names_text: str,
    args: Mapping[bytes, Sequence[bytes]],
    last_event_id: Optional[bytes] = None,
    accept: Optional[bytes] = None,
    method: bytes = b"GET",
) -> StreamRequest:
    """`/v2/stream/<names_text>` with its query (`args`, as twisted.web
    parses it) and headers as a StreamRequest; raises the ApiError the
    client gets for the first thing wrong."""
    names = names_text.split(",")
    found = [config.stream(n) for n in names]
    unknown = [n for n, s in zip(names, found) if s is None]
    if unknown or not names:
        raise not_found(unknown or [names_text])
    streams = [s for s in found if s is not None]
    try:
        decoded = [(k.decode("utf-8"), v.decode("utf-8")) for k, vs in args.items() for v in vs]
    except UnicodeDecodeError:
        raise ApiError(400, "invalid_query", "Invalid Query", "the query string is not UTF-8") from None
    try:
        flt = parse_filters(decoded)
    except FilterError as e:
        raise ApiError(400, "invalid_filter", "Invalid Filter", str(e)) from None
    since = None
    since_args = args.get(b"since")
    if since_args:
        try:
            since = parse_since(since_args[0].decode("utf-8"))
        except (TimestampError, UnicodeDecodeError) as e:
            raise ApiError(400, "invalid_timestamp", "Invalid Timestamp", str(e)) from None
    assignments = None
    if last_event_id is not None:
        try:
            assignments = tuple(parse_last_event_id(last_event_id.decode("utf-8")))
        except PositionError as e:
            raise bad_last_event_id(str(e)) from None
        except UnicodeDecodeError:
            raise bad_last_event_id("the header is not UTF-8") from None
    return StreamRequest(
        streams=tuple(dict.fromkeys(s.name for s in streams)),
        topics=tuple(dict.fromkeys(t for s in streams for t in s.topics)),
        filter=flt,
        since=since,
        assignments=assignments,
        ndjson=wants_ndjson(accept),
        head=method == b"HEAD",
    )
