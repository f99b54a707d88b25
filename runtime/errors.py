"""The one exception tree of quickflow.

Every error the host raises derives from :class:`QuickflowError`. The HTTP layer maps
each class to a status code and the shared error shape in exactly one place
(``api/_errors.py``); the CLI maps them to exit codes.

    QuickflowError
    ├── ScriptRejected            the static checks refused a script        (422, exit 2)
    ├── InvalidRequest            a request is well-formed but not valid    (400/422)
    ├── NotFound                                                            (404)
    │   ├── RunNotFound
    │   ├── AgentNotFound
    │   └── WorkflowNotFound
    ├── Conflict                                                            (409)
    │   ├── InvalidRunState       a control does not apply in this state
    │   ├── InvalidAgentState     an agent control does not apply in the agent's state
    │   └── ResumeConflict        the source run still has live agents
    ├── Unauthorized                                                        (401)
    ├── TooManyStuckRuns          the owner's scripts hold threads stuck in a built-in call (429)
    ├── ConfigError               the configuration cannot be used
    └── BackendError              an agent backend failed one attempt
        ├── RetryableBackendError     worth another try (429, 529, 5xx, connection)
        └── TerminalBackendError      not worth another try (auth, bad request)

Script-level failures (an uncaught exception in the JS, a limit hit by the isolate) are not
exceptions of the host: they are data (``sandbox.ScriptFailure``) that end a run as ``failed``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = [
    "QuickflowError",
    "ScriptRejected",
    "InvalidRequest",
    "NotFound",
    "RunNotFound",
    "AgentNotFound",
    "WorkflowNotFound",
    "Conflict",
    "InvalidRunState",
    "InvalidAgentState",
    "ResumeConflict",
    "Unauthorized",
    "TooManyStuckRuns",
    "stuck_slices_message",
    "ConfigError",
    "BackendError",
    "RetryableBackendError",
    "TerminalBackendError",
]


class QuickflowError(Exception):
    """Base class. ``code`` is the stable machine-readable name used in the error JSON."""

    code = "error"

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}


class ScriptRejected(QuickflowError):
    """The static checks refused the script; ``diagnostics`` say where and why."""

    code = "script_rejected"

    def __init__(self, diagnostics: Sequence[Any], message: str | None = None) -> None:
        self.diagnostics = list(diagnostics)
        first = self.diagnostics[0] if self.diagnostics else None
        if message is None:
            message = (
                f"script rejected: {first.line}:{first.column}: {first.message}"
                if first is not None
                else "script rejected"
            )
        super().__init__(message, details={"diagnostics": [d.to_dict() for d in self.diagnostics]})


class InvalidRequest(QuickflowError):
    code = "invalid_request"


class NotFound(QuickflowError):
    code = "not_found"


class RunNotFound(NotFound):
    code = "run_not_found"

    def __init__(self, run_id: str) -> None:
        super().__init__(f"no run with id {run_id!r}")
        self.run_id = run_id


class AgentNotFound(NotFound):
    code = "agent_not_found"

    def __init__(self, run_id: str, index: int) -> None:
        super().__init__(f"run {run_id!r} has no agent with index {index}")
        self.run_id = run_id
        self.index = index


class WorkflowNotFound(NotFound):
    code = "workflow_not_found"

    def __init__(self, name: str, available: Sequence[str] = ()) -> None:
        names = ", ".join(sorted(available)) or "none"
        super().__init__(f"no saved workflow named {name!r} (available: {names})")
        self.name = name


class Conflict(QuickflowError):
    code = "conflict"


class InvalidRunState(Conflict):
    code = "invalid_run_state"

    def __init__(self, run_id: str, status: str, action: str) -> None:
        super().__init__(f"cannot {action} run {run_id!r}: it is {status}")
        self.run_id = run_id
        self.status = status


class InvalidAgentState(Conflict):
    code = "invalid_agent_state"

    def __init__(self, run_id: str, index: int, status: str, action: str, allowed: str) -> None:
        super().__init__(
            f"cannot {action} agent {index} of run {run_id!r}: the agent is {status} (only {allowed} agents can be)"
        )
        self.run_id = run_id
        self.index = index
        self.status = status


class ResumeConflict(Conflict):
    code = "resume_conflict"

    def __init__(self, run_id: str) -> None:
        super().__init__(
            f"run {run_id!r} still has live agents; cancel it or wait for it to stop before resuming from it"
        )
        self.run_id = run_id


class Unauthorized(QuickflowError):
    code = "unauthorized"


class TooManyStuckRuns(QuickflowError):
    """The owner's runs left slices stuck inside single built-in calls, still running on their
    threads (see ``sandbox.SlicePool``): no new run until fewer are."""

    code = "too_many_stuck_runs"
    retry_after_s = 30

    def __init__(self, stuck: int, limit: int) -> None:
        super().__init__(stuck_slices_message(stuck, limit) + "; no new run starts until fewer are",
                         details={"stuck": stuck, "limit": limit})


def stuck_slices_message(stuck: int, limit: int) -> str:
    return (f"{stuck} slice(s) of this owner's runs are stuck inside a single built-in call (the limit "
            f"is {limit}), each holding a thread and its JS heap until the call returns")


class ConfigError(QuickflowError):
    code = "config_error"


class BackendError(QuickflowError):
    """One attempt of an agent call failed in its backend."""

    code = "backend_error"

    def __init__(self, message: str, *, retry_after: float | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.status = status


class RetryableBackendError(BackendError):
    code = "backend_retryable"


class TerminalBackendError(BackendError):
    code = "backend_terminal"
