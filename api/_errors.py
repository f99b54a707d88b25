"""The one place that turns exceptions into HTTP statuses and the shared error shape.

    {"error": {"code": "...", "message": "...", "details": {...}}}
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from runtime.errors import (
    ConfigError,
    Conflict,
    InvalidRequest,
    NotFound,
    QuickflowError,
    ScriptRejected,
    TooManyStuckRuns,
    Unauthorized,
)

__all__ = ["error_response", "install_error_handlers", "status_for"]

logger = logging.getLogger("quickflow.api")

_STATUS: list[tuple[type[QuickflowError], int]] = [
    (ScriptRejected, 422),
    (InvalidRequest, 422),
    (NotFound, 404),
    (Conflict, 409),
    (Unauthorized, 401),
    (TooManyStuckRuns, 429),
    (ConfigError, 500),
]


def status_for(exc: QuickflowError) -> int:
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def error_response(status: int, code: str, message: str, details: dict[str, Any] | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"code": code, "message": message}
    if details:
        body["details"] = details
    return JSONResponse({"error": body}, status_code=status, headers=headers)


async def _quickflow_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, QuickflowError)
    status = status_for(exc)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    if isinstance(exc, TooManyStuckRuns):
        headers = {"Retry-After": str(exc.retry_after_s)}
    return error_response(status, exc.code, exc.message, exc.details or None, headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        first = next(e for e in errors if e.get("type") == "json_invalid")
        reason = (first.get("ctx") or {}).get("error", "") or "malformed"
        offset = first.get("loc", ("body", None))[-1]
        where = f" at character {offset}" if isinstance(offset, int) else ""
        return error_response(400, "invalid_json", f"the request body is not valid JSON: {reason}{where}")
    problems = [
        {"location": ".".join(str(p) for p in e.get("loc", ()) if p != "body"), "message": e.get("msg", "")}
        for e in errors
    ]
    summary = "; ".join(f"{p['location'] or 'body'}: {p['message']}" for p in problems[:5])
    return error_response(422, "invalid_request", f"invalid request: {summary}", {"problems": problems})


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    cause = exc.__cause__
    if exc.status_code == 400 and isinstance(cause, (ValueError, RecursionError)):
        # FastAPI reports a body it could not decode (not UTF-8, nested past the recursion
        # limit) as a bare 400 "error parsing the body"; for the client it is invalid JSON.
        reason = "it is not UTF-8" if isinstance(cause, UnicodeDecodeError) else (
            "it is nested too deeply" if isinstance(cause, RecursionError) else str(cause))
        return error_response(400, "invalid_json", f"the request body is not valid JSON: {reason}")
    codes = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large", 401: "unauthorized"}
    return error_response(exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail),
                          headers=getattr(exc, "headers", None))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal_error", "internal error; the server log has the details")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(QuickflowError, _quickflow_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
