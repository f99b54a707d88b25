"""WAL checkpoints on a thread of their own, ahead of the store's writer (see ``Checkpointer``)."""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)

# The checkpointer's pace while writes go on, and the groups it runs after (see Checkpointer).
CHECKPOINT_INTERVAL_S = 0.05
CHECKPOINT_GROUP_ROWS = 64


class Checkpointer:
    """Copies the WAL into the database file on a thread of its own, ahead of the writer.

    SQLite has the COMMIT that grows the WAL past 1000 pages copy it back, and that checkpoint
    ends with an fsync of the database file: 30-40 ms on the machines this was measured on,
    during which every write queued behind that COMMIT waited, and so did every agent result
    waiting for it. The writer asks this thread each time ``CHECKPOINT_GROUP_ROWS`` more rows
    have been committed, in one group or in several small ones (``request``); it runs a PASSIVE
    checkpoint, which never waits for the writer or readers and never blocks them, at most once
    per ``CHECKPOINT_INTERVAL_S``. Asking after every group, however small, cost HTTP
    throughput for little to copy; leaving small groups to SQLite let a steady stream of them
    (a pipeline of 20 ms calls) reach the 1000 pages: in 6 of 10 such trials a group of journal
    entries waited 12-17 ms for that COMMIT.

    The writer keeps SQLite's own checkpoint: it finds the pages already copied, so it is quick,
    and it still bounds the WAL and starts it over (a checkpoint running beside a steady writer
    never finds the WAL complete, which a restart needs), also if this thread is gone.
    """

    def __init__(
        self, path: str, connect: Callable[[], sqlite3.Connection], on_checkpoint: Callable[[], None] | None = None
    ) -> None:
        self._path = path  # for log messages
        self._connect = connect
        self._on_checkpoint = on_checkpoint
        self._wanted = threading.Event()
        self._stopping = threading.Event()
        self.checkpoints = 0
        self._thread = threading.Thread(target=self._main, name="quickflow-store-checkpointer", daemon=True)
        self._thread.start()

    def request(self) -> None:
        self._wanted.set()

    def stop(self) -> None:
        """Blocking: no more checkpoints; the last connection to close checkpoints what is left."""
        self._stopping.set()
        self._wanted.set()
        self._thread.join()

    def _main(self) -> None:
        try:
            conn = self._connect()
        except sqlite3.Error as exc:
            logger.error("store: cannot open a connection to checkpoint %s: %s", self._path, exc)
            return
        try:
            while not self._stopping.is_set():
                self._wanted.wait()
                self._wanted.clear()
                if self._stopping.is_set():
                    return
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    self.checkpoints += 1
                    if self._on_checkpoint is not None:
                        self._on_checkpoint()
                except sqlite3.Error as exc:
                    logger.warning("store: checkpointing %s failed: %s", self._path, exc)
                self._stopping.wait(CHECKPOINT_INTERVAL_S)
        finally:
            conn.close()
