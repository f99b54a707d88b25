"""Reading a run's events as they come: from the store a page at a time, and live from its log.

Async generators, kept apart from ``events``: mypyc compiles ``EventLog`` (three events per
agent go through it) but not async generators (see ``runtime/_native.py``).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import TYPE_CHECKING

from .store import EventRecord, Store

if TYPE_CHECKING:
    from .events import EventLog

__all__ = ["STORED_EVENTS_PAGE", "follow", "stored_events"]

# Events a follower reads from the store at a time: a long run's history goes out as it is
# read, instead of being loaded whole before its first event is sent.
STORED_EVENTS_PAGE = 1000


async def stored_events(store: Store, run_id: str, after_seq: int = 0) -> AsyncGenerator[EventRecord, None]:
    """The run's stored events after ``after_seq``, in order, read a page at a time."""
    while True:
        page = await store.read_events(run_id, after_seq, limit=STORED_EVENTS_PAGE)
        for event in page:
            yield event
        if len(page) < STORED_EVENTS_PAGE:
            return
        after_seq = page[-1].seq


async def follow(log: EventLog, after_seq: int = 0) -> AsyncGenerator[EventRecord, None]:
    """Every event of ``log`` with ``seq > after_seq``, then live ones until the log closes.

    Events before this process started driving the run (after a crash), and every event once
    the log is archived, come from the store.
    """
    while True:
        if after_seq + 1 < log.first_seq:
            # Archived before this read began: the store has every event. Archived while it
            # ran or while its events were handed out: read again for the rest.
            complete = log.archived
            async with aclosing(stored_events(log.store, log.run_id, after_seq)) as stored:
                async for event in stored:
                    if event.seq >= log.first_seq:
                        break
                    yield event
                    after_seq = event.seq
            if complete:
                return
            if log.archived:
                continue
        batch = log.history(after_seq)
        for event in batch:
            yield event
            after_seq = event.seq
        if log.archived and after_seq + 1 < log.first_seq:
            continue  # archived while this batch was handed out: the rest is in the store
        if log.closed and not log.history(after_seq):
            return
        if not log.history(after_seq):
            await log.changed()
