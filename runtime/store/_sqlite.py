"""The embedded durable store: one SQLite file in WAL mode, one writer process, group commit.

Concurrency design
------------------
* **One writer, in a process of its own** (``_writer``). Every write goes to it over a pipe, in
  order: run and workflow writes, events (``append_events``) and journal entries
  (``save_call``, ``journal_call``). Events and entries gather in pending lists and go over once
  per event-loop turn (at once when a burst of entries fills a batch), as tuples in one pickle;
  the writer encodes them and commits everything that has arrived in ONE ``BEGIN IMMEDIATE …
  COMMIT`` (group commit). Its own GIL is the point: the writer thread this replaced waited a
  switch interval for the GIL between SQLite's steps while the loop was busy, so its commits
  took 20-35 ms for 5 ms of work and the runs waited for them.
* **Completion.** ``append_events`` returns at once. Awaited writes wait for an asyncio future,
  ``journal_call`` and ``save_run_soon`` for a callback; they are resolved when the writer's
  answer for their group arrives, so only after the COMMIT that included them. Pending events
  and entries are sent before the writes queued with them, so an awaited write returning also
  means every write queued or pending before it (events included) has been committed.
* **Errors.** If one write of a group fails, the writer rolls the group back and replays it one
  write per transaction, so only the faulty write fails; its awaiting caller gets the exception
  (rebuilt here from its type and message). A failing ``append_events`` batch has no caller
  left to tell: its events are logged and counted in :meth:`SQLiteStore.statistics`. If BEGIN
  or COMMIT itself fails, every caller of the group gets the error. If the writer process dies,
  every write waiting fails and later ones raise: the service cannot keep its promise without it.
* **Encoding in the writer.** Records cross as plain tuples (``_rows.call_fields``) and are
  encoded to rows (JSON with orjson) by the writer; callers hand over records they no longer
  change. An unencodable value fails its own write only (see Errors).
* **Events in batches.** A group's events become one ``event_batches`` row per run: a JSON array
  of that run's events, encoded in one call. A run's seqs must increase (its ``EventLog``
  numbers them so): an event whose seq does not follow the run's stored ones fails its batch,
  which is then written event by event, so only that event is dropped. Events stored before
  migration 0002 stay rows of the ``events`` table; ``read_events`` reads both, and all
  processes sharing a database must run the same version.
* **Few statements per group.** Batches of records go in as multi-row ``INSERT … VALUES (…),
  (…)`` statements of a few fixed sizes (``_rows.insert_rows``).
* **Reads** run in worker threads (``anyio.to_thread.run_sync``) on a small pool of read-only
  connections (``_readers.Readers``), bounded by a ``CapacityLimiter``. WAL lets them proceed while the writer commits,
  and each read starts after the commits of every write that already returned, so it sees them.
  No SQLite call ever runs on the event loop thread.
* **Checkpoints** run on a thread of the writer process (``_checkpointer.Checkpointer``), ahead
  of its commits: a checkpoint ends with an fsync, and nothing queued behind a COMMIT should
  wait.
* **Lifetime.** ``open`` creates the file, enables WAL and applies the named migrations (in a
  worker thread), then starts the writer process and waits until its connection is open.
  ``aclose`` stops accepting writes, has the writer commit what it was sent and exit, and closes
  every connection. If the service dies, the writer reads the end of its pipe, commits what it
  has and exits. The store belongs to the event loop that opened it: writes from another thread
  are handed to that loop, and awaited writes need asyncio, which is what the service runs on.
"""

from __future__ import annotations

import asyncio
import builtins
import copy
import functools
import logging
import os
import sqlite3
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self, TypeVar

import anyio

from ..errors import ConfigError, Conflict
from ._migrations import apply_migrations
from ._protocol import check_limit
from ._readers import Readers, connect, fetch
from ._records import CallRecord, EventRecord, RunRecord, WorkflowRecord
from ._rows import (
    DELETE_WORKFLOW, SAVE_RUN, SAVE_WORKFLOW, SELECT_CALL, SELECT_EVENT, SELECT_EVENT_BATCHES, SELECT_EVENT_BATCHES_PAGE,
    SELECT_RUN, SELECT_WORKFLOW, Row, call_fields, call_from_row, event_fields, event_from_row, loads, run_from_row,
    run_params, workflow_from_row, workflow_params,
)
from ._writer import Frames, Op, WriterDidNotStart, frame, spawn_writer, start_writer

if TYPE_CHECKING:
    from ._protocol import Store

__all__ = ["SQLiteStore", "StoreStatistics"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
JournalCallback = Callable[[BaseException | None], None]
_Waiter = tuple[asyncio.AbstractEventLoop, "asyncio.Future[int] | JournalCallback"]

# Journal entries pending that go to the writer before the loop turn ends: a long turn is
# filling the batch, and the writer can commit the first part meanwhile.
_EARLY_SEND = 32

# How long ``aclose`` waits for the writer process to commit what it was sent and exit.
_WRITER_STOP_S = 30.0
# A writer that dies is replaced, unless the last one was started less than this ago.
_RESTART_AFTER_S = 10.0

# The writer's answers are small (a few bytes per write of a group): no need to allocate, and
# shrink, a megabyte at every answer.
_READ_BYTES = 1 << 16
# Event batches a page of events reads first (then twice as many per round until it is full).
_PAGE_BATCHES = 4


@dataclass(frozen=True)
class StoreStatistics:
    """A snapshot of the writer's work since ``open``."""

    queued: int  # writes not yet committed: pending here, or sent to the writer and not answered
    groups_committed: int  # transactions committed by the writer
    writes_committed: int  # queued writes (an ``append_events`` batch counts as one) committed
    events_committed: int
    write_errors: int  # writes that failed (their caller, if any, got the exception)
    events_dropped: int  # events in failed ``append_events`` batches (logged; nobody awaited them)
    checkpoints: int  # WAL checkpoints run by the writer's checkpointer thread


class _Sent:
    """A write sent to the writer and not answered yet: who waits, and what to log if it fails.

    A plain class: one is made per write, and a dataclass's ``__init__`` stays interpreted."""

    def __init__(self, waiter: _Waiter | None, what: str, events: int = 0) -> None:
        self.waiter = waiter
        self.what = what
        self.events = events


def _pop_all(pending: deque[T]) -> list[T]:
    # Until empty, not len() times: entries appended meanwhile (from another thread) come along.
    # Only the loop takes from it; other threads only append. (Not until IndexError: an
    # exception per call costs more in compiled code than the test does.)
    taken: list[T] = []
    while pending:
        taken.append(pending.popleft())
    return taken


def _error(described: tuple[str, str]) -> BaseException:
    """The writer's ``(type name, message)`` as an exception of that type, where it is one of
    sqlite3's or a built-in one (so ``IntegrityError`` stays one); else a RuntimeError."""
    name, message = described
    cls = getattr(sqlite3, name, None) or getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            return cls(message)
        except Exception:
            pass
    return RuntimeError(f"{name}: {message}")


def _run_error(run: RunRecord, exc: sqlite3.IntegrityError) -> BaseException:
    """A run's save refused by a constraint: Conflict for its idempotency key, else as it is."""
    if run.idempotency_key is not None and "idempotency_key" in str(exc):
        conflict = Conflict(
            f"owner {run.owner!r} already has a run with idempotency key {run.idempotency_key!r}; "
            "look it up with that key instead of creating another",
            details={"run_id": run.id, "owner": run.owner, "idempotency_key": run.idempotency_key},
        )
        conflict.__cause__ = exc
        return conflict
    return exc


def _frames(op: Op) -> bool:
    try:
        frame([op])
    except Exception:
        return False
    return True


def _copy_error(exc: BaseException) -> BaseException:
    # Each awaiting task raises its own instance, so tracebacks do not pile up on a shared one.
    try:
        return copy.copy(exc)
    except Exception:
        return exc


def _settle(items: list[tuple[asyncio.Future[int] | JournalCallback, int, BaseException | None]]) -> None:
    """Runs on the waiters' event loop: hand each its result (a future) or call it (a callback)."""
    for waiter, result, error in items:
        if not isinstance(waiter, asyncio.Future):
            try:
                waiter(error)
            except Exception:
                logger.exception("store: a write's callback failed")
        elif waiter.done():  # the caller was cancelled; the write happened anyway
            continue
        elif error is None:
            waiter.set_result(result)
        else:
            waiter.set_exception(error)


def _prepare(path: Path) -> list[str]:
    """Create the file if needed, switch it to WAL and apply pending migrations."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = connect(path, query_only=False)
    try:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchall()[0][0]
        if str(mode).lower() != "wal":
            raise ConfigError(f"cannot enable WAL on {path} (journal_mode is {mode!r}); use a local disk")
        return apply_migrations(conn)
    finally:
        conn.close()


class SQLiteStore:
    """The ``Store`` over one SQLite file. Create with :meth:`open`, release with :meth:`aclose`."""

    def __init__(
        self,
        path: Path,
        writer: subprocess.Popen[bytes],
        synchronous: str,
        applied_migrations: Sequence[str],
        readers: int,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        """Private: use :meth:`open`."""
        self._path = path
        self._applied_migrations = tuple(applied_migrations)
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._lock = threading.Lock()  # guards ``_closing``
        # Writes gather here until the end of the loop turn; appends are atomic, and only the
        # loop takes (``_send``).
        self._events_pending: deque[EventRecord] = deque()
        self._calls_pending: deque[tuple[CallRecord, _Waiter]] = deque()
        self._writes_pending: deque[tuple[str, Row, str, _Waiter]] = deque()
        self._send_scheduled = False
        self._sending = False
        self._counted = (0, 0)  # groups and checkpoints of the writers before this one
        self._sent: dict[int, _Sent] = {}  # by token, until the writer answers
        self._next_token = 0
        # (last token, monotonic time) of each frame with writes not all answered: commit_wait_s().
        self._frames_sent: deque[tuple[int, float]] = deque()
        # Ops sent and not answered yet, in order: sent again to a new writer if this one dies.
        self._unanswered: deque[Op] = deque()
        self._synchronous = synchronous
        self._exited: list[subprocess.Popen[bytes]] = []  # writers that died, reaped by aclose
        self._restarted_at: float | None = None
        self._writer_alive = True
        self._writer_gone = anyio.Event()
        self._attach(writer)
        self._closing = False
        self._closed = anyio.Event()
        self._readers = Readers(path, readers)
        self._groups = 0
        self._writes = 0
        self._events = 0
        self._write_errors = 0
        self._events_dropped = 0
        self._checkpoints = 0

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
        loop = asyncio.get_running_loop()
        # Shielded: the worker thread finishes regardless, and a cancellation arriving meanwhile
        # would leave the writer process without an owner. Bounded by the busy timeout and
        # ``_writer.START_S``.
        with anyio.CancelScope(shield=True):
            applied = await anyio.to_thread.run_sync(_prepare, path)
            try:
                writer = await anyio.to_thread.run_sync(start_writer, path, synchronous)
            except WriterDidNotStart as exc:
                raise ConfigError(str(exc)) from exc
        return cls(path, writer, synchronous, applied, readers, loop)

    @property
    def path(self) -> Path:
        return self._path

    @property
    def applied_migrations(self) -> tuple[str, ...]:
        """The migrations this ``open`` applied (empty when the database was already current)."""
        return self._applied_migrations

    @property
    def writer_pid(self) -> int:
        """The writer process (for operators and tests)."""
        return self._writer.pid

    def statistics(self) -> StoreStatistics:
        return StoreStatistics(
            queued=len(self._sent) + len(self._events_pending) + len(self._calls_pending) + len(self._writes_pending),
            groups_committed=self._groups,
            writes_committed=self._writes,
            events_committed=self._events,
            write_errors=self._write_errors,
            events_dropped=self._events_dropped,
            checkpoints=self._checkpoints,
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # -- writes -------------------------------------------------------------------------------

    async def _write(self, sql: str, params: Row, what: str) -> int:
        self._check_open()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        self._writes_pending.append((sql, params, what, (loop, future)))
        self._send_soon()
        # If this task is cancelled here the write still happens; only the wait is abandoned.
        return await future

    async def save_run(self, run: RunRecord) -> None:
        try:
            await self._write(SAVE_RUN, run_params(run), f"run {run.id}")
        except sqlite3.IntegrityError as exc:
            raise _run_error(run, exc)  # a Conflict carries its cause

    def save_run_soon(self, run: RunRecord, done: JournalCallback) -> None:
        self._check_open()

        def saved(error: BaseException | None) -> None:
            done(_run_error(run, error) if isinstance(error, sqlite3.IntegrityError) else error)

        self._writes_pending.append((SAVE_RUN, run_params(run), f"run {run.id}", (asyncio.get_running_loop(), saved)))
        self._send_soon()

    async def save_call(self, call: CallRecord) -> None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        self._pend_call(call, loop, future)
        await future

    def journal_call(self, call: CallRecord, done: JournalCallback) -> None:
        # On the store's own thread, its loop: asyncio.get_running_loop() makes a system call
        # (getpid), once per agent.
        loop = self._loop if threading.get_ident() == self._loop_thread else asyncio.get_running_loop()
        self._pend_call(call, loop, done)

    def _pend_call(self, call: CallRecord, loop: asyncio.AbstractEventLoop,
                   waiter: asyncio.Future[int] | JournalCallback) -> None:
        # Journal entries gather like events, so a burst of finished agents costs one pickle;
        # each waiter still hears of the COMMIT that includes its own entry.
        self._check_open()
        pending = self._calls_pending
        pending.append((call, (loop, waiter)))
        if len(pending) == _EARLY_SEND and threading.get_ident() == self._loop_thread:
            self._send()
        else:
            self._send_soon()

    def append_events(self, events: Sequence[EventRecord]) -> None:
        if not events:
            return
        if self._closing:
            raise RuntimeError(f"the store {self._path} is closed")
        self._events_pending.extend(events)
        self._send_soon()

    def _send_soon(self) -> None:
        if threading.get_ident() != self._loop_thread:
            # From another thread, every time: a flag two threads read at once could have each
            # leave the send to the other.
            self._loop.call_soon_threadsafe(self._send)
        elif not self._send_scheduled:
            # On the loop, once it has run this round's callbacks, so that everything they add
            # goes in one frame (and one group).
            self._send_scheduled = True
            self._loop.call_soon(self._send)

    def _check_open(self) -> None:
        if self._closing:
            raise RuntimeError(f"the store {self._path} is closed")
        if not self._writer_alive:
            raise RuntimeError(f"the writer process of the store {self._path} has stopped; see the log")

    def _send(self, *, stop: bool = False) -> None:
        """On the loop: send everything pending to the writer, events and journal entries first."""
        if self._sending:  # a callback run while a frame is built: its writes go in the next one
            self._send_soon()
            return
        self._sending = True
        try:
            self._send_pending(stop)
        finally:
            self._sending = False

    def _send_pending(self, stop: bool) -> None:
        self._send_scheduled = False
        events = _pop_all(self._events_pending)
        entries = _pop_all(self._calls_pending)
        writes = _pop_all(self._writes_pending)
        ops: list[Op] = []
        if events:
            ops.append(("events", [self._track(None, f"{len(events)} events", len(events))],
                        [event_fields(e) for e in events]))
        if entries:
            ops.append(("calls", [self._track(waiter, "a journal entry") for _, waiter in entries],
                        [call_fields(c) for c, _ in entries]))
        ops.extend(("sql", [self._track(waiter, what)], (sql, params)) for sql, params, what, waiter in writes)
        if stop:
            ops.append(("stop", [], None))
        if not ops:
            return
        if not self._writer_alive:
            self._fail_all(RuntimeError(f"the writer process of the store {self._path} has stopped; see the log"))
            return
        try:
            data = frame(ops)
        except Exception:  # a value that does not pickle: fail its own write only
            ops, data = self._framed_apart(ops)
        self._unanswered.extend(op for op in ops if op[0] != "stop")
        if self._sent:
            self._frames_sent.append((self._next_token - 1, time.monotonic()))
        self._outbox += data
        self._flush_outbox()

    def _track(self, waiter: _Waiter | None, what: str, events: int = 0) -> int:
        token = self._next_token
        self._next_token += 1
        self._sent[token] = _Sent(waiter, what, events)
        return token

    def _framed_apart(self, ops: list[Op]) -> tuple[list[Op], bytes]:
        """``ops`` a frame each, and a journal entry or event alone where its op does not frame.
        The writes that still do not fail once this frame is on its way (events: dropped)."""
        kept: list[Op] = []
        frames: list[bytes] = []
        failed: list[tuple[int, int, tuple[str, str] | None]] = []

        def framed(op: Op) -> BaseException | None:
            """None once ``op`` is framed and kept, else why it does not frame."""
            try:
                frames.append(frame([op]))
            except Exception as exc:  # pickle errors, RecursionError: whatever the value raises
                return exc
            kept.append(op)
            return None

        def fail(tokens: list[int], exc: BaseException) -> None:
            error = (type(exc).__name__, f"the value cannot be handed to the writer: {exc}")
            failed.extend((token, 0, error) for token in tokens)

        for op in ops:
            kind, tokens, payload = op
            outcome = framed(op)
            if outcome is None:
                continue
            if kind == "calls":
                for token, fields in zip(tokens, payload):
                    if (why := framed(("calls", [token], [fields]))) is not None:
                        fail([token], why)
            elif kind == "events":
                good = [fields for fields in payload if _frames(("events", tokens, [fields]))]
                if not good or framed(("events", tokens, good)) is not None:
                    good = []
                    self._sent.pop(tokens[0], None)  # nothing of the batch goes
                else:
                    self._sent[tokens[0]].events = len(good)
                self._events_dropped += len(payload) - len(good)
                logger.error("store: dropped %d events that cannot be handed to the writer: %s",
                             len(payload) - len(good), outcome)
            else:
                fail(tokens, outcome)
        self._loop.call_soon(self._resolve, failed)
        return kept, b"".join(frames)

    def _flush_outbox(self) -> None:
        try:
            written = os.write(self._to_writer, self._outbox)
        except BlockingIOError:
            written = 0
        except OSError:
            # The writer is gone. Its answers may still wait in its pipe: the reader takes them,
            # then the end of the pipe, and only then is the writer replaced.
            self._loop.remove_writer(self._to_writer)
            return
        del self._outbox[:written]
        if self._outbox:
            self._loop.add_writer(self._to_writer, self._drain_outbox)

    def _drain_outbox(self) -> None:
        self._loop.remove_writer(self._to_writer)
        self._flush_outbox()

    def _attach(self, writer: subprocess.Popen[bytes]) -> None:
        assert writer.stdin is not None and writer.stdout is not None  # PIPE
        self._writer = writer
        self._to_writer = writer.stdin.fileno()
        self._from_writer = writer.stdout.fileno()
        self._frames = Frames()
        self._outbox = bytearray()  # frames the pipe did not take yet
        os.set_blocking(self._from_writer, False)
        self._loop.add_reader(self._from_writer, self._receive)

    def _receive(self) -> None:
        """On the loop, when the writer has answered: resolve the waiters of each group."""
        try:
            data = os.read(self._from_writer, _READ_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._writer_died()
            return
        for answer in self._frames.feed(data):
            if isinstance(answer[0], str):  # ("ready", pid)
                continue
            results, groups, checkpoints = answer
            self._groups, self._checkpoints = self._counted[0] + groups, self._counted[1] + checkpoints
            self._resolve(results)
        # A group answers every op of the frames it took: the oldest ones go first.
        unanswered = self._unanswered
        while unanswered and not any(token in self._sent for token in unanswered[0][1]):
            unanswered.popleft()
        self._answered_frames()

    def _answered_frames(self) -> None:
        """Forget the frames whose writes have all been answered."""
        frames = self._frames_sent
        if not self._sent:
            frames.clear()
            return
        oldest = next(iter(self._sent))  # tokens go in in increasing order
        while frames and frames[0][0] < oldest:
            frames.popleft()

    def commit_wait_s(self) -> float:
        """How long the oldest write sent to the writer has waited for its answer (0.0: none waits)."""
        self._answered_frames()
        return time.monotonic() - self._frames_sent[0][1] if self._frames_sent else 0.0

    def _resolve(self, results: list[tuple[int, int, tuple[str, str] | None]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Any, int, BaseException | None]]] = {}
        for token, value, described in results:
            sent = self._sent.pop(token, None)
            if sent is None:
                continue
            error = None if described is None else _error(described)
            if sent.events:  # an events batch: ``value`` events were written
                self._events += value
                dropped = sent.events - value
                if dropped:
                    self._events_dropped += dropped
                    self._write_errors += 1
                    logger.error("store: dropped %d of %s: %s", dropped, sent.what, error)
                else:
                    self._writes += 1
            elif error is None:
                self._writes += 1
            else:
                self._write_errors += 1
                if sent.waiter is None:
                    logger.error("store: %s failed: %s", sent.what, error)
            if sent.waiter is not None:
                loop, waiter = sent.waiter
                by_loop.setdefault(loop, []).append((waiter, value, error))
        self._settle_on(by_loop)

    def _writer_died(self) -> None:
        if not self._writer_alive:
            return
        self._loop.remove_reader(self._from_writer)
        self._loop.remove_writer(self._to_writer)
        self._exited.append(self._writer)
        code = self._writer.poll()
        if code is None:  # its pipe closed first: reap it once it is gone, not at aclose
            self._loop.call_later(1.0, self._reap_exited)
        how = "exited" if code is None else f"exited (exit code {code})"
        now = time.monotonic()
        if not self._closing and (self._restarted_at is None or now - self._restarted_at >= _RESTART_AFTER_S):
            # Killed on its own (the OOM killer, an operator): start another and send it again
            # everything not answered. Every write is an upsert, or an event batch whose stored
            # seqs the database refuses to repeat, so one the dead writer did commit is harmless.
            logger.error("store: the writer process of %s %s; starting another, and sending it the %d writes "
                         "it had not answered", self._path, how, len(self._sent))
            self._restarted_at = now
            self._counted = (self._groups, self._checkpoints)  # the new writer counts from 0
            try:
                self._attach(spawn_writer(self._path, self._synchronous))
            except OSError as exc:
                logger.critical("store: cannot start a writer process for %s: %s", self._path, exc)
            else:
                self._outbox += frame(list(self._unanswered))
                self._flush_outbox()
                return
        elif not self._closing:
            logger.critical("store: the writer process of %s %s, within %g s of a restart; writes fail from now on",
                            self._path, how, _RESTART_AFTER_S)
        self._writer_alive = False
        self._fail_all(RuntimeError(f"the writer process of the store {self._path} has stopped; see the log"))
        self._writer_gone.set()

    def _reap_exited(self) -> None:
        for writer in [w for w in self._exited if w.poll() is not None]:
            self._exited.remove(writer)
            for pipe in (writer.stdin, writer.stdout):
                if pipe is not None:
                    pipe.close()

    def _fail_all(self, error: BaseException) -> None:
        """The writer is gone: every write sent or pending fails, and nobody will commit it."""
        sent, self._sent = self._sent, {}
        waiters = [s.waiter for s in sent.values()]
        waiters += [waiter for _, waiter in _pop_all(self._calls_pending)]
        waiters += [waiter for _, _, _, waiter in _pop_all(self._writes_pending)]
        self._events_dropped += len(_pop_all(self._events_pending)) + sum(s.events for s in sent.values())
        self._write_errors += len(waiters)
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Any, int, BaseException | None]]] = {}
        for waiter in waiters:
            if waiter is not None:
                loop, future = waiter
                by_loop.setdefault(loop, []).append((future, 0, _copy_error(error)))
        self._settle_on(by_loop)

    def _settle_on(self, by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Any, int, BaseException | None]]]) -> None:
        for loop, items in by_loop.items():
            if loop is self._loop:
                _settle(items)
                continue
            try:
                loop.call_soon_threadsafe(_settle, items)
            except RuntimeError:  # that event loop is closed: nobody is waiting any more
                pass

    async def save_workflow(self, workflow: WorkflowRecord) -> None:
        await self._write(SAVE_WORKFLOW, workflow_params(workflow), f"workflow {workflow.name}")

    async def delete_workflow(self, name: str) -> bool:
        return await self._write(DELETE_WORKFLOW, (name,), f"delete workflow {name}") > 0

    # -- reads --------------------------------------------------------------------------------

    async def _read(self, query: Callable[[sqlite3.Connection], T]) -> T:
        if self._closing:
            raise RuntimeError(f"the store {self._path} is closed")
        return await self._readers.run(query)

    async def get_run(self, run_id: str) -> RunRecord | None:
        rows = await self._read(lambda c: fetch(c, f"{SELECT_RUN} WHERE id = ?", (run_id,)))
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
                cursor = fetch(conn, "SELECT created_at, id FROM runs WHERE id = ?", (before,))
                if cursor:  # an unknown cursor is ignored, as in MemoryStore
                    clauses.append("(created_at, id) < (?, ?)")
                    params.extend(cursor[0])
            where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
            rows = fetch(conn, f"{SELECT_RUN}{where} ORDER BY created_at DESC, id DESC LIMIT ?", (*params, limit))
            conn.execute("COMMIT")
            return rows

        return [run_from_row(row) for row in await self._read(query)]

    async def find_run_by_idempotency_key(self, owner: str, key: str) -> RunRecord | None:
        sql = f"{SELECT_RUN} WHERE owner = ? AND idempotency_key = ?"
        rows = await self._read(lambda c: fetch(c, sql, (owner, key)))
        return run_from_row(rows[0]) if rows else None

    async def runs_with_status(self, statuses: Sequence[str]) -> list[RunRecord]:
        wanted = list(dict.fromkeys(statuses))
        if not wanted:
            return []
        sql = f"{SELECT_RUN} WHERE status IN ({', '.join('?' * len(wanted))}) ORDER BY created_at, id"
        return [run_from_row(row) for row in await self._read(lambda c: fetch(c, sql, wanted))]

    async def list_calls(self, run_id: str) -> list[CallRecord]:
        sql = f"{SELECT_CALL} WHERE run_id = ? ORDER BY idx"
        return [call_from_row(row) for row in await self._read(lambda c: fetch(c, sql, (run_id,)))]

    async def get_call(self, run_id: str, index: int) -> CallRecord | None:
        sql = f"{SELECT_CALL} WHERE run_id = ? AND idx = ?"
        rows = await self._read(lambda c: fetch(c, sql, (run_id, index)))
        return call_from_row(rows[0]) if rows else None

    async def read_events(self, run_id: str, after_seq: int = 0, limit: int | None = None) -> list[EventRecord]:
        check_limit(limit)
        # Events from before migration 0002 are rows of the legacy table; they precede the batches.
        legacy_sql = f"{SELECT_EVENT} WHERE run_id = ? AND seq > ? ORDER BY seq LIMIT ?"
        legacy_params = (run_id, after_seq, -1 if limit is None else limit)  # LIMIT -1: no limit

        def read(conn: sqlite3.Connection, low: int, wanted: int | None) -> tuple[list[Row], list[str], bool]:
            """The legacy rows (on the first read), then the texts of the batches after ``low``:
            every one, or as many as ``wanted`` events need by their seqs; and whether the run may
            have more. The caller decodes them: here, each batch's decoding would trade the GIL
            with the busy event loop."""
            legacy = fetch(conn, legacy_sql, legacy_params) if low == after_seq else []
            if wanted is None:
                return legacy, [text for (text,) in fetch(conn, SELECT_EVENT_BATCHES, (run_id, low))], False
            # Not every later batch of a long run for one page: a few at a time, twice as many
            # each round, until their seqs cover the page.
            texts: list[str] = []
            room, take = wanted - len(legacy), _PAGE_BATCHES
            while room > 0:
                batches = fetch(conn, SELECT_EVENT_BATCHES_PAGE, (run_id, low, take))
                for first_seq, last_seq, text in batches:
                    texts.append(text)
                    room -= last_seq - max(first_seq, low + 1) + 1  # at most: dropped events leave gaps
                    low = last_seq
                if len(batches) < take:
                    return legacy, texts, False
                take *= 2
            return legacy, texts, True

        events: list[EventRecord] = []
        low, more = after_seq, True
        while more:
            wanted = None if limit is None else limit - len(events)
            legacy, texts, more = await self._read(functools.partial(read, low=low, wanted=wanted))
            events.extend(map(event_from_row, legacy))
            for text in texts:
                events.extend(EventRecord(seq, ts, run_id, type_, data)
                              for seq, ts, type_, data in loads(text) if seq > low)
            if limit is None or len(events) >= limit or not texts:
                break
            low = events[-1].seq  # the seqs promised more than there were (gaps): read on
        return events if limit is None else events[:limit]

    async def get_workflow(self, name: str) -> WorkflowRecord | None:
        rows = await self._read(lambda c: fetch(c, f"{SELECT_WORKFLOW} WHERE name = ?", (name,)))
        return workflow_from_row(rows[0]) if rows else None

    async def list_workflows(self) -> list[WorkflowRecord]:
        rows = await self._read(lambda c: fetch(c, f"{SELECT_WORKFLOW} ORDER BY name"))
        return [workflow_from_row(row) for row in rows]

    # -- shutdown -----------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Have the writer commit everything sent and exit, close every connection. Idempotent."""
        with self._lock:
            first = not self._closing
            self._closing = True
        if not first:
            await self._closed.wait()
            return
        try:
            # Shielded: a cancelled caller must not leave the writer running or writes unsent.
            with anyio.CancelScope(shield=True):
                if self._writer_alive:
                    self._send(stop=True)
                    with anyio.move_on_after(_WRITER_STOP_S):
                        await self._writer_gone.wait()
                if self._writer_alive:
                    logger.error("store: the writer process of %s did not stop in %g s; killing it",
                                 self._path, _WRITER_STOP_S)
                    self._writer.kill()
                    await self._writer_gone.wait()
                await anyio.to_thread.run_sync(self._release_blocking)
        finally:
            self._closed.set()

    def _release_blocking(self) -> None:
        for writer in (*self._exited, self._writer):
            writer.wait()
            for pipe in (writer.stdin, writer.stdout):
                if pipe is not None:
                    pipe.close()
        self._readers.close()


if TYPE_CHECKING:

    def _conforms(store: SQLiteStore) -> Store:
        return store
