"""Bad input, table-driven: every rejected request answers the shared error shape and changes nothing.

The cases share one server that holds a completed run, a running run (its one agent sleeps far
longer than the test) and a saved workflow; the store is snapshotted before each request and
compared after it, so a case that changed anything fails (and cannot leak into the next).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from runtime import eventloop

from .conftest import assert_error, serve, start_run, wait_done, wait_for_event

pytestmark = pytest.mark.anyio

WORKFLOW = """export const meta = { name: 'greet', description: 'Say hello' };
return 'hello ' + (args && args.who);
"""

SCRIPT_LIMIT = 512 * 1024
ARGS_LIMIT = 1024 * 1024


@dataclass
class World:
    client: httpx.AsyncClient
    admin: httpx.AsyncClient
    ids: dict[str, str] = field(default_factory=dict)

    async def snapshot(self) -> dict[str, Any]:
        """What a rejected request must not change: every run (id, status) and every saved workflow."""
        runs = (await self.admin.get("/v1/runs", params={"limit": 500})).json()
        workflows = (await self.admin.get("/v1/workflows")).json()
        greet = (await self.admin.get("/v1/workflows/greet")).json()
        done_agents = (await self.admin.get(f"/v1/runs/{self.ids['done']}/agents")).json()
        return {
            "runs": sorted((r["id"], r["status"]) for r in runs["runs"]),
            "workflows": workflows,
            "greet": greet,
            "done_agents": done_agents,
        }


@pytest.fixture(scope="module")
def anyio_backend() -> tuple[str, dict[str, Any]]:
    """Module-wide, so one server serves the whole table (the store snapshot keeps cases independent).
    On the loop the service runs on, as everywhere (tests/conftest.py)."""
    return "asyncio", eventloop.run_options()


@pytest.fixture(scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    async with serve(tmp_path_factory.mktemp("bad-input")) as service, \
            service.client("alice") as client, service.client("admin") as admin:
        with anyio.fail_after(20):
            done = await start_run(client, "return await agent('one quick agent')", idempotency_key="first")
            await wait_done(client, done["id"])
            running = await start_run(client, "return await agent('a very slow agent')",
                                      options={"simulate": {"latency_ms": 600_000}})
            await wait_for_event(client, running["id"], lambda e: e["type"] == "agent.started")
            saved = await client.put("/v1/workflows/greet", json={"script": WORKFLOW})
            assert saved.status_code == 200, saved.text
        yield World(client, admin, {"done": done["id"], "running": running["id"]})


def _diagnostic_at(line: int, column: int, text: str) -> Callable[[dict[str, Any]], None]:
    def check(error: dict[str, Any]) -> None:
        first = error["details"]["diagnostics"][0]
        assert (first["line"], first["column"]) == (line, column), first
        assert text in first["message"], first

    return check


def _problem_at(location: str) -> Callable[[dict[str, Any]], None]:
    def check(error: dict[str, Any]) -> None:
        locations = [p["location"] for p in error["details"]["problems"]]
        assert location in locations, error
        assert all(p["message"] for p in error["details"]["problems"]), error

    return check


def _message_has(text: str) -> Callable[[dict[str, Any]], None]:
    def check(error: dict[str, Any]) -> None:
        assert text in error["message"], error

    return check


def _has_diagnostics(error: dict[str, Any]) -> None:
    diagnostics = error["details"]["diagnostics"]
    assert diagnostics and all({"line", "column", "message"} <= set(d) for d in diagnostics), error


@dataclass(frozen=True)
class Case:
    id: str
    method: str
    path: str
    status: int
    code: str
    json: Any = None
    content: bytes | None = None
    headers: dict[str, str] | None = None
    check: Callable[[dict[str, Any]], None] | None = None


RUN = "/v1/runs"

CASES = [
    # -- malformed or mistyped bodies
    Case("malformed-json", "POST", RUN, 400, "invalid_json", content=b'{"script": "return 1",',
         headers={"Content-Type": "application/json"}),
    Case("not-json-at-all", "POST", RUN, 400, "invalid_json", content=b"return 1",
         headers={"Content-Type": "application/json"}),
    Case("body-not-utf8", "POST", RUN, 400, "invalid_json", content=b'{"script": "return \xff\xfe"}',
         headers={"Content-Type": "application/json"}),
    Case("json-nested-too-deeply", "POST", RUN, 400, "invalid_json",
         content=b'{"script": "return 1", "args": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
         headers={"Content-Type": "application/json"}),
    Case("empty-body", "POST", RUN, 422, "invalid_request", content=b"", headers={"Content-Type": "application/json"}),
    Case("args-nan", "POST", RUN, 422, "invalid_request", content=b'{"script": "return args", "args": {"x": [NaN]}}',
         headers={"Content-Type": "application/json"}, check=_problem_at("args")),
    Case("option-infinity", "POST", RUN, 422, "invalid_request",
         content=b'{"script": "return 1", "options": {"simulate": {"latency_ms": Infinity}}}',
         headers={"Content-Type": "application/json"}, check=_problem_at("options")),
    Case("workflow-run-args-nan", "POST", "/v1/workflows/greet/runs", 422, "invalid_request",
         content=b'{"args": {"who": -Infinity}}', headers={"Content-Type": "application/json"},
         check=_problem_at("args")),
    Case("idempotency-header-too-long", "POST", RUN, 422, "invalid_request", json={"script": "return 1"},
         headers={"Idempotency-Key": "k" * 201}),
    Case("idempotency-field-too-long", "POST", RUN, 422, "invalid_request",
         json={"script": "return 1", "idempotency_key": "k" * 201}, check=_problem_at("idempotency_key")),
    Case("method-not-allowed", "DELETE", RUN, 405, "method_not_allowed"),
    Case("script-not-a-string", "POST", RUN, 422, "invalid_request", json={"script": 42}, check=_problem_at("script")),
    Case("options-not-an-object", "POST", RUN, 422, "invalid_request",
         json={"script": "return 1", "options": "fast"}, check=_problem_at("options")),
    Case("body-is-a-list", "POST", RUN, 422, "invalid_request", json=["return 1"]),
    Case("unknown-body-field", "POST", RUN, 422, "invalid_request",
         json={"script": "return 1", "scirpt": "return 2"}, check=_problem_at("scirpt")),
    Case("neither-script-nor-workflow", "POST", RUN, 422, "invalid_request", json={"args": 1}),
    Case("check-unknown-field", "POST", "/v1/check", 422, "invalid_request",
         json={"script": "return 1", "strict": True}, check=_problem_at("strict")),
    # -- limits
    Case("script-over-512KiB", "POST", RUN, 422, "script_rejected",
         json={"script": "return 1;\n//" + "x" * SCRIPT_LIMIT}, check=_diagnostic_at(1, 1, "limit")),
    Case("args-over-limit", "POST", RUN, 422, "invalid_request",
         json={"script": "return args.length", "args": "x" * ARGS_LIMIT}, check=_message_has("args")),
    # -- static checks
    Case("typescript", "POST", RUN, 422, "script_rejected",
         json={"script": "const a = 1;\nlet total: number = a;\nreturn total;"},
         check=_diagnostic_at(2, 10, "TypeScript syntax is not supported")),
    Case("import-statement", "POST", RUN, 422, "script_rejected",
         json={"script": "const x = 1;\n  import fs from 'fs';\nreturn x;"}, check=_diagnostic_at(2, 3, "import")),
    Case("require-call", "POST", RUN, 422, "script_rejected",
         json={"script": "const fs = require('fs');\nreturn 1;"}, check=_has_diagnostics),
    Case("syntax-error", "POST", RUN, 422, "script_rejected",
         json={"script": "return (1 + ;"}, check=_has_diagnostics),
    # -- options
    Case("unknown-option", "POST", RUN, 422, "invalid_request",
         json={"script": "return 1", "options": {"turbo": True}}, check=_message_has("turbo")),
    Case("concurrency-0", "POST", RUN, 422, "invalid_request",
         json={"script": "return 1", "options": {"concurrency": 0}}, check=_message_has("concurrency")),
    Case("concurrency-not-int", "POST", RUN, 422, "invalid_request",
         json={"script": "return 1", "options": {"concurrency": "4"}}, check=_message_has("concurrency")),
    Case("backend-nope", "POST", RUN, 422, "invalid_request",
         json={"script": "return 1", "options": {"backend": "nope"}}, check=_message_has("nope")),
    Case("simulate-latency-negative", "POST", RUN, 422, "invalid_request",
         json={"script": "return 1", "options": {"simulate": {"latency_ms": -1}}}, check=_message_has("latency_ms")),
    Case("simulate-responses-null", "POST", RUN, 422, "invalid_request",
         json={"script": "return 1", "options": {"simulate": {"responses": None}}}, check=_message_has("responses")),
    Case("simulate-response-bad-regex", "POST", RUN, 422, "invalid_request",
         json={"script": "return 1", "options": {"simulate": {"responses": [{"match": "(", "text": "x"}]}}},
         check=_message_has("bad regular expression")),
    Case("timeout-zero", "POST", RUN, 422, "invalid_request",
         json={"script": "return 1", "options": {"timeout_s": 0}}, check=_message_has("timeout_s")),
    Case("resume-mode-sideways", "POST", RUN, 422, "invalid_request",
         json={"script": "return 1", "resume_from": "<done>", "resume_mode": "sideways"},
         check=_problem_at("resume_mode")),
    # -- unknown things
    Case("unknown-run", "GET", "/v1/runs/run_doesnotexist", 404, "run_not_found"),
    Case("unknown-run-events", "GET", "/v1/runs/run_doesnotexist/events", 404, "run_not_found"),
    Case("unknown-run-agents", "GET", "/v1/runs/run_doesnotexist/agents", 404, "run_not_found"),
    Case("unknown-run-pause", "POST", "/v1/runs/run_doesnotexist/pause", 404, "run_not_found"),
    Case("unknown-resume-from", "POST", RUN, 404, "run_not_found",
         json={"resume_from": "run_doesnotexist"}),
    Case("unknown-agent", "GET", "/v1/runs/<done>/agents/7", 404, "agent_not_found"),
    Case("unknown-agent-stop", "POST", "/v1/runs/<running>/agents/7/stop", 404, "agent_not_found"),
    Case("unknown-workflow", "GET", "/v1/workflows/nope", 404, "workflow_not_found", check=_message_has("greet")),
    Case("unknown-workflow-run", "POST", "/v1/workflows/nope/runs", 404, "workflow_not_found", json={}),
    Case("unknown-workflow-delete", "DELETE", "/v1/workflows/nope", 404, "workflow_not_found"),
    Case("unknown-workflow-by-body", "POST", RUN, 404, "workflow_not_found", json={"workflow": "nope"}),
    Case("unknown-route", "GET", "/v1/nothing-here", 404, "not_found"),
    Case("unknown-list-cursor", "GET", "/v1/runs?before=run_doesnotexist", 422, "invalid_request",
         check=_message_has("unknown cursor")),
    Case("idempotency-key-reused-for-another-script", "POST", RUN, 409, "conflict",
         json={"script": "return 2", "idempotency_key": "first"}, check=_message_has("different script")),
    # -- controls in the wrong state
    Case("pause-completed", "POST", "/v1/runs/<done>/pause", 409, "invalid_run_state"),
    Case("resume-completed", "POST", "/v1/runs/<done>/resume", 409, "invalid_run_state"),
    Case("cancel-completed", "POST", "/v1/runs/<done>/cancel", 409, "invalid_run_state"),
    Case("resume-running", "POST", "/v1/runs/<running>/resume", 409, "invalid_run_state"),
    Case("stop-agent-of-completed-run", "POST", "/v1/runs/<done>/agents/0/stop", 409, "invalid_run_state"),
    Case("resume-from-a-live-run", "POST", RUN, 409, "resume_conflict", json={"resume_from": "<running>"}),
    # -- events
    Case("last-event-id-abc", "GET", "/v1/runs/<done>/events", 422, "invalid_request",
         headers={"Last-Event-ID": "abc"}, check=_message_has("Last-Event-ID")),
    Case("after-negative", "GET", "/v1/runs/<done>/events?after=-1", 422, "invalid_request"),
    Case("format-xml", "GET", "/v1/runs/<done>/events?format=xml", 422, "invalid_request"),
    # -- listing
    Case("list-bad-status", "GET", "/v1/runs?status=sleeping", 422, "invalid_request"),
    Case("list-limit-0", "GET", "/v1/runs?limit=0", 422, "invalid_request"),
    # -- saved workflows
    Case("put-workflow-name-mismatch", "PUT", "/v1/workflows/other", 422, "invalid_request",
         json={"script": WORKFLOW.replace("'Say hello'", "'changed'")}, check=_message_has("greet")),
    Case("put-workflow-without-meta", "PUT", "/v1/workflows/greet", 422, "script_rejected",
         json={"script": "return 'hello';"}, check=_has_diagnostics),
    Case("put-workflow-meta-not-first", "PUT", "/v1/workflows/greet", 422, "script_rejected",
         json={"script": "const x = 1;\n" + WORKFLOW}, check=_has_diagnostics),
    Case("put-workflow-typescript", "PUT", "/v1/workflows/greet", 422, "script_rejected",
         json={"script": WORKFLOW + "let n: number = 1;\n"}, check=_diagnostic_at(3, 6, "TypeScript")),
    Case("put-workflow-no-script", "PUT", "/v1/workflows/greet", 422, "invalid_request", json={},
         check=_problem_at("script")),
]


def _fill(value: Any, ids: dict[str, str]) -> Any:
    """Replace the ``<done>`` / ``<running>`` placeholders with the world's run ids."""
    if isinstance(value, str):
        for name, run_id in ids.items():
            value = value.replace(f"<{name}>", run_id)
        return value
    if isinstance(value, dict):
        return {k: _fill(v, ids) for k, v in value.items()}
    return value


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_rejected_request_changes_nothing(world: World, case: Case) -> None:
    with anyio.fail_after(20):
        before = await world.snapshot()
        kwargs: dict[str, Any] = {"headers": case.headers}
        if case.json is not None:
            kwargs["json"] = _fill(case.json, world.ids)
        if case.content is not None:
            kwargs["content"] = case.content
        response = await world.client.request(case.method, _fill(case.path, world.ids), **kwargs)
        error = assert_error(response, case.status, case.code)
        if case.check is not None:
            case.check(error)
        assert await world.snapshot() == before


async def test_oversize_body_is_413_with_and_without_content_length(tmp_path: Path) -> None:
    limit = 4096
    body = b'{"script": "return 1", "args": "' + b"x" * (2 * limit) + b'"}'

    async def chunked() -> AsyncIterator[bytes]:
        # A generator body has no length: httpx sends it with Transfer-Encoding: chunked.
        for start in range(0, len(body), 1000):
            yield body[start:start + 1000]

    with anyio.fail_after(30):
        async with serve(tmp_path, max_body_bytes=limit) as svc, svc.client("alice") as client:
            declared = await client.post("/v1/runs", content=body, headers={"Content-Type": "application/json"})
            assert declared.request.headers["content-length"] == str(len(body))
            assert_error(declared, 413, "body_too_large")

            streamed = await client.post("/v1/runs", content=chunked(), headers={"Content-Type": "application/json"})
            assert "content-length" not in streamed.request.headers
            assert streamed.request.headers["transfer-encoding"] == "chunked"
            assert_error(streamed, 413, "body_too_large")

            put = await client.put("/v1/workflows/big", content=chunked(), headers={"Content-Type": "application/json"})
            assert_error(put, 413, "body_too_large")

            # Nothing was stored, and a body under the limit still works on the same server.
            listed = await client.get("/v1/runs")
            assert listed.json()["runs"] == []
            assert (await client.get("/v1/workflows")).json()["workflows"] == []
            small = await client.post("/v1/runs", params={"wait": "true"}, json={"script": "return 1"})
            assert small.status_code == 200, small.text
            assert small.json()["result"] == 1


async def test_check_reports_typescript_without_rejecting_the_request(alice: httpx.AsyncClient) -> None:
    """``POST /v1/check`` answers 200 with diagnostics: a bad script is its subject, not a bad request."""
    with anyio.fail_after(10):
        response = await alice.post("/v1/check", json={"script": "const a = 1;\nlet total: number = a;\n"})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["ok"] is False
        first = body["errors"][0]
        assert (first["line"], first["column"]) == (2, 10)
        assert "TypeScript" in first["message"] and first["hint"]


async def test_an_owner_with_stuck_slices_is_told_to_retry_later(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A script stuck inside one built-in call fails its run at the slice's deadline, but its thread
    # runs on until the call returns: while it does, its owner's next run is refused (429 with
    # Retry-After), and another owner's runs go on.
    import sandbox._isolate

    monkeypatch.setattr(sandbox._isolate, "OVERRUN_GRACE_S", 0.05)
    limits = {"slice_cpu_s": 0.05, "stuck_slices_per_owner": 1}
    with anyio.fail_after(30):
        async with serve(tmp_path, limits=limits) as svc, svc.client("alice") as alice, svc.client("bob") as bob:
            stuck = await alice.post("/v1/runs?wait=true", json={"script": "return Array(2 ** 25).sort().length"})
            assert stuck.json()["status"] == "failed" and stuck.json()["error"]["name"] == "cpu_slice"

            refused = await alice.post("/v1/runs", json={"script": "return 1"})
            error = assert_error(refused, 429, "too_many_stuck_runs")
            assert refused.headers["retry-after"] == "30"
            assert error["details"] == {"stuck": 1, "limit": 1}

            other = await bob.post("/v1/runs?wait=true", json={"script": "return 2"})
            assert other.json()["result"] == 2
            assert len((await alice.get("/v1/runs")).json()["runs"]) == 1  # the refused run was never stored
