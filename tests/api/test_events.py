"""Live events: SSE parsed by hand from the byte stream, reconnects with Last-Event-ID, NDJSON."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import pytest

from .conftest import ndjson_events, start_run, wait_done

pytestmark = pytest.mark.anyio

# Three agents through two slots, with narration between them: plenty of interleaved events.
FANOUT = """
log('starting');
const out = await parallel(['a', 'b', 'c'].map((x) => () => agent('work on ' + x, { label: 'job ' + x })));
log('done with ' + out.length);
return out.length;
"""

SERIAL = "return (await parallel([0, 1, 2, 3].map((i) => () => agent('step ' + i)))).length;"


@dataclass(frozen=True)
class Message:
    """One SSE message: the ``id:`` and ``event:`` fields and the parsed ``data:`` JSON."""

    id: str | None
    event: str | None
    data: dict[str, Any]


async def sse_messages(response: httpx.Response) -> AsyncIterator[Message]:
    """Parse ``text/event-stream`` per the WHATWG rules we need: fields, comments, blank-line dispatch."""
    fields: dict[str, str] = {}
    data: list[str] = []
    async for line in response.aiter_lines():
        if line == "":
            if data:
                yield Message(fields.get("id"), fields.get("event"), json.loads("\n".join(data)))
            fields, data = {}, []
            continue
        if line.startswith(":"):
            continue  # a comment: keep-alive pings
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        else:
            fields[name] = value
    assert not data, "the stream ended in the middle of a message"


async def follow_sse(client: httpx.AsyncClient, run_id: str, *, last_event_id: str | None = None,
                     stop_after: int | None = None) -> list[Message]:
    """Follow the SSE stream; with ``stop_after``, disconnect after that many messages."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id is not None else {}
    messages: list[Message] = []
    async with client.stream("GET", f"/v1/runs/{run_id}/events", headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        async for message in sse_messages(response):
            messages.append(message)
            if stop_after is not None and len(messages) == stop_after:
                break  # leaving the block closes the connection mid-stream
    return messages


def check_well_formed(messages: list[Message], run_id: str) -> None:
    for message in messages:
        assert message.id == str(message.data["seq"])
        assert message.event == message.data["type"]
        assert message.data["run_id"] == run_id
        assert set(message.data) == {"seq", "ts", "run_id", "type", "data"}


async def test_a_live_follower_sees_every_state_change_in_order(alice: httpx.AsyncClient) -> None:
    with anyio.fail_after(20):
        run = await start_run(alice, FANOUT, options={"concurrency": 2, "simulate": {"latency_ms": 80}})
        live_sse: list[Message] = []
        live_ndjson: list[dict[str, Any]] = []

        async def sse() -> None:
            live_sse.extend(await follow_sse(alice, run["id"]))

        async def ndjson() -> None:
            live_ndjson.extend(await ndjson_events(alice, run["id"]))

        async with anyio.create_task_group() as tg:  # both streams end on their own when the run ends
            tg.start_soon(sse)
            tg.start_soon(ndjson)
        check_well_formed(live_sse, run["id"])
        events = [m.data for m in live_sse]
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        assert events[0]["type"] == "run.queued" and events[1]["type"] == "run.started"
        assert events[-1]["type"] == "run.completed"
        assert [e["type"] for e in events].count("run.completed") == 1
        assert [e["data"]["message"] for e in events if e["type"] == "log"] == ["starting", "done with 3"]

        by_agent: dict[int, list[str]] = {}
        for event in events:
            if event["type"].startswith("agent."):
                by_agent.setdefault(event["data"]["index"], []).append(event["type"])
        assert by_agent == {i: ["agent.queued", "agent.started", "agent.completed"] for i in range(3)}
        completed = [e for e in events if e["type"] == "agent.completed"]
        assert sorted(e["data"]["label"] for e in completed) == ["job a", "job b", "job c"]
        assert all(e["data"]["tokens"]["output"] > 0 and e["data"]["result_preview"] for e in completed)

        # Both live followers and the stored history after the end agree exactly.
        assert live_ndjson == events
        assert await ndjson_events(alice, run["id"]) == events


async def test_reconnect_with_last_event_id_misses_and_repeats_nothing(alice: httpx.AsyncClient) -> None:
    with anyio.fail_after(20):
        run = await start_run(alice, SERIAL, options={"concurrency": 1, "simulate": {"latency_ms": 120}})
        received: list[Message] = []
        first = await follow_sse(alice, run["id"], stop_after=4)
        received += first
        assert "run.completed" not in [m.event for m in first]  # we really left a live run
        second = await follow_sse(alice, run["id"], last_event_id=first[-1].id, stop_after=5)
        received += second
        assert second[0].data["seq"] == int(first[-1].id) + 1
        rest = await follow_sse(alice, run["id"], last_event_id=second[-1].id)
        received += rest

        check_well_formed(received, run["id"])
        full = await ndjson_events(alice, run["id"])
        assert [m.data for m in received] == full
        assert [m.data["seq"] for m in received] == list(range(1, len(full) + 1))
        assert received[-1].event == "run.completed"
        done = (await alice.get(f"/v1/runs/{run['id']}")).json()
        assert done["status"] == "completed" and done["result"] == 4


async def test_ndjson_format(alice: httpx.AsyncClient) -> None:
    with anyio.fail_after(20):
        run = await start_run(alice, FANOUT, options={"simulate": {"latency_ms": 20}})
        async with alice.stream("GET", f"/v1/runs/{run['id']}/events", params={"format": "ndjson"}) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("application/x-ndjson")
            lines = [line async for line in response.aiter_lines()]
        events = [json.loads(line) for line in lines if line]
        assert len(events) == len(lines) or lines[-1] == ""  # one JSON object per line, nothing else
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        assert events[-1]["type"] == "run.completed"
        assert all(set(e) == {"seq", "ts", "run_id", "type", "data"} for e in events)

        # ?after= resumes the same way Last-Event-ID does.
        tail = await ndjson_events(alice, run["id"], after=3)
        assert tail == events[3:]
        resumed = await ndjson_events_with_header(alice, run["id"], "3")
        assert resumed == events[3:]


async def ndjson_events_with_header(client: httpx.AsyncClient, run_id: str, last_event_id: str) -> list[Any]:
    async with client.stream("GET", f"/v1/runs/{run_id}/events", params={"format": "ndjson"},
                             headers={"Last-Event-ID": last_event_id}) as response:
        assert response.status_code == 200
        return [json.loads(line) async for line in response.aiter_lines() if line]


async def test_following_a_finished_run_returns_its_history_and_ends(alice: httpx.AsyncClient) -> None:
    with anyio.fail_after(20):
        run = await start_run(alice, FANOUT)
        await wait_done(alice, run["id"])
        history = await ndjson_events(alice, run["id"])
        assert history[0]["seq"] == 1 and history[-1]["type"] == "run.completed"

        replay = await follow_sse(alice, run["id"])
        check_well_formed(replay, run["id"])
        assert [m.data for m in replay] == history

        # A follower that already has everything gets an empty stream that still ends.
        assert await follow_sse(alice, run["id"], last_event_id=str(history[-1]["seq"])) == []
        assert await follow_sse(alice, run["id"], last_event_id=str(history[-1]["seq"] + 50)) == []
        assert await ndjson_events(alice, run["id"], after=history[-1]["seq"]) == []


async def test_failed_and_cancelled_runs_end_their_streams(alice: httpx.AsyncClient) -> None:
    with anyio.fail_after(20):
        failed = await start_run(alice, "await agent('one'); throw new Error('bad end');")
        events = [m.data for m in await follow_sse(alice, failed["id"])]
        assert events[-1]["type"] == "run.failed" and "bad end" in json.dumps(events[-1]["data"])

        cancelled = await cancel_while_agent_runs(alice)
        types = [m.event for m in cancelled]
        assert types[-1] == "run.cancelled" and types.count("run.cancelled") == 1
        assert [m.data for m in cancelled] == await ndjson_events(alice, cancelled[0].data["run_id"])


async def cancel_while_agent_runs(client: httpx.AsyncClient) -> list[Message]:
    """Follow a run whose one agent sleeps for minutes, cancel it once the agent started; the stream must end."""
    slow = await start_run(client, "return await agent('slow');", options={"simulate": {"latency_ms": 600_000}})
    messages: list[Message] = []
    async with client.stream("GET", f"/v1/runs/{slow['id']}/events") as response:
        async for message in sse_messages(response):
            messages.append(message)
            if message.event == "agent.started":
                cancelled = await client.post(f"/v1/runs/{slow['id']}/cancel")
                assert cancelled.status_code == 200, cancelled.text
    return messages


async def test_cancel_emits_a_terminal_event_for_each_in_flight_agent(alice: httpx.AsyncClient) -> None:
    """The agent's running -> stopped change is visible in GET agents, so followers must see it too (§3.4)."""
    with anyio.fail_after(20):
        messages = await cancel_while_agent_runs(alice)
        run_id = messages[0].data["run_id"]
        agent = (await alice.get(f"/v1/runs/{run_id}/agents/0")).json()
        assert agent["status"] == "stopped"
        types = [m.event for m in messages]
        assert "agent.stopped" in types and types.index("agent.stopped") < types.index("run.cancelled"), types
