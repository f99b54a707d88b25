"""Baselines measured in the same run as quickflow: the bare-anyio floor and the LangGraph peer.

The floor is what a bare-asyncio fan-out costs with nothing in it: the same number of no-op
coroutines through ``asyncio.gather``, each holding one slot of an ``asyncio.Semaphore`` of the same
size as quickflow's concurrency. No sandbox, no journal, no events. The no-op yields to the loop
once (``asyncio.sleep(0)``, as any real agent call would) and returns a string. The same fan-out
with anyio's task group and ``CapacityLimiter`` (quickflow's own primitives) is reported beside it:
per-task cost of the structured-concurrency layer, for reference only.

LangGraph lives in its own virtualenv (``benchmarks/.env``) that this module creates and pins;
it is never installed into the project's environment. ``langgraph_fanout.py`` runs there as a
worker subprocess speaking JSON lines.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
import venv
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread

__all__ = [
    "LANGGRAPH_PINS",
    "ensure_langgraph_env",
    "floor_fanout",
    "floor_fanout_anyio",
    "floor_pipeline",
    "LangGraphWorker",
]

HERE = Path(__file__).resolve().parent
ENV_DIR = HERE / ".env"  # gitignored
#: Pinned so the peer's numbers stay comparable between runs; bump deliberately and say so in the report.
LANGGRAPH_PINS = ("langgraph==1.2.22", "langgraph-checkpoint-sqlite==3.1.2")
_STAMP = ENV_DIR / "quickflow-bench-pins.txt"
#: LangGraph's default durability ("async": checkpoints written while the next step runs) and "sync"
#: (each step's checkpoint written before the next starts: closest to quickflow's journal-before-result).
DURABILITY_MODES = ("async", "sync")


async def _noop(i: int) -> str:
    await asyncio.sleep(0)  # yield to the loop once, as any real agent call would
    return f"result {i}"


async def floor_fanout(n: int, concurrency: int) -> float:
    """The floor: seconds for ``n`` no-op coroutines via ``asyncio.gather``, ``concurrency`` at a time."""
    limit = asyncio.Semaphore(concurrency)

    async def one(i: int) -> str:
        async with limit:
            return await _noop(i)

    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(n)))
    elapsed = time.perf_counter() - t0
    if len(results) != n:
        raise RuntimeError("the floor lost results")
    return elapsed


async def floor_fanout_anyio(n: int, concurrency: int) -> float:
    """The same fan-out with anyio (task group + CapacityLimiter), the primitives quickflow is built on."""
    limit = anyio.CapacityLimiter(concurrency)
    results: list[str | None] = [None] * n

    async def one(i: int) -> None:
        async with limit:
            await anyio.lowlevel.checkpoint()
            results[i] = f"result {i}"

    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(one, i)
    return time.perf_counter() - t0


async def floor_pipeline(items: int, stages: int, concurrency: int) -> float:
    """Seconds for ``items`` chains of ``stages`` no-op calls via ``asyncio.gather``; each call holds a slot."""
    limit = asyncio.Semaphore(concurrency)

    async def chain(i: int) -> str:
        value = str(i)
        for _ in range(stages):
            async with limit:
                value = await _noop(i)
        return value

    t0 = time.perf_counter()
    await asyncio.gather(*(chain(i) for i in range(items)))
    return time.perf_counter() - t0


def _env_python() -> Path:
    return ENV_DIR / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure_langgraph_env(log: Any = print) -> Path:
    """Create ``benchmarks/.env`` and install the pinned LangGraph there (once; re-done when pins change)."""
    wanted = "\n".join(LANGGRAPH_PINS)
    python = _env_python()
    if python.exists() and _STAMP.exists() and _STAMP.read_text() == wanted:
        return python
    log(f"creating the LangGraph benchmark venv in {ENV_DIR} ({', '.join(LANGGRAPH_PINS)})")
    if not python.exists():
        venv.EnvBuilder(with_pip=True, clear=True).create(ENV_DIR)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *LANGGRAPH_PINS],
                   check=True)
    _STAMP.write_text(wanted)
    return python


class LangGraphWorker:
    """``langgraph_fanout.py --serve`` in the LangGraph venv: one trial per request, so the peer's
    trials interleave with quickflow's under the same machine load (the idle side only waits)."""

    def __init__(self, concurrency: int, modes: tuple[str, ...] = DURABILITY_MODES) -> None:
        python = ensure_langgraph_env()
        # A clean environment for the peer: nothing of quickflow's environment leaks into it.
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        self.modes = modes
        self._process = subprocess.Popen(
            [str(python), str(HERE / "langgraph_fanout.py"), "--serve", "--concurrency", str(concurrency),
             "--durability", *modes],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        )
        hello = self._reply()
        self.versions: dict[str, str] = hello["versions"]

    def _reply(self) -> dict[str, Any]:
        assert self._process.stdout is not None  # set by Popen(stdout=PIPE)
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError(f"the LangGraph worker exited ({self._process.wait()}); see its stderr above")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def trial(self, mode: str, n: int) -> float:
        """Seconds for one ``n``-node fan-out with durability ``mode`` (blocking)."""
        assert self._process.stdin is not None
        self._process.stdin.write(json.dumps({"mode": mode, "n": n}) + "\n")
        self._process.stdin.flush()
        return float(self._reply()["seconds"])

    async def atrial(self, mode: str, n: int, timeout_s: float = 300) -> float:
        with anyio.fail_after(timeout_s):
            return await anyio.to_thread.run_sync(self.trial, mode, n, abandon_on_cancel=True)

    def close(self) -> None:
        if self._process.stdin is not None:
            self._process.stdin.close()
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    def __enter__(self) -> LangGraphWorker:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
