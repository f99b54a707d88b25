"""A run: one script's execution, its agents, its accounting and its controls.

The :class:`Run` owns what the main script and a ``workflow()`` child share: the status, the
agent counter and cap, the token budget, the queue of agent calls and its workers
(:class:`runtime.scheduling.Workers`: at most ``concurrency``, the pause gate), the journal
lookups (crash recovery and ``resume_from``), phases, and every agent call. The script itself is
driven by :class:`runtime.script.ScriptDriver`.

Agent calls flow: validate (cap, budget, schema, agentType) and look up the journal while the
outbox is handled → queue, most urgent first → a worker takes it once the run is not paused →
execute through the dispatcher under a cancel scope (stop / restart) → queue its journal entry;
the worker moves on → once the entry is committed, show the final status and hand the result
to the script.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import anyio
import anyio.lowlevel

from sandbox import Isolate, IsolateLimits, ScriptFailure, check_script

from .backends import AgentRequest, Usage
from .calls import LiveCall, PhaseStats, default_label
from .dispatcher import AgentOutcome, Dispatcher
from .errors import AgentNotFound, InvalidAgentState, InvalidRunState
from .events import EventLog, EventType
from .journal import Occurrences, ResumePlan, call_key
from .limits import Limits
from .options import RunOptions
from .scheduling import Workers, holds_slot, pipeline_hint, queue_priority
from .schema import schema_problem
from .state import AgentStatus, RunStatus, can_transition
from .store import CallRecord, RunRecord, Store, WorkflowRecord

__all__ = ["LiveCall", "PhaseStats", "Run", "RunContext"]

logger = logging.getLogger("quickflow.run")

NO_PHASE = "(no phase)"
MAX_PHASES = 1000
TOO_MANY_PHASES = "(more phases)"
PREVIEW_CHARS = 200
# How long an ended run's script context may wait for the run's end to be saved before it is
# freed anyway (see _drive_script). A commit takes under a millisecond, or 2-12 ms when SQLite
# syncs; a stalled store takes as long as it takes.
FREE_CONTEXT_AFTER_S = 0.02
# How a call that has finished executing shows until its journal entry commits (it counts as
# running: a live view never shows a result that a crash could still lose).
_JOURNALING = "finished, its result being journaled"


async def _succeeded(save: asyncio.Future[None]) -> bool:
    """Whether a save in flight succeeded, once it is done (its error is the submitter's)."""
    try:
        await asyncio.shield(save)
    except Exception:
        return False
    return True


def _preview(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= PREVIEW_CHARS else text[: PREVIEW_CHARS - 1] + "…"


#: The agent() options a call's journal entry keeps (label and phase have their own columns).
_CALL_OPTIONS = frozenset({"schema", "model", "effort", "agentType", "isolation", "timeout"})


class _TokenTotals:
    """A run's tokens so far. Summed in place: adding Usage values made one per agent."""

    def __init__(self) -> None:
        self.input = self.output = self.cache_read = self.cache_write = 0

    def add(self, usage: Usage) -> None:
        self.input += usage.input_tokens
        self.output += usage.output_tokens
        self.cache_read += usage.cache_read_tokens
        self.cache_write += usage.cache_write_tokens


def _js_error(name: str, message: str) -> dict[str, str]:
    return {"name": name, "message": message}


@dataclass(frozen=True)
class RunContext:
    """What a run needs from the engine that hosts it."""

    store: Store
    dispatcher: Dispatcher
    pool: Any  # sandbox.SlicePool
    limits: Limits
    profiles: Mapping[str, Any]
    resolve_model: Callable[[str | None, str | None, str | None], str | None]
    load_workflow: Callable[[str], Awaitable[WorkflowRecord | None]]
    list_workflows: Callable[[], Awaitable[list[str]]]
    isolate_started: Callable[[], None] = lambda: None  # a script ran its first slice


class Run:
    def __init__(
        self,
        record: RunRecord,
        options: RunOptions,
        ctx: RunContext,
        events: EventLog,
        *,
        body: str,
        phases: list[str],
        plan: ResumePlan | None = None,
        recovered: list[CallRecord] | None = None,
        reported: frozenset[int] = frozenset(),
        first_index: int = 0,
    ) -> None:
        self.record = record
        self.options = options
        self.ctx = ctx
        self.limits = ctx.limits
        self.events = events
        self.body = body
        self.status = RunStatus(record.status)
        self._plan = plan
        # Crash recovery replays the run's own journal: completed calls keep their index, and
        # calls that run live take indices after every journaled one.
        self._recovering = recovered is not None
        self._recovery = ResumePlan(recovered, "reuse") if recovered else None
        # Recovered calls whose final event is already in the store: followers have seen it.
        self._reported = reported
        self._next_index = first_index
        self.calls: dict[int, LiveCall] = {}
        self._occurrences = Occurrences()
        self.workers = Workers(options.concurrency, self._serve)
        self._cancel_scope: anyio.CancelScope | None = None
        self._user_cancelled = False
        self._journal_error: BaseException | None = None
        self._settings: dict[str, Any] | None = None  # what backends get (see _backend_settings)
        self.issued = 0
        self.tokens = _TokenTotals()  # the run's usage so far, summed in place (once per agent)
        self.cost_usd = 0.0
        self.spent = 0
        self.log_lines = 0
        self.isolate_evictions = 0  # times a waiting script gave up its JS context (rebuilt by replay)
        self.warnings: list[str] = []
        self.failures: list[str] = []
        self.phases: dict[str, PhaseStats] = {title: PhaseStats(title) for title in phases}
        self.done = anyio.Event()
        self.archived = False  # ended, and its agents and events are only in the store (see _archive)
        self.discarded = False  # its first record could not be saved (see discard)

    @property
    def id(self) -> str:
        return self.record.id

    def js_state(self) -> dict[str, int]:
        """What the prelude mirrors: tokens spent and agents issued (parent and children)."""
        return {"spent": self.spent, "issued": self.issued}

    # --- lifecycle ----------------------------------------------------------------------------

    async def drive(self, *, queued: asyncio.Future[None] | None = None) -> None:
        """Run the script to a terminal status. Engine shutdown cancels this without ending the run.

        The script's first slice writes nothing, so it runs while the run's record is saved.
        ``queued`` is the save of the run's first record, still in flight (see
        ``Engine.submit``): the run writes nothing and handles none of the script's requests
        before it is durable, and ends without a trace if it fails (the run is discarded). The
        running record is saved without holding the run up (see ``_save_soon``).
        """
        try:
            await self._drive_script(queued)
        except Exception:
            if queued is not None:  # the engine records the crash: not before the first record
                with anyio.CancelScope(shield=True):
                    await _succeeded(queued)
            raise

    async def _drive_script(self, queued: asyncio.Future[None] | None) -> None:
        started = time.time()

        async def start_running() -> None:
            if queued is not None:
                await asyncio.shield(queued)  # if it fails, the engine has discarded the run
            self._change_status(RunStatus.RUNNING, started_at=self.record.started_at or started)
            self.events.emit(EventType.RUN_STARTED, {"recovered": self._recovering})
            # Not waited for: every later write is queued behind it, and recovery treats a
            # queued run as a running one.
            self._save_soon()

        ready: Callable[[], Awaitable[None]] | None = start_running
        if self.status is RunStatus.PAUSED:  # recovered after a restart while paused: no slice before the pause
            await self._set_status(RunStatus.RUNNING, started_at=self.record.started_at or started)
            self.events.emit(EventType.RUN_STARTED, {"recovered": self._recovering})
            await self.pause()
            ready = None
        failure: ScriptFailure | None = None
        result: Any = None
        driver = self._driver(self.body, args=self.record.args, has_args=self.record.has_args)
        free_anyway: asyncio.TimerHandle | None = None
        try:
            with anyio.CancelScope() as scope:
                self._cancel_scope = scope
                with anyio.move_on_after(self.options.timeout_s) as deadline:
                    async with anyio.create_task_group() as tg:
                        self.workers.tg = tg  # the run's agent workers
                        final = await driver.execute(ready=ready, keep_isolate=True)
                        failure, result = final.failure, final.result
                        if not self.workers.close():
                            tg.cancel_scope.cancel()  # agents the script started but never awaited
                if deadline.cancelled_caught:
                    failure = ScriptFailure("limit", "timeout",
                                            f"run exceeded its time limit of {self.options.timeout_s:g} s")
            if self._journal_error is not None:
                raise self._journal_error  # the engine records the run as crashed
            if scope.cancelled_caught and not self._user_cancelled:
                return  # cancelled from outside (shutdown); the enclosing cancellation propagates
            with anyio.CancelScope(shield=True):
                if queued is not None and not await _succeeded(queued):
                    return  # discarded: never saved, and its submitter has the error
                # The script's context is freed once finish() has released the run's waiters
                # (below): freeing it holds the GIL. If the store is slow to save the run's end,
                # it is freed anyway after FREE_CONTEXT_AFTER_S, so that runs ending during a
                # stall do not all keep their heaps.
                free_anyway = asyncio.get_running_loop().call_later(FREE_CONTEXT_AFTER_S, driver.close_isolate)
                await self.finish(failure, result)
        finally:
            if free_anyway is not None:
                free_anyway.cancel()
            driver.close_isolate()  # closing twice is harmless

    def discard(self) -> None:
        """The run's first record could not be saved: the run never existed, and its submitter
        gets the error. Those already waiting for it are released."""
        self.discarded = True
        self.abandon(ScriptFailure("internal", "StoreError", "the run could not be saved"))

    def abandon(self, failure: ScriptFailure) -> None:
        """The run's end could not be saved (the store failed): end it in memory only, so that
        those waiting for it are released. The database keeps the run as it last saved it, so
        the service's next start recovers it from its journal."""
        if self.done.is_set():
            return
        self.status = RunStatus.FAILED
        self.record = replace(self.record, status=RunStatus.FAILED.value, finished_at=time.time(),
                              error=failure.to_dict() | {"message": failure.describe()})
        self.events.close()
        self.done.set()

    async def finish(self, failure: ScriptFailure | None, result: Any) -> None:
        now = time.time()
        # Written out: a run may have thousands of calls, and its end waits for this.
        live = [c for c in self.calls.values() if c.status is AgentStatus.QUEUED or c.status is AgentStatus.RUNNING]
        for call in live:
            if not call.status.terminal:
                self._count(call, call.status, AgentStatus.STOPPED)
                call.error = "the run ended before this agent finished"
                call.finished_at = now
                await self.ctx.store.save_call(call.record(self.id))
                self.events.emit(EventType.AGENT_STOPPED, call.event_data(reason=call.error))
        for stats in self.phases.values():
            if stats.started_at and not stats.finished_at:
                stats.finished_at = now
        if self._user_cancelled:
            status, error = RunStatus.CANCELLED, {"kind": "cancelled", "message": "cancelled by request"}
            self.events.emit(EventType.RUN_CANCELLED, {})
        elif failure is not None:
            status, error = RunStatus.FAILED, failure.to_dict() | {"message": failure.describe()}
            self.events.emit(EventType.RUN_FAILED, {"error": error})
        else:
            status, error = RunStatus.COMPLETED, None
            self.events.emit(EventType.RUN_COMPLETED, {"result_preview": _preview(result)})
        await self._set_status(status, finished_at=now, result=result if status is RunStatus.COMPLETED else None,
                               error=error)
        self.events.close()
        self.done.set()
        # Those waiting for the end go first: freeing a big run's calls and events takes the
        # event loop milliseconds (3.7 ms for 1000 agents), and nothing they read changes.
        await anyio.lowlevel.checkpoint()
        self._archive()

    def _archive(self) -> None:
        """The run has ended and its final state is durable: drop what only a live run needs.

        Its agents and events are read from the store from now on; its summary stays with the
        record. An engine keeps recently finished runs at hand, and a thousand agents' calls
        and events would otherwise stay alive with each one, for the garbage collector to walk
        again and again.
        """
        self.archived = True
        self.calls = {}
        self.workers.queue = []
        self._occurrences = Occurrences()
        self._recovery = self._plan = None
        self.events.archive()

    def summary(self) -> dict[str, Any]:
        """Usage and progress: agents by state, tokens, cost, duration, phases, warnings, failures."""
        if self.archived:
            return copy.deepcopy(self.record.usage)  # computed as the run ended
        counts: dict[str, int] = {}
        for call in self.calls.values():
            value = call.status._value_
            counts[value] = counts.get(value, 0) + 1
        end = self.record.finished_at or time.time()
        start = self.record.started_at or self.record.created_at
        return {
            "agents": {"total": len(self.calls), **counts},
            "tokens": {
                "input": self.tokens.input,
                "output": self.tokens.output,
                "cache_read": self.tokens.cache_read,
                "cache_write": self.tokens.cache_write,
            },
            "cost_usd": round(self.cost_usd, 6),
            "estimated": self.options.dry_run,
            "duration_s": round(end - start, 3) if start else 0.0,
            "phases": [p.to_dict() for p in self.phases.values()],
            "warnings": list(self.warnings),
            "failures": list(self.failures),
        }

    async def _set_status(self, status: RunStatus, *, event: EventType | None = None, **changes: Any) -> None:
        """Change the status, tell followers (``event``), then save the record. Everything but
        the save happens at once: a control that comes in while it is saved sees the new status.
        The event is committed with the record or before it, never after."""
        self._change_status(status, **changes)
        if event is not None:
            self.events.emit(event, {})
        await self.ctx.store.save_run(self.record)

    def _change_status(self, status: RunStatus, **changes: Any) -> None:
        self.status = status
        self.record = replace(self.record, status=status.value, **changes)
        self.record = replace(self.record, usage=self.summary())  # its duration needs the new timestamps

    def _save_soon(self) -> None:
        """Save the record as it is now, without holding the run up; the run fails if it cannot
        be saved."""

        def saved(error: BaseException | None) -> None:
            if error is not None:
                self._journal_failed(error)

        try:
            self.ctx.store.save_run_soon(self.record, saved)
        except Exception as exc:  # the store is closed, or its writer gone
            self._journal_failed(exc)

    def _driver(self, body: str, *, args: Any, has_args: bool, depth: int = 0, group: str | None = None) -> Any:
        from .script import ScriptDriver

        limits = IsolateLimits(
            heap_bytes=self.limits.heap_bytes,
            stack_bytes=self.limits.stack_bytes,
            slice_cpu_s=self.limits.slice_cpu_s,
            run_cpu_s=self.limits.run_cpu_s,
            result_bytes=self.limits.run_result_bytes,
            evict=self.limits.evict_idle_s > 0,
        )
        return ScriptDriver(self, self.ctx.pool, Isolate(limits), body, args=args, has_args=has_args,
                            depth=depth, group=group)

    # --- controls -----------------------------------------------------------------------------

    async def pause(self) -> None:
        if not can_transition(self.status, RunStatus.PAUSED):
            raise InvalidRunState(self.id, self.status.value, "pause")
        self.workers.pause()
        await self._set_status(RunStatus.PAUSED, event=EventType.RUN_PAUSED)

    async def resume(self) -> None:
        if self.status is not RunStatus.PAUSED:
            raise InvalidRunState(self.id, self.status.value, "resume")
        self.workers.resume()
        await self._set_status(RunStatus.RUNNING, event=EventType.RUN_RESUMED)

    def cancel(self) -> None:
        if self.status.terminal:
            raise InvalidRunState(self.id, self.status.value, "cancel")
        self._user_cancelled = True
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()

    def _call(self, index: int) -> LiveCall:
        call = self.calls.get(index)
        if call is None:
            raise AgentNotFound(self.id, index)
        return call

    def stop_agent(self, index: int) -> None:
        call = self._call(index)
        if call.status.terminal:
            raise InvalidAgentState(self.id, index, call.status.value, "stop", "queued or running")
        if call.finished_at is not None:
            raise InvalidAgentState(self.id, index, _JOURNALING, "stop", "queued or running")
        call.stop_requested = True
        if call.status is AgentStatus.QUEUED and self.workers.tg is not None:
            self.workers.tg.start_soon(self._stopped, call)  # still in the queue: resolve it now
        elif call.scope is not None:
            call.scope.cancel()

    def restart_agent(self, index: int) -> None:
        call = self._call(index)
        if call.status is AgentStatus.RUNNING and call.finished_at is not None:
            raise InvalidAgentState(self.id, index, _JOURNALING, "restart", "running")
        if call.status is not AgentStatus.RUNNING or call.scope is None or call.restart_requested:
            raise InvalidAgentState(self.id, index, call.status.value, "restart", "running")
        call.restart_requested = True
        call.scope.cancel()

    # --- narration ----------------------------------------------------------------------------

    def log(self, message: str, *, level: str = "info") -> None:
        self.log_lines += 1
        if self.log_lines > self.limits.log_lines + 1:
            return
        if self.log_lines == self.limits.log_lines + 1:
            message, level = f"log truncated: more than {self.limits.log_lines} lines", "warn"
        self.events.emit(EventType.LOG, {"message": message, "level": level})

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        self.events.emit(EventType.WARNING, {"message": message})

    def record_failure(self, message: str) -> None:
        if len(self.failures) < self.limits.log_lines:
            self.failures.append(message)
        self.log(message, level="error")

    def enter_phase(self, title: str, *, group: str | None = None) -> PhaseStats:
        if group is not None:
            title = f"▸ {group}"
        stats = self.phases.get(title)
        if stats is None and len(self.phases) >= MAX_PHASES:
            # Each phase is a row in every progress view: past the cap, new titles share one.
            if TOO_MANY_PHASES not in self.phases:
                self.warn(f"more than {MAX_PHASES} phases: later phase titles are grouped as {TOO_MANY_PHASES!r}")
            title = TOO_MANY_PHASES
            stats = self.phases.get(title)
        if stats is None:
            stats = self.phases[title] = PhaseStats(title)
        if stats.started_at is None:
            stats.started_at = time.time()
            self.events.emit(EventType.PHASE_STARTED, {"title": title})
        return stats

    def _count(self, call: LiveCall, old: AgentStatus | None, new: AgentStatus) -> None:
        counts = self.phases[call.phase].counts
        if old is not None:
            value = old._value_  # not .value, a property: this runs 3 times per agent
            counts[value] = counts.get(value, 0) - 1
        value = new._value_
        counts[value] = counts.get(value, 0) + 1
        call.status = new

    # --- agents -------------------------------------------------------------------------------

    def submit_agent(
        self,
        payload: dict[str, Any],
        *,
        deliver: Callable[[bool, Any], None],
        handled: Callable[[], asyncio.Future[None]] | None = None,
        group: str | None = None,
    ) -> None:
        """Take one ``agent()`` request. ``deliver(ok, value)`` is called once with the output (or
        null) or the error for JS; ``handled()``, called right after a delivery, is a future
        resolved once the script has handled it.

        Validation, journal lookups and queueing happen here, synchronously; execution happens
        on the run's workers (at most ``concurrency``), most urgent call first.
        """
        rejection = self._validate(payload)
        if rejection is not None:
            deliver(False, rejection)
            return
        prompt = str(payload["prompt"])
        options: dict[str, Any] = (
            {} if _CALL_OPTIONS.isdisjoint(payload) else {k: v for k, v in payload.items() if k in _CALL_OPTIONS}
        )
        schema = options.get("schema")
        agent_type = options.get("agentType")
        key = call_key(
            prompt,
            schema=schema,
            model=options.get("model"),
            effort=options.get("effort"),
            agent_type=agent_type,
            isolation=options.get("isolation"),
        )
        occurrence = self._occurrences.next(key)
        phase_title = f"▸ {group}" if group else (payload.get("phase") or NO_PHASE)
        stats = self.phases.get(phase_title)
        if stats is None or stats.started_at is None:  # else entered already, as most calls' phase is
            stats = self.enter_phase(phase_title)
        recovered = self._recovery.lookup(key, occurrence) if self._recovery else None
        # The resume plan sees every call in issue order, recovered ones included: after a crash,
        # prefix mode must break at the same call as before it.
        planned = self._plan.lookup(key, occurrence) if self._plan else None
        index = recovered.index if recovered else self._take_index()
        call = LiveCall(index, key, occurrence, prompt, options, payload.get("label") or default_label(prompt),
                        stats.title,
                        model=self.ctx.resolve_model(options.get("model"), self.options.model, agent_type))
        self.calls[index] = call
        call.deliver, call.handled, call.schema = deliver, handled, schema
        hint = pipeline_hint(payload.get("priority"))
        if hint is not None:
            call.stage_of = hint[0], hint[1]
            call.holds_slot = holds_slot(hint, self.options.concurrency)
        call.priority = queue_priority(hint, index, self.options.concurrency,
                                       finish_first=self.options.budget_tokens is not None)
        if recovered is not None:
            deliver(True, self._serve_recovered(call, recovered))
            return
        if planned is not None:
            call.cached_source = planned
            call.priority = (-(1 << 30), index)  # no agent runs: serve it before anything else
            call.holds_slot = False
        else:
            self._count(call, None, AgentStatus.QUEUED)
            self.events.emit(EventType.AGENT_QUEUED, call.event_data(prompt_preview=_preview(prompt)))
        self.workers.push(call)

    def _validate(self, payload: dict[str, Any]) -> dict[str, str] | None:
        """The error for JS when the request cannot become an agent, else None (and count it)."""
        if self.issued >= self.options.max_agents:
            return _js_error(
                "WorkflowAgentCapError",
                f"agent cap reached: this run may start at most {self.options.max_agents} agents "
                "(raise options.max_agents)",
            )
        budget = self.options.budget_tokens
        if budget is not None and self.spent >= budget:
            return _js_error(
                "WorkflowBudgetExceededError", f"token budget exhausted: {self.spent} of {budget} output tokens spent"
            )
        schema = payload.get("schema")
        if schema is not None:
            problem = schema_problem(schema)
            if problem:
                return _js_error("TypeError", f"agent() option 'schema': {problem}")
        agent_type = payload.get("agentType")
        if agent_type is not None and agent_type not in self.ctx.profiles:
            names = ", ".join(sorted(self.ctx.profiles)) or "none configured"
            return _js_error("TypeError", f"unknown agentType {agent_type!r} (available: {names})")
        if payload.get("unknown"):
            self.warn(f"agent() ignores unknown option(s): {', '.join(payload['unknown'])}")
        self.issued += 1
        if self.issued == self.limits.many_agents_warning + 1:
            self.warn(f"this run schedules more than {self.limits.many_agents_warning} agents")
        return None

    def _take_index(self) -> int:
        while self._next_index in self.calls:
            self._next_index += 1
        index = self._next_index
        self._next_index += 1
        return index

    def _serve_recovered(self, call: LiveCall, source: CallRecord) -> Any:
        """A call this very run journaled before a crash: its result, its tokens, its status."""
        call.take_result(source)
        call.usage = Usage.from_dict(source.usage)
        call.cost_usd = source.cost_usd
        call.transcript = list(source.transcript)
        self._count(call, None, AgentStatus(source.status))
        self._account(call)
        if call.index not in self._reported:
            self.events.emit(EventType.AGENT_CACHED, call.event_data(tokens=0, result_preview=_preview(call.output),
                                                                     recovered=True))
        return call.output

    async def _serve_cached(self, call: LiveCall, source: CallRecord) -> Any:
        """A call the resume source completed: its result, 0 tokens, journaled as cached."""
        call.take_result(source)
        # On the live call too, so GET agents shows the same record before and after a restart.
        call.transcript = [{"cached_from": source.run_id, "index": source.index}]
        await self._journal(call, AgentStatus.CACHED)
        self.events.emit(EventType.AGENT_CACHED, call.event_data(tokens=0, result_preview=_preview(call.output),
                                                                 recovered=False))
        return call.output

    def _serve(self, call: LiveCall) -> Awaitable[bool]:
        """Serve a call a worker took: from the resume source, or by executing it. Whether it
        awaited (see ``Workers``). Not a coroutine itself: one frame less per call."""
        if call.cached_source is not None:
            return self._serve_from_source(call, call.cached_source)
        return self._run_call(call)

    async def _serve_from_source(self, call: LiveCall, source: CallRecord) -> bool:
        self.workers.start(every=True)  # this one waits for its journal entry
        value = await self._serve_cached(call, source)
        assert call.deliver is not None
        call.deliver(True, value)
        return True

    async def _run_call(self, call: LiveCall) -> bool:
        """Execute (again on restart), then settle; the worker holds the run's slot throughout.

        Returns whether the call (probably) awaited: the dispatcher opens the call's scope before
        a non-eager backend starts, and for an eager one only once it awaits.
        """
        backend = self._backend_for(call)
        awaited = False
        try:
            while True:
                if call.stop_requested:
                    await self._stopped(call)
                    return True
                options = call.options
                # Positional, in AgentRequest's field order: keywords cost 2.5 times as much.
                request = AgentRequest(
                    self.id, call.index, call.prompt, call.label, call.phase, call.schema, call.model,
                    options.get("effort"), options.get("agentType"), options.get("isolation"),
                    min(options.get("timeout", 1e18) / 1000, self.options.agent_timeout_s),  # timeout_s
                    call.attempt, (), self._backend_settings(),
                )  # fmt: skip
                self._count(call, call.status, AgentStatus.RUNNING)
                call.started_at = time.time()
                call.scope = None  # the dispatcher opens one if the call awaits
                self.events.emit(EventType.AGENT_STARTED, call.event_data())
                outcome = await self.ctx.dispatcher.execute(
                    backend, request, open_scope=lambda: self._awaits(call),
                    on_retry=lambda attempt, error: self._on_retry(call, attempt, error),
                )
                awaited = awaited or call.has_scope()  # not narrowed: the dispatcher may have opened it
                if call.restart_requested:
                    call.restart_requested = False
                    call.attempt += 1
                    self.events.emit(EventType.AGENT_RETRYING, call.event_data(reason="restarted by request"))
                    continue
                if call.stop_requested:
                    await self._stopped(call)
                    return True
                self._settle_call(call, outcome)
                return awaited
        finally:
            call.scope = None

    def _awaits(self, call: LiveCall) -> anyio.CancelScope:
        """The dispatcher's scope for a call that awaits (see ``Dispatcher.execute``): the calls
        queued behind it need workers of their own now."""
        self.workers.start(every=True)
        return call.open_scope()

    async def _stopped(self, call: LiveCall) -> None:
        """Journal a stopped call and hand the script its null, queued or running."""
        ok, value = await self._stop_call(call)
        if call.deliver is not None:
            call.deliver(ok, value)
        call.delivered = True

    def backend_retry(self, index: int, attempt: int, reason: str, delay_s: float) -> None:
        call = self.calls.get(index)
        if call is not None:
            self.events.emit(EventType.AGENT_RETRYING, call.event_data(
                transport_attempt=attempt, reason=reason, delay_s=round(delay_s, 3)))

    def _on_retry(self, call: LiveCall, attempt: int, error: str) -> None:
        self.events.emit(EventType.AGENT_RETRYING, call.event_data(attempt=attempt, reason=f"invalid output: {error}"))

    def _backend_for(self, call: LiveCall) -> str:
        profile = self.ctx.profiles.get(call.options.get("agentType") or "")
        backend = getattr(profile, "backend", None) if profile is not None else None
        return "simulate" if self.options.dry_run else (backend or self.options.backend)

    def _backend_settings(self) -> dict[str, Any]:
        # The same for every call of the run; backends only read it.
        if self._settings is None:
            self._settings = dict(self.options.simulate)
            if self.options.workspace:
                self._settings["workspace"] = self.options.workspace
        return self._settings

    async def _stop_call(self, call: LiveCall) -> tuple[bool, Any]:
        call.finished_at = time.time()
        duration = round(call.finished_at - (call.started_at or call.finished_at), 3)
        call.error = "stopped by request"
        await self._journal(call, AgentStatus.STOPPED)
        self.events.emit(EventType.AGENT_STOPPED, call.event_data(duration_s=duration))
        return True, None

    def _settle_call(self, call: LiveCall, outcome: AgentOutcome) -> None:
        """Account for the outcome and queue its journal entry; once that is durable, show the
        final status and hand the result to the script (``call.delivered``)."""
        call.finished_at = time.time()
        duration = round(call.finished_at - (call.started_at or call.finished_at), 3)
        call.usage, call.cost_usd = outcome.usage, outcome.cost_usd
        call.model = outcome.model or call.model
        call.attempt = max(call.attempt, outcome.attempts)
        call.transcript = list(outcome.transcript)
        for entry in call.transcript:
            if isinstance(entry, dict) and entry.get("type") == "warning":
                self.warn(f"agent {call.index} ({call.label}): {entry.get('message', '')}")
        self._account(call)
        tokens = {"input": outcome.usage.input_tokens, "output": outcome.usage.output_tokens}
        ok: bool = True
        value: Any = None
        if outcome.status == "completed":
            status, value = AgentStatus.COMPLETED, outcome.output
            call.output = outcome.output
            event = EventType.AGENT_COMPLETED, call.event_data(
                tokens=tokens, cost_usd=round(outcome.cost_usd, 6), duration_s=duration,
                result_preview=_preview(outcome.output))
        else:
            status = AgentStatus.FAILED
            call.error = outcome.error
            event = EventType.AGENT_FAILED, call.event_data(
                tokens=tokens, duration_s=duration, error=outcome.error, reason=outcome.status)
            if outcome.status == "structured_output_error":
                ok, value = False, {
                    "name": "StructuredOutputError",
                    "message": f"agent {call.label!r} gave no valid structured output after {outcome.attempts} "
                    f"attempts: {outcome.error}",
                    "validationError": outcome.error,
                }

        def durable(error: BaseException | None) -> None:
            self.workers.journaled()
            if error is not None:
                self._journal_failed(error)
            elif call.status is AgentStatus.RUNNING:  # else the run ended meanwhile and stopped it
                self._count(call, call.status, status)
                self.events.emit(*event)
                assert call.deliver is not None
                call.deliver(ok, value)
                if call.holds_slot and call.handled is not None:
                    call.handled_event = call.handled()
            call.delivered = True
            if call.on_delivered is not None and not call.on_delivered.done():
                call.on_delivered.set_result(None)

        self.workers.journaling()
        self.ctx.store.journal_call(call.record(self.id, status), durable)

    def _journal_failed(self, error: BaseException) -> None:
        """A journal entry (or the running record) could not be written: the run cannot keep its
        promise and fails."""
        if self._journal_error is None:
            logger.error("run %s: a write to the journal failed: %s", self.id, error)
            self._journal_error = error
            if self._cancel_scope is not None:
                self._cancel_scope.cancel()

    async def _journal(self, call: LiveCall, status: AgentStatus) -> None:
        """Journal the call in its final status, then show that status: a live view never shows
        a result that a crash could still lose."""
        await self.ctx.store.save_call(call.record(self.id, status))
        self._count(call, call.status, status)

    def _account(self, call: LiveCall) -> None:
        usage = call.usage
        self.tokens.add(usage)
        self.cost_usd += call.cost_usd
        self.spent += usage.output_tokens
        stats = self.phases[call.phase]
        stats.input_tokens += usage.input_tokens
        stats.output_tokens += usage.output_tokens
        stats.cost_usd += call.cost_usd
        if self.options.budget_tokens is not None and usage.output_tokens:
            self.events.emit(EventType.BUDGET_UPDATED, {
                "spent": self.spent, "total": self.options.budget_tokens,
                "remaining": max(0, self.options.budget_tokens - self.spent)})

    # --- workflow() ---------------------------------------------------------------------------

    async def child_workflow(self, name: str, args: Any, has_args: bool) -> tuple[bool, Any]:
        record = await self.ctx.load_workflow(name)
        if record is None:
            names = ", ".join(await self.ctx.list_workflows()) or "none saved"
            return False, _js_error("Error", f"workflow({name!r}): no saved workflow with that name (available: {names})")
        checked = check_script(record.script, require_meta=True, max_bytes=self.limits.script_bytes)
        if not checked.ok:
            first = checked.errors[0]
            return False, _js_error("Error", f"saved workflow {name!r} does not pass checks: "
                                         f"{first.line}:{first.column}: {first.message}")
        self.enter_phase(name, group=name)
        final = await self._driver(checked.body, args=args, has_args=has_args, depth=1, group=name).execute()
        if final.failure is not None:
            return False, _js_error("Error", f"workflow {name!r} failed: {final.failure.describe()}")
        return True, final.result
