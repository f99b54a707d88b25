"""The embedded durable store: one SQLite file in WAL mode, one writer thread, group commit.

Concurrency design
------------------
* **One writer.** The store owns exactly one writer thread and one write connection. Run and
  workflow writes become a ``_Write`` on a FIFO ``queue.Queue``; events and journal entries
  (``append_events``, ``save_call``, ``journal_call``) gather in pending lists, and only the first
  one after the writer's last take wakes it (at the end of the loop turn, or at once when a batch
  fills). The writer takes the first queued write plus everything else queued at that moment,
  then the pending lists, and runs the whole group in ONE ``BEGIN IMMEDIATE … COMMIT`` (group
  commit): a thousand agents' events and journal entries cost a handful of commits, not thousands.
* **Completion.** ``append_events`` returns at once. Awaited writes wait for an asyncio future,
  ``journal_call`` for a callback; the writer resolves a group's waiters (one
  ``loop.call_soon_threadsafe`` per group) only after the COMMIT that included them. Pending
  entries are taken after the queue, so an awaited write returning also means every write queued
  or pending before it (events included) has been committed.
* **Errors.** If one write of a group fails, the group is rolled back and replayed one write per
  transaction, so only the faulty write fails; its awaiting caller gets the exception. A failing
  ``append_events`` batch has no caller left to tell: it is logged and counted in
  :meth:`SQLiteStore.statistics`. If BEGIN or COMMIT itself fails, every caller of the group gets
  the error. The writer keeps running either way.
* **Encoding in the writer.** Records are encoded to rows (JSON with orjson) by the writer
  thread, keeping that work off the event loop; callers hand over records they no longer change.
  An unencodable value fails its own write only (see Errors).
* **Events in batches.** A group's events become one ``event_batches`` row per run: a JSON array
  of that run's events, encoded in one call. Events are three rows in four of a busy run, and one
  row each cost the writer more than the journal entries. A run's seqs must increase (its
  ``EventLog`` numbers them so): an event whose seq does not follow the run's stored ones fails
  its batch, which is then written event by event (see Errors), so only that event is dropped.
  Events stored before migration 0002 stay rows of the ``events`` table; ``read_events`` reads
  both, and all processes sharing a database must run the same version.
* **Few statements per group.** The sqlite3 module releases the GIL around every step, and
  taking it back waits up to a switch interval (5 ms) while the event loop is busy: a group
  written row by row (``executemany``) took seconds beside a busy loop instead of milliseconds.
  Batches of records go in as multi-row ``INSERT … VALUES (…), (…)`` statements of a few fixed
  sizes (``_rows.insert_rows``), so a group costs a handful of steps whatever its size.
* **Reads** run in worker threads (``anyio.to_thread.run_sync``) on a small pool of read-only
  connections, bounded by a ``CapacityLimiter``. WAL lets them proceed while the writer commits,
  and each read starts after the commits of every write that already returned, so it sees them.
  No SQLite call ever runs on the event loop thread.
* **Checkpoints** run on a thread of their own (``_checkpointer.Checkpointer``), ahead of the
  writer's: a checkpoint ends with an fsync, and nothing queued behind a COMMIT should wait.
* **Lifetime.** ``open`` creates the file, enables WAL and applies the named migrations (in a worker
  thread), then starts the writer and the checkpointer. ``aclose`` stops accepting writes, lets the
  writer commit what is queued, joins both threads and closes every connection. Awaited writes
  need the asyncio backend (they resolve an asyncio future), which is what the service runs on.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import logging
import queue
import sqlite3
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self, TypeVar

import anyio

from ..errors import ConfigError, Conflict
from ._checkpointer import CHECKPOINT_GROUP_ROWS, Checkpointer
from ._migrations import apply_migrations
from ._records import CallRecord, EventRecord, RunRecord, WorkflowRecord
from ._rows import (
    DELETE_WORKFLOW, INSERT_EVENT_BATCH, SAVE_CALL, SAVE_RUN, SAVE_WORKFLOW, SELECT_CALL, SELECT_EVENT,
    SELECT_EVENT_BATCHES, SELECT_RUN, SELECT_WORKFLOW, Row, call_from_row, call_rows, event_batch_rows,
    event_from_row, insert_rows, loads, run_from_row, run_params, workflow_from_row, workflow_params,
)

if TYPE_CHECKING:
    from ._protocol import Store

__all__ = ["SQLiteStore", "StoreStatistics"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
_Outcome = tuple["_Write", int, BaseException | None]
JournalCallback = Callable[[BaseException | None], None]
_Waiter = tuple[asyncio.AbstractEventLoop, "asyncio.Future[int] | JournalCallback"]

# How long a connection waits for a lock held by another process using the same file
# (a second ``quickflow`` pointed at the same data directory) before failing.
_BUSY_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class StoreStatistics:
    """A snapshot of the writer's work since ``open``."""

    queued: int  # writes waiting for the writer right now
    groups_committed: int  # transactions committed by the writer
    writes_committed: int  # queued writes (an ``append_events`` batch counts as one) committed
    events_committed: int
    write_errors: int  # writes that failed (their caller, if any, got the exception)
    events_dropped: int  # events in failed ``append_events`` batches (logged; nobody awaited them)
    checkpoints: int  # WAL checkpoints run by the checkpointer thread


@dataclass(slots=True)
class _Write:
    """One queued write: ``sql`` run once with ``params``, or for every record of ``records``."""

    sql: str
    what: str  # for log messages
    params: tuple[Any, ...] = ()
    waiter: _Waiter | None = None
    # Records encoded to rows by the writer thread, keeping JSON encoding off the event loop.
    records: Sequence[Any] | None = None
    encode: Callable[[Sequence[Any]], list[Row]] | None = None
    # A batch of awaited records (journal entries): ``waiters[i]`` waits for ``records[i]``.
    waiters: list[_Waiter] | None = None

    def run(self, conn: sqlite3.Connection) -> int:
        if self.records is not None and self.encode is not None:
            insert_rows(conn, self.sql, self.encode(self.records))
            return len(self.records)
        return conn.execute(self.sql, self.params).rowcount

    def split(self) -> list[_Write]:
        """One write per record, each with its own waiter: to find the one record that fails."""
        assert self.records is not None
        waiters: list[_Waiter | None] = list(self.waiters) if self.waiters else [None for _ in self.records]
        return [_Write(self.sql, self.what, records=[r], encode=self.encode, waiter=w)
                for r, w in zip(self.records, waiters)]

    @property
    def event_count(self) -> int:
        if self.sql != INSERT_EVENT_BATCH:
            return 0
        return len(self.records or ())


def _pop_all(pending: deque[T]) -> list[T]:
    # Until empty, not len() times: entries appended meanwhile come along (see SQLiteStore).
    taken: list[T] = []
    try:
        while True:
            taken.append(pending.popleft())
    except IndexError:
        return taken


# Journal entries pending that wake the writer before the loop turn ends.
_EARLY_WAKE = 32

# Wakes the writer to take the pending events; never executed itself.
_WAKE = _Write(sql="", what="wake")


class _WriteFailed(Exception):
    """Internal: a write (not BEGIN/COMMIT) failed inside a transaction; ``error`` is why."""

    def __init__(self, write: _Write, error: Exception) -> None:
        super().__init__(write.what)
        self.error = error


def _fetch(conn: sqlite3.Connection, sql: str, params: Sequence[Any] = ()) -> list[Row]:
    # Always fetch to the end: a half-read cursor keeps its read transaction open, which would
    # pin an old snapshot on this pooled connection and hold back WAL checkpoints.
    return conn.execute(sql, params).fetchall()


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            logger.exception("store: ROLLBACK failed")


def _copy_error(exc: BaseException) -> BaseException:
    # Each awaiting task raises its own instance, so tracebacks do not pile up on a shared one.
    try:
        return copy.copy(exc)
    except Exception:
        return exc


def _settle(items: list[tuple[asyncio.Future[int] | JournalCallback, int, BaseException | None]]) -> None:
    """Runs on the event loop: hand each waiter its result (a future) or call it (a callback)."""
    for waiter, result, error in items:
        if not isinstance(waiter, asyncio.Future):
            try:
                waiter(error)
            except Exception:
                logger.exception("store: a journal callback failed")
        elif waiter.done():  # the caller was cancelled; the write happened anyway
            continue
        elif error is None:
            waiter.set_result(result)
        else:
            waiter.set_exception(error)


def _connect(path: Path, *, query_only: bool) -> sqlite3.Connection:
    # ``isolation_level=None``: the sqlite3 module opens no implicit transactions; the writer
    # issues BEGIN IMMEDIATE / COMMIT itself. ``check_same_thread=False``: a connection is
    # created in one worker thread and used in another, never by two threads at once.
    conn = sqlite3.connect(path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    if query_only:
        conn.execute("PRAGMA query_only = ON")
    return conn


def _open_writer(path: Path, synchronous: str) -> tuple[sqlite3.Connection, list[str]]:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = _connect(path, query_only=False)
    try:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchall()[0][0]
        if str(mode).lower() != "wal":
            raise ConfigError(f"cannot enable WAL on {path} (journal_mode is {mode!r}); use a local disk")
        # WAL + synchronous=NORMAL: a COMMIT has written its frames to the WAL file (the OS has
        # them) before it returns, but is not fsync'ed. So every committed transaction survives a
        # crash or SIGKILL of this process; an OS crash or power loss can lose the last commits
        # (the database stays consistent). ``synchronous="FULL"`` fsyncs each group commit.
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        applied = apply_migrations(conn)
    except BaseException:
        conn.close()
        raise
    return conn, applied


class SQLiteStore:
    """The ``Store`` over one SQLite file. Create with :meth:`open`, release with :meth:`aclose`."""

    def __init__(
        self, path: Path, writer: sqlite3.Connection, applied_migrations: Sequence[str], readers: int
    ) -> None:
        """Private: use :meth:`open`."""
        self._path = path
        self._writer_conn = writer
        self._applied_migrations = tuple(applied_migrations)
        self._queue: queue.Queue[_Write | None] = queue.Queue()
        # Guards ``_closing``, ``_writer_alive`` against queued writes, and the idle reader pool.
        self._lock = threading.Lock()
        # Events and journal entries gather here, without the lock: appends come from the event
        # loop thousands of times a second, and a lock the writer happens to hold while the
        # interpreter switches threads stalls the loop for a switch interval. Each deque
        # operation is atomic; the writer pops until empty, and an append that makes a deque
        # non-empty wakes it, so no entry is left behind.
        self._events_pending: deque[EventRecord] = deque()
        self._calls_pending: deque[tuple[CallRecord, _Waiter]] = deque()
        self._wake_scheduled = False  # touched on the event loop only
        self._closing = False
        self._writer_alive = True
        self._closed = anyio.Event()
        self._idle_readers: list[sqlite3.Connection] = []
        self._read_limiter = anyio.CapacityLimiter(readers)
        self._groups = 0
        self._writes = 0
        self._events = 0
        self._write_errors = 0
        self._events_dropped = 0
        self._checkpointer = Checkpointer(str(path), functools.partial(_connect, path, query_only=False))
        # Owned by this store: started here, joined by ``aclose``. Daemon only so that a store
        # someone forgot to close cannot hang interpreter exit (it would lose nothing awaited).
        self._thread = threading.Thread(target=self._writer_main, name="quickflow-store-writer", daemon=True)
        self._thread.start()

    @classmethod
    async def open(
        cls, path: Path, *, synchronous: Literal["NORMAL", "FULL"] = "NORMAL", readers: int = 4
    ) -> SQLiteStore:
        """Open (creating if needed) the database at ``path`` and apply pending migrations.

        ``readers`` bounds concurrent reads (and read connections).
        """
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be 'NORMAL' or 'FULL', not {synchronous!r}")
        path = Path(path)
        # Shielded: the worker thread finishes regardless, and a cancellation arriving meanwhile
        # would drop the connection it returns without closing it. Bounded by the busy timeout.
        with anyio.CancelScope(shield=True):
            writer, applied = await anyio.to_thread.run_sync(_open_writer, path, synchronous)
        return cls(path, writer, applied, readers)

    @property
    def path(self) -> Path:
        return self._path

    @property
    def applied_migrations(self) -> tuple[str, ...]:
        """The migrations this ``open`` applied (empty when the database was already current)."""
        return self._applied_migrations

    def statistics(self) -> StoreStatistics:
        return StoreStatistics(
            queued=self._queue.qsize(),
            groups_committed=self._groups,
            writes_committed=self._writes,
            events_committed=self._events,
            write_errors=self._write_errors,
            events_dropped=self._events_dropped,
            checkpoints=self._checkpointer.checkpoints,
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # -- writes -------------------------------------------------------------------------------

    def _enqueue(self, write: _Write) -> None:
        with self._lock:
            self._check_open()
            self._queue.put(write)

    async def _write(self, sql: str, params: Row, what: str) -> int:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        self._enqueue(_Write(sql, what, params=params, waiter=(loop, future)))
        # If this task is cancelled here the write still happens; only the wait is abandoned.
        return await future

    async def save_run(self, run: RunRecord) -> None:
        try:
            await self._write(SAVE_RUN, run_params(run), f"run {run.id}")
        except sqlite3.IntegrityError as exc:
            if run.idempotency_key is not None and "idempotency_key" in str(exc):
                raise Conflict(
                    f"owner {run.owner!r} already has a run with idempotency key {run.idempotency_key!r}; "
                    "look it up with that key instead of creating another",
                    details={"run_id": run.id, "owner": run.owner, "idempotency_key": run.idempotency_key},
                ) from exc
            raise

    async def save_call(self, call: CallRecord) -> None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        self._pend_call(call, loop, future)
        await future

    def journal_call(self, call: CallRecord, done: JournalCallback) -> None:
        self._pend_call(call, asyncio.get_running_loop(), done)

    def _pend_call(self, call: CallRecord, loop: asyncio.AbstractEventLoop,
                   waiter: asyncio.Future[int] | JournalCallback) -> None:
        # Journal entries gather like events, so a burst of finished agents costs one queue
        # operation; each waiter still hears of the COMMIT that includes its own entry.
        self._check_open()
        entry = (call, (loop, waiter))
        pending = self._calls_pending
        pending.append(entry)
        count = len(pending)
        if not self._writer_alive:  # it died meanwhile: fail here, unless it already took this
            try:
                pending.remove(entry)
            except ValueError:
                return
            self._check_open()
        if count == 1:
            self._wake_soon(loop)
        elif count == _EARLY_WAKE:
            # A long loop turn is filling the batch: start committing it now, in parallel.
            self._queue.put(_WAKE)

    def append_events(self, events: Sequence[EventRecord]) -> None:
        # Only the batch that makes the pending events non-empty wakes the writer, so a burst
        # costs one queue operation.
        if not events:
            return
        if self._closing:
            raise RuntimeError(f"the store {self._path} is closed")
        pending = self._events_pending
        pending.extend(events)
        if len(pending) == len(events):
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no event loop in this thread: wake the writer now
                self._queue.put(_WAKE)
            else:
                self._wake_soon(loop)

    def _wake_soon(self, loop: asyncio.AbstractEventLoop) -> None:
        # Waking the writer is a futex syscall, and it is often already idle again after the
        # previous take: waking it once the loop has run this round's callbacks lets everything
        # they add go in one group. A queued write (save_run...) still takes the pending
        # entries with it at once, so the queue's FIFO promise holds.
        if not self._wake_scheduled:
            self._wake_scheduled = True
            loop.call_soon(self._wake_now)

    def _wake_now(self) -> None:
        self._wake_scheduled = False
        self._queue.put(_WAKE)

    def _check_open(self) -> None:
        if self._closing:
            raise RuntimeError(f"the store {self._path} is closed")
        if not self._writer_alive:
            raise RuntimeError(f"the writer of the store {self._path} has stopped; see the log")

    def _take_pending(self) -> list[_Write]:
        events = _pop_all(self._events_pending)
        entries = _pop_all(self._calls_pending)
        writes = []
        if events:
            writes.append(_Write(INSERT_EVENT_BATCH, "events", records=events, encode=event_batch_rows))
        if entries:
            writes.append(_Write(SAVE_CALL, f"{len(entries)} journal entries", records=[c for c, _ in entries],
                                 encode=call_rows, waiters=[w for _, w in entries]))
        return writes

    async def save_workflow(self, workflow: WorkflowRecord) -> None:
        await self._write(SAVE_WORKFLOW, workflow_params(workflow), f"workflow {workflow.name}")

    async def delete_workflow(self, name: str) -> bool:
        return await self._write(DELETE_WORKFLOW, (name,), f"delete workflow {name}") > 0

    # -- the writer thread --------------------------------------------------------------------

    def _writer_main(self) -> None:
        conn = self._writer_conn
        group: list[_Write] = []
        try:
            stopping = False
            while not stopping:
                item: _Write | None = self._queue.get()
                group = []
                while True:  # everything queued right now joins this group
                    if item is None:
                        stopping = True
                    elif item is not _WAKE:
                        group.append(item)
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                # Taken after the queue: events and journal entries added before a queued write
                # are in this group.
                group[:0] = self._take_pending()
                if group:
                    self._finish(self._commit_group(conn, group))
                    rows = sum(len(w.records) if w.records is not None else 1 for w in group)
                    if rows >= CHECKPOINT_GROUP_ROWS:
                        self._checkpointer.request()
                    group = []
        except BaseException as exc:
            # A bug in the writer itself: fail whoever waits instead of leaving them hanging.
            logger.critical("store: the writer thread of %s died", self._path, exc_info=True)
            with self._lock:
                self._writer_alive = False
            pending = group + self._drain() + self._take_pending()
            self._finish([(w, 0, _copy_error(exc)) for w in pending])
            raise
        finally:
            conn.close()

    def _drain(self) -> list[_Write]:
        writes: list[_Write] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return writes
            if item is not None and item is not _WAKE:
                writes.append(item)

    def _commit_group(self, conn: sqlite3.Connection, group: list[_Write]) -> list[_Outcome]:
        try:
            results = self._transaction(conn, group)
        except _WriteFailed:
            # Roll back and replay one write per transaction so only the faulty one fails; the
            # events of a merged batch are replayed one by one, so only a faulty event is lost.
            outcomes: list[_Outcome] = []
            for w in group:
                if w.records is not None and len(w.records) > 1:
                    outcomes.extend(self._commit_alone(conn, one) for one in w.split())
                else:
                    outcomes.append(self._commit_alone(conn, w))
            return outcomes
        except Exception as exc:  # BEGIN or COMMIT failed: nothing of the group was written
            logger.error("store: committing %d writes to %s failed: %s", len(group), self._path, exc)
            return [(w, 0, _copy_error(exc)) for w in group]
        self._groups += 1
        return [(w, r, None) for w, r in zip(group, results)]

    def _commit_alone(self, conn: sqlite3.Connection, write: _Write) -> _Outcome:
        try:
            (result,) = self._transaction(conn, [write])
        except _WriteFailed as failed:
            return (write, 0, failed.error)
        except Exception as exc:
            return (write, 0, exc)
        self._groups += 1
        return (write, result, None)

    @staticmethod
    def _transaction(conn: sqlite3.Connection, writes: list[_Write]) -> list[int]:
        conn.execute("BEGIN IMMEDIATE")
        try:
            results: list[int] = []
            for write in writes:
                try:
                    results.append(write.run(conn))
                except Exception as exc:
                    raise _WriteFailed(write, exc) from exc
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise
        return results

    def _finish(self, outcomes: list[_Outcome]) -> None:
        """Count the outcomes, log failed event batches, and wake the waiters (one call per loop)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Any, int, BaseException | None]]] = {}
        for write, result, error in outcomes:
            events = write.event_count
            writes = len(write.waiters) if write.waiters is not None else 1
            if error is None:
                self._writes += writes
                self._events += events
            else:
                self._write_errors += writes
                if write.waiter is None and write.waiters is None:
                    self._events_dropped += events
                    logger.error("store: dropped %s: %s", write.what, error)
            if write.waiters is not None:  # a batch of journal entries: one row each
                for loop, future in write.waiters:
                    by_loop.setdefault(loop, []).append((future, 1 if error is None else 0, error))
            if write.waiter is not None:
                loop, future = write.waiter
                by_loop.setdefault(loop, []).append((future, result, error))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle, items)
            except RuntimeError:  # that event loop is closed: nobody is waiting any more
                pass

    # -- reads --------------------------------------------------------------------------------

    def _checkout(self) -> sqlite3.Connection:
        with self._lock:
            if self._closing:
                raise RuntimeError(f"the store {self._path} is closed")
            if self._idle_readers:
                return self._idle_readers.pop()
        return _connect(self._path, query_only=True)

    def _checkin(self, conn: sqlite3.Connection) -> None:
        with self._lock:
            if not self._closing:
                self._idle_readers.append(conn)
                return
        conn.close()

    def _read_blocking(self, query: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._checkout()
        try:
            return query(conn)
        finally:
            _rollback(conn)  # a failed query must not leave a snapshot open on a pooled connection
            self._checkin(conn)

    async def _read(self, query: Callable[[sqlite3.Connection], T]) -> T:
        if self._closing:
            raise RuntimeError(f"the store {self._path} is closed")
        return await anyio.to_thread.run_sync(self._read_blocking, query, limiter=self._read_limiter)

    async def get_run(self, run_id: str) -> RunRecord | None:
        rows = await self._read(lambda c: _fetch(c, f"{SELECT_RUN} WHERE id = ?", (run_id,)))
        return run_from_row(rows[0]) if rows else None

    async def list_runs(
        self, *, owner: str | None = None, status: str | None = None, limit: int = 50, before: str | None = None
    ) -> list[RunRecord]:
        def query(conn: sqlite3.Connection) -> list[Row]:
            clauses: list[str] = []
            params: list[Any] = []
            if owner is not None:
                clauses.append("owner = ?")
                params.append(owner)
            if status is not None:
                clauses.append("status = ?")
                params.append(status)
            # One read transaction: the cursor row and the page come from the same snapshot.
            conn.execute("BEGIN")
            if before is not None:
                cursor = _fetch(conn, "SELECT created_at, id FROM runs WHERE id = ?", (before,))
                if cursor:  # an unknown cursor is ignored, as in MemoryStore
                    clauses.append("(created_at, id) < (?, ?)")
                    params.extend(cursor[0])
            where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
            rows = _fetch(conn, f"{SELECT_RUN}{where} ORDER BY created_at DESC, id DESC LIMIT ?", (*params, limit))
            conn.execute("COMMIT")
            return rows

        return [run_from_row(row) for row in await self._read(query)]

    async def find_run_by_idempotency_key(self, owner: str, key: str) -> RunRecord | None:
        sql = f"{SELECT_RUN} WHERE owner = ? AND idempotency_key = ?"
        rows = await self._read(lambda c: _fetch(c, sql, (owner, key)))
        return run_from_row(rows[0]) if rows else None

    async def runs_with_status(self, statuses: Sequence[str]) -> list[RunRecord]:
        wanted = list(dict.fromkeys(statuses))
        if not wanted:
            return []
        sql = f"{SELECT_RUN} WHERE status IN ({', '.join('?' * len(wanted))}) ORDER BY created_at, id"
        return [run_from_row(row) for row in await self._read(lambda c: _fetch(c, sql, wanted))]

    async def list_calls(self, run_id: str) -> list[CallRecord]:
        sql = f"{SELECT_CALL} WHERE run_id = ? ORDER BY idx"
        return [call_from_row(row) for row in await self._read(lambda c: _fetch(c, sql, (run_id,)))]

    async def get_call(self, run_id: str, index: int) -> CallRecord | None:
        sql = f"{SELECT_CALL} WHERE run_id = ? AND idx = ?"
        rows = await self._read(lambda c: _fetch(c, sql, (run_id, index)))
        return call_from_row(rows[0]) if rows else None

    async def read_events(self, run_id: str, after_seq: int = 0, limit: int | None = None) -> list[EventRecord]:
        # Events from before migration 0002 are rows of the legacy table; they precede the batches.
        legacy_sql = f"{SELECT_EVENT} WHERE run_id = ? AND seq > ? ORDER BY seq LIMIT ?"
        legacy_params = (run_id, after_seq, -1 if limit is None else limit)  # LIMIT -1: no limit

        def read(conn: sqlite3.Connection) -> tuple[list[Row], list[Row]]:
            return _fetch(conn, legacy_sql, legacy_params), _fetch(conn, SELECT_EVENT_BATCHES, (run_id, after_seq))

        legacy, batches = await self._read(read)
        events = [event_from_row(row) for row in legacy]
        for (text,) in batches:
            if limit is not None and len(events) >= limit:
                break
            events.extend(EventRecord(seq, ts, run_id, type_, data)
                          for seq, ts, type_, data in loads(text) if seq > after_seq)
        return events if limit is None else events[:limit]

    async def get_workflow(self, name: str) -> WorkflowRecord | None:
        rows = await self._read(lambda c: _fetch(c, f"{SELECT_WORKFLOW} WHERE name = ?", (name,)))
        return workflow_from_row(rows[0]) if rows else None

    async def list_workflows(self) -> list[WorkflowRecord]:
        rows = await self._read(lambda c: _fetch(c, f"{SELECT_WORKFLOW} ORDER BY name"))
        return [workflow_from_row(row) for row in rows]

    # -- shutdown -----------------------------------------------------------------------------

    def _shutdown_blocking(self) -> None:
        self._thread.join()  # the writer commits everything queued before the stop marker
        self._checkpointer.stop()
        with self._lock:
            idle, self._idle_readers = self._idle_readers, []
        for conn in idle:
            conn.close()

    async def aclose(self) -> None:
        """Commit everything queued, stop the writer thread, close every connection. Idempotent."""
        with self._lock:
            first = not self._closing
            if first:
                self._closing = True
                self._queue.put(None)  # the stop marker: after every write already queued
        if not first:
            await self._closed.wait()
            return
        try:
            # Shielded: a cancelled caller must not leave the writer running or writes unflushed.
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._shutdown_blocking)
        finally:
            self._closed.set()


if TYPE_CHECKING:

    def _conforms(store: SQLiteStore) -> Store:
        return store
