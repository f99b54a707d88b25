"""The engine: hosts runs in one process. The CLI and the HTTP API both call it.

    async with Engine(settings, store) as engine:
        record = await engine.submit(RunRequest(script="return await agent('hi')"), owner="local")
        record = await engine.wait(record.id)

Every run is a task in the engine's task group, started by ``submit`` and recovered at start
(runs the store says were ``queued``/``running``/``paused`` when the last process stopped
continue from their journal). Leaving the ``async with`` cancels live runs without ending
them: the next engine on the same store picks them up.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import aclosing
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
from anyio.abc import TaskGroup

import sandbox
from sandbox import CheckResult, ScriptFailure, SlicePool, check_script

from . import models
from .backends import AgentBackend, AgentRequest, SimulateBackend, build_backends
from .config import Settings
from .dispatcher import Dispatcher
from .errors import (
    AgentNotFound,
    ConfigError,
    Conflict,
    InvalidRequest,
    InvalidRunState,
    ResumeConflict,
    RunNotFound,
    ScriptRejected,
    TooManyStuckRuns,
    WorkflowNotFound,
)
from .events import EventLog, EventType
from .followers import stored_events
from .journal import RESUME_MODES, ResumePlan
from .options import RunOptions
from .run import Run, RunContext
from .state import RunStatus
from .store import CallRecord, EventRecord, RunRecord, Store, WorkflowRecord

__all__ = ["Engine", "RunRequest"]

logger = logging.getLogger("quickflow.engine")

KEEP_FINISHED = 256
#: Check results kept for scripts seen recently, and the longest script kept (16 MiB at most).
CHECKED_SCRIPTS = 256
CHECKED_SCRIPT_CHARS = 64 * 1024
#: Spare isolates are prepared once a run ends, not while it runs: preparing one costs a run 5-10
#: ms of CPU it would otherwise have. A run that goes on longer than this does not keep the
#: pool empty: the spares are prepared then.
SPARES_AFTER_S = 1.0
# The events that end a call that crash recovery serves from the journal.
_FINAL_AGENT_EVENTS = frozenset({EventType.AGENT_COMPLETED.value, EventType.AGENT_CACHED.value})


@dataclass(frozen=True)
class RunRequest:
    """A request to start a run: a script or a saved workflow's name, plus input and options."""

    script: str | None = None
    workflow: str | None = None
    args: Any = None
    has_args: bool = False
    options: Mapping[str, Any] | None = None
    resume_from: str | None = None
    resume_mode: str = "reuse"
    idempotency_key: str | None = None


class Engine:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        *,
        backends: Mapping[str, AgentBackend] | None = None,
        pool: SlicePool | None = None,
        recover: bool = True,
    ) -> None:
        self.settings = settings
        self.store = store
        self.limits = settings.limits
        self.pool = pool or SlicePool()
        self.backends: dict[str, AgentBackend] = (
            dict(backends) if backends is not None else build_backends(settings, on_retry=self.report_backend_retry)
        )
        self.backends.setdefault("simulate", SimulateBackend())
        self.dispatcher = Dispatcher(
            self.backends,
            server_concurrency=self.limits.server_concurrency,
            max_result_bytes=self.limits.agent_result_bytes,
            cost=self._cost_usd,
        )
        self.node = f"{os.uname().nodename}:{os.getpid()}"
        self._recover = recover
        self._runs: dict[str, Run] = {}
        # Finished runs stay in memory a while (live views are cheaper than the store), oldest out first.
        self._finished: list[str] = []
        self._tg: TaskGroup | None = None
        # While a task prepares spare isolates: the event a run's end sets (the task waits for it).
        self._run_ended: anyio.Event | None = None
        self._spares_wanted: anyio.Event | None = None  # set when a run has taken a spare (see _keep_spares)
        self._checks = _RecentChecks(CHECKED_SCRIPTS, CHECKED_SCRIPT_CHARS)
        self._ctx = RunContext(
            store=store,
            dispatcher=self.dispatcher,
            pool=self.pool,
            limits=self.limits,
            profiles=settings.profiles,
            resolve_model=self._resolve_model,
            load_workflow=store.get_workflow,
            list_workflows=self._workflow_names,
            isolate_started=self._top_up_isolates,
        )

    async def __aenter__(self) -> Engine:
        # Reading the SDK's model list imports its types (over a second): do it off the event loop.
        await anyio.to_thread.run_sync(models.default_aliases)
        # What is alive now (modules, configuration, the SDK's types) lives as long as the
        # process: move it out of the cyclic collector's way. Full collections otherwise walk all
        # of it and paused the event loop for 15-25 ms at a time under load (benchmarks/).
        gc.freeze()
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._release_memory)
        self._tg.start_soon(self._keep_spares)
        if self._recover:
            await self._recover_runs()
        return self

    @property
    def isolate_evictions(self) -> int:
        """Isolates of waiting scripts given up to save memory in this process (see Limits.evict_idle_s)."""
        return sandbox.evictions_total()

    async def _keep_spares(self) -> None:
        """Top up the spare isolates that let a run skip hardening on its critical path, once
        a run has taken one (``_top_up_isolates``) and then ended, or ``SPARES_AFTER_S`` has
        passed. One task for the engine's life: starting one per run cost each run tens of
        microseconds on its critical path."""
        while True:
            self._spares_wanted = wanted = anyio.Event()
            await wanted.wait()
            try:
                with anyio.move_on_after(SPARES_AFTER_S):
                    if self._run_ended is not None:
                        await self._run_ended.wait()
                while sandbox.spare_isolates_wanted():
                    await anyio.to_thread.run_sync(sandbox.prepare_spare_isolate)
            finally:
                self._run_ended = None

    async def _release_memory(self) -> None:
        """Once a second, if scripts gave up their isolates meanwhile, hand the freed memory back
        to the OS (off the event loop: it takes milliseconds)."""
        released = sandbox.evictions_total()
        while True:
            await anyio.sleep(1.0)
            if sandbox.evictions_total() != released:
                released = sandbox.evictions_total()
                await anyio.to_thread.run_sync(sandbox.release_freed_memory)

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        try:
            return await self._tg.__aexit__(*exc_info)
        finally:
            self._tg = None
            with anyio.CancelScope(shield=True):
                for backend in self.backends.values():
                    close = getattr(backend, "aclose", None)
                    if close is not None:
                        await close()

    def report_backend_retry(self, request: AgentRequest, event: Any) -> None:
        """A backend is about to retry a transport error: tell the run's followers."""
        run = self._runs.get(request.run_id)
        if run is not None:
            run.backend_retry(request.index, getattr(event, "attempt", 0), getattr(event, "reason", ""),
                              getattr(event, "delay_s", 0.0))

    # --- checks and submission ----------------------------------------------------------------

    def check(self, script: str, *, require_meta: bool = False) -> CheckResult:
        key = (script, require_meta)
        result = self._checks.get(key)
        if result is None:
            result = check_script(script, require_meta=require_meta, max_bytes=self.limits.script_bytes)
            self._checks.put(key, result)
        return result

    def _checked(self, script: str, *, require_meta: bool = False) -> CheckResult:
        result = self.check(script, require_meta=require_meta)
        if not result.ok:
            raise ScriptRejected(result.errors)
        return result

    async def check_async(self, script: str, *, require_meta: bool = False) -> CheckResult:
        """The checks on a worker thread: parsing and compiling a large script takes a while. A
        script checked recently (services resubmit the same workflow) is answered at once."""
        cached = self._checks.get((script, require_meta))
        if cached is not None:
            return cached
        return await anyio.to_thread.run_sync(lambda: self.check(script, require_meta=require_meta))

    async def submit(self, request: RunRequest, *, owner: str = "local") -> RunRecord:
        """Validate and start a run. Raises ScriptRejected, InvalidRequest, NotFound, ResumeConflict or
        TooManyStuckRuns."""
        self._check_running()  # before anything is saved
        existing = await self._same_request(owner, request)
        if existing is not None:
            return existing
        options = RunOptions.parse(request.options, self.limits, default_backend=self.settings.backend_name())
        if options.effective_backend not in self.backends:
            raise InvalidRequest(
                f"backend {options.effective_backend!r} is not configured on this server "
                f"(available: {', '.join(sorted(self.backends))})"
            )
        script, args, has_args = request.script, request.args, request.has_args
        workflow = request.workflow
        plan: ResumePlan | None = None
        if request.resume_from:
            if request.resume_mode not in RESUME_MODES:
                raise InvalidRequest(f"resume_mode must be one of {', '.join(RESUME_MODES)}")
            source = await self.get_run(request.resume_from, owner=owner)
            live = self._runs.get(source.id)
            if live is not None and not live.status.terminal:
                raise ResumeConflict(source.id)
            script = script if script is not None else source.script
            workflow = workflow or source.workflow
            if not has_args and source.has_args:
                args, has_args = source.args, True
            plan = ResumePlan(await self.store.list_calls(source.id), request.resume_mode)
        elif workflow and script is None:
            saved = await self.store.get_workflow(workflow)
            if saved is None:
                raise WorkflowNotFound(workflow, await self._workflow_names())
            script = saved.script
        if script is None:
            raise InvalidRequest("a run needs a script or the name of a saved workflow")
        checked = await self.check_async(script)
        if not checked.ok:
            raise ScriptRejected(checked.errors)
        if has_args:
            _check_args_size(args, self.limits.args_bytes)
        stuck = self.pool.overrunning(owner)
        if 0 < self.limits.stuck_slices_per_owner <= stuck:
            raise TooManyStuckRuns(stuck, self.limits.stuck_slices_per_owner)
        record = RunRecord(
            id=_new_run_id(),
            owner=owner,
            status=RunStatus.QUEUED.value,
            script=script,
            args=args if has_args else None,
            has_args=has_args,
            options=options.to_dict(),
            workflow=workflow,
            resume_from=request.resume_from,
            resume_mode=request.resume_mode if request.resume_from else None,
            idempotency_key=request.idempotency_key,
            created_at=time.time(),
            node=self.node,
        )
        # The run starts while its record is saved: its first slice writes nothing, and it
        # writes nothing else before this save is durable (see Run.drive).
        run = self._make_run(record, options, checked, plan=plan)
        queued: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        announce = functools.partial(self._saved, run, checked, {"workflow": workflow,
                                                                  "resume_from": request.resume_from}, queued)
        try:
            self.store.save_run_soon(record, announce)
        except Exception:
            self._runs.pop(run.id, None)
            raise
        self._start(run, queued=queued)
        try:
            await asyncio.shield(queued)  # a submitter that goes away leaves the run going
        except Conflict:
            # The same key in a request that came in meanwhile, whose run was saved first.
            existing = await self._same_request(owner, request)
            if existing is None:
                raise
            return existing
        return record  # as saved: the run may be running by now

    async def _same_request(self, owner: str, request: RunRequest) -> RunRecord | None:
        """The owner's run saved with the request's idempotency key, if the request is the same
        as that run's; Conflict if it is not."""
        if not request.idempotency_key:
            return None
        existing = await self.store.find_run_by_idempotency_key(owner, request.idempotency_key)
        if existing is not None and _differs(existing, request):
            raise Conflict(
                f"idempotency key {request.idempotency_key!r} was used for run {existing.id} with a "
                "different script, workflow or args; use a new key for a new request",
                details={"run_id": existing.id},
            )
        return existing

    def _saved(self, run: Run, checked: CheckResult, queued_data: dict[str, Any], queued: asyncio.Future[None],
               error: BaseException | None) -> None:
        """A new run's record is saved: announce the run, then let it and its submitter go on.
        One that could not be saved never existed (its submitter gets the error): forget it."""
        if error is not None:
            run.discard()
            self._runs.pop(run.id, None)
            queued.set_exception(error)
            return
        try:
            run.events.emit(EventType.RUN_QUEUED, queued_data)
            for warning in checked.warnings:
                run.warn(f"{warning.line}:{warning.column}: {warning.message}")
        except Exception as exc:  # the store closed meanwhile (the service is stopping): the run goes on
            logger.warning("run %s: its start could not be recorded: %s", run.id, exc)
        queued.set_result(None)

    def _make_run(
        self,
        record: RunRecord,
        options: RunOptions,
        checked: CheckResult,
        *,
        plan: ResumePlan | None = None,
        recovered: list[Any] | None = None,
        reported: frozenset[int] = frozenset(),
        last_seq: int = 0,
        first_index: int = 0,
    ) -> Run:
        events = EventLog(record.id, self.store, start_seq=last_seq)
        phases = [p.title for p in checked.meta.phases] if checked.meta else []
        run = Run(record, options, self._ctx, events, body=checked.body, phases=phases, plan=plan,
                  recovered=recovered, reported=reported, first_index=first_index)
        self._runs[record.id] = run
        return run

    def _start(self, run: Run, *, queued: asyncio.Future[None] | None = None) -> None:
        self._check_running()
        assert self._tg is not None
        self._tg.start_soon(self._drive, run, queued, name=f"run {run.id}")

    def _check_running(self) -> None:
        if self._tg is None:
            raise RuntimeError("the engine is not running: use `async with Engine(...)`")

    def _top_up_isolates(self) -> None:
        """Called once a run's first slice is done: the spares are prepared after a run ends
        (see ``SPARES_AFTER_S``), so that preparing them competes with no run's work."""
        if self._run_ended is None and sandbox.spare_isolates_wanted() and self._spares_wanted is not None:
            self._run_ended = anyio.Event()
            self._spares_wanted.set()

    async def _drive(self, run: Run, queued: asyncio.Future[None] | None) -> None:
        try:
            await self._drive_inner(run, queued)
        finally:
            if self._run_ended is not None:
                self._run_ended.set()
            if run.status.terminal and not run.discarded:
                self._finished.append(run.id)
                while len(self._finished) > KEEP_FINISHED:
                    self._runs.pop(self._finished.pop(0), None)

    async def _drive_inner(self, run: Run, queued: asyncio.Future[None] | None) -> None:
        try:
            await run.drive(queued=queued)
        except Exception:  # a bug must end this run, not the service
            if run.discarded:
                return  # never saved: its submitter has the error
            logger.exception("run %s crashed", run.id)
            with anyio.CancelScope(shield=True):
                try:
                    await run.finish(ScriptFailure("internal", "InternalError", "the run crashed inside quickflow"),
                                     None)
                except Exception:  # the store itself failing (its writer gone): still not the service
                    logger.exception("run %s: its failure could not be recorded", run.id)
                    run.abandon(ScriptFailure(
                        "internal", "StoreError", "the run's journal could not be written (see the service log); "
                        "the service recovers the run from its journal when it starts again"))

    async def _recover_runs(self) -> None:
        for record in await self.store.runs_with_status(
            [RunStatus.QUEUED.value, RunStatus.RUNNING.value, RunStatus.PAUSED.value]
        ):
            try:
                checked = self._checked(record.script)
                options = RunOptions.parse(record.options, self.limits)
            except (ScriptRejected, InvalidRequest, ConfigError) as exc:
                logger.warning("cannot recover run %s: %s", record.id, exc)
                continue
            calls = await self.store.list_calls(record.id)
            events = await self.store.read_events(record.id)
            last_seq = events[-1].seq if events else 0
            plan = None
            if record.resume_from:
                plan = ResumePlan(await self.store.list_calls(record.resume_from), record.resume_mode or "reuse")
            completed = [c for c in calls if c.status in ("completed", "cached")]
            # Calls whose final event made it to the store before the crash: a follower may have
            # seen it, so replaying them must not announce them a second time.
            reported = frozenset(e.data["index"] for e in events
                                 if e.type in _FINAL_AGENT_EVENTS and isinstance(e.data.get("index"), int))
            record = replace(record, node=self.node)
            first_index = max((c.index for c in calls), default=-1) + 1
            run = self._make_run(record, options, checked, plan=plan, recovered=completed, reported=reported,
                                 last_seq=last_seq, first_index=first_index)
            self._start(run)

    @functools.cached_property
    def _price_for(self) -> Any:
        # One lookup per model for the engine's life: the tables are configuration.
        return functools.cache(lambda model: models.price_for(model, self.settings.prices, aliases=self.settings.models))

    def _cost_usd(self, model: str, usage: Any) -> float:
        return models.usage_cost(self._price_for(model), usage)

    @functools.cached_property
    def _resolve_model(self) -> Callable[[str | None, str | None, str | None], str]:
        # Once per distinct request: the alias tables are configuration. Bounded, because the
        # requested name comes from scripts.
        return functools.lru_cache(maxsize=1024)(self._choose_model)

    def _choose_model(self, requested: str | None, run_model: str | None, agent_type: str | None) -> str:
        """The script's model, else the agent profile's, else the run's, else the server default."""
        profile = self.settings.profiles.get(agent_type) if agent_type else None
        return models.choose_model(
            requested,
            profile_model=profile.model if profile is not None else None,
            default=run_model or self.settings.default_model,
            aliases=self.settings.models,
        )

    # --- queries ------------------------------------------------------------------------------

    def run_counts(self) -> dict[str, int]:
        counts = {status.value: 0 for status in RunStatus}
        for run in self._runs.values():
            counts[run.status.value] += 1
        return counts

    def live(self, run_id: str) -> Run | None:
        return self._runs.get(run_id)

    async def get_run(self, run_id: str, *, owner: str | None = None) -> RunRecord:
        """The run's record (live state for runs in this process). ``owner=None`` sees every run."""
        run = self._runs.get(run_id)
        record = replace(run.record, usage=run.summary()) if run is not None else await self.store.get_run(run_id)
        if record is None or (owner is not None and record.owner != owner):
            raise RunNotFound(run_id)
        return record

    async def wait(self, run_id: str) -> RunRecord:
        run = self._runs.get(run_id)
        if run is not None:
            await run.done.wait()
        return await self.get_run(run_id)

    async def follow(self, run_id: str, after_seq: int = 0) -> AsyncIterator[EventRecord]:
        """The run's events after ``after_seq``; live until the run ends."""
        run = self._runs.get(run_id)
        if run is not None:
            async for event in run.events.follow(after_seq):
                yield event
            return
        async with aclosing(stored_events(self.store, run_id, after_seq)) as stored:
            async for event in stored:
                yield event

    async def list_agents(self, run_id: str, *, owner: str | None = None) -> list[CallRecord]:
        await self.get_run(run_id, owner=owner)
        run = self._runs.get(run_id)
        if run is not None and not run.archived:
            return [run.calls[i].record(run_id) for i in sorted(run.calls)]
        return await self.store.list_calls(run_id)

    async def get_agent(self, run_id: str, index: int, *, owner: str | None = None) -> CallRecord:
        await self.get_run(run_id, owner=owner)
        run = self._runs.get(run_id)
        call = run.calls.get(index) if run is not None and not run.archived else None
        record = call.record(run_id) if call is not None else await self.store.get_call(run_id, index)
        if record is None:
            raise AgentNotFound(run_id, index)
        return record

    # --- controls -----------------------------------------------------------------------------

    async def _live_run(self, run_id: str, owner: str | None, action: str) -> Run:
        record = await self.get_run(run_id, owner=owner)
        run = self._runs.get(run_id)
        if run is None or run.status.terminal:
            raise InvalidRunState(run_id, record.status, action)
        return run

    async def pause(self, run_id: str, *, owner: str | None = None) -> RunRecord:
        await (await self._live_run(run_id, owner, "pause")).pause()
        return await self.get_run(run_id)

    async def resume(self, run_id: str, *, owner: str | None = None) -> RunRecord:
        await (await self._live_run(run_id, owner, "resume")).resume()
        return await self.get_run(run_id)

    async def cancel(self, run_id: str, *, owner: str | None = None) -> RunRecord:
        run = await self._live_run(run_id, owner, "cancel")
        run.cancel()
        await run.done.wait()
        return await self.get_run(run_id)

    async def stop_agent(self, run_id: str, index: int, *, owner: str | None = None) -> CallRecord:
        (await self._live_run(run_id, owner, f"stop agent {index} of")).stop_agent(index)
        return await self.get_agent(run_id, index)

    async def restart_agent(self, run_id: str, index: int, *, owner: str | None = None) -> CallRecord:
        (await self._live_run(run_id, owner, f"restart agent {index} of")).restart_agent(index)
        return await self.get_agent(run_id, index)

    # --- saved workflows ----------------------------------------------------------------------

    async def _workflow_names(self) -> list[str]:
        return [w.name for w in await self.store.list_workflows()]

    async def save_workflow(self, script: str, *, name: str | None = None, owner: str | None = None,
                            source: str = "api") -> WorkflowRecord:
        checked = self._checked(script, require_meta=True)
        assert checked.meta is not None  # require_meta guarantees it
        if name is not None and name != checked.meta.name:
            raise InvalidRequest(f"the workflow's meta.name is {checked.meta.name!r}, not {name!r}")
        record = WorkflowRecord(name=checked.meta.name, script=script, meta=checked.meta.to_dict(), owner=owner,
                                source=source, updated_at=time.time())
        await self.store.save_workflow(record)
        return record

    async def load_workflows_dir(self, directory: Path) -> list[str]:
        """Save every ``*.js`` file with valid meta from ``directory``; report the ones skipped."""
        loaded: list[str] = []
        for path in sorted(directory.glob("*.js")):
            try:
                record = await self.save_workflow(path.read_text(encoding="utf-8"), source="directory")
            except (ScriptRejected, InvalidRequest) as exc:
                logger.warning("skipping workflow file %s: %s", path, exc)
                continue
            loaded.append(record.name)
        return loaded


def _differs(existing: RunRecord, request: RunRequest) -> bool:
    if request.script is not None and request.script != existing.script:
        return True
    if request.workflow is not None and request.workflow != existing.workflow:
        return True
    return request.has_args and (not existing.has_args or request.args != existing.args)


def _new_run_id() -> str:
    return "run_" + uuid.uuid4().hex[:20]


def _check_args_size(args: Any, limit: int) -> None:
    import json

    size = len(json.dumps(args).encode())
    if size > limit:
        raise InvalidRequest(f"args is {size} bytes of JSON; the limit is {limit} bytes")


class _RecentChecks:
    """A small LRU of check results, shared by the event loop and the threads that run checks.
    Longer scripts are neither kept nor looked up (hashing one would cost the loop more)."""

    def __init__(self, size: int, max_chars: int) -> None:
        self._size = size
        self._max_chars = max_chars
        self._results: OrderedDict[tuple[str, bool], CheckResult] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, bool]) -> CheckResult | None:
        if len(key[0]) > self._max_chars:
            return None
        with self._lock:
            result = self._results.get(key)
            if result is not None:
                self._results.move_to_end(key)
            return result

    def put(self, key: tuple[str, bool], result: CheckResult) -> None:
        if len(key[0]) > self._max_chars:
            return
        with self._lock:
            self._results[key] = result
            self._results.move_to_end(key)
            while len(self._results) > self._size:
                self._results.popitem(last=False)
