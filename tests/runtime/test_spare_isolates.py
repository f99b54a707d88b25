"""When the engine prepares spare isolates (runtime/engine.py, ``SPARES_AFTER_S``).

Preparing one costs 5-10 ms of CPU. The engine does it once a run has ended, not while the run
that used a spare goes on, and a run that goes on for long does not keep the pool empty.
"""

from __future__ import annotations

import anyio
import pytest

import sandbox
from runtime import Engine, MemoryStore, RunRequest, load_settings
from runtime import engine as engine_module

# The run's only agent answers after this long: well past its first slice, well before a deadline.
AGENT_LATENCY_MS = 400


async def _spares_ready() -> None:
    while sandbox.spare_isolates_wanted():
        await anyio.sleep(0.005)


async def _first_slice_done(engine: Engine, run_id: str) -> None:
    while not await engine.list_agents(run_id):
        await anyio.sleep(0.005)


@pytest.mark.anyio
async def test_spares_are_prepared_once_the_run_ends_not_while_it_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_module, "SPARES_AFTER_S", 60.0)
    request = RunRequest(script="return await agent('slow')",
                         options={"simulate": {"latency_ms": AGENT_LATENCY_MS}})
    with anyio.fail_after(20):
        async with Engine(load_settings(), MemoryStore(), recover=False) as engine:
            record = await engine.submit(request)
            await _first_slice_done(engine, record.id)
            # The run took a spare, or hardened one of its own if there was none: either way one
            # is wanted now, and it stays wanted while the run waits for its agent.
            await anyio.sleep(AGENT_LATENCY_MS / 1000 / 4)
            assert sandbox.spare_isolates_wanted() > 0
            assert (await engine.get_run(record.id)).status == "running"
            record = await engine.wait(record.id)
            assert record.status == "completed"
            await _spares_ready()


@pytest.mark.anyio
async def test_a_long_run_does_not_keep_the_pool_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_module, "SPARES_AFTER_S", 0.05)
    request = RunRequest(script="return await agent('slow')",
                         options={"simulate": {"latency_ms": 5_000}})
    with anyio.fail_after(20):
        async with Engine(load_settings(), MemoryStore(), recover=False) as engine:
            record = await engine.submit(request)
            await _first_slice_done(engine, record.id)
            await _spares_ready()
            assert (await engine.get_run(record.id)).status == "running"
            await engine.cancel(record.id)
