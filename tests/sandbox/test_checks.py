"""Static checks (SPEC §1.2): every expected position below was counted by hand from the source text."""

from __future__ import annotations

import threading
import time

import pytest

from sandbox._checks import CheckResult, PhaseSpec, ScriptMeta, check_script
from sandbox._source import Diagnostic

TS_HINT = "quickflow runs plain JavaScript only: remove the type syntax"


def positions(diagnostics: tuple[Diagnostic, ...]) -> list[tuple[int, int]]:
    return [(d.line, d.column) for d in diagnostics]


def assert_diagnostics(found: tuple[Diagnostic, ...], expected: list[tuple[int, int, str]]) -> None:
    assert positions(found) == [(line, column) for line, column, _ in expected], found
    for diagnostic, (_, _, fragment) in zip(found, expected):
        assert fragment in diagnostic.message, diagnostic


# --- scripts that must pass -------------------------------------------------------------------

VALID = {
    "top-level await and return": "const r = await agent('hi')\nreturn r",
    "empty script": "",
    "comments only": "// nothing to do\n/* really */",
    "async arrow functions": "const f = async (x) => { return await agent(x) }\nreturn await f('a')",
    "parallel of thunks": (
        "const rs = await parallel([1, 2].map((i) => () => agent(`item ${i}`)))\nreturn rs.filter(Boolean)"
    ),
    "classes with private and static members": (
        "class Box {\n  #v = 1\n  static #count = 0\n  static { Box.#count = 1 }\n"
        "  static of() { return new Box() }\n  get v() { return this.#v }\n}\nreturn Box.of().v"
    ),
    "regex that looks like a generic": "const re = /a<b>(c)/gi\nreturn 'x'.replace(re, '')",
    "nested template literals": "const n = 2\nreturn `n=${n} ${`inner ${n}`}`",
    "optional chaining and nullish": "const o = args?.a?.b ?? null\nreturn o?.[0]?.()",
    "destructuring with defaults and rest": (
        "const { a, b: [c, ...d] = [], ...rest } = args ?? {}\nreturn [a, c, d, rest]"
    ),
    "labelled loops": (
        "outer: for (const i of [1, 2]) {\n"
        "  for (const j of [3]) { if (j > i) continue outer; break outer }\n"
        "}\nreturn 1"
    ),
    "generators and spread": "function* g() { yield 1; yield 2 }\nreturn [...g()]",
    "for await": "for await (const x of [Promise.resolve(1)]) log(x)",
    "optional catch binding": "try { await agent('x') } catch { log('no') } finally { log('done') }",
    "comparisons that are not generics": "const a = 1, b = 2\nreturn [(a < b) > (0), a < b && b > (a)]",
    "bigint and numeric separators": "return (10n ** 3n).toString() + 1_000",
    "object spread and getters": "const o = { ...args, get x() { return 1 } }\nreturn o.x",
    "module words inside strings and comments": (
        "log('import x from y; require(z)') // import('m')\nreturn 'export default'"
    ),
    "non-ASCII text": "const s = 'héllo wörld 😀'\nreturn s.length",
    "deterministic date APIs": (
        "const d = new Date(args.ts)\nreturn Date.parse('2020-01-01') + Date.UTC(2020, 0) + d.getTime()"
    ),
    "CRLF line endings": "const a = 1\r\nreturn a",
}


@pytest.mark.parametrize("source", list(VALID.values()), ids=list(VALID))
def test_valid_scripts_pass(source: str) -> None:
    result = check_script(source)
    assert result.errors == ()
    assert result.ok
    assert result.warnings == ()
    assert result.body == source  # no meta: nothing blanked


# --- TypeScript -------------------------------------------------------------------------------

TYPESCRIPT = [
    ("const x: number = 1", 1, 8, "type annotation"),
    ("const a = 1\n\nconst b: string = 'x'", 3, 8, "type annotation"),
    ("let a = 1\nfunction f(a, b?: number) {}", 2, 15, "optional parameter"),
    ("const f = async (x: number): Promise<void> => x", 1, 19, "type annotation"),
    ("const label = 'é'; let n: number = 1", 1, 25, "type annotation"),  # columns count characters
    ("interface Point { x: number }", 1, 1, "interface"),
    ("const a = 1\ntype Id = string", 2, 1, "type alias"),
    ("const n = args as number", 1, 11, "`as` expression"),
    ("let s = 'x'\nconst y = (s as any).z", 2, 12, "`as` expression"),
    ("const cfg = { a: 1 } satisfies Config", 1, 13, "`satisfies` expression"),
    ("const r = await agent<string>('p')", 1, 22, "generic type arguments"),
    ("function id<T>(x) { return x }", 1, 12, "generic type parameters"),
    ("let a = <number>b", 1, 9, "type assertion"),
    ("enum Color { Red }", 1, 1, "enum"),
    ("const v = args!.value", 1, 11, "non-null assertion"),
    ("class A {\n  private x = 1\n}", 2, 3, "access modifier"),
    ("class C {\n  readonly id = 1\n}", 2, 3, "`readonly` modifier"),
    ("class K { override m() {} }", 1, 11, "`override` modifier"),
    ("declare const g: number", 1, 1, "`declare`"),
    ("namespace N {\n  export const a = 1\n}", 1, 1, "namespace"),
    ("module M {}", 1, 1, "module declaration"),
    ("abstract class Shape {}", 1, 1, "abstract class"),
    ("class D implements E {}", 1, 9, "`implements` clause"),
    ("function h(x: number): string;\nfunction h(x) { return x }", 1, 1, "function overload signature"),
]


@pytest.mark.parametrize(("source", "line", "column", "kind"), TYPESCRIPT, ids=[t[3] + ":" + t[0] for t in TYPESCRIPT])
def test_typescript_is_rejected_at_its_position(source: str, line: int, column: int, kind: str) -> None:
    result = check_script(source)
    assert result.errors == (Diagnostic(line, column, f"TypeScript syntax is not supported ({kind})", TS_HINT),)


# --- modules ----------------------------------------------------------------------------------

MODULES = [
    ("import fs from 'fs'", [(1, 1, "import declarations are not available")]),
    ("const x = 1\nconst m = await import('./m.js')", [(2, 17, "import() is not available")]),
    ("const fs = require('fs')", [(1, 12, "require() is not available")]),
    ("log(import.meta.url)", [(1, 5, "import.meta is not available")]),
    ("require('a')\nrequire('b')", [(1, 1, "require()"), (2, 1, "require()")]),
    ("export default 42", [(1, 1, "only `export const meta = {...}` may be exported")]),
    ("export function f() {}", [(1, 1, "only `export const meta")]),
    ("x = 1\nexport { x }", [(2, 1, "only `export const meta")]),
    ("export let meta = { name: 'a', description: 'b' }", [(1, 1, "only `export const meta")]),
]


@pytest.mark.parametrize(("source", "expected"), MODULES, ids=[m[0] for m in MODULES])
def test_modules_are_rejected_at_their_position(source: str, expected: list[tuple[int, int, str]]) -> None:
    result = check_script(source)
    assert_diagnostics(result.errors, expected)
    assert all(d.hint for d in result.errors)


# --- meta -------------------------------------------------------------------------------------

META_ERRORS = [
    ("return 1", True, [(1, 1, "saved workflows need `export const meta = {...}`")]),
    ("x = 1\nexport const meta = { name: 'a', description: 'b' }", False, [(2, 1, "must be the first statement")]),
    ("export const meta = { name: NAME, description: 'd' }", False, [(1, 29, "identifier `NAME` is not allowed")]),
    ("export const meta = { name: 'a', description: describe() }", False, [(1, 47, "a function call is not allowed")]),
    ("export const meta = { name: 'a', description: undefined }", False, [(1, 47, "`undefined` is not allowed")]),
    ("export const meta = { ...base, name: 'a', description: 'b' }", False, [(1, 23, "spread (`...`) is not allowed")]),
    ("export const meta = { name: `a-${1}`, description: 'b' }", False, [(1, 32, "template substitutions")]),
    ("export const meta = { ['name']: 'a', description: 'b' }", False, [(1, 23, "computed keys")]),
    ("export const meta = { name, description: 'b' }", False, [(1, 23, "shorthand property `name`")]),
    ("export const meta = [1]", False, [(1, 21, "must be an object literal")]),
    ("export const meta = { name: 'Bad Name', description: 'b' }", False, [(1, 29, "meta.name must match")]),
    ("export const meta = { name: 'ok' }", False, [(1, 21, "meta.description is required")]),
    ("export const meta = { description: 'd' }", False, [(1, 21, "meta.name is required")]),
    ("export const meta = { name: 'a', description: 'b', whenToUse: 42 }", False, [(1, 63, "must be a string")]),
    ("export const meta = { name: 'a', description: 'b', phases: 'x' }", False, [(1, 60, "must be an array")]),
    (
        "export const meta = { name: 'a', description: 'b', x: " + "[" * 40 + "]" * 40 + " }",
        False,
        [(1, 87, "nested more than 32 levels deep")],  # the 33rd `[`; the first is at column 55
    ),
    (
        "export const meta = { name: 'a', description: 'b', phases: [{ detail: 'x' }] }",
        False,
        [(1, 61, "meta.phases[0].title must be a non-empty string")],
    ),
    (
        "export const meta = {\n  name: 'a',\n  description: 'b',\n  tags: [1, , 2],\n}",
        False,
        [(4, 13, "array holes")],
    ),
]


@pytest.mark.parametrize(("source", "require_meta", "expected"), META_ERRORS, ids=[m[0][:50] for m in META_ERRORS])
def test_meta_errors(source: str, require_meta: bool, expected: list[tuple[int, int, str]]) -> None:
    result = check_script(source, require_meta=require_meta)
    assert_diagnostics(result.errors, expected)
    assert result.meta is None


def test_meta_is_optional_for_ad_hoc_runs() -> None:
    result = check_script("return 1")
    assert result.ok and result.meta is None


FULL_META = """// A leading comment is fine.
/* so is a block comment */
export const meta = {
  name: 'triage-issues_2',
  description: "Triage \\"open\\" issues \\u{1F600}",
  whenToUse: `when the backlog grows`,
  phases: [
    { title: 'Read', detail: 'read each issue' },
    { title: 'Decide', model: 'opus', },
  ],
  owner: 'me',
  extra: { n: -1.5, ok: true, none: null, list: [0x10, 1e3] },
};
const issues = args.issues
return await parallel(issues.map((i) => () => agent(`triage ${i}`)))
"""


def test_full_meta_is_read_statically() -> None:
    result = check_script(FULL_META, require_meta=True)
    assert result.errors == ()
    assert result.meta == ScriptMeta(
        name="triage-issues_2",
        description='Triage "open" issues \U0001f600',
        when_to_use="when the backlog grows",
        phases=(PhaseSpec("Read", detail="read each issue"), PhaseSpec("Decide", model="opus")),
    )
    assert result.meta.to_dict() == {
        "name": "triage-issues_2",
        "description": 'Triage "open" issues \U0001f600',
        "whenToUse": "when the backlog grows",
        "phases": [{"title": "Read", "detail": "read each issue"}, {"title": "Decide", "model": "opus"}],
    }
    # Unknown keys are warnings, at the key.
    assert_diagnostics(result.warnings, [(11, 3, "unknown key `owner`"), (12, 3, "unknown key `extra`")])
    assert all(w.severity == "warning" for w in result.warnings)


def test_body_blanks_only_the_export_keyword() -> None:
    result = check_script(FULL_META)
    assert len(result.body) == len(FULL_META)
    assert result.body == FULL_META.replace("export const meta", "       const meta", 1)
    # Everything after the keyword is untouched, so positions are identical.
    assert result.body.splitlines()[2] == "       const meta = {"
    assert result.body.index("return await") == FULL_META.index("return await")


def test_body_blanking_after_non_ascii_comment() -> None:
    source = "// résumé 😀\nexport const meta = { name: 'a', description: 'b' }\nreturn 1"
    result = check_script(source)
    assert result.ok
    assert result.body == "// résumé 😀\n       const meta = { name: 'a', description: 'b' }\nreturn 1"


def test_meta_without_phases_has_empty_tuple() -> None:
    result = check_script("export const meta = { name: 'a', description: 'b' }")
    assert result.meta == ScriptMeta("a", "b", None, ())
    assert result.to_dict() == {
        "ok": True,
        "errors": [],
        "warnings": [],
        "meta": {"name": "a", "description": "b", "whenToUse": None, "phases": []},
    }


# --- syntax errors: the engine's verdict and position -----------------------------------------

SYNTAX = [
    # Line 1 proves the wrapper prefix is subtracted from columns.
    ("const x = ;", 1, 11, "SyntaxError: unexpected token in expression: ';'"),
    ("const a = 1\nconst b = 2\nconst x = ;", 3, 11, "SyntaxError: unexpected token in expression: ';'"),
    ("é = 1; const x = ;", 1, 18, "SyntaxError: unexpected token in expression: ';'"),  # engine counts bytes
    ("const s = 'abc", 1, 11, "unexpected end of string"),
    ("outer: for (;;) { break inner }", 1, 25, "label not found"),
    ("if (x) {", 1, 9, "SyntaxError: unexpected end of script"),
    ("foo(\n\n", 1, 5, "SyntaxError: unexpected end of script"),
    ("return 1 }", 1, 10, "SyntaxError: unexpected `}`"),
    ("#!/usr/bin/env node\nreturn 1", 1, 1, "a `#!` line is not allowed"),
    ("x = " + "(" * 5000 + "1" + ")" * 5000, 1, 1, "nested too deeply to compile"),
    # The meta's `export` is blanked before the engine sees the script.
    ("export const meta = { name: 'a', description: 'b' }\nconst x = ;", 2, 11, "unexpected token in expression"),
]


@pytest.mark.parametrize(("source", "line", "column", "message"), SYNTAX, ids=[s[0][:40] for s in SYNTAX])
def test_syntax_errors_have_exact_positions(source: str, line: int, column: int, message: str) -> None:
    result = check_script(source)
    assert positions(result.errors) == [(line, column)]
    assert message in result.errors[0].message


def test_a_body_that_closes_the_wrapper_is_compiled_never_run() -> None:
    # Wrapped, this is `(async function () {}); throw new Error('ran'); (function () {\n})`, which
    # compiles. Had the checker run it, the error would be "Error: ran".
    result = check_script("}); throw new Error('ran'); (function () {")
    assert result.errors == (Diagnostic(1, 1, "SyntaxError: unexpected `}`"),)


# --- size -------------------------------------------------------------------------------------


def test_size_limit_counts_utf8_bytes() -> None:
    source = "'" + "é" * 60 + "'"  # 62 characters, 122 bytes
    assert check_script(source, max_bytes=122).ok
    result = check_script(source, max_bytes=121)
    assert result.errors == (
        Diagnostic(
            1, 1, "the script is 122 bytes; the limit is 121 bytes", "pass large data in `args` instead of the script"
        ),
    )


def test_default_size_limit_is_512_kib() -> None:
    at_limit = "//" + "x" * (512 * 1024 - 2)
    assert check_script(at_limit).ok
    result = check_script(at_limit + "x")
    assert positions(result.errors) == [(1, 1)]
    assert "524,289 bytes" in result.errors[0].message and "524,288" in result.errors[0].message


def test_lone_surrogate_is_an_error_not_a_crash() -> None:
    result = check_script("x = '\ud800'")
    assert positions(result.errors) == [(1, 6)]


# --- determinism warnings ---------------------------------------------------------------------

WARNINGS = [
    ("const t = Date.now()", [(1, 11, "`Date.now()` throws at run time")]),
    ("return Math.random() * 10", [(1, 8, "`Math.random()` throws at run time")]),
    ("const d = new Date()", [(1, 11, "`new Date()` without arguments")]),
    ("const d = new Date", [(1, 11, "`new Date()` without arguments")]),
    ("log(Date())", [(1, 5, "`Date()` throws at run time")]),
    ("const f = Date.now\nconst g = Math['random']", [(1, 11, "Date.now"), (2, 11, "Math.random")]),
]


@pytest.mark.parametrize(("source", "expected"), WARNINGS, ids=[w[0] for w in WARNINGS])
def test_nondeterminism_is_a_warning(source: str, expected: list[tuple[int, int, str]]) -> None:
    result = check_script(source)
    assert result.ok
    assert_diagnostics(result.warnings, expected)
    assert all(w.severity == "warning" and w.hint for w in result.warnings)


def test_warnings_are_kept_when_a_later_step_fails() -> None:
    result = check_script("const t = Date.now()\nimport x from 'y'")
    assert_diagnostics(result.errors, [(2, 1, "import declarations")])
    assert_diagnostics(result.warnings, [(1, 11, "Date.now")])


# --- shape and performance --------------------------------------------------------------------


def test_to_dict_shape() -> None:
    result = check_script("const x: number = 1")
    assert isinstance(result, CheckResult)
    assert result.to_dict() == {
        "ok": False,
        "errors": [
            {
                "line": 1,
                "column": 8,
                "message": "TypeScript syntax is not supported (type annotation)",
                "hint": TS_HINT,
                "severity": "error",
            }
        ],
        "warnings": [],
        "meta": None,
    }


def test_a_500_kib_script_is_checked_quickly() -> None:
    header = "export const meta = { name: 'big', description: 'many agents' }\nconst results = []\n"
    line = "results.push(await agent(`Summarise part {i} of the report`, {{ label: 'part {i}', phase: 'read' }}))\n"
    source = header + "".join(line.format(i=i) for i in range(5000))
    assert 480 * 1024 < len(source.encode()) < 512 * 1024
    start = time.perf_counter()
    result = check_script(source + "return results")
    elapsed = time.perf_counter() - start
    assert result.ok, result.errors
    assert elapsed < 2.0  # typically ~0.2 s; generous for slow CI machines


def test_checks_run_concurrently_on_threads() -> None:
    outcomes: list[bool] = []
    lock = threading.Lock()

    def work() -> None:
        for _ in range(20):
            ok = check_script("const r = await agent('x')\nreturn r").ok
            bad = check_script("const x: number = 1").ok
            with lock:
                outcomes.append(ok and not bad)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert outcomes == [True] * 80
