"""The priority limiter: urgent waiters first, FIFO among equals, cancellation never leaks a slot.
A run's workers: an item's next pipeline stage goes to the slot kept for it."""

from __future__ import annotations

import asyncio

import anyio
import pytest

from runtime.calls import LiveCall
from runtime.scheduling import PriorityLimiter, Workers, holds_slot, queue_priority

pytestmark = pytest.mark.anyio


async def test_free_slots_go_to_the_most_urgent_waiter() -> None:
    limiter = PriorityLimiter(1)
    order: list[str] = []

    async def worker(name: str, priority: tuple[int, ...]) -> None:
        await limiter.acquire(priority)
        order.append(name)
        limiter.release()

    with anyio.fail_after(5):
        await limiter.acquire()
        async with anyio.create_task_group() as tg:
            for name, priority in [("stage0-a", (0, 0)), ("stage2", (-2, 5)), ("stage0-b", (0, 0)), ("stage1", (-1, 3))]:
                tg.start_soon(worker, name, priority)
            await anyio.wait_all_tasks_blocked()
            assert limiter.statistics().tasks_waiting == 4
            limiter.release()
    assert order == ["stage2", "stage1", "stage0-a", "stage0-b"]
    assert limiter.statistics().borrowed_tokens == 0


async def test_cancelled_waiters_do_not_keep_or_leak_slots() -> None:
    limiter = PriorityLimiter(1)
    got: list[str] = []

    async def waiter(name: str) -> None:
        await limiter.acquire((0,))
        got.append(name)
        limiter.release()

    with anyio.fail_after(5):
        await limiter.acquire()
        async with anyio.create_task_group() as tg:
            with anyio.CancelScope() as doomed:
                tg.start_soon(waiter, "kept")
            cancel_me = anyio.CancelScope()

            async def cancelled() -> None:
                with cancel_me:
                    await limiter.acquire((-1,))
                    got.append("cancelled")

            tg.start_soon(cancelled)
            await anyio.wait_all_tasks_blocked()
            cancel_me.cancel()
            await anyio.wait_all_tasks_blocked()
            assert limiter.statistics().tasks_waiting == 1
            limiter.release()
        assert not doomed.cancelled_caught
    assert got == ["kept"]
    assert limiter.statistics() .borrowed_tokens == 0


def test_the_queue_counts_stages_ahead_not_the_stage_number() -> None:
    # Stage 1 of 4 has three calls ahead of it; stage 0 of a one-stage pipeline has one.
    longer, shorter = queue_priority((1, 2, 4, 3), 11, 2), queue_priority((0, 2, 1, 3), 10, 2)
    assert longer < shorter
    assert queue_priority((1, 2, 4, 3), 11, 2, finish_first=True) > queue_priority((0, 2, 1, 3), 10, 2,
                                                                                   finish_first=True)
    assert queue_priority((2, 0, 3, 9), 12, 2) < queue_priority((0, 2, 3, 9), 1, 2)  # the streaming items first


def test_the_queue_serves_a_long_pipeline_in_rounds() -> None:
    # Concurrency 2: items 0-1 stream, then rounds of 4 items. Eleven items: rounds 2-5 and
    # 6-10 (the last round takes the one left over). An earlier round's last stage goes before
    # a later round's first; within a round, the most stages ahead first.
    def priority(stage: int, item: int) -> tuple[int, ...]:
        return queue_priority((stage, item, 3, 11), 100 + item, 2)

    assert priority(2, 5) < priority(0, 6)
    assert priority(0, 5) < priority(2, 2)
    assert priority(0, 10) < priority(1, 6)  # item 10 is in the round of 6-9
    assert priority(2, 10) > priority(0, 6)
    assert priority(2, 1) < priority(0, 2)  # the streaming items before every round


def pipeline_call(index: int, stage: int, item: int, *, stages: int = 3, concurrency: int = 2) -> LiveCall:
    call = LiveCall(index, f"key{index}", 1, f"item {item} stage {stage}", {}, f"i{item}-s{stage}", "(no phase)")
    hint = (stage, item, stages, 8)
    call.stage_of = stage, item
    call.holds_slot = holds_slot(hint, concurrency)
    call.priority = queue_priority(hint, index, concurrency)
    return call


async def test_an_items_next_stage_goes_to_the_slot_kept_for_it() -> None:
    # Two slots, held by items 0 and 1. Item 0's next stage starts on item 0's worker as soon as
    # the script asks for it, before the script has handled the rest of its slice; item 1's
    # worker, finishing meanwhile, keeps its own slot instead of taking item 0's call, and item
    # 2 waits for a free slot.
    loop = asyncio.get_running_loop()
    gates: dict[str, asyncio.Future[None]] = {}
    handled: dict[str, asyncio.Future[None]] = {}
    ran: list[tuple[str, asyncio.Task[object] | None]] = []

    async def serve(call: LiveCall) -> bool:
        ran.append((call.label, asyncio.current_task()))
        call.started_at = 1000.0
        await gates.setdefault(call.label, loop.create_future())
        call.finished_at = 1001.0  # a call that took a while: its worker may keep the slot
        call.delivered = True
        call.handled_event = handled.setdefault(call.label, loop.create_future())
        return True

    def worker_of(label: str) -> asyncio.Task[object] | None:
        return next(task for name, task in ran if name == label)

    def release(label: str) -> None:
        gates.setdefault(label, loop.create_future()).set_result(None)

    workers = Workers(2, serve)
    a0, b0, c0 = pipeline_call(0, 0, 0), pipeline_call(1, 0, 1), pipeline_call(2, 0, 2)
    for call in (a0, b0, c0):
        call.handled = loop.create_future  # only tested for presence
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            workers.tg = tg
            for call in (c0, b0, a0):
                workers.push(call)
            await anyio.wait_all_tasks_blocked()
            assert [name for name, _ in ran] == ["i0-s0", "i1-s0"]  # the items that stream first

            release("i0-s0")
            await anyio.wait_all_tasks_blocked()
            a1 = pipeline_call(3, 1, 0)
            workers.push(a1)
            await anyio.wait_all_tasks_blocked()
            assert worker_of("i0-s1") is worker_of("i0-s0")
            assert not handled["i0-s0"].done()  # the script is still handling that slice
            assert workers.queue == [(c0.priority, c0)]

            release("i1-s0")
            await anyio.wait_all_tasks_blocked()
            assert [name for name, _ in ran] == ["i0-s0", "i1-s0", "i0-s1"]
            b1 = pipeline_call(4, 1, 1)
            workers.push(b1)
            await anyio.wait_all_tasks_blocked()
            assert worker_of("i1-s1") is worker_of("i1-s0")

            # Once the script has handled a result without asking for a next stage (the item
            # ended), the kept slot goes to the queue.
            release("i0-s1")
            await anyio.wait_all_tasks_blocked()
            handled["i0-s1"].set_result(None)
            await anyio.wait_all_tasks_blocked()
            assert [name for name, _ in ran][-1] == "i2-s0"
            assert worker_of("i2-s0") is worker_of("i0-s0")
            tg.cancel_scope.cancel()


async def test_closing_lets_parked_workers_go_and_refuses_while_one_is_busy() -> None:
    # A run whose script has ended closes its workers: parked ones return on their own, so
    # that the run's task group ends without cancelling them. A worker inside a call must be
    # cancelled instead, and close() says so.
    loop = asyncio.get_running_loop()
    gate: asyncio.Future[None] = loop.create_future()
    served: list[str] = []

    async def serve(call: LiveCall) -> bool:
        served.append(call.label)
        if call.label == "slow":
            await gate
        return False

    def call(index: int, label: str) -> LiveCall:
        return LiveCall(index, f"key{index}", 1, label, {}, label, "(no phase)")

    workers = Workers(4, serve)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            workers.tg = tg
            workers.push(call(0, "slow"))
            await anyio.wait_all_tasks_blocked()
            assert not workers.close()  # "slow" is being served
            gate.set_result(None)
            await anyio.wait_all_tasks_blocked()
            workers.push(call(1, "quick"))
            await anyio.wait_all_tasks_blocked()
            assert served == ["slow", "quick"]
            assert workers.close()
        # The task group ended by itself: nothing was cancelled.
        assert not tg.cancel_scope.cancel_called
