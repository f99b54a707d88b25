"""``quickflow run`` and ``quickflow check`` as a user runs them: the real CLI as a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def quickflow(*args: str, stdin: str | None = None, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "api.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_thousand_agent_parallel_prints_result_and_usage(tmp_path: Path) -> None:
    script = tmp_path / "fanout.js"
    script.write_text(
        "const r = await parallel(Array.from({length: 1000}, (_, i) => () => agent(`item ${i}`)));\n"
        "return {count: r.length, strings: r.filter((x) => typeof x === 'string').length}\n"
    )
    done = quickflow("run", str(script), "--json", "--simulate-latency-ms", "0")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["status"] == "completed"
    assert out["result"] == {"count": 1000, "strings": 1000}
    usage = out["usage"]
    assert usage["agents"] == {"total": 1000, "completed": 1000}
    assert usage["tokens"]["output"] > 0 and usage["tokens"]["input"] > 0
    assert usage["duration_s"] > 0


def test_check_reports_typescript_at_its_position(tmp_path: Path) -> None:
    script = tmp_path / "typed.js"
    script.write_text("const files = args.files\nfunction score(x: number) {\n  return x\n}\n")
    done = quickflow("check", str(script))
    assert done.returncode == 2
    assert f"{script}:2:17: TypeScript syntax is not supported (type annotation)" in done.stderr
    assert "hint: " in done.stderr


def test_check_reports_the_engines_syntax_error_position(tmp_path: Path) -> None:
    script = tmp_path / "broken.js"
    script.write_text("const a = 1\nconst b = (a +;\n")
    done = quickflow("check", str(script))
    assert done.returncode == 2
    assert f"{script}:2:15: " in done.stderr


def test_check_passes_a_valid_script_and_prints_warnings(tmp_path: Path) -> None:
    script = tmp_path / "ok.js"
    script.write_text("const t = Date.now()\nreturn t\n")
    done = quickflow("check", str(script), "--json")
    assert done.returncode == 0
    report = json.loads(done.stdout)
    assert report["ok"] is True
    assert [(w["line"], w["column"]) for w in report["warnings"]] == [(1, 11)]


def test_run_rejects_typescript_with_exit_two(tmp_path: Path) -> None:
    script = tmp_path / "typed.js"
    script.write_text("interface A { x: number }\nreturn 1\n")
    done = quickflow("run", str(script))
    assert done.returncode == 2
    assert f"{script}:1:1: TypeScript syntax is not supported (interface)" in done.stderr


def test_run_failing_script_exits_one_with_the_reason(tmp_path: Path) -> None:
    script = tmp_path / "fails.js"
    script.write_text("await agent('x')\nthrow new Error('gave up')\n")
    done = quickflow("run", str(script))
    assert done.returncode == 1
    assert "run failed: Error: gave up (line 2, column" in done.stderr


def test_run_reads_stdin_and_args_file(tmp_path: Path) -> None:
    args = tmp_path / "args.json"
    args.write_text(json.dumps({"who": "world", "n": 2}))
    done = quickflow("run", "-", "--args", f"@{args}", "--json", stdin="return `hello ${args.who} x${args.n}`")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["result"] == "hello world x2"


def test_run_prints_plain_progress_when_not_a_terminal(tmp_path: Path) -> None:
    script = tmp_path / "phases.js"
    script.write_text("phase('Scan')\nlog('scanning')\nawait agent('boom')\nreturn 'ok'\n")
    done = quickflow("run", str(script), "--simulate-fail", "boom")
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert lines[:2] == ["▶ Scan", "scanning"]
    assert any(line.startswith("✗ agent 0 'boom' failed: simulated failure") for line in lines)
    assert lines[-1].startswith("completed · 1 agents")
    assert json.loads(done.stdout) == "ok"


def test_bad_args_json_is_a_usage_error(tmp_path: Path) -> None:
    done = quickflow("run", "-", "--args", "{nope", stdin="return 1")
    assert done.returncode == 2
    assert "not valid JSON" in done.stderr
