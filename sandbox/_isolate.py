"""One QuickJS context per run, driven slice by slice.

An :class:`Isolate` is synchronous and blocking: the pool runs its methods on a worker thread
(quickjs-ng releases the GIL while JS runs). A *slice* is one call into the engine followed by
a drain of its job queue; it ends by reading the outbox. The host never hands JS a Python
callable: it calls three JS functions it took from the prelude (``start``, ``settle``,
``take``) and exchanges JSON strings with them.

Invariants:
- At most one slice of an isolate runs at a time (the run awaits each slice before the next).
- A slice stops once it has run ``slice_cpu_s`` (the engine's interrupt handler stops a busy
  call; the drain loop stops a flood of short jobs), and the isolate's total CPU is capped by
  ``run_cpu_s``, accounted here with the thread's CPU clock. The handler is polled between
  bytecodes only, so a slice stuck in one built-in call runs on: at ``overrun_after_s`` the
  pool abandons it and the run fails (``overrun_failure``); the context is dropped when the
  call returns.
- After a limit is hit the context is dropped: a context that ran out of memory is not trusted.
- A waiting script's context can be *evicted* (dropped to free its memory) and is rebuilt by
  replay before its next slice: the same script, config and settlement batches, in the same
  order, make the same requests (scripts are deterministic: no clock, no randomness, no weak
  references). Each replayed slice's outbox must match the original's, or the run fails
  rather than continue in a different state. Replay is bounded (``MAX_REPLAY_SLICES``,
  ``MAX_REPLAY_CPU_S``, ``MAX_EVICTIONS``) and its CPU is charged to the script.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson
import quickjs

import js_stdlib

from ._memory import note_eviction
from ._source import to_user_position, wrap_body

__all__ = ["Isolate", "IsolateLimits", "Request", "ScriptFailure", "Slice", "prepare_spare_isolate", "spare_isolates_wanted"]


@dataclass(frozen=True)
class IsolateLimits:
    heap_bytes: int = 64 * 1024 * 1024
    stack_bytes: int = 1024 * 1024
    slice_cpu_s: float = 1.0
    run_cpu_s: float = 60.0
    result_bytes: int = 4 * 1024 * 1024
    evict: bool = True  # may the context be evicted while the script waits (see Isolate.evict)


@dataclass(frozen=True)
class ScriptFailure:
    """Why a script stopped without a result. ``kind`` is ``error`` (an uncaught exception),
    ``limit`` (``name`` says which) or ``deadlock``."""

    kind: str
    name: str
    message: str
    line: int | None = None
    column: int | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"kind": self.kind, "name": self.name, "message": self.message}
        if self.line is not None:
            data["line"] = self.line
            data["column"] = self.column
        return data

    def describe(self) -> str:
        where = f" (line {self.line}, column {self.column})" if self.line is not None else ""
        prefix = f"{self.name}: " if self.kind == "error" else ""
        return f"{prefix}{self.message}{where}"


class Request(NamedTuple):
    """One entry of the outbox: ``kind`` is agent, workflow, timer, clear_timer, log, phase or failure.

    A named tuple: a slice can hold thousands, and a tuple is the cheapest immutable record."""

    kind: str
    id: int
    payload: Any


@dataclass(frozen=True)
class Slice:
    requests: tuple[Request, ...]
    finished: bool = False
    result: Any = None
    failure: ScriptFailure | None = None
    cpu_s: float = 0.0


# Stack frames look like "    at name (<input>:12:5)". Frames of the prelude and hardening are
# named (public globals or qf$…); the first other frame is the user's.
_FRAME = re.compile(r"^\s*at (\S+) \(<input>:(\d+):(\d+)\)", re.MULTILINE)
_PRELUDE_FRAMES = frozenset(
    {
        "agent", "parallel", "pipeline", "phase", "log", "workflow", "setTimeout", "clearTimeout",
        "take", "settle", "start", "info", "debug", "warn", "error", "spent", "remaining",
        "Date", "now", "random", "Function", "WorkflowAgentCapError", "WorkflowBudgetExceededError",
        "StructuredOutputError", "clockError", "Promise",
    }
)


_Prepared = tuple[Any, Any, Any, Any]  # a context, and its prelude's take, settle and start


def _prepared_context() -> _Prepared:
    """A hardened context with the prelude loaded and the host handles taken: everything of an
    isolate's start but the user's script (about 4 ms, most of it the hardening walk)."""
    ctx = quickjs.Context()
    ctx.eval(js_stdlib.hardening())
    ctx.eval(js_stdlib.prelude())
    handles = (ctx.eval("__quickflow_host.take"), ctx.eval("__quickflow_host.settle"),
               ctx.eval("__quickflow_host.start"))
    ctx.eval("delete globalThis.__quickflow_host")
    return (ctx, *handles)


class _Spares:
    """Contexts prepared ahead of time, so a run's first slice only compiles and starts its
    script. Nothing of a script ever ran in one; each is used once."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._ready: list[_Prepared] = []
        self._lock = threading.Lock()

    def take(self) -> _Prepared | None:
        with self._lock:
            return self._ready.pop() if self._ready else None

    def wanted(self) -> int:
        return max(0, self.size - len(self._ready))

    def prepare(self) -> None:
        prepared = _prepared_context()
        with self._lock:
            if len(self._ready) < self.size:
                self._ready.append(prepared)


_SPARES = _Spares(2)


def prepare_spare_isolate() -> None:
    """Prepare one context for a future run (blocking: call it from a worker thread)."""
    _SPARES.prepare()


def spare_isolates_wanted() -> int:
    return _SPARES.wanted()


def _settlement(results: Sequence[tuple[int, bool, Any]], state: Mapping[str, Any], wall_ms: float) -> str:
    # orjson encodes several times faster than the json module, on the slice thread under the
    # GIL. It refuses integers past 64 bits and lone surrogates: those take the slow road.
    batch = {"results": results, "state": state, "wallMs": wall_ms}
    try:
        return orjson.dumps(batch).decode()
    except TypeError:
        return json.dumps(batch, separators=(",", ":"))


def _parse_outbox(text: str) -> Any:
    """The requests of a slice, read by orjson: several times faster than the json module, on
    the slice thread under the GIL. What orjson reads differently takes the json module:
    integers of 19 digits or more (orjson makes floats of those past 64 bits, which would
    change the journal key of a schema holding one) and lone surrogates (see _parse_exact)."""
    if not _has_long_integer(text):
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            pass
    return _parse_exact(text)


def _parse_exact(text: str) -> Any:
    """JSON from the isolate, read by the json module: integers keep every digit (the script's
    result is read this way, as a user would). A JS string may hold lone surrogates, which
    JSON.stringify escapes: each becomes U+FFFD, as TextEncoder would encode it, so that no
    string leaving the sandbox fails later in UTF-8 (a key, a journal row, an HTTP body)."""
    value = json.loads(text)
    return _well_formed(value) if _SURROGATE_ESCAPE.search(text) else value


def _has_long_integer(text: str) -> bool:
    """Whether ``text`` holds 19 digits in a row. Every byte becomes a zero (a digit) or a
    space, then one substring search: about 15 times faster than ``re`` on a 1000-agent outbox
    (85 µs against 1.3 ms for 50 kB), on the slice thread under the GIL."""
    return _NINETEEN_ZEROS in text.encode("utf-8", "surrogatepass").translate(_DIGITS_TO_ZERO)


_DIGITS_TO_ZERO = bytes(0x30 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))
_NINETEEN_ZEROS = b"0" * 19
# JSON.stringify writes a surrogate as an escape only when it is lone (a false positive, such
# as an escaped backslash before "ud800", only costs a walk over the value).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _well_formed(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, list):
        return [_well_formed(item) for item in value]
    if isinstance(value, dict):
        return {_well_formed(key): _well_formed(item) for key, item in value.items()}
    return value


def user_position(stack: str) -> tuple[int, int] | None:
    """The user's line and column from an engine stack, skipping prelude frames."""
    for name, line, column in _FRAME.findall(stack):
        if name.startswith("qf$") or name in _PRELUDE_FRAMES:
            continue
        return to_user_position(int(line), int(column))
    return None


# A script is evicted only while replaying it stays cheap: every later eviction replays it all
# again, so a long-lived script that kept being evicted would cost quadratic CPU.
MAX_REPLAY_SLICES = 256
MAX_REPLAY_CPU_S = 0.25
MAX_EVICTIONS = 64
REPLAY_SLICE_S = 10.0  # the time limit of one replayed slice (see _rehydrate)
# A slice still running after OVERRUN_FACTOR times its limit plus OVERRUN_GRACE_S of wall time
# is abandoned (``SlicePool``): it is stuck in a built-in call that the engine cannot interrupt.
# Honest slices end well before: the engine's limit counts the CPU time of the whole process.
OVERRUN_FACTOR = 3.0
OVERRUN_GRACE_S = 2.0
# The built-ins the engine cannot interrupt stop a slice once it has run this many times its
# limit of wall time (hardening.js): between the engine's limit, which counts the CPU time of
# the whole process, and the pool's deadline.
SLICE_WALL_FACTOR = 2.0


class _ReplayDiverged(Exception):
    pass


class _LimitHit(Exception):
    def __init__(self, failure: ScriptFailure) -> None:
        super().__init__(failure.message)
        self.failure = failure


class Isolate:
    def __init__(self, limits: IsolateLimits = IsolateLimits()) -> None:
        self.limits = limits
        self.cpu_s = 0.0
        self._lock = threading.Lock()
        self._ctx: Any = None
        self._take: Any = None
        self._settle: Any = None
        self._start: Any = None
        self._finished = False
        self._close_pending = False  # closed while a slice ran (see close)
        # The context of a script that ended, until close() frees it (see _retire).
        self._retired: tuple[Any, ...] | None = None
        # For replay after an eviction: how the script was started, every settlement batch
        # since (references to the values, not copies) and a digest of each slice's outbox.
        self._boot_args: tuple[str, Mapping[str, Any]] | None = None
        self._history: list[tuple[Sequence[tuple[int, bool, Any]], Mapping[str, Any]]] = []
        self._digests: list[int] = []
        self._evicted = False
        self.evictions = 0
        self.replay_cpu_s = 0.0  # also charged to the script's CPU budget (cpu_s)

    @property
    def closed(self) -> bool:
        return self._ctx is None and not self._evicted

    def start(self, body: str, config: Mapping[str, Any]) -> Slice:
        """Create the context, harden it, install the prelude, compile and start the script.

        ``body`` is the checked source (``CheckResult.body``); ``config`` carries the limits the
        prelude enforces (maxAgents, maxItems, maxLogLines, depth, budgetTotal) and the args.
        """
        if self.limits.evict:
            self._boot_args = (body, dict(config))
        return self._slice(lambda: self._boot(body, config))

    def settle(self, results: Sequence[tuple[int, bool, Any]], state: Mapping[str, Any]) -> Slice:
        """Resolve or reject pending promises (and fire timers), then run until the queue is empty."""
        state = dict(state)
        if self._replayable():
            self._history.append((results, state))
        batch = _settlement(results, state, self._wall_ms)
        return self._slice(lambda: self._settle(batch))

    @property
    def evicted(self) -> bool:
        return self._evicted

    def _replayable(self) -> bool:
        """Whether the script may still be evicted; once not, what was recorded is dropped.

        Only while a replay stays cheap (every eviction replays everything again, and replay
        CPU is charged to the script) and the heap stays small: the point where an engine runs
        out of memory depends on the allocator, so a script that catches out-of-memory errors
        near its limit might not replay the same way.
        """
        if self._boot_args is not None and not self.evictable:
            self._history, self._digests, self._boot_args = [], [], None
        return self._boot_args is not None

    @property
    def evictable(self) -> bool:
        return (
            self.limits.evict
            and self._boot_args is not None
            and len(self._history) < MAX_REPLAY_SLICES
            and self.cpu_s <= MAX_REPLAY_CPU_S
            and self.evictions < MAX_EVICTIONS
        )

    def evict(self) -> bool:
        """Drop the context of a script that waits, to free its memory; the next slice rebuilds
        it by replay. False when there is nothing to evict, replay would not be cheap and safe,
        or a slice is running. Freeing a context takes time: call it from a worker thread."""
        if self._ctx is None or self._finished or not self._replayable():
            return False
        if not self._lock.acquire(blocking=False):
            return False
        try:
            if int(self._ctx.memory()["memory_used_size"]) > self.limits.heap_bytes // 8:
                return False  # see _replayable
            self._ctx = self._take = self._settle = self._start = None
            self._evicted = True
            self.evictions += 1
            note_eviction()
            return True
        finally:
            self._lock.release()

    def memory_bytes(self) -> int:
        if self._ctx is None:
            return 0
        with self._lock:
            return int(self._ctx.memory()["memory_used_size"])

    @property
    def _wall_ms(self) -> float:
        """The wall time after which the wrapped built-ins stop a slice (hardening.js)."""
        return self.limits.slice_cpu_s * SLICE_WALL_FACTOR * 1000

    @property
    def overrun_after_s(self) -> float:
        """The wall time after which the next slice counts as stuck (see ``SlicePool``)."""
        cpu_s = self.limits.slice_cpu_s + (MAX_REPLAY_CPU_S if self._evicted else 0.0)
        return cpu_s * OVERRUN_FACTOR + OVERRUN_GRACE_S

    def overrun_failure(self, seconds: float) -> ScriptFailure:
        """Why a run whose slice was abandoned at its deadline stopped."""
        return ScriptFailure(
            "limit",
            "cpu_slice",
            f"script ran for more than {seconds:g} s inside a single built-in call, which the slice limit of "
            f"{self.limits.slice_cpu_s:g} s cannot interrupt (a search through a huge string, flat() of deeply "
            "nested arrays?); long computations belong in agents, not in the script",
        )

    def close(self) -> None:
        """Drop the context. The run stops being driven; nothing of it runs again.

        A slice that was abandoned while stuck in the engine still holds the context: it is
        dropped when that slice returns."""
        self._close_pending = True
        if self._lock.acquire(blocking=False):
            try:
                self._drop()
                self._retired = None
            finally:
                self._lock.release()

    def _retire(self) -> None:
        """The script has returned or thrown: nothing runs in its context again, but close()
        frees it, not the slice. Freeing a context holds the GIL (0.2-0.3 ms for a small heap),
        and the slice that ends a script is on the way to the run's end: the run frees it once
        that end is out (``Run._drive_script``). A script stopped by a limit, or out of memory,
        has its context dropped at once."""
        self._retired = (self._ctx, self._take, self._settle, self._start)
        self._drop()

    def _drop(self) -> None:
        self._ctx = self._take = self._settle = self._start = None
        self._evicted = False
        self._history, self._digests, self._boot_args = [], [], None

    # --- internals -------------------------------------------------------------------------

    def _rehydrate(self) -> ScriptFailure | None:
        """Rebuild an evicted context: boot, then every recorded settlement but the newest (the
        slice about to run), each outbox checked against the original's digest."""
        assert self._boot_args is not None
        cpu_started = time.thread_time()
        self._evicted = False
        # Replayed slices all ran within the limit before, and all of them together cost at most
        # MAX_REPLAY_CPU_S: only a busy process can make one take longer (the engine's limit is
        # C clock(), the CPU time of the whole process: with two threads busy it runs out in
        # half the wall time), and that must not fail an honest run.
        limit = max(self.limits.slice_cpu_s, REPLAY_SLICE_S)
        try:
            self._boot(*self._boot_args, time_limit=limit)
            self._drain(time.perf_counter(), limit)
            self._check_replay(0)
            for step, (results, state) in enumerate(self._history[:-1], start=1):
                self._settle(_settlement(results, state, 0))
                self._drain(time.perf_counter(), limit)
                self._check_replay(step)
            assert self._ctx is not None
            self._ctx.set_time_limit(self.limits.slice_cpu_s)
        except (_ReplayDiverged, _LimitHit, quickjs.JSException, RecursionError) as exc:
            self._drop()
            return ScriptFailure(
                "internal", "replay",
                f"the script could not be rebuilt after its isolate was evicted to save memory ({exc or type(exc).__name__}); "
                "resume the run from its journal",
            )
        finally:
            spent = time.thread_time() - cpu_started
            self.replay_cpu_s += spent
            self.cpu_s += spent
        return None

    def _check_replay(self, step: int) -> None:
        raw = self._take()
        if step >= len(self._digests) or hash(raw) != self._digests[step]:
            raise _ReplayDiverged(f"slice {step} asked for something else than before")

    def _boot(self, body: str, config: Mapping[str, Any], *, time_limit: float | None = None) -> None:
        ctx, self._take, self._settle, self._start = _SPARES.take() or _prepared_context()
        ctx.set_memory_limit(self.limits.heap_bytes)
        ctx.set_max_stack_size(self.limits.stack_bytes)
        ctx.set_time_limit(time_limit or self.limits.slice_cpu_s)
        self._ctx = ctx
        main = ctx.eval(wrap_body(body))
        # A replay (time_limit) runs without the built-ins' wall clock: a slice that once ended in
        # time must replay the same way on a busy machine.
        wall_ms = 0 if time_limit else self._wall_ms
        self._start(main, json.dumps(dict(config, wallMs=wall_ms), separators=(",", ":")))

    def _slice(self, step: Any) -> Slice:
        if self._finished:
            return Slice(requests=(), finished=True)
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("an isolate runs one slice at a time")
        if self._evicted:
            try:
                failure = self._rehydrate()
            except BaseException:
                self._lock.release()
                raise
            if failure is not None:
                self._lock.release()
                return self._fail(failure, 0.0)
        started = time.perf_counter()
        cpu_started = time.thread_time()
        try:
            try:
                step()
                self._drain(started)
                if self.cpu_s + (time.thread_time() - cpu_started) > self.limits.run_cpu_s:
                    raise _LimitHit(
                        ScriptFailure(
                            "limit",
                            "cpu_budget",
                            f"script exceeded its CPU budget of {self.limits.run_cpu_s:g} s for the whole run",
                        )
                    )
                return self._collect(time.thread_time() - cpu_started)
            except _LimitHit as hit:
                return self._fail(hit.failure, time.thread_time() - cpu_started)
            except quickjs.JSException as exc:
                return self._fail(self._engine_failure(str(exc)), time.thread_time() - cpu_started)
            except RecursionError:
                return self._fail(
                    ScriptFailure("limit", "nesting", "a value crossing to the host is nested too deeply "
                                  f"(more than about {sys.getrecursionlimit()} levels)"),
                    time.thread_time() - cpu_started,
                )
        finally:
            self._lock.release()
            if self._close_pending:  # abandoned (see close), and only now out of the engine
                self.close()

    def _drain(self, started: float, limit: float | None = None) -> None:
        ctx = self._ctx
        if ctx is None:
            return
        limit = limit or self.limits.slice_cpu_s
        while ctx.execute_pending_job():
            # The engine's interrupt handler bounds one job; this bounds a flood of short ones.
            if time.perf_counter() - started > limit:
                raise _LimitHit(self._slice_failure())

    def _collect(self, cpu_s: float) -> Slice:
        self.cpu_s += cpu_s
        outbox = self._take()
        if self._boot_args is not None:  # recorded for replay
            self._digests.append(hash(outbox))
        raw = _parse_outbox(outbox)
        requests = tuple(map(Request._make, raw["out"]))
        done = raw["done"]
        if done is None:
            return Slice(requests=requests, cpu_s=cpu_s)
        self._finished = True
        if done["ok"]:
            text: str = done["json"]
            if len(text.encode()) > self.limits.result_bytes:
                failure = ScriptFailure(
                    "limit",
                    "result_size",
                    f"the return value is {len(text.encode())} bytes of JSON; the limit is "
                    f"{self.limits.result_bytes} bytes: return a summary and keep bulk data elsewhere",
                )
                self._drop()
                return Slice(requests=requests, finished=True, failure=failure, cpu_s=cpu_s)
            self._retire()
            return Slice(requests=requests, finished=True, result=_parse_exact(text), cpu_s=cpu_s)
        error = done["error"]
        if self._out_of_memory(error):
            self._drop()  # a heap at its limit: not kept a moment longer
            failure = self._memory_failure(thrown_null=error.get("name") != "InternalError")
            return Slice(requests=requests, finished=True, failure=failure, cpu_s=cpu_s)
        position = user_position(error.get("stack", ""))
        failure = ScriptFailure(
            "error",
            error.get("name") or "Error",
            error.get("message") or "",
            *(position or (None, None)),
        )
        self._retire()
        return Slice(requests=requests, finished=True, failure=failure, cpu_s=cpu_s)

    def _out_of_memory(self, error: Mapping[str, Any]) -> bool:
        if error.get("name") == "InternalError" and "out of memory" in error.get("message", ""):
            return True
        # With no room left even for an error object the engine throws null, and by the time the
        # host looks the heap is freed again. So a thrown null counts as running out of memory
        # (a script that throws null itself is reported the same way; the message says so).
        return error.get("message") == "uncaught non-Error value: null"

    def _memory_failure(self, *, thrown_null: bool = False) -> ScriptFailure:
        message = f"script exceeded its memory limit of {self.limits.heap_bytes // (1024 * 1024)} MiB"
        if thrown_null:
            message += " (the engine threw null: no memory was left even for an error object)"
        return ScriptFailure("limit", "memory", message)

    def _fail(self, failure: ScriptFailure, cpu_s: float) -> Slice:
        self.cpu_s += cpu_s
        self._finished = True
        self._drop()
        return Slice(requests=(), finished=True, failure=failure, cpu_s=cpu_s)

    def _slice_failure(self, stack: str = "") -> ScriptFailure:
        position = user_position(stack)
        return ScriptFailure(
            "limit",
            "cpu_slice",
            f"script ran for more than {self.limits.slice_cpu_s:g} s without yielding (an endless loop?); "
            "long computations belong in agents, not in the script",
            *(position or (None, None)),
        )

    def _engine_failure(self, text: str) -> ScriptFailure:
        first = text.strip().splitlines()[0] if text.strip() else "unknown engine error"
        if "interrupted" in first:
            return self._slice_failure(text)
        if "out of memory" in first or first in ("null", "InternalError"):
            return self._memory_failure()
        if "stack" in first.lower() and "exceeded" in first.lower():
            return ScriptFailure("limit", "stack", "maximum call stack size exceeded (runaway recursion?)")
        name, _, message = first.partition(": ")
        position = user_position(text)
        return ScriptFailure("error", name or "Error", message or first, *(position or (None, None)))
