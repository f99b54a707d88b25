"""The store's writer process under stress: values it cannot load or frame, writes from other
threads and from callbacks, and a writer killed at awkward moments (runtime/store/_writer.py and
the store's side of its pipes in _sqlite.py). Each of these failed on the first version."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import anyio
import pytest

import sandbox._isolate as sandbox_isolate
from runtime import Engine, RunRequest, load_settings
from runtime.store._sqlite import SQLiteStore
from .test_sqlite_store import call, event, run



# A class the service process can pickle but the writer process cannot import (the writer imports
# only runtime.store; anything defined in the service's __main__, a plugin, a test module, ...).
_mod = types.ModuleType("only_in_the_service")
class Opaque:  # noqa: E302
    pass
Opaque.__module__ = "only_in_the_service"
_mod.Opaque = Opaque
sys.modules["only_in_the_service"] = _mod


@pytest.mark.anyio
async def test_a_value_the_writer_cannot_load_fails_its_own_write_only(tmp_path: Path) -> None:
    with anyio.fail_after(20):
        async with await SQLiteStore.open(tmp_path / "q.db") as store:
            await store.save_call(call("r", 0))
            first = store.writer_pid
            with pytest.raises(TypeError):  # not JSON, as the value would be in the service
                await store.save_call(call("r", 1, output=Opaque()))
            await store.save_call(call("r", 2))
            assert store.writer_pid == first  # it never died
            assert [c.index for c in await store.list_calls("r")] == [0, 2]


@pytest.mark.anyio
async def test_entries_from_two_threads_at_once_are_both_sent(tmp_path: Path) -> None:
    # journal_call from the loop's thread and from another thread (its own loop) at once: in the
    # first version each appended, then each saw len(pending) == 2, and neither sent.
    store = await SQLiteStore.open(tmp_path / "q.db")
    try:
        loop_thread = threading.get_ident()
        appended, other_done = threading.Event(), threading.Event()

        class Pending(type(store._calls_pending)):  # a deque; widens the append..len() window
            def append(self, item):  # type: ignore[override]
                super().append(item)
                if threading.get_ident() == loop_thread and not appended.is_set():
                    appended.set()
                    other_done.wait(2)  # the other thread appends meanwhile (a GIL switch)

        store._calls_pending = Pending()
        results: list[object] = []

        def other() -> None:
            async def main() -> None:
                appended.wait(2)
                store.journal_call(call("r", 1), results.append)
                other_done.set()
                await asyncio.sleep(3)
            asyncio.run(main())

        t = threading.Thread(target=other)
        t.start()
        got = anyio.Event()
        store.journal_call(call("r", 0), lambda e: (results.append(e), got.set()))
        with anyio.move_on_after(2):
            await got.wait()
        assert results, "neither journal entry was ever sent: both callbacks hang"
    finally:
        await anyio.to_thread.run_sync(t.join)
        await store.aclose()


@pytest.mark.anyio
async def test_answers_left_in_a_dead_writers_pipe_are_not_replayed(tmp_path: Path) -> None:
    from runtime.store import WorkflowRecord
    with anyio.fail_after(20):
        async with await SQLiteStore.open(tmp_path / "q.db") as store:
            await store.save_workflow(WorkflowRecord(name="w", script="return 1", meta={}))
            store.append_events([event("r", 1), event("r", 2)])
            deleting = asyncio.ensure_future(store.delete_workflow("w"))
            await asyncio.sleep(0)
            await asyncio.sleep(0)  # _send has run: the events and the DELETE are in the pipe
            assert not store._writes_pending and store._sent
            time.sleep(0.5)  # a busy loop: the writer commits the group and answers meanwhile
            os.kill(store.writer_pid, signal.SIGKILL)  # e.g. the OOM killer, right after answering
            time.sleep(0.2)
            store.append_events([event("r", 3)])  # its _send runs before _receive in the next turn
            deleted = await deleting
            await store.save_run(run("r"))
            stats = store.statistics()
            assert [e.seq for e in await store.read_events("r")] == [1, 2, 3]
            assert await store.get_workflow("w") is None
            assert deleted is True, "the DELETE was committed, but its caller is told nothing was deleted"
            assert stats.events_dropped == 0 and stats.write_errors == 0


@pytest.mark.anyio
async def test_writes_a_callback_makes_while_a_frame_is_built_do_not_overtake_it(tmp_path: Path) -> None:
    # The first version called an unpicklable journal entry's callback from inside _send, before
    # that _send had queued its frame. A callback that journals a burst (32 entries: an early
    # send) then got its frame to the writer first: later events overtook earlier ones.
    with anyio.fail_after(20):
        async with await SQLiteStore.open(tmp_path / "q.db") as store:
            def on_bad(error: BaseException | None) -> None:
                store.append_events([event("r", 3)])
                for i in range(32):
                    store.journal_call(call("r", 100 + i), lambda e: None)

            store.append_events([event("r", 1), event("r", 2)])
            store.journal_call(call("r", 0, output=lambda: None), on_bad)  # does not pickle
            await asyncio.sleep(0.5)
            await store.save_run(run("r"))
            assert [e.seq for e in await store.read_events("r")] == [1, 2, 3]


def _nest(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.anyio
async def test_a_value_too_deep_to_frame_fails_alone_and_never_hangs(tmp_path: Path) -> None:
    # The first version's fallback pickled each value alone, then the frame again: a value nested
    # just deep enough pickles alone (fewer levels) but not in the frame (3 more levels), so the
    # second frame() raised out of _send, and nobody was ever answered.
    with anyio.fail_after(60):
        async with await SQLiteStore.open(tmp_path / "q.db") as store:
            outcomes = {}
            for depth in range(470, 520):
                with anyio.move_on_after(1):
                    try:
                        await store.save_call(call("r", depth, output=_nest(depth)))
                        outcomes[depth] = "ok"
                    except Exception as exc:
                        outcomes[depth] = type(exc).__name__
                    continue
                outcomes[depth] = "HANG"
            assert "HANG" not in outcomes.values()
            assert set(outcomes.values()) <= {"ok", "RecursionError"}


@pytest.mark.anyio
async def test_writes_beside_a_value_too_deep_to_frame_still_succeed(tmp_path: Path) -> None:
    with anyio.fail_after(60):
        async with await SQLiteStore.open(tmp_path / "q.db") as store:
            hung = []
            for depth in range(468, 480):  # the window is 1-2 levels wide and depends on stack depth
                done: list[str] = []

                async def save(name: str, c) -> None:
                    try:
                        await store.save_call(c)
                    except Exception:
                        pass
                    done.append(name)

                with anyio.move_on_after(1):
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(save, "innocent", call(f"other-{depth}", 0))
                        tg.start_soon(save, "deep", call("r", depth, output=_nest(depth)))
                if "innocent" not in done:
                    hung.append(depth)
            assert not hung
            assert len(await store.list_calls("other-470")) == 1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


def _may_use_sched_batch() -> bool:
    """Whether this sandbox lets a process switch itself to SCHED_BATCH (the writer skips it if not)."""
    if not hasattr(os, "SCHED_BATCH"):
        return False
    probe = "import os; os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


@pytest.mark.anyio
@pytest.mark.skipif(not _may_use_sched_batch(), reason="SCHED_BATCH is Linux's, and may be refused")
async def test_the_writer_and_its_checkpointer_run_under_sched_batch(tmp_path: Path) -> None:
    # Under the default policy a woken writer took the loop's CPU for a whole commit.
    with anyio.fail_after(20):
        async with await SQLiteStore.open(tmp_path / "q.db") as store:
            await store.save_call(call("r", 0))
            threads = os.listdir(f"/proc/{store.writer_pid}/task")
            assert len(threads) == 2  # its main thread and the checkpointer's, there before "ready"
            assert {os.sched_getscheduler(int(tid)) for tid in threads} == {os.SCHED_BATCH}


@pytest.mark.anyio
async def test_a_writer_killed_during_aclose_leaves_nothing_behind(tmp_path: Path) -> None:
    with anyio.fail_after(20):
        store = await SQLiteStore.open(tmp_path / "q.db")
        pid = store.writer_pid
        tasks = [asyncio.ensure_future(store.save_call(call("r", i, output="y" * 100_000))) for i in range(50)]
        await asyncio.sleep(0)
        closing = asyncio.ensure_future(store.aclose())
        await asyncio.sleep(0.01)
        os.kill(pid, signal.SIGKILL)
        await closing
        await store.aclose()
        res = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(r is None or isinstance(r, RuntimeError) for r in res)  # done, or told it was not
        assert not _alive(pid)


@pytest.mark.anyio
async def test_a_writer_killed_with_huge_values_in_flight_loses_nothing(tmp_path: Path) -> None:
    with anyio.fail_after(60):
        async with await SQLiteStore.open(tmp_path / "q.db") as store:
            big = "x" * (30 << 20)
            await store.save_call(call("r", 0, output=big))
            t = asyncio.ensure_future(store.save_call(call("r", 1, output=big)))
            store.append_events([event("r", 1)])
            for _ in range(3):
                await asyncio.sleep(0)
            assert len(store._outbox) > 0
            os.kill(store.writer_pid, signal.SIGKILL)
            await t
            store.append_events([event("r", 2)])
            await store.save_call(call("r", 2, output={"small": 1}))
            calls = await store.list_calls("r")
            assert [len(c.output) if isinstance(c.output, str) else c.output for c in calls] == [30 << 20, 30 << 20, {"small": 1}]
            assert [e.seq for e in await store.read_events("r")] == [1, 2]
            assert store.statistics().queued == 0


@pytest.mark.anyio
async def test_a_stopped_writer_shows_as_a_write_that_waits(tmp_path: Path) -> None:
    # A hung writer (a stalled disk, a stopped process) is not a dead one: nothing fails, writes
    # just wait. commit_wait_s() is how long the oldest one has waited, for /healthz to report.
    with anyio.fail_after(20):
        async with await SQLiteStore.open(tmp_path / "q.db") as store:
            await store.save_run(run("r"))
            assert store.commit_wait_s() == 0.0
            os.kill(store.writer_pid, signal.SIGSTOP)
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(store.save_call, call("r", 0))
                    store.append_events([event("r", 1)])
                    while store.commit_wait_s() < 0.3:
                        await anyio.sleep(0.02)
                    assert store.statistics().queued >= 2
                    os.kill(store.writer_pid, signal.SIGCONT)
            finally:
                os.kill(store.writer_pid, signal.SIGCONT)
            assert store.commit_wait_s() == 0.0
            assert [c.index for c in await store.list_calls("r")] == [0]


@pytest.mark.anyio
async def test_a_run_that_ends_while_the_writer_is_stopped_frees_its_context_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The run's final record waits for a hung writer; the script's context (its whole heap) must
    # not wait with it, or every run ending during a stall would keep its heap.
    isolates: list[sandbox_isolate.Isolate] = []
    retire = sandbox_isolate.Isolate._retire

    def recording_retire(self: sandbox_isolate.Isolate) -> None:
        isolates.append(self)
        retire(self)

    monkeypatch.setattr(sandbox_isolate.Isolate, "_retire", recording_retire)
    script = "await new Promise((r) => setTimeout(r, 100)); const a = []; for (let i = 0; i < 20000; i++) a.push({i}); return a.length"
    with anyio.fail_after(20):
        async with await SQLiteStore.open(tmp_path / "q.db") as store:
            async with Engine(load_settings(), store, recover=False) as engine:
                record = await engine.submit(RunRequest(script=script))
                os.kill(store.writer_pid, signal.SIGSTOP)
                try:
                    while not isolates or not isolates[0].closed or isolates[0]._retired is not None:
                        await anyio.sleep(0.01)
                    assert not engine.live(record.id).done.is_set()  # its end still waits for the writer
                finally:
                    os.kill(store.writer_pid, signal.SIGCONT)
                assert (await engine.wait(record.id)).result == 20000
