"""Who runs next: a run's queue and its workers, and a limiter that serves the most urgent first.

A run queues its calls by ``queue_priority``: a pipeline's first ``concurrency`` items first,
then the others in rounds, and within a round the calls with the most stages ahead (the
fewest, in a run with a token budget), then lower items, then issue order; ``holds_slot``
says which pipeline calls keep their slot for the item's next stage. :class:`Workers` serves
a run's queue (at most ``concurrency`` calls at once, a pause gate, and a window of calls
ahead of the journal). ``PriorityLimiter`` is the dispatcher's server-wide agent limit:
``try_acquire`` takes a free slot without awaiting (the common case costs no task switch), and
waiters are served by priority, FIFO among equals. Priorities are tuples; smaller is more
urgent.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio
from anyio.abc import TaskGroup

from .calls import LiveCall

__all__ = [
    "CALLS_AHEAD_OF_JOURNAL",
    "PriorityLimiter",
    "PriorityLimiterStatistics",
    "Workers",
    "holds_slot",
    "pipeline_hint",
    "queue_priority",
]

# Calls a run may have executing or executed but not yet journaled, per slot of its
# concurrency. Only calls that finish faster than a commit ever get this far ahead, and
# re-running those after a crash costs little; two per slot left the loop idle, waiting for
# commits, in bursts of near-instant calls.
CALLS_AHEAD_OF_JOURNAL = 8
# A worker whose calls finish without awaiting yields to the event loop after this long.
_WORKER_TURN_S = 0.002
# A pipeline stage's call must take at least this long for its worker to hold the slot for the
# item's next stage (see Workers._worker).
_HOLD_MIN_CALL_S = 0.005


#: ``[stage, item, stages, items]``: where a pipeline stage's call stands in its pipeline.
Hint = tuple[int, int, int, int]


def pipeline_hint(hint: Any) -> Hint | None:
    """``[stage, item, stages, items]`` from the prelude when a pipeline stage started the call."""
    # Runs for every agent: isinstance() calls, not all() over a generator (2% of the event
    # loop's time in a 100 x 3 pipeline trial, py-spy).
    if isinstance(hint, list) and len(hint) == 4:
        stage, item, stages, items = hint
        if isinstance(stage, int) and isinstance(item, int) and isinstance(stages, int) and isinstance(items, int):
            return stage, item, stages, items
    return None


def queue_priority(hint: Hint | None, index: int, concurrency: int, *, finish_first: bool = False) -> tuple[int, ...]:
    """A pipeline's first ``concurrency`` items first: they stream (see ``holds_slot``). The
    items after them in rounds of ``2 * concurrency`` (the last round also takes what is left
    over, so it has up to twice that; fewer items than a round make one), earlier rounds
    first; within a round, the calls with the most stages still ahead, counting this one, then
    lower items, then issue order. A call outside a pipeline has one stage ahead, in the first
    round.

    Within a round this is Hu's rule, which minimizes the total time of chains of equal calls:
    the round ends on other items' last stages, independent of each other, while the next
    round's first stages fill the gaps, and the run ends on independent calls with every slot
    busy. Later stages first would leave the last items' stages to run one after another at the
    end, each a commit and a slice after the one before, with slots idle (a 64 x 3 pipeline of
    20 ms calls on 16 slots: 1.12 against 1.09 x its ideal total, ``benchmarks/PROFILING.md``,
    fifteenth round). Rounds keep a long pipeline's items finishing as it goes, a round at a
    time, instead of all together at its end.

    ``finish_first`` (a run with a token budget) takes the fewest stages ahead first instead:
    when the budget runs out, the tokens went to items that finished, not to first stages of
    items that never will.
    """
    if hint is None:
        return (1, 0, 1 if finish_first else -1, 0, index)
    stage, item, stages, items = hint
    ahead = stages - stage
    if item < concurrency:
        return (0, 0, ahead if finish_first else -ahead, item, index)
    per_round = 2 * concurrency
    later = item - concurrency
    rounds = min(later // per_round, max(0, (items - concurrency) // per_round - 1))
    return (1, rounds, ahead if finish_first else -ahead, item, index)


def holds_slot(hint: Hint | None, concurrency: int) -> bool:
    """Whether the worker of a call a pipeline stage started keeps its slot for the item's next
    stage: only for the first ``concurrency`` items, and only if there is a next stage.

    Holding costs the slot a commit and a slice per stage. For the first items it buys what
    streaming is for, a first result after about one pass through the stages; for later items
    it would only idle slots. The item's next stage is handed to the worker that holds for it
    (``Workers.push``), not queued.
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


class Workers:
    """A run's queue of agent calls and the workers that serve it, most urgent first.

    At most ``concurrency`` workers, each holding one of the run's slots while its call
    executes (``serve``, which returns whether the call awaited). One worker is kept free while
    calls answer at once: it serves a whole burst, where a worker per queued call would only be
    woken to find the queue empty again. When a call awaits, ``start(every=True)`` gives each
    call still queued a worker, so calls with latency start together.

    A worker takes its next call while the previous ones are being journaled (``journaling``,
    then ``journaled`` once durable), as long as the run has fewer than
    ``CALLS_AHEAD_OF_JOURNAL`` times ``concurrency`` calls executing or executed but not yet
    durable: what a crash can make run again. ``pause`` stops workers from taking calls.
    """

    def __init__(self, concurrency: int, serve: Callable[[LiveCall], Awaitable[bool]]) -> None:
        self.concurrency = concurrency
        self._serve = serve
        self._window = CALLS_AHEAD_OF_JOURNAL * concurrency
        self.queue: list[tuple[tuple[int, ...], LiveCall]] = []  # a heap, most urgent first
        self.tg: TaskGroup | None = None  # set by the run while it is driven
        self._workers = 0
        # Workers inside a call or holding their slot after one, as opposed to free to take one.
        self._busy = 0
        self._parked: list[asyncio.Future[None]] = []  # idle workers, waiting for the queue to fill
        # Workers keeping their slot for a pipeline item's next stage: item -> (that stage, a
        # future resolved with its call, or with None once the script has handled the result).
        self._holders: dict[int, tuple[int, asyncio.Future[LiveCall | None]]] = {}
        # Calls executed whose journal entry is not yet durable, and workers waiting for fewer.
        self._unjournaled = 0
        self._journal_room: list[asyncio.Future[None]] = []
        self._unpaused = anyio.Event()
        self._unpaused.set()
        self._closed = False

    def push(self, call: LiveCall) -> None:
        # Holders are known by item index alone: two pipelines running at once (or a child
        # workflow's) can hand a holder the other's call. That call is a pipeline call of the
        # first items too, so it runs at once either way; the other one is queued, most urgent.
        if self._holders and call.stage_of is not None:
            stage, item = call.stage_of
            holder = self._holders.get(item)
            if holder is not None and holder[0] == stage and not holder[1].done():
                del self._holders[item]
                holder[1].set_result(call)  # the item's next stage, for the slot kept for it
                return
        heapq.heappush(self.queue, (call.priority, call))
        self.start()

    def pause(self) -> None:
        if self._unpaused.is_set():
            self._unpaused = anyio.Event()

    def resume(self) -> None:
        self._unpaused.set()

    def journaling(self) -> None:
        """A call has executed; its journal entry is on its way."""
        self._unjournaled += 1

    def journaled(self) -> None:
        """A journal entry is durable (or failed): room for another call ahead of the journal."""
        self._unjournaled -= 1
        if self._journal_room and self._unjournaled + self._busy < self._window:
            waiting, self._journal_room = self._journal_room, []
            for room in waiting:
                if not room.done():
                    room.set_result(None)

    def close(self) -> bool:
        """The script has ended: let every worker go, if each is parked with nothing queued.
        Whether they all went (each returns at its next turn), so that the run's task group ends
        without a cancellation: cancelling a task group formats a task's repr, and each parked
        worker then unwinds a CancelledError. False leaves them as they are: a worker is inside
        a call, or waits for something else (the journal, a pause), and must be cancelled."""
        parked = [future for future in self._parked if not future.done()]
        if self._busy or self.queue or len(parked) != self._workers:
            return False
        self._closed = True
        self._parked = []
        for future in parked:
            future.set_result(None)
        return True

    def start(self, *, every: bool = False) -> None:
        """Workers free to take queued calls: one, or with ``every`` one per queued call. Parked
        ones first (waking one costs a fraction of starting a task), then new ones."""
        if self.tg is None or not self.queue:
            return
        free = self._workers - len(self._parked) - self._busy
        wanted = min(len(self.queue), self.concurrency) if every else 1
        while free < wanted:
            if self._parked:
                parked = self._parked.pop()
                if parked.done():
                    continue
                parked.set_result(None)
            elif self._workers < self.concurrency:
                self._workers += 1
                self.tg.start_soon(self._worker)
            else:
                return
            free += 1

    async def _worker(self) -> None:
        """Serve queued calls until the queue is empty, then park until it fills again."""
        try:
            yielded = time.monotonic()
            kept: LiveCall | None = None  # the next stage of the item this worker kept its slot for
            while True:
                if kept is None and not self.queue:
                    # Park until the script asks for more, or has ended (close): a zero-latency
                    # burst would otherwise start and end a task per few calls.
                    await _wait_in(self._parked)
                    if self._closed:
                        return
                    yielded = time.monotonic()
                    continue
                if not self._unpaused.is_set():
                    await self._unpaused.wait()
                    continue
                if self._unjournaled + self._busy >= self._window:
                    # Calls executing count too: this is what a crash could make run again.
                    await _wait_in(self._journal_room)
                    yielded = time.monotonic()
                    continue
                if kept is not None:
                    call, kept = kept, None
                else:
                    _, call = heapq.heappop(self.queue)
                if call.stop_requested:
                    continue  # stopped while queued: the run settles it
                self._busy += 1
                try:
                    self.start()  # for the calls still queued, in case this one awaits
                    if await self._serve(call):
                        yielded = time.monotonic()  # it awaited: others ran meanwhile
                    if (call.holds_slot and call.handled is not None and self.queue
                            and self.queue[0][0] > call.priority
                            and (call.finished_at or 0.0) - (call.started_at or 0.0) >= _HOLD_MIN_CALL_S):
                        # Only items further behind are waiting: let the script start this item's
                        # next stage (once it sees this result) before the slot goes to one of
                        # them. Only after a call that took a while: the wait (a commit and a
                        # slice) is then small beside it, while after near-instant calls it would
                        # idle the slot.
                        await _delivered(call)
                        kept = await self._next_stage(call)
                        yielded = time.monotonic()
                finally:
                    self._busy -= 1
                if time.monotonic() - yielded > _WORKER_TURN_S:
                    # Calls that answer without awaiting (zero-latency simulate) never yield.
                    # What anyio's checkpoint() does on asyncio, without looking up the backend.
                    await asyncio.sleep(0)
                    yielded = time.monotonic()
        finally:
            self._workers -= 1

    async def _next_stage(self, call: LiveCall) -> LiveCall | None:
        """Keep the slot until the script asks for the next stage of ``call``'s item: that call,
        handed over by ``push``, or None once the script has handled the result without asking
        (the item failed or ended), or had already handled it (the call is queued then).

        Handed over, not queued: another worker that holds for its own item would otherwise
        take this call from the queue, and this slot then goes to an item further behind while
        the other item's next stage waits for a free slot, a whole call later.
        """
        handled, call.handled_event = call.handled_event, None
        if handled is None or handled.done() or call.stage_of is None:
            return None
        stage, item = call.stage_of
        kept: asyncio.Future[LiveCall | None] = asyncio.get_running_loop().create_future()
        self._holders[item] = (stage + 1, kept)
        handled.add_done_callback(partial(_release, kept))
        try:
            return await kept
        finally:
            if self._holders.get(item, (0, None))[1] is kept:
                del self._holders[item]


def _release(kept: asyncio.Future[LiveCall | None], _: object) -> None:
    if not kept.done():
        kept.set_result(None)


async def _wait_in(waiters: list[asyncio.Future[None]]) -> None:
    """Wait on a future added to ``waiters`` until whoever takes it from there resolves it.

    A bare future: an anyio.Event costs several times more, and workers wait once per burst."""
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    waiters.append(future)
    try:
        await future
    finally:
        if future in waiters:  # cancelled while waiting
            waiters.remove(future)


async def _delivered(call: LiveCall) -> None:
    """Wait until the script has been handed the call's result (its journal entry is durable)."""
    if not call.delivered:
        if call.on_delivered is None:
            # A bare future, resolved by the run's journal callback (see Run._settle_call).
            call.on_delivered = asyncio.get_running_loop().create_future()
        await call.on_delivered
