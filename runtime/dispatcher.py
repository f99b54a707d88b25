"""The dispatcher: the server-wide agent limit and one agent's attempt loop.

A run asks the dispatcher to execute a call once it holds a slot of its own concurrency
limit. The dispatcher takes a server-wide slot, then calls the backend under the agent's
timeout, validates structured output with ``jsonschema`` and feeds validation errors back to
the model, at most ``MAX_SCHEMA_ATTEMPTS`` times. The outcome is a value, never an exception
for the script: an :class:`AgentOutcome` says completed / failed / structured-output error.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Coroutine, Generator, Mapping
from dataclasses import dataclass, replace
from typing import Any, cast

import anyio

from .backends import NO_USAGE, AgentBackend, AgentRequest, AgentResult, Correction, Usage
from .errors import BackendError
from .scheduling import PriorityLimiter
from .schema import has_patterns, validation_error

__all__ = ["AgentOutcome", "Dispatcher", "DispatcherStatistics", "MAX_SCHEMA_ATTEMPTS"]

MAX_SCHEMA_ATTEMPTS = 5

logger = logging.getLogger("quickflow.dispatcher")


class AgentOutcome:
    """``status``: completed | failed | timeout | structured_output_error. Treat as immutable.

    A plain class: one is made per call, and a dataclass's ``__init__`` stays interpreted
    where this one is compiled (see ``runtime/_native``)."""

    def __init__(self, status: str, output: Any = None, usage: Usage = NO_USAGE, cost_usd: float = 0.0,
                 model: str | None = None, attempts: int = 0, error: str | None = None,
                 transcript: tuple[Mapping[str, Any], ...] = ()) -> None:
        self.status = status
        self.output = output
        self.usage = usage
        self.cost_usd = cost_usd
        self.model = model
        self.attempts = attempts
        self.error = error
        self.transcript = transcript

    def __repr__(self) -> str:
        return f"AgentOutcome({self.status!r}, attempts={self.attempts}, error={self.error!r})"


@dataclass(frozen=True)
class DispatcherStatistics:
    server_limit: int
    in_flight: int
    waiting: int
    executed_total: int


class Dispatcher:
    def __init__(
        self,
        backends: Mapping[str, AgentBackend],
        *,
        server_concurrency: int = 64,
        max_result_bytes: int = 1024 * 1024,
        cost: Callable[[str, Usage], float] | None = None,
    ) -> None:
        self.backends = backends  # shared with the engine, which adds configured backends at start
        # FIFO among equals; cheaper than anyio's CapacityLimiter on the uncontended path.
        self._limiter = PriorityLimiter(server_concurrency)
        self._max_result_bytes = max_result_bytes
        self._cost = cost
        self._executed = 0

    def statistics(self) -> DispatcherStatistics:
        stats = self._limiter.statistics()
        return DispatcherStatistics(
            server_limit=int(stats.total_tokens),
            in_flight=stats.borrowed_tokens,
            waiting=stats.tasks_waiting,
            executed_total=self._executed,
        )

    def backend(self, name: str) -> AgentBackend:
        return self.backends[name]

    async def execute(
        self,
        backend_name: str,
        request: AgentRequest,
        *,
        open_scope: Callable[[], anyio.CancelScope] = anyio.CancelScope,
        on_retry: Callable[[int, str], None] | None = None,
    ) -> AgentOutcome:
        """Run one call to an outcome under a scope from ``open_scope()``: the caller keeps it as
        its handle to stop or restart the call.

        The agent's timeout becomes the scope's deadline once a server-wide slot is held. When
        the scope is cancelled the outcome is ``timeout``; a caller that cancelled it on purpose
        knows better and says so.

        Eager start, for a backend that allows it (``eager``, see ``AgentBackend``) when a server
        slot is free: the attempt loop takes its first step right here. An answer that needs no
        await (a zero-latency simulated agent) is then done without ever opening a scope, which
        would cost more than such a call itself. Anything that awaits continues under the scope
        and its deadline, as if it had started there: no other task ran in between, so nobody
        could have wanted to stop it yet.
        """
        backend = self.backends[backend_name]
        if not getattr(backend, "eager", False) or not self._limiter.try_acquire():
            return await self._execute_scoped(backend, request, open_scope(), on_retry)
        self._executed += 1
        if request.schema is None:
            try:
                answered = self._answer_now(backend, request)
            except BaseException:
                self._limiter.release()
                raise
            if answered is not None:
                self._limiter.release()
                return answered
        attempts = self._attempts(backend, request, on_retry)
        try:
            first = attempts.send(None)
        except StopIteration as done:
            self._limiter.release()
            return cast(AgentOutcome, done.value)
        except BaseException:
            self._limiter.release()
            raise
        scope = open_scope()
        try:
            with scope:
                scope.deadline = min(scope.deadline, anyio.current_time() + request.timeout_s)
                return await _Continue(attempts, first)
        finally:
            self._limiter.release()
        return self._timed_out(request)

    async def _execute_scoped(
        self,
        backend: AgentBackend,
        request: AgentRequest,
        scope: anyio.CancelScope,
        on_retry: Callable[[int, str], None] | None,
    ) -> AgentOutcome:
        with scope:
            await self._limiter.acquire()
            try:
                self._executed += 1
                scope.deadline = min(scope.deadline, anyio.current_time() + request.timeout_s)
                return await self._attempts(backend, request, on_retry)
            finally:
                self._limiter.release()
        return self._timed_out(request)

    @staticmethod
    def _timed_out(request: AgentRequest) -> AgentOutcome:
        return AgentOutcome(
            status="timeout",
            error=f"agent timed out after {request.timeout_s:g} s",
            attempts=request.attempt,
        )

    async def _attempts(
        self,
        backend: AgentBackend,
        request: AgentRequest,
        on_retry: Callable[[int, str], None] | None,
    ) -> AgentOutcome:
        usage = NO_USAGE
        cost = 0.0
        transcript: list[Mapping[str, Any]] = []
        attempt_request = request
        last_error = ""
        model: str | None = request.model
        for attempt in range(1, MAX_SCHEMA_ATTEMPTS + 1):
            try:
                result = await backend.call(attempt_request)
            except BackendError as exc:
                return AgentOutcome("failed", usage=usage, cost_usd=cost, error=exc.message, attempts=attempt,
                                    transcript=tuple(transcript), model=model)
            except Exception as exc:  # a bug in a backend must not take the run down with it
                logger.exception("backend %s raised unexpectedly", getattr(backend, "name", "?"))
                return AgentOutcome("failed", usage=usage, cost_usd=cost, attempts=attempt,
                                    error=f"backend error: {type(exc).__name__}: {exc}",
                                    transcript=tuple(transcript), model=model)
            usage = result.usage if attempt == 1 else usage + result.usage
            cost += self._cost_of(result, model)
            model = result.model or model
            transcript.extend(result.transcript)
            if request.schema is None:
                return self._finish(result.text, usage, cost, model, attempt, transcript)
            data, problem = await _structured(result, request.schema)
            if problem is None:
                return self._finish(data, usage, cost, model, attempt, transcript)
            last_error = problem
            if attempt < MAX_SCHEMA_ATTEMPTS:
                if on_retry is not None:
                    on_retry(attempt + 1, problem)
                attempt_request = replace(
                    attempt_request,
                    corrections=(*attempt_request.corrections, Correction(output=result.text, error=problem)),
                )
        return AgentOutcome(
            "structured_output_error",
            usage=usage,
            cost_usd=cost,
            model=model,
            attempts=MAX_SCHEMA_ATTEMPTS,
            error=last_error,
            transcript=tuple(transcript),
        )

    def _answer_now(self, backend: AgentBackend, request: AgentRequest) -> AgentOutcome | None:
        """The outcome of a call its backend answers without awaiting (``answer_now``, see
        ``AgentBackend``), or None to call it: no coroutine to make, and no StopIteration to raise
        and catch (in compiled code, with a traceback). A backend that fails here is called
        anyway, which reports the failure as a call would."""
        answer_now = getattr(backend, "answer_now", None)
        if answer_now is None:
            return None
        try:
            result: AgentResult | None = answer_now(request)
        except Exception:
            return None
        if result is None:
            return None
        model = result.model or request.model
        return self._finish(result.text, result.usage, self._cost_of(result, request.model), model, 1,
                            list(result.transcript))

    def _cost_of(self, result: AgentResult, model: str | None) -> float:
        if result.cost_usd:
            return result.cost_usd
        return self._cost(result.model or model or "", result.usage) if self._cost else 0.0

    def _finish(
        self, output: Any, usage: Usage, cost: float, model: str | None, attempts: int, transcript: list[Mapping[str, Any]]
    ) -> AgentOutcome:
        if isinstance(output, str):
            # A character is at most 4 bytes of UTF-8: most answers need no encoding to be measured.
            size = len(output) if len(output) * 4 <= self._max_result_bytes else len(output.encode())
        else:
            size = len(json.dumps(output).encode())
        if size > self._max_result_bytes:
            return AgentOutcome("failed", usage=usage, cost_usd=cost, model=model, attempts=attempts,
                                error=f"agent result is {size} bytes; the limit is {self._max_result_bytes} bytes",
                                transcript=tuple(transcript))
        # Positional (status, output, usage, cost_usd, model, attempts, error, transcript): once
        # per call, and keywords cost twice as much.
        return AgentOutcome("completed", output, usage, cost, model, attempts, None, tuple(transcript))


class _Continue:
    """Await a coroutine that has already taken its first step and yielded ``first``.

    The same delegation ``await`` does: whatever the event loop sends or throws (a result, a
    cancellation) goes to the coroutine, whatever it yields goes to the event loop.
    """

    __slots__ = ("_coro", "_first")

    def __init__(self, coro: Coroutine[Any, Any, AgentOutcome], first: Any) -> None:
        self._coro, self._first = coro, first

    def __await__(self) -> Generator[Any, Any, AgentOutcome]:
        coro, pending = self._coro, self._first
        while True:
            try:
                sent = yield pending
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:
                try:
                    pending = coro.throw(exc)
                except StopIteration as done:
                    return cast(AgentOutcome, done.value)
            else:
                try:
                    pending = coro.send(sent)
                except StopIteration as done:
                    return cast(AgentOutcome, done.value)


async def _structured(result: AgentResult, schema: Mapping[str, Any]) -> tuple[Any, str | None]:
    data = result.data
    if data is None:
        try:
            data = json.loads(_strip_fences(result.text))
        except ValueError as exc:
            return None, f"the answer is not valid JSON ({exc}); reply with only the JSON object"
    if has_patterns(schema):
        # A script's patterns may backtrack: each match is bounded, but an answer can hold many
        # strings, so the event loop does not wait for them.
        return data, await anyio.to_thread.run_sync(validation_error, data, schema)
    return data, validation_error(data, schema)


def _strip_fences(text: str) -> str:
    text = text.strip()
    if text.startswith("```"):
        text = text.split("\n", 1)[1] if "\n" in text else ""
        if text.rstrip().endswith("```"):
            text = text.rstrip()[:-3]
    return text
