"""The built-ins hardening.js wraps because the slice limit cannot stop them.

Their answers must be the engine's own. Each case runs twice, in a bare QuickJS context (the
engine's built-ins) and in one hardened with the search window shrunk to a few comparisons, so
that even these short strings take the windowed path. Results, thrown error types and the order
in which arguments were converted (a log the case keeps) must agree.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator

import anyio
import pytest
import quickjs

import js_stdlib
from runtime import Engine, MemoryStore, RunRequest

from .test_escapes import OPTIONS, make_settings

SMALL_WINDOWS = {
    "const SEARCH_SHORT = 32;": "const SEARCH_SHORT = 1;",
    "const SEARCH_WORK = 2 ** 22;": "const SEARCH_WORK = 12;",
    "const SEARCH_HEAD = 256;": "const SEARCH_HEAD = 3;",
}

# Runs one case: its source is an expression over S, P, X (position, limit or template) and log.
CASE = """
(function (S, P, X, body) {
  const log = [];
  const trace = (name, value) => ({ toString() { log.push(name); return value; }, valueOf() { log.push(name + '#'); return value; } });
  try {
    const result = body(S, P, X, log, trace);
    return JSON.stringify({ result, log });
  } catch (err) {
    return JSON.stringify({ error: err.constructor.name, log });
  }
})
"""

BODIES = {
    "indexOf": "(S, P, X) => S.indexOf(P, X)",
    "lastIndexOf": "(S, P, X) => S.lastIndexOf(P, X)",
    "includes": "(S, P, X) => S.includes(P, X)",
    "split": "(S, P, X) => S.split(P, X)",
    "replace": "(S, P, X) => S.replace(P, X)",
    "replaceAll": "(S, P, X) => S.replaceAll(P, X)",
    "replace-fn": "(S, P) => S.replace(P, (m, p, s) => `<${m}:${p}:${s.length}>`)",
    "replaceAll-fn": "(S, P) => S.replaceAll(P, (m, p, s) => `<${m}:${p}:${s.length}>`)",
    "traced-indexOf": "(S, P, X, log, trace) => String.prototype.indexOf.call(trace('this', S), trace('p', P), trace('x', X))",
    "traced-lastIndexOf": "(S, P, X, log, trace) => String.prototype.lastIndexOf.call(trace('this', S), trace('p', P), trace('x', X))",
    "traced-includes": "(S, P, X, log, trace) => String.prototype.includes.call(trace('this', S), trace('p', P), trace('x', X))",
    "traced-split": "(S, P, X, log, trace) => String.prototype.split.call(trace('this', S), trace('p', P), trace('x', X))",
    "traced-replace": "(S, P, X, log, trace) => String.prototype.replace.call(trace('this', S), trace('p', P), trace('x', X))",
    "traced-replaceAll": "(S, P, X, log, trace) => String.prototype.replaceAll.call(trace('this', S), trace('p', P), trace('x', X))",
}
POSITIONS = ["undefined", "0", "1", "-3", "5", "100", "NaN", "Infinity", "-Infinity", "'2'", "2.7", "null"]
LIMITS = ["undefined", "0", "1", "2", "-1", "2 ** 32 + 1", "'3'"]
TEMPLATES = ["'x'", "'$$'", "'$&'", "'$`'", "\"$'\"", "'$1'", "'$<a>'", "'[$&|$`|$\\'|$$]'", "'$'", "''", "7"]


def hardened(*, small_windows: bool = True) -> quickjs.Context:
    source = js_stdlib.hardening()
    for old, new in SMALL_WINDOWS.items():
        assert old in source, f"hardening.js no longer says {old!r}: update this test"
        if small_windows:
            source = source.replace(old, new)
    context = quickjs.Context()
    context.eval(source)
    return context


def cases(seed: int) -> Iterator[tuple[str, str, str, str]]:
    rng = random.Random(seed)
    for _ in range(120):
        text = "".join(rng.choice("ab") for _ in range(rng.randint(0, 24)))
        pattern = "".join(rng.choice("ab") for _ in range(rng.randint(2, 5)))
        if rng.random() < 0.3 and len(text) > 4:  # a pattern that occurs
            start = rng.randint(0, len(text) - 3)
            pattern = text[start:start + rng.randint(2, 4)]
        for name, body in BODIES.items():
            kind = name.removeprefix("traced-")
            values = POSITIONS if kind in ("indexOf", "lastIndexOf", "includes") else (
                LIMITS if kind == "split" else TEMPLATES)
            yield name, body, json.dumps(text) + ", " + json.dumps(pattern), rng.choice(values)


def run_case(context: quickjs.Context, body: str, strings: str, extra: str) -> object:
    return json.loads(context.eval(f"({CASE})({strings}, {extra}, {body})"))


@pytest.mark.parametrize("small_windows", [True, False], ids=["windowed", "short-patterns"])
@pytest.mark.parametrize("seed", range(4))
def test_windowed_string_searches_answer_as_the_engine_does(seed: int, small_windows: bool) -> None:
    # With the windows shrunk every case takes the windowed path; with the real ones, the
    # short patterns take the path straight to the built-in.
    native, wrapped = quickjs.Context(), hardened(small_windows=small_windows)
    mismatches = []
    for name, body, strings, extra in cases(seed):
        expected, got = run_case(native, body, strings, extra), run_case(wrapped, body, strings, extra)
        if expected != got:
            mismatches.append(f"{name}({strings}, {extra}): engine {expected}, wrapped {got}")
    assert not mismatches, f"{len(mismatches)} differ, e.g.:\n" + "\n".join(mismatches[:10])


SPECIAL_CASES = [
    "'abc'.indexOf(Symbol())",
    "String.prototype.indexOf.call(null, 'a')",
    "String.prototype.split.call(undefined, 'a')",
    "'abab'.includes(/ab/)",
    "'abab'.includes({ [Symbol.match]: false, toString() { return 'ba' } })",
    "'abab'.replaceAll(/b/, 'x')",
    "'abab'.replaceAll(/b/g, 'x')",
    "'abab'.replaceAll({ [Symbol.match]: true, flags: 'g', [Symbol.replace]: (s, r) => s + r }, '!')",
    "'abab'.replaceAll({ [Symbol.match]: true, flags: null }, 'x')",
    "'abab'.replace({ [Symbol.replace]: 5 }, 'x')",
    "'abab'.replace(/(a)(b)/g, '$2$1')",
    "'a,b,,c'.split(/,/)",
    "'abab'.split({ [Symbol.split]: (s, lim) => [s, lim] }, 3)",
    "'abcabc'.split('')",
    "'abcabc'.split(undefined, 1)",
    "'abab'.indexOf('ab', 1n)",
    "'abab'.split('ab', 1n)",
    "[1, [2, [3]]].flat(Infinity).join('-')",
    "[3, 1, 2].sort().concat([4], 5, { length: 1, 0: 6, [Symbol.isConcatSpreadable]: true }).join()",
    "Array.prototype.join.call({ length: 3, 0: 'x', 2: 'z' }, '+')",
    "[1, 2, 3, 4].splice(1, 2).reverse().toString()",
    "[1, 2, 3].copyWithin(0, 1).slice(1).toLocaleString()",
    "[[1], [2]].flatMap((x) => x).unshift(0)",
    "[].join.length + ''.indexOf.length + ''.replaceAll.length + [].sort.length + [].concat.length",
    "'abcb'.includes({ [Symbol.toStringTag]: 'RegExp', toString() { return 'b' } })",
    "'abab'.replaceAll({ [Symbol.toStringTag]: 'RegExp', toString() { return 'b' } }, 'x')",
    "new ''.indexOf('a')",
    "new [].join()",
    "Object.hasOwn(''.split, 'prototype') || Object.hasOwn([].join, 'prototype')",
    "Array.prototype.concat.call({ length: 2 ** 40 }).length",
    "Array.prototype.sort.call({ length: 2 ** 40 }, 5)",
    "Object.getOwnPropertyNames(Array.prototype).filter((k) => Object.getOwnPropertyDescriptor(Array.prototype, k).enumerable).length",
]


@pytest.mark.parametrize("expression", SPECIAL_CASES)
def test_other_paths_answer_as_the_engine_does(expression: str) -> None:
    body = f"() => {expression}"
    expected = run_case(quickjs.Context(), body, "'', ''", "undefined")
    got = run_case(hardened(), body, "'', ''", "undefined")
    assert got == expected


HUGE = [
    "String(Array(2 ** 32 - 1))",
    "Array(2 ** 32 - 1).sort()",
    "Array.prototype.join.call({ length: 1e12 })",
    "Array.prototype.reverse.call({ length: 2 ** 40 })",
    "[].concat({ length: 1e12, [Symbol.isConcatSpreadable]: true })",
    "Array(2 ** 32 - 1).flat()",
]


@pytest.mark.parametrize("expression", HUGE)
def test_array_methods_refuse_lengths_no_heap_holds(expression: str) -> None:
    context = hardened()
    context.set_time_limit(5)  # the engine would not stop these: they would run for minutes
    outcome = run_case(context, f"() => {expression}", "'', ''", "undefined")
    assert outcome == {"error": "RangeError", "log": []}


@pytest.mark.anyio
async def test_honest_work_on_long_strings_and_arrays_is_not_slowed_down() -> None:
    """A 4 MB text read line by line, and a replaceAll of two million short matches: a few
    hundredths of a second in the engine, and still well inside a 1 s slice with the wrappers."""
    script = """
const text = 'a line of some text\\r\\n'.repeat(200000)
let lines = 0
for (let i = text.indexOf('\\r\\n'); i !== -1; i = text.indexOf('\\r\\n', i + 1)) lines++
const rows = 'ab'.repeat(2 ** 21).replaceAll('ab', 'x').length
const parts = text.split('\\r\\n').length
return [lines, rows, parts, Array.from({ length: 100000 }, (_, i) => i).join('').length]
"""
    with anyio.fail_after(30):
        async with Engine(make_settings(slice_cpu_s=1.0, heap_bytes=64 * 1024 * 1024), MemoryStore(),
                          recover=False) as engine:
            record = await engine.wait((await engine.submit(RunRequest(script=script, options=OPTIONS))).id)
    assert record.status == "completed", record.error
    assert record.result == [200000, 2 ** 21, 200001, 488890]


@pytest.mark.anyio
async def test_a_failure_inside_a_wrapped_built_in_points_at_the_script() -> None:
    # The user's own function named like a wrapped built-in is not skipped.
    script = "function split(text) {\n  return text.trim()\n}\nconst rows = [' a ', 7]\nreturn rows.map(split)"
    with anyio.fail_after(20):
        async with Engine(make_settings(), MemoryStore(), recover=False) as engine:
            record = await engine.wait((await engine.submit(RunRequest(script=script, options=OPTIONS))).id)
            sorted_ = await engine.wait((await engine.submit(RunRequest(
                script="const x = 1\nreturn [2, 1].sort(5)", options=OPTIONS))).id)
    assert record.error is not None and (record.error["line"], record.error["name"]) == (2, "TypeError")
    assert sorted_.error is not None and (sorted_.error["line"], sorted_.error["name"]) == (2, "TypeError")


ATTACKS = {
    "a sparse array as a string": "return String(Array(2 ** 32 - 1)).length",
    "a quadratic search": "const s = 'a'.repeat(400000)\nreturn s.indexOf('a'.repeat(200000) + 'b')",
    "one hidden behind toString": "const s = 'a'.repeat(400000)\nconst p = 'a'.repeat(200000) + 'b'\n"
                                  "return s.split({ toString() { return p } }).length",
    "a loop of slow searches": "const s = 'a'.repeat(20000), p = 'a'.repeat(10000) + 'b'\nlet c = 0\nfor (;;) c += s.indexOf(p)",
    "a loop of long joins": "const a = Array(2 ** 24)\nfor (;;) a.join('')",
}


@pytest.mark.anyio
@pytest.mark.parametrize("name", ATTACKS)
async def test_built_in_attacks_end_at_the_slice_limit(name: str) -> None:
    """Each of these ran for minutes to hours inside the engine before its wrappers; the pool
    would abandon them at 3 × 0.2 + 2 s. They must end on their own, with no slice abandoned."""
    with anyio.fail_after(20):
        async with Engine(make_settings(slice_cpu_s=0.2), MemoryStore(), recover=False) as engine:
            record = await engine.wait((await engine.submit(RunRequest(script=ATTACKS[name], options=OPTIONS))).id)
            assert record.status == "failed" and record.error is not None
            assert record.error["name"] in ("cpu_slice", "RangeError"), record.error
            assert "single built-in call" not in record.error["message"]
            assert engine.pool.statistics().overruns_total == 0
