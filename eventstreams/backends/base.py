"""The event log interface shared by the embedded (SQLite) and Kafka engines.

Every method that may block runs off the reactor thread and answers with a
Deferred; results are delivered on the reactor thread.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence

from twisted.internet.defer import Deferred

TopicPartition = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Record:
    """One record of the log, as stored: the value is raw bytes."""

    topic: str
    partition: int
    offset: int
    timestamp: int  # milliseconds since the epoch
    key: Optional[bytes]
    value: Optional[bytes]

    @property
    def tp(self) -> TopicPartition:
        return (self.topic, self.partition)


class BackendUnavailable(Exception):
    """The log cannot be reached right now (clients get a 503).

    Raised by a write, it means nothing of that write was stored, unless
    `maybe_stored` says the log may have kept some of it (a Kafka delivery
    that timed out while in flight)."""

    kind = "log_unavailable"  # the intake's 503 `type`
    maybe_stored = False


class LogFull(BackendUnavailable):
    """The log has no room for the write (disk full); nothing was stored."""

    kind = "log_full"


class Tail(Protocol):
    """A running follower of the end of the log, made by Backend.tail."""

    def stop(self) -> None:
        """Stop following; no callback is made after this returns."""


class Backend(Protocol):
    cluster: Optional[str]  # the name identity() answers, once known

    def identity(self) -> Deferred[str]:
        """The name of this log (a Kafka cluster's id, or `[kafka]
        cluster_name`; the embedded log's own): offsets in an id are only
        valid in the log of that name."""

    def start(self) -> None:
        """Open connections and threads; called once before use."""

    def stop(self) -> Deferred[None]:
        """Stop every tail and thread and close the log."""

    def partitions(self, topic: str) -> Deferred[list[int]]:
        """Partition numbers of a topic; an empty list when it does not exist
        (the embedded engine creates topics on demand, so it never answers [])."""

    def watermarks(self, tp: TopicPartition) -> Deferred[tuple[int, int]]:
        """(first retained offset, next offset to be written)."""

    def offsets_for_time(
        self, tps: Sequence[TopicPartition], timestamp: int
    ) -> Deferred[dict[TopicPartition, int]]:
        """Per partition, the first offset whose timestamp is >= timestamp;
        the next offset to be written when there is none."""

    def read(
        self, positions: dict[TopicPartition, int], max_records: int
    ) -> Deferred[list[Record]]:
        """Up to max_records records at or after each partition's position,
        in offset order per partition and roughly timestamp order across
        partitions. May answer fewer (or none) when the log has no more.
        Records removed by retention are simply absent: the caller notices
        the jump in offsets."""

    def append(
        self,
        topic: str,
        values: Sequence[tuple[Optional[bytes], bytes]],
        timestamp: Optional[int] = None,
    ) -> Deferred[list[Record]]:
        """Write (key, value) pairs to a topic; answers the stored records
        (partition chosen by key hash, else round robin; timestamp = the
        given one, else now)."""

    def tail(
        self,
        positions: dict[TopicPartition, int],
        on_records: Callable[[list[Record]], None],
    ) -> Tail:
        """Follow the log from positions, calling on_records (on the reactor
        thread) with every new record exactly once, gap-free and in offset
        order per partition. Read errors are logged and retried until stop()."""
