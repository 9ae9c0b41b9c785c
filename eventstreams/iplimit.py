"""Admission of stream clients: `max_connections` and the per-IP limit.

One process (workers = 1) checks its own connection set, as it always did:
no table, no lock. With worker processes the counts must span all of them,
so they live in a small shared-memory table (a memfd every process maps)
guarded by a POSIX record lock (fcntl), which the kernel drops when a holder
dies. Each process owns one count column; when a worker dies, the main
process zeroes its column, so a crash never leaks slots.

`max_connections` counts the whole service (one total per process in the
table's header, summed at admission), like the per-IP limit: the listening
socket hands connections to whichever process accepts first, so a
per-process cap would refuse clients while another process has room.
"""
from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import re
import struct
import tempfile
from typing import Any, Optional, Protocol

from twisted.logger import Logger

log = Logger()

ADMITTED, AT_CAPACITY, OVER_IP_LIMIT = 0, 1, 2

MAGIC = b"ESLIMIT1"
_HEADER = struct.Struct("<8sII")  # magic, processes, capacity; then the used-row count
_USED_AT = _HEADER.size
_HEADER_SIZE = 64
# Rows without max_connections (which bounds the distinct addresses): a
# mapping of a few MiB, of which only the touched pages are resident.
DEFAULT_CAPACITY = 1 << 18
# Past this fill the table stops adding addresses (open addressing needs
# free rows): such a client is admitted without a per-IP count.
MAX_FILL = 0.75


class Limits(Protocol):
    def acquire(self, ip: str) -> int:
        """ADMITTED (the caller must release(ip) once the request ends),
        AT_CAPACITY or OVER_IP_LIMIT."""

    def release(self, ip: str) -> None:
        ...


class LocalLimits:
    """workers = 1: the checks read this process's own connection set
    (Connections counts a stream from its sink's add to its loss)."""

    def __init__(self, connections: Any, max_connections: int, per_ip: int) -> None:
        self.connections = connections
        self.max_connections = max_connections
        self.per_ip = per_ip

    def acquire(self, ip: str) -> int:
        if self.max_connections and len(self.connections.sinks) >= self.max_connections:
            return AT_CAPACITY
        if self.per_ip and self.connections.count_for(ip) >= self.per_ip:
            return OVER_IP_LIMIT
        return ADMITTED

    def release(self, ip: str) -> None:
        pass  # the sink leaving Connections is the release


def _key(ip: str) -> bytes:
    """16 bytes per address, whatever a client_ip_header carried."""
    return hashlib.blake2b(ip.encode("utf-8", "surrogateescape"), digest_size=16).digest()


class SharedTable:
    """Connection counts per client address and process, in shared memory.

    Layout: a 64-byte header, one u32 total per process, then `capacity`
    rows of (used flag, 16-byte address key, one u32 count per process),
    open addressing with linear probing and backward-shift deletion (no
    tombstones). Every operation holds the lock for a few microseconds;
    the lock is a POSIX record lock, owned per process, so the processes
    sharing the memfd's open file still exclude each other.
    """

    def __init__(self, fd: int, processes: int, capacity: int) -> None:
        if capacity < 2 or capacity & (capacity - 1):
            raise ValueError(f"capacity must be a power of two, not {capacity}")
        self.fd = fd
        self.processes = processes
        self.capacity = capacity
        self.mask = capacity - 1
        self.max_used = int(capacity * MAX_FILL)
        self.row = struct.Struct(f"<B3x16s{processes}I")
        self.counts = struct.Struct(f"<{processes}I")
        self.totals_at = _HEADER_SIZE
        self.rows_at, self.size = self.layout(processes, capacity)
        self.map = mmap.mmap(fd, self.size)

    @staticmethod
    def layout(processes: int, capacity: int) -> tuple[int, int]:
        """Where the rows start, and the whole size."""
        rows_at = _HEADER_SIZE + ((4 * processes + 63) // 64) * 64
        return rows_at, rows_at + capacity * (20 + 4 * processes)

    @classmethod
    def create(cls, processes: int, capacity: int) -> "SharedTable":
        """A new, zeroed table in a memfd (main process); workers open() its fd.
        Where memfd_create is not allowed (a seccomp filter), an unlinked
        temporary file does the same."""
        try:
            fd = os.memfd_create("eventstreams-limits", os.MFD_CLOEXEC)
        except OSError:
            with tempfile.TemporaryFile(prefix="eventstreams-limits-") as f:
                fd = os.dup(f.fileno())
            os.set_inheritable(fd, False)
        os.ftruncate(fd, cls.layout(processes, capacity)[1])
        table = cls(fd, processes, capacity)
        _HEADER.pack_into(table.map, 0, MAGIC, processes, capacity)
        return table

    @classmethod
    def open(cls, fd: int) -> "SharedTable":
        """The table an inherited fd holds (worker process)."""
        magic, processes, capacity = _HEADER.unpack(os.pread(fd, _HEADER.size, 0))
        if magic != MAGIC:
            raise ValueError(f"fd {fd} is not a connection table")
        return cls(fd, processes, capacity)

    # -- locking --------------------------------------------------------------

    def __enter__(self) -> "SharedTable":
        fcntl.lockf(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: Any) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN)

    # -- under the lock -------------------------------------------------------

    def totals(self) -> list[int]:
        return list(self.counts.unpack_from(self.map, self.totals_at))

    def add_total(self, process: int, delta: int) -> None:
        at = self.totals_at + 4 * process
        (value,) = struct.unpack_from("<I", self.map, at)
        struct.pack_into("<I", self.map, at, max(0, value + delta))

    def _at(self, index: int) -> int:
        return self.rows_at + index * self.row.size

    def _home(self, key: bytes) -> int:
        return int.from_bytes(key[:8], "little") & self.mask

    def find(self, key: bytes) -> tuple[int, bool]:
        """The row holding key, or the free row where it would go."""
        index = self._home(key)
        m = self.map
        while True:
            at = self._at(index)
            if not m[at]:
                return index, False
            if m[at + 4 : at + 20] == key:
                return index, True
            index = (index + 1) & self.mask

    @property
    def used(self) -> int:
        return struct.unpack_from("<I", self.map, _USED_AT)[0]

    @used.setter
    def used(self, value: int) -> None:
        struct.pack_into("<I", self.map, _USED_AT, max(0, value))

    def row_counts(self, index: int) -> list[int]:
        return list(self.counts.unpack_from(self.map, self._at(index) + 20))

    def set_row(self, index: int, key: bytes, counts: list[int]) -> None:
        self.row.pack_into(self.map, self._at(index), 1, key, *counts)

    def _used_rows(self) -> Any:
        states = self.map[self.rows_at : self.size : self.row.size]
        return (match.start() for match in re.finditer(b"[^\x00]", states))

    def key_at(self, index: int) -> bytes:
        at = self._at(index)
        return self.map[at + 4 : at + 20]

    def delete(self, index: int) -> None:
        """Free a row, shifting later rows of its probe run back (Knuth's
        algorithm R), so lookups never need tombstones."""
        m, size = self.map, self.row.size
        hole = index
        probe = index
        while True:
            probe = (probe + 1) & self.mask
            at = self._at(probe)
            if not m[at]:
                break
            home = self._home(m[at + 4 : at + 20])
            # The row may fill the hole unless its home lies cyclically in (hole, probe].
            if (hole <= probe and (home <= hole or home > probe)) or (
                hole > probe and home <= hole and home > probe
            ):
                m[self._at(hole) : self._at(hole) + size] = m[at : at + size]
                hole = probe
        at = self._at(hole)
        m[at : at + size] = bytes(size)
        self.used -= 1

    def clear_process(self, process: int) -> int:
        """Zero a process's column and total (it died); answers the rows freed."""
        with self:
            struct.pack_into("<I", self.map, self.totals_at + 4 * process, 0)
            empty = []
            for index in list(self._used_rows()):
                counts = self.row_counts(index)
                if counts[process]:
                    counts[process] = 0
                    at = self._at(index)
                    self.counts.pack_into(self.map, at + 20, *counts)
                    if not any(counts):
                        empty.append(self.key_at(index))
            for key in empty:  # deleting shifts rows: look each one up again
                index, found = self.find(key)
                if found:
                    self.delete(index)
            return len(empty)

    def close(self) -> None:
        self.map.close()


class SharedLimits:
    """Admission against the shared table, as process `index` (0: main)."""

    def __init__(self, table: SharedTable, index: int, max_connections: int, per_ip: int) -> None:
        self.table = table
        self.index = index
        self.max_connections = max_connections
        self.per_ip = per_ip
        self.untracked = 0  # admitted while the table was full (no per-IP count)

    def acquire(self, ip: str) -> int:
        table, me = self.table, self.index
        with table:
            if self.max_connections and sum(table.totals()) >= self.max_connections:
                return AT_CAPACITY
            if self.per_ip:
                key = _key(ip)
                index, found = table.find(key)
                if found:
                    counts = table.row_counts(index)
                    if sum(counts) >= self.per_ip:
                        return OVER_IP_LIMIT
                    counts[me] += 1
                    table.set_row(index, key, counts)
                elif table.used < table.max_used:
                    counts = [0] * table.processes
                    counts[me] = 1
                    table.set_row(index, key, counts)
                    table.used += 1
                else:
                    self._untracked()
            table.add_total(me, 1)
        return ADMITTED

    def _untracked(self) -> None:
        self.untracked += 1
        if self.untracked in (1, 1000, 100000):
            log.warn("the per-IP table is full ({capacity} rows): {n} connections admitted without a per-IP count",
                     capacity=self.table.capacity, n=self.untracked)

    def release(self, ip: str) -> None:
        table, me = self.table, self.index
        with table:
            table.add_total(me, -1)
            if self.per_ip:
                index, found = table.find(_key(ip))
                if found:
                    counts = table.row_counts(index)
                    if counts[me]:
                        counts[me] -= 1
                        if any(counts):
                            table.set_row(index, table.key_at(index), counts)
                        else:
                            table.delete(index)


def capacity_for(max_connections: int) -> int:
    """Rows enough for every distinct address (at most max_connections of
    them) at half fill, or the default without a cap."""
    if not max_connections:
        return DEFAULT_CAPACITY
    capacity = 1024
    while capacity < 2 * max_connections:
        capacity *= 2
    return capacity


def make_limits(connections: Any, max_connections: int, per_ip: int,
                table: Optional[SharedTable], index: int) -> Limits:
    """Local checks for one process; the shared table when there is one."""
    if table is None:
        return LocalLimits(connections, max_connections, per_ip)
    return SharedLimits(table, index, max_connections, per_ip)
