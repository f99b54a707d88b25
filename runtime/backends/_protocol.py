"""The seam between the dispatcher and whatever produces an agent's answer.

A backend is an object with ``name`` and ``async call(request) -> AgentResult``. It owns
transport-level retries (429/529/5xx, ``retry-after``); the dispatcher owns everything above
that: concurrency, timeouts (as a cancel scope around ``call``), schema validation and the
corrective re-prompts, journaling. A backend raises :class:`runtime.errors.BackendError`
when an attempt cannot produce output.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, dataclass_transform, runtime_checkable

__all__ = ["NO_USAGE", "AgentBackend", "AgentRequest", "AgentResult", "Correction", "Usage"]


@dataclass(frozen=True)
class Correction:
    """A previous structured-output attempt that failed validation, fed back to the model."""

    output: str
    error: str


@dataclass(slots=True)  # not frozen (cheaper to make, once per call); treat as immutable
class AgentRequest:
    run_id: str
    index: int
    prompt: str
    label: str = ""
    phase: str | None = None
    schema: Mapping[str, Any] | None = None
    model: str | None = None
    effort: str | None = None
    agent_type: str | None = None
    isolation: str | None = None
    timeout_s: float = 1800.0
    attempt: int = 1
    # Failed structured-output attempts, oldest first; empty on the first try.
    corrections: tuple[Correction, ...] = ()
    # Backend-specific per-run settings (e.g. the simulate backend's latency and failure rules).
    settings: Mapping[str, Any] = field(default_factory=dict)


_T = TypeVar("_T")


@dataclass_transform(frozen_default=True)
def _immutable(cls: type[_T]) -> type[_T]:
    """A dataclass the type checker treats as frozen, without a frozen one's cost at run time
    (it sets each field through object.__setattr__: three times as long to make). Hashed by
    value, as a frozen one is, which also lets one instance be a field's shared default."""
    return dataclass(slots=True, unsafe_hash=True)(cls)


@_immutable  # made twice per call; mypy refuses any assignment to its fields
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.cache_read_tokens + other.cache_read_tokens,
            self.cache_write_tokens + other.cache_write_tokens,
        )

    def to_dict(self) -> dict[str, int]:
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cache_read_tokens": self.cache_read_tokens,
            "cache_write_tokens": self.cache_write_tokens,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Usage:
        data = data or {}
        return cls(
            int(data.get("input_tokens", 0)),
            int(data.get("output_tokens", 0)),
            int(data.get("cache_read_tokens", 0)),
            int(data.get("cache_write_tokens", 0)),
        )


NO_USAGE = Usage()  # immutable (see Usage): one for every call that has used nothing yet


@dataclass(slots=True)  # not frozen (cheaper to make, once per attempt); treat as immutable
class AgentResult:
    """What one attempt produced.

    ``text`` is the model's final text. With a schema the backend may also return ``data``, the
    object it already parsed (e.g. a forced tool's input); the dispatcher validates it either way.
    """

    text: str
    usage: Usage = NO_USAGE
    model: str = ""
    stop_reason: str = "end_turn"
    cost_usd: float = 0.0
    data: Any = None
    transcript: tuple[Mapping[str, Any], ...] = ()


@runtime_checkable
class AgentBackend(Protocol):
    """``name`` names the backend in options and errors.

    A backend may also set ``eager = True`` when its ``call`` opens no cancel scope or task
    group before its first await: the dispatcher then starts it before opening the call's own
    scope, and an answer that needs no await (a zero-latency simulated agent) costs no scope.
    An eager backend may go further with ``answer_now(request) -> AgentResult | None``: the
    answer ``call`` would give, computed without awaiting or blocking, or None to have ``call``
    asked. The dispatcher asks it first for calls without a schema.
    """

    name: str

    async def call(self, request: AgentRequest) -> AgentResult: ...
