"""Health, metrics, static checks, and the dashboard page."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from runtime import Engine

from .auth import Principal, principal
from .models import CheckBody
from .runs import EngineDep

__all__ = ["EngineCollector", "router"]

router = APIRouter()

# A write the store has not committed for this long means it is stuck (a stalled disk, a stopped
# writer process): every run waiting on its journal is stuck with it, so /healthz says so.
STORE_STALL_S = 30.0


@router.get("/healthz", tags=["system"],
            summary="Ready when the store is open and runs were recovered; 503 while the store is stuck")
async def healthz(request: Request) -> Any:
    engine: Engine = request.app.state.engine
    waiting_s = engine.store.commit_wait_s()
    if waiting_s > STORE_STALL_S:
        return JSONResponse(status_code=503, content={
            "status": "unavailable", "node": engine.node,
            "reason": f"the store has not committed a write for {waiting_s:.0f} s (a stalled disk or writer process?)",
        })
    return {"status": "ok", "node": engine.node}


@router.get("/metrics", tags=["system"], response_class=PlainTextResponse, summary="Prometheus metrics")
async def metrics(request: Request) -> PlainTextResponse:
    registry: CollectorRegistry = request.app.state.metrics
    return PlainTextResponse(generate_latest(registry).decode(), media_type="text/plain; version=0.0.4")


@router.post("/v1/check", tags=["system"], summary="Static diagnostics and meta for a script, without running it")
async def check(body: CheckBody, engine: EngineDep, caller: Annotated[Principal, Depends(principal)]) -> dict[str, Any]:
    return (await engine.check_async(body.script, require_meta=body.require_meta)).to_dict()


@router.get("/", include_in_schema=False, response_class=HTMLResponse)
async def dashboard() -> HTMLResponse:
    # Next to this module, not importlib.resources: `api` has no __init__.py, and for a namespace
    # package under an editable install resources.files() raises NotADirectoryError.
    page = (Path(__file__).parent / "static" / "index.html").read_text(encoding="utf-8")
    return HTMLResponse(page)


class EngineCollector:
    """Reads the engine's statistics at scrape time; nothing is counted on the hot path."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def collect(self) -> Any:
        engine = self._engine
        runs = GaugeMetricFamily("quickflow_runs", "Runs hosted by this process, by status", labels=["status"])
        for status, count in engine.run_counts().items():
            runs.add_metric([status], count)
        yield runs
        dispatch = engine.dispatcher.statistics()
        yield GaugeMetricFamily("quickflow_agents_in_flight", "Agents executing now", value=dispatch.in_flight)
        yield GaugeMetricFamily("quickflow_agents_waiting", "Agents waiting for a server-wide slot",
                                value=dispatch.waiting)
        yield CounterMetricFamily("quickflow_agents_executed", "Agent executions started",
                                  value=dispatch.executed_total)
        pool = engine.pool.statistics()
        yield GaugeMetricFamily("quickflow_slices_running", "Isolate slices running on workers", value=pool.running)
        yield GaugeMetricFamily("quickflow_slices_waiting", "Isolate slices waiting for a worker", value=pool.waiting)
        yield CounterMetricFamily("quickflow_slices", "Isolate slices run", value=pool.slices_total)
        yield CounterMetricFamily("quickflow_slice_overruns",
                                  "Slices abandoned while stuck in a built-in call past their deadline",
                                  value=pool.overruns_total)
        yield GaugeMetricFamily("quickflow_slices_overrunning",
                                "Abandoned slices whose worker thread is still inside the engine",
                                value=pool.overrunning)
        yield GaugeMetricFamily("quickflow_store_commit_wait_seconds",
                                "How long the oldest write handed to the store has waited to be committed",
                                value=engine.store.commit_wait_s())
        yield CounterMetricFamily("quickflow_isolate_evictions",
                                  "Isolates of waiting scripts given up to save memory (rebuilt by replay)",
                                  value=engine.isolate_evictions)
