"""Who runs next: the order of a run's queue, and a limiter that serves the most urgent first.

A run queues its calls by ``queue_priority``: later pipeline stages first, then lower items,
then issue order; ``holds_slot`` says which pipeline calls keep their slot for the item's next
stage (``runtime.run`` does the queueing and the holding). ``PriorityLimiter`` is the
dispatcher's server-wide agent limit: ``try_acquire`` takes a free slot without awaiting (the
common case costs no task switch), and waiters are served by priority, FIFO among equals.
Priorities are tuples; smaller is more urgent.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Any

import anyio

__all__ = ["PriorityLimiter", "PriorityLimiterStatistics", "holds_slot", "pipeline_hint", "queue_priority"]


def pipeline_hint(hint: Any) -> tuple[int, int, int] | None:
    """``[stage, item, stages]`` from the prelude when a pipeline stage started the call."""
    if isinstance(hint, list) and len(hint) == 3 and all(isinstance(x, int) for x in hint):
        return hint[0], hint[1], hint[2]
    return None


def queue_priority(hint: tuple[int, int, int] | None, index: int) -> tuple[int, ...]:
    """Later pipeline stages first, then lower items, then issue order."""
    return (-hint[0], hint[1], index) if hint is not None else (0, 0, index)


def holds_slot(hint: tuple[int, int, int] | None, concurrency: int) -> bool:
    """Whether the worker of a call a pipeline stage started keeps its slot for the item's next
    stage: only for the first ``concurrency`` items, and only if there is a next stage.

    Holding costs the slot a commit and a slice per stage. For the first items it buys what
    streaming is for, a first result after about one pass through the stages; for later items
    it would only idle slots, while those items keep their priority in the queue anyway.
    """
    return hint is not None and hint[0] + 1 < hint[2] and hint[1] < concurrency


@dataclass(frozen=True)
class PriorityLimiterStatistics:
    total_tokens: int
    borrowed_tokens: int
    tasks_waiting: int


@dataclass(order=True)
class _Waiter:
    priority: tuple[Any, ...]
    seq: int
    event: anyio.Event = field(compare=False)
    granted: bool = field(default=False, compare=False)
    abandoned: bool = field(default=False, compare=False)


class PriorityLimiter:
    def __init__(self, total_tokens: int) -> None:
        self.total_tokens = total_tokens
        self._borrowed = 0
        self._waiting: list[_Waiter] = []
        self._abandoned = 0
        self._seq = itertools.count()

    def try_acquire(self) -> bool:
        """Take a free slot without waiting, if one is free and nobody waits for it."""
        if self._borrowed < self.total_tokens and len(self._waiting) == self._abandoned:
            self._borrowed += 1
            return True
        return False

    async def acquire(self, priority: tuple[Any, ...] = ()) -> None:
        if self.try_acquire():
            return
        waiter = _Waiter(priority, next(self._seq), anyio.Event())
        heapq.heappush(self._waiting, waiter)
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.granted:
                self.release()  # handed a slot while being cancelled: pass it on
            else:
                waiter.abandoned = True
                self._abandoned += 1
            raise

    def release(self) -> None:
        """Give the slot to the most urgent waiter, or return it."""
        while self._waiting:
            waiter = heapq.heappop(self._waiting)
            if waiter.abandoned:
                self._abandoned -= 1
                continue
            waiter.granted = True
            waiter.event.set()
            return
        self._borrowed -= 1

    def statistics(self) -> PriorityLimiterStatistics:
        return PriorityLimiterStatistics(
            total_tokens=self.total_tokens,
            borrowed_tokens=self._borrowed,
            tasks_waiting=len(self._waiting) - self._abandoned,
        )
