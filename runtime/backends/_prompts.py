"""What every model-backed agent is told: the workflow-subagent system prompt and its profile.

Shared by the anthropic and claude-code backends and by the simulate backend's dry-run estimate.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from .. import models
from ..errors import TerminalBackendError
from ._protocol import AgentRequest

__all__ = ["SYSTEM_PROMPT", "profile_and_model", "profile_for"]

P = TypeVar("P")


def profile_for(profiles: Mapping[str, P], agent_type: str | None) -> P | None:
    """The agent profile named by ``agentType``; TerminalBackendError when none is configured."""
    if not agent_type:
        return None
    try:
        return profiles[agent_type]
    except KeyError:
        names = ", ".join(sorted(profiles)) or "none"
        raise TerminalBackendError(f"unknown agentType {agent_type!r} (configured profiles: {names})") from None

SYSTEM_PROMPT = """\
You are a subagent carrying out one step of an automated workflow. No human is present: nobody \
reads your intermediate messages or answers questions. Never ask for clarification or \
confirmation; when something is ambiguous, make the most reasonable assumption and proceed.

Your final message is handed verbatim to a program. It must contain only the requested \
content: no preamble, no explanation of what you did, no closing remarks, and no Markdown code \
fences around the answer unless the task explicitly asks for them."""


def profile_and_model(
    profiles: Mapping[str, P], request: AgentRequest, default_model: str, aliases: Mapping[str, str] | None
) -> tuple[P | None, str]:
    """The request's profile and the model to send: the request's, else the profile's, else the
    run's default (``request.settings["default_model"]``), else the backend's."""
    profile = profile_for(profiles, request.agent_type)
    profile_model: Any = getattr(profile, "model", None) if profile is not None else None
    model = models.choose_model(
        request.model,
        profile_model=profile_model,
        default=str(request.settings.get("default_model") or default_model),
        aliases=aliases,
    )
    return profile, model
