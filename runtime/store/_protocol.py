"""What the runtime needs from a store. SQLite (embedded) fills it; PostgreSQL can later.

Ordering and durability contract:
- ``append_events`` does not block: events are queued in order and committed soon after.
- Every awaited write (``save_run``, ``save_call``, workflow writes) returns only once it and
  everything queued before it (events included) is committed. So an agent's result is durable
  before the script sees it, and the events describing it are at least as durable.
- Reads see every write that returned before the read began.
- A record handed to the store is the store's: the caller does not mutate it (or the dicts it
  holds) afterwards, so a store may encode it later, off the event loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from ._records import CallRecord, EventRecord, RunRecord, WorkflowRecord

__all__ = ["Store", "check_limit"]


def check_limit(limit: int | None) -> None:
    """``read_events``' ``limit``: None (every event) or how many at most, never negative."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be None or at least 0, not {limit}")


class Store(Protocol):
    async def save_run(self, run: RunRecord) -> None:
        """Insert or replace the run with ``run.id``."""

    def save_run_soon(self, run: RunRecord, done: Callable[[BaseException | None], None]) -> None:
        """``save_run`` without waiting: the write is queued now, behind every write queued
        before it; ``done(None)`` runs on the event loop once it is durable, ``done(error)`` if
        it cannot be. Raises at once, without calling ``done``, if the store cannot take the
        write (closed, its writer gone, a record that does not encode)."""

    async def get_run(self, run_id: str) -> RunRecord | None: ...

    async def list_runs(
        self,
        *,
        owner: str | None = None,
        status: str | None = None,
        limit: int = 50,
        before: str | None = None,
    ) -> list[RunRecord]:
        """Newest first. ``owner=None`` lists every owner's runs; ``before`` is a run id cursor."""

    async def find_run_by_idempotency_key(self, owner: str, key: str) -> RunRecord | None: ...

    async def runs_with_status(self, statuses: Sequence[str]) -> list[RunRecord]:
        """For crash recovery: every run in one of ``statuses``, oldest first."""

    async def save_call(self, call: CallRecord) -> None:
        """Insert or replace the call ``(call.run_id, call.index)``."""

    def journal_call(self, call: CallRecord, done: Callable[[BaseException | None], None]) -> None:
        """``save_call`` without waiting: ``done(None)`` runs on the event loop once the call is
        durable, ``done(error)`` if it cannot be. Saves of one call keep their order."""

    async def list_calls(self, run_id: str) -> list[CallRecord]:
        """In index order."""

    async def get_call(self, run_id: str, index: int) -> CallRecord | None: ...

    def append_events(self, events: Sequence[EventRecord]) -> None:
        """Queue events for commit, in order. Never blocks the caller."""

    async def read_events(self, run_id: str, after_seq: int = 0, limit: int | None = None) -> list[EventRecord]:
        """Events with ``seq > after_seq``, in order: at most ``limit`` of them (None: every one)."""

    async def save_workflow(self, workflow: WorkflowRecord) -> None: ...

    def commit_wait_s(self) -> float:
        """How long the oldest write handed to the store has waited to be committed (0.0: none
        waits). A store that is stuck (a stalled disk, a stopped writer) shows it here."""

    async def get_workflow(self, name: str) -> WorkflowRecord | None: ...

    async def list_workflows(self) -> list[WorkflowRecord]: ...

    async def delete_workflow(self, name: str) -> bool:
        """True when a workflow was deleted."""

    async def aclose(self) -> None:
        """Commit everything queued, then release resources."""
