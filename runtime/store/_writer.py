"""The SQLite store's writer: a process of its own, and the frames it speaks over two pipes.

Why a process. Every write a run makes (three events and a journal entry per agent) used to be
encoded and committed by a thread of the service's own process. That thread needed the GIL
between SQLite's steps, and the event loop held it for up to a switch interval (5 ms) at a
time: a commit of a few hundred rows took 20-35 ms of wall time beside a busy loop for 5 ms of
work, the journal window filled, and the loop idled waiting for it. A process has its own GIL:
the loop hands over tuples (one pickle per loop turn), and encoding, SQL, commits and
checkpoints run on the other core.

The protocol. Both directions carry frames: a 4-byte little-endian length, then a pickle. Only
the store's own process writes to the writer and reads from it (pipes, never a socket), so
unpickling trusts its peer.
- The store sends lists of ops, in the order it took them. An op is ``(kind, tokens, payload)``:
  ``("sql", [token], (sql, params))``, ``("calls", [token per entry], [call_fields, …])``,
  ``("events", [token], [event_fields, …])`` or ``("stop", [], None)``.
- The writer takes every frame already sent, commits their ops as one transaction (group
  commit) and answers with one frame: ``(results, groups_committed, checkpoints)``, where a
  result is ``(token, value, error)``. ``value`` is a row count, or for an events op the number
  of events written; ``error`` is None or ``(exception type name, message)``.
- Its first frame, once its connection is open, is ``("ready", pid)``.
- It exits after a ``stop`` op or when the store's end of the pipe closes (the service died):
  either way it commits what it has read first.

Errors. If one write of a group fails, the group is rolled back and replayed one write per
transaction, so only the faulty write fails (a batch of journal entries is replayed entry by
entry, a batch of events event by event). If BEGIN or COMMIT fails, every write of the group
gets the error. The writer keeps running either way; it reports, the store logs.

This module runs in the writer process, which imports only it, ``_rows``, ``_records`` and
``_checkpointer`` (see ``BOOT``): nothing of the service, and none of its start-up time. The
store starts writers with ``spawn_writer`` and ``start_writer``, which run in its own process.
"""

from __future__ import annotations

import fcntl
import io
import logging
import os
import pickle
import select
import signal
import sqlite3
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ._checkpointer import CHECKPOINT_GROUP_ROWS, Checkpointer
from ._rows import INSERT_EVENT_BATCH, SAVE_CALL, call_row, event_batch_rows, insert_rows

__all__ = ["BOOT", "BUSY_TIMEOUT_S", "Frames", "Op", "WriterDidNotStart", "frame", "main", "rollback", "spawn_writer", "start_writer"]

logger = logging.getLogger(__name__)

# How long a connection waits for a lock held by another process using the same file (a second
# ``quickflow``, or the writer of a service that was killed finishing its last group).
BUSY_TIMEOUT_S = 5.0

#: ``(kind, tokens, payload)``: see the module docstring.
Op = tuple[str, list[int], Any]
Result = tuple[int, int, tuple[str, str] | None]

_LENGTH = struct.Struct("<I")

#: The writer process's ``python -c`` program. ``runtime/__init__`` imports the whole service
#: (most of a second); the writer needs four modules of ``runtime.store``, so it registers the
#: two packages as empty ones first. argv: the project root, the database path, ``synchronous``.
BOOT = """\
import sys, types
root = sys.argv[1]
for name in ("runtime", "runtime.store"):
    package = types.ModuleType(name)
    package.__path__ = [root + "/" + name.replace(".", "/")]
    sys.modules[name] = package
from runtime.store._writer import main
main(sys.argv[2], sys.argv[3])
"""


def frame(value: Any) -> bytes:
    data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(data)) + data


class _Foreign:
    """Stands in for an instance of a class the writer does not load (see ``_DataUnpickler``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


class _DataUnpickler(pickle.Unpickler):
    """Loads what journal entries and events hold (JSON's types, and a few more built-ins) and
    nothing else. A value of another class, which the service could pickle but this process may
    not be able to import, becomes a ``_Foreign``: JSON encoding refuses it, so its write alone
    fails, as it would have in the service."""

    def find_class(self, module: str, name: str) -> Any:
        if module in ("builtins", "copyreg"):
            return super().find_class(module, name)
        return _Foreign


class Frames:
    """Bytes in, whole frames out. ``data_only``: for frames from the store (``_DataUnpickler``)."""

    def __init__(self, *, data_only: bool = False) -> None:
        self._buffer = bytearray()
        self._data_only = data_only

    def feed(self, data: bytes) -> Iterator[Any]:
        self._buffer += data
        while len(self._buffer) >= _LENGTH.size:
            (size,) = _LENGTH.unpack_from(self._buffer)
            end = _LENGTH.size + size
            if len(self._buffer) < end:
                return
            data = bytes(self._buffer[_LENGTH.size:end])
            del self._buffer[:end]
            yield _DataUnpickler(io.BytesIO(data)).load() if self._data_only else pickle.loads(data)


# --- starting one (in the store's process) ---------------------------------------------------------

# How long ``start_writer`` waits for the writer to open its connection.
START_S = 30.0
# The pipe to the writer (Linux allows up to /proc/sys/fs/pipe-max-size, 1 MiB by default).
PIPE_BYTES = 1 << 20
_PROJECT_ROOT = str(Path(__file__).resolve().parents[2])


class WriterDidNotStart(RuntimeError):
    pass


def spawn_writer(path: Path, synchronous: str) -> subprocess.Popen[bytes]:
    """Start a writer process; its pipes are non-blocking, for the event loop.

    WAL + synchronous=NORMAL: a COMMIT has written its frames to the WAL file (the OS has them)
    before the writer answers, but is not fsync'ed. So every committed transaction survives a
    crash or SIGKILL of the service; an OS crash or power loss can lose the last commits (the
    database stays consistent). ``synchronous="FULL"`` fsyncs each group commit.
    """
    process = subprocess.Popen(
        [sys.executable, "-c", BOOT, _PROJECT_ROOT, str(path), synchronous],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True,
    )
    assert process.stdin is not None and process.stdout is not None  # PIPE
    if hasattr(fcntl, "F_SETPIPE_SZ"):
        # A burst (a thousand agents' entries and events, a few hundred kB) then fits the pipe
        # whole, and the writer takes it as one group instead of one per 64 kB.
        try:
            fcntl.fcntl(process.stdin.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        except OSError:
            pass
    os.set_blocking(process.stdin.fileno(), False)
    return process


def start_writer(path: Path, synchronous: str) -> subprocess.Popen[bytes]:
    """Start a writer process and wait until its connection is open (blocking: in a thread)."""
    process = spawn_writer(path, synchronous)
    assert process.stdout is not None  # PIPE
    fd = process.stdout.fileno()
    try:
        if not select.select([fd], [], [], START_S)[0]:
            raise WriterDidNotStart(f"the store's writer process did not start within {START_S:g} s")
        # The ready frame is all it sends before it is sent something, in one write of a few
        # bytes (pipes deliver those whole).
        ready = list(Frames().feed(os.read(fd, 4096)))
        if not ready or ready[0][:1] != ("ready",):
            raise WriterDidNotStart(f"the store's writer process for {path} exited at start "
                                    f"(exit code {process.wait()}); see its error above")
    except BaseException:
        process.kill()
        process.wait()
        raise
    os.set_blocking(fd, False)
    return process


# --- the writer process ------------------------------------------------------------------------


class _WriteFailed(Exception):
    """A write (not BEGIN/COMMIT) failed inside a transaction; ``error`` is why."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class _Write:
    """One op's statements. ``tokens`` name its results: one per journal entry, else one."""

    __slots__ = ("kind", "tokens", "payload")

    def __init__(self, kind: str, tokens: list[int], payload: Any) -> None:
        self.kind, self.tokens, self.payload = kind, tokens, payload

    @property
    def rows(self) -> int:
        return 1 if self.kind == "sql" else len(self.payload)

    def run(self, conn: sqlite3.Connection) -> int:
        if self.kind == "sql":
            sql, params = self.payload
            return int(conn.execute(sql, params).rowcount)
        if self.kind == "calls":
            return insert_rows(conn, SAVE_CALL, [call_row(fields) for fields in self.payload])
        insert_rows(conn, INSERT_EVENT_BATCH, event_batch_rows(self.payload))
        return len(self.payload)

    def split(self) -> list[_Write]:
        """One write per entry or per event, to find the one that fails."""
        if self.kind == "calls":
            return [_Write("calls", [token], [fields]) for token, fields in zip(self.tokens, self.payload)]
        return [_Write(self.kind, self.tokens, [fields]) for fields in self.payload]

    def results(self, value: int, error: tuple[str, str] | None) -> list[Result]:
        if self.kind == "calls":
            return [(token, 1 if error is None else 0, error) for token in self.tokens]
        return [(self.tokens[0], value, error)]


def _describe(exc: BaseException) -> tuple[str, str]:
    return type(exc).__name__, str(exc)


def rollback(conn: sqlite3.Connection) -> None:
    """End the connection's transaction, if it has one (the writer's, or a read's snapshot)."""
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            logger.exception("store: ROLLBACK failed")


class _Writer:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.groups = 0

    def commit(self, group: list[_Write]) -> list[Result]:
        try:
            values = self._transaction(group)
        except _WriteFailed:
            results: list[Result] = []
            for write in group:
                if write.kind != "sql" and len(write.payload) > 1:
                    results.extend(self._commit_pieces(write))
                else:
                    results.extend(self._commit_alone(write))
            return results
        except Exception as exc:  # BEGIN or COMMIT failed: nothing of the group was written
            error = _describe(exc)
            return [result for write in group for result in write.results(0, error)]
        self.groups += 1
        return [result for write, value in zip(group, values) for result in write.results(value, None)]

    def _commit_pieces(self, write: _Write) -> list[Result]:
        pieces = [self._commit_alone(piece) for piece in write.split()]
        if write.kind == "calls":
            return [result for piece in pieces for result in piece]
        # Events: one result for the batch, counting the events written; the first error says why
        # the others were dropped.
        written = sum(value for ((_, value, error),) in pieces if error is None)
        error = next((error for ((_, _, error),) in pieces if error is not None), None)
        return [(write.tokens[0], written, error)]

    def _commit_alone(self, write: _Write) -> list[Result]:
        try:
            (value,) = self._transaction([write])
        except _WriteFailed as failed:
            return write.results(0, _describe(failed.error))
        except Exception as exc:
            return write.results(0, _describe(exc))
        self.groups += 1
        return write.results(value, None)

    def _transaction(self, writes: list[_Write]) -> list[int]:
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            values: list[int] = []
            for write in writes:
                try:
                    values.append(write.run(conn))
                except Exception as exc:
                    raise _WriteFailed(exc) from exc
            conn.execute("COMMIT")
        except BaseException:
            rollback(conn)
            raise
        return values


class _Inbox:
    """Frames from the store, read from a pipe: blocking for the first, then whatever is there."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._frames = Frames(data_only=True)
        self.closed = False

    def take(self) -> list[Op]:
        ops: list[Op] = []
        block = True
        while not self.closed:
            if not block and not select.select([self._fd], [], [], 0)[0]:
                break
            data = os.read(self._fd, 1 << 20)
            if not data:
                self.closed = True
                break
            for ops_of_frame in self._frames.feed(data):
                ops.extend(ops_of_frame)
            block = not ops  # a frame not yet whole: wait for the rest of it
        return ops


def _batch_policy() -> None:
    """Run the writer (and the threads it starts) under SCHED_BATCH, where Linux has it.

    The event loop wakes the writer with every frame it sends. Under the default policy the
    kernel often runs the woken writer on the loop's own CPU at once, preempting the loop for
    the whole commit (0.2-0.5 ms per frame, measured with the loop thread's run-queue time)
    while the other CPU idles. A batch task never preempts on wake-up: the writer waits for
    the next tick or goes to an idle CPU, and the loop's send stays a few microseconds. Same
    nice value, same share of the CPU."""
    policy = getattr(os, "SCHED_BATCH", None)
    if policy is None or not hasattr(os, "sched_setscheduler"):
        return
    try:
        os.sched_setscheduler(0, policy, os.sched_param(0))
    except OSError:  # not permitted in this sandbox: the default policy works, only slower
        pass


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def main(path: str, synchronous: str, *, inbox_fd: int = 0, outbox_fd: int = 1) -> None:
    """The writer process: commit what the store sends until it says stop or goes away."""
    # Only frames go to the store's pipe: anything else printed goes to stderr, the service's log.
    outbox_fd = os.dup(outbox_fd)
    os.dup2(2, 1)
    # Ctrl-C, a hang-up or a SIGTERM to the whole process group reach the writer too: the
    # service stops it itself, after its last writes. It never outlives the service: the end of
    # its pipe stops it as well.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    _batch_policy()
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="quickflow store writer %(process)d: %(levelname)s %(message)s")

    def connect() -> sqlite3.Connection:
        return sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)

    conn = connect()
    conn.execute(f"PRAGMA synchronous = {synchronous}")  # a setting of the connection, not the file
    writer = _Writer(conn)
    answering = threading.Lock()  # the checkpointer's thread reports too

    def answer(results: list[Result]) -> None:
        with answering:
            _write_all(outbox_fd, frame((results, writer.groups, checkpointer.checkpoints)))

    def checkpointed() -> None:
        try:
            answer([])
        except OSError:  # the store is gone
            pass

    checkpointer = Checkpointer(path, connect, on_checkpoint=checkpointed)
    _write_all(outbox_fd, frame(("ready", os.getpid())))
    inbox = _Inbox(inbox_fd)
    try:
        stopping = False
        unchecked = 0  # rows committed since the checkpointer was last asked
        while not stopping:
            ops = inbox.take()
            stopping = inbox.closed or any(kind == "stop" for kind, _, _ in ops)
            group = [_Write(kind, tokens, payload) for kind, tokens, payload in ops if kind != "stop"]
            if not group:
                continue
            results = writer.commit(group)
            unchecked += sum(write.rows for write in group)
            if unchecked >= CHECKPOINT_GROUP_ROWS:
                checkpointer.request()
                unchecked = 0
            if inbox.closed:
                continue  # the store is gone: nobody to tell
            try:
                answer(results)
            except BrokenPipeError:
                return
    finally:
        checkpointer.stop()
        conn.close()
