"""Escape attempts (STYLE rule 11, SPEC §1.1 and §2): hostile scripts that must fail, or must have no effect.

Each row of ``ESCAPES`` is a hostile script and its expected outcome, one of:

- ``rejected``: ``Engine.submit`` raises ``ScriptRejected`` (static checks) with a message fragment;
- ``fails``: the run ends ``failed`` with an error-message fragment (limits, missing globals, determinism);
- ``completes``: the run ends ``completed`` with a result the script computes to prove the attack had no
  effect (a pollution that did not stick, a real ``agent()`` answer after trying to spoof the bridge...).

Every row runs alone, and all rows run at once in one engine beside a well-behaved run whose result is
computed by hand below; afterwards the engine still completes a fresh run. A separate test shows that a
hostile slice does not hold back another run (without timing thresholds).

Some rows froze the host for good before they were fixed (a worker thread pinned, or the event loop
stuck in Python's ``re``), and a frozen thread cannot be cancelled. Those rows name a ``guard``: the same
attack first runs in a child process under a deadline (``test_host_stays_responsive``), and the row runs
in this process only when its guard passed, so a regression fails fast instead of hanging the suite.
A guard whose attack still freezes the host today is a strict xfail (``OPEN_HOLES``); it flips once fixed.

Expected simulate answers: the simulate backend answers a plain ``agent(prompt)`` with
``Simulated answer for '<label>': ...`` where the label defaults to the prompt (≤ 60 characters), so
scripts prove an answer is real with ``startsWith``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest

from runtime import Engine, MemoryStore, RunRequest, load_settings
from runtime.config import Settings
from runtime.errors import ScriptRejected, TooManyStuckRuns
from runtime.store import EventRecord, RunRecord

REPO_ROOT = Path(__file__).resolve().parents[2]
MAX_AGENTS = 50
OPTIONS: dict[str, Any] = {"backend": "simulate", "max_agents": MAX_AGENTS, "simulate": {"latency_ms": 0}}


def make_settings(**limits: Any) -> Settings:
    """Small limits keep the suite fast: a runaway slice costs 0.5 s, a memory bomb 32 MiB."""
    base = load_settings()
    fast = {"slice_cpu_s": 0.5, "heap_bytes": 32 * 1024 * 1024, "run_cpu_s": 20.0} | limits
    return base.model_copy(update={"limits": dataclasses.replace(base.limits, **fast)})


# --- the table ----------------------------------------------------------------------------------

_UNSET: Any = object()
Check = Callable[[RunRecord, list[EventRecord]], None]


@dataclass(frozen=True)
class Escape:
    id: str
    script: str
    rejected: str | None = None  # ScriptRejected message fragment
    error: str | tuple[str, ...] | None = None  # failed run: error message fragment (any of several)
    result: Any = _UNSET  # completed run: exact result
    check: Check | None = None  # extra assertions on the finished run and its events
    guard: str | None = None  # a HOST_GUARDS attack that must first leave a child process responsive


def rejected(id: str, script: str, fragment: str) -> Escape:
    return Escape(id, textwrap.dedent(script).strip(), rejected=fragment)


def fails(id: str, script: str, fragment: str | tuple[str, ...], check: Check | None = None, guard: str | None = None) -> Escape:
    return Escape(id, textwrap.dedent(script).strip(), error=fragment, check=check, guard=guard)


def completes(id: str, script: str, result: Any, check: Check | None = None) -> Escape:
    return Escape(id, textwrap.dedent(script).strip(), result=result, check=check)


# Attacks that freeze the host for good when their fix regresses; see the module docstring.
HOST_GUARDS: dict[str, str] = {
    "promise-executor": "for (;;) { new Promise(() => { for (;;) {} }) }",
    "schema-pattern": """
        const schema = { type: 'object', required: ['s'],
                         properties: { s: { type: 'string', minLength: 40, pattern: '^(.+)+\\\\d$' } } }
        return await agent('x', { schema })
    """,
    # Whether the interrupt lands inside the capability executor (a tiny JS function the engine's
    # Promise constructor calls inside its native catch) depends on timing, so this guard runs the
    # attack many times with short, varied slices; each attempt that ends takes one slice.
    "promise-capability": "for (;;) { try { Promise.withResolvers() } catch {} }",
}
GUARD_ATTEMPTS = {"promise-capability": 80}
# Guards whose attack still freezes the host (none today): name -> why, as strict xfails.
OPEN_HOLES: dict[str, str] = {}

SLICE = "without yielding"
STACK = "call stack"
MEMORY = "memory limit"
NO_CODE = "Function constructors are not available"


def _log_flood_truncated(record: RunRecord, events: list[EventRecord]) -> None:
    logs = [e for e in events if e.type == "log"]
    notices = [e for e in logs if "log truncated" in e.data["message"]]
    assert len(logs) == 10_001, f"expected 10,000 kept lines + 1 notice, got {len(logs)} log events"
    assert len(notices) == 1, f"expected one truncation notice, got {len(notices)}"


def _only_cap_agents_issued(record: RunRecord, events: list[EventRecord]) -> None:
    started = [e for e in events if e.type == "agent.started"]
    assert record.usage["agents"]["total"] == MAX_AGENTS, record.usage["agents"]
    assert len(started) == MAX_AGENTS, f"{len(started)} agents started, the cap is {MAX_AGENTS}"


def _no_host_text(record: RunRecord, events: list[EventRecord]) -> None:
    message = record.error["message"] if record.error else ""
    assert ".py" not in message and "Traceback" not in message and "/" not in message, message


ESCAPES: list[Escape] = [
    # --- CPU: every runaway slice is interrupted, however it tries to survive the interrupt --------------
    fails("endless-loop", "while (true) {}", SLICE),
    fails("catch-and-continue-interrupt", "for (;;) { try { while (true) {} } catch (e) {} }", SLICE),
    fails("loop-in-finally", "try { while (true) {} } finally { for (;;) {} }", SLICE),
    fails(
        "async-catch-and-continue",
        "for (;;) { try { await (async () => { while (true) {} })() } catch (e) {} }",
        SLICE,
    ),
    fails("redos", "return /(a+)+$/.test('a'.repeat(40) + 'b')", SLICE),
    fails("async-function-swallowing-the-interrupt", "for (;;) { (async () => { for (;;) {} })().catch(() => {}) }",
          SLICE),
    fails("endless-loop-after-an-agent", "await agent('warm up')\nfor (;;) {}", SLICE),
    fails(
        "endless-loop-in-timer-callback",
        "setTimeout(() => { for (;;) {} }, 0)\nawait new Promise(() => {})",
        SLICE,
    ),
    fails("endless-getter-on-result", "return { get x() { for (;;) {} } }", SLICE),
    # The engine's Promise constructor once turned the uncatchable interrupt into a rejection.
    fails("promise-executor-swallowing-the-interrupt", HOST_GUARDS["promise-executor"], SLICE,
          guard="promise-executor"),
    fails("promise-flood", "for (;;) new Promise(() => {})", SLICE, guard="promise-executor"),
    fails("Promise.try-swallowing-the-interrupt", "for (;;) { Promise.try(() => { for (;;) {} }) }", SLICE,
          guard="promise-executor"),
    fails("Promise-subclass-swallowing-the-interrupt",
          "class P extends Promise {}\nfor (;;) { new P(() => { for (;;) {} }) }", SLICE, guard="promise-executor"),
    # Every road to a promise constructor leads to the safe one; then() and await use the engine's.
    fails("promise-constructor-via-an-instance-swallowing-the-interrupt",
          "const P = (async () => {})().constructor\nfor (;;) { new P(() => { for (;;) {} }) }", SLICE,
          guard="promise-executor"),
    fails("promise-constructor-via-species-swallowing-the-interrupt",
          "const P = Promise[Symbol.species] || Promise.prototype.constructor\n"
          "for (;;) { new P(() => { for (;;) {} }) }", SLICE, guard="promise-executor"),
    completes(
        "promise-subclass-then-and-await",
        """
        class P extends Promise {}
        const p = new P((resolve) => resolve(1))
        const q = p.then((v) => v + 1)
        return [q instanceof Promise, await q, await p, (async () => {})().constructor === Promise,
                Promise[Symbol.species]]
        """,
        [True, 2, 1, True, None],
    ),
    fails("promise-flood-without-executors", "for (;;) Promise.withResolvers()", SLICE, guard="promise-capability"),
    fails("promise-capability-swallowing-the-interrupt", HOST_GUARDS["promise-capability"], SLICE,
          guard="promise-capability"),
    fails("microtask-flood", "(async () => { for (;;) await null })()\nawait new Promise(() => {})", SLICE),
    fails("recursion-caught-forever", "function f() { f() }\nfor (;;) { try { f() } catch (e) {} }", SLICE),
    completes(
        "timers-are-no-ops-after-the-run-ends",
        "setTimeout(() => { for (;;) {} }, 0)\nreturn 'early'",
        "early",
    ),
    # --- memory and stack ---------------------------------------------------------------------------------
    fails("array-memory-bomb", "const a = []\nfor (;;) a.push(new Array(1e5).fill(1))", MEMORY),
    fails("string-doubling-bomb", "let s = 'x'\nfor (;;) s += s", "string too long"),
    fails("flattened-string-doubling-bomb", "let s = 'x'\nfor (;;) { s += s; s.indexOf('y') }", MEMORY),
    fails("small-object-memory-bomb", "const keep = []\nfor (;;) keep.push({ n: keep.length })", MEMORY),
    fails("array-buffer-bomb", "return new ArrayBuffer(2 ** 30).byteLength", MEMORY),
    fails("deep-recursion", "function f() { return f() + 1 }\nreturn f()", STACK),
    fails("async-recursion", "async function f() { await f() }\nawait f()", STACK),
    fails("proxy-get-recursion", "return new Proxy({}, { get: (t, k, r) => r[k] }).x", STACK),
    fails("deep-json-parse", "return JSON.parse('['.repeat(1e6))", STACK),
    # --- strings that become code ----------------------------------------------------------------------
    fails("eval", "return eval('1 + 1')", "eval is not defined"),
    completes("eval-found-by-name", "return [typeof globalThis['ev' + 'al'], typeof globalThis.eval]",
              ["undefined", "undefined"]),
    fails("new-Function", "return new Function('return 1')()", NO_CODE),
    fails("arrow-constructor-walk", "return (() => {}).constructor('return 1')()", NO_CODE),
    fails("bound-function-constructor-walk", "return (function () {}).bind(null).constructor('return 1')()",
          NO_CODE),
    fails("async-function-constructor",
          "return Object.getPrototypeOf(async function () {}).constructor('return 1')", NO_CODE),
    fails("generator-function-constructor",
          "return Object.getPrototypeOf(function* () {}).constructor('yield 1')", NO_CODE),
    fails("async-generator-function-constructor",
          "return Object.getPrototypeOf(async function* () {}).constructor('yield 1')", NO_CODE),
    fails("reflect-construct-Function", "return Reflect.construct(Function, ['return 1'])()", NO_CODE),
    fails("class-extends-Function", "class F extends Function {}\nreturn new F('return 1')()", NO_CODE),
    fails("setTimeout-code-string", "setTimeout('globalThis.pwned = 1', 0)\nreturn 1",
          "setTimeout() expects a function"),
    # --- modules and host APIs -------------------------------------------------------------------------
    rejected("dynamic-import", "return await import('fs')", "import() is not available"),
    rejected("import-declaration", "import fs from 'fs'\nreturn fs.readFileSync('/etc/passwd')",
             "import declarations are not available"),
    rejected("require", "return require('fs').readFileSync('/etc/passwd', 'utf8')", "require() is not available"),
    rejected("import-meta", "return import.meta.url", "import.meta is not available"),
    rejected("wrapper-break-out", "}); globalThis.pwned = 1; (async function () {", "SyntaxError"),
    completes(
        "host-apis-absent",
        """
        return [typeof process, typeof fetch, typeof URL, typeof Buffer, typeof std, typeof os,
                typeof print, typeof scriptArgs, typeof WebAssembly, typeof globalThis['req' + 'uire']]
        """,
        ["undefined"] * 10,
    ),
    fails("Atomics.wait", "return Atomics.wait(new Int32Array(4), 0, 0)", "Atomics is not defined"),
    fails("SharedArrayBuffer", "return new SharedArrayBuffer(8).byteLength", "SharedArrayBuffer is not defined"),
    fails("WeakRef", "return new WeakRef({}).deref()", "WeakRef is not defined"),
    fails("FinalizationRegistry", "return new FinalizationRegistry(() => {})", "FinalizationRegistry is not defined"),
    fails("queueMicrotask", "queueMicrotask(() => {})\nreturn 1", "queueMicrotask is not defined"),
    fails("performance.now", "return performance.now()", "performance is not defined"),
    # --- determinism ---------------------------------------------------------------------------------------
    fails("Date.now", "return Date.now()", "Date.now() is not available"),
    fails("Math.random", "return Math.random()", "Math.random() is not available"),
    fails("argument-less-new-Date", "return new Date().getTime()", "new Date() without arguments"),
    fails("Date-called", "return Date()", "Date() is not available"),
    fails("real-Date-via-prototype-constructor",
          "return new (Object.getPrototypeOf(new Date(0)).constructor)().getTime()",
          "new Date() without arguments"),
    # --- pollution of what the prelude relies on, then real agent()/parallel()/pipeline() calls ----------
    completes(
        "Array.prototype.push-and-iterator",
        """
        try { Array.prototype.push = function () { return 0 } } catch (e) {}
        try { Array.prototype[Symbol.iterator] = function* () { yield 'pwned' } } catch (e) {}
        try { Array.prototype.map = function () { return ['pwned'] } } catch (e) {}
        const r = await parallel([() => agent('a'), () => agent('b')])
        return [Array.prototype.push.name, Array.prototype.map.name, r.length,
                r[0].startsWith("Simulated answer for 'a'"), r[1].startsWith("Simulated answer for 'b'")]
        """,
        ["push", "map", 2, True, True],
    ),
    completes(
        "Promise.prototype.then-and-statics",
        """
        try { Promise.prototype.then = function () { return 'pwned' } } catch (e) {}
        try { Promise.all = () => 'pwned' } catch (e) {}
        try { Promise.resolve = () => 'pwned' } catch (e) {}
        const a = await agent('then')
        const r = await parallel([() => agent('all')])
        return [Promise.prototype.then.name, Promise.all.name, a.startsWith("Simulated answer for 'then'"),
                r[0].startsWith("Simulated answer for 'all'")]
        """,
        ["then", "all", True, True],
    ),
    completes(
        "JSON.stringify-and-parse",
        """
        try { JSON.stringify = () => '"pwned"' } catch (e) {}
        try { JSON.parse = () => 'pwned' } catch (e) {}
        const r = await parallel([() => agent('json')])
        return { json: JSON.stringify({ a: [1] }), real: r[0].startsWith("Simulated answer for 'json'") }
        """,
        {"json": '{"a":[1]}', "real": True},
    ),
    completes(
        "Object.prototype.then",
        """
        try { Object.prototype.then = function (resolve) { resolve('pwned') } } catch (e) {}
        try {
          Object.defineProperty(Object.prototype, 'then', { get() { throw new Error('pwned') } })
        } catch (e) {}
        const schema = { type: 'object', properties: { n: { type: 'integer' } }, required: ['n'] }
        const obj = await agent('structured', { schema })
        return [({}).then === undefined, typeof obj, Number.isInteger(obj.n)]
        """,
        [True, "object", True],
    ),
    completes(
        "Function.prototype.call-apply-bind",
        """
        try { Function.prototype.call = function () { return 'pwned' } } catch (e) {}
        try { Function.prototype.apply = function () { return 'pwned' } } catch (e) {}
        try { Function.prototype.bind = function () { return () => 'pwned' } } catch (e) {}
        const r = await pipeline([1, 2], (x) => agent('p' + x),
                                 (s, item) => s.startsWith("Simulated answer for 'p" + item + "'") ? item * 10 : -1)
        return [Function.prototype.call.name, r]
        """,
        ["call", [10, 20]],
    ),
    completes(
        "Object.prototype-reparented",
        """
        try { Object.setPrototypeOf(Object.prototype, { then(r) { r('pwned') } }) } catch (e) {}
        try { Object.prototype.__proto__ = { polluted: 1 } } catch (e) {}
        Object.prototype.polluted = 1
        const a = await agent('reparent')
        return [Object.getPrototypeOf(Object.prototype) === null, ({}).polluted === undefined,
                a.startsWith("Simulated answer for 'reparent'")]
        """,
        [True, True, True],
    ),
    completes(
        "Map.prototype-pending-table",
        """
        try { Map.prototype.get = () => ({ resolve() {}, reject() {} }) } catch (e) {}
        try { Map.prototype.set = () => {} } catch (e) {}
        try { Map.prototype.delete = () => true } catch (e) {}
        const a = await agent('map')
        return a.startsWith("Simulated answer for 'map'")
        """,
        True,
    ),
    completes(
        "rebind-intrinsic-globals",
        """
        try { globalThis.Promise = function FakePromise(executor) { executor(() => {}, () => {}) } } catch (e) {}
        try { delete globalThis.JSON } catch (e) {}
        try { globalThis.String = () => ({ not: 'a string' }) } catch (e) {}
        try { globalThis.Error = function FakeError() {} } catch (e) {}
        const r = await parallel([() => agent('after rebinding')])
        let thrown
        try { await agent('') } catch (e) { thrown = e instanceof TypeError }
        return [Promise.name, typeof JSON.stringify, String(1), Error.name,
                r[0].startsWith("Simulated answer for 'after rebinding'"), thrown]
        """,
        ["Promise", "function", "1", "Error", True, True],
    ),
    completes(
        "reassign-agent-and-parallel",
        """
        const attempts = []
        try { agent = async () => 'fake' } catch (e) { attempts.push(e.name) }
        try { globalThis.parallel = async () => ['fake'] } catch (e) { attempts.push(e.name) }
        try { Object.defineProperty(globalThis, 'agent', { value: async () => 'fake' }) } catch (e) { attempts.push(e.name) }
        attempts.push(delete globalThis.pipeline)
        const a = await agent('still real')
        const p = await parallel([() => agent('p0')])
        return [attempts, a.startsWith("Simulated answer for 'still real'"),
                p[0].startsWith("Simulated answer for 'p0'"), typeof pipeline]
        """,
        [["TypeError", False], True, True, "function"],
    ),
    completes(
        "Error.prepareStackTrace-callsites",
        """
        const frames = []
        try {
          Error.prepareStackTrace = (e, callSites) => {
            for (const c of callSites) frames.push(c.getFunction())
            return 'hooked'
          }
        } catch (e) {}
        let stack
        try { await workflow('missing') } catch (e) { stack = e.stack }
        return [typeof Error.prepareStackTrace, frames.length, stack === 'hooked']
        """,
        ["undefined", 0, False],
    ),
    # --- the bridge ----------------------------------------------------------------------------------------
    completes(
        "spoof-the-bridge",
        """
        let called = 0
        globalThis.__quickflow_host = {
          take() { called++; return '{"out":[],"done":null}' },
          settle() { called++ },
          start() { called++ },
        }
        globalThis.take = globalThis.__quickflow_host.take
        globalThis.settle = globalThis.__quickflow_host.settle
        const answer = await agent('are you real')
        const rs = await parallel([() => agent('one'), () => agent('two')])
        return [called, answer.startsWith("Simulated answer for 'are you real'"),
                rs.map((r) => r.startsWith('Simulated answer'))]
        """,
        [0, True, [True, True]],
    ),
    completes(
        "spoof-the-promise-resolvers",
        """
        let called = 0
        globalThis.__quickflow_resolvers = () => {
          called++
          return { promise: Promise.resolve('fake'), resolve() {}, reject() {} }
        }
        const answer = await agent('are you real')
        const rs = await parallel([() => agent('one')])
        return [called, answer.startsWith("Simulated answer for 'are you real'"), rs[0].startsWith('Simulated answer')]
        """,
        [0, True, True],
    ),
    completes(
        "search-globalThis-for-the-host",
        """
        const hostKeys = Object.getOwnPropertyNames(globalThis)
          .filter((k) => /quickflow|host|^take$|^settle$|^start$|^python/i.test(k))
        const found = []
        const seen = new Set()
        const stack = [globalThis]
        while (stack.length) {
          const o = stack.pop()
          if (o === null || o === undefined || (typeof o !== 'object' && typeof o !== 'function') || seen.has(o)) continue
          seen.add(o)
          if (typeof o === 'function' && ['take', 'settle', 'start'].includes(o.name) && o !== Iterator.prototype.take) {
            found.push(o.name)
          }
          for (const k of Reflect.ownKeys(o)) {
            if (/quickflow/i.test(String(k))) found.push(String(k))
            const d = Object.getOwnPropertyDescriptor(o, k)
            if (d) stack.push(d.value, d.get, d.set)
          }
          stack.push(Object.getPrototypeOf(o))
        }
        return { hostKeys, found, walked: seen.size > 200 }
        """,
        {"hostKeys": [], "found": [], "walked": True},
    ),
    completes(
        "caller-walks",
        """
        const seen = []
        const probe = function p() {
          try { seen.push(typeof p.caller, typeof arguments.callee.caller) } catch (e) { seen.push(e.name) }
        }
        probe()
        await parallel([() => { probe(); return 1 }])
        await pipeline([1], (x) => { probe(); return x })
        await new Promise((resolve) => setTimeout(() => { probe(); resolve() }, 0))
        return seen.filter((t) => t !== 'undefined' && t !== 'TypeError')
        """,
        [],
    ),
    completes(
        "stack-traces-hide-the-host",
        """
        const stacks = [new Error('a').stack]
        try { await agent('') } catch (e) { stacks.push(e.stack) }
        try { await workflow('missing') } catch (e) { stacks.push(e.stack, e.message) }
        try { null.x } catch (e) { stacks.push(e.stack) }
        await new Promise((resolve) => setTimeout(() => { stacks.push(new Error('t').stack); resolve() }, 0))
        return [stacks.length, stacks.filter((s) => typeof s !== 'string' || s.includes('.py') || s.includes('/'))]
        """,
        [6, []],
    ),
    fails("uncaught-error-hides-the-host", "await agent('x')\nthrow new Error('boom')", "boom", check=_no_host_text),
    # --- what crosses the boundary, and the run's own limits ----------------------------------------------
    fails("huge-return-value", "return 'x'.repeat(5 * 1024 * 1024)", "limit is"),
    fails("return-a-function", "return { f() {} }", "JSON-serializable"),
    fails("return-a-cycle", "const a = {}\na.self = a\nreturn a", "JSON-serializable"),
    fails("return-a-BigInt", "return { n: 10n }", "JSON-serializable"),
    fails("deep-json-through-toJSON",
          "let a = []\nfor (let i = 0; i < 3000; i++) a = [a]\nreturn { toJSON() { return a } }", "nested too deeply"),
    fails("deep-json-in-workflow-args",
          "let a = []\nfor (let i = 0; i < 3000; i++) a = [a]\nreturn await workflow('missing', a)",
          "nested too deeply"),
    completes("setTimeout-Infinity", "await new Promise((resolve) => setTimeout(resolve, Infinity))\nreturn 'woke'",
              "woke"),
    fails("schema-pattern-redos", HOST_GUARDS["schema-pattern"], "no valid structured output", guard="schema-pattern"),
    completes(
        "log-flood",
        "for (let i = 0; i < 20000; i++) log('line ' + i)\nreturn 'done'",
        "done",
        check=_log_flood_truncated,
    ),
    fails(
        "timer-flood",
        "for (let i = 0; i < 20000; i++) setTimeout(() => {}, 1e6)\nawait new Promise((r) => setTimeout(r, 1))",
        "timers pending",
    ),
    completes(
        "agent-flood-past-the-cap",
        """
        const calls = []
        for (let i = 0; i < 200; i++) calls.push(agent('flood ' + i).catch((e) => e.name))
        const r = await Promise.all(calls)
        return [r.filter((x) => x.startsWith('Simulated answer')).length,
                r.filter((x) => x === 'WorkflowAgentCapError').length]
        """,
        [MAX_AGENTS, 200 - MAX_AGENTS],
        check=_only_cap_agents_issued,
    ),
    # Which limit comes first depends on the machine's speed: both end the run cleanly.
    fails("workflow-request-flood", "for (;;) workflow('missing')", (MEMORY, SLICE)),
    fails("parallel-past-4096", "return await parallel(Array.from({ length: 5000 }, () => () => 1))",
          "at most 4096"),
    fails("never-settling-promise", "await new Promise(() => {})", "can never settle"),
]

assert len({e.id for e in ESCAPES}) == len(ESCAPES), "row ids must be unique"


async def submit(engine: Engine, escape: Escape) -> str | None:
    """Submit one row; None when it was rejected as expected (asserted here)."""
    if escape.rejected is not None:
        with pytest.raises(ScriptRejected) as info:
            await engine.submit(RunRequest(script=escape.script, options=OPTIONS))
        assert escape.rejected in str(info.value), f"[{escape.id}] rejected for another reason: {info.value}"
        return None
    record = await engine.submit(RunRequest(script=escape.script, options=OPTIONS))
    return record.id


def outcome_problems(escape: Escape, record: RunRecord, events: list[EventRecord]) -> list[str]:
    """What differs from the row's expectation, as readable lines (empty when the row holds)."""
    where = f"[{escape.id}]"
    if record.error is not None and record.error.get("kind") == "internal":
        return [f"{where} crashed the host side: {record.error}"]
    if escape.error is not None:
        if record.status != "failed" or record.error is None:
            return [f"{where} expected failure with {escape.error!r}, got {record.status}: {record.result!r}"]
        fragments = escape.error if isinstance(escape.error, tuple) else (escape.error,)
        if not any(fragment in record.error["message"] for fragment in fragments):
            return [f"{where} expected an error containing {escape.error!r}, got {record.error['message']!r}"]
    else:
        if record.status != "completed":
            return [f"{where} expected completion with {escape.result!r}, got {record.status}: {record.error}"]
        if record.result != escape.result:
            return [f"{where} expected result {escape.result!r}, got {record.result!r}"]
    if escape.check is not None:
        try:
            escape.check(record, events)
        except AssertionError as exc:
            return [f"{where} {exc}"]
    return []


@pytest.mark.anyio
@pytest.mark.parametrize("escape", ESCAPES, ids=[e.id for e in ESCAPES])
async def test_escape_attempt_alone(escape: Escape, host_guards: HostGuards) -> None:
    if escape.guard is not None and host_guards.problem(escape.guard) is not None:
        pytest.skip(f"not run in this process: {host_guards.problem(escape.guard)}")
    with anyio.fail_after(20):
        async with Engine(make_settings(), MemoryStore(), recover=False) as engine:
            run_id = await submit(engine, escape)
            if run_id is None:
                return
            record = await engine.wait(run_id)
            events = [event async for event in engine.follow(run_id)]
            problems = outcome_problems(escape, record, events)
            assert not problems, "\n".join(problems)


# --- all at once, beside a well-behaved run -----------------------------------------------------------

GOOD_SCRIPT = textwrap.dedent(
    """
    log('good run starting')
    const answers = await parallel(Array.from({ length: 20 }, (_, i) => () => agent('square ' + i)))
    const squares = answers.map((a, i) => a.startsWith("Simulated answer for 'square " + i + "'") ? i * i : -1)
    const sleep = (ms, value) => new Promise((resolve) => setTimeout(() => resolve(value), ms))
    const chained = await pipeline(
      [1, 2, 3, 4, 5],
      (x) => sleep(5 * (6 - x), x * 10),
      async (y, item, i) => {
        const a = await agent('stage ' + y)
        return a.startsWith("Simulated answer for 'stage " + y + "'") ? y + item + i : null
      },
      (z) => sleep(1, z),
    )
    return { squares, total: squares.reduce((s, v) => s + v, 0), chained }
    """
).strip()
# By hand: squares of 0..19; their sum is 19 * 20 * 39 / 6 = 2470; item x at index x - 1 gives
# 10x + x + (x - 1) = 12x - 1.
GOOD_RESULT = {
    "squares": [i * i for i in range(20)],
    "total": 2470,
    "chained": [11, 23, 35, 47, 59],
}
GOOD_OPTIONS: dict[str, Any] = {"backend": "simulate", "simulate": {"latency_ms": [0, 20]}}


@pytest.mark.anyio
async def test_all_escape_attempts_at_once_beside_a_good_run(host_guards: HostGuards) -> None:
    # Rows whose attack froze a child process would freeze this one: test_host_stays_responsive fails instead.
    escapes = [e for e in ESCAPES if e.guard is None or host_guards.problem(e.guard) is None]
    # quickjs-ng measures the slice limit with clock(), the CPU time of the whole process: runaway
    # neighbours spend the good run's slice too. 1 s leaves the good run's millisecond slices a margin.
    with anyio.fail_after(50):
        async with Engine(make_settings(slice_cpu_s=1.0), MemoryStore(), recover=False) as engine:
            good = await engine.submit(RunRequest(script=GOOD_SCRIPT, options=GOOD_OPTIONS))
            submitted: list[tuple[Escape, str]] = []
            for escape in escapes:
                run_id = await submit(engine, escape)
                if run_id is not None:
                    submitted.append((escape, run_id))

            good_record = await engine.wait(good.id)
            problems: list[str] = []
            for escape, run_id in submitted:
                record = await engine.wait(run_id)
                events = [event async for event in engine.follow(run_id)]
                problems.extend(outcome_problems(escape, record, events))
            assert not problems, f"{len(problems)} of {len(submitted)} rows misbehaved together:\n" + "\n".join(problems)

            assert good_record.status == "completed", good_record.error
            assert good_record.result == GOOD_RESULT
            assert good_record.usage["agents"]["total"] == 25
            assert good_record.usage["failures"] == []

            # The process is healthy: nothing is left on the pool or the dispatcher, and a fresh run works.
            assert engine.pool.statistics().running == 0
            assert engine.dispatcher.statistics().in_flight == 0
            fresh = await engine.submit(RunRequest(script="return (await agent('fresh')).length > 0", options=OPTIONS))
            fresh_record = await engine.wait(fresh.id)
            assert (fresh_record.status, fresh_record.result) == ("completed", True), fresh_record.error


# --- one slice at most ----------------------------------------------------------------------------------

SEQUENTIAL_SCRIPT = textwrap.dedent(
    """
    let real = 0
    for (let i = 0; i < 10; i++) {
      const a = await agent('step ' + i)
      if (a.startsWith("Simulated answer for 'step " + i + "'")) real++
    }
    return real
    """
).strip()


@pytest.mark.anyio
async def test_a_hostile_slice_does_not_hold_back_another_run() -> None:
    """SPEC §1.1: a runaway slice blocks only its own worker thread, never the event loop or other runs.

    The hostile run's first slice may last 5 s; the good run needs ten round trips through the pool
    and the event loop. It must finish while the hostile run is still inside that first slice.
    """
    with anyio.fail_after(30):
        async with Engine(make_settings(slice_cpu_s=5.0), MemoryStore(), recover=False) as engine:
            hostile = await engine.submit(RunRequest(script="while (true) {}", options=OPTIONS))
            # Readiness, not a sleep: wait until the hostile slice holds a worker.
            while engine.pool.statistics().running == 0:
                await anyio.sleep(0.005)

            good = await engine.submit(RunRequest(script=SEQUENTIAL_SCRIPT, options=OPTIONS))
            good_record = await engine.wait(good.id)
            assert (good_record.status, good_record.result) == ("completed", 10), good_record.error

            still = await engine.get_run(hostile.id)
            assert still.status == "running", "the good run finished only after the hostile slice ended"
            assert engine.pool.statistics().running == 1  # the hostile slice, still on its worker

            hostile_record = await engine.wait(hostile.id)
            assert hostile_record.status == "failed" and hostile_record.error is not None
            assert "without yielding" in hostile_record.error["message"]


# --- built-in calls the slice limit cannot interrupt ------------------------------------------------

# About 1.5 s of native work on the development machine, in one call: no bytecode runs, so the
# engine never polls its time limit. The length is the most hardening.js lets one call have; the
# test's deadline is about a seventh of the time.
STUCK_SCRIPT = "return Array(2 ** 25).sort().length"


@pytest.mark.anyio
async def test_a_slice_stuck_in_a_built_in_is_abandoned_and_its_worker_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    """One worker, two runs stuck inside ``join()`` of a huge sparse array: both end at their
    slice's deadline (one cancelled while stuck, one failed), and a good run then gets a worker."""
    import sandbox._isolate

    monkeypatch.setattr(sandbox._isolate, "OVERRUN_GRACE_S", 0.05)  # deadline: 3 × 0.05 + 0.05 s
    from sandbox import SlicePool

    with anyio.fail_after(20):
        async with Engine(make_settings(slice_cpu_s=0.05), MemoryStore(), recover=False, pool=SlicePool(1)) as engine:
            cancelled = await engine.submit(RunRequest(script=STUCK_SCRIPT, options=OPTIONS))
            while engine.pool.statistics().running == 0:  # its slice holds the only worker
                await anyio.sleep(0.005)
            cancelled_record = await engine.cancel(cancelled.id)
            assert cancelled_record.status == "cancelled"

            stuck = await engine.submit(RunRequest(script=STUCK_SCRIPT, options=OPTIONS))
            # Another owner's: this one's are about to reach limits.stuck_slices_per_owner.
            good = await engine.submit(RunRequest(script=SEQUENTIAL_SCRIPT, options=OPTIONS), owner="bob")
            stuck_record = await engine.wait(stuck.id)
            assert stuck_record.status == "failed" and stuck_record.error is not None
            assert stuck_record.error["name"] == "cpu_slice"
            assert "inside a single built-in call" in stuck_record.error["message"], stuck_record.error

            good_record = await engine.wait(good.id)
            assert (good_record.status, good_record.result) == ("completed", 10), good_record.error
            stats = engine.pool.statistics()
            assert stats.overruns_total == 2 and stats.running == 0


@pytest.mark.anyio
async def test_an_owner_whose_slices_are_stuck_starts_no_new_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stuck slice keeps its thread and its heap until the built-in call returns: an owner can
    have at most ``limits.stuck_slices_per_owner`` of them, so scripts like this cannot pile up
    threads. Other owners are not held back, and the owner starts runs again once its thread is
    done."""
    import sandbox._isolate

    monkeypatch.setattr(sandbox._isolate, "OVERRUN_GRACE_S", 0.05)
    from sandbox import SlicePool

    settings = make_settings(slice_cpu_s=0.05, stuck_slices_per_owner=1)
    with anyio.fail_after(20):
        async with Engine(settings, MemoryStore(), recover=False, pool=SlicePool(2)) as engine:
            stuck = await engine.submit(RunRequest(script=STUCK_SCRIPT, options=OPTIONS), owner="ann")
            stuck_record = await engine.wait(stuck.id)
            assert stuck_record.error is not None and stuck_record.error["name"] == "cpu_slice"
            assert engine.pool.overrunning("ann") == 1  # its thread is still inside sort()

            with pytest.raises(TooManyStuckRuns) as refused:
                await engine.submit(RunRequest(script="return 1", options=OPTIONS), owner="ann")
            assert refused.value.details == {"stuck": 1, "limit": 1}
            assert "stuck inside a single built-in call" in refused.value.message

            other = await engine.wait((await engine.submit(RunRequest(script="return 2", options=OPTIONS),
                                                           owner="bob")).id)
            assert (other.status, other.result) == ("completed", 2)

            while engine.pool.overrunning("ann"):
                await anyio.sleep(0.01)
            again = await engine.wait((await engine.submit(RunRequest(script="return 3", options=OPTIONS),
                                                           owner="ann")).id)
            assert (again.status, again.result) == ("completed", 3)


@pytest.mark.anyio
async def test_an_owner_at_its_stuck_limit_gets_no_more_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refusing new runs is not enough: a burst of runs all start before any is stuck, and one run
    can start stuck ``workflow()`` children in a loop. Each slice is refused once its owner is at
    the limit, so an owner has at most the limit plus the slices running when the last got stuck
    (the pool's two workers here)."""
    import sandbox._isolate

    monkeypatch.setattr(sandbox._isolate, "OVERRUN_GRACE_S", 0.05)
    from sandbox import SlicePool

    child = "export const meta = {name: 'stuck', description: 'gets stuck'}\n" + STUCK_SCRIPT
    parent = "let failed = 0\nfor (let i = 0; i < 3; i++) { try { await workflow('stuck') } catch (e) { failed++ } }\nreturn failed"
    settings = make_settings(slice_cpu_s=0.05, stuck_slices_per_owner=1)
    with anyio.fail_after(30):
        async with Engine(settings, MemoryStore(), recover=False, pool=SlicePool(2)) as engine:
            await engine.save_workflow(child, owner="ann")
            looping = await engine.wait((await engine.submit(RunRequest(script=parent, options=OPTIONS),
                                                             owner="ann")).id)
            assert looping.status == "failed" and looping.error is not None
            assert looping.error["name"] == "stuck_slices", looping.error
            assert engine.pool.overrunning("ann") == 1
            while engine.pool.overrunning("ann"):
                await anyio.sleep(0.01)

            burst = [await engine.submit(RunRequest(script=STUCK_SCRIPT, options=OPTIONS), owner="ann")
                     for _ in range(4)]
            ended = [await engine.wait(run.id) for run in burst]
            assert sorted(r.error["name"] for r in ended if r.error) == ["cpu_slice", "cpu_slice",
                                                                        "stuck_slices", "stuck_slices"]
            assert engine.pool.overrunning("ann") == 2  # the two that ran at once; no more


# --- attacks that once froze the host, first tried in a child process ------------------------------

HANG_CHILD = textwrap.dedent(
    """
    import dataclasses, json, random, sys
    import anyio
    from runtime import Engine, MemoryStore, RunRequest, load_settings

    async def main(script, options, attempts):
        settings = load_settings()
        rng = random.Random(7)
        for _ in range(attempts):
            slice_s = 1.0 if attempts == 1 else rng.uniform(0.02, 0.06)
            limits = dataclasses.replace(settings.limits, slice_cpu_s=slice_s)
            async with Engine(settings.model_copy(update={"limits": limits}), MemoryStore(), recover=False) as engine:
                record = await engine.submit(RunRequest(script=script, options=options))
                with anyio.fail_after(4):
                    record = await engine.wait(record.id)
        print("ENDED", record.status)

    anyio.run(main, sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]))
    """
)
HANG_DEADLINE_S = 10.0


@dataclass
class HostGuards:
    """One child process per HOST_GUARDS attack, all started at once so their deadlines overlap."""

    started: float
    children: dict[str, subprocess.Popen[str]]
    verdicts: dict[str, str | None] = dataclasses.field(default_factory=dict)

    def problem(self, name: str) -> str | None:
        """None when the child's engine ended the run in time; otherwise what went wrong."""
        if name not in self.verdicts:
            child = self.children[name]
            try:
                stdout, stderr = child.communicate(timeout=max(0.1, self.started + HANG_DEADLINE_S - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.communicate()
                self.verdicts[name] = f"the {name!r} attack froze its host process for more than {HANG_DEADLINE_S:g} s"
            else:
                self.verdicts[name] = None if "ENDED" in stdout else f"the {name!r} child failed:\n{stderr[-2000:]}"
        return self.verdicts[name]


@pytest.fixture(scope="module")
def host_guards() -> Iterator[HostGuards]:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    options = json.dumps({"backend": "simulate", "simulate": {"latency_ms": 0}})
    guards = HostGuards(time.monotonic(), {
        name: subprocess.Popen(
            [sys.executable, "-c", HANG_CHILD, textwrap.dedent(script).strip(), options,
             str(GUARD_ATTEMPTS.get(name, 1))],
            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for name, script in HOST_GUARDS.items()
    })
    try:
        yield guards
    finally:
        for child in guards.children.values():
            if child.poll() is None:
                child.kill()
            child.communicate()


@pytest.mark.parametrize(
    "name",
    [pytest.param(name, marks=[pytest.mark.xfail(strict=True, reason=OPEN_HOLES[name])] if name in OPEN_HOLES else [])
     for name in HOST_GUARDS],
)
def test_host_stays_responsive(name: str, host_guards: HostGuards) -> None:
    """The attack, in a child process, ends its run(s) well inside the deadline."""
    problem = host_guards.problem(name)
    assert problem is None, problem
