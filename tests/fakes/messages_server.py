"""A loopback fake of the Anthropic Messages API, for driving the real SDK and the real CLI.

A real HTTP server (stdlib ``ThreadingHTTPServer`` on 127.0.0.1, port 0) so that everything in
between — the SDK's HTTP client, SSE parsing, the Claude Code binary — is exercised for real.
Tests script its behaviour and read back every request body it received::

    with FakeMessagesServer() as server:
        server.enqueue(ErrorReply(429, retry_after=0.2), TextReply("hello"))
        client = anthropic.AsyncAnthropic(base_url=server.url, api_key="test", max_retries=0)
        ...
        assert len(server.message_requests()) == 2

Which reply answers a request: ``responder(request)`` if given and it returns a reply, else the
next queued reply, else ``default`` (a plain text reply). ``POST /v1/messages`` (with or without
``?beta=true``) answers with JSON, or with SSE events when the body has ``"stream": true``.
``HEAD /api/hello`` answers 200 (the CLI's connectivity probe).
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

__all__ = [
    "ErrorReply",
    "FakeMessagesServer",
    "RecordedRequest",
    "Reply",
    "TextReply",
    "ToolUseReply",
]

_DEFAULT_USAGE = {
    "input_tokens": 10,
    "output_tokens": 5,
    "cache_creation_input_tokens": 0,
    "cache_read_input_tokens": 0,
}

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


@dataclass(frozen=True)
class TextReply:
    """An assistant message with one text block. ``usage`` keys use the API's names."""

    text: str
    usage: Mapping[str, int] = field(default_factory=dict)
    stop_reason: str = "end_turn"
    delay_s: float = 0.0


@dataclass(frozen=True)
class ToolUseReply:
    """An assistant message calling a tool. ``name`` defaults to the tool the request forced
    (or its first tool); ``text`` adds a text block before the call."""

    input: Mapping[str, Any]
    name: str | None = None
    text: str | None = None
    usage: Mapping[str, int] = field(default_factory=dict)
    stop_reason: str = "tool_use"
    delay_s: float = 0.0


@dataclass(frozen=True)
class ErrorReply:
    """An error in Anthropic's shape. ``mid_stream`` sends it as an SSE ``error`` event after a
    200 and ``message_start``, as the API does when it overloads during a stream."""

    status: int
    message: str = "scripted error"
    error_type: str | None = None
    retry_after: float | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    mid_stream: bool = False
    delay_s: float = 0.0

    def body(self) -> dict[str, Any]:
        kind = self.error_type or _ERROR_TYPES.get(self.status, "api_error")
        return {"type": "error", "error": {"type": kind, "message": self.message}, "request_id": "req_fake"}


Reply = TextReply | ToolUseReply | ErrorReply


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the server saw it. ``headers`` keys are lower-case; ``body`` is parsed JSON
    (None when the body was empty or not JSON)."""

    method: str
    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]
    body: Any

    @property
    def is_message(self) -> bool:
        return self.method == "POST" and self.path == "/v1/messages"

    @property
    def stream(self) -> bool:
        return isinstance(self.body, dict) and bool(self.body.get("stream"))

    def text(self) -> str:
        """The whole body as JSON text, for "does this request mention X" assertions."""
        return json.dumps(self.body)


class FakeMessagesServer:
    """The fake server; a context manager that starts it on entry and stops it on exit."""

    def __init__(
        self, *, default: Reply | None = None, responder: Callable[[RecordedRequest], Reply | None] | None = None
    ) -> None:
        self.default: Reply = default if default is not None else TextReply("ok")
        self.responder = responder
        self._queue: deque[Reply] = deque()
        self._requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- scripting and inspection ---------------------------------------------------------------

    def enqueue(self, *replies: Reply) -> None:
        """Queue replies, answered in order before falling back to ``default``."""
        with self._lock:
            self._queue.extend(replies)

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def message_requests(self) -> list[RecordedRequest]:
        """Only the ``POST /v1/messages`` requests, in arrival order."""
        return [r for r in self.requests if r.is_message]

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("the fake server is not running")
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> FakeMessagesServer:
        # Binding and listening happen in the constructor, so the server is ready (connections
        # wait in the backlog) before serve_forever even starts: no readiness race.
        self._httpd = _Server(("127.0.0.1", 0), _Handler, self)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-messages-server"
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._closing.set()  # wakes handlers sleeping in a scripted delay
        self._httpd.shutdown()
        self._httpd.close_connections()  # unblocks handlers waiting on idle keep-alive sockets
        self._httpd.server_close()  # joins every handler thread
        if self._thread is not None:
            self._thread.join()
        self._httpd = None

    def __enter__(self) -> FakeMessagesServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- used by the handler --------------------------------------------------------------------

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)

    def _choose(self, request: RecordedRequest) -> Reply:
        if self.responder is not None:
            reply = self.responder(request)
            if reply is not None:
                return reply
        with self._lock:
            if self._queue:
                return self._queue.popleft()
        return self.default

    def _wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; False if the server is closing."""
        return not self._closing.wait(seconds) if seconds > 0 else True


class _Server(ThreadingHTTPServer):
    # The CLI opens bursts of connections; the default backlog of 5 makes them stall on SYN retries.
    request_queue_size = 1024
    daemon_threads = False
    block_on_close = True

    def __init__(
        self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], fake: FakeMessagesServer
    ) -> None:
        self.fake = fake
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._open_lock:
            sockets = list(self._open)
        for sock in sockets:
            with contextlib.suppress(OSError):  # already closed by the client
                sock.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the real API
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # quiet test output

    def do_HEAD(self) -> None:
        self._record(b"")
        status = 200 if urlsplit(self.path).path == "/api/hello" else 404
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        self._record(b"")
        self._send_json(404, ErrorReply(404, "not found").body())

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        request = self._record(raw)
        path = urlsplit(self.path).path
        if path == "/v1/messages/count_tokens":
            self._send_json(200, {"input_tokens": len(raw) // 4})
            return
        if path != "/v1/messages":
            self._send_json(404, ErrorReply(404, f"no route {path}").body())
            return
        reply = self.server.fake._choose(request)
        if not self.server.fake._wait(reply.delay_s):
            self.close_connection = True
            return
        try:
            self._answer(request, reply)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away (e.g. it was cancelled)

    # -- helpers --------------------------------------------------------------------------------

    def _record(self, raw: bytes) -> RecordedRequest:
        parts = urlsplit(self.path)
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        request = RecordedRequest(
            method=self.command,
            path=parts.path,
            query={k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()},
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
        )
        self.server.fake._record(request)
        return request

    def _send_json(self, status: int, payload: Any, headers: Mapping[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("request-id", "req_fake")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _answer(self, request: RecordedRequest, reply: Reply) -> None:
        if isinstance(reply, ErrorReply) and not (reply.mid_stream and request.stream):
            headers = dict(reply.headers)
            if reply.retry_after is not None:
                headers["retry-after"] = f"{reply.retry_after:g}"
            self._send_json(reply.status, reply.body(), headers)
            return
        message = _message(request, reply)
        if not request.stream:
            self._send_json(200, message)
            return
        # SSE: no Content-Length, so the response ends when the connection closes.
        self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.send_header("request-id", "req_fake")
        self.end_headers()
        for event, data in _sse_events(message, reply):
            self.wfile.write(f"event: {event}\ndata: {json.dumps(data)}\n\n".encode())
            self.wfile.flush()


def _message(request: RecordedRequest, reply: Reply) -> dict[str, Any]:
    body = request.body if isinstance(request.body, dict) else {}
    usage = {**_DEFAULT_USAGE, **(reply.usage if not isinstance(reply, ErrorReply) else {})}
    content: list[dict[str, Any]] = []
    if isinstance(reply, TextReply):
        content.append({"type": "text", "text": reply.text})
    elif isinstance(reply, ToolUseReply):
        if reply.text:
            content.append({"type": "text", "text": reply.text})
        content.append(
            {
                "type": "tool_use",
                "id": f"toolu_{uuid.uuid4().hex[:20]}",
                "name": reply.name or _tool_name(body),
                "input": dict(reply.input),
            }
        )
    return {
        "id": f"msg_{uuid.uuid4().hex[:20]}",
        "type": "message",
        "role": "assistant",
        "model": body.get("model", "claude-fake"),
        "content": content,
        "stop_reason": None if isinstance(reply, ErrorReply) else reply.stop_reason,
        "stop_sequence": None,
        "usage": usage,
    }


def _tool_name(body: Mapping[str, Any]) -> str:
    choice = body.get("tool_choice") or {}
    if isinstance(choice, dict) and choice.get("name"):
        return str(choice["name"])
    tools = body.get("tools") or []
    return str(tools[0].get("name", "tool")) if tools else "tool"


def _chunks(text: str, size: int = 16) -> Iterator[str]:
    for start in range(0, len(text), size):
        yield text[start : start + size]


def _sse_events(message: dict[str, Any], reply: Reply) -> Iterator[tuple[str, dict[str, Any]]]:
    usage = message["usage"]
    start = {**message, "content": [], "stop_reason": None, "usage": {**usage, "output_tokens": 1}}
    yield "message_start", {"type": "message_start", "message": start}
    yield "ping", {"type": "ping"}
    if isinstance(reply, ErrorReply):
        yield "error", reply.body()
        return
    for index, block in enumerate(message["content"]):
        if block["type"] == "text":
            yield (
                "content_block_start",
                {"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}},
            )
            for piece in _chunks(block["text"]):
                yield (
                    "content_block_delta",
                    {"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": piece}},
                )
        else:
            opening = {**block, "input": {}}
            yield "content_block_start", {"type": "content_block_start", "index": index, "content_block": opening}
            for piece in _chunks(json.dumps(block["input"])):
                yield (
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": index,
                        "delta": {"type": "input_json_delta", "partial_json": piece},
                    },
                )
        yield "content_block_stop", {"type": "content_block_stop", "index": index}
    yield (
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
            "usage": usage,
        },
    )
    yield "message_stop", {"type": "message_stop"}
