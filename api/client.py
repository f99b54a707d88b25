"""A small synchronous client for the HTTP API, one method per route. The CLI is built on it.

    with resolve_client() as client:              # flags, else QUICKFLOW_URL/TOKEN, else the daemon
        run = client.create_run({"script": "return await agent('hi')"}, wait=True)
        for event in client.events(run["id"]):
            print(event["type"])

Methods return the decoded JSON of the response. Errors:

    QuickflowError                 (runtime.errors)
    └── ApiError                   the server answered with a non-2xx status; ``status``, ``code``
        │                          (the ``error.code`` of the response), ``message``, ``details``
        └── ServerUnreachable      no answer at all: nothing listens there, or the connection broke
    ConfigError                    (runtime.errors) no server to talk to: none given, none running
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from types import TracebackType
from typing import Any, Self, cast
from urllib.parse import quote

import httpx

from runtime.errors import ConfigError, QuickflowError

__all__ = ["ApiError", "Client", "ServerUnreachable", "resolve_client"]

# Connecting and ordinary requests are quick; waiting for a run (?wait=true) and following its
# events last as long as the run does, so those requests have no read timeout.
DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=5.0)
_UNBOUNDED_READ = httpx.Timeout(30.0, connect=5.0, read=None)


class ApiError(QuickflowError):
    """The server refused a request: ``status`` is the HTTP status, ``code`` the error JSON's code."""

    def __init__(self, status: int | None, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message, details=details)
        self.status = status
        self.code = code

    def __repr__(self) -> str:
        return f"ApiError(status={self.status!r}, code={self.code!r}, message={self.message!r})"


class ServerUnreachable(ApiError):
    """Nothing answered at the server's URL (not started, wrong port) or the connection broke."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(
            None,
            "server_unreachable",
            f"cannot reach the quickflow server at {url} ({reason}); start one with `quickflow serve` "
            "or point --url / QUICKFLOW_URL at a running server",
        )
        self.url = url


def _error_from(response: httpx.Response) -> ApiError:
    try:
        body = response.json()
        error = body["error"]
        return ApiError(response.status_code, str(error["code"]), str(error["message"]), error.get("details"))
    except (ValueError, KeyError, TypeError):
        text = response.text.strip()[:200] or response.reason_phrase
        return ApiError(response.status_code, "http_error", f"HTTP {response.status_code}: {text}")


class Client:
    """The HTTP API over one ``httpx.Client``. Use it as a context manager, or call ``close()``."""

    def __init__(self, base_url: str, token: str | None = None, *, transport: httpx.BaseTransport | None = None,
                 timeout: httpx.Timeout = DEFAULT_TIMEOUT) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, transport=transport)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # --- plumbing -----------------------------------------------------------------------------

    def _request(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
                 json_body: Any = None, headers: Mapping[str, str] | None = None,
                 timeout: httpx.Timeout | None = None) -> dict[str, Any]:
        """One request; the response's JSON object ({} for 204). Non-2xx raises ApiError."""
        kwargs: dict[str, Any] = {}
        if timeout is not None:
            kwargs["timeout"] = timeout
        try:
            response = self._http.request(
                method, path, params=_clean(params), json=json_body, headers=dict(headers or {}), **kwargs
            )
        except httpx.TransportError as exc:
            raise ServerUnreachable(self.base_url, _reason(exc)) from exc
        if response.status_code >= 400:
            raise _error_from(response)
        if response.status_code == 204 or not response.content:
            return {}
        return cast(dict[str, Any], response.json())

    # --- runs ---------------------------------------------------------------------------------

    def create_run(self, body: Mapping[str, Any], *, wait: bool = False,
                   idempotency_key: str | None = None) -> dict[str, Any]:
        """POST /v1/runs. ``body``: {script | workflow, args?, options?, resume_from?, resume_mode?}."""
        return self._request(
            "POST", "/v1/runs", params={"wait": "true" if wait else None}, json_body=dict(body),
            headers=_idempotency(idempotency_key), timeout=_UNBOUNDED_READ if wait else None,
        )

    def list_runs(self, status: str | None = None, limit: int | None = None,
                  before: str | None = None) -> dict[str, Any]:
        """GET /v1/runs: ``{runs: [...], next}``, newest first; pass ``next`` as ``before`` for the next page."""
        return self._request("GET", "/v1/runs", params={"status": status, "limit": limit, "before": before})

    def get_run(self, run_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/runs/{_seg(run_id)}")

    def events(self, run_id: str, after: int = 0, *, idle_timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """The run's events with ``seq > after``, as NDJSON; live until the run ends.

        With ``idle_timeout``, the iteration also ends once no event arrived for that many
        seconds: a snapshot of a live run's events so far instead of following it.
        """
        timeout = httpx.Timeout(30.0, connect=5.0, read=idle_timeout)
        params = _clean({"format": "ndjson", "after": after or None})
        try:
            with self._http.stream("GET", f"/v1/runs/{_seg(run_id)}/events", params=params,
                                   timeout=timeout) as response:
                if response.status_code >= 400:
                    response.read()
                    raise _error_from(response)
                for line in response.iter_lines():
                    if line.strip():
                        yield json.loads(line)
        except httpx.ReadTimeout:
            if idle_timeout is None:
                raise ServerUnreachable(self.base_url, "the event stream timed out") from None
            return
        except httpx.TransportError as exc:
            raise ServerUnreachable(self.base_url, _reason(exc)) from exc

    def list_agents(self, run_id: str) -> list[dict[str, Any]]:
        return cast(list[dict[str, Any]], self._request("GET", f"/v1/runs/{_seg(run_id)}/agents")["agents"])

    def get_agent(self, run_id: str, index: int) -> dict[str, Any]:
        return self._request("GET", f"/v1/runs/{_seg(run_id)}/agents/{int(index)}")

    def pause(self, run_id: str) -> dict[str, Any]:
        return self._request("POST", f"/v1/runs/{_seg(run_id)}/pause")

    def resume(self, run_id: str) -> dict[str, Any]:
        """POST /v1/runs/{id}/resume: continue a *paused* run (see ``create_run(resume_from=...)``)."""
        return self._request("POST", f"/v1/runs/{_seg(run_id)}/resume")

    def cancel(self, run_id: str) -> dict[str, Any]:
        """Cancel a live run; answers once it has ended (status ``cancelled``)."""
        return self._request("POST", f"/v1/runs/{_seg(run_id)}/cancel", timeout=_UNBOUNDED_READ)

    def stop_agent(self, run_id: str, index: int) -> dict[str, Any]:
        return self._request("POST", f"/v1/runs/{_seg(run_id)}/agents/{int(index)}/stop")

    def restart_agent(self, run_id: str, index: int) -> dict[str, Any]:
        return self._request("POST", f"/v1/runs/{_seg(run_id)}/agents/{int(index)}/restart")

    # --- checks and saved workflows -----------------------------------------------------------

    def check(self, script: str, *, require_meta: bool = False) -> dict[str, Any]:
        """POST /v1/check: ``{ok, errors, warnings, meta}`` (a refused script is data here, not an error)."""
        return self._request("POST", "/v1/check", json_body={"script": script, "require_meta": require_meta})

    def list_workflows(self) -> list[dict[str, Any]]:
        return cast(list[dict[str, Any]], self._request("GET", "/v1/workflows")["workflows"])

    def get_workflow(self, name: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/workflows/{_seg(name)}")

    def put_workflow(self, name: str, script: str) -> dict[str, Any]:
        return self._request("PUT", f"/v1/workflows/{_seg(name)}", json_body={"script": script})

    def delete_workflow(self, name: str) -> None:
        self._request("DELETE", f"/v1/workflows/{_seg(name)}")

    def run_workflow(self, name: str, body: Mapping[str, Any] | None = None, *, wait: bool = False,
                     idempotency_key: str | None = None) -> dict[str, Any]:
        """POST /v1/workflows/{name}/runs. ``body``: {args?, options?}."""
        return self._request(
            "POST", f"/v1/workflows/{_seg(name)}/runs", params={"wait": "true" if wait else None},
            json_body=dict(body or {}), headers=_idempotency(idempotency_key),
            timeout=_UNBOUNDED_READ if wait else None,
        )

    def healthz(self) -> dict[str, Any]:
        return self._request("GET", "/healthz")


def resolve_client(url: str | None = None, token: str | None = None) -> Client:
    """A client for the server named by the arguments, else the environment, else the local daemon.

    ``QUICKFLOW_URL``/``QUICKFLOW_TOKEN`` fill in what the arguments leave out. Without a URL, the
    local daemon's file (``quickflow serve`` writes it) gives both. A token is only taken from
    the daemon file for the daemon's own URL.
    """
    url = url or os.environ.get("QUICKFLOW_URL") or None
    token = token or os.environ.get("QUICKFLOW_TOKEN") or None
    if url is not None and token is not None:
        return Client(url, token)
    # Imported here: api.auth pulls in FastAPI, which a CLI call naming its server does not need.
    from .auth import daemon_file, read_daemon_file

    daemon = read_daemon_file()
    if url is None:
        if not daemon or not daemon.get("url"):
            raise ConfigError(
                "no server: start one with `quickflow serve` or set QUICKFLOW_URL "
                f"(no local daemon file at {daemon_file()})"
            )
        url = str(daemon["url"])
    if token is None and daemon and str(daemon.get("url", "")).rstrip("/") == url.rstrip("/"):
        token = str(daemon.get("token") or "") or None
    return Client(url, token)


def _seg(value: str) -> str:
    """One path segment: ids and names never reach into other routes."""
    return quote(str(value), safe="")


def _clean(params: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if params is None:
        return None
    return {k: v for k, v in params.items() if v is not None}


def _idempotency(key: str | None) -> dict[str, str]:
    return {"Idempotency-Key": key} if key else {}


def _reason(exc: httpx.TransportError) -> str:
    if isinstance(exc, httpx.ConnectError):
        return "connection refused" if "refused" in str(exc).lower() else f"cannot connect: {exc}"
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    return str(exc) or type(exc).__name__
