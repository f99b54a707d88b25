"""Per-run options: parsed and bounded against the server's limits, as a frozen value."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .backends.simulate import check_simulate_settings
from .errors import InvalidRequest
from .limits import Limits

__all__ = ["BACKENDS", "RunOptions"]

BACKENDS = ("simulate", "anthropic", "claude-code")

_KNOWN = {
    "backend", "model", "concurrency", "max_agents", "budget_tokens", "agent_timeout_s", "timeout_s",
    "dry_run", "simulate", "workspace",
}


@dataclass(frozen=True)
class RunOptions:
    backend: str = "simulate"
    model: str | None = None
    concurrency: int = 16
    max_agents: int = 1000
    budget_tokens: int | None = None
    agent_timeout_s: float = 1800.0
    timeout_s: float = 86400.0
    dry_run: bool = False
    simulate: dict[str, Any] = field(default_factory=dict)
    workspace: str | None = None

    def to_dict(self) -> dict[str, Any]:
        # Field by field, and only ``simulate`` copied deeply (the only field that holds
        # containers): asdict() copies everything recursively, 50 us on every submit.
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["simulate"] = copy.deepcopy(self.simulate)
        return data

    @property
    def effective_backend(self) -> str:
        """Dry runs never spend tokens: they run on the simulate backend."""
        return "simulate" if self.dry_run else self.backend

    @classmethod
    def parse(cls, data: Mapping[str, Any] | None, limits: Limits, *, default_backend: str = "simulate") -> RunOptions:
        """Validate request options; raise InvalidRequest naming the bad option and the reason."""
        data = dict(data or {})
        unknown = sorted(set(data) - _KNOWN)
        if unknown:
            raise InvalidRequest(f"unknown run option(s): {', '.join(unknown)} (known: {', '.join(sorted(_KNOWN))})")
        backend = data.get("backend") or default_backend
        if backend not in BACKENDS:
            raise InvalidRequest(f"options.backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
        model = data.get("model")
        if model is not None and (not isinstance(model, str) or not model):
            raise InvalidRequest("options.model must be a non-empty string")
        budget = data.get("budget_tokens")
        if budget is not None:
            budget = _int(budget, "budget_tokens", low=0, high=None)
        workspace = data.get("workspace")
        if workspace is not None and not isinstance(workspace, str):
            raise InvalidRequest("options.workspace must be a path string")
        dry_run = data.get("dry_run", False)
        if not isinstance(dry_run, bool):
            raise InvalidRequest("options.dry_run must be true or false")
        return cls(
            backend=backend,
            model=model,
            concurrency=_int(data.get("concurrency", limits.concurrency), "concurrency", 1, limits.max_concurrency),
            max_agents=_int(data.get("max_agents", limits.max_agents), "max_agents", 0, limits.max_max_agents),
            budget_tokens=budget,
            agent_timeout_s=_number(
                data.get("agent_timeout_s", limits.agent_timeout_s), "agent_timeout_s", limits.max_agent_timeout_s
            ),
            timeout_s=_number(data.get("timeout_s", limits.run_timeout_s), "timeout_s", limits.max_run_timeout_s),
            dry_run=dry_run,
            simulate=check_simulate_settings(data.get("simulate")),
            workspace=workspace,
        )


def _int(value: Any, name: str, low: int, high: int | None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"options.{name} must be an integer")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise InvalidRequest(f"options.{name} must be {bound} (got {value})")
    return value


def _number(value: Any, name: str, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequest(f"options.{name} must be a number of seconds")
    if not 0 < value <= high:
        raise InvalidRequest(f"options.{name} must be greater than 0 and at most {high:g} (got {value})")
    return float(value)
