"""The real HTTP service on loopback (issue 5, item 6).

``quickflow serve --port 0`` runs as a subprocess with its own data dir and daemon file; the
benchmark waits for its "quickflow listening on" line, reads the URL and the generated token from
the daemon file, and polls ``/healthz``. Then:

- ``runs_trial``: ``count`` trivial runs (``return 1``) through ``POST /v1/runs?wait=true`` from one
  ``httpx.AsyncClient`` with ``in_flight`` requests outstanding: per-request latency and runs/s;
- ``sse_trial``: one ``agents``-agent run, followed over ``GET /v1/runs/{id}/events`` (SSE) from
  right after its creation to the terminal event: events delivered per second.

Client and server share this machine's cores; the server logs at ``warning`` (no access log).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx

from .measure import percentile
from .scenarios import PARALLEL_SCRIPT, TRIVIAL_SCRIPT, options

__all__ = ["Server", "runs_trial", "serve", "sse_trial"]

READY_LINE = "quickflow listening on"
TERMINAL = {"run.completed", "run.failed", "run.cancelled"}


@dataclass
class Server:
    url: str
    token: str
    process: subprocess.Popen[str]

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def _drain(stream: Any, ready: threading.Event, lines: list[str]) -> None:
    """Read the server's output until it closes (a full pipe would stall the server)."""
    for line in stream:
        lines.append(line.rstrip())
        if READY_LINE in line:
            ready.set()


@contextmanager
def serve(start_timeout_s: float = 60) -> Iterator[Server]:
    """A ``quickflow serve --port 0`` subprocess on a temp data dir; terminated on exit."""
    tmp = Path(tempfile.mkdtemp(prefix="qf-http-bench-"))
    env = {k: v for k, v in os.environ.items()
           if k not in ("QUICKFLOW_TOKENS", "QUICKFLOW_ADMIN_TOKEN", "QUICKFLOW_URL", "QUICKFLOW_TOKEN")}
    env.update({"QUICKFLOW_DAEMON_FILE": str(tmp / "daemon.json"), "QUICKFLOW_LOG_LEVEL": "warning",
                "QUICKFLOW_DEFAULT_BACKEND": "simulate", "PYTHONUNBUFFERED": "1"})
    # `python -m api.cli` is the `quickflow` console script, run by this very interpreter.
    cmd = [sys.executable, "-m", "api.cli", "serve", "--host", "127.0.0.1", "--port", "0", "--data-dir",
           str(tmp / "data")]
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ready, lines = threading.Event(), list[str]()
    reader = threading.Thread(target=_drain, args=(process.stdout, ready, lines), name="serve-output")
    reader.start()
    try:
        if not ready.wait(start_timeout_s):
            raise RuntimeError("the server never said it was listening:\n" + "\n".join(lines[-20:]))
        info = json.loads((tmp / "daemon.json").read_text())
        server = Server(url=info["url"], token=info["token"], process=process)
        deadline = time.monotonic() + start_timeout_s
        while True:
            try:
                if httpx.get(server.url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("the server never became healthy:\n" + "\n".join(lines[-20:]))
            time.sleep(0.05)
        try:
            yield server
        except BaseException:
            # Whatever the server said last, and whether it is still there: a trial that fails
            # with a reset connection says nothing about why.
            print(f"the server (exit status {process.poll()}) said last:", *lines[-40:], sep="\n  ",
                  file=sys.stderr)
            raise
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        reader.join(timeout=5)
        shutil.rmtree(tmp, ignore_errors=True)


async def runs_trial(server: Server, *, count: int, in_flight: int) -> dict[str, float]:
    """``count`` ``POST /v1/runs?wait=true`` of ``return 1``, ``in_flight`` at a time."""
    body = {"script": TRIVIAL_SCRIPT, "options": {"backend": "simulate"}}
    latencies: list[float] = []
    failures: list[str] = []
    next_index = 0
    limits = httpx.Limits(max_connections=in_flight, max_keepalive_connections=in_flight)
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers, limits=limits,
                                 timeout=120) as client:
        async def worker() -> None:
            nonlocal next_index
            while next_index < count:
                next_index += 1
                t0 = time.perf_counter()
                response = await client.post("/v1/runs", params={"wait": "true"}, json=body)
                latencies.append(time.perf_counter() - t0)
                if response.status_code != 200 or response.json().get("result") != 1:
                    failures.append(f"{response.status_code} {response.text[:200]}")

        t0 = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for _ in range(in_flight):
                tg.start_soon(worker)
        wall = time.perf_counter() - t0
    if failures:
        raise RuntimeError(f"{len(failures)} of {count} runs failed, e.g. {failures[0]}")
    return {
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "runs_per_s": count / wall,
        "wall_s": wall,
    }


async def sse_trial(server: Server, *, agents: int, concurrency: int) -> dict[str, float]:
    """One ``agents``-agent run followed over SSE: events delivered per second until its terminal event."""
    body = {"script": PARALLEL_SCRIPT, "args": {"n": agents}, "options": options(concurrency, max_agents=agents)}
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=120) as client:
        created = await client.post("/v1/runs", json=body)
        created.raise_for_status()
        run_id = created.json()["id"]
        events = 0
        last_type = ""
        t0 = time.perf_counter()
        async with client.stream("GET", f"/v1/runs/{run_id}/events",
                                 headers={"Accept": "text/event-stream"}) as stream:
            stream.raise_for_status()
            async for line in stream.aiter_lines():
                if line.startswith("event:"):
                    last_type = line.partition(":")[2].strip()
                elif line.startswith("data:"):
                    events += 1
                    if last_type in TERMINAL:
                        break
        wall = time.perf_counter() - t0
    if last_type != "run.completed":
        raise RuntimeError(f"SSE stream of {run_id} ended with {last_type!r} after {events} events")
    return {"events": float(events), "wall_s": wall, "events_per_s": events / wall}
