"""The durable records of quickflow: runs, journaled agent calls, events, saved workflows.

Plain frozen dataclasses; every field is JSON-friendly so a store can persist them as columns
or JSON text. ``dataclasses.replace`` produces updated copies.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["CallRecord", "EventRecord", "RunRecord", "WorkflowRecord"]


@dataclass(frozen=True)
class RunRecord:
    id: str
    owner: str
    status: str  # a runtime.RunStatus value
    script: str
    args: Any = None  # the run's input; ``None`` with ``has_args=False`` means absent (``undefined`` in JS)
    has_args: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    workflow: str | None = None
    resume_from: str | None = None
    resume_mode: str | None = None
    idempotency_key: str | None = None
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    result: Any = None
    error: dict[str, Any] | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    # Which serve process drives the run (crash recovery and, later, leases).
    node: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Not frozen: a frozen dataclass sets each field through object.__setattr__, and several of these
# are made per agent. Treat it as immutable all the same.
@dataclass(slots=True)
class CallRecord:
    """One journaled ``agent()`` call: SPEC §3.3."""

    run_id: str
    index: int
    key: str  # sha256 of the canonical JSON of {prompt, schema, model, effort, agentType, isolation}
    occurrence: int  # the n-th call (0-based) with this key in the run, in issue order
    status: str  # queued | running | completed | failed | stopped | cached
    prompt: str
    options: dict[str, Any] = field(default_factory=dict)
    label: str = ""
    phase: str | None = None
    output: Any = None
    usage: dict[str, int] = field(default_factory=dict)
    cost_usd: float = 0.0
    model: str | None = None
    attempts: int = 0
    queued_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    transcript: list[Any] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)  # not frozen, like CallRecord: made three times per agent
class EventRecord:
    """``{seq, ts, run_id, type, data}``; ``seq`` is monotonic per run, starting at 1."""

    seq: int
    ts: float
    run_id: str
    type: str
    data: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "ts": self.ts, "run_id": self.run_id, "type": self.type, "data": self.data}


@dataclass(frozen=True)
class WorkflowRecord:
    name: str
    script: str
    meta: dict[str, Any]
    owner: str | None = None
    source: str = "api"  # api | directory
    updated_at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
