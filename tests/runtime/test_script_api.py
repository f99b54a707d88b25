"""SPEC §2, rule by rule: every global, each error and its message, through a real engine.

Each row is a script, its run options and what the run must end with. Expected values are
written by hand from the script text; answers from the simulate backend are pinned with
canned responses (``simulate.responses``) wherever a row depends on them.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import pytest
import regex

import sandbox._isolate as sandbox_isolate
from runtime import followers
from runtime import Engine, EventRecord, MemoryStore, RunRecord, RunRequest, SimulateBackend, load_settings, schema
from runtime.backends import AgentRequest, AgentResult
from runtime.engine import CHECKED_SCRIPT_CHARS, CHECKED_SCRIPTS
from runtime.scheduling import CALLS_AHEAD_OF_JOURNAL
from runtime.script import AGENTS_FIRST_TURN
from runtime.calls import default_label
from runtime.errors import Conflict, InvalidAgentState, ScriptRejected
from runtime.store import SQLiteStore

from .sqlite_lock import WriteLock

pytestmark = pytest.mark.anyio

ABSENT = object()
SCHEMA_N5 = "{type: 'object', properties: {n: {type: 'integer', minimum: 5, maximum: 5}}, required: ['n']}"


@dataclass(frozen=True)
class Case:
    id: str
    script: str
    result: Any = ABSENT  # expected result of a completed run
    error: str | None = None  # expected substring of a failed run's error message
    options: dict[str, Any] = field(default_factory=dict)
    args: Any = ABSENT
    warning: str | None = None  # expected substring of one of the run's warnings
    failure: str | None = None  # expected failure line


CANNED = {"simulate": {"responses": [{"match": "say-a", "text": "A"}, {"match": "say-b", "text": "B"}]}}

CASES = [
    # --- agent() --------------------------------------------------------------------------------
    Case("agent-returns-text", "return typeof (await agent('hello'))", result="string"),
    Case("agent-canned-text", "return await agent('say-a please')", result="A", options=CANNED),
    Case("agent-schema-object", f"const r = await agent('x', {{schema: {SCHEMA_N5}}}); return r.n", result=5),
    Case("agent-empty-prompt", "await agent('')", error="agent() expects a non-empty string prompt"),
    Case("agent-number-prompt", "await agent(42)", error="agent() expects a non-empty string prompt"),
    Case("agent-blank-prompt", "await agent('   \\n ')", error="agent() expects a non-empty string prompt"),
    Case("agent-options-not-object", "await agent('x', 'fast')", error="agent() options must be an object"),
    Case("agent-bad-effort", "await agent('x', {effort: 'huge'})", error="option 'effort' must be one of low, medium"),
    Case("agent-good-effort", "return typeof (await agent('x', {effort: 'xhigh'}))", result="string"),
    # Each option is read once: a getter cannot pass the check with one value and hand over another.
    Case(
        "agent-option-getters-run-once",
        "let e = 0, l = 0; const o = {get effort() { e++; return e === 1 ? 'low' : {bad: true} }, "
        "get label() { l++; return 'l' }}; await agent('x', o); return [e, l]",
        result=[1, 1],
    ),
    Case("agent-bad-isolation", "await agent('x', {isolation: 'container'})", error="option 'isolation' must be 'worktree'"),
    Case("agent-bad-timeout", "await agent('x', {timeout: -5})", error="option 'timeout' must be a positive number"),
    Case("agent-bad-model", "await agent('x', {model: 7})", error="option 'model' must be a non-empty string"),
    Case("agent-schema-root-array", "await agent('x', {schema: {type: 'array'}})", error="type: 'object' at its root"),
    Case("agent-schema-not-object", "await agent('x', {schema: 'json'})", error="must be a JSON Schema object"),
    Case(
        "agent-schema-invalid",
        "await agent('x', {schema: {type: 'object', properties: {a: {type: 'nonsense'}}}})",
        error="schema is not valid JSON Schema",
    ),
    Case(
        "agent-schema-unsatisfiable",
        "await agent('x', {schema: {type: 'object', properties: {a: {type: 'string'}}, required: ['b'], "
        "additionalProperties: false}})",
        error="can never be satisfied: 'b' is required",
    ),
    Case(
        "agent-unknown-option-warns",
        "return typeof (await agent('x', {colour: 'red'}))",
        result="string",
        warning="unknown option(s): colour",
    ),
    Case("agent-unknown-agent-type", "await agent('x', {agentType: 'wizard'})", error="unknown agentType 'wizard'"),
    # The host's JSON exchange with the isolate: values orjson refuses take the json module.
    # Lone surrogates (a JS string may hold them) leave the sandbox as U+FFFD, as TextEncoder
    # encodes them: a key, a journal row and an HTTP body all need valid UTF-8.
    Case(
        "agent-prompt-with-lone-surrogate",
        "log('a \\ud800'); return [typeof (await agent('half \\ud800', {label: 'x\\udfff'})), '\\udc00\\ud83d\\ude00']",
        result=["string", "\ufffd\U0001F600"],
    ),
    Case(
        "agent-result-integer-past-64-bits",
        "const r = await agent('big-n', {schema: {type: 'object', properties: {n: {type: 'integer'}}}}); "
        "return [typeof r.n, r.n > 2 ** 70]",
        result=["number", True],
        options={"simulate": {"responses": [{"match": "big-n", "data": {"n": 2**71}}]}},
    ),
    Case("agent-failure-is-null", "return await agent('boom now')", result=None, options={"simulate": {"fail": ["boom"]}}),
    Case(
        "agent-structured-output-error",
        f"try {{ await agent('bad-json', {{schema: {SCHEMA_N5}}}) }} catch (e) {{ "
        "return [e instanceof StructuredOutputError, e.name, typeof e.validationError] }",
        result=[True, "StructuredOutputError", "string"],
        options={"simulate": {"invalid": ["bad-json"]}},
    ),
    Case(
        "agent-schema-retry-then-valid",
        f"return (await agent('flaky', {{schema: {SCHEMA_N5}}})).n",
        result=5,
        options={"simulate": {"invalid": ["flaky"], "invalid_attempts": 2}},
    ),
    Case(
        "agent-cap-throws",
        "await agent('a'); await agent('b'); try { await agent('c') } catch (e) { "
        "return [e instanceof WorkflowAgentCapError, e.message.includes('at most 2 agents')] }",
        result=[True, True],
        options={"max_agents": 2},
    ),
    Case(
        "agent-budget-throws",
        "await agent('a'); try { await agent('b') } catch (e) { return e instanceof WorkflowBudgetExceededError }",
        result=True,
        options={"budget_tokens": 5, "simulate": {"output_tokens": 7}},
    ),
    Case(
        "agent-errors-are-errors",
        "return [WorkflowAgentCapError, WorkflowBudgetExceededError, StructuredOutputError]"
        ".map(C => new C('m') instanceof Error && new C('m').name === C.name)",
        result=[True, True, True],
    ),
    # --- budget ---------------------------------------------------------------------------------
    Case("budget-total-null", "return budget.total", result=None),
    Case("budget-total-set", "return budget.total", result=1000, options={"budget_tokens": 1000}),
    Case("budget-remaining-infinite", "return budget.remaining() === Infinity", result=True),
    Case(
        "budget-spent-live",
        "const before = budget.spent(); await agent('a'); return [before, budget.spent(), budget.remaining()]",
        result=[0, 7, 93],
        options={"budget_tokens": 100, "simulate": {"output_tokens": 7}},
    ),
    Case(
        "budget-remaining-floor-zero",
        "await agent('a'); return budget.remaining()",
        result=0,
        options={"budget_tokens": 5, "simulate": {"output_tokens": 7}},
    ),
    Case("budget-frozen", "return Object.isFrozen(budget)", result=True),
    # --- parallel() -----------------------------------------------------------------------------
    Case(
        "parallel-input-order",
        "return await parallel([() => agent('say-b'), () => agent('say-a'), () => agent('say-b')])",
        result=["B", "A", "B"],
        options={**CANNED, "simulate": {**CANNED["simulate"], "latency_ms": [0, 30]}},
    ),
    Case("parallel-not-array", "await parallel(() => 1)", error="parallel() expects an array of functions, not promises"),
    Case(
        "parallel-promises",
        "await parallel([agent('x')])",
        error="parallel() expects an array of functions, not promises. Wrap each call: () => agent(...)",
    ),
    Case("parallel-numbers", "await parallel([1, 2])", error="parallel() expects an array of functions"),
    Case("parallel-empty", "return await parallel([])", result=[]),
    Case(
        "parallel-throw-null-slot",
        "return await parallel([() => 1, () => { throw new Error('bad') }, async () => 3])",
        result=[1, None, 3],
        failure="parallel[1] failed: bad",
    ),
    Case(
        "parallel-too-many",
        "await parallel(Array.from({length: 4097}, () => () => 1))",
        error="parallel() accepts at most 4096 functions, got 4097",
    ),
    Case(
        "parallel-4096-ok",
        "return (await parallel(Array.from({length: 4096}, (_, i) => () => i))).length",
        result=4096,
    ),
    Case(
        "parallel-entry-cap",
        "await agent('a'); try { await parallel([() => 1]) } catch (e) { return e.name }",
        result="WorkflowAgentCapError",
        options={"max_agents": 1},
    ),
    Case(
        "parallel-entry-budget",
        "await agent('a'); try { await parallel([() => 1]) } catch (e) { return e.name }",
        result="WorkflowBudgetExceededError",
        options={"budget_tokens": 3, "simulate": {"output_tokens": 3}},
    ),
    Case(
        "parallel-cap-inside-is-null",
        "const r = await parallel([() => agent('a'), () => agent('b'), () => agent('c')]); "
        "return r.map(x => x === null)",
        result=[False, True, True],
        options={"max_agents": 1},
        failure="parallel[1] failed: agent cap reached",
    ),
    # parallel() takes an agent() promise's result straight from the host when a thunk returns
    # the newest request; every other shape goes through then().
    Case(
        "parallel-same-promise-twice",
        "const p = agent('say-a'); return await parallel([() => p, () => p])",
        result=["A", "A"],
        options=CANNED,
    ),
    Case(
        "parallel-promise-settled-earlier",
        "const p = agent('say-a'); await p; return await parallel([() => p, () => agent('say-b')])",
        result=["A", "B"],
        options=CANNED,
    ),
    Case(
        "parallel-promise-also-awaited-elsewhere",
        "let seen = null; const r = await parallel([() => { const p = agent('say-a'); p.then((v) => { seen = v }); return p }]); "
        "return [r[0], seen]",
        result=["A", "A"],
        options=CANNED,
    ),
    Case(
        "parallel-and-pipeline-before-any-agent",
        "return [await parallel([() => null, () => undefined]), await pipeline([null, 1], (x) => x)]",
        result=[[None, None], [None, 1]],
    ),
    Case(
        "pipeline-same-promise-for-two-items",
        "const p = agent('say-a'); return await pipeline([1, 2], () => p, (prev, item) => prev + item)",
        result=["A1", "A2"],
        options=CANNED,
    ),
    Case(
        "parallel-array-changed-after-the-call",
        "const t = Array.from({length: 100}, (_, i) => () => i); const p = parallel(t); t.length = 0; "
        "return (await p).length",
        result=100,
    ),
    Case(
        "parallel-then-attached-by-the-script-runs-first",
        "let seen = 0; const r = await parallel([1, 2, 3].map((n) => () => { const p = agent('say-a ' + n); "
        "p.then(() => { seen++ }); return p })); return [r, seen]",
        result=[["A", "A", "A"], 3],
        options=CANNED,
    ),
    Case(
        "parallel-thunk-returns-a-promise-with-a-throwing-constructor",
        "const r = await parallel([() => { const p = Promise.resolve(1); "
        "Object.defineProperty(p, 'constructor', { get() { throw new Error('no constructor') } }); return p }]); return r",
        result=[None],
        failure="parallel[0] failed: no constructor",
    ),
    Case(
        "pipeline-then-attached-by-the-script-runs-before-the-next-stage",
        "const cache = {}; return await pipeline(['a', 'b'], "
        "(x) => { const p = agent('say-' + x); p.then((v) => { cache[x] = v }); return p }, (v, x) => cache[x] === v)",
        result=[True, True],
        options=CANNED,
    ),
    Case(
        "pipeline-items-changed-by-a-stage",
        "const items = [1, 2, 3]; return await pipeline(items, (x) => { items.length = 1; return x })",
        result=[1, None, None],
    ),
    Case(
        "pipeline-error-whose-message-throws",
        "return await pipeline([1], () => { const e = new Error('x'); "
        "Object.defineProperty(e, 'message', { get() { throw new Error('boom') } }); return Promise.reject(e) })",
        result=[None],
        failure="pipeline[0] failed:",
    ),
    Case(
        "parallel-failed-agent-is-null",
        "return await parallel([() => agent('doomed one'), () => agent('say-b')])",
        result=[None, "B"],
        options={"simulate": {**CANNED["simulate"], "fail": ["doomed"]}},
    ),
    Case(
        "parallel-rejected-agent-is-null-and-a-failure",
        f"return await parallel([() => agent('never valid', {{schema: {SCHEMA_N5}}}), () => agent('say-b')])",
        result=[None, "B"],
        options={"simulate": {**CANNED["simulate"], "invalid": ["never valid"]}},
        failure="parallel[0] failed: agent 'never valid' gave no valid structured output",
    ),
    # --- pipeline() -----------------------------------------------------------------------------
    Case(
        "pipeline-stage-arguments",
        "return await pipeline([10, 20], (a, item, i) => [a, item, i], (p, item, i) => [p, item, i])",
        result=[[[10, 10, 0], 10, 0], [[20, 20, 1], 20, 1]],
    ),
    Case(
        "pipeline-null-ends-chain",
        "let calls = 0; const r = await pipeline([1, 2], (x) => x === 1 ? null : x, (x) => { calls++; return x * 10 });"
        " return [r, calls]",
        result=[[None, 20], 1],
    ),
    Case(
        "pipeline-throw-drops-item",
        "let later = 0; const r = await pipeline(['a', 'b'], (x) => { if (x === 'a') throw new Error('nope'); return x },"
        " (x) => { later++; return x + '!' }); return [r, later]",
        result=[[None, "b!"], 1],
        failure="pipeline[0] failed: nope",
    ),
    Case(
        "pipeline-async-stages",
        "return await pipeline(['say-a', 'say-b'], (p) => agent(p), async (t) => t + t)",
        result=["AA", "BB"],
        options=CANNED,
    ),
    Case("pipeline-items-not-array", "await pipeline('abc', (x) => x)", error="pipeline() expects an array of items"),
    Case("pipeline-stage-not-function", "await pipeline([1], 'stage')", error="pipeline() expects stage functions"),
    Case(
        "pipeline-too-many",
        "await pipeline(Array.from({length: 4097}, (_, i) => i), (x) => x)",
        error="pipeline() accepts at most 4096 items, got 4097",
    ),
    Case(
        "pipeline-no-barrier",
        "const order = []; await pipeline([60, 1], (x) => new Promise((r) => setTimeout(() => r(x), x)),"
        " (x) => { order.push('s2:' + x); return x }); return order",
        result=["s2:1", "s2:60"],
    ),
    Case("pipeline-no-stages", "return await pipeline([1, 2, 3])", result=[1, 2, 3]),
    # --- phase(), log(), console ------------------------------------------------------------------
    Case("phase-not-string", "phase(3)", error="phase() expects a non-empty string title"),
    Case("phase-returns", "return phase('Scan') === undefined", result=True),
    Case("console-exists", "console.log('a', 1, {b: 2}); console.warn('w'); return typeof console.debug", result="function"),
    # --- workflow() -----------------------------------------------------------------------------
    Case("workflow-unknown", "await workflow('nope')", error="no saved workflow with that name (available: child"),
    Case("workflow-not-string", "await workflow(5)", error="workflow() expects the name of a saved workflow"),
    Case("workflow-runs-child", "return await workflow('child', {n: 4})", result={"doubled": 8, "kind": "string"}),
    Case("workflow-nesting-limited", "return await workflow('nester')", error="nesting is limited to one level"),
    # --- args -----------------------------------------------------------------------------------
    Case("args-object", "return args", result={"a": [1, 2], "b": {"c": None}}, args={"a": [1, 2], "b": {"c": None}}),
    Case("args-array", "return args.length", result=3, args=[1, "x", True]),
    Case("args-string", "return args + '!'", result="hi!", args="hi"),
    Case("args-absent", "return typeof args", result="undefined"),
    Case("args-null", "return args === null", result=True, args=None),
    Case("args-zero", "return args === 0", result=True, args=0),
    Case("args-real-json", "return Array.isArray(args.list) && args.list[1].k", result="v", args={"list": [0, {"k": "v"}]}),
    # --- determinism ----------------------------------------------------------------------------
    Case("date-now-throws", "Date.now()", error="Date.now() is not available in workflow scripts"),
    Case("math-random-throws", "Math.random()", error="Math.random() is not available in workflow scripts"),
    Case("new-date-throws", "new Date()", error="new Date() without arguments is not available"),
    Case("date-call-throws", "Date()", error="Date() is not available in workflow scripts"),
    Case("new-date-zero-works", "return new Date(0).toISOString()", result="1970-01-01T00:00:00.000Z"),
    Case("date-parse-utc-work", "return [Date.parse('2020-01-01T00:00:00Z'), Date.UTC(2020, 0, 1)]",
         result=[1577836800000, 1577836800000]),
    Case("date-instanceof", "return new Date(5) instanceof Date", result=True),
    Case("eval-unavailable", "return typeof eval", result="undefined"),
    Case("function-constructor-throws", "new Function('return 1')", error="Function constructors are not available"),
    # --- return values and errors -------------------------------------------------------------------
    Case("return-undefined-is-null", "const x = 1", result=None),
    Case("return-function-fails", "return () => 1", error="not JSON-serializable: result is a function"),
    Case("return-nested-function-fails", "return {a: {f() {}}}", error="result.a.f is a function"),
    Case("return-cycle-fails", "const a = {}; a.self = a; return a", error="result.self is a cycle"),
    Case("return-bigint-fails", "return {n: 10n}", error="result.n is a BigInt"),
    Case("return-nested-undefined-dropped", "return {a: undefined, b: [undefined]}", result={"b": [None]}),
    Case("top-level-await-return", "const v = await Promise.resolve(41); return v + 1", result=42),
    Case("uncaught-error-fails", "\n\nthrow new RangeError('out of range')", error="RangeError: out of range (line 3"),
    Case("uncaught-non-error", "throw 'plain'", error="uncaught non-Error value: plain"),
    Case("deadlock-detected", "await new Promise(() => {})", error="waiting for a promise that can never settle"),
    # --- timers ---------------------------------------------------------------------------------
    Case("set-timeout-fires", "return await new Promise((r) => setTimeout((a, b) => r(a + b), 5, 2, 3))", result=5),
    Case(
        "clear-timeout-prevents",
        "let fired = false; const t = setTimeout(() => { fired = true }, 20); clearTimeout(t);"
        " await new Promise((r) => setTimeout(r, 40)); return fired",
        result=False,
    ),
    Case("set-timeout-needs-function", "setTimeout('code', 1)", error="setTimeout() expects a function"),
    Case(
        "timer-callback-error-is-logged",
        "setTimeout(() => { throw new Error('tick') }, 1); await new Promise((r) => setTimeout(r, 10)); return 'ok'",
        result="ok",
    ),
]

CHILD = """export const meta = {name: 'child', description: 'doubles n'}
const t = await agent('child agent ' + args.n)
return {doubled: args.n * 2, kind: typeof t}
"""
NESTER = """export const meta = {name: 'nester', description: 'tries to nest'}
return await workflow('child', {n: 1})
"""


async def events_of(engine: Engine, run_id: str) -> list[EventRecord]:
    """Every event of the run, through the engine (from the store once the run has ended)."""
    return [event async for event in engine.follow(run_id)]


async def run_script(
    script: str, *, options: dict[str, Any] | None = None, args: Any = ABSENT, engine: Engine | None = None
) -> tuple[RunRecord, Engine]:
    async def go(eng: Engine) -> RunRecord:
        record = await eng.submit(
            RunRequest(script=script, options=options, args=None if args is ABSENT else args, has_args=args is not ABSENT)
        )
        return await eng.wait(record.id)

    if engine is not None:
        return await go(engine), engine
    async with Engine(load_settings(), MemoryStore(), recover=False) as eng:
        await eng.save_workflow(CHILD)
        await eng.save_workflow(NESTER)
        return await go(eng), eng


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_script_api(case: Case) -> None:
    with anyio.fail_after(20):
        record, _ = await run_script(case.script, options=case.options, args=case.args)
    if case.error is not None:
        assert record.status == "failed", f"expected failure, got {record.status}: {record.result!r}"
        assert case.error in record.error["message"], record.error
    else:
        assert record.status == "completed", record.error
        assert record.result == case.result
    if case.warning is not None:
        assert any(case.warning in w for w in record.usage["warnings"]), record.usage["warnings"]
    if case.failure is not None:
        assert any(case.failure in f for f in record.usage["failures"]), record.usage["failures"]


def test_the_table_covers_the_spec() -> None:
    assert len(CASES) >= 60


# --- rules that need more than a result ---------------------------------------------------------


async def test_default_label_and_explicit_phase() -> None:
    script = """phase('Scan')
await agent('  look   at\\n this  ' + 'x'.repeat(80))
await agent('y', {label: 'custom', phase: 'Other'})
await agent('z')"""
    with anyio.fail_after(10):
        async with Engine(load_settings(), MemoryStore(), recover=False) as engine:
            record = await engine.submit(RunRequest(script=script))
            await engine.wait(record.id)
            calls = await engine.list_agents(record.id)
    assert calls[0].label == "look at this " + "x" * 47
    assert (calls[0].phase, calls[1].label, calls[1].phase, calls[2].phase) == ("Scan", "custom", "Other", "Scan")


async def test_what_a_script_started_and_never_awaited_does_not_hold_up_its_end() -> None:
    # A slow agent, a child workflow and a timer an hour away, none awaited: the run ends when
    # the script returns, and stops what is in flight (the child is cancelled before its agent).
    script = "agent('slow one'); workflow('child', {n: 1}); setTimeout(() => {}, 3600000); return 'early'"
    with anyio.fail_after(10):
        async with Engine(load_settings(), MemoryStore(), recover=False) as engine:
            await engine.save_workflow(CHILD)
            record = await engine.submit(RunRequest(script=script, options={"simulate": {"latency_ms": 60_000}}))
            record = await engine.wait(record.id)
            calls = await engine.list_agents(record.id)
    assert (record.status, record.result) == ("completed", "early")
    assert [(c.prompt, c.status) for c in calls] == [("slow one", "stopped")]


async def test_a_runs_context_is_freed_by_the_run_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # The final slice leaves the context to the run (freeing it holds the GIL), which frees it
    # once and never leaks it. (That it does so while a slow store saves the run's end:
    # test_store_writer.py.)
    closes: list[bool] = []
    close = sandbox_isolate.Isolate.close

    def recording_close(self: sandbox_isolate.Isolate) -> None:
        closes.append(self._retired is not None)
        close(self)
        assert self._retired is None and self.closed

    monkeypatch.setattr(sandbox_isolate.Isolate, "close", recording_close)
    with anyio.fail_after(10):
        async with Engine(load_settings(), MemoryStore(), recover=False) as engine:
            record = await engine.submit(RunRequest(script="return await agent('x')"))
            assert (await engine.wait(record.id)).status == "completed"
            await anyio.wait_all_tasks_blocked()
    assert closes[0] and not any(closes[1:])  # the first close frees it, later ones find nothing


@pytest.mark.parametrize(
    ("prompt", "label"),
    [
        ("", ""),
        (" \t\n ", ""),
        ("\u3000 wide\u00a0space\u2028line ", "wide space line"),
        ("a" * 59 + "  b", "a" * 59 + " "),
        ("a" * 58 + "\n\nb c", "a" * 58 + " b"),
        ("word " * 5000, "word " * 12),
    ],
)
def test_default_label_collapses_whitespace_and_keeps_60_characters(prompt: str, label: str) -> None:
    assert default_label(prompt) == label


async def test_meta_phases_and_no_phase_group() -> None:
    script = """export const meta = {name: 'p', description: 'd', phases: [{title: 'First'}, {title: 'Second'}]}
await agent('outside')
phase('Second')
await agent('inside')"""
    with anyio.fail_after(10):
        record, _ = await run_script(script)
    phases = {p["title"]: p for p in record.usage["phases"]}
    assert list(phases) == ["First", "Second", "(no phase)"]
    assert phases["Second"]["agents"]["completed"] == 1
    assert phases["(no phase)"]["agents"]["completed"] == 1
    assert phases["First"]["agents"] == {}


async def test_log_events_and_console_prefixes() -> None:
    script = "log({a: 1}); log('plain'); console.warn('careful'); console.error('bad'); console.log('x', 2)"
    with anyio.fail_after(10):
        async with Engine(load_settings(), MemoryStore(), recover=False) as engine:
            record = await engine.submit(RunRequest(script=script))
            await engine.wait(record.id)
            messages = [e.data["message"] for e in await events_of(engine, record.id) if e.type == "log"]
    assert messages == ['{"a":1}', "plain", "[warn] careful", "[error] bad", "x 2"]


async def test_log_is_truncated_after_ten_thousand_lines() -> None:
    script = "for (let i = 0; i < 10050; i++) log('line ' + i); return 'done'"
    with anyio.fail_after(30):
        async with Engine(load_settings(), MemoryStore(), recover=False) as engine:
            record = await engine.submit(RunRequest(script=script))
            record = await engine.wait(record.id)
            logs = [e.data["message"] for e in await events_of(engine, record.id) if e.type == "log"]
    assert record.result == "done"
    assert len(logs) == 10_001
    assert logs[9_999] == "line 9999"
    assert "log truncated" in logs[10_000]


async def test_structured_output_retries_feed_the_error_back() -> None:
    script = f"return await agent('flaky', {{schema: {SCHEMA_N5}}})"
    with anyio.fail_after(10):
        async with Engine(load_settings(), MemoryStore(), recover=False) as engine:
            record = await engine.submit(
                RunRequest(script=script, options={"simulate": {"invalid": ["flaky"], "invalid_attempts": 2}})
            )
            await engine.wait(record.id)
            events = await events_of(engine, record.id)
            (call,) = await engine.list_agents(record.id)
    retries = [e.data for e in events if e.type == "agent.retrying"]
    assert [r["attempt"] for r in retries] == [2, 3]
    assert all("'n' is a required property" in r["reason"] for r in retries)
    assert call.attempts == 3 and call.output == {"n": 5}


async def test_agent_failure_is_recorded() -> None:
    with anyio.fail_after(10):
        async with Engine(load_settings(), MemoryStore(), recover=False) as engine:
            record = await engine.submit(
                RunRequest(script="return await agent('boom')", options={"simulate": {"fail": ["boom"]}})
            )
            record = await engine.wait(record.id)
            events = await events_of(engine, record.id)
    failed = [e.data for e in events if e.type == "agent.failed"]
    assert record.result is None
    assert len(failed) == 1 and "simulated failure" in failed[0]["error"]
    assert record.usage["agents"]["failed"] == 1


async def test_many_agents_warning_and_agent_cap_count() -> None:
    script = "const r = await parallel(Array.from({length: 40}, (_, i) => () => agent('t' + i))); return r.length"
    with anyio.fail_after(10):
        record, _ = await run_script(script, options={"max_agents": 30})
    assert record.result == 40
    assert record.usage["agents"]["total"] == 30
    assert any("more than 25 agents" in w for w in record.usage["warnings"])
    assert sum("agent cap reached" in f for f in record.usage["failures"]) == 10


async def test_rejected_script_never_becomes_a_run() -> None:
    with anyio.fail_after(10):
        async with Engine(load_settings(), MemoryStore(), recover=False) as engine:
            with pytest.raises(ScriptRejected) as info:
                await engine.submit(RunRequest(script="const x: number = 1"))
            assert await engine.store.list_runs() == []
    diagnostic = info.value.diagnostics[0]
    assert (diagnostic.line, diagnostic.column) == (1, 8)
    assert "TypeScript syntax is not supported" in diagnostic.message


async def test_the_checks_of_a_script_seen_recently_are_reused() -> None:
    # Services resubmit the same workflow with new args: its checks (parse, compile) are kept.
    with anyio.fail_after(10):
        async with Engine(load_settings(), MemoryStore(), recover=False) as engine:
            first = await engine.check_async("return 1")
            assert await engine.check_async("return 1") is first
            assert await engine.check_async("return 2") is not first
            assert engine.check("return 1", require_meta=True) is not first  # another question
            rejected = await engine.check_async("const x: number = 1")
            assert not rejected.ok and await engine.check_async("const x: number = 1") is rejected
            with pytest.raises(ScriptRejected):  # a cached rejection still rejects
                await engine.submit(RunRequest(script="const x: number = 1"))
            big = "return 1 // " + "x" * CHECKED_SCRIPT_CHARS  # too long to keep
            assert (await engine.check_async(big)).ok
            assert await engine.check_async(big) is not await engine.check_async(big)
            for n in range(CHECKED_SCRIPTS):  # the least recently used goes first
                await engine.check_async(f"return {n + 10}")
            assert await engine.check_async("return 1") is not first


async def test_pipeline_items_stream_through_a_full_queue() -> None:
    # Two slots, eight items, three stages: the first two items keep their slots through their
    # stages, so the first item is done before the last item even starts its first stage.
    script = """return await pipeline([0, 1, 2, 3, 4, 5, 6, 7],
  (i) => agent(`item ${i} stage 0`, {label: `i${i}-s0`}),
  (_, i) => agent(`item ${i} stage 1`, {label: `i${i}-s1`}),
  (_, i) => agent(`item ${i} stage 2`, {label: `i${i}-s2`}))"""
    with anyio.fail_after(20):
        async with Engine(load_settings(), MemoryStore(), recover=False) as engine:
            record = await engine.submit(
                RunRequest(script=script, options={"concurrency": 2, "simulate": {"latency_ms": 5}})
            )
            record = await engine.wait(record.id)
            events = [(e.type, e.data.get("label")) for e in await events_of(engine, record.id)]
    assert record.status == "completed" and len(record.result) == 8
    assert events.index(("agent.completed", "i0-s2")) < events.index(("agent.started", "i7-s0"))


def pipeline_script(items: int, stages: int) -> str:
    """Items 0 to ``items - 1`` through ``stages`` stages; each call labelled ``i<item>-s<stage>``."""
    calls = ",\n".join(f"  (_, __, i) => agent(`item ${{i}} stage {s}`, {{label: `i${{i}}-s{s}`}})" for s in range(stages))
    return f"return await pipeline([...Array({items}).keys()],\n{calls})"


async def start_order(script: str, options: dict[str, Any]) -> tuple[RunRecord, list[str]]:
    """The run of ``script`` and the labels of its agents in start order."""
    with anyio.fail_after(20):
        async with Engine(load_settings(), MemoryStore(), recover=False) as engine:
            record = await engine.submit(RunRequest(script=script, options=options))
            record = await engine.wait(record.id)
            started = [str(e.data.get("label")) for e in await events_of(engine, record.id) if e.type == "agent.started"]
    return record, started


async def test_after_the_streaming_items_the_longest_chains_start_first() -> None:
    # One slot, four items, three stages. Item 0 streams: its stages run back to back. Then
    # every other item's first stage runs before any later stage: the run then ends on calls
    # that do not wait for each other (``scheduling.queue_priority``).
    record, started = await start_order(pipeline_script(4, 3), {"concurrency": 1, "simulate": {"latency_ms": 30}})
    assert record.status == "completed" and len(record.result) == 4
    assert started[:6] == ["i0-s0", "i0-s1", "i0-s2", "i1-s0", "i2-s0", "i3-s0"]
    assert sorted(started[6:], key=lambda label: label[-1]) == started[6:]  # stage 1s, then stage 2s


async def test_a_long_pipeline_finishes_its_items_round_by_round() -> None:
    # One slot: item 0 streams; the items after it go in rounds of two (items 1-2, items 3-4),
    # the last round taking the one left over (items 5-7). Items 0-4 finish before any call of
    # items 5-7 starts: a long pipeline's later items do not all wait for its end.
    record, started = await start_order(pipeline_script(8, 2), {"concurrency": 1, "simulate": {"latency_ms": 50}})
    assert record.status == "completed" and len(record.result) == 8
    assert sorted(label[1] for label in started[:10]) == sorted("0011223344")
    assert started[10:13] == ["i5-s0", "i6-s0", "i7-s0"]  # within a round, most stages ahead first


async def test_calls_with_more_stages_ahead_go_first_across_pipelines() -> None:
    # A four-stage pipeline beside a one-stage one, two slots: item 2 of the long one (past the
    # streaming items) runs its stages between the short one's calls, not after all of them,
    # where it would end the run alone with a slot idle.
    script = """const [a, b] = await Promise.all([
  pipeline([0, 1, 2], ...[0, 1, 2, 3].map((s) => (_, __, i) => agent(`long ${i} stage ${s}`, {label: `L${i}s${s}`}))),
  pipeline([0, 1, 2, 3, 4, 5, 6, 7, 8, 9], (i) => agent(`short ${i}`, {label: `S${i}`}))])
return [a.length, b.length]"""
    record, started = await start_order(script, {"concurrency": 2, "simulate": {"latency_ms": 30}})
    assert record.result == [3, 10]
    assert started.index("L2s1") < started.index("S9")


async def test_a_run_with_a_budget_finishes_items_before_starting_others() -> None:
    # With a token budget the queue turns around, fewest stages ahead first: tokens spent when
    # the budget runs out went to items that finished. One slot, item 0 streams; item 1's
    # second stage then goes before item 3's first.
    record, started = await start_order(pipeline_script(4, 3), {
        "concurrency": 1, "budget_tokens": 1_000_000, "simulate": {"latency_ms": 50}})
    assert record.status == "completed" and len(record.result) == 4
    assert started[:5] == ["i0-s0", "i0-s1", "i0-s2", "i1-s0", "i2-s0"]
    assert started.index("i1-s1") < started.index("i3-s0")


async def test_a_fan_out_past_its_budget_starts_at_most_two_more_turns_of_agents() -> None:
    # Zero-latency agents spend their tokens while the workers run, between the driver's turns
    # of queueing a slice's requests: past the budget, about a turn's worth still start (12 of
    # 16 here). The bound leaves a second turn for a worker too slow to run 16 calls in its own
    # 2 ms turn; a run without a budget queues 64 a turn and would start 64.
    script = "return (await parallel(Array.from({length: 400}, (_, i) => () => agent(`a${i}`)))).length"
    options = {"concurrency": 64, "budget_tokens": 200, "simulate": {"output_tokens": 10}}
    with anyio.fail_after(20):
        async with Engine(load_settings(), MemoryStore(), recover=False) as engine:
            record = await engine.wait((await engine.submit(RunRequest(script=script, options=options))).id)
            started = [e for e in await events_of(engine, record.id) if e.type == "agent.started"]
    assert record.status == "completed"
    assert 20 <= len(started) <= 20 + 2 * AGENTS_FIRST_TURN


async def start_order_of_two_stages(options: dict[str, Any]) -> tuple[RunRecord, list[str]]:
    """Three items through two stages on one slot: the run, and the labels in start order."""
    return await start_order(pipeline_script(3, 2), {"concurrency": 1, **options})


async def test_only_the_first_items_hold_their_slot_for_the_next_stage() -> None:
    # One slot: item 0, among the first `concurrency` items, keeps it for its second stage.
    # Item 1 does not: the slot goes straight to item 2's first stage, queued meanwhile, instead
    # of idling until the script asks for item 1's second stage.
    record, started = await start_order_of_two_stages({"simulate": {"latency_ms": 20}})
    assert record.status == "completed" and len(record.result) == 3
    assert started[:4] == ["i0-s0", "i0-s1", "i1-s0", "i2-s0"]


async def test_near_instant_pipeline_calls_do_not_hold_their_slot() -> None:
    # Holding a slot for an item's next stage costs a commit and a slice; after a call that
    # answered at once that wait would only idle the slot, so the worker takes the next item.
    record, started = await start_order_of_two_stages({})
    assert record.status == "completed" and len(record.result) == 3
    assert started[:3] == ["i0-s0", "i1-s0", "i2-s0"]


async def test_calls_queued_while_others_execute_take_the_free_slots() -> None:
    # Two calls run; two more arrive while they do. Concurrency 4 leaves two slots free, so the
    # late ones start at once rather than after the first two finish.
    script = """const first = [agent('a', {label: 'a'}), agent('b', {label: 'b'})]
await new Promise((resolve) => setTimeout(resolve, 10))
const second = [agent('c', {label: 'c'}), agent('d', {label: 'd'})]
return (await Promise.all([...first, ...second])).length"""
    with anyio.fail_after(20):
        async with Engine(load_settings(), MemoryStore(), recover=False) as engine:
            record = await engine.submit(
                RunRequest(script=script, options={"concurrency": 4, "simulate": {"latency_ms": 1000}})
            )
            record = await engine.wait(record.id)
            calls = {call.label: call for call in await engine.store.list_calls(record.id)}
    assert record.result == 4
    first_finished = min(calls[label].finished_at or 0.0 for label in "ab")
    assert all((calls[label].started_at or 1e18) < first_finished for label in "cd")


async def test_calls_that_await_all_start_at_once() -> None:
    # Six calls queued together at concurrency 4: the first four run side by side (none waits
    # for another to finish), the other two as slots free up.
    script = "return (await parallel([0, 1, 2, 3, 4, 5].map((i) => () => agent(`call ${i}`, {label: `c${i}`})))).length"
    with anyio.fail_after(20):
        async with Engine(load_settings(), MemoryStore(), recover=False) as engine:
            record = await engine.submit(
                RunRequest(script=script, options={"concurrency": 4, "simulate": {"latency_ms": 300}})
            )
            record = await engine.wait(record.id)
            calls = sorted(await engine.store.list_calls(record.id), key=lambda c: c.started_at or 0.0)
    assert record.result == 6
    first_finished = min(c.finished_at or 1e18 for c in calls)
    assert [c.started_at is not None and c.started_at < first_finished for c in calls] == [True] * 4 + [False] * 2


class TaskRecordingBackend(SimulateBackend):
    """The simulate backend, noting which task executes each call."""

    def __init__(self) -> None:
        super().__init__()
        self.tasks: set[asyncio.Task[Any]] = set()

    async def call(self, request: AgentRequest) -> AgentResult:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        return await super().call(request)


async def test_the_simulate_backend_answers_at_once_only_what_its_call_would_answer(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The dispatcher asks answer_now() first: it must give call()'s answer, or step aside.
    backend = SimulateBackend()
    request = AgentRequest("r", 0, "summarise the report", "summary")
    now = backend.answer_now(request)
    assert now is not None and now == await backend.call(request)
    assert backend.executions == 2  # counted either way
    for shaped in (AgentRequest("r", 1, "p", settings={"latency_ms": 5}),
                   AgentRequest("r", 2, "p", schema={"type": "object"}),
                   AgentRequest("r", 3, "p", settings={"fail": ["p"]})):
        assert backend.answer_now(shaped) is None
    assert TaskRecordingBackend().answer_now(request) is None  # its own call() is asked instead
    patched = SimulateBackend()
    patched.call = TaskRecordingBackend().call  # type: ignore[method-assign]
    assert patched.answer_now(request) is None
    assert SimulateBackend(record_path=Path("/nonexistent/calls.jsonl")).answer_now(request) is None
    assert backend.executions == 2
    monkeypatch.setattr(SimulateBackend, "call", TaskRecordingBackend.call)  # patched on the class
    assert backend.answer_now(request) is None


async def test_a_burst_of_calls_that_answer_at_once_keeps_few_workers_busy() -> None:
    # Calls that never await cannot run side by side: a worker for each of 64 slots would only
    # be woken to find the queue empty again. Two take turns instead.
    backend = TaskRecordingBackend()
    script = "return (await parallel(Array.from({length: 300}, (_, i) => () => agent(`call ${i}`)))).length"
    with anyio.fail_after(20):
        async with Engine(load_settings(), MemoryStore(), backends={"simulate": backend}, recover=False) as engine:
            record = await engine.submit(RunRequest(script=script, options={"concurrency": 64}))
            record = await engine.wait(record.id)
    assert record.result == 300
    assert 1 <= len(backend.tasks) <= 2


class HeldJournal(MemoryStore):
    """A store whose journal entries stay uncommitted until ``release()``."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[Any] = []

    def journal_call(self, call: Any, done: Any) -> None:
        self.held.append((call, done))

    def release(self) -> None:
        held, self.held = self.held, []
        for call, done in held:
            super().journal_call(call, done)


async def test_a_run_executes_at_most_its_window_ahead_of_the_journal() -> None:
    # With no commit coming back, a run executes CALLS_AHEAD_OF_JOURNAL x concurrency calls (the
    # most a crash could make run again) and waits; the rest run once the entries are durable.
    # Calls that take a while: both slots execute at once, and both count.
    store, backend = HeldJournal(), SimulateBackend()
    script = "return (await parallel(Array.from({length: 40}, (_, i) => () => agent(`call ${i}`)))).length"
    with anyio.fail_after(20):
        async with Engine(load_settings(), store, backends={"simulate": backend}, recover=False) as engine:
            record = await engine.submit(
                RunRequest(script=script, options={"concurrency": 2, "simulate": {"latency_ms": 20}})
            )
            while len(store.held) < CALLS_AHEAD_OF_JOURNAL * 2:
                await anyio.sleep(0.01)
            await anyio.sleep(0.2)  # anything further would run now
            assert backend.executions == len(store.held) == CALLS_AHEAD_OF_JOURNAL * 2
            while not (await engine.get_run(record.id)).status == "completed":
                store.release()
                await anyio.sleep(0.01)
            record = await engine.wait(record.id)
    assert record.result == 40 and backend.executions == 40


class SlowRunSaves(MemoryStore):
    """A store whose run records take a while to save, as they do through SQLite's writer."""

    async def save_run(self, run: RunRecord) -> None:
        await anyio.sleep(0.02)
        await super().save_run(run)


async def test_a_pause_that_lands_while_a_resume_is_saved_keeps_the_run_paused() -> None:
    # resume() and pause() each wait for the run's record to be saved: a pause that comes in
    # meanwhile must leave the run paused for good, not show "paused" while calls keep starting.
    backend = SimulateBackend()
    script = "return (await parallel(Array.from({length: 8}, (_, i) => () => agent(`call ${i}`)))).length"
    with anyio.fail_after(20):
        async with Engine(load_settings(), SlowRunSaves(), backends={"simulate": backend}, recover=False) as engine:
            record = await engine.submit(
                RunRequest(script=script, options={"concurrency": 2, "simulate": {"latency_ms": 150}})
            )
            await anyio.sleep(0.1)
            await engine.pause(record.id)
            async with anyio.create_task_group() as tg:
                tg.start_soon(engine.resume, record.id)
                await anyio.sleep(0.005)
                tg.start_soon(engine.pause, record.id)
            await anyio.sleep(0.2)  # calls started in the 5 ms the gate was open have ended
            executed = backend.executions
            await anyio.sleep(0.4)
            assert (await engine.get_run(record.id)).status == "paused"
            assert backend.executions == executed, "calls started while the run showed paused"
            await engine.resume(record.id)
            record = await engine.wait(record.id)
    assert record.status == "completed" and record.result == 8


class GatedFirstSave(MemoryStore):
    """A store that holds the first run record it is given, and every run record after it, in
    order, until ``release()``."""

    def __init__(self) -> None:
        super().__init__()
        self.gated: str | None = None  # the id of the run whose save waits
        self._held: list[tuple[RunRecord, Callable[[BaseException | None], None]]] | None = None
        self._released = anyio.Event()

    def save_run_soon(self, run: RunRecord, done: Callable[[BaseException | None], None]) -> None:
        if self.gated is None:
            self.gated, self._held = run.id, []
        if self._held is not None:
            self._held.append((run, done))
        else:
            super().save_run_soon(run, done)

    async def save_run(self, run: RunRecord) -> None:
        if self._held is not None:
            await self._released.wait()
        await super().save_run(run)

    def release(self) -> None:
        held, self._held = self._held or [], None
        for run, done in held:
            super().save_run_soon(run, done)
        self._released.set()


async def submit_behind_the_gate(engine: Engine, store: GatedFirstSave, request: RunRequest,
                                 meanwhile: Callable[[], Awaitable[None]]) -> tuple[RunRecord, RunRecord]:
    """Submit while ``store`` holds the run's record back, let it through once ``meanwhile``
    returns: the record submit() returned, and the run's final one."""
    submitted: list[RunRecord] = []

    async def submit() -> None:
        submitted.append(await engine.submit(request))

    async with anyio.create_task_group() as tg:
        tg.start_soon(submit)
        await meanwhile()
        assert not submitted, "submit() returned before the run's record was saved"
        store.release()
    return submitted[0], await engine.wait(submitted[0].id)


async def nothing_stored_for_the_gated_run(store: GatedFirstSave) -> None:
    assert store.gated is not None and await store.list_runs() == []
    assert await store.read_events(store.gated) == []


async def test_a_runs_first_slice_runs_while_its_record_is_saved_and_nothing_else_happens_before() -> None:
    # A run starts as it is saved: its first slice writes nothing. What the script asked for
    # (an agent, a log line) waits until the run's record is durable.
    store, backend = GatedFirstSave(), SimulateBackend()

    async def after_the_first_slice() -> None:
        while not (engine.pool.statistics().slices_total and not engine.pool.statistics().running):
            await anyio.sleep(0.001)
        await anyio.sleep(0.05)  # anything the slice asked for would happen now
        assert backend.executions == 0
        await nothing_stored_for_the_gated_run(store)

    with anyio.fail_after(20):
        async with Engine(load_settings(), store, backends={"simulate": backend}, recover=False) as engine:
            _, record = await submit_behind_the_gate(
                engine, store, RunRequest(script="log('hi'); return await agent('a')"), after_the_first_slice)
    assert record.status == "completed" and backend.executions == 1
    types = [event.type for event in await store.read_events(record.id)]
    assert types[:3] == ["run.queued", "run.started", "log"]


async def test_a_run_whose_deadline_passes_while_its_record_is_saved_is_saved_and_fails() -> None:
    # The deadline cancels the run while its first record is still being saved: that save must
    # go on (the submitter gets the record, not a cancellation), and the run ends as timed out.
    store = GatedFirstSave()

    async def past_the_deadline() -> None:
        await anyio.sleep(0.3)

    with anyio.fail_after(20):
        async with Engine(load_settings(), store, recover=False) as engine:
            submitted, record = await submit_behind_the_gate(
                engine, store, RunRequest(script="return await agent('a')", options={"timeout_s": 0.05}),
                past_the_deadline)
    assert submitted.status == "queued"
    assert record.status == "failed" and record.error is not None and record.error["name"] == "timeout"
    assert (await store.get_run(record.id)) == record
    types = [event.type for event in await store.read_events(record.id)]
    assert types[0] == "run.queued" and types[-1] == "run.failed"


async def test_a_run_that_crashes_while_its_record_is_saved_is_recorded_after_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A bug in the first slice ends the run as crashed, but only once its first record is
    # saved: a failed record written first would be overwritten by the queued one, and the run
    # recovered and run again at the next start.
    def crash(self: Any, body: str, config: Any) -> Any:
        raise RuntimeError("a bug in the first slice")

    monkeypatch.setattr(sandbox_isolate.Isolate, "start", crash)
    store = GatedFirstSave()

    async def after_the_crash() -> None:
        await anyio.sleep(0.2)
        await nothing_stored_for_the_gated_run(store)

    with anyio.fail_after(20):
        async with Engine(load_settings(), store, recover=False) as engine:
            _, record = await submit_behind_the_gate(engine, store, RunRequest(script="return 1"), after_the_crash)
    assert record.status == "failed" and (await store.get_run(record.id)) == record
    types = [event.type for event in await store.read_events(record.id)]
    assert types[0] == "run.queued" and types[-1] == "run.failed"


async def test_a_store_that_closes_while_a_run_is_saved_leaves_no_error_to_the_loop(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # The service stops while a new run's record waits at SQLite's lock: the record is committed
    # as the store closes, and the run's start can no longer be recorded. That is logged, not
    # raised in an event-loop callback.
    path = tmp_path / "q.db"
    store = await SQLiteStore.open(path)
    lock = WriteLock(path)
    submitted: list[RunRecord] = []
    try:
        with anyio.fail_after(20):
            async with anyio.create_task_group() as outer:
                async with Engine(load_settings(), store, recover=False) as engine:
                    await lock.acquire()

                    async def submit() -> None:
                        submitted.append(await engine.submit(RunRequest(script="return 1")))

                    outer.start_soon(submit)
                    await anyio.sleep(0.1)
                outer.start_soon(store.aclose)
                await anyio.sleep(0.05)
                await lock.release()
    finally:
        await lock.aclose()
    assert [record.status for record in submitted] == ["queued"]
    assert any("its start could not be recorded" in r.getMessage() for r in caplog.records)


async def test_a_run_whose_start_cannot_be_announced_still_goes_on() -> None:
    # Announcing a saved run (its run.queued event) is a callback of the save: whatever goes
    # wrong there, the submitter and the run must not be left waiting for it.

    class FailingAnnouncement(MemoryStore):
        def append_events(self, events: Sequence[EventRecord]) -> None:
            if any(event.type == "run.queued" for event in events):
                raise ValueError("a bug while announcing the run")
            super().append_events(events)

    with anyio.fail_after(10):
        async with Engine(load_settings(), FailingAnnouncement(), recover=False) as engine:
            record = await engine.wait((await engine.submit(RunRequest(script="return await agent('a')"))).id)
    assert record.status == "completed"


async def test_a_run_submitted_to_a_stopped_engine_is_not_saved() -> None:
    store = MemoryStore()
    async with Engine(load_settings(), store, recover=False) as engine:
        pass
    with pytest.raises(RuntimeError, match="not running"):
        await engine.submit(RunRequest(script="return 1"))
    assert await store.list_runs() == []


@pytest.mark.parametrize("turns", [0, 1, 2, 3])
async def test_a_pause_right_after_the_start_is_what_the_store_keeps(tmp_path: Path, turns: int) -> None:
    # The running record is saved without holding the run up. A pause that comes in before
    # that save is queued must still be the last word in the store: after a crash, a run the
    # store showed running would be recovered and start its agents.
    store = await SQLiteStore.open(tmp_path / "q.db")
    try:
        with anyio.fail_after(20):
            async with Engine(load_settings(), store, recover=False) as engine:
                record = await engine.submit(RunRequest(script="return await agent('a')",
                                                        options={"simulate": {"latency_ms": 300}}))
                for _ in range(turns):
                    await asyncio.sleep(0)
                run = engine.live(record.id)
                assert run is not None
                while run.status.value == "queued":
                    await asyncio.sleep(0)
                await engine.pause(record.id)
                await anyio.sleep(0.2)  # every save queued so far is committed
                stored = await store.get_run(record.id)
                assert stored is not None and stored.status == "paused"
                await engine.resume(record.id)
                record = await engine.wait(record.id)
    finally:
        await store.aclose()
    assert record.status == "completed"


async def test_two_requests_with_one_idempotency_key_at_once_get_one_run(tmp_path: Path) -> None:
    # Both pass the lookup, and the second record's save fails on the key. Its run had started
    # meanwhile: it must not run an agent or write a row, and its submitter gets the run that
    # was saved, as a request with that key after it would.
    backend = SimulateBackend()
    store = await SQLiteStore.open(tmp_path / "q.db")
    saved: list[RunRecord] = []
    script = "return await agent('only one of us')"
    run_ids: list[str] = []

    class NotingStore:
        """The store, noting the id of every run record it is asked to save (SQLiteStore's
        methods cannot be replaced on it: it may be compiled)."""

        def __getattr__(self, name: str) -> Any:
            return getattr(store, name)

        def save_run_soon(self, run: RunRecord, done: Callable[[BaseException | None], None]) -> None:
            run_ids.append(run.id)
            store.save_run_soon(run, done)

    try:
        with anyio.fail_after(20):
            async with Engine(load_settings(), NotingStore(), backends={"simulate": backend},  # type: ignore[arg-type]
                              recover=False) as engine:

                async def submit() -> None:
                    saved.append(await engine.submit(RunRequest(script=script, idempotency_key="same")))

                async with anyio.create_task_group() as tg:
                    tg.start_soon(submit)
                    tg.start_soon(submit)
                assert len({record.id for record in saved}) == 1 and len(set(run_ids)) == 2
                record = await engine.wait(saved[0].id)
                await anyio.sleep(0.1)  # what the discarded run might still write
                discarded = next(run_id for run_id in run_ids if run_id != record.id)
                assert [run.id for run in await store.list_runs()] == [record.id]
                assert await store.read_events(discarded) == [] and await store.list_calls(discarded) == []
                assert engine.live(discarded) is None
                with pytest.raises(Conflict, match="different script"):
                    await engine.submit(RunRequest(script="return 2", idempotency_key="same"))
        assert record.status == "completed" and backend.executions == 1
    finally:
        await store.aclose()


async def test_a_follower_behind_when_the_run_ends_still_gets_every_event() -> None:
    # An ended run hands its events over to the store; a follower that was still working through
    # them must carry on from the store, up to run.completed.
    with anyio.fail_after(10):
        async with Engine(load_settings(), MemoryStore(), recover=False) as engine:
            record = await engine.submit(RunRequest(script="await agent('a'); await agent('b'); return 1"))
            async with aclosing(engine.follow(record.id)) as events:
                first = await anext(events)  # from memory, while the run is live
                await engine.wait(record.id)  # the run ends, and is archived, meanwhile
                rest = [event async for event in events]
    seqs = [first.seq, *(event.seq for event in rest)]
    assert seqs == list(range(1, len(seqs) + 1))
    assert [e.type for e in rest].count("agent.completed") == 2
    assert rest[-1].type == "run.completed"


async def test_a_finished_runs_history_is_read_from_the_store_a_page_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    # A follower of a long finished run gets its history as it is read, page by page, not once
    # all of it is in memory: from the archived log, and from a process that never drove the run.
    monkeypatch.setattr(followers, "STORED_EVENTS_PAGE", 3)
    store = MemoryStore()
    pages: list[int] = []
    read_events = store.read_events

    async def read_a_page(run_id: str, after_seq: int = 0, limit: int | None = None) -> list[EventRecord]:
        page = await read_events(run_id, after_seq, limit)
        pages.append(len(page))
        return page

    monkeypatch.setattr(store, "read_events", read_a_page)
    script = "await parallel([1, 2, 3, 4].map((i) => () => agent(`a${i}`))); return 1"
    with anyio.fail_after(10):
        async with Engine(load_settings(), store, recover=False) as engine:
            record = await engine.wait((await engine.submit(RunRequest(script=script))).id)
            run = engine.live(record.id)
            assert run is not None
            while not run.archived:
                await anyio.sleep(0.001)
            archived = [event.seq async for event in engine.follow(record.id)]
        async with Engine(load_settings(), store, recover=False) as engine:
            stored = [event async for event in engine.follow(record.id)]
    assert [event.seq for event in stored] == archived == list(range(1, len(stored) + 1))
    assert len(stored) > 12 and stored[-1].type == "run.completed"
    assert max(pages) == 3 and len(pages) >= 2 * (len(stored) // 3)  # both followers paged


async def test_a_call_whose_result_is_being_journaled_cannot_be_stopped_or_restarted(tmp_path: Path) -> None:
    # It has finished: a stop would be accepted and then ignored, and the script would get the
    # result anyway. The refusal says why.
    path = tmp_path / "q.db"
    store = await SQLiteStore.open(path)
    lock = WriteLock(path)
    try:
        with anyio.fail_after(20):
            async with Engine(load_settings(), store, recover=False) as engine:
                record = await engine.submit(RunRequest(script="return await agent('a')",
                                                        options={"simulate": {"latency_ms": 200}}))
                async for event in engine.follow(record.id):
                    if event.type == "agent.started":
                        break
                await lock.acquire()  # the call's journal entry now waits at BEGIN
                run = engine.live(record.id)
                assert run is not None
                while run.calls[0].finished_at is None:
                    await anyio.sleep(0.01)
                for control in (engine.stop_agent, engine.restart_agent):
                    with pytest.raises(InvalidAgentState, match="finished, its result being journaled"):
                        await control(record.id, 0)
                await lock.release()
                record = await engine.wait(record.id)
    finally:
        await lock.aclose()
        await store.aclose()
    assert record.status == "completed" and isinstance(record.result, str)


HOSTILE_PATTERN_SCHEMA = (
    "{type: 'object', properties: {a: {type: 'array', items: {type: 'string', pattern: '^(a|aa)+$'}}}}"
)


async def test_a_schema_s_patterns_are_matched_off_the_loop_and_within_a_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    # A script chooses the pattern and can get an answer with many strings that backtrack: each
    # match is bounded, all of one validation share a budget, and none runs on the event loop.
    matched_on: list[int] = []  # the thread of every match of the schema's pattern actually run

    def search(pattern: str, *args: Any, **kwargs: Any) -> Any:
        if pattern == "^(a|aa)+$":
            matched_on.append(threading.get_ident())
        return regex.search(pattern, *args, **kwargs)

    monkeypatch.setattr(schema, "regex", SimpleNamespace(search=search))
    answer = {"a": ["a" * 60 + "!"] * 100}  # each string backtracks past the per-match limit
    script = (f"try {{ await agent('hostile', {{schema: {HOSTILE_PATTERN_SCHEMA}}}) }} "
              "catch (e) { return [e.name, e.validationError] }")
    options = {"simulate": {"responses": [{"match": "hostile", "data": answer}]}}
    with anyio.fail_after(30):
        record, _ = await run_script(script, options=options)
    name, problem = record.result
    assert name == "StructuredOutputError" and "took too long" in problem
    # Five attempts, each stopped by the budget after about a tenth of the 100 strings.
    assert 0 < len(matched_on) <= 5 * (int(schema.PATTERNS_BUDGET_S / schema.PATTERN_TIMEOUT_S) + 2)
    assert threading.get_ident() not in matched_on
