"""The client commands end to end: the real CLI (a subprocess) against the real server (a subprocess).

One server serves the module (startup is the slow part); tests that need a run in a given
state make their own. Every subprocess runs under a deadline.
"""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest

from .conftest import CLI, QuickflowServer, clean_env, run_cli

pytestmark = pytest.mark.e2e

OK_SCRIPT = """\
phase('Gather');
log('gathering facts');
const a = await agent('first question', { label: 'first' });
const b = await agent('second question', { label: 'second' });
phase('Report');
return { count: 2, a, b };
"""

# Same agent calls as OK_SCRIPT, different post-processing: a resume_from run serves every call
# from the journal.
EDITED_SCRIPT = """\
phase('Gather');
const a = await agent('first question', { label: 'first' });
const b = await agent('second question', { label: 'second' });
return { edited: true, total_length: a.length + b.length };
"""

FAILING_SCRIPT = "log('about to fail');\nthrow new Error('boom from the script');\n"

TS_SCRIPT = "const x: number = 1;\nreturn x;\n"

SLOW_SCRIPT = """\
phase('Slow');
for (let i = 0; i < 10; i++) {
  log(`step ${i}`);
  await agent(`slow step ${i}`, { label: `step ${i}` });
}
return 'slow done';
"""
# Runs that end on their own take 10 × 400 ms; runs a test cancels may take long (no race with the CLI's start).
SLOW_LATENCY_MS = 400
CANCELLED_LATENCY_MS = 3000

WORKFLOW_SCRIPT = """\
export const meta = {
  name: 'e2e-greet',
  description: 'Greets someone by name',
  phases: [{ title: 'Greet' }],
};
phase('Greet');
const who = args?.who ?? 'world';
return { greeting: await agent(`greet ${who}`, { label: 'greet' }), who };
"""


@pytest.fixture(scope="module")
def scripts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("scripts")
    files = {"ok": OK_SCRIPT, "edited": EDITED_SCRIPT, "failing": FAILING_SCRIPT, "ts": TS_SCRIPT,
             "slow": SLOW_SCRIPT, "workflow": WORKFLOW_SCRIPT}
    paths = {}
    for name, text in files.items():
        paths[name] = root / f"{name}.js"
        paths[name].write_text(text)
    return paths


def ok(result: subprocess.CompletedProcess[str], code: int = 0) -> subprocess.CompletedProcess[str]:
    assert result.returncode == code, (
        f"exit {result.returncode}, wanted {code}\n--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
    )
    return result


def submit_quietly(server: QuickflowServer, script: Path, *flags: str) -> str:
    """Start a run through the CLI without waiting; its id."""
    run_id = ok(server.cli("submit", str(script), *flags)).stdout.strip()
    assert run_id.startswith("run_"), run_id
    return run_id


def start_slow_run(server: QuickflowServer, script: Path, latency_ms: int = SLOW_LATENCY_MS) -> str:
    """A run that takes a few seconds, started through the client (setup, not under test)."""
    with server.client() as client:
        body = {"script": script.read_text(), "options": {"simulate": {"latency_ms": latency_ms}}}
        run_id: str = client.create_run(body)["id"]
    return run_id


def status_of(server: QuickflowServer, run_id: str) -> str:
    with server.client() as client:
        status: str = client.get_run(run_id)["status"]
    return status


# --- submit -------------------------------------------------------------------------------------


def test_submit_wait_prints_the_result(module_server: QuickflowServer, scripts: dict[str, Path]) -> None:
    result = ok(module_server.cli("submit", str(scripts["ok"]), "--args", '{"x": 1}', "--wait"))
    assert json.loads(result.stdout)["count"] == 2
    assert "completed · 2 agents" in result.stderr

    as_json = json.loads(ok(module_server.cli("submit", str(scripts["ok"]), "--wait", "--json")).stdout)
    assert as_json["status"] == "completed" and as_json["usage"]["agents"]["total"] == 2


def test_submit_follow_shows_phases_and_logs(module_server: QuickflowServer, scripts: dict[str, Path]) -> None:
    result = ok(module_server.cli("submit", str(scripts["ok"]), "--follow"))
    lines = result.stderr.splitlines()
    assert lines[0].startswith("run run_") and lines[0].endswith(" queued")
    assert "▶ Gather" in lines and "gathering facts" in lines and "▶ Report" in lines
    assert lines.index("▶ Gather") < lines.index("gathering facts") < lines.index("▶ Report")
    assert json.loads(result.stdout)["count"] == 2


def test_submit_without_wait_prints_the_run_id(module_server: QuickflowServer, scripts: dict[str, Path]) -> None:
    run_id = submit_quietly(module_server, scripts["ok"])
    with module_server.client() as client:
        assert client.get_run(run_id)["id"] == run_id


def test_failing_script_exits_1(module_server: QuickflowServer, scripts: dict[str, Path]) -> None:
    result = ok(module_server.cli("submit", str(scripts["failing"]), "--follow"), 1)
    assert "about to fail" in result.stderr
    assert "run failed: Error: boom from the script" in result.stderr


def test_rejected_script_and_request_exit_2(module_server: QuickflowServer, scripts: dict[str, Path]) -> None:
    ts = str(scripts["ts"])
    result = ok(module_server.cli("submit", ts, "--wait"), 2)
    assert f"{ts}:1:8: TypeScript syntax is not supported" in result.stderr
    assert "hint: quickflow runs plain JavaScript only" in result.stderr

    bad_option = ok(module_server.cli("submit", str(scripts["ok"]), "--concurrency", "0"), 2)
    assert "options.concurrency must be between" in bad_option.stderr

    bad_args = ok(module_server.cli("submit", str(scripts["ok"]), "--args", "{not json"), 2)
    assert "not valid JSON" in bad_args.stderr


def test_idempotency_key_returns_the_first_run(module_server: QuickflowServer, scripts: dict[str, Path]) -> None:
    first = submit_quietly(module_server, scripts["ok"], "--idempotency-key", "e2e-key-1")
    again = submit_quietly(module_server, scripts["ok"], "--idempotency-key", "e2e-key-1")
    assert first == again


# --- runs, show, logs -----------------------------------------------------------------------------


def test_runs_show_and_logs_of_a_finished_run(module_server: QuickflowServer, scripts: dict[str, Path]) -> None:
    with module_server.client() as client:
        run_id = client.create_run({"script": scripts["ok"].read_text()}, wait=True)["id"]

    table = ok(module_server.cli("runs", "--limit", "50")).stdout
    assert run_id in table and "completed" in table
    page = json.loads(ok(module_server.cli("runs", "--status", "completed", "--json", "--limit", "500")).stdout)
    assert run_id in [r["id"] for r in page["runs"]]
    assert all(r["status"] == "completed" for r in page["runs"])

    shown = ok(module_server.cli("show", run_id, "--agents")).stdout
    assert f"run       {run_id}" in shown and "status    completed" in shown
    assert "Gather" in shown and "first" in shown and "second" in shown
    with module_server.client() as client:
        first_agent = client.get_agent(run_id, 0)
    agent_row = next(line for line in shown.splitlines() if line.split()[:3] == ["0", "completed", "first"])
    assert agent_row.split()[-1] == str(first_agent["usage"]["output_tokens"]) != "0"
    assert '"count": 2' in shown
    record = json.loads(ok(module_server.cli("show", run_id, "--json")).stdout)
    assert [p["title"] for p in record["usage"]["phases"]] == ["Gather", "Report"]

    text = ok(module_server.cli("logs", run_id)).stdout.splitlines()
    assert text == ["▶ Gather", "gathering facts", "▶ Report"]
    events = [json.loads(line) for line in ok(module_server.cli("logs", run_id, "--json")).stdout.splitlines()]
    assert events[0]["type"] == "run.queued" and events[-1]["type"] == "run.completed"
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))

    missing = ok(module_server.cli("show", "run_doesnotexist"), 1)
    assert "no run with id 'run_doesnotexist'" in missing.stderr


def test_logs_follow_a_running_run(module_server: QuickflowServer, scripts: dict[str, Path]) -> None:
    run_id = start_slow_run(module_server, scripts["slow"])
    # Without -f: the events so far, then exit 0 while the run goes on.
    snapshot = ok(module_server.cli("logs", run_id)).stdout.splitlines()
    assert snapshot[0] == "▶ Slow"
    result = ok(module_server.cli("logs", "-f", run_id))
    lines = result.stdout.splitlines()
    assert lines[0] == "▶ Slow" and lines[-1] == "step 9"
    assert [f"step {i}" for i in range(10)] == [line for line in lines if line.startswith("step ")]
    assert result.stderr.startswith("completed · 10 agents")


def test_logs_follow_exits_with_the_run_code(module_server: QuickflowServer, scripts: dict[str, Path]) -> None:
    run_id = submit_quietly(module_server, scripts["failing"])
    result = ok(module_server.cli("logs", "-f", run_id, "--json"), 1)
    assert json.loads(result.stdout.splitlines()[-1])["type"] == "run.failed"


# --- controls -------------------------------------------------------------------------------------


def test_pause_then_resume_completes(module_server: QuickflowServer, scripts: dict[str, Path]) -> None:
    run_id = start_slow_run(module_server, scripts["slow"], latency_ms=600)
    assert ok(module_server.cli("pause", run_id)).stdout.strip() == f"{run_id} paused"
    assert status_of(module_server, run_id) == "paused"

    # Resuming a paused run continues it; it is not a new run.
    result = ok(module_server.cli("resume", run_id, "--wait", "--json"))
    final = json.loads(result.stdout)
    assert final["id"] == run_id and final["status"] == "completed" and final["result"] == "slow done"


def test_cancel_ends_a_followed_run(module_server: QuickflowServer, scripts: dict[str, Path]) -> None:
    follower = subprocess.Popen(
        [*CLI, "submit", str(scripts["slow"]), "--simulate-latency-ms", str(CANCELLED_LATENCY_MS), "--follow"],
        env=module_server.cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert follower.stderr is not None
        first = follower.stderr.readline().split()  # "run RUN queued"
        assert first[0] == "run" and first[1].startswith("run_"), first
        run_id = first[1]
        assert ok(module_server.cli("cancel", run_id)).stdout.strip() == f"{run_id} cancelled"
        _, err = follower.communicate(timeout=60)
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    assert follower.returncode == 1, err
    assert "run cancelled: cancelled by request" in err
    assert status_of(module_server, run_id) == "cancelled"

    # Controls on an ended run do not apply: exit 1 with the server's reason.
    again = ok(module_server.cli("pause", run_id), 1)
    assert f"cannot pause run '{run_id}': it is cancelled" in again.stderr


def test_resume_from_an_ended_run_with_an_edited_script(module_server: QuickflowServer,
                                                       scripts: dict[str, Path]) -> None:
    source = json.loads(ok(module_server.cli("submit", str(scripts["ok"]), "--wait", "--json")).stdout)
    assert source["usage"]["agents"]["completed"] == 2

    result = ok(module_server.cli("resume", source["id"], "--script", str(scripts["edited"]), "--wait", "--json"))
    resumed = json.loads(result.stdout)
    assert resumed["id"] != source["id"] and resumed["status"] == "completed"
    assert resumed["result"]["edited"] is True
    assert resumed["result"]["total_length"] == len(source["result"]["a"]) + len(source["result"]["b"])
    # Every agent came from the journal: none ran live, no tokens were spent.
    assert resumed["usage"]["agents"] == {"total": 2, "cached": 2}
    assert resumed["usage"]["tokens"]["output"] == 0
    with module_server.client() as client:
        record = client.get_run(resumed["id"])
    assert record["resume_from"] == source["id"] and record["resume_mode"] == "reuse"

    # Without --wait, a new run's id is printed (and it is a different run).
    new_id = ok(module_server.cli("resume", source["id"])).stdout.strip()
    assert new_id.startswith("run_") and new_id not in (source["id"], resumed["id"])


def test_resume_of_a_running_run_is_refused(module_server: QuickflowServer, scripts: dict[str, Path]) -> None:
    run_id = start_slow_run(module_server, scripts["slow"], latency_ms=CANCELLED_LATENCY_MS)
    try:
        refused = ok(module_server.cli("resume", run_id), 1)
        assert f"cannot resume run '{run_id}': it is running" in refused.stderr
        misuse = ok(module_server.cli("resume", run_id, "--script", str(scripts["edited"])), 2)
        assert "only apply when starting a new run from an ended one" in misuse.stderr
    finally:
        with module_server.client() as client:
            client.cancel(run_id)


# --- saved workflows ------------------------------------------------------------------------------


def test_workflows_save_list_show_run_delete(module_server: QuickflowServer, scripts: dict[str, Path]) -> None:
    assert ok(module_server.cli("workflows", "save", str(scripts["workflow"]))).stdout.strip() == \
        "saved workflow e2e-greet"
    listing = ok(module_server.cli("workflows", "list")).stdout
    assert "e2e-greet" in listing and "Greets someone by name" in listing
    shown = ok(module_server.cli("workflows", "show", "e2e-greet")).stdout
    assert "name         e2e-greet" in shown and "export const meta" in shown

    result = ok(module_server.cli("workflows", "run", "e2e-greet", "--args", '{"who": "ann"}', "--wait", "--json"))
    run = json.loads(result.stdout)
    assert run["status"] == "completed" and run["result"]["who"] == "ann"
    followed = ok(module_server.cli("workflows", "run", "e2e-greet", "--follow"))
    assert "▶ Greet" in followed.stderr and json.loads(followed.stdout)["who"] == "world"

    # A script without meta cannot be saved: exit 2 with FILE:LINE:COL diagnostics.
    no_meta = ok(module_server.cli("workflows", "save", str(scripts["ok"])), 2)
    assert f"{scripts['ok']}:1:1:" in no_meta.stderr

    assert ok(module_server.cli("workflows", "delete", "e2e-greet")).stdout.strip() == "deleted workflow e2e-greet"
    gone = ok(module_server.cli("workflows", "run", "e2e-greet", "--wait"), 1)
    assert "no saved workflow named 'e2e-greet'" in gone.stderr


# --- finding the server ---------------------------------------------------------------------------


def test_no_server_is_a_clear_error(tmp_path: Path, scripts: dict[str, Path]) -> None:
    env = clean_env({"QUICKFLOW_DAEMON_FILE": str(tmp_path / "absent.json")})
    result = ok(run_cli("submit", str(scripts["ok"]), "--wait", env=env, timeout=60), 1)
    assert "no server: start one with `quickflow serve` or set QUICKFLOW_URL" in result.stderr

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    refused = ok(run_cli("runs", "--url", f"http://127.0.0.1:{port}", env=env, timeout=60), 1)
    assert f"cannot reach the quickflow server at http://127.0.0.1:{port}" in refused.stderr
    assert "quickflow serve" in refused.stderr


def test_the_local_daemon_is_found_through_its_file(module_server: QuickflowServer,
                                                    scripts: dict[str, Path]) -> None:
    result = ok(module_server.cli("submit", str(scripts["ok"]), "--wait", "--json", discover=True))
    run_id = json.loads(result.stdout)["id"]
    assert run_id in ok(module_server.cli("runs", "--json", discover=True)).stdout


def test_a_wrong_token_is_refused(module_server: QuickflowServer) -> None:
    result = ok(module_server.cli("runs", "--token", "not-the-token"), 1)
    assert "invalid bearer token" in result.stderr
