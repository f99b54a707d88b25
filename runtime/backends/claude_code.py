"""The optional ``claude-code`` backend: each agent is one Claude Code session via ``claude-agent-sdk``.

The session works in the run's workspace directory with an explicit tool allowlist. It is
unattended: ``permission_mode="dontAsk"`` denies every tool call that the allowlist does not
pre-approve instead of prompting, and ``setting_sources=[]`` keeps the workspace's own
``.claude/settings.json`` (which could add hooks or permissions) out of it.

``claude_agent_sdk`` is imported lazily so the core never needs the extra
(``pip install 'quickflow[claude-code]'``).

With ``isolation: "worktree"`` the session runs in a fresh ``git worktree`` of the workspace's
HEAD. A worktree the agent changed is kept and its path reported in the transcript (entry
``{"type": "worktree", ...}``); an unchanged one is removed.

Cancelling :meth:`ClaudeCodeBackend.call` (the dispatcher's timeout) stops the CLI process; the
SDK gives it a few seconds' grace before terminating it, so cancellation completes within ~10 s.

The CLI retries API errors itself; each retry it reports is forwarded to ``on_retry`` and recorded
in the transcript, and ``max_retries`` bounds them (``CLAUDE_CODE_MAX_RETRIES``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import inspect
import json
import shutil
import tempfile
from collections import deque
from collections.abc import AsyncGenerator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import anyio

from .. import models
from ..errors import ConfigError, TerminalBackendError
from ._protocol import AgentRequest, AgentResult, Usage
from ._prompts import SYSTEM_PROMPT, profile_and_model
from .anthropic import ProfileLike, RetryEvent, RetryHook

if TYPE_CHECKING:
    from ..config import Settings

__all__ = ["ClaudeCodeBackend", "DEFAULT_TOOLS"]

# Read-only by default: a workflow that wants an agent to edit files says so in a profile.
DEFAULT_TOOLS: tuple[str, ...] = ("Read", "Grep", "Glob")
_EFFORTS = ("low", "medium", "high", "xhigh", "max")


class ClaudeCodeBackend:
    """Agent backend that runs a Claude Code session per agent.

    ``workspace`` is the default working directory; a run overrides it with
    ``request.settings["workspace"]``. ``cli_path`` pins the ``claude`` binary (else the SDK's
    bundled one). ``home`` gives the CLI its own ``HOME`` (its ``~/.claude`` state).
    ``tools`` is the allowlist for agents whose profile names none; tool patterns such as
    ``"Bash(git status:*)"`` are allowed. ``env`` is added to the CLI's environment.
    """

    name = "claude-code"

    def __init__(
        self,
        *,
        workspace: str | Path | None = None,
        cli_path: str | Path | None = None,
        api_key: str | None = None,
        base_url: str | None = None,
        home: str | Path | None = None,
        default_model: str = "sonnet",
        aliases: Mapping[str, str] | None = None,
        prices: Mapping[str, models.PriceLike] | None = None,
        profiles: Mapping[str, ProfileLike] | None = None,
        tools: Sequence[str] = DEFAULT_TOOLS,
        max_turns: int | None = None,
        max_retries: int = 4,
        env: Mapping[str, str] | None = None,
        worktree_root: str | Path | None = None,
        on_retry: RetryHook | None = None,
    ) -> None:
        try:
            import claude_agent_sdk  # noqa: F401 - fail at startup, not at the first agent
        except ImportError as exc:
            raise ConfigError(
                "the claude-code backend needs the optional extra: pip install 'quickflow[claude-code]'"
            ) from exc
        self._workspace = Path(workspace) if workspace else None
        self._cli_path = Path(cli_path) if cli_path else None
        self._default_model = default_model
        self._aliases = dict(aliases or {})
        self._prices = dict(prices or {})
        self._profiles = dict(profiles or {})
        self._tools = tuple(tools)
        self._max_turns = max_turns
        self._worktree_root = Path(worktree_root) if worktree_root else None
        self._on_retry = on_retry
        self._git_locks: dict[Path, anyio.Lock] = {}
        self._env: dict[str, str] = {
            # Unattended server use: no update checks, telemetry or other side traffic.
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "DISABLE_TELEMETRY": "1",
            "DISABLE_AUTOUPDATER": "1",
            "CLAUDE_CODE_MAX_RETRIES": str(max(0, max_retries)),
        }
        if api_key:
            self._env["ANTHROPIC_API_KEY"] = api_key
        if base_url:
            self._env["ANTHROPIC_BASE_URL"] = base_url
        if home:
            self._env["HOME"] = str(home)
        self._env.update(env or {})

    @staticmethod
    def available() -> bool:
        """Whether the optional ``claude-agent-sdk`` package is installed."""
        return importlib.util.find_spec("claude_agent_sdk") is not None

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> ClaudeCodeBackend:
        """Build from server settings; ``overrides`` (e.g. ``cli_path``, ``workspace``) win.

        Reads ``settings.anthropic`` (key, base URL, retries), the model, price and profile
        tables, and, when the settings have a ``claude_code`` section, its ``cli_path``,
        ``workspace``, ``home``, ``tools``, ``max_turns`` and ``worktree_root``.
        """
        config = settings.anthropic
        kwargs: dict[str, Any] = {
            "api_key": config.api_key.get_secret_value() if config.api_key else None,
            "base_url": config.base_url,
            "max_retries": config.max_retries,
            "default_model": settings.default_model,
            "aliases": settings.models,
            "prices": settings.prices,
            "profiles": settings.profiles,
        }
        section = getattr(settings, "claude_code", None)
        for key in ("cli_path", "workspace", "home", "tools", "max_turns", "worktree_root"):
            value = getattr(section, key, None)
            if value is not None:
                kwargs[key] = value
        kwargs.update(overrides)
        return cls(**kwargs)

    async def call(self, request: AgentRequest) -> AgentResult:
        """Run one session; raises TerminalBackendError when it ends without a result."""
        workspace = request.settings.get("workspace") or self._workspace
        if not workspace:
            raise TerminalBackendError("the claude-code backend needs a workspace directory (run setting 'workspace')")
        workspace = Path(workspace).resolve()
        if not workspace.is_dir():
            raise TerminalBackendError(f"workspace {workspace} is not a directory")
        if request.isolation not in (None, "worktree"):
            raise TerminalBackendError(f"unknown isolation {request.isolation!r}; only 'worktree' is supported")
        if request.isolation != "worktree":
            return await self._session(request, workspace, [])
        top, path = await self._add_worktree(request, workspace)
        info: dict[str, Any] = {"type": "worktree", "path": str(path)}
        try:
            result = await self._session(request, path / workspace.relative_to(top), [])
        except TerminalBackendError as exc:
            exc.details["worktree"] = info  # completed by the `finally` below, before it propagates
            raise
        finally:
            info.update(await self._release_worktree(top, path))
        return dataclasses.replace(result, transcript=(*result.transcript, info))

    # -- one session ----------------------------------------------------------------------------

    async def _session(self, request: AgentRequest, cwd: Path, transcript: list[Mapping[str, Any]]) -> AgentResult:
        from claude_agent_sdk import (
            AssistantMessage,
            ClaudeAgentOptions,
            ClaudeSDKError,
            ResultMessage,
            SystemMessage,
            query,
        )

        profile, model = profile_and_model(self._profiles, request, self._default_model, self._aliases)
        allowed = list(getattr(profile, "tools", None) or self._tools)
        append = SYSTEM_PROMPT + (
            f"\n\n{profile.system_prompt.strip()}" if profile is not None and profile.system_prompt else ""
        )
        stderr_tail: deque[str] = deque(maxlen=20)
        extra: dict[str, Any] = {"effort": request.effort} if request.effort in _EFFORTS else {}
        options = ClaudeAgentOptions(
            cwd=str(cwd),
            cli_path=str(self._cli_path) if self._cli_path else None,
            model=model,
            # Claude Code's own prompt teaches tool use; ours adds the unattended-workflow rules.
            system_prompt={"type": "preset", "preset": "claude_code", "append": append},
            # `tools` is what exists at all (bare names); `allowed_tools` what runs without asking.
            tools=sorted({name.split("(", 1)[0] for name in allowed}),
            allowed_tools=allowed,
            permission_mode="dontAsk",
            setting_sources=[],
            # Prompts come from scripts: an `@/path` in them must not make the CLI read a file.
            verbatim_prompts=True,
            max_turns=self._max_turns,
            env=dict(self._env),
            stderr=stderr_tail.append,
            **extra,
        )
        if request.effort and request.effort not in _EFFORTS:
            transcript.append(
                {"type": "warning", "message": f"effort {request.effort!r} is not a known level; ignored"}
            )
        transcript.append(
            {"type": "request", "prompt": _prompt(request), "model": model, "cwd": str(cwd), "tools": allowed}
        )

        result: Any = None
        session_model = model
        try:
            # aclosing: a cancelled agent (the dispatcher's timeout) must stop the CLI process now.
            # (query() is typed as an AsyncIterator but is an async generator, which aclosing needs.)
            stream = cast("AsyncGenerator[Any, None]", query(prompt=_prompt(request), options=options))
            async with contextlib.aclosing(stream) as messages:
                async for message in messages:
                    if isinstance(message, SystemMessage) and message.subtype == "api_retry":
                        await self._report_retry(request, message.data, transcript)
                        continue
                    if isinstance(message, AssistantMessage) and message.model != "<synthetic>":
                        session_model = message.model
                    if isinstance(message, ResultMessage):
                        result = message
                    transcript.append(_jsonable(message))
        except ClaudeSDKError as exc:
            if result is None or not result.is_error:
                detail = "; ".join(stderr_tail) or str(exc)
                raise TerminalBackendError(f"claude code session failed: {detail}") from exc
        if result is None:
            raise TerminalBackendError("claude code session ended without a result")
        if result.is_error:
            reason = result.result or "; ".join(result.errors or []) or result.subtype
            raise TerminalBackendError(
                f"claude code session failed ({result.subtype}): {reason}", status=result.api_error_status
            )

        text = (result.result or "").strip()
        usage = Usage(
            input_tokens=int((result.usage or {}).get("input_tokens") or 0),
            output_tokens=int((result.usage or {}).get("output_tokens") or 0),
            cache_read_tokens=int((result.usage or {}).get("cache_read_input_tokens") or 0),
            cache_write_tokens=int((result.usage or {}).get("cache_creation_input_tokens") or 0),
        )
        return AgentResult(
            text=text,
            usage=usage,
            model=session_model,
            stop_reason=result.stop_reason or "end_turn",
            cost_usd=self._cost(session_model, usage, result),
            data=_parse_json_text(text) if request.schema is not None else None,
            transcript=tuple(transcript),
        )

    async def _report_retry(
        self, request: AgentRequest, data: Mapping[str, Any], transcript: list[Mapping[str, Any]]
    ) -> None:
        event = RetryEvent(
            attempt=int(data.get("attempt") or 0),
            delay_s=float(data.get("retry_delay_ms") or 0) / 1000,
            reason=str(data.get("error") or "api error"),
            status=data.get("error_status"),
        )
        transcript.append(event.to_dict())
        if self._on_retry is not None:
            outcome = self._on_retry(request, event)
            if inspect.isawaitable(outcome):
                await outcome

    def _cost(self, model: str, usage: Usage, result: Any) -> float:
        # Our configured price table when it knows the model, so all backends bill alike;
        # otherwise the CLI's own figure (it also covers helper models the session used).
        if models.price_for(model, self._prices, aliases=self._aliases) is not None:
            return models.cost_usd(model, usage, prices=self._prices, aliases=self._aliases)
        return float(result.total_cost_usd or 0.0)

    # -- worktree isolation ---------------------------------------------------------------------

    async def _add_worktree(self, request: AgentRequest, workspace: Path) -> tuple[Path, Path]:
        """(repository top level, new detached worktree of its HEAD)."""
        top = Path((await _git(workspace, "rev-parse", "--show-toplevel")).strip())
        root = self._worktree_root or Path(tempfile.gettempdir())
        root.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix=f"quickflow-{request.run_id}-{request.index}-", dir=root))
        try:
            async with self._git_lock(top):
                await _git(top, "worktree", "add", "--detach", str(path), "HEAD")
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
        return top, path

    async def _release_worktree(self, top: Path, path: Path) -> dict[str, Any]:
        """Keep a changed worktree (its path is the agent's output), remove an unchanged one."""
        # Shielded and bounded: a cancelled agent still cleans up, but never hangs on git.
        with anyio.CancelScope(shield=True), anyio.move_on_after(60):
            try:
                changes = (await _git(path, "status", "--porcelain")).splitlines()
                if changes:
                    return {"kept": True, "changes": changes}
                async with self._git_lock(top):
                    await _git(top, "worktree", "remove", "--force", str(path))
            except TerminalBackendError as exc:
                # Never let cleanup mask the agent's own outcome; leave the worktree for a human.
                return {"kept": True, "changes": None, "note": f"cleanup failed: {exc}"}
            shutil.rmtree(path, ignore_errors=True)
            return {"kept": False}
        return {"kept": True, "changes": None, "note": "cleanup timed out"}

    def _git_lock(self, top: Path) -> anyio.Lock:
        # Concurrent `git worktree` commands on one repository race on its administrative files.
        return self._git_locks.setdefault(top, anyio.Lock())


async def _git(cwd: Path, *args: str) -> str:
    try:
        done = await anyio.run_process(["git", "-C", str(cwd), *args], check=False)
    except OSError as exc:
        raise TerminalBackendError(f"isolation 'worktree' needs git: {exc}") from exc
    if done.returncode != 0:
        message = done.stderr.decode(errors="replace").strip()
        raise TerminalBackendError(
            f"git {' '.join(args[:2])} failed in {cwd}: {message} "
            "(isolation 'worktree' needs a git workspace with a commit)"
        )
    return done.stdout.decode(errors="replace")


def _prompt(request: AgentRequest) -> str:
    """The task, plus (with a schema) the JSON-only instruction and any rejected earlier answers."""
    if request.schema is None:
        return request.prompt
    parts = [
        request.prompt,
        "Your final message must be only a JSON object that matches this JSON Schema, "
        "with no code fences and no other text:\n" + json.dumps(request.schema, indent=2),
    ]
    for number, correction in enumerate(request.corrections, start=1):
        parts.append(
            f"Earlier answer {number} was rejected.\nAnswer:\n{correction.output or '(empty)'}\n"
            f"Validation error: {correction.error}\nDo not repeat this mistake."
        )
    return "\n\n".join(parts)


def _parse_json_text(text: str) -> Any:
    """The JSON object in ``text``: the whole text, a fenced block, or the outermost braces; else None."""
    body = text.strip()
    if body.startswith("```"):
        body = body.split("\n", 1)[1] if "\n" in body else ""
        body = body.rsplit("```", 1)[0]
    for candidate in (body, body[body.find("{") : body.rfind("}") + 1]):
        try:
            return json.loads(candidate)
        except ValueError:
            continue
    return None


def _jsonable(message: Any) -> dict[str, Any]:
    data = (
        dataclasses.asdict(message)
        if dataclasses.is_dataclass(message) and not isinstance(message, type)
        else {"value": message}
    )
    entry: dict[str, Any] = json.loads(json.dumps(data, default=str))
    entry["type"] = type(message).__name__.removesuffix("Message").lower()  # "assistant", "result", ...
    return entry
