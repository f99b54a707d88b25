"""The HTTP API against a real server: runs, controls, agents, checks, saved workflows, system routes."""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import anyio
import httpx
import pytest

from api import system

from .conftest import (
    TERMINAL,
    Service,
    assert_error,
    ndjson_events,
    run_count,
    start_run,
    wait_done,
    wait_for_event,
)

pytestmark = pytest.mark.anyio

REVIEW = """export const meta = {
  name: 'review',
  description: 'Gather findings, then review them',
  phases: [{ title: 'Gather' }, { title: 'Review' }],
};
phase('Gather');
const found = await parallel([1, 2].map((i) => () => agent('gather finding ' + i)));
phase('Review');
const verdict = await agent('review all findings', {
  label: 'reviewer',
  model: 'opus',
  effort: 'high',
  schema: { type: 'object', properties: { ok: { type: 'boolean' } }, required: ['ok'] },
});
return { found: found.length, verdict };
"""

GREET = """export const meta = { name: 'greet', description: 'Greet someone', phases: [{ title: 'Say' }] };
const line = await agent('greet ' + args.who);
return 'hello ' + args.who + (line ? '!' : '?');
"""

# Four agents through one slot: each waits for the previous one, so controls land between them.
SERIAL_FOUR = "return (await parallel([0, 1, 2, 3].map((i) => () => agent('step ' + i)))).length;"


def serial_options(latency_ms: int) -> dict[str, Any]:
    return {"concurrency": 1, "simulate": {"latency_ms": latency_ms}}


async def get_json(client: httpx.AsyncClient, path: str, **params: Any) -> Any:
    response = await client.get(path, params=params)
    assert response.status_code == 200, response.text
    return response.json()


# --- submitting and waiting ----------------------------------------------------------------------


async def test_post_run_is_202_then_get_until_done(alice: httpx.AsyncClient) -> None:
    with anyio.fail_after(20):
        response = await alice.post("/v1/runs", json={"script": "return { n: args.n * 2 };", "args": {"n": 21}})
        assert response.status_code == 202, response.text
        run = response.json()
        assert run["id"].startswith("run_") and run["status"] in {"queued", "running", "completed"}
        assert run["owner"] == "alice" and run["args"] == {"n": 21}
        while run["status"] not in TERMINAL:
            await anyio.sleep(0.02)
            run = await get_json(alice, f"/v1/runs/{run['id']}")
        assert run["status"] == "completed", run
        assert run["result"] == {"n": 42} and run["error"] is None
        assert run["script"] == "return { n: args.n * 2 };"


async def test_wait_true_returns_200_with_the_result(alice: httpx.AsyncClient) -> None:
    with anyio.fail_after(20):
        ok = await alice.post("/v1/runs", params={"wait": "true"}, json={"script": "return [1, 'two', null];"})
        assert ok.status_code == 200, ok.text
        assert ok.json()["status"] == "completed" and ok.json()["result"] == [1, "two", None]

        failed = await alice.post("/v1/runs", params={"wait": "true"},
                                  json={"script": "throw new Error('boom on purpose');"})
        assert failed.status_code == 200, failed.text
        body = failed.json()
        assert body["status"] == "failed" and body["result"] is None
        assert "boom on purpose" in body["error"]["message"]


async def test_idempotency_key_in_body_and_header(service: Service) -> None:
    with anyio.fail_after(20):
        async with service.client("alice") as alice, service.client("bob") as bob:
            first = await alice.post("/v1/runs", json={"script": "return 1", "idempotency_key": "nightly-1"})
            again = await alice.post("/v1/runs", json={"script": "return 1", "idempotency_key": "nightly-1"})
            assert first.status_code == again.status_code == 202
            assert first.json()["id"] == again.json()["id"]

            header = {"Idempotency-Key": "ci-build-77"}
            h1 = await alice.post("/v1/runs", json={"script": "return 2"}, headers=header)
            h2 = await alice.post("/v1/runs", json={"script": "return 2"}, headers=header)
            assert h1.status_code == h2.status_code == 202
            assert h1.json()["id"] == h2.json()["id"] != first.json()["id"]
            assert await run_count(alice) == 2

            # The same key from another owner is another run.
            other = await bob.post("/v1/runs", json={"script": "return 1", "idempotency_key": "nightly-1"})
            assert other.status_code == 202 and other.json()["id"] != first.json()["id"]
            other_h = await bob.post("/v1/runs", json={"script": "return 2"}, headers=header)
            assert other_h.json()["id"] not in {h1.json()["id"], other.json()["id"]}
            assert await run_count(alice) == 2 and await run_count(bob) == 2
            for client, run_id in ((alice, first.json()["id"]), (alice, h1.json()["id"]), (bob, other.json()["id"])):
                await wait_done(client, run_id)
            # The key is not echoed back in the run's public JSON.
            assert "idempotency_key" not in (await get_json(alice, f"/v1/runs/{first.json()['id']}"))


async def test_list_filters_by_status_and_paginates(alice: httpx.AsyncClient) -> None:
    with anyio.fail_after(30):
        completed = []
        for i in range(5):
            response = await alice.post("/v1/runs", params={"wait": "true"}, json={"script": f"return {i}"})
            completed.append(response.json()["id"])
        failed = (await alice.post("/v1/runs", params={"wait": "true"}, json={"script": "throw new Error('x')"})).json()
        slow = await start_run(alice, "return await agent('slow')", options={"simulate": {"latency_ms": 600_000}})
        await wait_for_event(alice, slow["id"], lambda e: e["type"] == "agent.started")

        everything = (await get_json(alice, "/v1/runs"))["runs"]
        newest_first = [slow["id"], failed["id"], *reversed(completed)]
        assert [r["id"] for r in everything] == newest_first
        assert (await get_json(alice, "/v1/runs"))["next"] is None

        by_status = {s: [r["id"] for r in (await get_json(alice, "/v1/runs", status=s))["runs"]]
                     for s in ("completed", "failed", "running", "paused")}
        assert by_status == {"completed": list(reversed(completed)), "failed": [failed["id"]],
                             "running": [slow["id"]], "paused": []}
        assert all(r["status"] == "completed" for r in (await get_json(alice, "/v1/runs", status="completed"))["runs"])

        pages: list[list[str]] = []
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"limit": 3, **({"before": cursor} if cursor else {})}
            page = await get_json(alice, "/v1/runs", **params)
            pages.append([r["id"] for r in page["runs"]])
            cursor = page["next"]
            if cursor is None:
                break
            assert cursor == pages[-1][-1]
        assert [len(p) for p in pages] == [3, 3, 1]
        assert [run_id for page in pages for run_id in page] == newest_first

        # Filter and pagination compose.
        first = await get_json(alice, "/v1/runs", status="completed", limit=2)
        second = await get_json(alice, "/v1/runs", status="completed", limit=2, before=first["next"])
        assert [r["id"] for r in first["runs"] + second["runs"]] == list(reversed(completed))[:4]


# --- one run: usage, phases, agents --------------------------------------------------------------


async def test_run_detail_has_usage_and_phases(alice: httpx.AsyncClient) -> None:
    with anyio.fail_after(20):
        run = await start_run(alice, REVIEW)
        run = await wait_done(alice, run["id"])
        assert run["status"] == "completed", run
        assert run["result"]["found"] == 2 and isinstance(run["result"]["verdict"]["ok"], bool)
        usage = run["usage"]
        assert usage["agents"]["total"] == 3 and usage["agents"]["completed"] == 3
        assert usage["tokens"]["input"] > 0 and usage["tokens"]["output"] > 0
        assert usage["cost_usd"] > 0
        assert isinstance(usage["duration_s"], (int, float)) and usage["duration_s"] >= 0
        phases = {p["title"]: p for p in usage["phases"]}
        assert list(phases) == ["Gather", "Review"]
        assert phases["Gather"]["agents"].get("completed") == 2
        assert phases["Review"]["agents"].get("completed") == 1
        for phase in phases.values():
            assert not phase["agents"].get("running") and not phase["agents"].get("queued")
            assert phase["tokens"]["output"] > 0 and phase["elapsed_s"] >= 0
        assert sum(p["tokens"]["output"] for p in phases.values()) == usage["tokens"]["output"]
        assert usage["warnings"] == [] and usage["failures"] == []


async def test_agents_list_and_detail(alice: httpx.AsyncClient) -> None:
    with anyio.fail_after(20):
        run = await start_run(alice, REVIEW)
        await wait_done(alice, run["id"])
        agents = (await get_json(alice, f"/v1/runs/{run['id']}/agents"))["agents"]
        assert [a["index"] for a in agents] == [0, 1, 2]
        assert {a["prompt"] for a in agents[:2]} == {"gather finding 1", "gather finding 2"}
        assert all(a["status"] == "completed" and a["attempts"] == 1 for a in agents)
        assert all("transcript" not in a for a in agents)  # the list stays light
        assert [a["phase"] for a in agents] == ["Gather", "Gather", "Review"]

        reviewer = await get_json(alice, f"/v1/runs/{run['id']}/agents/2")
        assert reviewer["prompt"] == "review all findings" and reviewer["label"] == "reviewer"
        assert reviewer["options"]["model"] == "opus" and reviewer["options"]["effort"] == "high"
        assert reviewer["options"]["schema"]["required"] == ["ok"]
        assert reviewer["status"] == "completed" and isinstance(reviewer["output"]["ok"], bool)
        assert reviewer["usage"]["output_tokens"] > 0 and reviewer["usage"]["input_tokens"] > 0
        assert reviewer["attempts"] == 1 and reviewer["error"] is None
        assert reviewer["transcript"] and reviewer["transcript"][0]["content"] == "review all findings"
        assert reviewer["started_at"] <= reviewer["finished_at"]

        plain = await get_json(alice, f"/v1/runs/{run['id']}/agents/0")
        assert isinstance(plain["output"], str) and plain["output"]


# --- controls ------------------------------------------------------------------------------------


async def test_pause_starts_no_agent_until_resume(alice: httpx.AsyncClient) -> None:
    with anyio.fail_after(30):
        run = await start_run(alice, SERIAL_FOUR, options=serial_options(150))
        run_id = run["id"]
        seen: list[dict[str, Any]] = []
        running: set[int] = set()
        paused = False
        async with alice.stream("GET", f"/v1/runs/{run_id}/events", params={"format": "ndjson"}) as stream:
            lines = stream.aiter_lines()
            async for line in lines:
                event = json.loads(line)
                seen.append(event)
                if event["type"] == "agent.started":
                    running.add(event["data"]["index"])
                    if not paused:
                        response = await alice.post(f"/v1/runs/{run_id}/pause")
                        assert response.status_code == 200, response.text
                        assert response.json()["status"] == "paused"
                        paused = True
                elif event["type"] in ("agent.completed", "agent.failed", "agent.stopped"):
                    running.discard(event["data"]["index"])
                if paused and not running and any(e["type"] == "run.paused" for e in seen):
                    break  # the in-flight agent(s) finished while paused
            # Paused and idle: agents that finished stay finished, the rest wait without starting.
            state = await get_json(alice, f"/v1/runs/{run_id}")
            assert state["status"] == "paused"
            agents = (await get_json(alice, f"/v1/runs/{run_id}/agents"))["agents"]
            statuses = [a["status"] for a in agents]
            assert "running" not in statuses and statuses.count("completed") >= 1
            assert statuses.count("queued") >= 1, statuses
            again = [a["status"] for a in (await get_json(alice, f"/v1/runs/{run_id}/agents"))["agents"]]
            assert again == statuses
            assert_error(await alice.post(f"/v1/runs/{run_id}/pause"), 409, "invalid_run_state")

            response = await alice.post(f"/v1/runs/{run_id}/resume")
            assert response.status_code == 200 and response.json()["status"] == "running", response.text
            async for line in lines:
                seen.append(json.loads(line))

        types = [e["type"] for e in seen]
        paused_at, resumed_at = types.index("run.paused"), types.index("run.resumed")
        assert paused_at < resumed_at
        assert "agent.started" not in types[paused_at:resumed_at], types
        assert types[-1] == "run.completed"
        assert types.count("agent.completed") == 4
        final = await get_json(alice, f"/v1/runs/{run_id}")
        assert final["status"] == "completed" and final["result"] == 4


async def test_cancel_keeps_completed_agents(alice: httpx.AsyncClient) -> None:
    with anyio.fail_after(30):
        run = await start_run(alice, SERIAL_FOUR, options=serial_options(150))
        first = await wait_for_event(alice, run["id"], lambda e: e["type"] == "agent.completed")
        response = await alice.post(f"/v1/runs/{run['id']}/cancel")
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "cancelled"

        final = await get_json(alice, f"/v1/runs/{run['id']}")
        assert final["status"] == "cancelled" and final["result"] is None
        assert final["error"]["kind"] == "cancelled"
        agents = {a["index"]: a for a in (await get_json(alice, f"/v1/runs/{run['id']}/agents"))["agents"]}
        done = agents[first["data"]["index"]]
        assert done["status"] == "completed" and done["output"]
        assert all(a["status"] in {"completed", "stopped"} for a in agents.values()), agents
        assert sum(a["status"] == "completed" for a in agents.values()) < 4
        events = await ndjson_events(alice, run["id"])
        assert events[-1]["type"] == "run.cancelled"
        assert_error(await alice.post(f"/v1/runs/{run['id']}/resume"), 409, "invalid_run_state")


async def test_stop_one_agent_resolves_it_to_null(alice: httpx.AsyncClient) -> None:
    script = "const r = await agent('wait for me', { label: 'slow' }); return r === null;"
    with anyio.fail_after(20):
        run = await start_run(alice, script, options={"simulate": {"latency_ms": 600_000}})
        started = await wait_for_event(alice, run["id"], lambda e: e["type"] == "agent.started")
        index = started["data"]["index"]
        response = await alice.post(f"/v1/runs/{run['id']}/agents/{index}/stop")
        assert response.status_code == 200, response.text
        final = await wait_done(alice, run["id"])
        assert final["status"] == "completed" and final["result"] is True
        agent = await get_json(alice, f"/v1/runs/{run['id']}/agents/{index}")
        assert agent["status"] == "stopped" and agent["output"] is None
        types = [e["type"] for e in await ndjson_events(alice, run["id"])]
        assert "agent.stopped" in types and "agent.completed" not in types
        assert_error(await alice.post(f"/v1/runs/{run['id']}/agents/{index}/stop"), 409, "invalid_run_state")


async def test_restart_one_agent_runs_attempt_two(alice: httpx.AsyncClient) -> None:
    with anyio.fail_after(20):
        run = await start_run(alice, "return await agent('redo me');", options={"simulate": {"latency_ms": 500}})
        await wait_for_event(alice, run["id"], lambda e: e["type"] == "agent.started")
        response = await alice.post(f"/v1/runs/{run['id']}/agents/0/restart")
        assert response.status_code == 200, response.text
        final = await wait_done(alice, run["id"])
        assert final["status"] == "completed" and isinstance(final["result"], str)
        agent = await get_json(alice, f"/v1/runs/{run['id']}/agents/0")
        assert agent["status"] == "completed" and agent["attempts"] == 2
        agent_events = [(e["type"], e["data"]["attempt"]) for e in await ndjson_events(alice, run["id"])
                        if e["type"].startswith("agent.")]
        assert agent_events == [("agent.queued", 1), ("agent.started", 1), ("agent.retrying", 2),
                                ("agent.started", 2), ("agent.completed", 2)]


# --- static checks and saved workflows -----------------------------------------------------------


async def test_check_returns_diagnostics_and_meta(alice: httpx.AsyncClient) -> None:
    with anyio.fail_after(10):
        good = await alice.post("/v1/check", json={"script": REVIEW + "const r = Math.random();\n"})
        assert good.status_code == 200, good.text
        body = good.json()
        assert body["ok"] is True and body["errors"] == []
        assert body["meta"]["name"] == "review" and body["meta"]["description"]
        assert [p["title"] for p in body["meta"]["phases"]] == ["Gather", "Review"]
        warning = body["warnings"][0]
        assert "Math.random" in warning["message"] and warning["line"] == REVIEW.count("\n") + 1

        bad = (await alice.post("/v1/check", json={"script": "return 1;\nconst = 2;"})).json()
        assert bad["ok"] is False and bad["errors"][0]["line"] == 2

        needs_meta = (await alice.post("/v1/check", json={"script": "return 1", "require_meta": True})).json()
        assert needs_meta["ok"] is False and "meta" in needs_meta["errors"][0]["message"]
        assert await run_count(alice) == 0  # checking runs nothing


async def test_saved_workflows_crud_and_runs(alice: httpx.AsyncClient, bob: httpx.AsyncClient) -> None:
    with anyio.fail_after(30):
        saved = await alice.put("/v1/workflows/greet", json={"script": GREET})
        assert saved.status_code == 200, saved.text
        assert saved.json()["name"] == "greet" and saved.json()["meta"]["description"] == "Greet someone"

        fetched = await get_json(bob, "/v1/workflows/greet")  # saved workflows are shared by the service
        assert fetched["script"] == GREET and fetched["meta"]["name"] == "greet"
        listed = (await get_json(alice, "/v1/workflows"))["workflows"]
        assert [w["name"] for w in listed] == ["greet"] and "script" not in listed[0]

        by_name = await alice.post("/v1/workflows/greet/runs", json={"args": {"who": "ada"}})
        assert by_name.status_code == 202, by_name.text
        done = await wait_done(alice, by_name.json()["id"])
        assert done["status"] == "completed" and done["result"] == "hello ada!"
        assert done["workflow"] == "greet"

        waited = await alice.post("/v1/workflows/greet/runs", params={"wait": "true"}, json={"args": {"who": "lin"}})
        assert waited.status_code == 200 and waited.json()["result"] == "hello lin!"
        via_body = await alice.post("/v1/runs", params={"wait": "true"},
                                    json={"workflow": "greet", "args": {"who": "kay"}})
        assert via_body.status_code == 200 and via_body.json()["result"] == "hello kay!"

        parent = await alice.post("/v1/runs", params={"wait": "true"}, json={
            "script": "const a = await workflow('greet', { who: 'bo' }); return a + ' / parent';"})
        assert parent.status_code == 200, parent.text
        assert parent.json()["status"] == "completed" and parent.json()["result"] == "hello bo! / parent"
        child_agents = (await get_json(alice, f"/v1/runs/{parent.json()['id']}/agents"))["agents"]
        assert [a["phase"] for a in child_agents] == ["▸ greet"]

        updated = GREET.replace("'hello '", "'hi '")
        assert (await alice.put("/v1/workflows/greet", json={"script": updated})).status_code == 200
        assert (await get_json(alice, "/v1/workflows/greet"))["script"] == updated

        deleted = await alice.delete("/v1/workflows/greet")
        assert deleted.status_code == 204 and deleted.content == b""
        assert_error(await alice.get("/v1/workflows/greet"), 404, "workflow_not_found")
        assert (await get_json(alice, "/v1/workflows"))["workflows"] == []
        assert_error(await alice.post("/v1/workflows/greet/runs", json={}), 404, "workflow_not_found")


# --- system routes -------------------------------------------------------------------------------


async def test_openapi_docs_health_metrics(service: Service, alice: httpx.AsyncClient) -> None:
    with anyio.fail_after(20):
        await alice.post("/v1/runs", params={"wait": "true"}, json={"script": "return 1"})
        async with service.client(None) as anonymous:
            spec = await get_json(anonymous, "/openapi.json")
            paths = set(spec["paths"])
            for path in (
                "/v1/runs", "/v1/runs/{run_id}", "/v1/runs/{run_id}/events", "/v1/runs/{run_id}/agents",
                "/v1/runs/{run_id}/agents/{index}", "/v1/runs/{run_id}/pause", "/v1/runs/{run_id}/resume",
                "/v1/runs/{run_id}/cancel", "/v1/runs/{run_id}/agents/{index}/stop",
                "/v1/runs/{run_id}/agents/{index}/restart", "/v1/check", "/v1/workflows",
                "/v1/workflows/{name}", "/v1/workflows/{name}/runs",
            ):
                assert path in paths, path
            assert {"get", "put", "delete"} <= set(spec["paths"]["/v1/workflows/{name}"])

            docs = await anonymous.get("/docs")
            assert docs.status_code == 200 and docs.headers["content-type"].startswith("text/html")
            assert "openapi.json" in docs.text

            health = await get_json(anonymous, "/healthz")
            assert health["status"] == "ok"

            metrics = await anonymous.get("/metrics")
            assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
            assert 'quickflow_runs{status="completed"} 1.0' in metrics.text
            assert "quickflow_agents_in_flight" in metrics.text
            assert "quickflow_isolate_evictions_total" in metrics.text
            assert "quickflow_slice_overruns_total 0.0" in metrics.text
            assert "quickflow_slices_overrunning 0.0" in metrics.text


async def test_dashboard_is_served_at_root(service: Service) -> None:
    with anyio.fail_after(10):
        async with service.client(None) as anonymous:
            page = await anonymous.get("/")
            assert page.status_code == 200, page.text
            assert page.headers["content-type"].startswith("text/html")
            assert "<html" in page.text.lower()


async def test_healthz_is_503_while_the_store_cannot_commit(service: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    # A stuck store stalls every run that journals; an orchestrator polling /healthz hears of it.
    monkeypatch.setattr(system, "STORE_STALL_S", 0.3)
    store = service.server.config.app.state.engine.store
    with anyio.fail_after(20):
        async with service.client(None) as anonymous, service.client("alice") as alice:
            assert (await anonymous.get("/healthz")).status_code == 200
            os.kill(store.writer_pid, signal.SIGSTOP)
            stopped_at = time.monotonic()
            try:
                with pytest.raises(httpx.ReadTimeout):  # the new run's record waits for its commit
                    await alice.post("/v1/runs", json={"script": "return 1"}, timeout=1.0)
                health = await anonymous.get("/healthz")
                metrics = (await anonymous.get("/metrics")).text
                stopped_for = time.monotonic() - stopped_at
            finally:
                os.kill(store.writer_pid, signal.SIGCONT)
            assert health.status_code == 503, health.text
            assert health.json()["status"] == "unavailable"
            assert "has not committed a write for" in health.json()["reason"]
            gauge = next(line for line in metrics.splitlines()
                         if line.startswith("quickflow_store_commit_wait_seconds "))
            # The health check saw the wait past STORE_STALL_S; the gauge, read after it, cannot
            # show less, nor more than the writer has been stopped.
            assert system.STORE_STALL_S <= float(gauge.split()[-1]) <= stopped_for
            while (await anonymous.get("/healthz")).status_code != 200:  # committed once it runs again
                await anyio.sleep(0.05)
            assert (await alice.get("/v1/runs")).json()["runs"][0]["status"] in TERMINAL | {"queued", "running"}
