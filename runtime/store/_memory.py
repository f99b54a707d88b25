"""An in-process store: ``quickflow run`` and unit tests use it. Same contract as SQLite, no durability."""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Callable, Sequence

from ._protocol import check_limit
from ._records import CallRecord, EventRecord, RunRecord, WorkflowRecord

__all__ = ["MemoryStore"]


class MemoryStore:
    def __init__(self) -> None:
        self._runs: dict[str, RunRecord] = {}
        self._calls: dict[str, dict[int, CallRecord]] = {}
        self._events: dict[str, list[EventRecord]] = {}
        self._workflows: dict[str, WorkflowRecord] = {}

    async def save_run(self, run: RunRecord) -> None:
        self._runs[run.id] = run

    def save_run_soon(self, run: RunRecord, done: Callable[[BaseException | None], None]) -> None:
        self._runs[run.id] = run
        asyncio.get_running_loop().call_soon(done, None)

    async def get_run(self, run_id: str) -> RunRecord | None:
        return self._runs.get(run_id)

    async def list_runs(
        self, *, owner: str | None = None, status: str | None = None, limit: int = 50, before: str | None = None
    ) -> list[RunRecord]:
        runs = sorted(self._runs.values(), key=lambda r: (r.created_at, r.id), reverse=True)
        if before is not None and before in self._runs:
            cursor = self._runs[before]
            runs = [r for r in runs if (r.created_at, r.id) < (cursor.created_at, cursor.id)]
        runs = [r for r in runs if (owner is None or r.owner == owner) and (status is None or r.status == status)]
        return runs[:limit]

    async def find_run_by_idempotency_key(self, owner: str, key: str) -> RunRecord | None:
        for run in self._runs.values():
            if run.owner == owner and run.idempotency_key == key:
                return run
        return None

    async def runs_with_status(self, statuses: Sequence[str]) -> list[RunRecord]:
        return sorted((r for r in self._runs.values() if r.status in statuses), key=lambda r: r.created_at)

    async def save_call(self, call: CallRecord) -> None:
        self._calls.setdefault(call.run_id, {})[call.index] = call

    def journal_call(self, call: CallRecord, done: Callable[[BaseException | None], None]) -> None:
        self._calls.setdefault(call.run_id, {})[call.index] = call
        asyncio.get_running_loop().call_soon(done, None)

    async def list_calls(self, run_id: str) -> list[CallRecord]:
        return [c for _, c in sorted(self._calls.get(run_id, {}).items())]

    async def get_call(self, run_id: str, index: int) -> CallRecord | None:
        return self._calls.get(run_id, {}).get(index)

    def append_events(self, events: Sequence[EventRecord]) -> None:
        for event in events:
            stored = self._events.setdefault(event.run_id, [])
            if not stored or event.seq > stored[-1].seq:  # as in SQLite: a seq out of order is dropped
                stored.append(event)

    async def read_events(self, run_id: str, after_seq: int = 0, limit: int | None = None) -> list[EventRecord]:
        check_limit(limit)
        events = self._events.get(run_id, [])
        start = bisect.bisect_right(events, after_seq, key=lambda e: e.seq)  # seqs increase
        return events[start:] if limit is None else events[start:start + limit]

    async def save_workflow(self, workflow: WorkflowRecord) -> None:
        self._workflows[workflow.name] = workflow

    async def get_workflow(self, name: str) -> WorkflowRecord | None:
        return self._workflows.get(name)

    async def list_workflows(self) -> list[WorkflowRecord]:
        return [self._workflows[name] for name in sorted(self._workflows)]

    async def delete_workflow(self, name: str) -> bool:
        return self._workflows.pop(name, None) is not None

    def commit_wait_s(self) -> float:
        return 0.0  # nothing waits: every write is done when it returns

    async def aclose(self) -> None:
        return None
