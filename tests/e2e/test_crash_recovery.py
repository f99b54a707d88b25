"""Crash recovery, the acceptance test (SPEC §3.3): SIGKILL ``quickflow serve`` mid-run, start it again.

The server runs as a real subprocess on port 0 with its data directory in ``tmp_path``. The
simulate backend appends one line per execution to ``QUICKFLOW_SIMULATE_RECORD``, across both
processes, so the test counts how often each agent really ran. What was journaled at the kill
is read straight from the SQLite file (read-only), not from the server's own account.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

T = TypeVar("T")

AGENTS = 200
CONCURRENCY = 8
SCRIPT = (
    f"const r = await parallel(Array.from({{length: {AGENTS}}}, (_, i) => () => agent('job-' + String(i).padStart(3, '0'))))\n"
    "return r\n"
)
OPTIONS = {"backend": "simulate", "concurrency": CONCURRENCY, "simulate": {"latency_ms": 50}}


def quickflow_command() -> list[str]:
    """The installed ``quickflow`` script of this interpreter, else the same entry point through -m."""
    script = Path(sys.executable).with_name("quickflow")
    return [str(script)] if script.exists() else [sys.executable, "-m", "api.cli"]


def wait_for(what: str, check: Callable[[], T | None], timeout: float = 20.0, interval: float = 0.02) -> T:
    """Poll ``check`` until it returns something other than None/False; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


class Server:
    """One ``quickflow serve`` process on a data directory; start it again after a kill."""

    def __init__(self, tmp_path: Path) -> None:
        self.data_dir = tmp_path / "data"
        self.daemon_file = tmp_path / "daemon.json"
        self.exec_log = tmp_path / "exec.log"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("QUICKFLOW_", "ANTHROPIC_"))}
        self.env.update(
            QUICKFLOW_DAEMON_FILE=str(self.daemon_file),
            QUICKFLOW_SIMULATE_RECORD=str(self.exec_log),
            QUICKFLOW_LOG_LEVEL="warning",
            PYTHONUNBUFFERED="1",
        )
        self.proc: subprocess.Popen[str] | None = None
        self.output: list[str] = []
        self._reader: threading.Thread | None = None
        self._listening = threading.Event()
        self.client: httpx.Client | None = None
        self.starts = 0

    @property
    def http(self) -> httpx.Client:
        assert self.client is not None, "the server is not running"
        return self.client

    def start(self) -> None:
        self._listening.clear()
        self.proc = subprocess.Popen(
            [*quickflow_command(), "serve", "--port", "0", "--data-dir", str(self.data_dir)],
            env=self.env,
            cwd=self.data_dir.parent,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.starts += 1
        self._reader = threading.Thread(target=self._read, args=(self.proc,), name="serve-output")
        self._reader.start()
        # Readiness: the "listening" line, then /healthz (it answers once recovery has run).
        if not self._listening.wait(30):
            self.stop()
            pytest.fail("quickflow serve did not start:\n" + "".join(self.output))
        daemon = json.loads(self.daemon_file.read_text())
        assert daemon["pid"] == self.proc.pid
        self.client = httpx.Client(base_url=daemon["url"], timeout=15,
                                   headers={"Authorization": f"Bearer {daemon['token']}"})
        wait_for("/healthz", self._healthy)

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            pytest.fail(f"quickflow serve exited with {self.proc.returncode}:\n" + "".join(self.output))
        try:
            return self.http.get("/healthz").status_code == 200
        except httpx.TransportError:
            return False

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.output.append(line)
            if line.startswith("quickflow listening on "):
                self._listening.set()

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, like a crash or an OOM kill."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._close()

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._close()

    def _close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        if self._reader is not None:
            self._reader.join(10)
            self._reader = None
        self.proc = None

    # --- API helpers ----------------------------------------------------------------------------

    def submit(self, **body: Any) -> dict[str, Any]:
        response = self.http.post("/v1/runs", json=body)
        assert response.status_code == 202, response.text
        run: dict[str, Any] = response.json()
        return run

    def run(self, run_id: str) -> dict[str, Any]:
        response = self.http.get(f"/v1/runs/{run_id}")
        assert response.status_code == 200, response.text
        data: dict[str, Any] = response.json()
        return data

    def agents(self, run_id: str) -> list[dict[str, Any]]:
        response = self.http.get(f"/v1/runs/{run_id}/agents")
        assert response.status_code == 200, response.text
        agents: list[dict[str, Any]] = response.json()["agents"]
        return agents

    def events_until_end(self, run_id: str) -> list[dict[str, Any]]:
        """The NDJSON event stream from seq 1; it ends when the run ends."""
        with self.http.stream("GET", f"/v1/runs/{run_id}/events", params={"format": "ndjson"},
                              timeout=httpx.Timeout(15, read=45)) as response:
            assert response.status_code == 200
            return [json.loads(line) for line in response.iter_lines() if line.strip()]

    def executions(self, run_id: str) -> Counter[str]:
        """How many times the backend executed each prompt of this run, in every process so far."""
        if not self.exec_log.exists():
            return Counter()
        lines = [json.loads(line) for line in self.exec_log.read_text().splitlines() if line.strip()]
        return Counter(line["prompt"] for line in lines if line["run_id"] == run_id)

    def journal(self, run_id: str) -> tuple[dict[str, str], str]:
        """(prompt -> status of every journaled call, run status) from the SQLite file, read-only."""
        conn = sqlite3.connect(f"file:{self.data_dir / 'quickflow.db'}?mode=ro", uri=True)
        try:
            calls = dict(conn.execute("SELECT prompt, status FROM calls WHERE run_id = ?", (run_id,)).fetchall())
            (status,) = conn.execute("SELECT status FROM runs WHERE id = ?", (run_id,)).fetchone()
        finally:
            conn.close()
        return calls, status


@pytest.fixture
def qf(tmp_path: Path) -> Iterator[Server]:
    server = Server(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def assert_seqs_contiguous(events: list[dict[str, Any]]) -> None:
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(seqs) + 1)), "event seqs must be 1..N, strictly increasing, no duplicates"


def test_sigkill_mid_run_then_restart_completes_without_re_executing_journaled_agents(qf: Server) -> None:
    started = time.monotonic()
    run_id = qf.submit(script=SCRIPT, options=OPTIONS)["id"]

    def enough_completed() -> list[dict[str, Any]] | None:
        agents = qf.agents(run_id)
        return agents if sum(a["status"] == "completed" for a in agents) >= 50 else None

    wait_for("50 completed agents", enough_completed)
    qf.kill()

    journal, status_at_kill = qf.journal(run_id)
    done_at_kill = {p for p, s in journal.items() if s == "completed"}
    executed_at_kill = qf.executions(run_id)
    assert status_at_kill == "running"
    assert 50 <= len(done_at_kill) < AGENTS, "the kill should land mid-run"
    assert done_at_kill <= set(executed_at_kill)
    in_flight_at_kill = set(executed_at_kill) - done_at_kill

    qf.start()
    events = qf.events_until_end(run_id)
    final = qf.run(run_id)
    agents = qf.agents(run_id)
    fresh = qf.http.post("/v1/runs", params={"wait": "true"},
                         json={"script": SCRIPT, "options": {**OPTIONS, "simulate": {"latency_ms": 0}}}).json()
    elapsed = time.monotonic() - started

    assert final["status"] == "completed", final.get("error")
    assert fresh["status"] == "completed"
    assert final["result"] == fresh["result"]
    assert len(final["result"]) == AGENTS and all(isinstance(x, str) for x in final["result"])

    counts = qf.executions(run_id)
    prompts = {f"job-{i:03d}" for i in range(AGENTS)}
    assert set(counts) == prompts, "every agent ran at least once"
    twice = {p: n for p, n in counts.items() if n > 1}
    assert not {p for p in done_at_kill if counts[p] != 1}, "an agent journaled before the kill ran again"
    # At-least-once only for calls in flight at the kill: at most one slot's worth each.
    assert set(twice) <= in_flight_at_kill
    assert all(n == 2 for n in twice.values())
    assert sum(n - 1 for n in counts.values()) <= CONCURRENCY, twice

    assert len(agents) == AGENTS
    assert sorted(a["index"] for a in agents) == list(range(AGENTS))
    assert {a["prompt"] for a in agents} == prompts
    assert all(a["status"] == "completed" for a in agents)
    # Journaled calls keep their index across the restart.
    by_prompt = {a["prompt"]: a for a in agents}
    assert all(by_prompt[p]["index"] == int(p[4:]) for p in done_at_kill)

    assert_seqs_contiguous(events)
    types = [e["type"] for e in events]
    starts = [e for e in events if e["type"] == "run.started"]
    assert [s["data"]["recovered"] for s in starts] == [False, True]
    assert types[-1] == "run.completed" and types.count("run.completed") == 1
    recovered = [e for e in events if e["type"] == "agent.cached" and e["data"].get("recovered")]
    assert {by_prompt_index(agents)[e["data"]["index"]] for e in recovered} == done_at_kill
    assert elapsed < 60


def by_prompt_index(agents: list[dict[str, Any]]) -> dict[int, str]:
    return {a["index"]: a["prompt"] for a in agents}


PAUSE_SCRIPT = "return await parallel(Array.from({length: 30}, (_, i) => () => agent('paused-job-' + i)))"


def test_a_paused_run_survives_a_restart_still_paused(qf: Server) -> None:
    run_id = qf.submit(script=PAUSE_SCRIPT, options={"concurrency": 2, "simulate": {"latency_ms": 40}})["id"]
    wait_for("4 completed agents", lambda: sum(a["status"] == "completed" for a in qf.agents(run_id)) >= 4)
    assert qf.http.post(f"/v1/runs/{run_id}/pause").json()["status"] == "paused"
    # Paused: agents in flight finish (their results are kept), no new one starts.
    wait_for("in-flight agents to finish", lambda: not any(a["status"] == "running" for a in qf.agents(run_id)))
    done_before = {a["prompt"] for a in qf.agents(run_id) if a["status"] == "completed"}
    qf.kill()
    journal, status_at_kill = qf.journal(run_id)
    assert status_at_kill == "paused"
    assert {p for p, s in journal.items() if s == "completed"} == done_before

    qf.start()
    run = qf.run(run_id)
    assert run["status"] == "paused"
    agents = qf.agents(run_id)
    # Replayed from the journal; every call the script issued after that waits for resume.
    assert {a["prompt"] for a in agents if a["status"] == "completed"} == done_before
    assert not any(a["status"] == "running" for a in agents)
    assert set(qf.executions(run_id)) == done_before

    assert qf.http.post(f"/v1/runs/{run_id}/resume").json()["status"] == "running"
    events = qf.events_until_end(run_id)
    final = qf.run(run_id)
    assert final["status"] == "completed"
    assert len(final["result"]) == 30
    counts = qf.executions(run_id)
    assert all(counts[p] == 1 for p in done_before)
    assert sum(counts.values()) == 30  # nothing was in flight at the kill: each agent ran once
    assert_seqs_contiguous(events)
    types = [e["type"] for e in events]
    assert types.count("run.paused") >= 1 and types.count("run.resumed") == 1
    assert types[-1] == "run.completed"
