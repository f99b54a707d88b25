"""Every example in examples/ passes the checks and runs to completion on the simulate backend."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from runtime import Engine, MemoryStore, RunRequest, load_settings
from sandbox import check_script

pytestmark = pytest.mark.anyio

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = sorted(EXAMPLES.glob("*.js"))


def test_there_are_examples_for_every_pattern() -> None:
    names = {p.stem for p in SCRIPTS}
    assert {"code-audit", "review-pipeline", "fact-check", "bug-hunt", "budget-guarded", "release-gate"} <= names


@pytest.mark.parametrize("path", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_example_passes_checks_with_meta(path: Path) -> None:
    result = check_script(path.read_text(), require_meta=True)
    assert result.ok, result.errors
    assert result.warnings == ()
    assert result.meta is not None and result.meta.name == path.stem


@pytest.mark.parametrize("budget", [None, 400], ids=["no-budget", "budget-400"])
@pytest.mark.parametrize("path", SCRIPTS, ids=[p.stem for p in SCRIPTS])
async def test_example_runs_on_simulate(path: Path, budget: int | None) -> None:
    options = {"simulate": {"latency_ms": [0, 5]}, "budget_tokens": budget}
    with anyio.fail_after(60):
        async with Engine(load_settings(), MemoryStore(), recover=False) as engine:
            await engine.load_workflows_dir(EXAMPLES)
            record = await engine.submit(RunRequest(script=path.read_text(), options=options))
            record = await engine.wait(record.id)
    assert record.status == "completed", record.error
    assert isinstance(record.result, dict) and record.result
    assert record.usage["agents"]["total"] > 0
