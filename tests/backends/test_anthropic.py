"""The anthropic backend: the real SDK against the fake Messages server on loopback."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from pydantic import SecretStr

from runtime import models
from runtime.backends._protocol import AgentBackend, AgentRequest, Correction, Usage
from runtime.backends.anthropic import TOOL_NAME, AnthropicBackend, RetryEvent
from runtime.config import AgentProfile, AnthropicConfig, ModelPrice, Settings
from runtime.errors import TerminalBackendError
from tests.fakes.messages_server import ErrorReply, FakeMessagesServer, TextReply, ToolUseReply

pytestmark = pytest.mark.anyio

SCHEMA = {
    "type": "object",
    "properties": {"title": {"type": "string"}, "score": {"type": "integer"}},
    "required": ["title", "score"],
}


@pytest.fixture
async def backend(messages_server: FakeMessagesServer) -> AsyncIterator[AnthropicBackend]:
    b = AnthropicBackend(
        api_key="test-key",
        base_url=messages_server.url,
        max_retries=3,
        max_retry_wait_s=5.0,
        backoff_base_s=0.01,
        profiles={"reviewer": AgentProfile(system_prompt="You review code for bugs.", model="haiku")},
    )
    async with b:
        yield b


def request(prompt: str = "Say hello", **kwargs: Any) -> AgentRequest:
    return AgentRequest(run_id="run-1", index=0, prompt=prompt, **kwargs)


def api_key_sent(server: FakeMessagesServer) -> str | None:
    """The key the SDK sent; this SDK version uses a bearer token, older ones ``x-api-key``."""
    headers = server.message_requests()[-1].headers
    auth = headers.get("authorization", "")
    return auth.removeprefix("Bearer ") if auth else headers.get("x-api-key")


def body(server: FakeMessagesServer, n: int = -1) -> dict[str, Any]:
    sent = server.message_requests()[n].body
    assert isinstance(sent, dict)
    return sent


async def test_is_an_agent_backend(backend: AnthropicBackend) -> None:
    assert isinstance(backend, AgentBackend)
    assert backend.name == "anthropic"


async def test_plain_text(backend: AnthropicBackend, messages_server: FakeMessagesServer) -> None:
    messages_server.enqueue(TextReply("  Hello there.  "))
    with anyio.fail_after(10):
        result = await backend.call(request())
    assert result.text == "Hello there."
    assert result.data is None
    assert result.stop_reason == "end_turn"
    sent = body(messages_server)
    assert sent["stream"] is True
    assert sent["model"] == models.default_aliases()["sonnet"]
    assert sent["messages"] == [{"role": "user", "content": [{"type": "text", "text": "Say hello"}]}]
    assert "tools" not in sent and "thinking" not in sent
    assert api_key_sent(messages_server) == "test-key"
    kinds = [entry["type"] for entry in result.transcript]
    assert kinds == ["request", "response"]
    assert result.transcript[1]["content"] == [{"type": "text", "text": "  Hello there.  "}]
    json.dumps(list(result.transcript))  # the transcript is stored as JSON


async def test_system_prompt_is_cached_and_non_interactive(
    backend: AnthropicBackend, messages_server: FakeMessagesServer
) -> None:
    with anyio.fail_after(10):
        await backend.call(request())
    system = body(messages_server)["system"]
    assert len(system) == 1
    assert system[0]["cache_control"] == {"type": "ephemeral"}
    assert "No human is present" in system[0]["text"]
    assert "no preamble" in system[0]["text"]


async def test_schema_forces_the_tool_and_returns_its_input(
    backend: AnthropicBackend, messages_server: FakeMessagesServer
) -> None:
    messages_server.enqueue(ToolUseReply({"title": "Fix", "score": 3}))
    with anyio.fail_after(10):
        result = await backend.call(request(schema=SCHEMA))
    assert result.data == {"title": "Fix", "score": 3}
    assert json.loads(result.text) == result.data
    assert result.stop_reason == "tool_use"
    sent = body(messages_server)
    assert sent["tools"] == [
        {"name": TOOL_NAME, "description": sent["tools"][0]["description"], "input_schema": SCHEMA}
    ]
    assert sent["tool_choice"] == {"type": "tool", "name": TOOL_NAME}


async def test_schema_answered_in_text_is_parsed(
    backend: AnthropicBackend, messages_server: FakeMessagesServer
) -> None:
    messages_server.enqueue(TextReply('```json\n{"title": "x", "score": 1}\n```'))
    with anyio.fail_after(10):
        result = await backend.call(request(schema=SCHEMA))
    assert result.data == {"title": "x", "score": 1}


async def test_corrections_answer_the_tool_call_with_the_validation_error(
    backend: AnthropicBackend, messages_server: FakeMessagesServer
) -> None:
    messages_server.enqueue(ToolUseReply({"title": "Fix", "score": 3}))
    corrections = (
        Correction(output='{"title": "Fix"}', error="'score' is a required property"),
        Correction(output="not json at all", error="expected a JSON object"),
    )
    with anyio.fail_after(10):
        result = await backend.call(request(schema=SCHEMA, corrections=corrections, attempt=3))
    assert result.data == {"title": "Fix", "score": 3}
    messages = body(messages_server)["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
    tool_use = messages[1]["content"][0]
    assert tool_use == {"type": "tool_use", "id": tool_use["id"], "name": TOOL_NAME, "input": {"title": "Fix"}}
    tool_result = messages[2]["content"][0]
    assert tool_result["type"] == "tool_result" and tool_result["is_error"] is True
    assert tool_result["tool_use_id"] == tool_use["id"]
    assert "'score' is a required property" in tool_result["content"]
    # A non-JSON previous answer cannot be replayed as a tool call: it goes back as text.
    assert messages[3]["content"] == [{"type": "text", "text": "not json at all"}]
    assert "expected a JSON object" in messages[4]["content"][0]["text"]


async def test_rate_limit_honours_retry_after(messages_server: FakeMessagesServer) -> None:
    seen: list[tuple[int, RetryEvent]] = []
    messages_server.enqueue(ErrorReply(429, "slow down", retry_after=0.2), TextReply("done"))
    async with AnthropicBackend(
        api_key="k",
        base_url=messages_server.url,
        backoff_base_s=0.01,
        on_retry=lambda req, event: seen.append((req.index, event)),
    ) as backend:
        started = time.monotonic()
        with anyio.fail_after(10):
            result = await backend.call(request())
        elapsed = time.monotonic() - started
    assert result.text == "done"
    assert len(messages_server.message_requests()) == 2
    assert elapsed >= 0.19  # waited for retry-after, not the 10 ms backoff
    assert len(seen) == 1
    index, event = seen[0]
    assert index == 0 and event.attempt == 1 and event.status == 429 and event.delay_s == pytest.approx(0.2)
    assert "rate_limit_error" in event.reason
    assert [e["type"] for e in result.transcript] == ["request", "retry", "response"]


async def test_overload_and_mid_stream_errors_are_retried(
    backend: AnthropicBackend, messages_server: FakeMessagesServer
) -> None:
    messages_server.enqueue(ErrorReply(529), ErrorReply(529, mid_stream=True), TextReply("finally"))
    with anyio.fail_after(10):
        result = await backend.call(request())
    assert result.text == "finally"
    retries = [e for e in result.transcript if e["type"] == "retry"]
    assert [r["status"] for r in retries] == [529, 529]


async def test_repeated_server_errors_give_up_after_bounded_attempts(
    backend: AnthropicBackend, messages_server: FakeMessagesServer
) -> None:
    messages_server.default = ErrorReply(500, "boom")
    with anyio.fail_after(10), pytest.raises(TerminalBackendError) as caught:
        await backend.call(request())
    assert caught.value.status == 500
    assert len(messages_server.message_requests()) == 4  # 1 + max_retries
    assert caught.value.details["attempts"] == 4
    assert "after 4 attempts" in str(caught.value)


async def test_retry_after_beyond_the_wait_budget_gives_up(messages_server: FakeMessagesServer) -> None:
    messages_server.enqueue(ErrorReply(429, retry_after=30))
    async with AnthropicBackend(api_key="k", base_url=messages_server.url, max_retry_wait_s=1.0) as backend:
        with anyio.fail_after(10), pytest.raises(TerminalBackendError) as caught:
            await backend.call(request())
    assert caught.value.status == 429 and caught.value.retry_after == 30
    assert len(messages_server.message_requests()) == 1


@pytest.mark.parametrize("status", [400, 401, 403, 404])
async def test_client_errors_are_terminal_without_retry(
    backend: AnthropicBackend, messages_server: FakeMessagesServer, status: int
) -> None:
    messages_server.default = ErrorReply(status, "nope")
    with anyio.fail_after(10), pytest.raises(TerminalBackendError) as caught:
        await backend.call(request())
    assert caught.value.status == status
    assert len(messages_server.message_requests()) == 1


async def test_connection_errors_are_retried_then_terminal() -> None:
    # A port that was just free: nothing listens there, so every attempt is refused.
    with FakeMessagesServer() as server:
        url = server.url
    async with AnthropicBackend(api_key="k", base_url=url, max_retries=2, backoff_base_s=0.01) as backend:
        with anyio.fail_after(10), pytest.raises(TerminalBackendError) as caught:
            await backend.call(request())
    assert caught.value.details["attempts"] == 3
    assert "connection error" in str(caught.value)


async def test_usage_and_cost_match_the_server(messages_server: FakeMessagesServer) -> None:
    reported = {
        "input_tokens": 1200,
        "output_tokens": 340,
        "cache_read_input_tokens": 5000,
        "cache_creation_input_tokens": 800,
    }
    messages_server.enqueue(TextReply("ok", usage=reported))
    prices = {"sonnet": ModelPrice(input=3.0, output=15.0, cache_read=0.3, cache_write=3.75)}
    async with AnthropicBackend(api_key="k", base_url=messages_server.url, prices=prices) as backend:
        with anyio.fail_after(10):
            result = await backend.call(request(model="sonnet"))
    assert result.usage == Usage(input_tokens=1200, output_tokens=340, cache_read_tokens=5000, cache_write_tokens=800)
    expected = (1200 * 3.0 + 340 * 15.0 + 5000 * 0.3 + 800 * 3.75) / 1_000_000
    assert result.cost_usd == pytest.approx(expected)
    assert result.model == models.default_aliases()["sonnet"]


async def test_effort_enables_thinking_with_a_budget(
    backend: AnthropicBackend, messages_server: FakeMessagesServer
) -> None:
    with anyio.fail_after(10):
        result = await backend.call(request(model="opus", effort="high"))
    sent = body(messages_server)
    budget = models.thinking_budget("high")
    assert sent["thinking"] == {"type": "enabled", "budget_tokens": budget}
    assert sent["max_tokens"] == 8192 + budget
    assert not [e for e in result.transcript if e["type"] == "warning"]


async def test_effort_with_schema_offers_the_tool_without_forcing_it(
    backend: AnthropicBackend, messages_server: FakeMessagesServer
) -> None:
    # The API refuses a forced tool together with extended thinking.
    messages_server.enqueue(ToolUseReply({"title": "t", "score": 1}))
    corrections = (Correction(output='{"title": "t"}', error="'score' is a required property"),)
    with anyio.fail_after(10):
        result = await backend.call(request(schema=SCHEMA, effort="low", corrections=corrections))
    sent = body(messages_server)
    assert sent["tool_choice"] == {"type": "auto"}
    assert sent["thinking"]["type"] == "enabled"
    # Without the earlier thinking block a replayed tool call would be rejected: corrections go as text.
    assert sent["messages"][1]["content"] == [{"type": "text", "text": '{"title": "t"}'}]
    assert result.data == {"title": "t", "score": 1}


async def test_effort_on_a_model_without_thinking_is_ignored_with_a_warning(
    backend: AnthropicBackend, messages_server: FakeMessagesServer
) -> None:
    with anyio.fail_after(10):
        result = await backend.call(request(model="my-proxy-model", effort="max"))
    assert "thinking" not in body(messages_server)
    warnings = [e["message"] for e in result.transcript if e["type"] == "warning"]
    assert len(warnings) == 1 and "does not support extended thinking" in warnings[0]


async def test_agent_profile_sets_system_prompt_and_model(
    backend: AnthropicBackend, messages_server: FakeMessagesServer
) -> None:
    with anyio.fail_after(10):
        await backend.call(request(agent_type="reviewer"))
    sent = body(messages_server)
    assert sent["model"] == models.default_aliases()["haiku"]
    assert sent["system"][0]["text"].endswith("You review code for bugs.")
    with anyio.fail_after(10):
        await backend.call(request(agent_type="reviewer", model="inherit", settings={"default_model": "opus"}))
    assert body(messages_server)["model"] == models.default_aliases()["opus"]
    with anyio.fail_after(10), pytest.raises(TerminalBackendError, match="unknown agentType 'nobody'"):
        await backend.call(request(agent_type="nobody"))


async def test_inherit_uses_the_runs_default_model(
    backend: AnthropicBackend, messages_server: FakeMessagesServer
) -> None:
    with anyio.fail_after(10):
        await backend.call(request(model="inherit", settings={"default_model": "opus"}))
        await backend.call(request(model="claude-custom-1"))
    assert body(messages_server, 0)["model"] == models.default_aliases()["opus"]
    assert body(messages_server, 1)["model"] == "claude-custom-1"


async def test_from_settings(messages_server: FakeMessagesServer) -> None:
    settings = Settings(
        default_model="haiku",
        models={"haiku": "claude-haiku-4-5"},
        anthropic=AnthropicConfig(api_key=SecretStr("from-settings"), base_url=messages_server.url, max_tokens=1000),
    )
    async with AnthropicBackend.from_settings(settings) as backend:
        with anyio.fail_after(10):
            result = await backend.call(request())
    sent = body(messages_server)
    assert sent["model"] == "claude-haiku-4-5" and sent["max_tokens"] == 1000
    assert api_key_sent(messages_server) == "from-settings"
    assert result.cost_usd == pytest.approx((10 * 1.0 + 5 * 5.0) / 1_000_000)


async def test_missing_api_key_is_a_clear_terminal_error(
    monkeypatch: pytest.MonkeyPatch, messages_server: FakeMessagesServer
) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("ANTHROPIC_AUTH_TOKEN", raising=False)
    async with AnthropicBackend(base_url=messages_server.url) as backend:
        with anyio.fail_after(10), pytest.raises(TerminalBackendError, match="API key"):
            await backend.call(request())
    assert messages_server.message_requests() == []


async def test_cancel_scope_stops_a_slow_call_promptly(
    backend: AnthropicBackend, messages_server: FakeMessagesServer
) -> None:
    # The dispatcher's per-agent timeout is a cancel scope around call(); it must not wait for the server.
    messages_server.enqueue(TextReply("late", delay_s=5))
    started = time.monotonic()
    with anyio.fail_after(10):
        with anyio.move_on_after(0.2) as scope:
            await backend.call(request())
    assert scope.cancelled_caught
    assert time.monotonic() - started < 3
