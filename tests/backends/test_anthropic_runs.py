"""Workflow scripts on the anthropic backend: the engine, the real SDK and the fake Messages server.

These pin the acceptance of the real-agents issue at the level a user sees it: what ``agent()``
returns or throws, what the run records, and that usage and cost add up to what the server said.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import anyio
import pytest

from runtime import Engine, MemoryStore, RunRecord, RunRequest, models
from runtime.backends.anthropic import AnthropicBackend
from runtime.config import ModelPrice, load_settings
from runtime.store import CallRecord
from tests.fakes.messages_server import ErrorReply, FakeMessagesServer, TextReply, ToolUseReply

pytestmark = pytest.mark.anyio

SCHEMA = "{type: 'object', properties: {title: {type: 'string'}, score: {type: 'integer'}}, required: ['title', 'score']}"
PRICES = {"claude-sonnet": ModelPrice(input=2.0, output=10.0, cache_read=0.2, cache_write=2.5)}


class Harness:
    def __init__(self, engine: Engine, server: FakeMessagesServer) -> None:
        self.engine = engine
        self.server = server

    async def run(self, script: str, **options: Any) -> tuple[RunRecord, list[CallRecord]]:
        options.setdefault("backend", "anthropic")
        record = await self.engine.submit(RunRequest(script=script, options=options))
        record = await self.engine.wait(record.id)
        return record, await self.engine.list_agents(record.id)

    async def events(self, run_id: str, kind: str) -> list[dict[str, Any]]:
        return [e.data async for e in self.engine.follow(run_id) if e.type == kind]


@pytest.fixture
async def harness(messages_server: FakeMessagesServer) -> AsyncIterator[Harness]:
    settings = load_settings()
    settings = settings.model_copy(update={"prices": PRICES})
    engines: list[Engine] = []  # the backend reports retries to the engine built around it
    backend = AnthropicBackend(
        api_key="test-key", base_url=messages_server.url, max_retries=2, max_retry_wait_s=5.0,
        backoff_base_s=0.01, prices=PRICES, on_retry=lambda request, event: engines[0].report_backend_retry(request, event),
    )
    async with Engine(settings, MemoryStore(), backends={"anthropic": backend}, recover=False) as engine:
        engines.append(engine)
        yield Harness(engine, messages_server)


async def test_plain_text(harness: Harness) -> None:
    harness.server.enqueue(TextReply("Paris"))
    with anyio.fail_after(20):
        record, calls = await harness.run("return await agent('Capital of France?')")
    assert record.status == "completed" and record.result == "Paris"
    assert calls[0].status == "completed"


async def test_schema_success(harness: Harness) -> None:
    harness.server.enqueue(ToolUseReply({"title": "ok", "score": 3}))
    with anyio.fail_after(20):
        record, _ = await harness.run(f"return await agent('Rate it', {{schema: {SCHEMA}}})")
    assert record.result == {"title": "ok", "score": 3}


async def test_invalid_then_valid_feeds_the_error_back(harness: Harness) -> None:
    harness.server.enqueue(ToolUseReply({"title": "missing score"}), ToolUseReply({"title": "fixed", "score": 9}))
    with anyio.fail_after(20):
        record, calls = await harness.run(f"return await agent('Rate it', {{schema: {SCHEMA}}})")
    assert record.result == {"title": "fixed", "score": 9}
    assert calls[0].attempts == 2
    sent = harness.server.message_requests()
    assert len(sent) == 2
    assert "'score' is a required property" in sent[1].text()
    assert "'score' is a required property" not in sent[0].text()
    assert [e["attempt"] for e in await harness.events(record.id, "agent.retrying")] == [2]


async def test_five_invalid_answers_throw_structured_output_error(harness: Harness) -> None:
    harness.server.default = ToolUseReply({"title": "never a score"})
    script = (
        f"try {{ await agent('Rate it', {{schema: {SCHEMA}}}) }} catch (e) {{ "
        "return [e instanceof StructuredOutputError, e.validationError] }"
    )
    with anyio.fail_after(20):
        record, calls = await harness.run(script)
    assert record.result[0] is True
    assert "'score' is a required property" in record.result[1]
    assert len(harness.server.message_requests()) == 5
    assert calls[0].status == "failed"


async def test_rate_limit_with_retry_after_then_success(harness: Harness) -> None:
    harness.server.enqueue(ErrorReply(429, retry_after=0.2), TextReply("after the wait"))
    with anyio.fail_after(20):
        record, _ = await harness.run("return await agent('Hello')")
    assert record.result == "after the wait"
    assert len(harness.server.message_requests()) == 2
    retries = await harness.events(record.id, "agent.retrying")
    assert len(retries) == 1 and retries[0]["delay_s"] >= 0.2


async def test_repeated_server_errors_resolve_to_null_and_are_recorded(harness: Harness) -> None:
    harness.server.default = ErrorReply(500)
    with anyio.fail_after(20):
        record, calls = await harness.run("const r = await agent('Hello'); return r === null")
    assert record.status == "completed" and record.result is True
    assert calls[0].status == "failed" and calls[0].error
    failed = await harness.events(record.id, "agent.failed")
    assert len(failed) == 1 and "500" in failed[0]["error"]
    assert len(harness.server.message_requests()) == 3  # the first try and max_retries=2 more


async def test_per_agent_timeout_resolves_to_null(harness: Harness) -> None:
    harness.server.enqueue(TextReply("too late", delay_s=3.0))
    with anyio.fail_after(20):
        record, calls = await harness.run("return (await agent('Slow', {timeout: 300})) === null")
    assert record.result is True
    assert calls[0].status == "failed" and "timed out" in (calls[0].error or "")


async def test_usage_and_cost_add_up_per_agent_phase_and_run(harness: Harness) -> None:
    usages = [
        {"input_tokens": 100, "output_tokens": 20, "cache_read_input_tokens": 50, "cache_creation_input_tokens": 10},
        {"input_tokens": 200, "output_tokens": 30, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 40},
        {"input_tokens": 300, "output_tokens": 40, "cache_read_input_tokens": 60, "cache_creation_input_tokens": 0},
    ]
    harness.server.enqueue(*(TextReply(f"answer {i}", usage=u) for i, u in enumerate(usages)))
    script = "phase('One'); await agent('a'); await agent('b'); phase('Two'); await agent('c'); return 'done'"
    with anyio.fail_after(20):
        record, calls = await harness.run(script, model="sonnet")

    def cost(u: dict[str, int]) -> float:
        return (u["input_tokens"] * 2.0 + u["output_tokens"] * 10.0 + u["cache_read_input_tokens"] * 0.2
                + u["cache_creation_input_tokens"] * 2.5) / 1e6

    for call, usage in zip(calls, usages, strict=True):
        assert call.usage == {
            "input_tokens": usage["input_tokens"],
            "output_tokens": usage["output_tokens"],
            "cache_read_tokens": usage["cache_read_input_tokens"],
            "cache_write_tokens": usage["cache_creation_input_tokens"],
        }
        assert call.cost_usd == pytest.approx(cost(usage))
    phases = {p["title"]: p for p in record.usage["phases"]}
    assert phases["One"]["tokens"] == {"input": 300, "output": 50}
    assert phases["Two"]["tokens"] == {"input": 300, "output": 40}
    assert phases["One"]["cost_usd"] == pytest.approx(cost(usages[0]) + cost(usages[1]), abs=1e-6)
    assert record.usage["tokens"] == {"input": 600, "output": 90, "cache_read": 110, "cache_write": 50}
    assert record.usage["cost_usd"] == pytest.approx(sum(cost(u) for u in usages), abs=1e-6)
    assert models.resolve_model("sonnet", "sonnet").startswith("claude-sonnet")


async def test_budget_throws_once_spent(harness: Harness) -> None:
    harness.server.default = TextReply("words", usage={"input_tokens": 5, "output_tokens": 60})
    script = """const done = [];
for (let i = 0; i < 10; i++) {
  try { done.push(await agent('step ' + i)) } catch (e) { return [done.length, e.name, budget.spent()] }
}
return 'never stopped'"""
    with anyio.fail_after(20):
        record, _ = await harness.run(script, budget_tokens=100)
    assert record.result == [2, "WorkflowBudgetExceededError", 120]
    updates = await harness.events(record.id, "budget.updated")
    assert [u["spent"] for u in updates] == [60, 120]


async def test_dry_run_estimates_without_calling_the_api(harness: Harness) -> None:
    with anyio.fail_after(20):
        record, _ = await harness.run("return await parallel([1, 2].map((i) => () => agent('task ' + i)))",
                                      model="sonnet", dry_run=True)
    assert record.status == "completed"
    assert harness.server.message_requests() == []
    assert record.usage["estimated"] is True
    assert record.usage["cost_usd"] > 0


def test_settings_prices_are_used_for_cost() -> None:
    usage = replace(models.Usage(), input_tokens=1_000_000)
    assert models.cost_usd("claude-sonnet-x", usage, prices=PRICES) == pytest.approx(2.0)
