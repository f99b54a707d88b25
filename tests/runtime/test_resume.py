"""Resuming a run from another run's journal (SPEC §3.3), through a real engine.

Executions are counted from the simulate backend's record file (one JSON line per execution,
with the run id), so "ran live" means "the backend was called", not "the engine says so".
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import anyio
import pytest

from runtime import (
    CallRecord,
    Engine,
    EventRecord,
    MemoryStore,
    RunRecord,
    RunRequest,
    SimulateBackend,
    load_settings,
)
from runtime.errors import InvalidRequest, ResumeConflict, RunNotFound
from runtime.journal import call_key
from runtime.store import SQLiteStore, Store

pytestmark = pytest.mark.anyio

N = 100
FAILING = (13, 57, 88)  # chosen by hand; the first failing index decides prefix mode
FANOUT = (
    f"const r = await parallel(Array.from({{length: {N}}}, (_, i) => () => agent('task-' + String(i).padStart(3, '0'))))\n"
    "return r\n"
)


def prompt(i: int) -> str:
    return f"task-{i:03d}"


def journaled(run_id: str, index: int, prompt: str, status: str, **fields: Any) -> CallRecord:
    """A journal entry for ``prompt``, the first call with that prompt in its run."""
    return CallRecord(run_id=run_id, index=index, key=call_key(prompt), occurrence=0, status=status, prompt=prompt,
                      **fields)


def fail_only(indices: tuple[int, ...]) -> dict[str, Any]:
    return {"simulate": {"fail": [f"^task-({'|'.join(f'{i:03d}' for i in indices)})$"]}}


@dataclass
class Harness:
    engine: Engine
    store: Store
    backend: SimulateBackend
    record_file: Path

    async def run(self, script: str | None = None, **request: Any) -> RunRecord:
        record = await self.engine.submit(RunRequest(script=script, **request))
        return await self.engine.wait(record.id)

    def executed(self, run_id: str) -> list[str]:
        """Prompts the backend executed for this run, in execution order."""
        if not self.record_file.exists():
            return []
        lines = [json.loads(line) for line in self.record_file.read_text().splitlines()]
        return [line["prompt"] for line in lines if line["run_id"] == run_id]

    async def calls(self, run_id: str) -> list[CallRecord]:
        return await self.engine.list_agents(run_id)

    async def events(self, run_id: str) -> list[EventRecord]:
        return [e async for e in self.engine.follow(run_id)]


@asynccontextmanager
async def harness(tmp_path: Path, store: Store | None = None, *, recover: bool = False) -> AsyncIterator[Harness]:
    record_file = tmp_path / "executions.jsonl"
    backend = SimulateBackend(record_path=record_file)
    store = store or MemoryStore()
    async with Engine(load_settings(), store, backends={"simulate": backend}, recover=recover) as engine:
        yield Harness(engine, store, backend, record_file)


def cached_prompts(calls: list[CallRecord]) -> list[str]:
    return [c.prompt for c in calls if c.status == "cached"]


# --- (a) reuse: only the failed calls run again ------------------------------------------------


async def test_reuse_reruns_only_the_failed_calls(tmp_path: Path) -> None:
    with anyio.fail_after(30):
        async with harness(tmp_path) as h:
            clean = await h.run(FANOUT)
            source = await h.run(FANOUT, options=fail_only(FAILING))
            assert source.status == "completed"
            assert [i for i, x in enumerate(source.result) if x is None] == list(FAILING)

            before = h.backend.executions
            resumed = await h.run(resume_from=source.id)  # the source's script, reuse by default
            calls = await h.calls(resumed.id)
            events = await h.events(resumed.id)

    assert resumed.status == "completed" and resumed.resume_mode == "reuse"
    assert h.backend.executions - before == len(FAILING)
    assert sorted(h.executed(resumed.id)) == [prompt(i) for i in FAILING]
    cached_events = [e for e in events if e.type == "agent.cached"]
    assert len(cached_events) == N - len(FAILING)
    assert all(e.data["tokens"] == 0 and e.data["recovered"] is False for e in cached_events)
    assert sorted(e.data["index"] for e in cached_events) == [i for i in range(N) if i not in FAILING]
    # Cached agents cost nothing: the run's output tokens are the live agents' alone.
    live = [c for c in calls if c.status != "cached"]
    assert [c.prompt for c in live] == [prompt(i) for i in FAILING]
    assert all(c.status == "completed" for c in live)
    assert resumed.usage["tokens"]["output"] == sum(c.usage["output_tokens"] for c in live) > 0
    assert all(c.usage.get("output_tokens", 0) == 0 for c in calls if c.status == "cached")
    assert resumed.usage["agents"] == {"total": N, "cached": N - len(FAILING), "completed": len(FAILING)}
    assert resumed.result == clean.result


# --- (b) prefix: cached until the first miss in issue order -----------------------------------


async def test_prefix_runs_everything_from_the_first_failed_call(tmp_path: Path) -> None:
    # parallel() issues its calls in index order, so the prefix ends at the lowest failing index.
    first_miss = min(FAILING)
    with anyio.fail_after(30):
        async with harness(tmp_path) as h:
            clean = await h.run(FANOUT)
            source = await h.run(FANOUT, options=fail_only(FAILING))
            before = h.backend.executions
            resumed = await h.run(resume_from=source.id, resume_mode="prefix")
            calls = await h.calls(resumed.id)
            events = await h.events(resumed.id)

    assert resumed.status == "completed" and resumed.resume_mode == "prefix"
    assert h.backend.executions - before == N - first_miss == 87
    assert sorted(h.executed(resumed.id)) == [prompt(i) for i in range(first_miss, N)]
    assert cached_prompts(calls) == [prompt(i) for i in range(first_miss)]
    assert sum(e.type == "agent.cached" for e in events) == first_miss
    assert resumed.result == clean.result


async def test_prefix_and_reuse_agree_when_the_source_has_no_failure(tmp_path: Path) -> None:
    with anyio.fail_after(30):
        async with harness(tmp_path) as h:
            source = await h.run(FANOUT)
            before = h.backend.executions
            prefix = await h.run(resume_from=source.id, resume_mode="prefix")
            reuse = await h.run(resume_from=source.id, resume_mode="reuse")
    assert h.backend.executions == before
    assert prefix.result == reuse.result == source.result


# --- (c) editing the post-processing re-runs nothing --------------------------------------------


async def test_editing_post_processing_executes_no_agent(tmp_path: Path) -> None:
    body = "const r = await parallel(Array.from({length: 30}, (_, i) => () => agent('task-' + String(i).padStart(3, '0'))))\n"
    with anyio.fail_after(30):
        async with harness(tmp_path) as h:
            source = await h.run(body + "return r.length")
            outputs = [c.output for c in await h.calls(source.id)]
            before = h.backend.executions
            edited = await h.run(body + "return r.filter(Boolean).map(x => x.length)", resume_from=source.id)
            edited_prefix = await h.run(body + "return r.filter(Boolean).map(x => x.length)", resume_from=source.id,
                                        resume_mode="prefix")
    assert source.result == 30
    assert h.backend.executions == before
    assert h.executed(edited.id) == h.executed(edited_prefix.id) == []
    assert edited.status == "completed"
    assert edited.result == edited_prefix.result == [len(x) for x in outputs]
    assert edited.script.endswith("x.length)")  # the new script is the one stored and run


# --- (d) args: kept unless new ones are given -----------------------------------------------------


ARGS_SCRIPT = """const items = (args && args.items) || ['fallback']
const r = await parallel(items.map((x) => () => agent('item ' + x)))
return {items, n: r.filter(Boolean).length}
"""


async def test_resume_keeps_the_source_args_unless_new_ones_are_given(tmp_path: Path) -> None:
    with anyio.fail_after(30):
        async with harness(tmp_path) as h:
            source = await h.run(ARGS_SCRIPT, args={"items": ["a", "b", "c"]}, has_args=True)
            kept = await h.run(resume_from=source.id)
            new = await h.run(resume_from=source.id, args={"items": ["a", "b", "c", "d"]}, has_args=True)
            explicit_null = await h.run(resume_from=source.id, args=None, has_args=True)

    assert source.result == {"items": ["a", "b", "c"], "n": 3}
    assert (kept.args, kept.has_args, kept.result) == ({"items": ["a", "b", "c"]}, True, source.result)
    assert h.executed(kept.id) == []
    assert (new.args, new.result) == ({"items": ["a", "b", "c", "d"]}, {"items": ["a", "b", "c", "d"], "n": 4})
    assert h.executed(new.id) == ["item d"]  # a, b, c are served from the source's journal
    # An explicit null is "new args given", not "absent".
    assert (explicit_null.args, explicit_null.has_args) == (None, True)
    assert explicit_null.result == {"items": ["fallback"], "n": 1}
    assert h.executed(explicit_null.id) == ["item fallback"]


async def test_resume_of_a_run_without_args_keeps_args_absent(tmp_path: Path) -> None:
    with anyio.fail_after(20):
        async with harness(tmp_path) as h:
            source = await h.run("await agent('x'); return typeof args")
            resumed = await h.run(resume_from=source.id)
    assert source.result == resumed.result == "undefined"
    assert resumed.has_args is False


# --- (e) a source with live agents cannot be resumed ------------------------------------------------


async def test_resume_while_the_source_has_live_agents_conflicts(tmp_path: Path) -> None:
    script = "return await agent('slow one')"
    with anyio.fail_after(30):
        async with harness(tmp_path) as h:
            source = await h.engine.submit(RunRequest(script=script, options={"simulate": {"latency_ms": 60_000}}))
            async for event in h.engine.follow(source.id):
                if event.type == "agent.started":
                    break
            with pytest.raises(ResumeConflict) as caught:
                await h.engine.submit(RunRequest(resume_from=source.id))
            assert source.id in caught.value.message
            await h.engine.pause(source.id)  # paused with an agent in flight: still live
            with pytest.raises(ResumeConflict):
                await h.engine.submit(RunRequest(resume_from=source.id))
            cancelled = await h.engine.cancel(source.id)
            assert cancelled.status == "cancelled"
            # Once the source has ended, the same request is accepted.
            resumed = await h.run(resume_from=source.id)
    assert resumed.status == "completed"


async def test_resume_request_errors(tmp_path: Path) -> None:
    with anyio.fail_after(20):
        async with harness(tmp_path) as h:
            source = await h.run("return await agent('x')")
            with pytest.raises(RunNotFound):
                await h.engine.submit(RunRequest(resume_from="run_does_not_exist"))
            with pytest.raises(InvalidRequest, match="reuse, prefix"):
                await h.engine.submit(RunRequest(resume_from=source.id, resume_mode="latest"))
            with pytest.raises(RunNotFound):  # another owner's run is invisible, even as a source
                await h.engine.submit(RunRequest(resume_from=source.id), owner="mallory")


# --- (f) a cancelled run's completed agents are reused ------------------------------------------------


async def test_resume_of_a_cancelled_run_reuses_its_completed_agents(tmp_path: Path) -> None:
    script = "return await parallel(Array.from({length: 12}, (_, i) => () => agent('step ' + i)))"
    with anyio.fail_after(30):
        async with harness(tmp_path) as h:
            clean = await h.run(script)
            source = await h.engine.submit(RunRequest(script=script, options={"concurrency": 1,
                                                                             "simulate": {"latency_ms": 20}}))
            completed = 0
            async for event in h.engine.follow(source.id):
                completed += event.type == "agent.completed"
                if completed == 4:
                    break
            cancelled = await h.engine.cancel(source.id)
            journal = await h.store.list_calls(source.id)
            before = h.backend.executions
            resumed = await h.run(resume_from=source.id)
            calls = await h.calls(resumed.id)

    assert cancelled.status == "cancelled"
    done = [c.prompt for c in journal if c.status == "completed"]
    assert len(done) >= 4
    assert all(c.status in ("completed", "stopped") for c in journal)
    assert cached_prompts(calls) == done
    assert h.backend.executions - before == 12 - len(done)
    assert sorted(h.executed(resumed.id)) == sorted(f"step {i}" for i in range(12) if f"step {i}" not in done)
    assert resumed.status == "completed" and resumed.result == clean.result


# --- (g) fan-out completion order does not matter --------------------------------------------------


async def test_completion_order_of_a_fan_out_does_not_matter(tmp_path: Path) -> None:
    script = "return await parallel(Array.from({length: 40}, (_, i) => () => agent('scan shard ' + i)))"
    options = {"concurrency": 40, "simulate": {"latency_ms": [0, 50]}}
    with anyio.fail_after(30):
        async with harness(tmp_path) as h:
            source = await h.run(script, options=options)
            journal = await h.store.list_calls(source.id)
            before = h.backend.executions
            reuse = await h.run(resume_from=source.id, options=options)
            prefix = await h.run(resume_from=source.id, resume_mode="prefix", options=options)
            reuse_calls = await h.calls(reuse.id)

    by_finish = [c.index for c in sorted(journal, key=lambda c: c.finished_at or 0)]
    assert by_finish != sorted(by_finish), "the source fan-out should complete out of issue order"
    assert h.backend.executions == before
    assert len(cached_prompts(reuse_calls)) == 40
    assert reuse.result == prefix.result == source.result


# --- (h) duplicate prompts are served by occurrence ---------------------------------------------------


async def test_duplicate_prompts_are_served_by_occurrence(tmp_path: Path) -> None:
    script = "return await parallel(Array.from({length: 10}, () => () => agent('same')))"
    with anyio.fail_after(30):
        async with harness(tmp_path) as h:
            source = await h.run(script)
            journal = await h.store.list_calls(source.id)
            assert [c.occurrence for c in journal] == list(range(10))
            assert len({c.key for c in journal}) == 1
            before = h.backend.executions
            resumed = await h.run(resume_from=source.id)
            assert h.backend.executions == before
            assert resumed.result == source.result
            # Tell the occurrences apart: give each its own answer, and fail the fifth.
            for call in journal:
                await h.store.save_call(replace(call, output=f"same#{call.occurrence}"))
            await h.store.save_call(replace(journal[4], status="failed", output=None))
            marked = await h.run(resume_from=source.id, options={"simulate": {"responses": [{"match": ".",
                                                                                             "text": "LIVE"}]}})
            stored = await h.store.list_calls(marked.id)

    assert marked.result == [f"same#{n}" for n in range(4)] + ["LIVE"] + [f"same#{n}" for n in range(5, 10)]
    assert h.executed(marked.id) == ["same"]
    assert [c.transcript for c in stored if c.status == "cached"] == [
        [{"cached_from": source.id, "index": n}] for n in range(10) if n != 4
    ]


# --- resume is not fooled by identity-free options ------------------------------------------------


async def test_label_phase_and_timeout_edits_keep_calls_cached_model_does_not(tmp_path: Path) -> None:
    with anyio.fail_after(20):
        async with harness(tmp_path) as h:
            source = await h.run("phase('A')\nreturn [await agent('p', {label: 'one', timeout: 5000}), "
                                 "await agent('q', {effort: 'low'})]")
            relabelled = await h.run("return [await agent('p', {label: 'two', phase: 'B'}), "
                                     "await agent('q', {effort: 'low', label: 'other'})]", resume_from=source.id)
            remodelled = await h.run("return [await agent('p', {model: 'haiku'}), await agent('q', {effort: 'high'})]",
                                     resume_from=source.id)
    assert h.executed(relabelled.id) == [] and relabelled.result == source.result
    assert h.executed(remodelled.id) == ["p", "q"]


# --- a resumed run is itself a source, and a chain stays cached ------------------------------------


async def test_resume_of_a_resumed_run(tmp_path: Path) -> None:
    with anyio.fail_after(30):
        async with harness(tmp_path) as h:
            first = await h.run(FANOUT, options=fail_only(FAILING))
            second = await h.run(resume_from=first.id)
            before = h.backend.executions
            third = await h.run(resume_from=second.id)
            calls = await h.calls(third.id)
    assert h.backend.executions == before
    assert len(cached_prompts(calls)) == N
    assert third.result == second.result
    assert third.script == first.script


# --- crash recovery in-process: a run continues from its own journal -----------------------------


async def test_engine_restart_continues_running_runs_from_their_journal(tmp_path: Path) -> None:
    script = "return await parallel(Array.from({length: 24}, (_, i) => () => agent('unit ' + i)))"
    db = tmp_path / "data" / "quickflow.db"
    with anyio.fail_after(30):
        async with harness(tmp_path) as h:
            clean = await h.run(script)
        store = await SQLiteStore.open(db)
        try:
            async with harness(tmp_path, store) as h:
                run = await h.engine.submit(RunRequest(script=script, options={"concurrency": 3,
                                                                              "simulate": {"latency_ms": 20}}))
                completed = 0
                async for event in h.engine.follow(run.id):
                    completed += event.type == "agent.completed"
                    if completed >= 6:
                        break
            # Leaving the engine cancels the run without ending it, like a stopped process.
        finally:
            await store.aclose()
        store = await SQLiteStore.open(db)
        try:
            before = {c.prompt for c in await store.list_calls(run.id) if c.status == "completed"}
            assert (await store.get_run(run.id)).status == "running"  # type: ignore[union-attr]
            async with harness(tmp_path, store, recover=True) as h:
                final = await h.engine.wait(run.id)
                events = await h.events(run.id)
                calls = await h.calls(run.id)
        finally:
            await store.aclose()

    assert final.status == "completed" and final.result == clean.result
    counts = Counter(h.executed(run.id))
    assert len(before) >= 6
    assert all(counts[p] == 1 for p in before), "a journaled call ran again after the restart"
    assert set(counts) == {f"unit {i}" for i in range(24)}
    seqs = [e.seq for e in events]
    assert seqs == list(range(1, len(seqs) + 1))
    # Every call ends in exactly one event over the whole stream: agent.completed before the
    # crash, or agent.cached (recovered) after it when that event was lost with the process.
    finished = Counter(e.data["index"] for e in events if e.type in ("agent.completed", "agent.cached"))
    assert set(finished) == set(range(24)) and set(finished.values()) == {1}
    recovered = [e for e in events if e.type == "agent.cached"]
    assert {calls[e.data["index"]].prompt for e in recovered} <= before
    assert all(e.data["recovered"] for e in recovered)
    # Recovered calls keep their index and count as completed, with the tokens they spent.
    assert all(c.status == "completed" for c in calls)
    assert final.usage["tokens"]["output"] == clean.usage["tokens"]["output"]


async def test_recovering_a_prefix_resume_keeps_the_prefix_broken(tmp_path: Path) -> None:
    """A prefix-mode run that crashed after its break must not start serving the source again.

    Source: A completed, B failed, C completed. The prefix resume served A, ran B live (the
    break) and crashed while C was in flight. On recovery A and B come from the run's own
    journal; C must still run live, as it would have without the crash.
    """
    script = "return [await agent('A'), await agent('B'), await agent('C')]"
    store = MemoryStore()
    await store.save_run(RunRecord(id="src", owner="local", status="completed", script=script, created_at=1.0))
    source = {"A": ("completed", "a-src"), "B": ("failed", None), "C": ("completed", "c-src")}
    for i, (p, (status, output)) in enumerate(source.items()):
        await store.save_call(journaled("src", i, p, status, output=output))
    await store.save_run(RunRecord(id="crashed", owner="local", status="running", script=script, created_at=2.0,
                                   resume_from="src", resume_mode="prefix"))
    await store.save_call(journaled("crashed", 0, "A", "cached", output="a-src"))
    await store.save_call(journaled("crashed", 1, "B", "completed", output="b-live"))
    with anyio.fail_after(20):
        async with harness(tmp_path, store, recover=True) as h:
            final = await h.engine.wait("crashed")
    assert final.status == "completed"
    assert h.executed("crashed") == ["C"]
    assert final.result[:2] == ["a-src", "b-live"] and final.result[2] != "c-src"


async def test_recovered_calls_keep_their_journaled_status(tmp_path: Path) -> None:
    """A resumed run that crashed: its cached calls are still ``cached`` (0 tokens) after recovery."""
    script = "return [await agent('A'), await agent('B'), await agent('C')]"
    store = MemoryStore()
    await store.save_run(RunRecord(id="src", owner="local", status="completed", script=script, created_at=1.0))
    for i, p in enumerate("ABC"):
        await store.save_call(journaled("src", i, p, "completed", output=p.lower(), usage={"output_tokens": 7}))
    await store.save_run(RunRecord(id="crashed", owner="local", status="running", script=script, created_at=2.0,
                                   resume_from="src", resume_mode="reuse"))
    for i, p in enumerate("AB"):
        await store.save_call(journaled("crashed", i, p, "cached", output=p.lower(),
                                        transcript=[{"cached_from": "src", "index": i}]))
    with anyio.fail_after(20):
        async with harness(tmp_path, store, recover=True) as h:
            final = await h.engine.wait("crashed")
            calls = await h.calls("crashed")
    assert final.status == "completed" and final.result == ["a", "b", "c"]
    assert h.executed("crashed") == []
    assert [c.status for c in calls] == ["cached"] * 3
    assert [c.transcript for c in calls] == [[{"cached_from": "src", "index": i}] for i in range(3)]
    assert final.usage["agents"] == {"total": 3, "cached": 3}
    assert final.usage["tokens"]["output"] == 0


async def test_a_follower_reading_pre_crash_events_when_a_recovered_run_ends_gets_every_event(
    tmp_path: Path,
) -> None:
    # A recovered run's events from before the crash come from the store. If the run ends while
    # a follower works through them, the follower carries on from the store up to run.completed.
    store = MemoryStore()
    script = "const a = await agent('one'); const b = await agent('two'); return [a, b].length"
    with anyio.fail_after(20):
        async with harness(tmp_path, store) as h:
            run = await h.engine.submit(RunRequest(script=script, options={"simulate": {"latency_ms": 300}}))
            async for event in h.engine.follow(run.id):
                if event.type == "agent.completed":
                    break
        # Leaving the engine cancels the run without ending it, like a stopped process.
        async with harness(tmp_path, store, recover=True) as h:
            async with aclosing(h.engine.follow(run.id)) as events:
                first = await anext(events)  # from the store: written before the "crash"
                final = await h.engine.wait(run.id)  # the run ends, and is archived, meanwhile
                rest = [event async for event in events]
    assert final.status == "completed" and final.result == 2
    seqs = [first.seq, *(event.seq for event in rest)]
    assert seqs == list(range(1, len(seqs) + 1))
    assert rest[-1].type == "run.completed"


async def test_recovery_announces_only_calls_whose_final_event_was_lost(tmp_path: Path) -> None:
    # Before the crash, A's journal entry and its agent.completed event were committed; B's
    # entry was, but not its event. A follower already saw A finish: after recovery it must see
    # B's final event, once, and nothing more about A.
    script = "return [await agent('A'), await agent('B')]"
    store = MemoryStore()
    await store.save_run(RunRecord(id="crashed", owner="local", status="running", script=script, created_at=1.0))
    for i, p in enumerate("AB"):
        await store.save_call(journaled("crashed", i, p, "completed", output=p.lower(), usage={"output_tokens": 7}))
    store.append_events([
        EventRecord(seq=1, ts=1.0, run_id="crashed", type="run.queued", data={}),
        EventRecord(seq=2, ts=1.0, run_id="crashed", type="run.started", data={"recovered": False}),
        EventRecord(seq=3, ts=1.0, run_id="crashed", type="agent.completed", data={"index": 0, "label": "A"}),
    ])
    with anyio.fail_after(20):
        async with harness(tmp_path, store, recover=True) as h:
            final = await h.engine.wait("crashed")
            events = await h.events("crashed")
    assert final.status == "completed" and final.result == ["a", "b"]
    assert h.executed("crashed") == []
    finished = [(e.type, e.data["index"]) for e in events if e.type in ("agent.completed", "agent.cached")]
    assert finished == [("agent.completed", 0), ("agent.cached", 1)]
    assert final.usage["agents"] == {"total": 2, "completed": 2}
    assert final.usage["tokens"]["output"] == 14
