"""The embedded event log: a durable SQLite file with Kafka's semantics.

Records live in one table keyed by (topic, partition, offset); offsets are
gap-free per partition, start at 0 and are never reused (the ``partitions``
table remembers the next offset even when retention has deleted every record
of a partition). Timestamps never go down within a partition, so the
(topic, partition, timestamp) index answers offset-for-time exactly and
retention deletes a prefix of each partition.

Threads: every write runs in one writer thread with its own connection;
reads run in a pool of reader threads, one connection each. The reactor
thread only schedules work and delivers results. Tails are woken right
after each commit made by this process; a slow poll of the small
``partitions`` table also notices records written by other processes.
"""
from __future__ import annotations

import heapq
import os
import secrets
import sqlite3
import threading
import time
import urllib.parse
import zlib
from contextlib import contextmanager
from dataclasses import replace
from itertools import islice
from typing import Any, Callable, Iterator, Optional, Sequence

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from .base import BackendUnavailable, LogFull, Record, TopicPartition

__all__ = ["EmbeddedBackend", "EmbeddedLogError"]

log = Logger()

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    timestamp INTEGER NOT NULL,
    key BLOB,
    value BLOB,
    PRIMARY KEY (topic, partition, offset)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS records_by_time ON records (topic, partition, timestamp);
CREATE TABLE IF NOT EXISTS event_ids (
    topic TEXT NOT NULL,
    id TEXT NOT NULL,
    partition INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    timestamp INTEGER NOT NULL,
    PRIMARY KEY (topic, id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS event_ids_by_time ON event_ids (timestamp);
CREATE TABLE IF NOT EXISTS partitions (
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    next_offset INTEGER NOT NULL,
    last_timestamp INTEGER,
    PRIMARY KEY (topic, partition)
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

# A catch-up read of a tail asks for this many records at a time.
TAIL_BATCH = 1000
# Retention deletes at most this many records per writer transaction, so
# appends are not held up by one long delete.
PRUNE_CHUNK = 20000
# A tail whose read failed tries again after this many seconds.
TAIL_RETRY = 1.0
# Seconds between deletions of event ids older than the deduplication window.
IDS_PRUNE_INTERVAL = 60.0
BUSY_TIMEOUT_MS = 30000  # the connections' default wait for another writer


class EmbeddedLogError(Exception):
    """The log file cannot be opened or used (raised by start())."""


class LogGone(BackendUnavailable):
    """The database file was removed or replaced while the daemon runs:
    writes would go to a file nobody will ever open again."""


class NotWritten(BackendUnavailable):
    """A write that could not start before its deadline (nothing stored)."""


def _identity(path: str) -> Optional[tuple[int, int]]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino)


def _order(record: Record) -> tuple[int, str, int, int]:
    return (record.timestamp, record.topic, record.partition, record.offset)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _as_bytes(value: Any, what: str) -> Optional[bytes]:
    if value is None or type(value) is bytes:
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"{what} must be bytes or None, not {type(value).__name__}")


class EmbeddedBackend:
    """The event log in a SQLite file (see the module docstring)."""

    def __init__(
        self,
        path: str,
        retention: float,
        partitions: int = 1,
        reactor: Any = None,
        read_threads: int = 4,
        poll_interval: float = 1.0,
        read_only: bool = False,
    ) -> None:
        if partitions < 1:
            raise ValueError(f"partitions must be at least 1, not {partitions}")
        if read_threads < 1:
            raise ValueError(f"read_threads must be at least 1, not {read_threads}")
        if retention < 0:
            raise ValueError(f"retention must be 0 (forever) or more, not {retention}")
        if reactor is None:
            from twisted.internet import reactor
        self.path = path
        self.retention = retention
        self.partitions_per_topic = partitions
        self.read_threads = read_threads
        self.poll_interval = poll_interval
        # A worker process's reader: opens the writer's file without ever
        # taking SQLite's write lock (see _check_read_only).
        self.read_only = read_only
        self._reactor = reactor
        self._running = False
        self._writer: Optional[ThreadPool] = None
        self._readers: Optional[ThreadPool] = None
        self._wconn: Optional[sqlite3.Connection] = None
        self._rconns: list[sqlite3.Connection] = []
        self._rconns_lock = threading.Lock()
        self._local = threading.local()
        self._round_robin: dict[str, int] = {}  # writer thread only
        # Next offset per partition as last seen by the reactor thread.
        self._heads: dict[TopicPartition, int] = {}
        self._tails: set[_Tail] = set()
        self._inflight = 0
        self._drained: Optional[Deferred[None]] = None
        self._pruner: Optional[LoopingCall] = None
        self._poller: Optional[LoopingCall] = None
        self._append_watchers: list[Callable[[list[Record]], None]] = []
        self.cluster: Optional[str] = None  # the file's own name, set by start()
        self._identity: Optional[tuple[int, int]] = None  # (device, inode) of the file opened
        self._gone_reported = False
        self._ids_pruned = 0.0  # writer thread only: monotonic time of the last prune

    # -- life cycle --------------------------------------------------------

    def start(self) -> None:
        if self._running or self._drained is not None:
            raise RuntimeError(f"embedded log {self.path!r} is already started (or still stopping)")
        conn, heads = self._open()
        self.cluster = conn.execute("SELECT value FROM meta WHERE key = 'log_id'").fetchone()[0]
        self._identity = _identity(self.path)
        self._gone_reported = False
        self._wconn = conn
        self._heads = heads
        self._local = threading.local()
        self._rconns = []
        self._round_robin = {}
        self._writer = ThreadPool(1, 1, name=f"embedded-log-writer {self.path}")
        self._readers = ThreadPool(
            0, self.read_threads, name=f"embedded-log-reader {self.path}"
        )
        self._writer.start()
        self._readers.start()
        self._running = True
        if self.retention > 0:
            self._pruner = LoopingCall(self._prune_from_timer)
            self._pruner.clock = self._reactor
            self._pruner.start(min(60.0, max(1.0, self.retention / 10)), now=True)
        if self.poll_interval > 0:
            self._poller = LoopingCall(self._poll)
            self._poller.clock = self._reactor
            self._poller.start(self.poll_interval, now=False)

    def check(self) -> None:
        """Open the file once and close it: raises EmbeddedLogError when it
        cannot be used, before any thread starts."""
        conn, _ = self._open()
        conn.close()

    def _open(self) -> tuple[sqlite3.Connection, dict[TopicPartition, int]]:
        path = self.path
        if not self.read_only:
            parent = os.path.dirname(os.path.abspath(path))
            try:
                os.makedirs(parent, exist_ok=True)
            except OSError as e:
                raise EmbeddedLogError(
                    f"embedded log {path!r}: cannot create directory {parent!r}: {e}"
                ) from e
        try:
            conn = self._connect()
        except sqlite3.Error as e:
            raise EmbeddedLogError(f"embedded log {path!r}: cannot open: {e}") from e
        try:
            if self.read_only:
                self._check_read_only(conn)
            else:
                self._prepare(conn)
            heads = {
                (topic, partition): next_offset
                for topic, partition, next_offset in conn.execute(
                    "SELECT topic, partition, next_offset FROM partitions"
                )
            }
        except EmbeddedLogError:
            conn.close()
            raise
        except sqlite3.Error as e:
            conn.close()
            raise EmbeddedLogError(f"embedded log {path!r}: cannot use: {e}") from e
        return conn, heads

    def _prepare(self, conn: sqlite3.Connection) -> None:
        """The writer's open: schema version, WAL, the schema itself."""
        path = self.path
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            raise EmbeddedLogError(
                f"embedded log {path!r}: schema version {version} is not "
                f"supported (expected {SCHEMA_VERSION})"
            )
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise EmbeddedLogError(
                f"embedded log {path!r}: cannot use WAL mode (journal_mode is {mode})"
            )
        conn.execute("PRAGMA synchronous=NORMAL")
        # BEGIN IMMEDIATE takes the write lock, so a read-only file or
        # directory is reported now rather than at the first append.
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            # The log's identity for ids (made once, kept with the file).
            conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('log_id', ?)",
                         ("embedded-" + secrets.token_hex(6),))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _check_read_only(self, conn: sqlite3.Connection) -> None:
        """Open the file another process writes: no schema, no journal mode
        change, no BEGIN IMMEDIATE. In WAL mode reads never wait for the
        writer, so this runs on the reactor thread without blocking it."""
        path = self.path
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version != SCHEMA_VERSION:
            raise EmbeddedLogError(
                f"embedded log {path!r}: schema version {version} (expected {SCHEMA_VERSION}): "
                "the writing process creates the log"
            )
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
        if str(mode).lower() != "wal":
            raise EmbeddedLogError(f"embedded log {path!r}: not in WAL mode (journal_mode is {mode})")

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: transactions are explicit (BEGIN ... COMMIT).
        # check_same_thread=False only so stop() can close the connection
        # after its thread has ended; each connection is used by one thread.
        if self.read_only:  # mode=ro: SQLite refuses every write, locks included
            uri = "file:" + urllib.parse.quote(os.path.abspath(self.path)) + "?mode=ro"
            return sqlite3.connect(uri, uri=True, timeout=30, isolation_level=None, check_same_thread=False)
        return sqlite3.connect(
            self.path, timeout=30, isolation_level=None, check_same_thread=False
        )

    def stop(self) -> Deferred[None]:
        if not self._running:
            return defer.succeed(None)
        self._running = False
        for loop in (self._pruner, self._poller):
            if loop is not None and loop.running:
                loop.stop()
        self._pruner = self._poller = None
        for tail in list(self._tails):
            tail.stop()
        self._drained = Deferred()
        if self._inflight == 0:
            self._drained.callback(None)
        d = self._drained
        d.addCallback(lambda _: self._close())
        return d

    def _close(self) -> None:
        # Every job has finished (stop() waited for them), so the joins below
        # only wait for idle threads to exit.
        self._drained = None
        for pool in (self._writer, self._readers):
            if pool is not None:
                pool.stop()
        self._writer = self._readers = None
        with self._rconns_lock:
            conns, self._rconns = self._rconns, []
        if self._wconn is not None:
            conns.append(self._wconn)
            self._wconn = None
        for conn in conns:
            try:
                conn.close()
            except sqlite3.Error:
                log.failure("closing embedded log {path}", path=self.path)

    # -- running jobs in threads -------------------------------------------

    def _run(self, pool: Optional[ThreadPool], fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        if not self._running or pool is None:
            return defer.fail(BackendUnavailable(f"embedded log {self.path} is not running"))
        self._inflight += 1
        d = deferToThreadPool(self._reactor, pool, self._guarded, fn, *args)
        d.addBoth(self._job_done)
        return d

    def _guarded(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except sqlite3.Error as e:
            raise BackendUnavailable(f"embedded log {self.path}: {e}") from e

    def _job_done(self, result: Any) -> Any:
        self._inflight -= 1
        if self._inflight == 0 and self._drained is not None and not self._drained.called:
            self._drained.callback(None)
        return result

    def _write(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return self._run(self._writer, fn, *args)

    def _read(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return self._run(self._readers, fn, *args)

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            conn.execute("PRAGMA query_only=ON")
            self._local.conn = conn
            with self._rconns_lock:
                self._rconns.append(conn)
        return conn

    # -- the Backend interface ---------------------------------------------

    def partitions(self, topic: str) -> Deferred[list[int]]:
        return defer.succeed(list(range(self.partitions_per_topic)))

    def identity(self) -> Deferred[str]:
        if self.cluster is None:
            return defer.fail(BackendUnavailable("the embedded log is not started"))
        return defer.succeed(self.cluster)

    def watermarks(self, tp: TopicPartition) -> Deferred[tuple[int, int]]:
        return self._read(self._watermarks_sync, tp)

    def offsets_for_time(
        self, tps: Sequence[TopicPartition], timestamp: int
    ) -> Deferred[dict[TopicPartition, int]]:
        return self._read(self._offsets_for_time_sync, list(tps), int(timestamp))

    def read(
        self, positions: dict[TopicPartition, int], max_records: int
    ) -> Deferred[list[Record]]:
        if max_records <= 0 or not positions:
            return defer.succeed([])
        d = self._read(self._read_sync, dict(positions), int(max_records))
        d.addCallback(lambda result: result[0])
        return d

    def append(
        self,
        topic: str,
        values: Sequence[tuple[Optional[bytes], bytes]],
        timestamp: Optional[int] = None,
    ) -> Deferred[list[Record]]:
        try:
            pairs = [
                (_as_bytes(key, "key"), _as_bytes(value, "value")) for key, value in values
            ]
        except (TypeError, ValueError) as e:
            return defer.fail(e)
        if not pairs:
            return defer.succeed([])
        d = self._write(
            self._append_sync, topic, pairs, None if timestamp is None else int(timestamp)
        )
        d.addCallbacks(self._appended, self._write_failed)
        return d

    def append_unique(
        self,
        topic: str,
        items: Sequence[tuple[Optional[str], bytes]],
        window: float,
        deadline: Optional[float] = None,
    ) -> Deferred[list[tuple[Record, bool]]]:
        """Write (event id, value) pairs, except those whose id was written to
        the topic within `window` seconds (or earlier in the same call):
        answers (record, duplicate) per pair, a duplicate's record being the
        stored one (value None). The ids are kept in a unique index in the
        same transaction as the records, so a crash never separates them.
        `deadline` (time.monotonic()): a write that cannot start by then
        fails with nothing stored."""
        pairs = [(i, _as_bytes(v, "value")) for i, v in items]
        if not pairs:
            return defer.succeed([])
        d = self._write(self._append_unique_sync, topic, pairs, float(window), deadline)

        def appended(result: list[tuple[Record, bool]]) -> list[tuple[Record, bool]]:
            self._appended([r for r, duplicate in result if not duplicate])
            return result

        d.addCallbacks(appended, self._write_failed)
        return d

    def _write_failed(self, failure: Failure) -> Failure:
        if failure.check(LogGone) and not self._gone_reported:
            self._gone_reported = True
            log.critical("embedded log {path}: {error}; refusing every write until the daemon "
                         "is restarted",
                         path=self.path, error=failure.getErrorMessage())
        return failure

    def tail(
        self,
        positions: dict[TopicPartition, int],
        on_records: Callable[[list[Record]], None],
    ) -> "_Tail":
        if not self._running:
            raise BackendUnavailable(f"embedded log {self.path} is not running")
        tail = _Tail(self, positions, on_records)
        self._tails.add(tail)
        tail._kick()
        return tail

    # -- retention ---------------------------------------------------------

    def prune(self) -> Deferred[int]:
        """Delete the records older than the retention; answers how many."""
        if self.retention <= 0:
            return defer.succeed(0)
        return defer.ensureDeferred(self._prune(_now_ms() - int(self.retention * 1000)))

    async def _prune(self, cutoff: int) -> int:
        total = 0
        while True:
            deleted = await self._write(self._prune_sync, cutoff, PRUNE_CHUNK)
            total += deleted
            if deleted < PRUNE_CHUNK or not self._running:
                return total

    def _prune_from_timer(self) -> Deferred[None]:
        d = self.prune()

        def logged(n: int) -> None:
            if n:
                log.info("embedded log {path}: retention deleted {n} records", path=self.path, n=n)

        def failed(f: Failure) -> None:
            if self._running:
                log.failure("embedded log {path}: retention failed", f, path=self.path)

        return d.addCallbacks(logged, failed)

    # -- waking tails ------------------------------------------------------

    def watch_appends(self, callback: Callable[[list[Record]], None]) -> None:
        """Call back with the records of each commit of this process (worker
        mode tells the other processes of the file, see notice_heads)."""
        self._append_watchers.append(callback)

    def notice_heads(self, heads: dict[TopicPartition, int]) -> None:
        """Next offsets another process has committed: wake the tails behind them."""
        grown = False
        for tp, next_offset in heads.items():
            if next_offset > self._heads.get(tp, 0):
                self._heads[tp] = next_offset
                grown = True
        if grown and self._running:
            for tail in list(self._tails):
                tail._kick()

    def _appended(self, records: list[Record]) -> list[Record]:
        for r in records:
            if r.offset + 1 > self._heads.get(r.tp, 0):
                self._heads[r.tp] = r.offset + 1
        ordered = sorted(records, key=_order)
        for tail in list(self._tails):
            try:
                tail._notify(ordered)
            except Exception:
                log.failure("embedded log {path}: waking a tail", path=self.path)
        for watcher in self._append_watchers:
            try:
                watcher(records)
            except Exception:
                log.failure("embedded log {path}: an append watcher failed", path=self.path)
        return records

    def _poll(self) -> Deferred[None]:
        """Notice records written by other processes."""
        d = self._read(self._heads_sync)

        def got(heads: dict[TopicPartition, int]) -> None:
            self.notice_heads(heads)

        def failed(f: Failure) -> None:
            if self._running:
                log.failure("embedded log {path}: polling failed", f, path=self.path)

        return d.addCallbacks(got, failed)

    # -- thread side (blocking) --------------------------------------------

    def _append_sync(
        self, topic: str, pairs: list[tuple[Optional[bytes], Optional[bytes]]], timestamp: Optional[int]
    ) -> list[Record]:
        conn = self._wconn
        assert conn is not None
        self._check_file()
        with _write(conn):
            return self._insert(conn, topic, pairs, timestamp)

    def _check_file(self) -> None:
        """Writer thread: refuse to write to a file that is no longer the log's."""
        if self._identity is not None and _identity(self.path) != self._identity:
            raise LogGone(f"the database file {self.path} was removed or replaced")

    def _append_unique_sync(
        self, topic: str, pairs: list[tuple[Optional[str], Optional[bytes]]], window: float,
        deadline: Optional[float],
    ) -> list[tuple[Record, bool]]:
        conn = self._wconn
        assert conn is not None
        self._check_file()
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise NotWritten(f"embedded log {self.path}: the writer was busy past the intake's timeout")
            conn.execute(f"PRAGMA busy_timeout={max(1, int(left * 1000))}")
        now = _now_ms()
        cutoff = now - int(window * 1000)
        result: list[Optional[tuple[Record, bool]]] = [None] * len(pairs)
        try:
            with _write(conn):
                seen: dict[str, int] = {}  # id -> index of the pair that stores it
                fresh: list[int] = []
                for i, (event_id, _) in enumerate(pairs):
                    if window > 0 and event_id is not None:
                        if event_id in seen:
                            continue
                        row = conn.execute(
                            "SELECT partition, offset, timestamp FROM event_ids"
                            " WHERE topic = ? AND id = ? AND timestamp >= ?",
                            (topic, event_id, cutoff),
                        ).fetchone()
                        if row is not None:
                            result[i] = (Record(topic, row[0], row[1], row[2], None, None), True)
                            continue
                        seen[event_id] = i
                    fresh.append(i)
                records = self._insert(conn, topic, [(None, pairs[i][1]) for i in fresh], now)
                for i, record in zip(fresh, records):
                    result[i] = (record, False)
                ids = [(topic, pairs[i][0], r.partition, r.offset, r.timestamp)
                       for i, r in zip(fresh, records) if window > 0 and pairs[i][0] is not None]
                conn.executemany(
                    "INSERT OR REPLACE INTO event_ids (topic, id, partition, offset, timestamp)"
                    " VALUES (?, ?, ?, ?, ?)", ids)
                if window > 0 and time.monotonic() - self._ids_pruned > IDS_PRUNE_INTERVAL:
                    self._ids_pruned = time.monotonic()
                    conn.execute("DELETE FROM event_ids WHERE timestamp < ?", (cutoff,))
        finally:
            if deadline is not None:
                conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        for i, (event_id, _) in enumerate(pairs):
            if result[i] is None:  # the same id earlier in this call
                stored = result[seen[event_id]]  # type: ignore[index]
                assert stored is not None
                result[i] = (replace(stored[0], value=None), True)
        return result  # type: ignore[return-value]

    def _insert(
        self, conn: sqlite3.Connection, topic: str, pairs: list[tuple[Optional[bytes], Optional[bytes]]],
        timestamp: Optional[int],
    ) -> list[Record]:
        """Inside a write transaction: the records at the next offsets."""
        n = self.partitions_per_topic
        now = _now_ms() if timestamp is None else timestamp
        state: dict[int, tuple[int, Optional[int]]] = {}
        out: list[Record] = []
        for key, value in pairs:
            if key is None:
                partition = self._round_robin.get(topic, 0) % n
                self._round_robin[topic] = (partition + 1) % n
            else:
                partition = zlib.crc32(key) % n
            if partition not in state:
                row = conn.execute(
                    "SELECT next_offset, last_timestamp FROM partitions"
                    " WHERE topic = ? AND partition = ?",
                    (topic, partition),
                ).fetchone()
                state[partition] = (row[0], row[1]) if row else (0, None)
            offset, last = state[partition]
            ts = now if last is None or now >= last else last
            out.append(Record(topic, partition, offset, ts, key, value))
            state[partition] = (offset + 1, ts)
        conn.executemany(
            "INSERT INTO records (topic, partition, offset, timestamp, key, value)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            [(r.topic, r.partition, r.offset, r.timestamp, r.key, r.value) for r in out],
        )
        conn.executemany(
            "INSERT INTO partitions (topic, partition, next_offset, last_timestamp)"
            " VALUES (?, ?, ?, ?) ON CONFLICT (topic, partition) DO UPDATE SET"
            " next_offset = excluded.next_offset, last_timestamp = excluded.last_timestamp",
            [(topic, p, nxt, ts) for p, (nxt, ts) in state.items()],
        )
        return out

    def _prune_sync(self, cutoff: int, limit: int) -> int:
        """Delete up to limit records older than cutoff (a prefix of each
        partition, as timestamps never go down within one)."""
        conn = self._wconn
        assert conn is not None
        deleted = 0
        conn.execute("BEGIN IMMEDIATE")
        try:
            for topic, partition, next_offset in conn.execute(
                "SELECT topic, partition, next_offset FROM partitions"
            ).fetchall():
                first = conn.execute(
                    "SELECT MIN(offset) FROM records WHERE topic = ? AND partition = ?",
                    (topic, partition),
                ).fetchone()[0]
                if first is None:
                    continue
                keep = self._first_at_or_after(conn, topic, partition, cutoff)
                end = min(next_offset if keep is None else keep, first + limit - deleted)
                if end > first:
                    deleted += conn.execute(
                        "DELETE FROM records WHERE topic = ? AND partition = ?"
                        " AND offset >= ? AND offset < ?",
                        (topic, partition, first, end),
                    ).rowcount
                if deleted >= limit:
                    break
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return deleted

    @staticmethod
    def _first_at_or_after(
        conn: sqlite3.Connection, topic: str, partition: int, timestamp: int
    ) -> Optional[int]:
        row = conn.execute(
            "SELECT offset FROM records WHERE topic = ? AND partition = ? AND timestamp >= ?"
            " ORDER BY timestamp, offset LIMIT 1",
            (topic, partition, timestamp),
        ).fetchone()
        return None if row is None else row[0]

    @staticmethod
    def _next_offset(conn: sqlite3.Connection, topic: str, partition: int) -> int:
        row = conn.execute(
            "SELECT next_offset FROM partitions WHERE topic = ? AND partition = ?",
            (topic, partition),
        ).fetchone()
        return 0 if row is None else row[0]

    def _watermarks_sync(self, tp: TopicPartition) -> tuple[int, int]:
        conn = self._reader()
        topic, partition = tp
        conn.execute("BEGIN")
        try:
            next_offset = self._next_offset(conn, topic, partition)
            first = conn.execute(
                "SELECT MIN(offset) FROM records WHERE topic = ? AND partition = ?",
                (topic, partition),
            ).fetchone()[0]
        finally:
            conn.execute("COMMIT")
        return (next_offset if first is None else first, next_offset)

    def _offsets_for_time_sync(
        self, tps: list[TopicPartition], timestamp: int
    ) -> dict[TopicPartition, int]:
        conn = self._reader()
        out: dict[TopicPartition, int] = {}
        conn.execute("BEGIN")
        try:
            for topic, partition in tps:
                offset = self._first_at_or_after(conn, topic, partition, timestamp)
                if offset is None:
                    offset = self._next_offset(conn, topic, partition)
                out[(topic, partition)] = offset
        finally:
            conn.execute("COMMIT")
        return out

    def _read_sync(
        self, positions: dict[TopicPartition, int], limit: int
    ) -> tuple[list[Record], dict[TopicPartition, int], dict[TopicPartition, int]]:
        """Answers (records, rows fetched per partition, next offset per
        partition), all from one snapshot."""
        conn = self._reader()
        per: list[list[Record]] = []
        fetched: dict[TopicPartition, int] = {}
        nexts: dict[TopicPartition, int] = {}
        conn.execute("BEGIN")
        try:
            for (topic, partition), position in positions.items():
                rows = conn.execute(
                    "SELECT offset, timestamp, key, value FROM records"
                    " WHERE topic = ? AND partition = ? AND offset >= ?"
                    " ORDER BY offset LIMIT ?",
                    (topic, partition, position, limit),
                ).fetchall()
                fetched[(topic, partition)] = len(rows)
                nexts[(topic, partition)] = self._next_offset(conn, topic, partition)
                if rows:
                    per.append([Record(topic, partition, *row) for row in rows])
        finally:
            conn.execute("COMMIT")
        records = list(islice(heapq.merge(*per, key=_order), limit))
        return records, fetched, nexts

    def _heads_sync(self) -> dict[TopicPartition, int]:
        conn = self._reader()
        return {
            (topic, partition): next_offset
            for topic, partition, next_offset in conn.execute(
                "SELECT topic, partition, next_offset FROM partitions"
            )
        }


@contextmanager
def _write(conn: sqlite3.Connection) -> Iterator[None]:
    """One write transaction (BEGIN IMMEDIATE: the write lock at once); rolled
    back on any error, SQLITE_FULL raised as LogFull."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException as e:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        _raise_full(e)
        raise


def _raise_full(e: BaseException) -> None:
    """SQLITE_FULL (disk or max_page_count) as LogFull: nothing was stored."""
    if isinstance(e, sqlite3.Error) and getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
        raise LogFull(f"the log is full: {e}") from e


class _Tail:
    """Follows partitions from given positions (see EmbeddedBackend.tail).

    Lives on the reactor thread. Records committed by this process that
    continue a partition exactly at the tail's position are handed over
    directly; a partition that is behind is read from the file, one read
    at a time for the whole tail, until it reaches the newest offset the
    backend knows of.
    """

    def __init__(
        self,
        backend: EmbeddedBackend,
        positions: dict[TopicPartition, int],
        on_records: Callable[[list[Record]], None],
    ) -> None:
        self._backend = backend
        self._positions = {tp: max(0, int(p)) for tp, p in positions.items()}
        self._on_records = on_records
        self._stopped = False
        self._reading = False
        self._retry: Any = None

    @property
    def positions(self) -> dict[TopicPartition, int]:
        """The next offset this tail will deliver, per partition."""
        return dict(self._positions)

    def stop(self) -> None:
        self._stopped = True
        self._backend._tails.discard(self)
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None

    def _deliver(self, records: list[Record]) -> None:
        if not records or self._stopped:
            return
        try:
            self._on_records(records)
        except Exception:
            log.failure("embedded log tail: on_records failed; the tail goes on")

    def _notify(self, ordered: list[Record]) -> None:
        """Records just committed by this process (one append), in merge order.

        Those that continue a partition exactly where the tail is are
        delivered at once, even while a catch-up read of other partitions
        is in flight; a partition that is behind is left to the reads
        (_kick), which see the new heads. _read_done drops what was
        delivered meanwhile, so nothing comes twice."""
        if self._stopped:
            return
        direct: list[Record] = []
        positions = self._positions
        for r in ordered:
            position = positions.get(r.tp)
            if position is not None and r.offset == position:
                direct.append(r)
                positions[r.tp] = position + 1
        self._deliver(direct)
        self._kick()

    def _behind(self) -> dict[TopicPartition, int]:
        heads = self._backend._heads
        return {tp: p for tp, p in self._positions.items() if p < heads.get(tp, 0)}

    def _kick(self) -> None:
        if self._stopped or self._reading:
            return
        behind = self._behind()
        if not behind:
            return
        self._reading = True
        d = self._backend._read(self._backend._read_sync, behind, TAIL_BATCH)
        d.addCallbacks(self._read_done, self._read_failed, callbackArgs=(behind,))

    def _read_done(
        self,
        result: tuple[list[Record], dict[TopicPartition, int], dict[TopicPartition, int]],
        asked: dict[TopicPartition, int],
    ) -> None:
        self._reading = False
        if self._stopped:
            return
        records, fetched, nexts = result
        positions = self._positions
        delivered: dict[TopicPartition, int] = {}
        out: list[Record] = []
        for r in records:
            # Offsets only go up: records handed over directly while the
            # read ran are dropped; a jump over records removed by retention
            # is accepted (the caller sees it in the offsets).
            if r.offset >= positions[r.tp]:
                out.append(r)
                positions[r.tp] = r.offset + 1
            delivered[r.tp] = delivered.get(r.tp, 0) + 1
        heads = self._backend._heads
        for tp in asked:
            next_offset = nexts.get(tp, 0)
            if next_offset > heads.get(tp, 0):
                heads[tp] = next_offset
            # Everything up to next_offset was in the snapshot and delivered:
            # whatever is missing below it was removed by retention.
            if fetched.get(tp, 0) < TAIL_BATCH and delivered.get(tp, 0) == fetched.get(tp, 0):
                if next_offset > positions[tp]:
                    positions[tp] = next_offset
        self._deliver(out)
        self._kick()

    def _read_failed(self, failure: Failure) -> None:
        self._reading = False
        if self._stopped or not self._backend._running:
            return
        log.failure("embedded log tail: read failed; retrying", failure)
        self._retry = self._backend._reactor.callLater(TAIL_RETRY, self._kick)
