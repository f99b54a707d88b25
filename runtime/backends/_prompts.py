"""What every model-backed agent is told: the workflow-subagent system prompt and its profile.

Shared by the anthropic and claude-code backends and by the simulate backend's dry-run estimate.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from ..errors import TerminalBackendError

__all__ = ["SYSTEM_PROMPT", "profile_for"]

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
