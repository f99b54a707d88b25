"""A test helper: SQLite's write lock, held from a connection of the test's own."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import anyio


class WriteLock:
    """Holds SQLite's write lock from another connection, so the store's writer waits at BEGIN and
    everything enqueued meanwhile lands in one group. Released well within the busy timeout."""

    def __init__(self, path: Path) -> None:
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._held = False

    async def acquire(self) -> None:
        await anyio.to_thread.run_sync(self._conn.execute, "BEGIN IMMEDIATE")
        self._held = True

    async def release(self) -> None:
        if self._held:
            self._held = False
            await anyio.to_thread.run_sync(self._conn.execute, "COMMIT")

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            await self.release()
            await anyio.to_thread.run_sync(self._conn.close)
