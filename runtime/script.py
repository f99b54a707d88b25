"""Drives one script in its isolate: slices, the outbox, settlements, timers, deadlocks.

The loop is: run a slice on the pool → handle the requests it left in the outbox (agents,
workflows and timers become tasks; logs, phases and failure lines are recorded at once) →
wait until at least one request settles → hand every settlement to the next slice. When the
script awaits while nothing is in flight and no timer is pending, it can never wake up: that
is a deadlock and the script fails with a clear message.

A run's main script and a ``workflow()`` child each get a driver; both share the run (its
agent counter, budget, concurrency limit and cancellation). Tasks the script started but
never awaited are cancelled when the script ends.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup

from sandbox import Isolate, Request, ScriptFailure, Slice, SliceOverrun, SlicePool, SliceRefused

from .errors import stuck_slices_message

if TYPE_CHECKING:
    from .run import Run

__all__ = ["ScriptDriver"]

logger = logging.getLogger(__name__)

MAX_PENDING_TIMERS = 10_000
# The script driver lets the workers run after the first AGENTS_FIRST_TURN agents of a slice, so
# that the first calls start early, and then at every multiple of AGENTS_PER_TURN: each turn costs
# a loop iteration and a journal frame (benchmarks/PROFILING.md, seventeenth round). A run with a
# token budget turns every AGENTS_FIRST_TURN agents: its budget is checked as agents are queued,
# and zero-latency calls only spend tokens while the workers run, so a longer turn would let more
# agents past a budget already spent.
AGENTS_FIRST_TURN = 16
AGENTS_PER_TURN = 64
# How soon a script whose isolate could not be evicted (the pool was busy) tries again.
EVICT_RETRY_S = 0.25


class ScriptDriver:
    def __init__(
        self,
        run: Run,
        pool: SlicePool,
        isolate: Isolate,
        body: str,
        *,
        args: Any,
        has_args: bool,
        depth: int = 0,
        group: str | None = None,
    ) -> None:
        self.run = run
        self.group = group
        self._pool = pool
        self._isolate = isolate
        self._body = body
        self._config = {
            "maxAgents": run.options.max_agents,
            "maxItems": run.limits.max_items,
            "maxLogLines": run.limits.log_lines,
            "depth": depth,
            "budgetTotal": run.options.budget_tokens,
            "hasArgs": has_args,
            "args": args if has_args else None,
            "state": run.js_state(),
        }
        self._inbox: list[tuple[int, bool, Any]] = []
        # Created by the loop when it waits, set and dropped by the next delivery.
        self._inbox_changed: anyio.Event | None = None
        self._outstanding = 0
        self._timers: dict[int, float] = {}  # id -> deadline
        self._timer_heap: list[tuple[float, int]] = []
        # Created with the timer loop, at the script's first setTimeout: most scripts have none,
        # and a parked run should not pay for a task that waits for nothing.
        self._timers_changed: anyio.Event | None = None
        self._failure: ScriptFailure | None = None
        # Resolved once the slice that settles what the inbox holds now has been handled.
        self._batch_handled: asyncio.Future[None] | None = None
        self._done = False
        self._tg: TaskGroup | None = None
        self._tasks = 0  # started in _tg and not finished: workflow() calls, the timer loop

    async def execute(self, *, ready: Callable[[], Awaitable[None]] | None = None, keep_isolate: bool = False) -> Slice:
        """Run the script to its end; the final slice holds the result or the failure.

        ``ready`` is awaited while the first slice runs, and before any of the script's requests
        is handled: the run's record is saved meanwhile (see ``Run.drive``). If it raises, no
        request is handled, and its error leaves once the slice is done (in the ExceptionGroup
        of this task group). The isolate is closed on the way out, unless ``keep_isolate``: the
        caller then calls ``close_isolate`` itself, once it has done what should not wait for
        the context to be freed."""
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                final = await self._drive(ready)
                if self._tasks:  # cancelling formats a task's repr: not for nothing
                    tg.cancel_scope.cancel()
            return final
        finally:
            self._done = True
            _resolve(self._batch_handled)
            if not keep_isolate:
                self._isolate.close()

    def close_isolate(self) -> None:
        self._isolate.close()

    # --- the loop ---------------------------------------------------------------------------

    async def _drive(self, ready: Callable[[], Awaitable[None]] | None) -> Slice:
        start = partial(self._isolate.start, self._body, self._config)
        current = await self._slice(start) if ready is None else await self._beside(start, ready)
        self.run.ctx.isolate_started()
        handled: asyncio.Future[None] | None = None
        while True:
            await self._handle(current.requests)
            _resolve(handled)
            if current.finished:
                return current
            if self._failure is not None:
                return Slice(requests=(), finished=True, failure=self._failure)
            if self._outstanding == 0 and not self._inbox:
                return Slice(
                    requests=(),
                    finished=True,
                    failure=ScriptFailure(
                        "deadlock",
                        "Deadlock",
                        "the script is waiting for a promise that can never settle: no agent, workflow or "
                        "timer is in flight (a Promise that is never resolved?)",
                    ),
                )
            await self._wait_for_inbox()
            batch, self._inbox = self._inbox, []
            handled, self._batch_handled = self._batch_handled, None
            current = await self._slice(partial(self._isolate.settle, batch, self.run.js_state()))

    async def _beside(self, step: partial[Slice], ready: Callable[[], Awaitable[None]]) -> Slice:
        """One slice, with ``ready`` awaited meanwhile; its error is raised after the slice."""
        error: Exception | None = None

        async def wait_ready() -> None:
            nonlocal error
            try:
                await ready()
            except Exception as exc:  # raised below, once the slice is done
                error = exc

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait_ready)
            current = await self._slice(step)
        if error is not None:
            raise error
        return current

    async def _slice(self, step: partial[Slice]) -> Slice:
        """Run one slice on the pool. One stuck in a built-in call past its deadline is left to
        its thread, and the script fails. No slice runs while the run's owner has
        ``limits.stuck_slices_per_owner`` such threads still running: the script fails instead,
        so that no script, child workflow or burst of runs piles up more (see ``SlicePool.run``)."""
        limit = self.run.limits.stuck_slices_per_owner
        try:
            return await self._pool.run(step, overrun_after_s=self._isolate.overrun_after_s,
                                        owner=self.run.record.owner, stuck_limit=limit)
        except SliceRefused as refused:
            return Slice(requests=(), finished=True,
                         failure=ScriptFailure("limit", "stuck_slices", stuck_slices_message(refused.stuck, limit)))
        except SliceOverrun as overrun:
            logger.warning("run %s: a slice was still inside the engine after %g s and was abandoned; its "
                           "thread runs on until the engine stops the script", self.run.id, overrun.seconds)
            return Slice(requests=(), finished=True, failure=self._isolate.overrun_failure(overrun.seconds))

    async def _wait_for_inbox(self) -> None:
        """Wait for a settlement. A script that waits long gives up its isolate's memory
        (``Limits.evict_idle_s``); the next slice rebuilds the isolate by replay."""
        idle_s = self.run.limits.evict_idle_s
        evict_at = anyio.current_time() + idle_s
        while not self._inbox:
            self._inbox_changed = changed = anyio.Event()
            if idle_s > 0 and not self._isolate.evicted and self._isolate.evictable:
                remaining = evict_at - anyio.current_time()
                with anyio.move_on_after(remaining if remaining > 0 else EVICT_RETRY_S):
                    await changed.wait()
                if self._inbox or not self._isolate.evictable or anyio.current_time() < evict_at:
                    continue
                # Not while scripts queue for the pool: memory is not what is short then, and a
                # replay would only add to the queue; but soon after, not a whole wait later.
                if self._pool.statistics().waiting:
                    continue
                # Freeing a context takes milliseconds for a big heap, so not on the event loop.
                if await self._pool.run(self._isolate.evict):
                    self.run.isolate_evictions += 1
                else:  # declined (a slice was running, or the heap is big): after another wait
                    evict_at = anyio.current_time() + idle_s
            else:
                await changed.wait()

    def delivery_handled(self) -> asyncio.Future[None]:
        """For a result just delivered: a future resolved once the script has run the slice that
        settles it and queued what that slice asked for. A bare future, so that a worker holding
        its slot can wait for it and for its item's next call at once (see ``Workers``)."""
        if self._batch_handled is None:
            self._batch_handled = asyncio.get_running_loop().create_future()
            if self._done:
                self._batch_handled.set_result(None)
        return self._batch_handled

    def _deliver(self, request_id: int, ok: bool, value: Any) -> None:
        self._outstanding -= 1
        self._inbox.append((request_id, ok, value))
        if self._inbox_changed is not None:
            self._inbox_changed.set()
            self._inbox_changed = None

    async def _handle(self, requests: Sequence[Request]) -> None:
        agents = 0
        submit, deliver, handled, group = self.run.submit_agent, self._deliver, self.delivery_handled, self.group
        per_turn = AGENTS_PER_TURN if self.run.options.budget_tokens is None else AGENTS_FIRST_TURN
        for request in requests:
            kind, payload = request.kind, request.payload
            if kind == "agent":
                self._outstanding += 1
                submit(payload, deliver=partial(deliver, request.id), handled=handled, group=group)
                agents += 1
                if agents % per_turn == 0 or agents == AGENTS_FIRST_TURN:
                    # A slice may ask for thousands of agents: let the first ones start meanwhile
                    # (anyio's checkpoint() on asyncio, without looking up the backend).
                    await asyncio.sleep(0)
            elif kind == "workflow":
                self._outstanding += 1
                self._start_task(self._workflow, request.id, payload)
            elif kind == "timer":
                self._add_timer(request.id, _delay_ms(payload))
            elif kind == "clear_timer":
                if self._timers.pop(request.id, None) is not None:
                    self._outstanding -= 1
            elif kind == "log":
                self.run.log(str(payload.get("message", "")), level=str(payload.get("level", "info")))
            elif kind == "phase":
                self.run.enter_phase(str(payload.get("title", "")), group=self.group)
            elif kind == "failure":
                self.run.record_failure(str(payload.get("message", "")))

    def _start_task(self, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        assert self._tg is not None
        self._tasks += 1
        self._tg.start_soon(self._counted, fn, *args)

    async def _counted(self, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        try:
            await fn(*args)
        finally:
            self._tasks -= 1

    # --- requests ---------------------------------------------------------------------------

    async def _workflow(self, request_id: int, payload: dict[str, Any]) -> None:
        ok, value = await self.run.child_workflow(str(payload["name"]), payload.get("args"), "args" in payload)
        self._deliver(request_id, ok, value)

    # --- timers -----------------------------------------------------------------------------

    def _add_timer(self, timer_id: int, ms: float) -> None:
        if len(self._timers) >= MAX_PENDING_TIMERS:
            self._failure = ScriptFailure(
                "limit", "timers", f"more than {MAX_PENDING_TIMERS} setTimeout() timers pending at once"
            )
            return
        deadline = anyio.current_time() + max(0.0, ms) / 1000
        self._outstanding += 1
        self._timers[timer_id] = deadline
        heapq.heappush(self._timer_heap, (deadline, timer_id))
        if self._timers_changed is None:
            self._timers_changed = anyio.Event()
            self._start_task(self._timer_loop)
            return
        self._timers_changed.set()
        self._timers_changed = anyio.Event()

    async def _timer_loop(self) -> None:
        while True:
            changed = self._timers_changed
            assert changed is not None
            now = anyio.current_time()
            while self._timer_heap and self._timer_heap[0][0] <= now:
                _, timer_id = heapq.heappop(self._timer_heap)
                if self._timers.pop(timer_id, None) is not None:  # else cleared meanwhile
                    self._deliver(timer_id, True, None)
            wait = self._timer_heap[0][0] - now if self._timer_heap else math.inf
            with anyio.move_on_after(wait):
                await changed.wait()


def _resolve(future: asyncio.Future[None] | None) -> None:
    if future is not None and not future.done():
        future.set_result(None)


def _delay_ms(payload: Any) -> float:
    delay = payload.get("ms") if isinstance(payload, dict) else None
    return float(delay) if isinstance(delay, (int, float)) and 0 <= delay < 2**31 else 1.0
