"""The ``anthropic`` backend: each agent is one Messages API conversation through the official SDK.

What it owns (see ``_protocol``): building the request, transport retries, usage, cost and the
transcript. What it leaves to the dispatcher: timeouts (a cancel scope around :meth:`call`),
schema validation and the corrective re-prompts (it renders ``request.corrections`` back into the
conversation, but never decides to retry on its own).

Structured output uses one forced tool whose ``input_schema`` is the agent's schema: that works on
every model. Extended thinking cannot be combined with a forced tool, so when ``effort`` turns
thinking on, the tool is offered with ``tool_choice: auto`` and the model is told to call it; a
JSON answer in plain text is accepted too and left for the dispatcher to validate.

Retries are done here, not by the SDK (``max_retries=0``), so that each one is visible: it is
recorded in the transcript and reported through the optional ``on_retry`` hook.
"""

from __future__ import annotations

import email.utils
import inspect
import json
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import anthropic
import anyio

from .. import models
from ..errors import TerminalBackendError
from ._prompts import SYSTEM_PROMPT, profile_and_model
from ._protocol import AgentRequest, AgentResult, Correction, Usage

if TYPE_CHECKING:
    from ..config import Settings

__all__ = ["AnthropicBackend", "RetryEvent", "RetryHook", "SYSTEM_PROMPT", "TOOL_NAME"]

TOOL_NAME = "structured_output"

_STRUCTURED_NOTE = f"""

When a `{TOOL_NAME}` tool is available, deliver your answer by calling it exactly once with an \
object that matches its input schema. Do not answer in plain text."""

# Error types that the API also sends inside a 200 stream (an `error` SSE event); worth a retry.
_RETRYABLE_ERROR_TYPES = {"overloaded_error": 529, "api_error": 500, "rate_limit_error": 429, "timeout_error": 504}


@dataclass(frozen=True)
class RetryEvent:
    """One failed transport attempt that will be retried after ``delay_s`` seconds."""

    attempt: int
    delay_s: float
    reason: str
    status: int | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "retry",
            "attempt": self.attempt,
            "delay_s": round(self.delay_s, 3),
            "reason": self.reason,
            "status": self.status,
        }


RetryHook = Callable[[AgentRequest, RetryEvent], Awaitable[None] | None]


class ProfileLike(Protocol):
    """What this backend reads from an agent profile (``runtime.config.AgentProfile`` fits)."""

    @property
    def system_prompt(self) -> str | None: ...
    @property
    def model(self) -> str | None: ...


@dataclass(frozen=True)
class _Failure:
    retryable: bool
    reason: str
    status: int | None
    retry_after: float | None = None


class AnthropicBackend:
    """Agent backend over ``anthropic.AsyncAnthropic``.

    ``default_model`` is the model for agents that name none (or ``inherit``); a run can override
    it with ``request.settings["default_model"]``. ``aliases``, ``prices`` and ``profiles`` are the
    configured tables (``Settings.models``, ``Settings.prices``, ``Settings.profiles``).
    ``client`` replaces the SDK client (tests); it must have ``max_retries=0``.
    """

    name = "anthropic"

    def __init__(
        self,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        max_retries: int = 4,
        max_retry_wait_s: float = 60.0,
        max_tokens: int = 8192,
        default_model: str = "sonnet",
        aliases: Mapping[str, str] | None = None,
        prices: Mapping[str, models.PriceLike] | None = None,
        profiles: Mapping[str, ProfileLike] | None = None,
        on_retry: RetryHook | None = None,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 30.0,
        client: anthropic.AsyncAnthropic | None = None,
    ) -> None:
        self._client = client or anthropic.AsyncAnthropic(api_key=api_key, base_url=base_url, max_retries=0)
        # The SDK falls back to ANTHROPIC_API_KEY / ANTHROPIC_AUTH_TOKEN; with neither it would fail
        # every call with a bare TypeError, so say plainly what to configure instead.
        self._missing_key = client is None and not (self._client.api_key or self._client.auth_token)
        self._max_retries = max(0, max_retries)
        self._max_retry_wait_s = max(0.0, max_retry_wait_s)
        self._max_tokens = max_tokens
        self._default_model = default_model
        self._aliases = dict(aliases or {})
        self._prices = dict(prices or {})
        self._profiles = dict(profiles or {})
        self._on_retry = on_retry
        self._backoff_base_s = backoff_base_s
        self._backoff_max_s = backoff_max_s
        self._random = random.Random()

    @classmethod
    def from_settings(
        cls, settings: Settings, *, on_retry: RetryHook | None = None, **overrides: Any
    ) -> AnthropicBackend:
        """Build from server settings: ``settings.anthropic`` plus the model, price and profile tables."""
        config = settings.anthropic
        kwargs: dict[str, Any] = {
            "api_key": config.api_key.get_secret_value() if config.api_key else None,
            "base_url": config.base_url,
            "max_retries": config.max_retries,
            "max_retry_wait_s": config.max_retry_wait_s,
            "max_tokens": config.max_tokens,
            "default_model": settings.default_model,
            "aliases": settings.models,
            "prices": settings.prices,
            "profiles": settings.profiles,
            "on_retry": on_retry,
        }
        kwargs.update(overrides)
        return cls(**kwargs)

    async def aclose(self) -> None:
        """Close the HTTP connection pool."""
        await self._client.close()

    async def __aenter__(self) -> AnthropicBackend:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- the call -------------------------------------------------------------------------------

    async def call(self, request: AgentRequest) -> AgentResult:
        """Run one agent attempt; raises TerminalBackendError when it cannot produce output."""
        if self._missing_key:
            raise TerminalBackendError(
                "no Anthropic API key: set QUICKFLOW_ANTHROPIC__API_KEY (or ANTHROPIC_API_KEY), "
                "or run with the simulate backend"
            )
        warnings: list[str] = []
        params = self._build_params(request, warnings)
        transcript: list[Mapping[str, Any]] = [{"type": "request", "params": params}]
        message = await self._send_with_retries(request, params, transcript)
        return self._result(request, message, transcript, warnings)

    def _build_params(self, request: AgentRequest, warnings: list[str]) -> dict[str, Any]:
        profile, model = profile_and_model(self._profiles, request, self._default_model, self._aliases)

        max_tokens = self._max_tokens
        thinking: dict[str, Any] | None = None
        if request.effort:
            if request.effort not in models.EFFORT_BUDGETS:
                warnings.append(f"effort {request.effort!r} is not a known level; ignored")
            elif not models.supports_thinking(model):
                warnings.append(f"effort {request.effort!r} ignored: {model} does not support extended thinking")
            else:
                budget = models.thinking_budget(request.effort)
                thinking = {"type": "enabled", "budget_tokens": budget}
                # The budget counts against max_tokens; add it so the answer keeps its own room.
                max_tokens += budget

        system_text = SYSTEM_PROMPT
        if profile is not None and profile.system_prompt:
            system_text += "\n\n" + profile.system_prompt.strip()
        if request.schema is not None:
            system_text += _STRUCTURED_NOTE
        params: dict[str, Any] = {
            "model": model,
            "max_tokens": max_tokens,
            # The breakpoint caches tools + system: the prefix that every agent of a run shares.
            "system": [{"type": "text", "text": system_text, "cache_control": {"type": "ephemeral"}}],
            "messages": _messages(request, tool_form=thinking is None),
        }
        if request.schema is not None:
            # A JSON round trip turns mapping proxies and tuples into what the API (and a transcript) expect.
            schema = json.loads(json.dumps(request.schema))
            params["tools"] = [
                {
                    "name": TOOL_NAME,
                    "description": "Deliver the final result of the task. Call exactly once with the complete result.",
                    "input_schema": schema,
                }
            ]
            params["tool_choice"] = {"type": "auto"} if thinking else {"type": "tool", "name": TOOL_NAME}
        if thinking is not None:
            params["thinking"] = thinking
        return params

    async def _send_with_retries(
        self, request: AgentRequest, params: dict[str, Any], transcript: list[Mapping[str, Any]]
    ) -> anthropic.types.Message:
        waited = 0.0
        attempt = 0
        retries: list[dict[str, Any]] = []
        while True:
            attempt += 1
            try:
                # Streaming keeps long generations alive through proxies and avoids the SDK's
                # refusal of large max_tokens on non-streaming calls.
                async with self._client.messages.stream(**params) as stream:
                    return await stream.get_final_message()
            except anthropic.APIStatusError as exc:
                failure = _classify_status(exc)
            except anthropic.APIConnectionError as exc:
                kind = "timed out" if isinstance(exc, anthropic.APITimeoutError) else "connection error"
                failure = _Failure(True, f"{kind}: {exc}", None)
            except anthropic.AnthropicError as exc:
                raise TerminalBackendError(f"anthropic request failed: {exc}") from exc

            if not failure.retryable:
                raise _terminal(failure, f"anthropic request rejected: {failure.reason}", attempt, retries) from None
            if attempt > self._max_retries:
                raise _terminal(
                    failure, f"anthropic request failed after {attempt} attempts: {failure.reason}", attempt, retries
                ) from None
            delay = failure.retry_after if failure.retry_after is not None else self._backoff(attempt)
            if waited + delay > self._max_retry_wait_s:
                message = (
                    f"anthropic request failed: {failure.reason}; waiting {delay:.1f}s more would exceed "
                    f"the {self._max_retry_wait_s:g}s retry budget"
                )
                raise _terminal(failure, message, attempt, retries) from None
            event = RetryEvent(attempt, delay, failure.reason, failure.status)
            retries.append(event.to_dict())
            transcript.append(event.to_dict())
            if self._on_retry is not None:
                outcome = self._on_retry(request, event)
                if inspect.isawaitable(outcome):
                    await outcome
            await anyio.sleep(delay)
            waited += delay

    def _backoff(self, attempt: int) -> float:
        # Exponential with jitter in [50%, 100%], so agents that failed together do not retry together.
        ceiling = min(self._backoff_max_s, self._backoff_base_s * 2.0 ** (attempt - 1))
        return ceiling * (0.5 + self._random.random() / 2)

    def _result(
        self,
        request: AgentRequest,
        message: anthropic.types.Message,
        transcript: list[Mapping[str, Any]],
        warnings: list[str],
    ) -> AgentResult:
        content = [block.model_dump(mode="json", exclude_none=True) for block in message.content]
        text = "".join(block["text"] for block in content if block.get("type") == "text").strip()
        data: Any = None
        if request.schema is not None:
            call = next((b for b in content if b.get("type") == "tool_use" and b.get("name") == TOOL_NAME), None)
            if call is not None:
                data = call.get("input")
                text = json.dumps(data)
            else:
                data = _parse_json_text(text)
        u = message.usage
        usage = Usage(
            input_tokens=u.input_tokens,
            output_tokens=u.output_tokens,
            cache_read_tokens=u.cache_read_input_tokens or 0,
            cache_write_tokens=u.cache_creation_input_tokens or 0,
        )
        model = message.model or str(transcript[0]["params"]["model"])
        stop_reason = message.stop_reason or "end_turn"
        if stop_reason == "max_tokens":
            warnings.append(f"output truncated at max_tokens ({transcript[0]['params']['max_tokens']})")
        transcript.append(
            {
                "type": "response",
                "id": message.id,
                "model": model,
                "stop_reason": stop_reason,
                "content": content,
                "usage": u.model_dump(mode="json", exclude_none=True),
            }
        )
        transcript.extend({"type": "warning", "message": w} for w in warnings)
        cost = models.cost_usd(model, usage, prices=self._prices, aliases=self._aliases)
        return AgentResult(
            text=text,
            usage=usage,
            model=model,
            stop_reason=stop_reason,
            cost_usd=cost,
            data=data,
            transcript=tuple(transcript),
        )


def _messages(request: AgentRequest, *, tool_form: bool) -> list[dict[str, Any]]:
    """The conversation: the prompt, then one (assistant answer, user objection) pair per correction."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": [{"type": "text", "text": request.prompt}]}]
    for number, correction in enumerate(request.corrections, start=1):
        messages.extend(_correction_turns(correction, number, tool_form=tool_form and request.schema is not None))
    return messages


def _correction_turns(correction: Correction, number: int, *, tool_form: bool) -> list[dict[str, Any]]:
    previous = _parse_json_text(correction.output)
    if tool_form and isinstance(previous, dict):
        # Answer the earlier tool call with an error result: the shape the model is trained on.
        tool_id = f"toolu_quickflow_correction_{number}"
        return [
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": tool_id, "name": TOOL_NAME, "input": previous}],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": tool_id,
                        "is_error": True,
                        "content": f"This result does not match the required schema: {correction.error}\n"
                        f"Call {TOOL_NAME} again with a complete, corrected result.",
                    }
                ],
            },
        ]
    ask = f"call the {TOOL_NAME} tool" if tool_form else "reply with only the JSON object"
    return [
        # The API rejects empty text blocks; an empty answer is still an answer to object to.
        {"role": "assistant", "content": [{"type": "text", "text": correction.output or "(empty output)"}]},
        {
            "role": "user",
            "content": [
                {
                    "type": "text",
                    "text": f"That output was rejected: {correction.error}\n"
                    f"Try again: {ask}, with a complete result that matches the required schema.",
                }
            ],
        },
    ]


def _parse_json_text(text: str) -> Any:
    """The JSON value in ``text`` (tolerating a surrounding code fence), or None."""
    body = text.strip()
    if body.startswith("```"):
        body = body.split("\n", 1)[1] if "\n" in body else ""
        body = body.rsplit("```", 1)[0]
    try:
        return json.loads(body)
    except ValueError:
        return None


def _classify_status(exc: anthropic.APIStatusError) -> _Failure:
    status = exc.status_code
    body = exc.body if isinstance(exc.body, dict) else {}
    raw_error = body.get("error")
    error: dict[str, Any] = raw_error if isinstance(raw_error, dict) else {}
    kind = str(error.get("type") or "")
    detail = str(error.get("message") or exc.message)
    if status == 200:
        # An `error` event inside a streamed 200 response: judge by its type.
        mapped = _RETRYABLE_ERROR_TYPES.get(kind)
        return _Failure(mapped is not None, f"{kind or 'error'} during stream: {detail}", mapped)
    reason = f"{status} {kind}: {detail}" if kind else f"{status}: {detail}"
    headers = exc.response.headers
    should_retry = headers.get("x-should-retry")
    if should_retry in ("true", "false"):
        retryable = should_retry == "true"  # the API's explicit verdict wins
    else:
        retryable = status in (408, 409, 429) or status >= 500
    return _Failure(retryable, reason, status, _retry_after(headers))


def _retry_after(headers: Any) -> float | None:
    """Seconds from ``retry-after-ms`` or ``retry-after`` (seconds or an HTTP date), else None."""
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _terminal(failure: _Failure, message: str, attempts: int, retries: list[dict[str, Any]]) -> TerminalBackendError:
    error = TerminalBackendError(message, retry_after=failure.retry_after, status=failure.status)
    error.details.update({"attempts": attempts, "retries": list(retries)})
    return error
