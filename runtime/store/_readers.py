"""The store's readers: a pool of query-only SQLite connections, each used by one worker thread
at a time, so that no SQLite call runs on the event loop (see ``_sqlite``, "Reads")."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from ._rows import Row
from ._writer import BUSY_TIMEOUT_S, rollback

__all__ = ["Readers", "connect", "fetch"]

T = TypeVar("T")


def connect(path: Path, *, query_only: bool) -> sqlite3.Connection:
    # ``isolation_level=None``: the sqlite3 module opens no implicit transactions.
    # ``check_same_thread=False``: a connection is created in one worker thread and used in
    # another, never by two threads at once.
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    if query_only:
        conn.execute("PRAGMA query_only = ON")
    return conn


def fetch(conn: sqlite3.Connection, sql: str, params: Sequence[Any] = ()) -> list[Row]:
    # Always fetch to the end: a half-read cursor keeps its read transaction open, which would
    # pin an old snapshot on this pooled connection and hold back WAL checkpoints.
    return conn.execute(sql, params).fetchall()


class Readers:
    """At most ``size`` reads at once, each on a worker thread with a pooled connection."""

    def __init__(self, path: Path, size: int) -> None:
        self._path = path
        self._limiter = anyio.CapacityLimiter(size)
        self._lock = threading.Lock()  # guards the idle pool and ``_closed``
        self._idle: list[sqlite3.Connection] = []
        self._closed = False

    async def run(self, query: Callable[[sqlite3.Connection], T]) -> T:
        """``query(conn)`` on a worker thread; a closed pool raises RuntimeError."""
        if self._closed:
            raise RuntimeError(f"the store {self._path} is closed")
        return await anyio.to_thread.run_sync(self._run_blocking, query, limiter=self._limiter)

    def close(self) -> None:
        """Refuse new reads and close the idle connections; those in use close when they return."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _run_blocking(self, query: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._checkout()
        try:
            return query(conn)
        finally:
            rollback(conn)  # a failed query must not leave a snapshot open on a pooled connection
            self._checkin(conn)

    def _checkout(self) -> sqlite3.Connection:
        with self._lock:
            if self._closed:
                raise RuntimeError(f"the store {self._path} is closed")
            if self._idle:
                return self._idle.pop()
        return connect(self._path, query_only=True)

    def _checkin(self, conn: sqlite3.Connection) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(conn)
                return
        conn.close()
