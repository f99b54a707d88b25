"""``/v1/runs``: create, list, inspect, follow and control runs."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from sse_starlette.sse import EventSourceResponse

from runtime import Engine, RunRecord
from runtime.errors import InvalidRequest, RunNotFound
from runtime.state import RunStatus

from .auth import Principal, principal
from .models import RunCreate, agent_json, run_json

__all__ = ["router", "create_run"]

router = APIRouter(prefix="/v1/runs", tags=["runs"])

Caller = Annotated[Principal, Depends(principal)]


def engine_of(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


EngineDep = Annotated[Engine, Depends(engine_of)]


async def create_run(engine: Engine, caller: Principal, body: RunCreate, wait: bool,
                     idempotency_key: str | None, response: Response) -> dict[str, Any]:
    record = await engine.submit(body.to_request(idempotency_key), owner=caller.name)
    response.status_code = 202
    if wait:
        record = await engine.wait(record.id)
        response.status_code = 200
    return run_json(record)


@router.post("", status_code=202, summary="Start a run")
async def post_run(
    body: RunCreate,
    engine: EngineDep,
    caller: Caller,
    response: Response,
    wait: bool = Query(False, description="Block until the run ends and return it with its result."),
    idempotency_key: str | None = Header(None, alias="Idempotency-Key", max_length=200),
) -> dict[str, Any]:
    """Check the script, then start it. 422 with ``details.diagnostics`` when the checks refuse it."""
    return await create_run(engine, caller, body, wait, idempotency_key, response)


@router.get("", summary="List runs, newest first")
async def list_runs(
    engine: EngineDep,
    caller: Caller,
    status: RunStatus | None = None,
    limit: int = Query(50, ge=1, le=500),
    before: str | None = Query(None, description="Cursor: the `next` value of the previous page."),
) -> dict[str, Any]:
    if before is not None:
        try:
            await engine.get_run(before, owner=caller.owner_filter)
        except RunNotFound as exc:
            raise InvalidRequest(f"unknown cursor {before!r}: pass the `next` value of a previous page") from exc
    records = await engine.store.list_runs(
        owner=caller.owner_filter, status=status.value if status else None, limit=limit + 1, before=before
    )
    page = records[:limit]
    live = [await engine.get_run(r.id) if engine.live(r.id) else r for r in page]
    return {"runs": [run_json(r) for r in live], "next": page[-1].id if len(records) > limit else None}


@router.get("/{run_id}", summary="One run: status, result or error, usage, phases")
async def get_run(run_id: str, engine: EngineDep, caller: Caller) -> dict[str, Any]:
    return run_json(await engine.get_run(run_id, owner=caller.owner_filter), include_script=True)


@router.get("/{run_id}/events", summary="Follow a run's events (SSE, or NDJSON with ?format=ndjson)")
async def get_events(
    run_id: str,
    engine: EngineDep,
    caller: Caller,
    request: Request,
    format: Literal["sse", "ndjson"] = "sse",
    after: int | None = Query(None, ge=0, description="Only events with a greater seq (like Last-Event-ID)."),
    last_event_id: str | None = Header(None, alias="Last-Event-ID"),
) -> Any:
    await engine.get_run(run_id, owner=caller.owner_filter)
    after_seq = after or 0
    if last_event_id:
        try:
            after_seq = max(after_seq, int(last_event_id))
        except ValueError as exc:
            raise InvalidRequest("Last-Event-ID must be the integer seq of an event") from exc
    events = engine.follow(run_id, after_seq)
    if format == "ndjson":
        async def lines() -> AsyncIterator[str]:
            async for event in events:
                yield json.dumps(event.to_dict(), ensure_ascii=False) + "\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    async def messages() -> AsyncIterator[dict[str, Any]]:
        async for event in events:
            yield {"id": str(event.seq), "event": event.type, "data": json.dumps(event.to_dict(), ensure_ascii=False)}

    return EventSourceResponse(messages(), ping=15)


@router.get("/{run_id}/agents", summary="The run's agents")
async def list_agents(run_id: str, engine: EngineDep, caller: Caller) -> dict[str, Any]:
    calls = await engine.list_agents(run_id, owner=caller.owner_filter)
    return {"agents": [agent_json(c) for c in calls]}


@router.get("/{run_id}/agents/{index}", summary="One agent: prompt, options, status, result, usage, transcript")
async def get_agent(run_id: str, index: int, engine: EngineDep, caller: Caller) -> dict[str, Any]:
    return agent_json(await engine.get_agent(run_id, index, owner=caller.owner_filter), full=True)


def _control(action: str) -> Any:
    async def control(run_id: str, engine: EngineDep, caller: Caller) -> dict[str, Any]:
        record: RunRecord = await getattr(engine, action)(run_id, owner=caller.owner_filter)
        return run_json(record)

    control.__name__ = f"{action}_run"
    return control


for _action in ("pause", "resume", "cancel"):
    router.add_api_route(f"/{{run_id}}/{_action}", _control(_action), methods=["POST"], summary=f"{_action.title()} a run")


@router.post("/{run_id}/agents/{index}/stop", summary="Stop one agent: its agent() resolves to null")
async def stop_agent(run_id: str, index: int, engine: EngineDep, caller: Caller) -> dict[str, Any]:
    return agent_json(await engine.stop_agent(run_id, index, owner=caller.owner_filter))


@router.post("/{run_id}/agents/{index}/restart", summary="Restart one agent: a new attempt of the same call")
async def restart_agent(run_id: str, index: int, engine: EngineDep, caller: Caller) -> dict[str, Any]:
    return agent_json(await engine.restart_agent(run_id, index, owner=caller.owner_filter))
