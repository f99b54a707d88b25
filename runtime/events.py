"""Run events (SPEC §3.4): a per-run log with a monotonic ``seq``, stored and followed live.

An :class:`EventLog` keeps the run's events in memory while the run is live, queues each one
to the store (``append_events`` never blocks), and wakes followers. Followers read from an
index, so a reconnect with ``Last-Event-ID`` resumes exactly after the last event it saw:
nothing is missed and nothing repeats.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from enum import Enum
from typing import Any

import anyio

from .followers import follow
from .store import EventRecord, Store

__all__ = ["EventLog", "EventType"]


class EventType(str, Enum):
    RUN_QUEUED = "run.queued"
    RUN_STARTED = "run.started"
    RUN_PAUSED = "run.paused"
    RUN_RESUMED = "run.resumed"
    RUN_COMPLETED = "run.completed"
    RUN_FAILED = "run.failed"
    RUN_CANCELLED = "run.cancelled"
    PHASE_STARTED = "phase.started"
    AGENT_QUEUED = "agent.queued"
    AGENT_STARTED = "agent.started"
    AGENT_PROGRESS = "agent.progress"
    AGENT_COMPLETED = "agent.completed"
    AGENT_FAILED = "agent.failed"
    AGENT_STOPPED = "agent.stopped"
    AGENT_CACHED = "agent.cached"
    AGENT_RETRYING = "agent.retrying"
    LOG = "log"
    WARNING = "warning"
    BUDGET_UPDATED = "budget.updated"


TERMINAL_EVENTS = frozenset({EventType.RUN_COMPLETED, EventType.RUN_FAILED, EventType.RUN_CANCELLED})


class EventLog:
    def __init__(
        self,
        run_id: str,
        store: Store,
        *,
        start_seq: int = 0,
        listener: Callable[[EventRecord], None] | None = None,
    ) -> None:
        self.run_id = run_id
        self._store = store
        self._seq = start_seq
        self._first_seq = start_seq + 1
        self._events: list[EventRecord] = []
        # Created by a follower that waits, set (and dropped) by the next emit: emitting costs
        # nothing extra while nobody follows.
        self._changed: anyio.Event | None = None
        self._closed = False
        self._archived = False
        self._listener = listener

    @property
    def last_seq(self) -> int:
        return self._seq

    def emit(self, type: EventType, data: dict[str, Any] | None = None) -> EventRecord:
        # Three times per agent: the checks are written out rather than called.
        self._seq += 1
        event = EventRecord(self._seq, time.time(), self.run_id, type._value_, data or {})
        self._events.append(event)
        self._store.append_events((event,))
        if self._listener is not None:
            self._listener(event)
        if self._changed is not None:
            self._wake()
        return event

    def _wake(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def close(self) -> None:
        """No more events: followers drain what is left and stop."""
        self._closed = True
        self._wake()

    def archive(self) -> None:
        """The log is closed and every event is durable: drop the in-memory copy. Followers read
        from the store from now on, as they do for events from before a crash."""
        assert self._closed, "archive() is for a closed log"
        self._first_seq = self._seq + 1
        self._events = []
        self._archived = True

    def history(self, after_seq: int = 0) -> list[EventRecord]:
        """The events held in memory after ``after_seq``: those emitted by this process, until
        the log is archived."""
        start = max(0, after_seq + 1 - self._first_seq)
        return self._events[start:]

    def follow(self, after_seq: int = 0) -> AsyncIterator[EventRecord]:
        """Every event with ``seq > after_seq``, then live ones until the log closes (see
        ``followers.follow``: an async generator, which mypyc does not compile)."""
        return follow(self, after_seq)

    # For followers (runtime.followers), which read the log as it changes.

    @property
    def first_seq(self) -> int:
        return self._first_seq

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def archived(self) -> bool:
        return self._archived

    @property
    def store(self) -> Store:
        return self._store

    async def changed(self) -> None:
        """Wait for the next event, or the log's close."""
        if self._changed is None:
            self._changed = anyio.Event()
        await self._changed.wait()
