"""An agent call's live state and a phase's tallies, as the run and its views see them.

:class:`LiveCall` is one ``agent()`` call while its run is live (``record()`` is its journal
entry, ``event_data()`` the common fields of its events); :class:`PhaseStats` counts a phase's
agents, tokens and cost for the run's summary.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio

from .backends import NO_USAGE, Usage
from .state import AgentStatus
from .store import CallRecord

__all__ = ["LiveCall", "PhaseStats", "default_label"]


_WORD = re.compile(r"\S+")
_LABEL_CHARS = 60


def default_label(prompt: str) -> str:
    """The first 60 characters of the prompt, whitespace collapsed.

    Reads only as many words as that takes: prompts can be long, and unlabeled calls are many.
    """
    words: list[str] = []
    length = -1
    for word in _WORD.finditer(prompt):
        words.append(word.group())
        length += len(words[-1]) + 1
        if length >= _LABEL_CHARS:
            break
    return " ".join(words)[:_LABEL_CHARS]



class LiveCall:
    """An agent call while its run is live; ``record()`` is its journal entry.

    A plain class, not a dataclass: one is made per agent, and the ``__init__`` a dataclass
    generates stays interpreted Python where this one is compiled (see ``runtime/_native``).
    """

    def __init__(self, index: int, key: str, occurrence: int, prompt: str, options: dict[str, Any],
                 label: str, phase: str, *, model: str | None = None) -> None:
        self.index = index
        self.key = key
        self.occurrence = occurrence
        self.prompt = prompt
        self.options = options
        self.label = label
        self.phase = phase
        self.status = AgentStatus.QUEUED
        self.attempt = 1
        self.output: Any = None
        self.usage = NO_USAGE
        self.cost_usd = 0.0
        self.model = model
        self.error: str | None = None
        self.queued_at = time.time()
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.transcript: list[Any] = []
        self.scope: anyio.CancelScope | None = None
        # Queue order on the run's queue (see scheduling.queue_priority).
        self.priority: tuple[int, ...] = ()
        # Started by a pipeline stage with a stage after it, for one of the pipeline's first
        # items: its worker may keep the slot for the item's next stage (see Workers._worker).
        self.holds_slot = False
        # (stage, item) when a pipeline stage started the call: a worker holding its slot for
        # that item's next stage is handed that call directly (see Workers.push).
        self.stage_of: tuple[int, int] | None = None
        self.schema: Any = None
        self.cached_source: CallRecord | None = None  # served from the resume source, not executed
        self.deliver: Callable[[bool, Any], None] | None = None
        # Called right after ``deliver``: a future resolved once the script has run the slice
        # that saw this result and queued what it asked for.
        self.handled: Callable[[], asyncio.Future[None]] | None = None
        self.handled_event: asyncio.Future[None] | None = None
        self.delivered = False  # the script has been handed the result (or never will be)
        self.on_delivered: asyncio.Future[None] | None = None  # resolved then, for a worker that waits for it
        self.stop_requested = False
        self.restart_requested = False

    def __repr__(self) -> str:
        return f"LiveCall(index={self.index}, label={self.label!r}, status={self.status.value})"

    def record(self, run_id: str, status: AgentStatus | None = None) -> CallRecord:
        # Positional, in CallRecord's field order: keywords cost twice as much, once per agent.
        return CallRecord(
            run_id, self.index, self.key, self.occurrence,
            (status or self.status)._value_,  # not .value: a property, and this is hot
            self.prompt, self.options, self.label, self.phase, self.output, self.usage.to_dict(),
            self.cost_usd, self.model, self.attempt, self.queued_at, self.started_at, self.finished_at,
            self.error, list(self.transcript),
        )  # fmt: skip

    def has_scope(self) -> bool:
        return self.scope is not None

    def open_scope(self) -> anyio.CancelScope:
        """The scope the dispatcher runs this call under: ``stop`` and ``restart`` cancel it."""
        self.scope = anyio.CancelScope()
        return self.scope

    def take_result(self, source: CallRecord) -> None:
        """Adopt a journaled call's answer instead of executing this one."""
        self.output = source.output
        self.attempt = source.attempts
        self.model = source.model or self.model
        self.started_at, self.finished_at = source.started_at, source.finished_at

    def event_data(self, **extra: Any) -> dict[str, Any]:
        return {
            "index": self.index,
            "label": self.label,
            "phase": self.phase,
            "model": self.model or self.options.get("model"),
            "attempt": self.attempt,
            **extra,
        }


@dataclass
class PhaseStats:
    title: str
    started_at: float | None = None
    finished_at: float | None = None
    counts: dict[str, int] = field(default_factory=dict)
    output_tokens: int = 0
    input_tokens: int = 0
    cost_usd: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        end = self.finished_at or time.time()
        return {
            "title": self.title,
            "agents": dict(self.counts),
            "tokens": {"input": self.input_tokens, "output": self.output_tokens},
            "cost_usd": round(self.cost_usd, 6),
            "elapsed_s": round(end - self.started_at, 3) if self.started_at else 0.0,
        }
