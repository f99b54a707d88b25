"""Settlements the event loop runs itself (``Isolate.settle_within``, ``SlicePool.settle_inline``).

A settlement tried under a short time limit either finishes as ``settle`` would have, or is
undone: the context is dropped and the next ``settle`` (a worker thread's) replays the script
up to it and runs it under the full limit. Either way the script must make the same requests
and return the same result as one driven on worker threads only.
"""

from __future__ import annotations

import threading
from typing import Any

import anyio
import pytest

from sandbox import Isolate, IsolateLimits, Slice, SlicePool, check_script
from sandbox._pool import _LoopTime

from .test_eviction import CONFIG, SCRIPTS, drive_by_hand

START = {**CONFIG, "args": None, "hasArgs": False}


def _drive(body: str, args: Any, *, inline: bool) -> tuple[list[tuple[str, str]], Any, Isolate]:
    def settle(isolate: Isolate, results: list[tuple[int, bool, Any]], state: dict[str, int]) -> Slice:
        settled = isolate.settle_within(results, state, 1.0) if inline else None
        return settled if settled is not None else isolate.settle(results, state)

    return drive_by_hand(body, args, settle)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_settling_within_a_limit_makes_the_same_requests_and_result(name: str) -> None:
    body = check_script(SCRIPTS[name]).body
    threaded_requests, threaded_result, _ = _drive(body, {"base": 7}, inline=False)
    inline_requests, inline_result, isolate = _drive(body, {"base": 7}, inline=True)
    assert isolate.inline_slices >= 2 and not isolate.inline_overran
    assert inline_requests == threaded_requests
    assert inline_result == threaded_result
    assert threaded_result is not None


SPINS_ON_SECOND = """
const a = await agent('first')
let x = 0
if (a === 'spin') { for (let i = 0; i < 3e6; i++) x += i % 7 }
const b = await agent('then ' + a)
return [a, b, x]
"""


def test_a_slice_that_runs_over_is_undone_and_settled_again_by_replay() -> None:
    body = check_script(SPINS_ON_SECOND).body
    isolate = Isolate()
    first = isolate.start(body, START)
    results, state = [(first.requests[0].id, True, "spin")], {"spent": 0, "issued": 1}
    cpu_before = isolate.cpu_s
    assert isolate.settle_within(results, state, 0.002) is None
    # Undone: nothing of the slice is recorded; the context is gone, to be rebuilt.
    assert isolate.inline_overran and not isolate.tries_inline
    assert isolate.evicted and len(isolate._history) == 0
    assert isolate.cpu_s > cpu_before  # the CPU it burnt is the script's all the same
    second = isolate.settle(results, state)
    assert [r.payload["prompt"] for r in second.requests] == ["then spin"]
    assert isolate.replay_cpu_s > 0
    final = isolate.settle([(second.requests[0].id, True, "B")], {"spent": 0, "issued": 2})
    assert final.finished and final.failure is None
    assert final.result == ["spin", "B", sum(i % 7 for i in range(3_000_000))]
    # Once over, never tried again.
    assert isolate.settle_within([(0, True, None)], state, 1.0) is None


def test_the_full_slice_limit_still_ends_a_script_that_spins_after_running_over() -> None:
    body = check_script("const a = await agent('a')\nwhile (true) {}").body

    def spin(*, inline: bool) -> Slice:
        isolate = Isolate(IsolateLimits(slice_cpu_s=0.2))
        first = isolate.start(body, START)
        results, state = [(first.requests[0].id, True, "A")], {"spent": 0, "issued": 1}
        if inline:
            assert isolate.settle_within(results, state, 0.002) is None
        return isolate.settle(results, state)

    final = spin(inline=True)
    assert final.finished and final.failure is not None
    assert (final.failure.kind, final.failure.name) == ("limit", "cpu_slice")
    assert final.cpu_s >= 0.2  # the full limit, not the short one
    assert final.failure == spin(inline=False).failure  # and the same report


def test_an_error_the_script_throws_within_the_limit_is_its_result() -> None:
    body = check_script("const a = await agent('a')\nthrow new TypeError('bad ' + a)").body
    isolate = Isolate()
    first = isolate.start(body, START)
    final = isolate.settle_within([(first.requests[0].id, True, "A")], {"spent": 0, "issued": 1}, 0.5)
    assert final is not None and final.finished and final.failure is not None
    assert (final.failure.name, final.failure.message, final.failure.line) == ("TypeError", "bad A", 2)
    assert isolate.closed and not isolate.inline_overran


def test_a_batch_the_last_settlement_says_is_too_big_is_left_to_a_worker_thread() -> None:
    body = check_script("const r = await parallel(Array.from({length: 400}, (_, i) => () => agent('a' + i)))\n"
                        "return r.length").body
    isolate = Isolate()
    first = isolate.start(body, START)
    batch = [(r.id, True, "x") for r in first.requests]
    state = {"spent": 0, "issued": len(batch)}
    # The first guess is 10 µs a result: 400 results would take about the whole limit.
    assert isolate.settle_within(batch, state, 0.004) is None
    assert not isolate.inline_overran and isolate._history == [] and not isolate.evicted
    assert isolate.settle_within(batch, state, 0.5) is not None  # a limit it fits


@pytest.mark.parametrize("value", [{"structured": "output"}, ["a", "list"], "x" * (64 * 1024 + 1)])
def test_a_batch_of_values_whose_size_is_unknown_or_large_is_left_to_a_worker_thread(value: Any) -> None:
    body = check_script("return await agent('a')").body
    isolate = Isolate()
    first = isolate.start(body, START)
    results, state = [(first.requests[0].id, True, value)], {"spent": 0, "issued": 1}
    assert isolate.settle_within(results, state, 1.0) is None
    assert isolate.tries_inline and isolate._history == []
    assert isolate.settle(results, state).result == value


def test_no_settlement_is_tried_for_a_script_that_cannot_be_replayed() -> None:
    body = check_script("const a = await agent('a')\nreturn await agent(a)").body
    isolate = Isolate(IsolateLimits(evict=False))
    first = isolate.start(body, START)
    assert not isolate.tries_inline
    assert isolate.settle_within([(first.requests[0].id, True, "A")], {"spent": 0, "issued": 1}, 1.0) is None


def test_no_settlement_is_tried_once_the_heap_is_big() -> None:
    body = check_script("const keep = []\nfor (let i = 0; i < 100000; i++) keep.push([i])\n"
                        "return [keep.length, await agent('a')]").body
    isolate = Isolate(IsolateLimits(heap_bytes=16 * 1024 * 1024))
    first = isolate.start(body, START)
    assert isolate.settle_within([(first.requests[0].id, True, "A")], {"spent": 0, "issued": 1}, 1.0) is None
    assert isolate.inline_overran and not isolate.evicted  # the context stays: it just settles on threads
    final = isolate.settle([(first.requests[0].id, True, "A")], {"spent": 0, "issued": 1})
    assert final.result == [100000, "A"]


def test_the_loop_gives_slices_a_share_of_its_time_and_a_burst_at_most() -> None:
    now = [0.0]
    share = _LoopTime(0.25, 0.01, clock=lambda: now[0])
    assert share.has(0.002)
    share.spend(0.0095)  # a burst's worth, spent at once
    assert not share.has(0.002)
    now[0] += 0.004  # a quarter of that comes back: 1 ms, not yet the 2 ms asked
    assert not share.has(0.002)
    now[0] += 0.004
    assert share.has(0.002)
    now[0] += 10.0  # idle a long while: still no more than one burst
    assert share.has(0.002)
    share.spend(0.0099)
    assert not share.has(0.002)


@pytest.mark.anyio
async def test_runs_whose_calls_answer_at_once_settle_on_the_loop_and_others_on_threads() -> None:
    from runtime import AgentRequest, Engine, RunRequest, SimulateBackend, load_settings
    from runtime.store import MemoryStore

    class Sleepy(SimulateBackend):
        """Sleeps as many milliseconds as the prompt's last word says; 0: answers without awaiting."""

        async def call(self, request: AgentRequest) -> Any:
            delay_ms = float(request.prompt.split()[-1])
            if delay_ms:
                await anyio.sleep(delay_ms / 1000)
            return await super().call(request)

    pool = SlicePool()
    taken: list[str] = []
    settle_inline, run = pool.settle_inline, pool.run

    def spy_inline(isolate: Isolate, results: Any, state: Any) -> Any:
        settled = settle_inline(isolate, results, state)
        if settled is not None:
            assert threading.current_thread() is threading.main_thread()
            taken.append("loop")
        return settled

    async def spy_run(fn: Any) -> Any:
        if getattr(getattr(fn, "func", None), "__name__", "") == "settle":
            taken.append("thread")
        return await run(fn)

    pool.settle_inline = spy_inline  # type: ignore[method-assign]
    pool.run = spy_run  # type: ignore[method-assign]
    async with Engine(load_settings(), MemoryStore(), backends={"simulate": Sleepy()}, pool=pool,
                      recover=False) as engine:
        with anyio.fail_after(30):
            async def run_script(script: str) -> Any:
                taken.clear()
                record = await engine.wait((await engine.submit(RunRequest(script=script))).id)
                assert record.status == "completed", record.error
                live = engine.live(record.id)
                assert live is not None and live.awaiting_backend == 0
                return record.result

            # Every result comes back at once: the loop settles them all itself.
            assert await run_script("const a = await pipeline([1, 2, 3], (x) => agent('s1 ' + x + ' 0'), "
                                    "(p) => agent('s2 0'))\nreturn a.length") == 3
            assert taken and set(taken) == {"loop"}
            # The fast result arrives while the slow call awaits its backend: a worker thread
            # settles it, and the loop settles the slow one, with nothing left awaiting.
            assert await run_script("const r = await parallel([() => agent('fast 5'), () => agent('slow 300')])\n"
                                    "return r.length") == 2
            assert taken == ["thread", "loop"]
    assert pool.statistics().slices_inline >= 3
