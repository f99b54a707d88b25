"""Evicting a waiting script's context and rebuilding it by replay (sandbox/_isolate.py).

A small host loop drives an isolate by hand: it answers every agent with a string derived from
its prompt, fires timers, and settles one request per slice so there are many slices to replay.
The same script run with an eviction before every settlement must make exactly the same
requests and return exactly the same result as a run that keeps its context.
"""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest

from sandbox import Isolate, IsolateLimits, Request, Slice, check_script

CONFIG = {"maxAgents": 1000, "maxItems": 4096, "maxLogLines": 1000, "depth": 0, "budgetTotal": None,
          "hasArgs": True, "state": {"spent": 0, "issued": 0}}

SCRIPTS = {
    "parallel-and-pipeline": """
        phase('fan out')
        const a = await parallel([1, 2, 3].map((n) => () => agent('p' + n, { label: 'L' + n })))
        log('got ' + a.length)
        const b = await pipeline(['x', 'y'], (it) => agent('s1 ' + it), (prev, it) => agent('s2 ' + prev))
        return { a, b }
    """,
    "closure-state-timers-and-race": """
        let seen = []
        const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))
        for (let i = 0; i < 4; i++) {
          const r = await agent('step ' + i + ' after ' + seen.join(','))
          seen.push(r.length)
          await sleep(5)
        }
        const winner = await Promise.race([agent('fast'), sleep(10).then(() => 'timer')])
        return { seen, winner, total: args.base + seen.reduce((x, y) => x + y, 0) }
    """,
    "errors-and-catch": """
        const out = []
        for (const p of ['ok one', 'bad two', 'ok three']) {
          try { out.push(await agent(p)) } catch (e) { out.push('caught ' + e.message) }
        }
        return out
    """,
}


def _answer(request: Request) -> tuple[bool, Any]:
    prompt = str(request.payload["prompt"])
    if prompt.startswith("bad"):
        return False, {"name": "Error", "message": f"refused {prompt}"}
    return True, f"answer<{prompt}>"


def _drive(body: str, args: Any, *, evict: bool) -> tuple[list[tuple[str, str]], Any, int]:
    isolate = Isolate()
    current: Slice = isolate.start(body, {**CONFIG, "args": args})
    pending: list[tuple[int, bool, Any]] = []
    seen: list[tuple[str, str]] = []
    issued = 0
    while True:
        for request in current.requests:
            seen.append((request.kind, json.dumps(request.payload, sort_keys=True)))
            if request.kind == "agent":
                issued += 1
                pending.append((request.id, *_answer(request)))
            elif request.kind == "timer":
                pending.append((request.id, True, None))
        if current.finished:
            assert current.failure is None, current.failure
            return seen, current.result, isolate.evictions
        assert pending, "the script waits for nothing"
        if evict:
            assert isolate.evict()
            assert isolate.evicted and not isolate.closed
        current = isolate.settle([pending.pop(0)], {"spent": 0, "issued": issued})


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_a_replayed_script_makes_the_same_requests_and_returns_the_same_result(name: str) -> None:
    body = check_script(SCRIPTS[name]).body
    kept_requests, kept_result, kept_evictions = _drive(body, {"base": 7}, evict=False)
    replayed_requests, replayed_result, evictions = _drive(body, {"base": 7}, evict=True)
    assert kept_evictions == 0
    assert evictions >= 3, "the script should have been evicted before every settlement"
    assert replayed_requests == kept_requests
    assert replayed_result == kept_result
    assert kept_result is not None


def test_a_replay_that_diverges_fails_the_run_instead_of_continuing_elsewhere() -> None:
    body = check_script("const a = await agent('first')\nconst b = await agent('then ' + a)\nreturn [a, b]").body
    isolate = Isolate()
    first = isolate.start(body, {**CONFIG, "args": None, "hasArgs": False})
    (request,) = first.requests
    second = isolate.settle([(request.id, True, "A")], {"spent": 0, "issued": 1})
    assert [r.payload["prompt"] for r in second.requests] == ["then A"]
    assert isolate.evict()
    # Tamper with what was recorded: replay now asks for "then B", not "then A".
    results, state = isolate._history[0]
    isolate._history[0] = ([(request.id, True, "B")], state)
    final = isolate.settle([(second.requests[0].id, True, "C")], {"spent": 0, "issued": 2})
    assert final.finished and final.failure is not None
    assert final.failure.kind == "internal" and final.failure.name == "replay"
    assert "evicted" in final.failure.message
    assert isolate.closed


def test_nothing_to_evict_before_start_or_after_the_end() -> None:
    isolate = Isolate()
    assert not isolate.evict()
    done = isolate.start(check_script("return 1").body, {**CONFIG, "args": None, "hasArgs": False})
    assert done.finished and done.result == 1
    assert not isolate.evict()
    assert isolate.evictions == 0


def test_the_slice_that_ends_a_script_leaves_freeing_its_context_to_close() -> None:
    # Freeing a context holds the GIL, and the final slice is on the way to the run's end: the
    # context waits for close(), which the run's driver calls once that end is out.
    isolate = Isolate()
    final = isolate.start(check_script("return 1").body, {**CONFIG, "args": None, "hasArgs": False})
    assert final.finished and final.result == 1
    assert isolate.closed and not isolate.evictable  # nothing of the script runs again
    assert isolate._retired is not None
    isolate.close()
    assert isolate._retired is None


def test_a_script_stopped_by_a_limit_has_its_context_dropped_at_once() -> None:
    # A result past its size limit, or a heap out of memory: nothing to gain from keeping it.
    config = {**CONFIG, "args": None, "hasArgs": False}
    too_big = Isolate(IsolateLimits(result_bytes=100))
    final = too_big.start(check_script("return 'x'.repeat(1000)").body, config)
    assert final.failure is not None and final.failure.name == "result_size"
    assert too_big.closed and too_big._retired is None
    out_of_memory = Isolate(IsolateLimits(heap_bytes=8 * 1024 * 1024))
    body = "try { const a = []; while (true) a.push('x'.repeat(1000) + a.length) } catch (e) { throw e }"
    final = out_of_memory.start(check_script(body).body, config)
    assert final.failure is not None and final.failure.name == "memory", final.failure
    assert out_of_memory.closed and out_of_memory._retired is None


def test_replay_cpu_is_charged_to_the_script() -> None:
    body = check_script("let x = 0\nfor (let i = 0; i < 200000; i++) x += i\nconst a = await agent('a')\n"
                        "const b = await agent('b')\nreturn [x, a, b]").body
    isolate = Isolate()
    current = isolate.start(body, {**CONFIG, "args": None, "hasArgs": False})
    current = isolate.settle([(current.requests[0].id, True, "A")], {"spent": 0, "issued": 1})
    cpu_before_eviction = isolate.cpu_s
    assert isolate.evict()
    final = isolate.settle([(current.requests[0].id, True, "B")], {"spent": 0, "issued": 2})
    assert final.result == [sum(range(200000)), "A", "B"]
    # The loop ran again for the replay, and the script pays for it: a script cannot buy CPU
    # by being evicted over and over.
    assert isolate.replay_cpu_s > 0
    assert isolate.cpu_s >= cpu_before_eviction + isolate.replay_cpu_s


def test_a_script_that_keeps_being_evicted_stops_being_evicted() -> None:
    from sandbox._isolate import MAX_EVICTIONS

    body = check_script("for (let i = 0; ; i++) await agent('step ' + i)").body
    isolate = Isolate()
    current = isolate.start(body, {**CONFIG, "args": None, "hasArgs": False})
    evicted = 0
    for issued in range(1, MAX_EVICTIONS + 10):
        evicted += isolate.evict()
        current = isolate.settle([(current.requests[0].id, True, "ok")], {"spent": 0, "issued": issued})
        assert not current.finished, current.failure
    # Replays are charged to the script, so its CPU cap or the eviction cap ends them.
    assert 8 <= evicted <= MAX_EVICTIONS
    assert not isolate.evictable and isolate._history == []  # nothing recorded any more


def test_an_isolate_that_may_not_be_evicted_records_nothing() -> None:
    from sandbox import IsolateLimits

    body = check_script("const a = await agent('a')\nreturn await agent(a)").body
    isolate = Isolate(IsolateLimits(evict=False))
    current = isolate.start(body, {**CONFIG, "args": None, "hasArgs": False})
    current = isolate.settle([(current.requests[0].id, True, "A")], {"spent": 0, "issued": 1})
    assert not isolate.evictable and not isolate.evict()
    assert isolate._history == [] and isolate._digests == []


def test_a_big_heap_is_not_evicted() -> None:
    from sandbox import IsolateLimits

    body = check_script("const keep = []\nfor (let i = 0; i < 100000; i++) keep.push([i])\n"
                        "return [keep.length, await agent('a')]").body
    isolate = Isolate(IsolateLimits(heap_bytes=16 * 1024 * 1024))
    isolate.start(body, {**CONFIG, "args": None, "hasArgs": False})
    assert isolate.memory_bytes() > 2 * 1024 * 1024
    assert not isolate.evict()


ENGINE_SCRIPT = """
phase('one')
log('start')
const a = await parallel(Array.from({length: 6}, (_, i) => () => agent('fan ' + i)))
phase('two')
const b = await pipeline(a.slice(0, 3), (x, item, i) => agent('stage one ' + i), (prev, item, i) => agent('stage two ' + prev.length))
log('done ' + b.length)
return { a, b }
"""


@pytest.mark.anyio
async def test_an_engine_run_whose_script_is_evicted_while_it_waits_ends_the_same(tmp_path: Any) -> None:
    from runtime import Engine, RunRequest, SimulateBackend, load_settings
    from runtime.store import SQLiteStore

    async def run(evict_idle_s: float) -> tuple[Any, list[str], int]:
        store = await SQLiteStore.open(tmp_path / f"evict-{evict_idle_s}.db")
        try:
            settings = load_settings(limits={"evict_idle_s": evict_idle_s})
            async with Engine(settings, store, backends={"simulate": SimulateBackend()}, recover=False) as engine:
                request = RunRequest(script=ENGINE_SCRIPT, options={"backend": "simulate", "concurrency": 3,
                                                                   "simulate": {"latency_ms": 60}})
                record = await engine.submit(request)
                evictions = 0
                with anyio.fail_after(30):
                    while (live := engine.live(record.id)) is not None and not live.done.is_set():
                        evictions = live.isolate_evictions
                        await anyio.sleep(0.01)
                    record = await engine.wait(record.id)
                    evictions = max(evictions, live.isolate_evictions if live else 0)
                events = [e.type for e in await store.read_events(record.id)]
                assert record.status == "completed", record.error
                return record.result, events, evictions
        finally:
            await store.aclose()

    kept, kept_events, none = await run(0)
    replayed, replayed_events, evictions = await run(0.005)
    assert none == 0
    assert evictions >= 3
    assert replayed == kept
    # Replay makes no requests of its own: the same logs, phases and agents, once each.
    assert sorted(replayed_events) == sorted(kept_events)


def test_a_script_that_would_be_costly_to_replay_keeps_its_context() -> None:
    from sandbox._isolate import MAX_REPLAY_SLICES

    body = check_script("for (let i = 0; ; i++) await agent('step ' + i)").body
    isolate = Isolate()
    current = isolate.start(body, {**CONFIG, "args": None, "hasArgs": False})
    for issued in range(1, MAX_REPLAY_SLICES + 2):
        current = isolate.settle([(current.requests[0].id, True, "ok")], {"spent": 0, "issued": issued})
    assert not isolate.evict()
    assert not isolate.evicted and isolate.evictions == 0


@pytest.mark.anyio
async def test_a_script_skipped_while_the_pool_was_busy_is_evicted_soon_after(monkeypatch: Any) -> None:
    # At its idle deadline the pool had scripts queueing, so the script kept its context; it
    # must give it up soon after the queue empties, not a whole idle period later.
    import runtime.script
    from runtime import Engine, RunRequest, SimulateBackend, load_settings
    from runtime.store import MemoryStore
    from sandbox import SlicePool, SlicePoolStatistics

    class QueueingPool(SlicePool):
        """A real pool that says scripts are queueing for it while ``busy``."""

        busy = True

        def statistics(self) -> SlicePoolStatistics:
            stats = super().statistics()
            return SlicePoolStatistics(stats.workers, stats.running, 1 if self.busy else stats.waiting,
                                       stats.slices_total)

    monkeypatch.setattr(runtime.script, "EVICT_RETRY_S", 0.05)
    idle_s = 1.0
    pool = QueueingPool()
    settings = load_settings(limits={"evict_idle_s": idle_s})
    async with Engine(settings, MemoryStore(), backends={"simulate": SimulateBackend()}, recover=False,
                      pool=pool) as engine:
        record = await engine.submit(RunRequest(script="return await agent('slow one')",
                                                options={"backend": "simulate", "simulate": {"latency_ms": 30_000}}))
        live = engine.live(record.id)
        assert live is not None
        with anyio.fail_after(10):
            await anyio.sleep(idle_s * 1.3)  # past the deadline, the pool still busy
            assert live.isolate_evictions == 0
            pool.busy = False
        with anyio.fail_after(idle_s * 0.6):  # a whole idle period later would be too late
            while live.isolate_evictions == 0:
                await anyio.sleep(0.01)
        await engine.cancel(record.id)
