"""The slice pool: FIFO-fair workers, and slices abandoned at their deadline.

The slices here are plain functions that block their thread (``threading.Event.wait``), the
way a built-in call blocks a slice inside the engine; tests release them when they are done.
"""

from __future__ import annotations

import os
import random
import threading
import time

import anyio
import pytest

import sandbox._pool
from sandbox import SliceOverrun, SlicePool, SliceRefused


def blocked_until(release: threading.Event, started: threading.Event | None = None,
                  thread_ids: list[int] | None = None) -> str:
    if thread_ids is not None:
        thread_ids.append(threading.get_native_id())
    if started is not None:
        started.set()
    release.wait(10)
    return "released"


@pytest.mark.anyio
async def test_a_slice_past_its_deadline_is_abandoned_and_the_pool_goes_on() -> None:
    release = threading.Event()
    pool = SlicePool(workers=1)
    stuck: list[int] = []
    try:
        with anyio.fail_after(10):
            started = time.perf_counter()
            with pytest.raises(SliceOverrun) as caught:
                await pool.run(lambda: blocked_until(release, thread_ids=stuck), overrun_after_s=0.2)
            waited = time.perf_counter() - started
            assert caught.value.seconds == 0.2
            assert 0.2 <= waited < 5

            stats = pool.statistics()
            assert (stats.overruns_total, stats.overrunning, stats.running) == (1, 1, 0)
            # The stuck thread runs on, on what the rest of the process leaves idle.
            assert os.getpriority(os.PRIO_PROCESS, stuck[0]) == 19

            # Its only worker is still blocked, yet the next slice runs at once: on a new thread.
            assert await pool.run(lambda: threading.current_thread().name) == "quickflow slice worker"
            assert await pool.run(lambda: 6 * 7, overrun_after_s=5) == 42

            release.set()
            while pool.statistics().overrunning:
                await anyio.sleep(0.01)
            assert pool.statistics().overruns_total == 1
            # Once out of its slice, the low-priority thread leaves the pool.
            while any(thread.native_id == stuck[0] for thread in threading.enumerate()):
                await anyio.sleep(0.01)
            assert await pool.run(threading.get_native_id) != stuck[0]
    finally:
        release.set()


@pytest.mark.anyio
async def test_abandoned_slices_are_counted_by_owner_until_their_threads_are_done() -> None:
    releases = [threading.Event(), threading.Event()]
    pool = SlicePool(workers=2)
    try:
        with anyio.fail_after(10):
            for release in releases:
                with pytest.raises(SliceOverrun):
                    await pool.run(lambda release=release: blocked_until(release), overrun_after_s=0.05, owner="ann")
            assert await pool.run(lambda: 1, overrun_after_s=0.05, owner="bob") == 1  # in time: not counted
            assert (pool.overrunning("ann"), pool.overrunning("bob")) == (2, 0)
            with pytest.raises(SliceRefused) as refused:  # at its limit: the slice does not run
                await pool.run(lambda: pytest.fail("a refused slice ran"), owner="ann", stuck_limit=2)
            assert refused.value.stuck == 2
            assert await pool.run(lambda: 2, owner="ann", stuck_limit=3) == 2
            assert await pool.run(lambda: 3, owner="bob", stuck_limit=1) == 3

            releases[0].set()
            while pool.overrunning("ann") == 2:
                await anyio.sleep(0.01)
            assert pool.overrunning("ann") == 1 and pool.statistics().overrunning == 1
    finally:
        for release in releases:
            release.set()


@pytest.mark.anyio
async def test_a_slice_that_ends_in_time_keeps_its_result_and_its_errors() -> None:
    pool = SlicePool(workers=2)
    with anyio.fail_after(10):
        assert await pool.run(lambda: "done", overrun_after_s=5) == "done"

        def fails() -> None:
            raise ValueError("from the slice")

        with pytest.raises(ValueError, match="from the slice"):
            await pool.run(fails, overrun_after_s=5)
        stats = pool.statistics()
        assert (stats.slices_total, stats.overruns_total, stats.overrunning) == (2, 0, 0)


@pytest.mark.anyio
async def test_cancelling_the_caller_waits_for_the_slice_until_its_deadline() -> None:
    # An isolate runs one slice at a time: a cancelled run must not start another while its
    # slice still runs. The deadline still bounds the wait.
    release = threading.Event()
    started = threading.Event()
    pool = SlicePool(workers=1)
    outcome: list[str] = []

    async def caller() -> None:
        try:
            await pool.run(lambda: blocked_until(release, started), overrun_after_s=0.5)
            outcome.append("finished")
        except SliceOverrun:
            outcome.append("abandoned")

    try:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(caller)
                while not started.is_set():
                    await anyio.sleep(0.005)
                tg.cancel_scope.cancel()
            assert outcome == ["abandoned"]
    finally:
        release.set()


@pytest.mark.anyio
async def test_workers_run_slices_side_by_side_up_to_the_pool_size() -> None:
    release = threading.Event()
    pool = SlicePool(workers=2)
    entered = [threading.Event(), threading.Event(), threading.Event()]
    try:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for event in entered:
                    tg.start_soon(pool.run, lambda event=event: blocked_until(release, event))
                while not (entered[0].is_set() and entered[1].is_set()):
                    await anyio.sleep(0.005)
                stats = pool.statistics()
                assert (stats.running, stats.waiting) == (2, 1)
                assert not entered[2].is_set()
                release.set()
            assert all(event.is_set() for event in entered)
    finally:
        release.set()


@pytest.mark.anyio
async def test_slices_submitted_together_get_a_thread_each_though_one_is_idle() -> None:
    # One thread idles after a first slice; two slices arriving in the same turn must not both
    # count on it.
    release = threading.Event()
    pool = SlicePool(workers=2)
    entered = [threading.Event(), threading.Event()]
    try:
        with anyio.fail_after(10):
            await pool.run(lambda: None)
            await anyio.sleep(0.05)  # its thread back to waiting for the next slice
            async with anyio.create_task_group() as tg:
                for event in entered:
                    tg.start_soon(pool.run, lambda event=event: blocked_until(release, event))
                while not all(event.is_set() for event in entered):
                    await anyio.sleep(0.005)
                release.set()
    finally:
        release.set()


@pytest.mark.anyio
async def test_no_slice_is_stranded_while_idle_threads_come_and_go(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox._pool, "IDLE_EXIT_S", 0.001)
    pool = SlicePool(workers=3)
    rng = random.Random(5)
    done = 0

    async def one() -> None:
        nonlocal done
        await pool.run(lambda: time.sleep(0.001), overrun_after_s=5)
        done += 1

    with anyio.fail_after(30):
        for _ in range(300):
            async with anyio.create_task_group() as tg:
                for _ in range(rng.randint(1, 6)):
                    tg.start_soon(one)
            if rng.random() < 0.3:
                await anyio.sleep(rng.random() * 0.003)
    stats = pool.statistics()
    assert done == stats.slices_total and stats.overruns_total == 0


@pytest.mark.anyio
async def test_runs_asking_in_one_turn_all_see_no_queue() -> None:
    # A waiting script evicts its isolate only while no slice waits for the pool
    # (runtime.script): when 500 parked scripts all reach that point in one turn, each must see
    # the queue as it was before any of them joined it, or all but a few put eviction off.
    pool = SlicePool(workers=1)
    seen: list[int] = []

    async def evict_like() -> None:
        seen.append(pool.statistics().waiting)
        await pool.run(lambda: None)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(evict_like)
    assert seen == [0] * 5
