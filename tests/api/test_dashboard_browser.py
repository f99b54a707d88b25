"""The dashboard in a real browser: headless Chromium loads the page, which fetches the API and
streams events with the token from the URL fragment, and the rendered DOM shows the run."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import anyio
import httpx
import pytest

from .conftest import TOKENS, Service, start_run, wait_done

pytestmark = pytest.mark.anyio

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def rendered_dom(url: str, profile: Path) -> str:
    """The page's DOM after its scripts ran for a few seconds of virtual time."""
    done = subprocess.run(
        [
            CHROMIUM or "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", "--virtual-time-budget=4000", "--dump-dom", url,
        ],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (.ci/run installs it with apt)")
async def test_dashboard_shows_a_run_with_its_phases_agents_and_events(
    service: Service, alice: httpx.AsyncClient, tmp_path: Path
) -> None:
    script = """export const meta = {name: 'shown', description: 'd', phases: [{title: 'Scan'}, {title: 'Sum'}]}
phase('Scan')
log('scanning two files')
const r = await parallel(['a.py', 'b.py'].map((f) => () => agent(`scan ${f}`, {label: `scan ${f}`})))
phase('Sum')
return {count: r.length}"""
    with anyio.fail_after(60):
        run = await start_run(alice, script)
        await wait_done(alice, run["id"])
        dom = await anyio.to_thread.run_sync(
            rendered_dom, f"{service.url}/#token={TOKENS['alice']}&run={run['id']}", tmp_path / "profile"
        )
    assert run["id"] in dom
    assert '<span class="status completed">completed</span>' in dom
    for text in ("Scan", "Sum", "scan a.py", "scan b.py", "scanning two files", "run.completed", "\"count\": 2"):
        assert text in dom, text


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (.ci/run installs it with apt)")
async def test_dashboard_without_a_token_says_so(service: Service, tmp_path: Path) -> None:
    with anyio.fail_after(60):
        dom = await anyio.to_thread.run_sync(rendered_dom, f"{service.url}/", tmp_path / "profile")
    assert "unauthorized" in dom
