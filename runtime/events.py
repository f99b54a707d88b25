"""Run events (SPEC §3.4): a per-run log with a monotonic ``seq``, stored and followed live.

An :class:`EventLog` keeps the run's events in memory while the run is live, queues each one
to the store (``append_events`` never blocks), and wakes followers. Followers read from an
index, so a reconnect with ``Last-Event-ID`` resumes exactly after the last event it saw:
nothing is missed and nothing repeats.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from enum import Enum
from typing import Any

import anyio

from .store import EventRecord, Store

__all__ = ["EventLog", "EventType", "stored_events"]

# Events a follower reads from the store at a time: a long run's history goes out as it is
# read, instead of being loaded whole before its first event is sent.
STORED_EVENTS_PAGE = 1000


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


async def stored_events(store: Store, run_id: str, after_seq: int = 0) -> AsyncGenerator[EventRecord, None]:
    """The run's stored events after ``after_seq``, in order, read a page at a time."""
    while True:
        page = await store.read_events(run_id, after_seq, limit=STORED_EVENTS_PAGE)
        for event in page:
            yield event
        if len(page) < STORED_EVENTS_PAGE:
            return
        after_seq = page[-1].seq


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

    async def follow(self, after_seq: int = 0) -> AsyncIterator[EventRecord]:
        """Every event with ``seq > after_seq``, then live ones until the log closes.

        Events before this process started driving the run (after a crash), and every event
        once the log is archived, come from the store.
        """
        while True:
            if after_seq + 1 < self._first_seq:
                # Archived before this read began: the store has every event. Archived while
                # it ran or while its events were handed out: read again for the rest.
                complete = self._archived
                async with aclosing(stored_events(self._store, self.run_id, after_seq)) as stored:
                    async for event in stored:
                        if event.seq >= self._first_seq:
                            break
                        yield event
                        after_seq = event.seq
                if complete:
                    return
                if self._archived:
                    continue
            batch = self.history(after_seq)
            for event in batch:
                yield event
                after_seq = event.seq
            if self._archived and after_seq + 1 < self._first_seq:
                continue  # archived while this batch was handed out: the rest is in the store
            if self._closed and not self.history(after_seq):
                return
            if not self.history(after_seq):
                if self._changed is None:
                    self._changed = anyio.Event()
                await self._changed.wait()
