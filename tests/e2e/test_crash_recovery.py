"""Crash recovery, the acceptance test (SPEC §3.3): SIGKILL ``quickflow serve`` mid-run, start it again.

The server is the shared ``server_factory`` fixture (``tests/e2e/conftest.py``): a real
subprocess on port 0, its data directory under ``tmp_path``, restartable on it. The
simulate backend appends one line per execution to ``QUICKFLOW_SIMULATE_RECORD``, across both
processes, so the test counts how often each agent really ran. What was journaled at the kill
is read straight from the SQLite file (read-only), not from the server's own account.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from runtime.scheduling import CALLS_AHEAD_OF_JOURNAL

from .conftest import QuickflowServer

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

T = TypeVar("T")

AGENTS = 200
CONCURRENCY = 8
SCRIPT = (
    f"const r = await parallel(Array.from({{length: {AGENTS}}}, (_, i) => () => agent('job-' + String(i).padStart(3, '0'))))\n"
    "return r\n"
)
OPTIONS = {"backend": "simulate", "concurrency": CONCURRENCY, "simulate": {"latency_ms": 50}}


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


class Harness:
    """The shared ``quickflow serve`` fixture plus what this test reads: the API, exec.log, the db file."""

    def __init__(self, server: QuickflowServer, exec_log: Path) -> None:
        self.server = server
        self.exec_log = exec_log
        self._client: httpx.Client | None = None
        self._client_for = ("", "")

    @property
    def http(self) -> httpx.Client:
        # A restarted server has a new port and a new generated token.
        if self._client is None or self._client_for != (self.server.url, self.server.token):
            if self._client is not None:
                self._client.close()
            self._client = httpx.Client(base_url=self.server.url, timeout=15,
                                        headers={"Authorization": f"Bearer {self.server.token}"})
            self._client_for = (self.server.url, self.server.token)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, like a crash or an OOM kill."""
        self.server.kill(signal.SIGKILL)

    def start(self) -> None:
        """Start again on the same data dir; returns once /healthz answers (runs recovered)."""
        self.server.start()

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
        db = self.server.data_dir / "quickflow.db"
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            calls = dict(conn.execute("SELECT prompt, status FROM calls WHERE run_id = ?", (run_id,)).fetchall())
            (status,) = conn.execute("SELECT status FROM runs WHERE id = ?", (run_id,)).fetchone()
        finally:
            conn.close()
        return calls, status


@pytest.fixture
def qf(server_factory: Callable[..., QuickflowServer], tmp_path: Path) -> Iterator[Harness]:
    exec_log = tmp_path / "exec.log"
    server = server_factory(env={"QUICKFLOW_SIMULATE_RECORD": str(exec_log), "QUICKFLOW_LOG_LEVEL": "warning"})
    harness = Harness(server, exec_log)
    try:
        yield harness
    finally:
        harness.close()


def assert_seqs_contiguous(events: list[dict[str, Any]]) -> None:
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(seqs) + 1)), "event seqs must be 1..N, strictly increasing, no duplicates"


def test_sigkill_mid_run_then_restart_completes_without_re_executing_journaled_agents(qf: Harness) -> None:
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
    # Per slot: the call executing plus those finished and waiting for their commit.
    assert len(in_flight_at_kill) <= CALLS_AHEAD_OF_JOURNAL * CONCURRENCY, (
        f"{len(in_flight_at_kill)} agents executed but not journaled")

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
    assert sum(n - 1 for n in counts.values()) <= CALLS_AHEAD_OF_JOURNAL * CONCURRENCY, twice

    assert len(agents) == AGENTS and len({a["index"] for a in agents}) == AGENTS
    assert {a["prompt"] for a in agents} == prompts
    assert all(a["status"] == "completed" for a in agents)
    # Journaled calls keep their index across the restart (parallel issued job-i as index i).
    by_prompt = {a["prompt"]: a for a in agents}
    assert all(by_prompt[p]["index"] == int(p[4:]) for p in done_at_kill)

    assert_seqs_contiguous(events)
    types = [e["type"] for e in events]
    starts = [e for e in events if e["type"] == "run.started"]
    assert [s["data"]["recovered"] for s in starts] == [False, True]
    assert types[-1] == "run.completed" and types.count("run.completed") == 1
    # After the restart the script replays: every journaled call is served from the journal.
    # Each call ends in exactly one event over the whole stream: agent.completed before the
    # kill, or agent.cached (recovered) after it when that event died with the process.
    prompt_of = {a["index"]: a["prompt"] for a in agents}
    finished = Counter(e["data"]["index"] for e in events if e["type"] in ("agent.completed", "agent.cached"))
    assert set(finished) == set(prompt_of) and set(finished.values()) == {1}
    recovered = [e for e in events if e["type"] == "agent.cached" and e["data"].get("recovered")]
    assert {prompt_of[e["data"]["index"]] for e in recovered} <= done_at_kill
    assert elapsed < 60


PAUSE_SCRIPT = "return await parallel(Array.from({length: 30}, (_, i) => () => agent('paused-job-' + i)))"


def test_a_paused_run_survives_a_restart_still_paused(qf: Harness) -> None:
    run_id = qf.submit(script=PAUSE_SCRIPT, options={"concurrency": 2, "simulate": {"latency_ms": 40}})["id"]
    wait_for("4 completed agents", lambda: sum(a["status"] == "completed" for a in qf.agents(run_id)) >= 4)
    assert qf.http.post(f"/v1/runs/{run_id}/pause").json()["status"] == "paused"
    # Paused: agents in flight finish and are journaled (their results are kept), no new one starts.

    def settled() -> set[str] | None:
        agents = qf.agents(run_id)
        done = {a["prompt"] for a in agents if a["status"] == "completed"}
        journal, _ = qf.journal(run_id)
        durable = {p for p, s in journal.items() if s == "completed"}
        return done if not any(a["status"] == "running" for a in agents) and done == durable else None

    done_before = wait_for("in-flight agents to finish and be journaled", settled)
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
    assert [e["data"]["recovered"] for e in events if e["type"] == "run.started"] == [False, True]
    assert types.count("run.paused") >= 1 and types.count("run.resumed") == 1
    assert types[-1] == "run.completed"
