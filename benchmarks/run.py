"""Run the benchmark suite and write ``benchmarks/REPORT.md``.

    python -m benchmarks.run                      # full: ~3–6 min on 2 cores
    python -m benchmarks.run --quick              # fewer trials: ~1–3 min
    python -m benchmarks.run --only overhead,resume
    python -m benchmarks.run --save-baseline before       # also keep results/before.json
    python -m benchmarks.run --compare before             # report gains a before/after table

Every run also writes ``benchmarks/results/last.json``. The first run creates the LangGraph venv
(``benchmarks/.env``, about a minute); later runs reuse it. Exit status: 0 when every target that
ran passed, 1 when one failed (the report is written either way), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import anyio

from runtime import eventloop

from . import baselines, http_bench, report, scenarios
from .measure import Figure, git_commit, machine_info, summarize

HERE = Path(__file__).resolve().parent
SCENARIOS = ("overhead", "scheduling", "streaming", "resume", "many_runs", "http")

#: Concurrency of the overhead scenario, used identically by quickflow, the floor and LangGraph: the
#: highest per-run concurrency quickflow allows (Limits.max_concurrency) and equal to its server-wide
#: default, so the scheduler, not the limit, is what gets measured.
OVERHEAD_CONCURRENCY = 64
FANOUT_AGENTS = 1000
PIPE_ITEMS, PIPE_STAGES = 100, 3
FLOOR_REPEATS = 5
LANGGRAPH_FIGURES = {
    "async": ("overhead.parallel.langgraph", "LangGraph: 1000 no-op nodes via Send, AsyncSqliteSaver (default "
              "durability)"),
    "sync": ("overhead.parallel.langgraph_sync", "LangGraph: same, durability=sync"),
}


@dataclass(frozen=True)
class Profile:
    trials: int  # in-process quickflow scenarios and the floor
    langgraph_trials: int
    many_runs_trials: int  # each a fresh process
    http_trials: int  # each 1000 runs + one SSE-followed run
    lag_window_s: float


PROFILES = {
    "quick": Profile(trials=3, langgraph_trials=3, many_runs_trials=1, http_trials=2, lag_window_s=2.0),
    "full": Profile(trials=11, langgraph_trials=7, many_runs_trials=3, http_trials=3, lag_window_s=4.0),
}


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Collector:
    """Samples by figure key, summarized at the end."""

    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = {}
        self.meta: dict[str, tuple[str, str]] = {}

    def add(self, key: str, value: float, unit: str, label: str) -> None:
        self.samples.setdefault(key, []).append(value)
        self.meta[key] = (unit, label)

    def figures(self) -> dict[str, Figure]:
        return {key: summarize(values, *self.meta[key]) for key, values in self.samples.items()}


# --- in-process scenarios (1–4) -------------------------------------------------------------


async def in_process(selected: set[str], profile: Profile, out: Collector,
                     peer: baselines.LangGraphWorker | None) -> None:
    async with scenarios.open_bench() as bench:
        # Warm-up, not counted: imports, tree-sitter, the slice pool's threads, SQLite pages.
        await scenarios.overhead_trial(bench, agents=FANOUT_AGENTS, concurrency=OVERHEAD_CONCURRENCY)
        await scenarios.overhead_trial(bench, items=PIPE_ITEMS, stages=PIPE_STAGES, concurrency=OVERHEAD_CONCURRENCY)
        await baselines.floor_fanout(FANOUT_AGENTS, OVERHEAD_CONCURRENCY)
        if "overhead" in selected:
            await _overhead(bench, profile, out, peer)
        if "scheduling" in selected:
            for trial in range(profile.trials):
                await scenarios.settle(bench)
                r = await scenarios.scheduling_trial(bench, agents=256, latency_ms=50, concurrency=16)
                out.add("scheduling.wall", r["wall_s"], "s", "scheduling: 256 agents × 50 ms at concurrency 16, wall")
                out.add("scheduling.ratio", r["ratio"], "× ideal", "scheduling: wall ÷ ideal (0.8 s)")
                log(f"scheduling trial {trial + 1}: {r['wall_s']:.3f} s = {r['ratio']:.3f}× ideal")
        if "streaming" in selected:
            for trial in range(profile.trials):
                await scenarios.settle(bench)
                r = await scenarios.streaming_trial(bench, items=64, stages=3, latency_ms=20, concurrency=16)
                out.add("streaming.first_item", r["first_item_s"] * 1000, "ms",
                        "pipeline 64 × 3 × 20 ms: first item done (from run.started)")
                out.add("streaming.first_ratio", r["first_ratio"], "× ideal", "pipeline: first item ÷ ideal (60 ms)")
                out.add("streaming.first_from_submit", r["first_item_from_submit_s"] * 1000, "ms",
                        "pipeline: first item done (from submit)")
                out.add("streaming.total", r["total_s"], "s", "pipeline 64 × 3 × 20 ms at concurrency 16: total")
                out.add("streaming.total_ratio", r["total_ratio"], "× ideal", "pipeline: total ÷ ideal (0.24 s)")
                log(f"streaming trial {trial + 1}: first item {r['first_item_s'] * 1000:.0f} ms "
                    f"({r['first_ratio']:.2f}×), total {r['total_s']:.3f} s ({r['total_ratio']:.2f}×)")
        if "resume" in selected:
            source = await scenarios.make_resume_source(bench, agents=FANOUT_AGENTS, concurrency=OVERHEAD_CONCURRENCY)
            for trial in range(profile.trials):
                await scenarios.settle(bench)
                r = await scenarios.resume_trial(bench, source, agents=FANOUT_AGENTS)
                out.add("resume.wall", r["wall_s"], "s", "resume (reuse) of a 1000-agent journal: wall")
                out.add("resume.live_calls", r["live_calls"], "calls", "resume (reuse): live backend calls")
                log(f"resume trial {trial + 1}: {r['wall_s']:.3f} s, {r['live_calls']:.0f} live calls")


async def _overhead(bench: scenarios.Bench, profile: Profile, out: Collector,
                    peer: baselines.LangGraphWorker | None) -> None:
    """quickflow, the floor and LangGraph, trial by trial in alternating order, so drift hits all alike."""
    calls = PIPE_ITEMS * PIPE_STAGES

    async def qf_parallel() -> None:
        s = await scenarios.overhead_trial(bench, agents=FANOUT_AGENTS, concurrency=OVERHEAD_CONCURRENCY)
        out.add("overhead.parallel.quickflow", s / FANOUT_AGENTS * 1e6, "µs/agent",
                "quickflow: 1000 no-op agents via parallel, SQLite journal")

    async def floor_parallel() -> None:
        # The floor takes milliseconds, so one scheduler hiccup skews it: FLOOR_REPEATS samples a trial.
        for _ in range(FLOOR_REPEATS):
            s = await baselines.floor_fanout(FANOUT_AGENTS, OVERHEAD_CONCURRENCY)
            out.add("overhead.parallel.floor", s / FANOUT_AGENTS * 1e6, "µs/agent",
                    "floor: 1000 no-op coroutines, asyncio.gather + Semaphore")
            s = await baselines.floor_fanout_anyio(FANOUT_AGENTS, OVERHEAD_CONCURRENCY)
            out.add("overhead.parallel.floor_anyio", s / FANOUT_AGENTS * 1e6, "µs/agent",
                    "reference: same fan-out, anyio task group + CapacityLimiter")

    async def qf_pipeline() -> None:
        s = await scenarios.overhead_trial(bench, items=PIPE_ITEMS, stages=PIPE_STAGES,
                                           concurrency=OVERHEAD_CONCURRENCY)
        out.add("overhead.pipeline.quickflow", s / calls * 1e6, "µs/agent",
                "quickflow: 100 items × 3 stages via pipeline, SQLite journal")

    async def floor_pipeline() -> None:
        for _ in range(FLOOR_REPEATS):
            s = await baselines.floor_pipeline(PIPE_ITEMS, PIPE_STAGES, OVERHEAD_CONCURRENCY)
            out.add("overhead.pipeline.floor", s / calls * 1e6, "µs/agent",
                    "floor: 100 chains × 3 no-op coroutines, asyncio.gather + Semaphore")

    async def fixed_cost() -> None:
        s = await scenarios.fixed_cost_trial(bench)
        out.add("run.fixed_cost", s * 1000, "ms/run", "quickflow: one run with no agent (`return 1`), submit→end")

    async def langgraph() -> None:
        if peer is None:
            return
        for mode in peer.modes:
            s = await peer.atrial(mode, FANOUT_AGENTS)
            key, label = LANGGRAPH_FIGURES[mode]
            out.add(key, s / FANOUT_AGENTS * 1e6, "µs/agent", label)

    steps: list[Callable[[], Any]] = [qf_parallel, floor_parallel, langgraph, qf_pipeline, floor_pipeline,
                                      fixed_cost]
    for trial in range(profile.trials):
        if trial == profile.langgraph_trials:
            steps.remove(langgraph)
        for step in steps if trial % 2 == 0 else reversed(steps):
            await scenarios.settle(bench)
            await step()
        log(f"overhead trial {trial + 1}: quickflow {out.samples['overhead.parallel.quickflow'][-1]:.0f} µs/agent, "
            f"floor {statistics.median(out.samples['overhead.parallel.floor'][-FLOOR_REPEATS:]):.1f} µs/agent, "
            f"pipeline {out.samples['overhead.pipeline.quickflow'][-1]:.0f} µs/agent"
            + (f", LangGraph {out.samples['overhead.parallel.langgraph'][-1]:.0f} µs/agent"
               if peer is not None and trial < profile.langgraph_trials else ""))


# --- subprocess scenarios -------------------------------------------------------------------


def many_runs(profile: Profile, out: Collector) -> None:
    for trial in range(profile.many_runs_trials):
        cmd = [sys.executable, "-m", "benchmarks.many_runs", "--runs", "500", "--agents", "16",
               "--window-s", str(profile.lag_window_s)]
        done = subprocess.run(cmd, cwd=HERE.parent, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            sys.stderr.write(done.stderr[-4000:])
            raise RuntimeError(f"benchmarks.many_runs exited {done.returncode}")
        r = json.loads(done.stdout)
        out.add("many.kb_per_run", r["bytes_per_run"] / 1000, "kB/run",
                "500 runs parked on 16 agents each, steady state (isolates evicted): RSS delta ÷ 500")
        out.add("many.kb_per_run_just_parked", r["bytes_per_run_just_parked"] / 1000, "kB/run",
                "same, measured as soon as the last agent started (the first runs already evicted)")
        out.add("many.submit", r["submit_s"], "s", "500 runs: time to submit all")
        out.add("many.lag_quiet_p99", r["lag_quiet"]["p99_ms"], "ms", "loop lag p99, 500 parked runs")
        out.add("many.lag_hostile_p99", r["lag_hostile"]["p99_ms"], "ms",
                "loop lag p99, 500 parked runs + hostile while(true){}")
        out.add("many.lag_hostile_max", r["lag_hostile"]["max_ms"], "ms", "loop lag max, with hostile run")
        log(f"many runs trial {trial + 1}: {r['bytes_per_run'] / 1000:.0f} kB/run, lag p99 quiet "
            f"{r['lag_quiet']['p99_ms']:.1f} ms, hostile {r['lag_hostile']['p99_ms']:.1f} ms "
            f"(hostile runs: {r['hostile_runs']})")


async def _http(profile: Profile, out: Collector, server: http_bench.Server) -> None:
    await http_bench.runs_trial(server, count=100, in_flight=32)  # warm-up, not counted
    for trial in range(profile.http_trials):
        r = await http_bench.runs_trial(server, count=1000, in_flight=32)
        out.add("http.p50", r["p50_ms"], "ms", "HTTP: POST /v1/runs?wait=true (`return 1`), 32 in flight, p50")
        out.add("http.p99", r["p99_ms"], "ms", "HTTP: same, p99")
        out.add("http.runs_per_s", r["runs_per_s"], "runs/s", "HTTP: 1000 trivial runs, throughput")
        s = await http_bench.sse_trial(server, agents=FANOUT_AGENTS, concurrency=OVERHEAD_CONCURRENCY)
        out.add("http.sse_events_per_s", s["events_per_s"], "events/s",
                "HTTP: one 1000-agent run followed over SSE, events delivered/s")
        log(f"http trial {trial + 1}: p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms, "
            f"{r['runs_per_s']:.0f} runs/s; SSE {s['events_per_s']:.0f} events/s ({s['events']:.0f} events)")


def http(profile: Profile, out: Collector) -> None:
    with http_bench.serve() as server:
        log(f"HTTP: server at {server.url}")
        anyio.run(_http, profile, out, server, backend_options=eventloop.run_options())


# --- entry point ----------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer trials (~1–3 minutes)")
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help=f"run only these scenarios (comma-separated or repeated): {', '.join(SCENARIOS)}")
    parser.add_argument("--save-baseline", metavar="NAME", help="also store the results as results/NAME.json")
    parser.add_argument("--compare", metavar="NAME", help="add a before/after table against results/NAME.json")
    parser.add_argument("--report", type=Path, default=HERE / "REPORT.md", help="where to write the report")
    ns = parser.parse_args(argv)
    only = {name.strip() for item in ns.only for name in item.split(",") if name.strip()}
    unknown = only - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(sorted(unknown))}; choose from {', '.join(SCENARIOS)}")
    ns.selected = only or set(SCENARIOS)
    if ns.compare:
        try:
            ns.before = report.load_results(ns.compare)
        except (OSError, ValueError) as exc:
            parser.error(f"--compare {ns.compare}: {exc}")
    return ns


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    mode = "quick" if ns.quick else "full"
    profile = PROFILES[mode]
    started = time.perf_counter()
    meta: dict[str, Any] = {
        "command": "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:]),
        "mode": mode,
        "settings": ", ".join(f"{k}={v}" for k, v in asdict(profile).items())
        + f", overhead concurrency={OVERHEAD_CONCURRENCY}",
        "scenarios": sorted(ns.selected),
        "started_at": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        "notes": [
            f"Overhead: quickflow, the floor and LangGraph all run at concurrency {OVERHEAD_CONCURRENCY}, "
            "trial by trial in alternating order (LangGraph in a worker process in its own venv), so machine "
            f"load drifts hit all of them alike; the floor takes {FLOOR_REPEATS} samples per trial.",
            "Memory per run: RSS delta in a fresh process, server-wide agent limit raised to 8000 so every run "
            "has its 16 agents in flight; judged in the steady state, once every waiting script has given up "
            "its isolate (`Limits.evict_idle_s`, rebuilt by replay), with the figure right after parking beside it.",
            "What the profiles showed and what changed because of them: `benchmarks/PROFILING.md`.",
            "Loop lag: overshoot of a 10 ms sleep; the hostile `while(true){}` run is resubmitted as soon as the "
            "1 s slice limit kills it, so one is always present.",
        ],
    }
    out = Collector()
    if ns.selected & {"overhead", "scheduling", "streaming", "resume"}:
        with contextlib.ExitStack() as stack:
            peer = None
            if "overhead" in ns.selected:
                # Created (or reused) and warmed up before any measurement starts.
                baselines.ensure_langgraph_env(log)
                peer = stack.enter_context(baselines.LangGraphWorker(OVERHEAD_CONCURRENCY))
                meta["langgraph_versions"] = peer.versions
            log(f"in-process scenarios ({mode}: {profile.trials} trials each, LangGraph "
                f"{profile.langgraph_trials})")
            anyio.run(in_process, ns.selected, profile, out, peer, backend_options=eventloop.run_options())
    if "many_runs" in ns.selected:
        log("many runs (fresh process per trial)")
        many_runs(profile, out)
    if "http" in ns.selected:
        http(profile, out)

    figures = out.figures()
    ratios = report.compute_ratios(figures)
    targets = report.evaluate_targets(figures, ratios)
    meta["duration_s"] = time.perf_counter() - started
    meta["loadavg_at_end"] = list(os.getloadavg())
    if git_commit() != meta["machine"]["git_commit"]:
        meta["notes"].append(f"HEAD moved from {meta['machine']['git_commit']} to {git_commit()} during this run: "
                             "later scenarios measured newer code.")
    results = {"meta": meta, "figures": figures, "ratios": ratios, "targets": targets}

    report.RESULTS_DIR.mkdir(exist_ok=True)
    names = ["last"] + ([ns.save_baseline] if ns.save_baseline else [])
    for name in names:
        (report.RESULTS_DIR / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n")
    text = report.render(results, before=getattr(ns, "before", None), before_name=ns.compare or "")
    ns.report.write_text(text)
    log(f"wrote {ns.report} and results/{', results/'.join(n + '.json' for n in names)} "
        f"in {meta['duration_s']:.0f} s")
    for t in targets:
        value = "—" if t["value"] is None else f"{t['value']:.3g}"
        print(f"{'PASS' if t['passed'] else ('FAIL' if t['passed'] is False else 'n/a ')}  {t['name']}: {value}")
    return 1 if any(t["passed"] is False for t in targets) else 0


if __name__ == "__main__":
    sys.exit(main())
