"""A real quickflow server on loopback for the HTTP API tests.

Each test gets its own service: ``create_app`` over a SQLite store in ``tmp_path``, served by a
real ``uvicorn.Server`` on a socket bound to ``('127.0.0.1', 0)``. Readiness is a signal
(``server.started``, then ``GET /healthz`` answering 200), never a fixed sleep; shutdown sets
``should_exit`` and waits for the server task, so the lifespan (engine, store) closes inside the
test's task group.
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import uvicorn

from api.app import create_app
from runtime.config import load_settings

ALICE = "alice-tok-7f3c9d1e5b"
BOB = "bob-tok-2a8e6c4f0d"
ADMIN = "root-tok-9b1d7e3a5c"
TOKENS = {"alice": ALICE, "bob": BOB, "admin": ADMIN}

TERMINAL = {"completed", "failed", "cancelled"}


@dataclass
class Service:
    """A running server: its base URL and a way to get clients for the configured tokens."""

    url: str
    server: uvicorn.Server

    def client(self, who: str | None = "alice", *, token: str | None = None, **kwargs: Any) -> httpx.AsyncClient:
        headers: dict[str, str] = {}
        secret = token if token is not None else (TOKENS[who] if who else None)
        if secret is not None:
            headers["Authorization"] = f"Bearer {secret}"
        kwargs.setdefault("timeout", 15.0)
        return httpx.AsyncClient(base_url=self.url, headers=headers, **kwargs)


@asynccontextmanager
async def serve(data_dir: Path, **overrides: Any) -> AsyncIterator[Service]:
    """Start a server with alice, bob and admin tokens; ``overrides`` go to ``load_settings``."""
    settings = load_settings(
        data_dir=data_dir,
        tokens=f"alice:{ALICE},bob:{BOB}",
        admin_token=ADMIN,
        default_backend="simulate",
        **overrides,
    )
    app = create_app(settings)
    # IPPROTO_TCP, not 0: asyncio only sets TCP_NODELAY on accepted sockets whose proto says TCP;
    # without it, Nagle + delayed ACK add ~40 ms to every request on a kept-alive connection.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    # log_config=None: uvicorn's loggers propagate to the root logger, so caplog sees them.
    config = uvicorn.Config(app, lifespan="on", log_config=None, access_log=True, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    url = f"http://127.0.0.1:{port}"
    try:
        async with anyio.create_task_group() as tg:
            done = anyio.Event()

            async def run() -> None:
                try:
                    await server.serve(sockets=[sock])
                finally:
                    done.set()

            tg.start_soon(run)
            with anyio.fail_after(15):
                while not server.started:
                    if done.is_set():
                        raise RuntimeError("the server exited during startup")
                    await anyio.sleep(0.01)
                async with httpx.AsyncClient(base_url=url) as probe:
                    while (await probe.get("/healthz")).status_code != 200:
                        await anyio.sleep(0.01)
            try:
                yield Service(url, server)
            finally:
                server.should_exit = True
                with anyio.fail_after(15, shield=True):
                    await done.wait()
    finally:
        sock.close()


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[Service]:
    async with serve(tmp_path) as svc:
        yield svc


@pytest.fixture
async def alice(service: Service) -> AsyncIterator[httpx.AsyncClient]:
    async with service.client("alice") as client:
        yield client


@pytest.fixture
async def bob(service: Service) -> AsyncIterator[httpx.AsyncClient]:
    async with service.client("bob") as client:
        yield client


@pytest.fixture
async def admin(service: Service) -> AsyncIterator[httpx.AsyncClient]:
    async with service.client("admin") as client:
        yield client


# --- helpers shared by the API tests ---------------------------------------------------------


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """The response is the shared error shape ``{error: {code, message, details?}}``; return ``error``."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error.get("code"), str) and error["code"], body
    assert isinstance(error.get("message"), str) and error["message"], body
    assert set(error) <= {"code", "message", "details"}, body
    if code is not None:
        assert error["code"] == code, body
    return error


async def start_run(client: httpx.AsyncClient, script: str, **body: Any) -> dict[str, Any]:
    response = await client.post("/v1/runs", json={"script": script, **body})
    assert response.status_code == 202, response.text
    return response.json()


async def wait_done(client: httpx.AsyncClient, run_id: str) -> dict[str, Any]:
    """Follow the run's NDJSON event stream to its end (the server closes it), then read the run."""
    async with client.stream("GET", f"/v1/runs/{run_id}/events", params={"format": "ndjson"}) as response:
        assert response.status_code == 200
        async for _ in response.aiter_lines():
            pass
    response = await client.get(f"/v1/runs/{run_id}")
    assert response.status_code == 200, response.text
    run = response.json()
    assert run["status"] in TERMINAL, run
    return run


async def ndjson_events(client: httpx.AsyncClient, run_id: str, **params: Any) -> list[dict[str, Any]]:
    """The run's events as NDJSON (ends when the run has ended)."""
    events: list[dict[str, Any]] = []
    async with client.stream("GET", f"/v1/runs/{run_id}/events", params={"format": "ndjson", **params}) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if line.strip():
                events.append(json.loads(line))
    return events


async def wait_for_event(client: httpx.AsyncClient, run_id: str, predicate: Any) -> dict[str, Any]:
    """Follow the run's events until one matches ``predicate``; return it."""
    async with client.stream("GET", f"/v1/runs/{run_id}/events", params={"format": "ndjson"}) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.strip():
                event = json.loads(line)
                if predicate(event):
                    return event
    raise AssertionError(f"run {run_id} ended without the awaited event")


async def run_count(client: httpx.AsyncClient) -> int:
    """How many runs the caller can see (all of them, following ``next``)."""
    total, cursor = 0, None
    while True:
        params: Mapping[str, Any] = {"limit": 500, **({"before": cursor} if cursor else {})}
        response = await client.get("/v1/runs", params=params)
        assert response.status_code == 200, response.text
        page = response.json()
        total += len(page["runs"])
        cursor = page["next"]
        if cursor is None:
            return total
