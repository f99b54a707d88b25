"""Many parked runs (issue 5, item 5), measured in a fresh process so RSS is this scenario's alone.

    python -m benchmarks.many_runs --runs 500 --agents 16 --window-s 3

Starts an engine on a SQLite journal, warms it up with one small run, then submits ``runs`` runs
that each ``parallel`` ``agents`` simulate agents with a long latency, and waits until every one
of those agents has started: every run is parked on 16 in-flight agents. The server-wide agent
limit is raised to ``runs × agents`` so that is literally true (at the default 64, most agents
would sit queued instead; memory per run is about the same either way).

Then it measures:
- memory per parked run: (RSS now − RSS after warm-up) ÷ runs;
- event-loop lag: a task sleeps 10 ms in a loop and records each overshoot, first for
  ``window_s`` with only the parked runs, then for ``window_s`` while a hostile ``while(true){}``
  run is always present (each one dies at the 1 s slice limit; the next is submitted at once).

Prints one JSON object and exits; leaving the engine cancels the parked runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from typing import Any

import anyio

from runtime import RunRequest, eventloop

from .measure import percentile, rss_bytes
from .scenarios import PARALLEL_SCRIPT, Bench, open_bench, options

HOSTILE_SCRIPT = "while (true) {}"
TICK_S = 0.010


async def _lag_samples(window_s: float, stop: anyio.Event | None = None) -> list[float]:
    """Overshoots (seconds) of a 10 ms sleep, repeated for ``window_s``."""
    samples: list[float] = []
    end = time.perf_counter() + window_s
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        await anyio.sleep(TICK_S)
        samples.append(max(0.0, time.perf_counter() - t0 - TICK_S))
    if stop is not None:
        stop.set()
    return samples


def _lag_summary(samples: list[float]) -> dict[str, float]:
    return {
        "p50_ms": percentile(samples, 50) * 1000,
        "p99_ms": percentile(samples, 99) * 1000,
        "max_ms": max(samples) * 1000,
        "ticks": float(len(samples)),
    }


async def _wait_parked(bench: Bench, target: int, timeout_s: float) -> float:
    """Seconds until the simulate backend has started ``target`` calls in all (every agent in flight)."""
    start = time.perf_counter()
    with anyio.fail_after(timeout_s):
        while bench.backend.executions < target:
            await anyio.sleep(0.05)
    return time.perf_counter() - start


async def _hostile_runs(bench: Bench, stop: anyio.Event, outcomes: list[str]) -> None:
    """Keep one hostile run present until ``stop``: submit, wait for it to die, submit the next."""
    while not stop.is_set():
        record = await bench.engine.submit(RunRequest(script=HOSTILE_SCRIPT, options={"backend": "simulate"}))
        record = await bench.engine.wait(record.id)
        error = record.error or {}
        outcomes.append(f"{record.status}:{error.get('name') or error.get('kind') or ''}")


async def measure(runs: int, agents: int, latency_s: float, window_s: float) -> dict[str, Any]:
    async with open_bench(limits={"server_concurrency": max(64, runs * agents)}) as bench:
        # Warm-up: imports, the slice pool's threads, SQLite pages, the first isolate.
        warm = await bench.engine.submit(RunRequest(script=PARALLEL_SCRIPT, args={"n": agents}, has_args=True,
                                                    options=options(agents, max_agents=agents)))
        await bench.engine.wait(warm.id)
        gc.collect()
        rss_before = rss_bytes()
        parked_opts = options(agents, latency_ms=latency_s * 1000, max_agents=agents)
        target = bench.backend.executions + runs * agents
        t0 = time.perf_counter()
        for _ in range(runs):
            await bench.engine.submit(RunRequest(script=PARALLEL_SCRIPT, args={"n": agents}, has_args=True,
                                                 options=parked_opts))
        submit_s = time.perf_counter() - t0
        settle_s = await _wait_parked(bench, target, timeout_s=max(60.0, latency_s / 2))
        gc.collect()
        rss_after = rss_bytes()
        # Then the steady state: every parked script has given up its isolate (evict_idle_s).
        await anyio.sleep(bench.engine.limits.evict_idle_s + 1.0)
        gc.collect()
        rss_steady = rss_bytes()

        quiet = _lag_summary(await _lag_samples(window_s))
        stop = anyio.Event()
        outcomes: list[str] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(_hostile_runs, bench, stop, outcomes)
            await anyio.sleep(0.05)  # let the first hostile run reach its isolate
            hostile = _lag_summary(await _lag_samples(window_s, stop))
        parked_total = time.perf_counter() - t0
        if parked_total >= latency_s:
            raise RuntimeError(f"runs were not parked for the whole measurement ({parked_total:.1f} s ≥ latency)")
        return {
            "runs": runs,
            "agents_per_run": agents,
            "rss_before_bytes": rss_before,
            "rss_after_bytes": rss_after,
            "bytes_per_run_just_parked": (rss_after - rss_before) / runs,
            "bytes_per_run": (rss_steady - rss_before) / runs,
            "submit_s": submit_s,
            "settle_s": settle_s,
            "lag_quiet": quiet,
            "lag_hostile": hostile,
            "hostile_runs": outcomes,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--agents", type=int, default=16)
    parser.add_argument("--latency-s", type=float, default=120.0,
                        help="simulated agent latency; only needs to outlast the measurement (runs are cancelled)")
    parser.add_argument("--window-s", type=float, default=3.0, help="each event-loop lag window")
    ns = parser.parse_args()
    result = anyio.run(measure, ns.runs, ns.agents, ns.latency_s, ns.window_s, backend_options=eventloop.run_options())
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
