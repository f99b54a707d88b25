"""Journal keys and resume matching (SPEC §3.3), as pure functions over call records.

A call's key is the SHA-256 of the canonical JSON of what determines its answer:
``{prompt, schema, model, effort, agentType, isolation}`` (label, phase and timeout excluded).
Together with its *occurrence* — the n-th call with that key in the run, in issue order — it
names the call across replays, even when a fan-out completes in a different order.
"""

from __future__ import annotations

import hashlib
import json
from json.encoder import encode_basestring
from collections.abc import Iterable, Mapping
from typing import Any

from .state import AgentStatus
from .store import CallRecord

__all__ = ["Occurrences", "RESUME_MODES", "ResumePlan", "call_key", "canonical_json"]

RESUME_MODES = ("reuse", "prefix")


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def call_key(
    prompt: str,
    *,
    schema: Mapping[str, Any] | None = None,
    model: str | None = None,
    effort: str | None = None,
    agent_type: str | None = None,
    isolation: str | None = None,
) -> str:
    # Exactly canonical_json({prompt, schema, model, effort, agentType, isolation}), written out
    # with the keys in sorted order: sorting and encoding a dict per call was a hot spot.
    if schema is None and model is None and effort is None and agent_type is None and isolation is None:
        text = f"{_NO_OPTIONS_BEFORE}{encode_basestring(prompt)}{_NO_OPTIONS_AFTER}"  # most calls
        return hashlib.sha256(text.encode()).hexdigest()
    text = (
        f'{{"agentType":{_json(agent_type)},"effort":{_json(effort)},"isolation":{_json(isolation)},'
        f'"model":{_json(model)},"prompt":{encode_basestring(prompt)},'
        f'"schema":{"null" if schema is None else canonical_json(schema)}}}'
    )
    return hashlib.sha256(text.encode()).hexdigest()


_NO_OPTIONS_BEFORE = '{"agentType":null,"effort":null,"isolation":null,"model":null,"prompt":'
_NO_OPTIONS_AFTER = ',"schema":null}'


def _json(value: str | None) -> str:
    # The options are strings or absent; anything else goes through the full encoder.
    if value is None:
        return "null"
    if type(value) is str:
        return encode_basestring(value)
    return canonical_json(value)


def _completed(call: CallRecord) -> bool:
    # A completed call whose answer was null (stopped, timed out) is not worth reusing.
    return call.status in (AgentStatus.COMPLETED, AgentStatus.CACHED) and call.output is not None


class ResumePlan:
    """Decides, call by call, whether a new run may take a result from a source run's journal.

    ``reuse``: any ``(key, occurrence)`` that completed in the source is served from it.
    ``prefix``: in issue order, served until the first call without a completed result; that
    call and every later one run live (the reference runtime's behaviour).
    """

    def __init__(self, source_calls: Iterable[CallRecord], mode: str = "reuse") -> None:
        if mode not in RESUME_MODES:
            raise ValueError(f"resume mode must be one of {', '.join(RESUME_MODES)}, not {mode!r}")
        self.mode = mode
        self._done: dict[tuple[str, int], CallRecord] = {
            (c.key, c.occurrence): c for c in source_calls if _completed(c)
        }
        self._broken = False

    def __len__(self) -> int:
        return len(self._done)

    def lookup(self, key: str, occurrence: int) -> CallRecord | None:
        """The source call to serve for this new call, or None to run it live. Call in issue order."""
        if self._broken:
            return None
        found = self._done.get((key, occurrence))
        if found is None and self.mode == "prefix":
            self._broken = True
        return found


class Occurrences:
    """Counts calls per key in issue order, to name each call's occurrence."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def next(self, key: str) -> int:
        n = self._counts.get(key, 0)
        self._counts[key] = n + 1
        return n
