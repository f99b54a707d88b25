"""Agent backends behind one protocol: simulate (offline), anthropic, claude-code (optional)."""

from collections.abc import Callable
from typing import Any

import anyio
import anyio.to_thread

from ._protocol import NO_USAGE, AgentBackend, AgentRequest, AgentResult, Correction, Usage
from .simulate import SimulateBackend

__all__ = ["NO_USAGE", "AgentBackend", "AgentRequest", "AgentResult", "Correction", "LazyBackend", "SimulateBackend", "Usage", "build_backends"]


class LazyBackend:
    """A backend built on first use, off the event loop: importing an SDK takes seconds, and a
    process that never calls it (a CLI run on the simulate backend) should not pay for it."""

    def __init__(self, name: str, factory: Callable[[], AgentBackend]) -> None:
        self.name = name
        self._factory = factory
        self._backend: AgentBackend | None = None
        self._lock = anyio.Lock()

    async def call(self, request: AgentRequest) -> AgentResult:
        if self._backend is None:
            async with self._lock:
                if self._backend is None:
                    self._backend = await anyio.to_thread.run_sync(self._factory)
        return await self._backend.call(request)

    async def aclose(self) -> None:
        close = getattr(self._backend, "aclose", None)
        if close is not None:
            await close()


def build_backends(settings: Any, *, on_retry: Any = None) -> dict[str, AgentBackend]:
    """The backends a server or CLI process offers, from configuration.

    simulate is always there; anthropic when an API key or a base URL is configured (the
    official SDK also reads ``ANTHROPIC_API_KEY``); claude-code when its optional extra is
    installed. ``on_retry(request, event)`` hears about every transport retry. The SDK-backed
    ones are built lazily, on their first call.
    """
    import importlib.util
    import os

    backends: dict[str, AgentBackend] = {"simulate": SimulateBackend()}
    anthropic_config = settings.anthropic
    if anthropic_config.api_key or anthropic_config.base_url or os.environ.get("ANTHROPIC_API_KEY"):

        def anthropic_backend() -> AgentBackend:
            from .anthropic import AnthropicBackend

            return AnthropicBackend.from_settings(settings, on_retry=on_retry)

        backends["anthropic"] = LazyBackend("anthropic", anthropic_backend)
    if importlib.util.find_spec("claude_agent_sdk") is not None:

        def claude_code_backend() -> AgentBackend:
            from .claude_code import ClaudeCodeBackend

            return ClaudeCodeBackend.from_settings(settings, on_retry=on_retry)

        backends["claude-code"] = LazyBackend("claude-code", claude_code_backend)
    return backends
