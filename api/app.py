"""The FastAPI application: HTTP API, SSE, dashboard. ``create_app`` wires it to an engine.

Service-lifetime work (the store's writer process, the engine's task group with every run)
starts in the lifespan and ends with it; ``GET /healthz`` answers once both are ready.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from runtime import Engine, Settings
from runtime.store import SQLiteStore, Store

from . import runs, system, workflows
from ._errors import error_response, install_error_handlers
from .auth import TokenTable

__all__ = ["BodyLimit", "create_app"]


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with 413, whether or not Content-Length is sent."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(scope, receive, send)
            return
        seen = 0
        tripped = False
        started = False

        async def limited() -> Message:
            nonlocal seen, tripped
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    tripped = True
                    raise _TooLarge()
            return message

        async def guarded(message: Message) -> None:
            nonlocal started
            # Once the limit tripped, the app's own answer (FastAPI turns any error while reading
            # the body into a 400) is dropped: the client gets the 413 below instead.
            if tripped and not started:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, guarded)
        except _TooLarge:
            if started:  # too late for a 413: let the server abort the response
                raise
        if tripped and not started:
            await self._reject(scope, receive, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(413, "body_too_large", f"request body exceeds {self.max_bytes} bytes")
        await response(scope, receive, send)


class _TooLarge(Exception):
    pass


def create_app(settings: Settings, *, store: Store | None = None, generated_token: str | None = None,
               backends: dict[str, Any] | None = None) -> FastAPI:
    """The service. ``store`` defaults to SQLite in ``settings.data_dir``."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own_store = store is None
        active: Store = store or await SQLiteStore.open(settings.data_dir / "quickflow.db")
        try:
            async with Engine(settings, active, backends=backends) as engine:
                if settings.workflows_dir is not None:
                    await engine.load_workflows_dir(settings.workflows_dir)
                registry = CollectorRegistry()
                registry.register(system.EngineCollector(engine))
                app.state.engine = engine
                app.state.metrics = registry
                yield
        finally:
            if own_store:
                await active.aclose()

    app = FastAPI(
        title="quickflow",
        version="0.1.0",
        description="Run JavaScript workflow scripts that orchestrate fleets of LLM subagents.",
        lifespan=lifespan,
    )
    app.state.tokens = TokenTable.from_settings(settings, generated_token)
    install_error_handlers(app)
    app.include_router(runs.router)
    app.include_router(workflows.router)
    app.include_router(system.router)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    return app
