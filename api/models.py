"""Request bodies of the HTTP API (pydantic lives at the edges only) and response shaping."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from runtime import CallRecord, RunRecord, RunRequest

__all__ = ["CheckBody", "RunCreate", "WorkflowPut", "WorkflowRunCreate", "agent_json", "run_json"]


def _json_numbers_only(value: Any) -> Any:
    """Refuse NaN and ±Infinity: Python's json module parses them, but they are not JSON and
    the isolate cannot receive them (the run would fail later with a SyntaxError)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            raise ValueError(f"{item} is not a JSON number (NaN and Infinity are not JSON)")
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return value


class RunCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    script: str | None = Field(None, description="The workflow script (plain JavaScript).")
    workflow: str | None = Field(None, description="Run a saved workflow by name instead of a script.")
    args: Any = Field(None, description="The run's input, any JSON value; omit for `undefined`.")
    options: dict[str, Any] | None = Field(
        None,
        description="backend, model, concurrency, max_agents, budget_tokens, agent_timeout_s, timeout_s, dry_run, "
        "simulate {latency_ms, output_tokens, fail, invalid, responses}",
    )
    resume_from: str | None = Field(None, description="Replay this run's journal (its script and args by default).")
    resume_mode: Literal["reuse", "prefix"] = "reuse"
    idempotency_key: str | None = Field(None, max_length=200)

    _finite = field_validator("args", "options")(_json_numbers_only)

    def to_request(self, idempotency_header: str | None = None) -> RunRequest:
        return RunRequest(
            script=self.script,
            workflow=self.workflow,
            args=self.args,
            has_args="args" in self.model_fields_set,
            options=self.options,
            resume_from=self.resume_from,
            resume_mode=self.resume_mode,
            idempotency_key=self.idempotency_key or idempotency_header,
        )


class WorkflowRunCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    args: Any = None
    options: dict[str, Any] | None = None
    idempotency_key: str | None = Field(None, max_length=200)

    _finite = field_validator("args", "options")(_json_numbers_only)


class CheckBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    script: str
    require_meta: bool = False


class WorkflowPut(BaseModel):
    model_config = ConfigDict(extra="forbid")

    script: str


def run_json(record: RunRecord, *, include_script: bool = False) -> dict[str, Any]:
    data = record.to_dict()
    data.pop("idempotency_key", None)
    data.pop("node", None)
    if not include_script:
        data.pop("script", None)
    if not record.has_args:
        data.pop("args", None)
    data.pop("has_args", None)
    return data


def agent_json(call: CallRecord, *, full: bool = False) -> dict[str, Any]:
    data = call.to_dict()
    data.pop("run_id", None)
    if not full:
        data.pop("transcript", None)
    return data
