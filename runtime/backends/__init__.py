"""Agent backends behind one protocol: simulate (offline), anthropic, claude-code (optional)."""

from typing import Any

from ._protocol import AgentBackend, AgentRequest, AgentResult, Correction, Usage
from .simulate import SimulateBackend

__all__ = ["AgentBackend", "AgentRequest", "AgentResult", "Correction", "SimulateBackend", "Usage", "build_backends"]


def build_backends(settings: Any, *, on_retry: Any = None) -> dict[str, AgentBackend]:
    """The backends a server or CLI process offers, from configuration.

    simulate is always there; anthropic when an API key or a base URL is configured (the
    official SDK also reads ``ANTHROPIC_API_KEY``); claude-code when its optional extra is
    installed. ``on_retry(request, event)`` hears about every transport retry.
    """
    import os

    backends: dict[str, AgentBackend] = {"simulate": SimulateBackend()}
    anthropic_config = settings.anthropic
    if anthropic_config.api_key or anthropic_config.base_url or os.environ.get("ANTHROPIC_API_KEY"):
        from .anthropic import AnthropicBackend

        backends["anthropic"] = AnthropicBackend.from_settings(settings, on_retry=on_retry)
    try:
        from .claude_code import ClaudeCodeBackend
    except ImportError:
        pass
    else:
        factory = getattr(ClaudeCodeBackend, "from_settings", None)
        available = getattr(ClaudeCodeBackend, "available", None)
        if factory is not None and (available is None or available()):
            backends["claude-code"] = factory(settings, on_retry=on_retry)
    return backends
