"""The SQLite store: the ``Store`` contract (checked against ``MemoryStore`` too), durability, group commit."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from runtime.errors import ConfigError, Conflict
from runtime.store import CallRecord, EventRecord, MemoryStore, RunRecord, Store, WorkflowRecord
from runtime.store._migrations import MIGRATIONS, apply_migrations
from runtime.store._rows import call_fields, event_fields
from runtime.store._sqlite import SQLiteStore
from runtime.store._writer import _Write, _Writer

from .sqlite_lock import WriteLock

REPO_ROOT = Path(__file__).resolve().parents[2]
KINDS = ["memory", "sqlite"]


@asynccontextmanager
async def open_store(kind: str, tmp_path: Path) -> AsyncIterator[Store]:
    store: Store = MemoryStore() if kind == "memory" else await SQLiteStore.open(tmp_path / "data" / "q.db")
    try:
        yield store
    finally:
        await store.aclose()


def run(
    run_id: str, *, owner: str = "alice", status: str = "completed", created_at: float = 1.0, **kw: Any
) -> RunRecord:
    return RunRecord(id=run_id, owner=owner, status=status, script="return 1", created_at=created_at, **kw)


def call(run_id: str, index: int, **kw: Any) -> CallRecord:
    fields: dict[str, Any] = {"key": f"k{index}", "occurrence": 0, "status": "completed", "prompt": f"p{index}"}
    fields.update(kw)
    return CallRecord(run_id=run_id, index=index, **fields)


def event(run_id: str, seq: int, type: str = "log", **data: Any) -> EventRecord:
    return EventRecord(seq=seq, ts=float(seq), run_id=run_id, type=type, data=data)


def full_run() -> RunRecord:
    return RunRecord(
        id="r-full",
        owner="alice",
        status="failed",
        script="const x = await agent('hi')\nreturn x",
        args={"items": [1, 2.5, "três", None, True], "nested": {"a": {}}},
        has_args=True,
        options={"max_agents": 10, "model": "opus"},
        workflow="summarize",
        resume_from="r-source",
        resume_mode="prefix",
        idempotency_key="idem-1",
        created_at=1700000000.25,
        started_at=1700000001.5,
        finished_at=1700000009.75,
        result=[1, "two", {"three": 3}],
        error={"code": "script_error", "message": "boom", "line": 3},
        usage={"input_tokens": 10, "output_tokens": 20, "cost_usd": 0.5},
        node="node-a",
    )


def full_call() -> CallRecord:
    return CallRecord(
        run_id="r-full",
        index=3,
        key="a" * 64,
        occurrence=2,
        status="failed",
        prompt="summarize ✓",
        options={"schema": {"type": "object"}, "model": "haiku"},
        label="sum",
        phase="map",
        output={"summary": "ok", "n": [1, 2]},
        usage={"input_tokens": 5, "output_tokens": 7},
        cost_usd=0.0125,
        model="haiku",
        attempts=3,
        queued_at=1.0,
        started_at=2.0,
        finished_at=3.5,
        error="rate limited",
        transcript=[{"role": "assistant", "content": "x"}, None, 3],
    )


# -- the contract, against both stores ----------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("kind", KINDS)
async def test_run_round_trip(kind: str, tmp_path: Path) -> None:
    with anyio.fail_after(10):
        async with open_store(kind, tmp_path) as store:
            await store.save_run(full_run())
            assert await store.get_run("r-full") == full_run()
            assert await store.get_run("missing") is None

            # args absent, explicitly null, and falsy values stay distinguishable.
            variants = {
                "absent": run("absent"),
                "null": run("null", args=None, has_args=True),
                "zero": run("zero", args=0, has_args=True),
                "empty": run("empty", args="", has_args=True),
                "list": run("list", args=[], has_args=True),
            }
            for record in variants.values():
                await store.save_run(record)
            for run_id, record in variants.items():
                got = await store.get_run(run_id)
                assert got == record
                assert got is not None and got.has_args is (run_id != "absent")

            # save_run replaces.
            finished = replace(full_run(), status="completed", error=None, result=None)
            await store.save_run(finished)
            assert await store.get_run("r-full") == finished


@pytest.mark.anyio
@pytest.mark.parametrize("kind", KINDS)
async def test_save_run_soon_is_queued_at_once_and_heard_of_once(kind: str, tmp_path: Path) -> None:
    # Queued when called, so a save queued after it is committed after it; its callback hears
    # of the commit once, on the event loop.
    with anyio.fail_after(10):
        async with open_store(kind, tmp_path) as store:
            heard: list[BaseException | None] = []
            store.save_run_soon(run("r", status="running"), heard.append)
            await store.save_run(run("r", status="paused"))
            while not heard:
                await anyio.sleep(0.001)
            await anyio.sleep(0.01)
            assert heard == [None]
            stored = await store.get_run("r")
            assert stored is not None and stored.status == "paused"


@pytest.mark.anyio
async def test_save_run_soon_reports_a_taken_idempotency_key_as_a_conflict(tmp_path: Path) -> None:
    with anyio.fail_after(10):
        async with await SQLiteStore.open(tmp_path / "q.db") as store:
            await store.save_run(run("first", idempotency_key="same"))
            heard: list[BaseException | None] = []
            store.save_run_soon(run("second", idempotency_key="same"), heard.append)
            while not heard:
                await anyio.sleep(0.001)
    assert len(heard) == 1 and isinstance(heard[0], Conflict)
    assert heard[0].details["run_id"] == "second"


@pytest.mark.anyio
@pytest.mark.parametrize("kind", KINDS)
async def test_list_runs_filters_and_pagination(kind: str, tmp_path: Path) -> None:
    with anyio.fail_after(10):
        async with open_store(kind, tmp_path) as store:
            for i in range(10):
                owner = "alice" if i % 2 == 0 else "bob"
                status = "running" if i % 3 == 0 else "completed"
                await store.save_run(run(f"r{i}", owner=owner, status=status, created_at=100.0 + i))
            # Two runs created at the same instant are ordered by id.
            await store.save_run(run("same-a", created_at=50.0))
            await store.save_run(run("same-b", created_at=50.0))

            everything = [r.id for r in await store.list_runs(limit=100)]
            assert everything == [f"r{i}" for i in range(9, -1, -1)] + ["same-b", "same-a"]
            assert [r.id for r in await store.list_runs(owner="bob")] == ["r9", "r7", "r5", "r3", "r1"]
            assert [r.id for r in await store.list_runs(status="running")] == ["r9", "r6", "r3", "r0"]
            assert [r.id for r in await store.list_runs(owner="alice", status="running")] == ["r6", "r0"]
            assert [r.id for r in await store.list_runs(owner="nobody")] == []
            assert [r.id for r in await store.list_runs(limit=3)] == ["r9", "r8", "r7"]

            # Walk pages with the ``before`` cursor: every run exactly once, newest first.
            pages: list[list[str]] = []
            cursor: str | None = None
            while True:
                page = [r.id for r in await store.list_runs(limit=5, before=cursor)]
                if not page:
                    break
                pages.append(page)
                cursor = page[-1]
            assert [run_id for page in pages for run_id in page] == everything
            assert [len(p) for p in pages] == [5, 5, 2]
            # Cursor with filters, and a cursor naming a run of another owner.
            assert [r.id for r in await store.list_runs(owner="bob", before="r7")] == ["r5", "r3", "r1"]
            assert [r.id for r in await store.list_runs(owner="alice", before="r7", limit=2)] == ["r6", "r4"]
            assert [r.id for r in await store.list_runs(before="same-b")] == ["same-a"]
            # An unknown cursor is ignored.
            assert [r.id for r in await store.list_runs(limit=2, before="nope")] == ["r9", "r8"]


@pytest.mark.anyio
@pytest.mark.parametrize("kind", KINDS)
async def test_idempotency_lookup_and_runs_with_status(kind: str, tmp_path: Path) -> None:
    with anyio.fail_after(10):
        async with open_store(kind, tmp_path) as store:
            await store.save_run(run("a1", owner="alice", idempotency_key="k1", status="running", created_at=3.0))
            await store.save_run(run("b1", owner="bob", idempotency_key="k1", status="paused", created_at=1.0))
            await store.save_run(run("a2", owner="alice", status="running", created_at=2.0))
            await store.save_run(run("a3", owner="alice", status="completed", created_at=0.5))

            found = await store.find_run_by_idempotency_key("alice", "k1")
            assert found is not None and found.id == "a1"
            found = await store.find_run_by_idempotency_key("bob", "k1")
            assert found is not None and found.id == "b1"
            assert await store.find_run_by_idempotency_key("alice", "k2") is None
            assert await store.find_run_by_idempotency_key("carol", "k1") is None

            assert [r.id for r in await store.runs_with_status(["running", "paused"])] == ["b1", "a2", "a1"]
            assert [r.id for r in await store.runs_with_status(["completed"])] == ["a3"]
            assert await store.runs_with_status([]) == []
            assert await store.runs_with_status(["queued"]) == []


@pytest.mark.anyio
@pytest.mark.parametrize("kind", KINDS)
async def test_calls_upsert_and_order(kind: str, tmp_path: Path) -> None:
    with anyio.fail_after(10):
        async with open_store(kind, tmp_path) as store:
            for index in (5, 0, 3, 1):
                await store.save_call(call("r1", index, status="running"))
            await store.save_call(call("r2", 0))
            await store.save_call(full_call())

            assert [c.index for c in await store.list_calls("r1")] == [0, 1, 3, 5]
            assert await store.list_calls("r-full") == [full_call()]
            assert await store.get_call("r-full", 3) == full_call()
            assert await store.get_call("r1", 2) is None
            assert await store.list_calls("missing") == []

            done = call("r1", 3, status="completed", output=None, attempts=2, usage={"input_tokens": 1})
            await store.save_call(done)
            assert await store.get_call("r1", 3) == done
            assert [c.status for c in await store.list_calls("r1")] == ["running", "running", "completed", "running"]
            assert len(await store.list_calls("r2")) == 1


@pytest.mark.anyio
@pytest.mark.parametrize("kind", KINDS)
async def test_events_order_after_seq_and_limit(kind: str, tmp_path: Path) -> None:
    with anyio.fail_after(10):
        async with open_store(kind, tmp_path) as store:
            store.append_events([event("r1", 1, "run.started"), event("r2", 1, "run.started")])
            store.append_events([event("r1", seq, "agent.progress", i=seq, text="é") for seq in range(2, 8)])
            store.append_events([])
            await store.save_run(run("r1"))  # an awaited write: every earlier event is committed

            events = await store.read_events("r1")
            assert [e.seq for e in events] == list(range(1, 8))
            assert events[0] == event("r1", 1, "run.started")
            assert events[3] == event("r1", 4, "agent.progress", i=4, text="é")
            assert [e.seq for e in await store.read_events("r1", after_seq=4)] == [5, 6, 7]
            assert [e.seq for e in await store.read_events("r1", after_seq=2, limit=2)] == [3, 4]
            assert await store.read_events("r1", after_seq=7) == []
            assert [e.run_id for e in await store.read_events("r2")] == ["r2"]
            assert await store.read_events("missing") == []


def _batches_of_events() -> list[list[int]]:
    """Seqs of 20 event batches of 1 to 4 events, with gaps (as dropped events leave) now and then
    between batches and within them."""
    batches, seq = [], 0
    for b in range(20):
        seq += 4 if b % 5 == 4 else 1
        step = 2 if b % 3 == 1 else 1
        batches.append(list(range(seq, seq + step * (1 + b % 4), step)))
        seq = batches[-1][-1]
    return batches


@pytest.mark.anyio
@pytest.mark.parametrize("kind", KINDS)
async def test_a_page_of_events_across_batches_and_gaps(kind: str, tmp_path: Path) -> None:
    with anyio.fail_after(10):
        async with open_store(kind, tmp_path) as store:
            written = []
            for batch in _batches_of_events():
                store.append_events([event("r", seq, n=seq) for seq in batch])
                await store.save_run(run("r"))  # commits the batch: one group, one batch row
                written += batch
            for after in (0, 1, 5, 17, written[-2], written[-1], written[-1] + 5):
                for limit in (1, 2, 3, 7, 30, 1000):
                    page = await store.read_events("r", after_seq=after, limit=limit)
                    assert [e.seq for e in page] == [s for s in written if s > after][:limit]
                    assert all(e.data == {"n": e.seq} for e in page)


@pytest.mark.anyio
@pytest.mark.parametrize("kind", KINDS)
async def test_events_out_of_order_are_dropped_and_a_negative_limit_refused(kind: str, tmp_path: Path) -> None:
    with anyio.fail_after(10):
        async with open_store(kind, tmp_path) as store:
            store.append_events([event("r", 1), event("r", 2), event("r", 7)])
            await store.save_run(run("r"))
            store.append_events([event("r", 5), event("r", 7), event("r", 8)])  # 5 and 7 do not follow 7
            await store.save_run(run("r"))
            assert [e.seq for e in await store.read_events("r")] == [1, 2, 7, 8]
            assert [e.seq for e in await store.read_events("r", after_seq=2, limit=0)] == []
            with pytest.raises(ValueError, match="limit"):
                await store.read_events("r", limit=-1)


def test_the_page_query_seeks_instead_of_reading_every_earlier_batch() -> None:
    from runtime.store._rows import SELECT_EVENT_BATCHES_PAGE

    conn = sqlite3.connect(":memory:")
    apply_migrations(conn)
    plan = " ".join(row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {SELECT_EVENT_BATCHES_PAGE}", ("r", 5, 4)))
    # Not "(run_id=?)" alone: that walks the run's batches from its first one on every page.
    assert "USING INDEX" in plan and "first_seq>" in plan, plan


@pytest.mark.anyio
async def test_a_page_of_events_reads_only_the_batches_it_needs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run's later batches stay unread: paging through a long run does not read the rest of it
    for every page."""
    import runtime.store._sqlite as sqlite_store

    with anyio.fail_after(10):
        async with await SQLiteStore.open(tmp_path / "q.db") as store:
            for batch in _batches_of_events():
                store.append_events([event("r", seq) for seq in batch])
                await store.save_run(run("r"))
            rows_read: list[int] = []
            fetch = sqlite_store.fetch

            def counting_fetch(conn: sqlite3.Connection, sql: str, params: Any = ()) -> list[Any]:
                rows = fetch(conn, sql, params)
                rows_read.append(len(rows))
                return rows

            monkeypatch.setattr(sqlite_store, "fetch", counting_fetch)
            page = await store.read_events("r", after_seq=3, limit=2)
            assert [e.seq for e in page] == [4, 5]
            later = sum(1 for batch in _batches_of_events() if batch[-1] > 3)
            assert sum(rows_read) <= 4 < later  # the first few of the batches after seq 3
            rows_read.clear()
            assert len(await store.read_events("r", after_seq=3)) > 20
            assert sum(rows_read) == later  # unlimited: every one


@pytest.mark.anyio
@pytest.mark.parametrize("kind", KINDS)
async def test_workflows_crud(kind: str, tmp_path: Path) -> None:
    with anyio.fail_after(10):
        async with open_store(kind, tmp_path) as store:
            b = WorkflowRecord(name="b", script="return 2", meta={"description": "B", "args": ["x"]})
            a = WorkflowRecord(name="a", script="return 1", meta={}, owner="alice", source="directory", updated_at=9.5)
            await store.save_workflow(b)
            await store.save_workflow(a)
            assert await store.get_workflow("a") == a
            assert await store.get_workflow("zzz") is None
            assert await store.list_workflows() == [a, b]

            b2 = replace(b, script="return 3", updated_at=10.0)
            await store.save_workflow(b2)
            assert await store.get_workflow("b") == b2

            assert await store.delete_workflow("a") is True
            assert await store.delete_workflow("a") is False
            assert await store.list_workflows() == [b2]


async def _scenario(store: Store) -> dict[str, Any]:
    """A mixed sequence of writes, then every read the contract offers, as plain data."""
    await store.save_run(full_run())
    for i in range(6):
        owner, status = ("u1", "queued") if i % 2 == 0 else ("u2", "running")
        await store.save_run(run(f"s{i}", owner=owner, status=status, created_at=float(i)))
        store.append_events([event(f"s{i}", seq, n=seq) for seq in range(1, i + 2)])
        for index in range(i):
            await store.save_call(call(f"s{i}", index, occurrence=index // 2))
    await store.save_call(full_call())
    await store.save_workflow(WorkflowRecord(name="w", script="s", meta={"k": [1]}))
    await store.save_workflow(WorkflowRecord(name="v", script="t", meta={}))
    deleted = await store.delete_workflow("v")

    def dicts(records: list[Any]) -> list[dict[str, Any]]:
        return [r.to_dict() for r in records]

    out: dict[str, Any] = {
        "deleted": deleted,
        "runs": dicts(await store.list_runs(limit=100)),
        "runs_u1": dicts(await store.list_runs(owner="u1", status="queued", limit=2, before="s4")),
        "active": dicts(await store.runs_with_status(["running", "failed"])),
        "idem": (await store.find_run_by_idempotency_key("alice", "idem-1") or full_run()).to_dict(),
        "workflows": dicts(await store.list_workflows()),
    }
    for i in range(6):
        out[f"calls_s{i}"] = dicts(await store.list_calls(f"s{i}"))
        out[f"events_s{i}"] = dicts(await store.read_events(f"s{i}", after_seq=1))
    return out


@pytest.mark.anyio
async def test_memory_and_sqlite_stores_are_equivalent(tmp_path: Path) -> None:
    with anyio.fail_after(10):
        async with open_store("memory", tmp_path / "m") as memory, open_store("sqlite", tmp_path / "s") as sqlite:
            assert await _scenario(sqlite) == await _scenario(memory)


# -- SQLite specifics ---------------------------------------------------------------------------


def _sql(path: Path, query: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path, isolation_level=None)  # autocommit
    try:
        return conn.execute(query).fetchall()
    finally:
        conn.close()


@pytest.mark.anyio
async def test_migrations_are_recorded_and_not_reapplied(tmp_path: Path) -> None:
    with anyio.fail_after(10):
        path = tmp_path / "nested" / "dir" / "q.db"
        async with await SQLiteStore.open(path) as store:
            assert store.applied_migrations == ("0001_initial", "0002_event_batches")
        first = await anyio.to_thread.run_sync(_sql, path, "SELECT name, applied_at FROM migrations")
        assert [name for name, _ in first] == ["0001_initial", "0002_event_batches"]
        assert await anyio.to_thread.run_sync(_sql, path, "PRAGMA journal_mode") == [("wal",)]

        async with await SQLiteStore.open(path) as store:
            assert store.applied_migrations == ()
        assert await anyio.to_thread.run_sync(_sql, path, "SELECT name, applied_at FROM migrations") == first


def _database_before_event_batches(path: Path) -> None:
    """A database as the first release left it: events as rows of the events table."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        apply_migrations(conn, MIGRATIONS[:1])
        conn.executemany("INSERT INTO events (run_id, seq, ts, type, data) VALUES (?, ?, ?, ?, ?)",
                         [("r", seq, 1.25 + seq, "log", f'{{"n": {seq}}}') for seq in (1, 2, 3)])
    finally:
        conn.close()


@pytest.mark.anyio
async def test_events_from_before_event_batches_are_read_with_the_new_ones(tmp_path: Path) -> None:
    with anyio.fail_after(10):
        path = tmp_path / "q.db"
        await anyio.to_thread.run_sync(_database_before_event_batches, path)
        async with await SQLiteStore.open(path) as store:
            assert store.applied_migrations == ("0002_event_batches",)
            store.append_events([event("r", 3, n=33)])  # already stored before the migration
            await store.save_run(run("r"))
            assert store.statistics().events_dropped == 1
            store.append_events([event("r", 4, n=4), event("r", 5, n=5)])
            await store.save_run(run("r"))
            events = await store.read_events("r")
            assert [(e.seq, e.data) for e in events] == [(n, {"n": n}) for n in range(1, 6)]
            assert events[0].ts == 2.25 and events[0].type == "log"
            assert [e.seq for e in await store.read_events("r", after_seq=2, limit=2)] == [3, 4]
            assert [e.seq for e in await store.read_events("r", after_seq=3)] == [4, 5]


@pytest.mark.anyio
async def test_a_batch_that_repeats_a_stored_seq_is_refused_by_the_database(tmp_path: Path) -> None:
    # The writer checks seqs within a group; across groups the table's trigger does.
    with anyio.fail_after(10):
        async with await SQLiteStore.open(tmp_path / "q.db") as store:
            store.append_events([event("r", 1), event("r", 2)])
            await store.save_run(run("r"))
            store.append_events([event("r", 2), event("r", 3)])
            await store.save_run(run("r"))
            assert [e.seq for e in await store.read_events("r")] == [1, 2, 3]
            assert store.statistics().events_dropped == 1


@pytest.mark.anyio
async def test_a_database_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    with anyio.fail_after(10):
        path = tmp_path / "q.db"
        async with await SQLiteStore.open(path):
            pass
        await anyio.to_thread.run_sync(_sql, path, "INSERT INTO migrations VALUES ('9999_future', 0)")
        with pytest.raises(ConfigError, match="9999_future"):
            await SQLiteStore.open(path)


@pytest.mark.anyio
async def test_data_survives_close_and_reopen(tmp_path: Path) -> None:
    with anyio.fail_after(10):
        path = tmp_path / "q.db"
        async with await SQLiteStore.open(path) as store:
            await store.save_run(full_run())
            await store.save_call(full_call())
            await store.save_workflow(WorkflowRecord(name="w", script="s", meta={"a": 1}))
            # Not awaited by anything: aclose must still commit them.
            store.append_events([event("r-full", seq) for seq in range(1, 101)])
        async with await SQLiteStore.open(path) as store:
            assert await store.get_run("r-full") == full_run()
            assert await store.list_calls("r-full") == [full_call()]
            assert [w.name for w in await store.list_workflows()] == ["w"]
            assert [e.seq for e in await store.read_events("r-full")] == list(range(1, 101))


@pytest.mark.anyio
async def test_queued_events_are_committed_by_a_following_awaited_write(tmp_path: Path) -> None:
    with anyio.fail_after(10):
        async with await SQLiteStore.open(tmp_path / "q.db") as store:
            for seq in range(1, 2001):
                store.append_events([event("r1", seq)])
            await store.save_call(call("r1", 0))
            assert len(await store.read_events("r1")) == 2000
            assert store.statistics().queued == 0


CRASH_CHILD = r"""
import sys
from pathlib import Path

import anyio

from runtime.store import CallRecord, EventRecord
from runtime.store._migrations import MIGRATIONS, apply_migrations
from runtime.store._sqlite import SQLiteStore


async def main() -> None:
    store = await SQLiteStore.open(Path(sys.argv[1]))
    print("writer", store.writer_pid, flush=True)
    for i in range(200_000):  # bounded: never outlives a parent that died
        store.append_events([EventRecord(seq=i + 1, ts=0.0, run_id="crash", type="agent.completed", data={"i": i})])
        await store.save_call(
            CallRecord(run_id="crash", index=i, key="k", occurrence=i, status="completed", prompt="p", output={"i": i})
        )
        print(i, flush=True)  # acknowledged: the parent may now rely on call i (and event i + 1)


anyio.run(main)
"""


@pytest.mark.anyio
async def test_awaited_writes_survive_sigkill(tmp_path: Path) -> None:
    with anyio.fail_after(10):
        path = tmp_path / "q.db"
        pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": pythonpath}
        process = await anyio.open_process(
            [sys.executable, "-c", CRASH_CHILD, str(path)], env=env, stderr=subprocess.DEVNULL
        )
        acknowledged = -1
        try:
            assert process.stdout is not None
            lines = BufferedByteReceiveStream(process.stdout)
            writer_pid = int((await lines.receive_until(b"\n", 64)).split()[1])
            while acknowledged < 300:
                acknowledged = int(await lines.receive_until(b"\n", 64))
            process.kill()  # SIGKILL, mid-stream: the child is still writing
            assert await process.wait() == -signal.SIGKILL
        finally:
            if process.returncode is None:
                process.kill()
            with anyio.CancelScope(shield=True):
                await process.aclose()
        # Its writer process reads the end of its pipe, commits what it has and exits.
        while not _exited(writer_pid):
            await anyio.sleep(0.01)

        async with await SQLiteStore.open(path) as store:
            calls = await store.list_calls("crash")
            assert len(calls) >= acknowledged + 1
            assert [c.index for c in calls] == list(range(len(calls)))
            assert calls[acknowledged].output == {"i": acknowledged}
            events = await store.read_events("crash")
            assert len(events) >= acknowledged + 1
            assert [e.seq for e in events] == list(range(1, len(events) + 1))


@pytest.mark.anyio
async def test_group_commit_of_5000_events_and_1000_calls(tmp_path: Path) -> None:
    with anyio.fail_after(10):
        path = tmp_path / "q.db"
        async with await SQLiteStore.open(path) as store:
            before = store.statistics()
            all_enqueued = anyio.Event()
            started = 0

            async def agent(i: int) -> None:
                nonlocal started
                run_id = f"agent-{i}"
                store.append_events([event(run_id, 1, "agent.queued"), event(run_id, 2, "agent.started")])
                store.append_events([event(run_id, 3, "agent.progress")])
                store.append_events([event(run_id, 4, "agent.progress"), event(run_id, 5, "agent.completed")])
                started += 1
                if started == 1000:
                    all_enqueued.set()
                # No checkpoint between here and the enqueue inside save_call: once the last agent
                # has set the event and suspended, every agent's writes are queued.
                await store.save_call(call("big", i, output={"i": i}))

            lock = WriteLock(path)
            try:
                await lock.acquire()
                async with anyio.create_task_group() as tg:
                    for i in range(1000):
                        tg.start_soon(agent, i)
                    await all_enqueued.wait()
                    await lock.release()
            finally:
                await lock.aclose()
            await store.save_workflow(WorkflowRecord(name="flush", script="", meta={}))

            calls = await store.list_calls("big")
            assert [c.index for c in calls] == list(range(1000))
            assert all(c.output == {"i": c.index} for c in calls)
            for i in range(1000):
                assert [e.seq for e in await store.read_events(f"agent-{i}")] == [1, 2, 3, 4, 5]
            stats = store.statistics()
            assert stats.events_committed - before.events_committed == 5000
            # 1000 calls and the flush, plus the events, merged into however many batches the
            # writer found pending at each group (at least one, at most one per append).
            assert 1001 < stats.writes_committed - before.writes_committed <= 4001
            assert stats.write_errors == 0
            # 4000 writes queued while the writer waited: the group it had taken when it blocked at
            # BEGIN, one group for everything else, then the flushing save_workflow.
            assert stats.groups_committed - before.groups_committed <= 3


async def _outcome(outcomes: dict[Any, BaseException | None], key: Any, write: Awaitable[None]) -> None:
    """Await ``write``; record None, or the exception it raised, under ``key``."""
    try:
        await write
        outcomes[key] = None
    except Exception as exc:
        outcomes[key] = exc


@pytest.mark.anyio
async def test_a_failed_write_reaches_its_caller_and_spares_its_group(tmp_path: Path) -> None:
    with anyio.fail_after(10):
        path = tmp_path / "q.db"
        async with await SQLiteStore.open(path) as store:
            await store.save_run(run("first", idempotency_key="same"))
            outcomes: dict[str, BaseException | None] = {}
            lock = WriteLock(path)
            try:
                await lock.acquire()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(_outcome, outcomes, "good-before", store.save_call(call("r", 0)))
                    store.append_events([event("r", 1)])
                    tg.start_soon(_outcome, outcomes, "duplicate", store.save_run(run("second", idempotency_key="same")))
                    tg.start_soon(_outcome, outcomes, "good-after", store.save_call(call("r", 1)))
                    await anyio.wait_all_tasks_blocked()
                    await lock.release()
            finally:
                await lock.aclose()

            assert outcomes["good-before"] is None and outcomes["good-after"] is None
            error = outcomes["duplicate"]
            assert isinstance(error, Conflict)
            assert error.details["idempotency_key"] == "same"
            assert isinstance(error.__cause__, sqlite3.IntegrityError)
            assert [c.index for c in await store.list_calls("r")] == [0, 1]
            assert [e.seq for e in await store.read_events("r")] == [1]
            assert await store.get_run("second") is None
            assert store.statistics().write_errors == 1

            # The writer keeps going.
            await store.save_run(run("third", idempotency_key="other"))
            assert (await store.find_run_by_idempotency_key("alice", "other")) == run("third", idempotency_key="other")


@pytest.mark.anyio
async def test_one_bad_entry_in_a_multi_row_batch_fails_alone_and_later_rows_win(tmp_path: Path) -> None:
    # A group's journal entries go in as a few multi-row statements: an unencodable entry fails
    # only its own caller, and two entries for the same call keep the later one, as row-by-row
    # statements did.
    with anyio.fail_after(10):
        path = tmp_path / "q.db"
        async with await SQLiteStore.open(path) as store:
            outcomes: dict[int, BaseException | None] = {}
            lock = WriteLock(path)
            try:
                await lock.acquire()
                async with anyio.create_task_group() as tg:
                    for i in range(300):
                        output: Any = object() if i == 137 else {"i": i}
                        tg.start_soon(_outcome, outcomes, i, store.save_call(call("r", i, output=output)))
                    tg.start_soon(_outcome, outcomes, 300, store.save_call(call("r", 5, output={"i": "again"})))
                    await anyio.wait_all_tasks_blocked()
                    await lock.release()
            finally:
                await lock.aclose()

            assert isinstance(outcomes.pop(137), TypeError)
            assert set(outcomes.values()) == {None}
            calls = {c.index: c.output for c in await store.list_calls("r")}
            assert sorted(calls) == [i for i in range(300) if i != 137]
            assert calls[5] == {"i": "again"}
            assert calls[6] == {"i": 6}


@pytest.mark.anyio
async def test_a_faulty_event_is_dropped_alone_and_the_writer_continues(tmp_path: Path) -> None:
    with anyio.fail_after(10):
        async with await SQLiteStore.open(tmp_path / "q.db") as store:
            store.append_events([event("r", 1), event("r", 2)])
            store.append_events([event("r", 3), event("r", 2)])  # seq 2 again: only that event fails
            store.append_events([event("r", 4)])
            await store.save_call(call("r", 0))
            assert [e.seq for e in await store.read_events("r")] == [1, 2, 3, 4]
            stats = store.statistics()
            assert (stats.events_dropped, stats.write_errors) == (1, 1)


@pytest.mark.anyio
async def test_unencodable_values_fail_their_writer_not_the_store(tmp_path: Path) -> None:
    # Records are encoded by the writer process (JSON encoding stays off the event loop): an
    # awaited write with an unencodable value fails for its caller; an event batch is dropped
    # and counted; the writer goes on.
    with anyio.fail_after(10):
        async with await SQLiteStore.open(tmp_path / "q.db") as store:
            store.append_events([EventRecord(seq=1, ts=0.0, run_id="r", type="log", data={"s": {1, 2}})])
            with pytest.raises(TypeError):
                await store.save_call(call("r", 0, output=object()))
            await store.save_call(call("r", 1))
            assert [c.index for c in await store.list_calls("r")] == [1]
            assert await store.read_events("r") == []
            assert store.statistics().events_dropped == 1


@pytest.mark.anyio
async def test_a_cancelled_waiter_still_gets_its_write(tmp_path: Path) -> None:
    with anyio.fail_after(10):
        async with await SQLiteStore.open(tmp_path / "q.db") as store:
            with anyio.CancelScope() as scope:
                scope.cancel()
                await store.save_call(call("r", 7))
            assert scope.cancelled_caught
            await store.save_call(call("r", 8))
            assert [c.index for c in await store.list_calls("r")] == [7, 8]


async def checkpointed(store: SQLiteStore, path: Path, size: int) -> None:
    """Wait until the checkpointer has run and the database file holds ``size`` bytes (a
    checkpoint may end before the last commit)."""
    while store.statistics().checkpoints == 0:
        await anyio.sleep(0.01)
    while path.stat().st_size < size:
        await anyio.sleep(0.01)


@pytest.mark.anyio
async def test_the_wal_is_checkpointed_while_the_store_is_open(tmp_path: Path) -> None:
    # The writer never checkpoints (a checkpoint's fsync would hold up every write queued behind
    # its COMMIT); the checkpointer thread copies committed pages into the database file.
    with anyio.fail_after(10):
        path = tmp_path / "q.db"
        async with await SQLiteStore.open(path) as store:
            size = path.stat().st_size
            # One burst: a group of 100 rows, the size of group the checkpointer runs after.
            store.append_events([event("r", seq, text="x" * 10_000) for seq in range(1, 100)])
            await store.save_run(run("r"))
            await checkpointed(store, path, size + 99 * 10_000)
            assert len(await store.read_events("r")) == 99


@pytest.mark.anyio
async def test_small_commits_are_checkpointed_too(tmp_path: Path) -> None:
    # Single journal entries, each its own group: once they add up to a burst's rows, the
    # checkpointer copies them, well before the WAL's 1000 pages would make a COMMIT do it
    # (and stall every write queued behind that COMMIT for its fsync).
    with anyio.fail_after(10):
        path = tmp_path / "q.db"
        async with await SQLiteStore.open(path) as store:
            size = path.stat().st_size
            for index in range(80):  # about 80 pages
                await store.save_call(call("r", index, output={"text": "x" * 4000}))
            await checkpointed(store, path, size + 60 * 4000)
            assert len(await store.list_calls("r")) == 80


@pytest.mark.anyio
async def test_the_wal_starts_over_under_steady_writes(tmp_path: Path) -> None:
    # A checkpoint beside a steady writer never finds the WAL complete, which starting it over
    # needs: the writer's own checkpoint (quick, the checkpointer has copied most pages) does.
    with anyio.fail_after(30):
        path = tmp_path / "q.db"
        async with await SQLiteStore.open(path) as store:
            for index in range(2000):  # about 8 MB of pages, one commit each
                await store.save_call(call("r", index, output={"text": "x" * 4000}))
            assert path.with_name("q.db-wal").stat().st_size < 6_000_000
            assert len(await store.list_calls("r")) == 2000


def _exited(pid: int) -> bool:
    """Gone, or a zombie nobody has reaped yet (an orphan's parent may be a container's init)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.anyio
async def test_aclose_is_idempotent_and_stops_everything(tmp_path: Path) -> None:
    with anyio.fail_after(10):
        store = await SQLiteStore.open(tmp_path / "q.db")
        assert _alive(store.writer_pid)
        await store.get_run("x")  # opens a read connection
        store.append_events([event("r", 1)])
        async with anyio.create_task_group() as tg:  # concurrent closes both return once closed
            tg.start_soon(store.aclose)
            tg.start_soon(store.aclose)
        await store.aclose()
        assert not _alive(store.writer_pid)  # exited, and reaped
        with pytest.raises(RuntimeError, match="closed"):
            store.append_events([event("r", 2)])
        with pytest.raises(RuntimeError, match="closed"):
            await store.save_call(call("r", 0))
        with pytest.raises(RuntimeError, match="closed"):
            store.save_run_soon(run("r"), lambda error: None)
        with pytest.raises(RuntimeError, match="closed"):
            await store.get_run("x")
        async with await SQLiteStore.open(tmp_path / "q.db") as reopened:
            assert [e.seq for e in await reopened.read_events("r")] == [1]


@pytest.mark.anyio
async def test_the_writer_outlasts_signals_meant_for_the_service(tmp_path: Path) -> None:
    # Ctrl-C or a SIGTERM to the process group must not take the writer away before the service
    # has committed its last writes: it stops when the store tells it to.
    with anyio.fail_after(10):
        async with await SQLiteStore.open(tmp_path / "q.db") as store:
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                os.kill(store.writer_pid, signum)
            await store.save_call(call("r", 0))
            assert _alive(store.writer_pid)
        assert [c.index for c in await _calls_after_reopen(tmp_path / "q.db", "r")] == [0]


@pytest.mark.anyio
async def test_a_killed_writer_is_replaced_and_no_write_is_lost(tmp_path: Path) -> None:
    # Killed on its own (the OOM killer, an operator), the writer is replaced and gets every
    # write it had not answered, in order: the awaited ones return as if nothing happened.
    with anyio.fail_after(20):
        async with await SQLiteStore.open(tmp_path / "q.db") as store:
            first = store.writer_pid
            done = 0

            async def agent(i: int) -> None:
                nonlocal done
                store.append_events([event("r", i + 1, "agent.completed", i=i)])
                await store.save_call(call("r", i, output={"i": i}))
                done += 1

            async with anyio.create_task_group() as tg:
                for i in range(400):
                    tg.start_soon(agent, i)
                    if i == 200:
                        os.kill(first, signal.SIGKILL)  # writes before this one are in flight
            assert done == 400
            assert store.writer_pid != first
            await store.save_run(run("r"))
            assert [c.output for c in await store.list_calls("r")] == [{"i": i} for i in range(400)]
            assert [e.seq for e in await store.read_events("r")] == list(range(1, 401))
            assert store.statistics().queued == 0


@pytest.mark.anyio
async def test_a_writer_that_dies_again_soon_after_its_replacement_fails_the_writes(tmp_path: Path) -> None:
    with anyio.fail_after(20):
        store = await SQLiteStore.open(tmp_path / "q.db")
        await store.save_call(call("r", 0))
        first = store.writer_pid
        os.kill(first, signal.SIGKILL)
        await store.save_call(call("r", 1))  # answered by the replacement
        assert store.writer_pid != first
        os.kill(store.writer_pid, signal.SIGKILL)  # a crash loop: no third writer
        with pytest.raises(RuntimeError, match="writer process .* has stopped"):
            await store.save_call(call("r", 2))
        with pytest.raises(RuntimeError, match="has stopped"):
            await store.save_call(call("r", 3))  # and every write after it, at once
        await store.aclose()
        assert not _alive(first)
        assert [c.index for c in await _calls_after_reopen(tmp_path / "q.db", "r")] == [0, 1]


async def _calls_after_reopen(path: Path, run_id: str) -> list[CallRecord]:
    async with await SQLiteStore.open(path) as store:
        return await store.list_calls(run_id)


@pytest.mark.anyio
async def test_reads_run_concurrently_with_writes(tmp_path: Path) -> None:
    with anyio.fail_after(10):
        async with await SQLiteStore.open(tmp_path / "q.db", readers=3) as store:
            seen: list[int] = []

            async def writer() -> None:
                for i in range(200):
                    store.append_events([event("r", i + 1)])
                    await store.save_call(call("r", i))

            async def reader() -> None:
                last = 0
                while last < 200:
                    calls = await store.list_calls("r")
                    # A prefix, never shrinking: reads see whole committed groups only.
                    assert [c.index for c in calls] == list(range(len(calls)))
                    assert len(calls) >= last
                    last = len(calls)
                    seen.append(last)

            async with anyio.create_task_group() as tg:
                tg.start_soon(writer)
                for _ in range(5):
                    tg.start_soon(reader)
            assert seen[-1] == 200


@pytest.mark.anyio
async def test_multi_row_statements_fit_a_low_parameter_limit(tmp_path: Path) -> None:
    # SQLite builds before 3.32 allow 999 parameters per statement. The writer sizes its
    # multi-row statements by its connection's limit, lowered here to 100: five journal rows of
    # 19 columns, or twenty events of 5, per statement. A statement over the limit would fail
    # and the group would be replayed a row per transaction: correct, but hundreds of commits.
    # The writer's group logic runs here in-process, on a connection whose limit is lowered.
    with anyio.fail_after(10):
        path = tmp_path / "q.db"
        async with await SQLiteStore.open(path):
            pass  # creates the file and applies the migrations
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 100)
            writer = _Writer(conn)
            events = [event_fields(event("r", seq)) for seq in range(1, 501)]
            calls = [call_fields(call("r", i, output={"i": i})) for i in range(300)]
            results = writer.commit([_Write("events", [0], events), _Write("calls", list(range(1, 301)), calls)])
            assert results[0] == (0, 500, None)
            assert all(error is None for _, _, error in results)
            assert writer.groups == 1  # one transaction, nothing replayed
        finally:
            conn.close()
        async with await SQLiteStore.open(path) as store:
            assert [c.output for c in await store.list_calls("r")] == [{"i": i} for i in range(300)]
            assert [e.seq for e in await store.read_events("r")] == list(range(1, 501))


@pytest.mark.anyio
async def test_an_engine_outlives_a_store_whose_writer_is_gone_for_good(tmp_path: Path) -> None:
    # Its runs cannot journal any more and end; the engine, and the service with it, stay up.
    from runtime import Engine, RunRequest, SimulateBackend, load_settings

    with anyio.fail_after(20):
        store = await SQLiteStore.open(tmp_path / "q.db")
        try:
            async with Engine(load_settings(), store, backends={"simulate": SimulateBackend()},
                              recover=False) as engine:
                script = "return await parallel(Array.from({length: 40}, (_, i) => () => agent('a' + i)))"
                record = await engine.submit(RunRequest(script=script, options={
                    "backend": "simulate", "concurrency": 2, "simulate": {"latency_ms": 50}}))
                os.kill(store.writer_pid, signal.SIGKILL)
                while store.statistics().queued:  # the replacement has taken over
                    await anyio.sleep(0.01)
                os.kill(store.writer_pid, signal.SIGKILL)  # and dies too: no third one
                live = engine.live(record.id)
                assert live is not None
                await live.done.wait()
                assert live.status.value == "failed"
                assert live.record.error is not None and live.record.error["name"] == "StoreError"
                # It stays "running" in the database: the next start recovers it from its journal.
        finally:
            await store.aclose()
