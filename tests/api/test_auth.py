"""Bearer auth and isolation between owners: another owner's run is invisible (404), the admin sees all."""

from __future__ import annotations

import logging

import anyio
import httpx
import pytest

from .conftest import (
    ADMIN,
    ALICE,
    BOB,
    Service,
    assert_error,
    start_run,
    wait_done,
    wait_for_event,
)

pytestmark = pytest.mark.anyio

SLOW = {"simulate": {"latency_ms": 600_000}}

PROTECTED = [
    ("GET", "/v1/runs"),
    ("POST", "/v1/runs"),
    ("GET", "/v1/runs/run_x"),
    ("GET", "/v1/runs/run_x/events"),
    ("POST", "/v1/runs/run_x/cancel"),
    ("GET", "/v1/workflows"),
    ("PUT", "/v1/workflows/x"),
    ("POST", "/v1/check"),
]


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer not-a-token", f"Bearer {ALICE}x", f"Basic {ALICE}", "Bearer", ALICE],
    ids=["missing", "unknown", "prefix-of-nothing", "basic-scheme", "empty-bearer", "no-scheme"],
)
async def test_requests_without_a_valid_token_are_401(service: Service, authorization: str | None) -> None:
    headers = {"Authorization": authorization} if authorization is not None else {}
    with anyio.fail_after(15):
        async with httpx.AsyncClient(base_url=service.url, headers=headers) as client:
            for method, path in PROTECTED:
                response = await client.request(method, path, json={"script": "return 1"})
                error = assert_error(response, 401, "unauthorized")
                assert response.headers["www-authenticate"].lower().startswith("bearer"), (method, path)
                assert ALICE not in error["message"]
        async with service.client("admin") as admin:
            assert (await admin.get("/v1/runs")).json()["runs"] == []  # nothing was created


async def test_public_endpoints_need_no_token(service: Service) -> None:
    with anyio.fail_after(15):
        async with service.client(None) as anonymous:
            assert (await anonymous.get("/healthz")).status_code == 200
            assert (await anonymous.get("/openapi.json")).status_code == 200


async def test_runs_are_invisible_to_other_owners_and_visible_to_admin(service: Service) -> None:
    with anyio.fail_after(30):
        async with service.client("alice") as alice, service.client("bob") as bob, service.client("admin") as admin:
            finished = await start_run(alice, "return await agent('finished work')")
            await wait_done(alice, finished["id"])
            live = await start_run(alice, "return await agent('slow work')", options=SLOW)
            await wait_for_event(alice, live["id"], lambda e: e["type"] == "agent.started")
            bobs = await start_run(bob, "return 'bob'")
            await wait_done(bob, bobs["id"])

            for run_id in (finished["id"], live["id"]):
                attempts = [
                    ("GET", f"/v1/runs/{run_id}", None),
                    ("GET", f"/v1/runs/{run_id}/events", None),
                    ("GET", f"/v1/runs/{run_id}/events?format=ndjson", None),
                    ("GET", f"/v1/runs/{run_id}/agents", None),
                    ("GET", f"/v1/runs/{run_id}/agents/0", None),
                    ("POST", f"/v1/runs/{run_id}/pause", None),
                    ("POST", f"/v1/runs/{run_id}/resume", None),
                    ("POST", f"/v1/runs/{run_id}/cancel", None),
                    ("POST", f"/v1/runs/{run_id}/agents/0/stop", None),
                    ("POST", f"/v1/runs/{run_id}/agents/0/restart", None),
                    ("POST", "/v1/runs", {"resume_from": run_id}),
                    ("POST", "/v1/runs", {"script": "return 2", "resume_from": run_id}),
                ]
                for method, path, body in attempts:
                    response = await bob.request(method, path, json=body)
                    error = assert_error(response, 404, "run_not_found")
                    assert run_id in error["message"], (method, path)
                    # The same answer as for a run that does not exist: nothing reveals it is there.
                    missing = await bob.request(method, path.replace(run_id, "run_00000000000000000000"), json=body)
                    assert missing.status_code == 404 and missing.json()["error"]["code"] == "run_not_found"

            # Listing: each owner sees exactly their own runs, in every status filter; the admin sees all.
            bob_ids = {r["id"] for r in (await bob.get("/v1/runs")).json()["runs"]}
            assert bob_ids == {bobs["id"]}
            assert (await bob.get("/v1/runs", params={"status": "running"})).json()["runs"] == []
            alice_ids = {r["id"] for r in (await alice.get("/v1/runs")).json()["runs"]}
            assert alice_ids == {finished["id"], live["id"]}
            admin_runs = {r["id"]: r for r in (await admin.get("/v1/runs")).json()["runs"]}
            assert set(admin_runs) == {finished["id"], live["id"], bobs["id"]}
            assert admin_runs[live["id"]]["owner"] == "alice" and admin_runs[bobs["id"]]["owner"] == "bob"

            # Bob's failed attempts changed nothing: alice's live run is still running.
            still = (await alice.get(f"/v1/runs/{live['id']}")).json()
            assert still["status"] == "running"
            assert (await alice.get(f"/v1/runs/{live['id']}/agents/0")).json()["status"] == "running"

            # The admin reads and controls alice's run.
            assert (await admin.get(f"/v1/runs/{finished['id']}")).json()["result"] is not None
            assert len((await admin.get(f"/v1/runs/{finished['id']}/agents")).json()["agents"]) == 1
            paused = await admin.post(f"/v1/runs/{live['id']}/pause")
            assert paused.status_code == 200 and paused.json()["status"] == "paused", paused.text
            resumed = await admin.post(f"/v1/runs/{live['id']}/resume")
            assert resumed.status_code == 200 and resumed.json()["status"] == "running", resumed.text
            cancelled = await admin.post(f"/v1/runs/{live['id']}/cancel")
            assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled", cancelled.text
            assert (await alice.get(f"/v1/runs/{live['id']}")).json()["status"] == "cancelled"
            # Ownership stays with alice: the admin acting on it does not hand it over.
            assert (await admin.get(f"/v1/runs/{live['id']}")).json()["owner"] == "alice"


async def test_idempotency_keys_and_resume_stay_within_an_owner(service: Service) -> None:
    with anyio.fail_after(20):
        async with service.client("alice") as alice, service.client("bob") as bob:
            mine = await alice.post("/v1/runs", json={"script": "return 'a'", "idempotency_key": "shared"})
            theirs = await bob.post("/v1/runs", json={"script": "return 'b'", "idempotency_key": "shared"})
            assert mine.status_code == theirs.status_code == 202
            assert mine.json()["id"] != theirs.json()["id"]
            assert theirs.json()["owner"] == "bob"
            # Bob's key did not hand him alice's run, and his own run carries his script.
            done = await wait_done(bob, theirs.json()["id"])
            assert done["result"] == "b"


async def test_tokens_never_reach_the_logs(service: Service, caplog: pytest.LogCaptureFixture,
                                           capfd: pytest.CaptureFixture[str]) -> None:
    wrong = "wrong-tok-5e1f0c2b7a"
    caplog.set_level(logging.DEBUG)
    with anyio.fail_after(30):
        async with service.client("alice") as alice, service.client("bob") as bob, service.client("admin") as admin:
            run = await start_run(alice, "log('working'); return await agent('x')")
            await wait_done(alice, run["id"])
            await bob.get(f"/v1/runs/{run['id']}")  # 404
            await admin.get(f"/v1/runs/{run['id']}/agents/0")
            await admin.post(f"/v1/runs/{run['id']}/pause")  # 409
            await alice.post("/v1/runs", json={"script": "let x: number = 1"})  # 422
            await alice.post("/v1/runs", content=b"{", headers={"Content-Type": "application/json"})  # 400
            async with service.client(None, token=wrong) as intruder:
                assert (await intruder.get("/v1/runs")).status_code == 401
            async with httpx.AsyncClient(base_url=service.url,
                                         headers={"Authorization": f"Basic {ALICE}"}) as basic:
                assert (await basic.get("/v1/runs")).status_code == 401
            stored = (await admin.get(f"/v1/runs/{run['id']}")).text

    out, err = capfd.readouterr()
    logged = caplog.text + "\n".join(str(r.args) for r in caplog.records) + out + err
    # The capture is not vacuous: the server's access log saw these requests.
    assert any(r.name.startswith("uvicorn") and "/v1/runs" in r.getMessage() for r in caplog.records), caplog.text
    for token in (ALICE, BOB, ADMIN, wrong):
        assert token not in logged, f"a bearer token appeared in the server's output: {token}"
        assert token not in stored
