"""The priority limiter: urgent waiters first, FIFO among equals, cancellation never leaks a slot."""

from __future__ import annotations

import anyio
import pytest

from runtime.scheduling import PriorityLimiter

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
