"""quickflow in-process scenarios (issue 5, items 1–4): one engine on a SQLite journal, simulate backend.

Every function here runs one trial and returns plain numbers; ``run.py`` repeats trials, interleaves
them with their baselines and summarizes. Runs go through the public in-process API exactly as the
CLI does: ``Engine.submit(RunRequest(...))`` then ``Engine.wait(id)``, timed from submit to the
returned record (script checks, isolate start, journal writes and all).
"""

from __future__ import annotations

import math
import re
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

import sandbox
from runtime import Engine, EventRecord, RunRecord, RunRequest, SimulateBackend, load_settings
from runtime.store import SQLiteStore

__all__ = [
    "PARALLEL_SCRIPT",
    "PIPELINE_SCRIPT",
    "Bench",
    "BenchmarkError",
    "open_bench",
    "overhead_trial",
    "resume_trial",
    "scheduling_trial",
    "settle",
    "streaming_trial",
]

#: ``args.n`` zero-latency agents through one ``parallel`` barrier.
PARALLEL_SCRIPT = """
const results = await parallel(Array.from({length: args.n}, (_, i) => () => agent(`noop ${i}`, {label: `a${i}`})));
return results.filter((r) => r !== null).length;
"""

#: ``args.items`` items through ``args.stages`` stages; labels say item and stage ("item 7 stage 3").
PIPELINE_SCRIPT = """
const stage = (s) => (prev, item, i) => agent(`item ${i} stage ${s}`, {label: `item ${i} stage ${s}`});
const stages = Array.from({length: args.stages}, (_, s) => stage(s + 1));
const out = await pipeline(Array.from({length: args.items}, (_, i) => i), ...stages);
return out.filter((r) => r !== null).length;
"""

TRIVIAL_SCRIPT = "return 1"

_LABEL = re.compile(r"^item (\d+) stage (\d+)$")


class BenchmarkError(RuntimeError):
    """A scenario did not run as designed (a run failed, live calls where none were expected...)."""


@dataclass
class Bench:
    """The engine under test, its store and the simulate backend whose ``executions`` count live calls."""

    engine: Engine
    backend: SimulateBackend
    store: SQLiteStore


@asynccontextmanager
async def open_bench(*, limits: Mapping[str, Any] | None = None) -> AsyncIterator[Bench]:
    """An engine on a fresh SQLite journal (``<tmp>/quickflow.db``), no crash recovery.

    ``limits`` overrides server limits (e.g. ``{"server_concurrency": 8192}``).
    """
    settings = load_settings(limits=dict(limits)) if limits else load_settings()
    with tempfile.TemporaryDirectory(prefix="qf-bench-") as tmp:
        store = await SQLiteStore.open(Path(tmp) / "quickflow.db")
        backend = SimulateBackend()
        try:
            async with Engine(settings, store, backends={"simulate": backend}, recover=False) as engine:
                yield Bench(engine, backend, store)
        finally:
            await store.aclose()


async def settle(bench: Bench, timeout_s: float = 10.0) -> None:
    """Wait until the journal writer has flushed the previous trial's events and the spare
    isolates are ready, so no trial (or baseline measured in between) pays for another's
    background work. The engine prepares spares once a run ends (``SPARES_AFTER_S``); this
    prepares any it has not prepared yet (before the first run there are none)."""
    with anyio.move_on_after(timeout_s):
        while bench.store.statistics().queued:
            await anyio.sleep(0.002)
        while sandbox.spare_isolates_wanted():
            await anyio.to_thread.run_sync(sandbox.prepare_spare_isolate)
    await anyio.sleep(0.02)  # the last group may still be committing


def options(concurrency: int, *, latency_ms: float = 0, max_agents: int = 1000) -> dict[str, Any]:
    simulate: dict[str, Any] = {"latency_ms": latency_ms} if latency_ms else {}
    return {"backend": "simulate", "concurrency": concurrency, "max_agents": max_agents, "simulate": simulate}


async def timed_run(bench: Bench, request: RunRequest) -> tuple[RunRecord, float, float]:
    """Submit, wait; return the final record, seconds from submit to end, and the submit wall clock."""
    submitted_at = time.time()
    t0 = time.perf_counter()
    record = await bench.engine.submit(request)
    record = await bench.engine.wait(record.id)
    elapsed = time.perf_counter() - t0
    if record.status != "completed":
        raise BenchmarkError(f"run {record.id} ended {record.status}: {record.error}")
    return record, elapsed, submitted_at


def script_run(script: str, args: Mapping[str, Any], opts: Mapping[str, Any]) -> RunRequest:
    return RunRequest(script=script, args=dict(args), has_args=True, options=dict(opts))


async def fixed_cost_trial(bench: Bench) -> float:
    """Seconds for a run with no agent (``return 1``): the per-run floor of checks, isolate and journal."""
    _, elapsed, _ = await timed_run(bench, script_run(TRIVIAL_SCRIPT, {}, options(16)))
    return elapsed


async def overhead_trial(bench: Bench, *, agents: int = 0, items: int = 0, stages: int = 3,
                         concurrency: int) -> float:
    """Seconds for ``agents`` no-op agents via ``parallel``, or ``items`` × ``stages`` via ``pipeline``."""
    if agents:
        request = script_run(PARALLEL_SCRIPT, {"n": agents}, options(concurrency, max_agents=agents))
        expected = agents
    else:
        request = script_run(PIPELINE_SCRIPT, {"items": items, "stages": stages},
                             options(concurrency, max_agents=items * stages))
        expected = items
    record, elapsed, _ = await timed_run(bench, request)
    if record.result != expected:
        raise BenchmarkError(f"expected {expected} results, got {record.result!r}")
    return elapsed


async def scheduling_trial(bench: Bench, *, agents: int, latency_ms: float, concurrency: int) -> dict[str, float]:
    """Wall time of ``agents`` × ``latency_ms`` at ``concurrency`` against the ideal ceil(n/c) × latency."""
    request = script_run(PARALLEL_SCRIPT, {"n": agents}, options(concurrency, latency_ms=latency_ms,
                                                                 max_agents=agents))
    _, elapsed, _ = await timed_run(bench, request)
    ideal = math.ceil(agents / concurrency) * latency_ms / 1000
    return {"wall_s": elapsed, "ideal_s": ideal, "ratio": elapsed / ideal}


def first_item_done(events: list[EventRecord], stages: int) -> tuple[float, float]:
    """(run.started ts, ts of the first agent.completed for a last stage) from a run's events."""
    started = next((e.ts for e in events if e.type == "run.started"), None)
    for event in events:
        if event.type != "agent.completed":
            continue
        match = _LABEL.match(str(event.data.get("label", "")))
        if match and int(match.group(2)) == stages:
            if started is None:
                raise BenchmarkError("no run.started event")
            return started, event.ts
    raise BenchmarkError("no item completed its last stage")


async def streaming_trial(bench: Bench, *, items: int, stages: int, latency_ms: float,
                          concurrency: int) -> dict[str, float]:
    """Pipeline streaming: when the first item leaves the last stage, and the total, against ideals."""
    request = script_run(PIPELINE_SCRIPT, {"items": items, "stages": stages},
                         options(concurrency, latency_ms=latency_ms, max_agents=items * stages))
    record, elapsed, submitted_at = await timed_run(bench, request)
    started, first_done = first_item_done(await bench.store.read_events(record.id), stages)
    first_ideal = stages * latency_ms / 1000
    total_ideal = math.ceil(items * stages / concurrency) * latency_ms / 1000
    return {
        "first_item_s": first_done - started,
        "first_item_from_submit_s": first_done - submitted_at,
        "first_ratio": (first_done - started) / first_ideal,
        "total_s": elapsed,
        "total_ratio": elapsed / total_ideal,
    }


async def make_resume_source(bench: Bench, *, agents: int, concurrency: int) -> str:
    """A completed run of ``agents`` zero-latency agents whose journal the resume trials replay."""
    request = script_run(PARALLEL_SCRIPT, {"n": agents}, options(concurrency, max_agents=agents))
    record, _, _ = await timed_run(bench, request)
    return record.id


async def resume_trial(bench: Bench, source_id: str, *, agents: int) -> dict[str, float]:
    """Replay ``source_id`` in ``reuse`` mode: wall time and live backend calls (expected 0)."""
    before = bench.backend.executions
    record, elapsed, _ = await timed_run(bench, RunRequest(resume_from=source_id, resume_mode="reuse"))
    if record.result != agents:
        raise BenchmarkError(f"resumed run returned {record.result!r}, expected {agents}")
    return {"wall_s": elapsed, "live_calls": float(bench.backend.executions - before)}
