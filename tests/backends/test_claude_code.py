"""The claude-code backend end to end: the real Claude Code CLI (pinned, from npm), driven by
claude-agent-sdk, talking SSE to the fake Messages server on loopback.

The CLI is installed once into a cache directory by a session fixture; when npm or the install
is unavailable, or claude-agent-sdk is not installed, the tests skip and say why.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from runtime.backends._protocol import AgentRequest, Correction
from runtime.backends.anthropic import RetryEvent
from runtime.config import AgentProfile
from runtime.errors import TerminalBackendError
from tests.fakes.messages_server import ErrorReply, FakeMessagesServer, RecordedRequest, Reply, TextReply, ToolUseReply

pytest.importorskip(
    "claude_agent_sdk", reason="claude-agent-sdk is not installed (pip install 'quickflow[claude-code]')"
)

from runtime.backends.claude_code import ClaudeCodeBackend  # noqa: E402 - after the skip check

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(300)]

CLI_VERSION = "2.1.330"  # pinned: unpinned npm on Node 20 silently picks an old release
CACHE = Path(os.environ.get("QUICKFLOW_TEST_CACHE", Path.home() / ".cache" / "quickflow-test")) / "claude-code"


def _installed_version(binary: Path) -> str:
    try:
        done = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip()


@pytest.fixture(scope="session")
def claude_cli() -> Path:
    """The pinned ``claude`` binary, installed with npm into the cache on first use."""
    binary = CACHE / "node_modules" / ".bin" / "claude"
    if CLI_VERSION in _installed_version(binary):
        return binary
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not on PATH: cannot install the Claude Code CLI for the claude-code backend tests")
    CACHE.mkdir(parents=True, exist_ok=True)
    command = [
        npm,
        "install",
        "--prefix",
        str(CACHE),
        "--no-audit",
        "--no-fund",
        f"@anthropic-ai/claude-code@{CLI_VERSION}",
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.skip(f"`{' '.join(command)}` took longer than 240 s; claude-code backend tests skipped")
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        pytest.skip(f"`npm install @anthropic-ai/claude-code@{CLI_VERSION}` failed: {' | '.join(tail)}")
    version = _installed_version(binary)
    if CLI_VERSION not in version:
        pytest.skip(f"installed Claude Code CLI reports {version!r}, expected {CLI_VERSION}")
    return binary


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    path = tmp_path / "workspace"
    path.mkdir()
    (path / "README.md").write_text("# demo\n")
    return path


@pytest.fixture
def make_backend(
    claude_cli: Path, messages_server: FakeMessagesServer, workspace: Path, tmp_path: Path
) -> Iterator[Any]:
    def make(**kwargs: Any) -> ClaudeCodeBackend:
        options: dict[str, Any] = {
            "cli_path": claude_cli,
            "workspace": workspace,
            "api_key": "test-key",
            "base_url": messages_server.url,
            "home": tmp_path / "home",  # isolates ~/.claude
            "max_retries": 0,
            **kwargs,
        }
        return ClaudeCodeBackend(**options)

    (tmp_path / "home").mkdir()
    yield make


def request(prompt: str, **kwargs: Any) -> AgentRequest:
    return AgentRequest(run_id="run-1", index=0, prompt=prompt, **kwargs)


def carrying(server: FakeMessagesServer, marker: str) -> list[RecordedRequest]:
    """The CLI may send helper requests too; these are the ones that carry our prompt."""
    return [r for r in server.message_requests() if marker in r.text()]


def tool_names(sent: RecordedRequest) -> set[str]:
    return {tool["name"] for tool in sent.body.get("tools", [])}


async def test_plain_text_agent(make_backend: Any, messages_server: FakeMessagesServer, workspace: Path) -> None:
    messages_server.default = TextReply("The answer is 42.", usage={"input_tokens": 321, "output_tokens": 7})
    backend = make_backend()
    with anyio.fail_after(120):
        result = await backend.call(request("What is the answer? [marker-plain]"))
    assert result.text == "The answer is 42."
    assert result.data is None
    assert result.usage.input_tokens >= 321 and result.usage.output_tokens >= 7
    assert result.cost_usd > 0
    sent = carrying(messages_server, "marker-plain")
    assert sent, "no request carried the prompt"
    assert all(r.stream for r in sent)
    assert "No human is present" in sent[0].text()  # our unattended-workflow rules reach the model
    offered = tool_names(sent[0])
    assert {"Read", "Grep", "Glob"} <= offered
    assert not offered & {"Bash", "Write", "Edit", "NotebookEdit", "WebFetch", "WebSearch"}
    assert str(workspace) in sent[0].text()
    assert any(entry["type"] == "result" for entry in result.transcript)
    json.dumps(list(result.transcript))


async def test_schema_agent_parses_json_from_the_final_text(
    make_backend: Any, messages_server: FakeMessagesServer
) -> None:
    messages_server.default = TextReply('{"answer": 42, "unit": "none"}')
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
    corrections = (Correction(output='{"answer": "42"}', error="'42' is not of type 'integer'"),)
    with anyio.fail_after(120):
        result = await make_backend().call(
            request("Compute it [marker-schema]", schema=schema, corrections=corrections)
        )
    assert result.data == {"answer": 42, "unit": "none"}
    prompt_text = carrying(messages_server, "marker-schema")[0].text()
    assert "JSON Schema" in prompt_text
    assert "is not of type 'integer'" in prompt_text  # the validation error is fed back


async def test_a_tool_outside_the_allowlist_is_denied_not_waited_on(
    make_backend: Any, messages_server: FakeMessagesServer, workspace: Path
) -> None:
    # Bash exists for this profile, but only `echo` is pre-approved: `touch` must be denied
    # (dontAsk), and the session must go on instead of waiting for a human.
    def respond(sent: RecordedRequest) -> Reply | None:
        if "marker-deny" not in sent.text():
            return None
        if "tool_result" in sent.text():
            return TextReply("gave up")
        return ToolUseReply({"command": "touch pwned.txt", "description": "create a file"}, name="Bash")

    messages_server.responder = respond
    backend = make_backend(profiles={"echoer": AgentProfile(tools=["Bash(echo:*)"])})
    started = time.monotonic()
    with anyio.fail_after(120):
        result = await backend.call(request("Create a file [marker-deny]", agent_type="echoer"))
    assert result.text == "gave up"
    assert not (workspace / "pwned.txt").exists()
    assert time.monotonic() - started < 60
    results = [r for r in carrying(messages_server, "marker-deny") if "tool_result" in r.text()]
    assert results and '"is_error": true' in results[0].text()


def git(cwd: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    return subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True, text=True, env=env).stdout


async def test_worktree_isolation_keeps_changed_and_removes_unchanged(
    make_backend: Any, messages_server: FakeMessagesServer, workspace: Path, tmp_path: Path
) -> None:
    if shutil.which("git") is None:
        pytest.skip("git is not installed: worktree isolation cannot be tested")
    git(workspace, "init", "-q")
    git(workspace, "add", ".")
    git(workspace, "commit", "-q", "-m", "init")
    root = tmp_path / "worktrees"

    def respond(sent: RecordedRequest) -> Reply | None:
        if "marker-write" not in sent.text() or "tool_result" in sent.text():
            return TextReply("done")
        cwd = re.search(r"Primary working directory: ([^\s\\\"]+)", sent.text())
        assert cwd is not None
        return ToolUseReply({"file_path": f"{cwd.group(1)}/new.txt", "content": "hi\n"}, name="Write")

    messages_server.responder = respond
    backend = make_backend(worktree_root=root, profiles={"writer": AgentProfile(tools=["Read", "Write"])})
    with anyio.fail_after(120):
        unchanged = await backend.call(request("Look around [marker-look]", isolation="worktree"))
        changed = await backend.call(request("Write a file [marker-write]", isolation="worktree", agent_type="writer"))

    first = unchanged.transcript[-1]
    assert first["type"] == "worktree" and first["kept"] is False
    assert not Path(first["path"]).exists()
    second = changed.transcript[-1]
    assert second["type"] == "worktree" and second["kept"] is True
    kept = Path(second["path"])
    assert (kept / "new.txt").read_text() == "hi\n"
    assert any("new.txt" in line for line in second["changes"])
    assert not (workspace / "new.txt").exists()  # the workspace itself is untouched
    git(workspace, "worktree", "remove", "--force", str(kept))


async def test_worktree_isolation_needs_a_git_workspace(make_backend: Any) -> None:
    with anyio.fail_after(60), pytest.raises(TerminalBackendError, match="git workspace"):
        await make_backend().call(request("x", isolation="worktree"))


async def test_api_errors_are_terminal_and_retries_are_reported(
    make_backend: Any, messages_server: FakeMessagesServer
) -> None:
    seen: list[RetryEvent] = []
    messages_server.default = ErrorReply(401, "bad key")
    backend = make_backend(max_retries=1, on_retry=lambda req, event: seen.append(event))
    with anyio.fail_after(120), pytest.raises(TerminalBackendError) as caught:
        await backend.call(request("Hello [marker-401]"))
    assert caught.value.status == 401
    assert "bad key" in str(caught.value)
    assert [event.status for event in seen] == [401]


async def test_cancel_scope_stops_a_slow_session(make_backend: Any, messages_server: FakeMessagesServer) -> None:
    messages_server.default = TextReply("too late", delay_s=60)
    started = time.monotonic()
    with anyio.fail_after(60):
        with anyio.move_on_after(5) as scope:
            await make_backend().call(request("Slow [marker-slow]"))
    assert scope.cancelled_caught
    assert time.monotonic() - started < 30
