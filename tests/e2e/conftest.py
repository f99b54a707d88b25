"""End-to-end fixtures: the real ``quickflow serve`` and the real CLI, each as a subprocess.

    def test_something(server):                     # a fresh server (function scope)
        result = server.cli("submit", "flow.js", "--wait")
        server.kill(signal.SIGKILL); server.restart()

``QuickflowServer`` starts ``python -m api.cli serve --port 0 --data-dir <root>/data`` with
``QUICKFLOW_DAEMON_FILE=<root>/daemon.json``. It is ready once stdout says "quickflow listening
on URL" and ``GET /healthz`` answers 200 (runs live at the last stop have been recovered); no
fixed sleeps. The child's environment drops inherited ``QUICKFLOW_*`` and Anthropic settings,
so runs use the simulate backend and nothing on the developer's machine leaks in.

Attributes: ``url``, ``token`` (from the daemon file, else ``QUICKFLOW_ADMIN_TOKEN``),
``port``, ``root``, ``data_dir``, ``daemon_file``, ``env`` (the server's environment: CLI
processes run with it find the server through the daemon file), ``proc``, ``output`` (stdout
lines so far, across restarts), ``stderr_text()``.
Methods: ``start(port=0)``, ``stop()``, ``kill(sig)``, ``restart(same_port=False, sig=SIGTERM)``,
``cli(*args, timeout, env, input, discover)``, ``client()``, ``cli_env()``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import httpx
import pytest

from api.client import Client

__all__ = ["CLI", "QuickflowServer", "clean_env", "run_cli"]

CLI = [sys.executable, "-m", "api.cli"]
READY_LINE = "quickflow listening on "
STARTUP_TIMEOUT_S = 90.0  # a cold start imports FastAPI, the backends and the sandbox; CI machines are slow
STOP_TIMEOUT_S = 15.0


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without quickflow/Anthropic settings, plus ``extra``."""
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith("QUICKFLOW_") and not k.startswith("ANTHROPIC_")
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def run_cli(*args: str, env: Mapping[str, str], timeout: float = 60.0, input: str | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m api.cli ARGS`` with the same interpreter, under a deadline."""
    return subprocess.run([*CLI, *args], env=dict(env), capture_output=True, text=True, timeout=timeout,
                          input=input, cwd=cwd, check=False)


class QuickflowServer:
    """One ``quickflow serve`` subprocess, restartable on the same data dir and daemon file."""

    def __init__(self, root: Path, *, env: Mapping[str, str] | None = None, serve_args: Sequence[str] = ()) -> None:
        self.root = root
        self.data_dir = root / "data"
        self.daemon_file = root / "daemon.json"
        self.env = clean_env({"QUICKFLOW_DAEMON_FILE": str(self.daemon_file), **(env or {})})
        self.serve_args = list(serve_args)
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self.port = 0
        self.token = ""
        self.output: list[str] = []
        self.starts = 0
        self._ready = threading.Event()
        self._pump: threading.Thread | None = None
        self._stderr: IO[str] | None = None

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self, port: int = 0) -> QuickflowServer:
        if self.running:
            raise RuntimeError("the server is already running")
        self.root.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        self.url, self.port, self.token = "", 0, ""
        self._ready = threading.Event()
        self._stderr = open(self.root / f"serve-{self.starts}.stderr", "w")  # noqa: SIM115 - closed in _reap
        self.proc = subprocess.Popen(
            [*CLI, "serve", "--port", str(port), "--data-dir", str(self.data_dir), *self.serve_args],
            env=self.env, cwd=self.root, stdout=subprocess.PIPE, stderr=self._stderr, text=True, bufsize=1,
        )
        # Drains stdout for the whole life of the process (a full pipe would block the server);
        # joined in _reap, so it never outlives the fixture.
        self._pump = threading.Thread(target=self._read_stdout, args=(self.proc,), name="serve-stdout")
        self._pump.start()
        try:
            self._wait_ready()
        except BaseException:
            self.kill(signal.SIGKILL)
            raise
        return self

    def _read_stdout(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            self.output.append(line)
            if line.startswith(READY_LINE) and not self._ready.is_set():
                self.url = line[len(READY_LINE):].split()[0]
                self._ready.set()
        self._ready.set()  # the process ended: wake the waiter, which then sees it exited

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        if not self._ready.wait(STARTUP_TIMEOUT_S) or self.proc.poll() is not None or not self.url:
            raise RuntimeError(f"quickflow serve did not start:\n{self.describe()}")
        self.port = int(self.url.rsplit(":", 1)[1])
        with httpx.Client(timeout=5.0) as http:
            while True:
                try:
                    if http.get(f"{self.url}/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"quickflow serve never became healthy:\n{self.describe()}")
                time.sleep(0.05)  # a readiness poll, not a guess at how long startup takes
        self.token = self._read_token()

    def _read_token(self) -> str:
        import json

        try:
            token = json.loads(self.daemon_file.read_text()).get("token") or ""
        except (OSError, ValueError):
            token = ""
        return token or self.env.get("QUICKFLOW_ADMIN_TOKEN", "")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL, timeout: float = STOP_TIMEOUT_S) -> int:
        """Send ``sig`` and wait for the process to exit; its return code."""
        assert self.proc is not None, "the server was never started"
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        return self._reap()

    def stop(self) -> int | None:
        """Graceful stop (SIGTERM, SIGKILL after a deadline); no-op when not running."""
        if self.proc is None:
            return None
        return self.kill(signal.SIGTERM)

    def restart(self, *, same_port: bool = False, sig: int = signal.SIGTERM) -> QuickflowServer:
        """Stop with ``sig`` (SIGKILL simulates a crash) and start again on the same data dir."""
        port = self.port if same_port else 0
        if self.proc is not None:
            self.kill(sig)
        return self.start(port)

    def _reap(self) -> int:
        assert self.proc is not None
        code = self.proc.wait()
        if self._pump is not None:
            self._pump.join(STOP_TIMEOUT_S)
            self._pump = None
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        return code

    # --- talking to it -----------------------------------------------------------------------

    def stderr_text(self) -> str:
        path = self.root / f"serve-{self.starts}.stderr"
        return path.read_text() if path.exists() else ""

    def describe(self) -> str:
        code = self.proc.poll() if self.proc else None
        return (f"exit code {code}\n--- stdout ---\n" + "\n".join(self.output[-50:])
                + f"\n--- stderr ---\n{self.stderr_text()[-4000:]}")

    def cli_env(self, **extra: str) -> dict[str, str]:
        """The environment for CLI processes, naming this server explicitly (URL and token)."""
        return {**self.env, "QUICKFLOW_URL": self.url, "QUICKFLOW_TOKEN": self.token, **extra}

    def cli(self, *args: str, timeout: float = 60.0, env: Mapping[str, str] | None = None,
            input: str | None = None, discover: bool = False) -> subprocess.CompletedProcess[str]:
        """Run the CLI against this server (``discover=True``: through the daemon file only)."""
        base = self.env if discover else self.cli_env()
        return run_cli(*args, env={**base, **(env or {})}, timeout=timeout, input=input, cwd=self.root)

    def client(self) -> Client:
        return Client(self.url, self.token)


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., QuickflowServer]]:
    """Start servers with custom env/serve args: ``server_factory(env={...}, serve_args=[...])``."""
    started: list[QuickflowServer] = []

    def make(name: str = "server", **kwargs: Any) -> QuickflowServer:
        srv = QuickflowServer(tmp_path / name, **kwargs)
        started.append(srv)
        return srv.start()

    yield make
    for srv in started:
        srv.stop()


@pytest.fixture
def server(server_factory: Callable[..., QuickflowServer]) -> QuickflowServer:
    """A fresh server for one test (kill and restart it freely)."""
    return server_factory()


@pytest.fixture(scope="module")
def module_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QuickflowServer]:
    """One server shared by a module's tests, for tests that do not stop or restart it."""
    srv = QuickflowServer(tmp_path_factory.mktemp("module-server"))
    srv.start()
    yield srv
    srv.stop()
