"""``/v1/workflows``: saved workflows (stored with their meta; also loaded from a directory)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Response

from runtime.errors import WorkflowNotFound
from runtime.store import WorkflowRecord

from .auth import Principal, principal
from .models import RunCreate, WorkflowPut, WorkflowRunCreate
from .runs import EngineDep, create_run

__all__ = ["router"]

router = APIRouter(prefix="/v1/workflows", tags=["workflows"])

Caller = Annotated[Principal, Depends(principal)]


def workflow_json(record: WorkflowRecord, *, include_script: bool = False) -> dict[str, Any]:
    data = record.to_dict()
    if not include_script:
        data.pop("script", None)
    return data


@router.get("", summary="List saved workflows")
async def list_workflows(engine: EngineDep, caller: Caller) -> dict[str, Any]:
    return {"workflows": [workflow_json(w) for w in await engine.store.list_workflows()]}


@router.get("/{name}", summary="One saved workflow, with its script and meta")
async def get_workflow(name: str, engine: EngineDep, caller: Caller) -> dict[str, Any]:
    record = await engine.store.get_workflow(name)
    if record is None:
        raise WorkflowNotFound(name, [w.name for w in await engine.store.list_workflows()])
    return workflow_json(record, include_script=True)


@router.put("/{name}", summary="Save a workflow (its meta.name must equal the name in the path)")
async def put_workflow(name: str, body: WorkflowPut, engine: EngineDep, caller: Caller) -> dict[str, Any]:
    record = await engine.save_workflow(body.script, name=name, owner=caller.name)
    return workflow_json(record, include_script=True)


@router.delete("/{name}", status_code=204, summary="Delete a saved workflow")
async def delete_workflow(name: str, engine: EngineDep, caller: Caller) -> Response:
    if not await engine.store.delete_workflow(name):
        raise WorkflowNotFound(name, [w.name for w in await engine.store.list_workflows()])
    return Response(status_code=204)


@router.post("/{name}/runs", status_code=202, summary="Run a saved workflow by name")
async def run_workflow(
    name: str,
    body: WorkflowRunCreate,
    engine: EngineDep,
    caller: Caller,
    response: Response,
    wait: bool = Query(False),
    idempotency_key: str | None = Header(None, alias="Idempotency-Key", max_length=200),
) -> dict[str, Any]:
    fields = body.model_dump(exclude_unset=True)
    create = RunCreate(workflow=name, **fields)
    return await create_run(engine, caller, create, wait, idempotency_key, response)
