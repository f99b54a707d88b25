"""Static checks a script passes before a run is accepted (SPEC §1.2).

``check_script`` runs these steps in order and stops at the first step that finds an error (later
steps would only report noise); warnings are collected whenever the script could be parsed:

1. Size: the UTF-8 encoding must fit in ``max_bytes`` (and be encodable at all).
2. Parse with tree-sitter's JavaScript grammar. The script is a function body, and the grammar
   accepts top-level ``await`` and ``return``, so the raw source is parsed. On a parse error the
   TypeScript grammar decides whether the cause is TypeScript syntax (reported at the TS node);
   otherwise the engine's compile error (step 5) gives the syntax verdict and position.
3. No modules: ``import`` declarations, ``import()``, ``import.meta``, ``require(...)``, and any
   ``export`` other than ``export const meta``.
4. ``export const meta = {...}``: first statement, pure literal, valid fields (``_meta.py``).
   ``CheckResult.body`` is the source with that ``export`` keyword blanked to spaces.
5. Engine compile of ``wrap_body(body)`` in a throw-away, tightly limited QuickJS context.
6. Warnings for ``Date.now``, ``Math.random``, ``Date()`` and argument-less ``new Date()``, which
   throw at run time because a resumed run must replay identically.

Positions are 1-based; columns count characters (code points). tree-sitter and QuickJS both
count UTF-8 bytes, so both are converted here.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any

import quickjs
import tree_sitter_javascript
import tree_sitter_typescript
from tree_sitter import Language, Node, Parser, Query, QueryCursor

from ._meta import PhaseSpec, ScriptMeta, meta_declarator, read_meta
from ._source import Diagnostic, engine_position, wrap_body

__all__ = ["CheckResult", "PhaseSpec", "ScriptMeta", "check_script"]

MAX_SCRIPT_BYTES = 512 * 1024

_TS_HINT = "quickflow runs plain JavaScript only: remove the type syntax"
_MODULE_HINT = (
    "workflow scripts have no modules: use the globals agent, parallel, pipeline, phase, log, "
    "workflow, args and budget"
)
_EXPORT_HINT = "remove `export`: the script's result is its return value"

# TypeScript-only node types of the TS grammar, in the words the error message uses.
_TS_KINDS = {
    "type_annotation": "type annotation",
    "opting_type_annotation": "type annotation",
    "omitting_type_annotation": "type annotation",
    "adding_type_annotation": "type annotation",
    "asserts_annotation": "type annotation",
    "type_predicate_annotation": "type annotation",
    "optional_parameter": "optional parameter",
    "interface_declaration": "interface",
    "type_alias_declaration": "type alias",
    "as_expression": "`as` expression",
    "satisfies_expression": "`satisfies` expression",
    "type_arguments": "generic type arguments",
    "type_parameters": "generic type parameters",
    "type_assertion": "type assertion",
    "enum_declaration": "enum",
    "non_null_expression": "non-null assertion",
    "accessibility_modifier": "access modifier",
    "override_modifier": "`override` modifier",
    "readonly": "`readonly` modifier",
    "ambient_declaration": "`declare`",
    "internal_module": "namespace",
    "module": "module declaration",
    "abstract_class_declaration": "abstract class",
    "abstract_method_signature": "abstract method",
    "implements_clause": "`implements` clause",
    "index_signature": "index signature",
    "function_signature": "function overload signature",
    "method_signature": "method overload signature",
    "import_alias": "`import =` alias",
}
_TS_QUERY = "[" + " ".join(f'"{k}"' if k == "readonly" else f"({k})" for k in _TS_KINDS) + "] @ts"

# Steps 3 and 6 and the generic-call check look only where a keyword occurs in the text, then
# inspect the node there: this costs per occurrence, where a query walks the whole tree (0.3 s on a
# 500 KiB script). Every hit is confirmed on the tree, so strings and comments never match.
_MODULE_WORDS = re.compile(rb"\b(?:import|require|export)\b")
_DETERMINISM_WORDS = re.compile(rb"\b(?:Date|Math)\b")
_GENERIC_CALL_END = re.compile(rb">\s*\(")  # `f<T>(x)` parses as JavaScript: `(f < T) > (x)`

_TIMESTAMP_HINT = "pass timestamps in through `args`; `new Date(x)`, `Date.parse` and `Date.UTC` work"
_DETERMINISM = {
    "date_now": ("`Date.now()` throws at run time", _TIMESTAMP_HINT),
    "new_date": ("`new Date()` without arguments throws at run time", _TIMESTAMP_HINT),
    "date_call": ("`Date()` throws at run time", _TIMESTAMP_HINT),
    "math_random": (
        "`Math.random()` throws at run time",
        "vary prompts deterministically instead, e.g. put the item's index in the prompt",
    ),
}
_DETERMINISM_WHY = ": scripts must be deterministic so a resumed run replays them exactly"

# The throw-away compile context. The time limit matches the run's default CPU slice: a script
# the checker accepts must also compile inside a run.
_COMPILE_MEMORY = 16 * 1024 * 1024
_COMPILE_SECONDS = 1.0
_COMPILE_STACK = 1024 * 1024
# Evaluated before the wrapped body, so even a body that closes the wrapper early (`}); code();
# (function () {`) is only compiled, never run: a script is compiled in full before its first
# statement executes.
_SENTINEL = "quickflow:compiled"
_GUARD = f'throw "{_SENTINEL}";'


@dataclass(frozen=True)
class CheckResult:
    """The outcome of ``check_script``. ``body`` is what the engine compiles and runs."""

    errors: tuple[Diagnostic, ...]
    warnings: tuple[Diagnostic, ...]
    meta: ScriptMeta | None
    body: str

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "errors": [diagnostic.to_dict() for diagnostic in self.errors],
            "warnings": [diagnostic.to_dict() for diagnostic in self.warnings],
            "meta": self.meta.to_dict() if self.meta is not None else None,
        }


def check_script(source: str, *, require_meta: bool = False, max_bytes: int = MAX_SCRIPT_BYTES) -> CheckResult:
    """Check ``source`` statically (it is never run); see the module docstring for the steps.

    ``require_meta`` is for saved workflows, which must declare ``export const meta``.
    """
    # 1. Size (and encodability: a lone surrogate can arrive through JSON).
    try:
        data = source.encode("utf-8")
    except UnicodeEncodeError as exc:
        line, column = _offset_position(source, exc.start)
        message = f"the script contains an invalid character (lone surrogate U+{ord(source[exc.start]):04X})"
        return _result([Diagnostic(line, column, message)], [], None, source)
    if len(data) > max_bytes:
        message = f"the script is {len(data):,} bytes; the limit is {max_bytes:,} bytes"
        return _result([Diagnostic(1, 1, message, "pass large data in `args` instead of the script")], [], None, source)

    text = _Text(source, data)
    root = _parsers().javascript.parse(data).root_node
    warnings = _determinism_warnings(root, text)

    # 2. Syntax, with TypeScript recognised as such.
    syntax_error = _syntax_error(root, text) if root.has_error else _javascript_traps(root, text)
    if syntax_error is not None:
        return _result([syntax_error], warnings, None, source)

    # 3. Modules.
    errors = _module_errors(root, text)
    if errors:
        return _result(errors, warnings, None, source)

    # 4. Meta.
    meta, errors, meta_warnings, body = _meta_step(root, text, require_meta)
    warnings.extend(meta_warnings)
    if errors:
        return _result(errors, warnings, None, body)

    # 5. Engine compile.
    engine_error = _compile(body, text, [])
    if engine_error is not None:
        return _result([engine_error], warnings, None, body)
    return _result([], warnings, meta, body)


def _result(errors: list[Diagnostic], warnings: list[Diagnostic], meta: ScriptMeta | None, body: str) -> CheckResult:
    def order(diagnostic: Diagnostic) -> tuple[int, int]:
        return diagnostic.line, diagnostic.column

    return CheckResult(tuple(sorted(errors, key=order)), tuple(sorted(warnings, key=order)), meta, body)


def _offset_position(source: str, offset: int) -> tuple[int, int]:
    """1-based position of a character offset into ``source``."""
    line_start = source.rfind("\n", 0, offset) + 1
    return source.count("\n", 0, offset) + 1, offset - line_start + 1


class _Text:
    """Converts tree-sitter and engine positions (UTF-8 byte columns) to 1-based character positions."""

    def __init__(self, source: str, data: bytes) -> None:
        self.source = source
        self.data = data
        self.ascii = source.isascii()
        self._lines: list[str] | None = None

    def position(self, node: Node) -> tuple[int, int]:
        row, byte_column = node.start_point
        if self.ascii:
            return row + 1, byte_column + 1
        line_start = node.start_byte - byte_column
        return row + 1, len(self.data[line_start : node.start_byte].decode("utf-8", "replace")) + 1

    def engine_point(self, line: int, byte_column: int) -> tuple[int, int] | None:
        """Character position for an engine position, or None when it lies past the user's source."""
        if self._lines is None:
            self._lines = self.source.split("\n")
        if line > len(self._lines):
            return None
        encoded = self._lines[line - 1].encode("utf-8")
        if byte_column > len(encoded) + 1:
            return None
        return line, len(encoded[: byte_column - 1].decode("utf-8", "replace")) + 1

    def end_position(self) -> tuple[int, int]:
        """Just after the last non-whitespace character."""
        return _offset_position(self.source, len(self.source.rstrip()))

    def blank_exports(self, statements: list[Node]) -> str:
        """The source with the ``export`` keyword starting each statement replaced by six spaces.

        Same length, so every position in the result is the same as in the source.
        """
        body = self.source
        for statement in statements:
            start = len(self.data[: statement.start_byte].decode("utf-8"))
            if body[start : start + 6] == "export":
                body = body[:start] + " " * 6 + body[start + 6 :]
        return body


# --- step 2: syntax ---------------------------------------------------------------------------


def _syntax_error(root: Node, text: _Text) -> Diagnostic:
    spans = _error_nodes(root)
    typescript = _typescript_error(text, spans)
    if typescript is not None:
        return typescript
    # Blank top-level `export`s so the engine reports the real error, not the export keyword.
    exports = [child for child in root.named_children if child.type == "export_statement"]
    engine_error = _compile(text.blank_exports(exports), text, spans)
    if engine_error is not None:
        return engine_error
    # The engine accepted what tree-sitter rejected (e.g. a body that closes the wrapper early).
    if not spans:  # pragma: no cover - has_error implies an ERROR or MISSING node
        return Diagnostic(1, 1, "SyntaxError: the script could not be parsed")
    return _tree_sitter_error(spans[0], text)


def _typescript_error(text: _Text, js_errors: list[Node]) -> Diagnostic | None:
    parsers = _parsers()
    tree = parsers.typescript.parse(text.data)
    captured = QueryCursor(parsers.ts_query).captures(tree.root_node).get("ts", [])
    candidates = sorted(captured, key=lambda node: (node.start_byte, -node.end_byte))
    if not candidates:
        return None

    def overlaps_js_error(node: Node) -> bool:
        return any(node.start_byte <= e.end_byte and e.start_byte <= node.end_byte for e in js_errors)

    chosen = next((node for node in candidates if overlaps_js_error(node)), None)
    if chosen is None and not tree.root_node.has_error:
        # Valid TypeScript but invalid JavaScript: TS syntax is the cause even if the JS grammar
        # recovered somewhere else.
        chosen = candidates[0]
    if chosen is None:
        return None
    line, column = text.position(chosen)
    return Diagnostic(line, column, f"TypeScript syntax is not supported ({_TS_KINDS[chosen.type]})", _TS_HINT)


def _javascript_traps(root: Node, text: _Text) -> Diagnostic | None:
    """Syntax the JavaScript grammar accepts but that cannot be meant in a workflow script."""
    first = root.named_child(0) if root.named_child_count else None
    if first is not None and first.type == "hash_bang_line":
        return Diagnostic(1, 1, "a `#!` line is not allowed in a workflow script", "remove the first line")
    return _generic_call(root, text)


def _generic_call(root: Node, text: _Text) -> Diagnostic | None:
    """``agent<string>(p)`` is valid JavaScript, ``(agent < string) > (p)``, but never meant as such.

    Where the JS tree has that shape, the TypeScript grammar decides if it is a generic call.
    """
    suspects: list[int] = []  # byte offsets of the `<`
    for node in _tokens(root, text.data, _GENERIC_CALL_END):
        comparison = node.parent
        if node.type != ">" or comparison is None or comparison.type != "binary_expression":
            continue
        left = comparison.child_by_field_name("left")
        right = comparison.child_by_field_name("right")
        if left is None or left.type != "binary_expression" or right is None:
            continue
        operator = left.child_by_field_name("operator")
        if operator is not None and operator.type == "<" and right.type == "parenthesized_expression":
            suspects.append(operator.start_byte)
    if not suspects:
        return None
    ts_root = _parsers().typescript.parse(text.data).root_node
    for start in suspects:
        less_than = ts_root.descendant_for_byte_range(start, start + 1)
        arguments = less_than.parent if less_than is not None else None
        if arguments is not None and arguments.type == "type_arguments":
            line, column = text.position(arguments)
            return Diagnostic(line, column, "TypeScript syntax is not supported (generic type arguments)", _TS_HINT)
    return None


def _tokens(root: Node, data: bytes, pattern: re.Pattern[bytes]) -> Iterator[Node]:
    """The smallest node at each match of ``pattern`` (the match's first byte for a token)."""
    for match in pattern.finditer(data):
        end = match.end() if match.group().isalpha() else match.start() + 1
        node = root.descendant_for_byte_range(match.start(), end)
        if node is not None and node.start_byte == match.start() and node.end_byte == end:
            yield node


def _error_nodes(root: Node) -> list[Node]:
    """ERROR and MISSING nodes, in source order (an iterative walk: trees can be deep)."""
    found: list[Node] = []
    stack = [root]
    while stack:
        node = stack.pop()
        if node.is_error or node.is_missing:
            found.append(node)
        if node.has_error:
            stack.extend(reversed(node.children))
    found.sort(key=lambda node: node.start_byte)
    return found


def _tree_sitter_error(node: Node, text: _Text) -> Diagnostic:
    line, column = text.position(node)
    if node.is_missing:
        return Diagnostic(line, column, f"SyntaxError: missing `{node.type}`")
    leaf = node
    while leaf.child_count:
        leaf = leaf.children[0]
    token = (leaf.text or b"").decode("utf-8", "replace")[:20]
    return Diagnostic(line, column, f"SyntaxError: unexpected `{token or 'input'}`")


def _past_the_end(text: _Text, spans: list[Node]) -> Diagnostic:
    """For an engine error inside the wrapper's closing ``})``, which describes wrapper tokens.

    Either a stray closing bracket ended the wrapper function early, or the script ended too early
    (an unclosed bracket, string or comment); say which, at the user's own position.
    """
    for node in spans:
        if node.is_error and text.data[node.start_byte : node.start_byte + 1] in (b")", b"]", b"}"):
            return _tree_sitter_error(node, text)
    line, column = text.end_position()
    hint = "a bracket, brace, string or comment is not closed"
    return Diagnostic(line, column, "SyntaxError: unexpected end of script", hint)


# --- step 3: modules --------------------------------------------------------------------------


def _module_errors(root: Node, text: _Text) -> list[Diagnostic]:
    errors: list[Diagnostic] = []

    def add(node: Node, message: str, hint: str) -> None:
        errors.append(Diagnostic(*text.position(node), message, hint))

    for node in _tokens(root, text.data, _MODULE_WORDS):
        parent = node.parent
        if parent is None:
            continue
        if node.type == "import" and parent.type == "import_statement":
            add(parent, "import declarations are not available in workflow scripts", _MODULE_HINT)
        elif node.type == "import" and parent.type == "import" and _is_callee(parent):
            add(parent.parent or parent, "import() is not available in workflow scripts", _MODULE_HINT)
        elif node.type == "import" and parent.type == "meta_property":
            add(parent, "import.meta is not available in workflow scripts", _MODULE_HINT)
        elif node.type == "identifier" and node.text == b"require" and _is_callee(node):
            add(parent, "require() is not available in workflow scripts", _MODULE_HINT)
        elif node.type == "export" and parent.type == "export_statement":
            if parent.parent != root or meta_declarator(parent) is None:
                add(parent, "only `export const meta = {...}` may be exported", _EXPORT_HINT)
    return errors


def _is_callee(node: Node) -> bool:
    parent = node.parent
    return parent is not None and parent.type == "call_expression" and parent.child_by_field_name("function") == node


# --- step 4: meta -----------------------------------------------------------------------------


def _meta_step(
    root: Node, text: _Text, require_meta: bool
) -> tuple[ScriptMeta | None, list[Diagnostic], list[Diagnostic], str]:
    """``(meta, errors, warnings, body)``; ``body`` has the meta's ``export`` keyword blanked."""
    statements = [child for child in root.named_children if child.type not in ("comment", "hash_bang_line")]
    declarations = [s for s in statements if s.type == "export_statement" and meta_declarator(s) is not None]
    if not declarations:
        if not require_meta:
            return None, [], [], text.source
        message = "saved workflows need `export const meta = {...}` as the first statement"
        hint = "add export const meta = { name: '...', description: '...' }"
        return None, [Diagnostic(1, 1, message, hint)], [], text.source
    message, hint = "`export const meta` must be the first statement", "move it to the top (comments may come first)"
    misplaced = [Diagnostic(*text.position(s), message, hint) for s in declarations if s != statements[0]]
    if misplaced:
        return None, misplaced, [], text.source
    declarator = meta_declarator(declarations[0])
    assert declarator is not None  # selected above
    meta, errors, warnings = read_meta(declarator, text.position)
    return meta, errors, warnings, text.blank_exports(declarations[:1])


# --- step 5: engine compile -------------------------------------------------------------------


def _compile(body: str, text: _Text, spans: list[Node]) -> Diagnostic | None:
    """Compile (never run) the wrapped body; the engine's error, or None when it compiles.

    ``spans`` are tree-sitter's error nodes, used when the engine points past the user's source.
    """
    context = quickjs.Context()
    context.set_memory_limit(_COMPILE_MEMORY)
    context.set_time_limit(_COMPILE_SECONDS)
    context.set_max_stack_size(_COMPILE_STACK)
    try:
        context.eval(_GUARD + wrap_body(body))
    except quickjs.StackOverflow:
        return Diagnostic(1, 1, "the script is nested too deeply to compile", "split deeply nested expressions")
    except quickjs.JSException as exc:
        message = str(exc)
        first_line = message.split("\n", 1)[0].strip()
        if first_line == _SENTINEL:
            return None
        if first_line == "InternalError: interrupted":
            hint = "split the script into functions: QuickJS compiles very many block scopes in one function slowly"
            return Diagnostic(1, 1, f"the script took longer than {_COMPILE_SECONDS:g} s to compile", hint)
        if "out of memory" in first_line:
            return Diagnostic(1, 1, "the script needs too much memory to compile", "make the script smaller")
        position = engine_position(message)
        if position is None:
            return Diagnostic(1, 1, first_line)
        line, column = position
        if line == 1:  # the guard sits on line 1, before the wrapper prefix
            column = max(1, column - len(_GUARD))
        point = text.engine_point(line, column)
        if point is None:
            return _past_the_end(text, spans)
        return Diagnostic(point[0], point[1], first_line)
    finally:
        del context
    return None  # pragma: no cover - the guard always throws


# --- step 6: determinism warnings -------------------------------------------------------------


def _determinism_warnings(root: Node, text: _Text) -> list[Diagnostic]:
    warnings: list[Diagnostic] = []
    for node in _tokens(root, text.data, _DETERMINISM_WORDS):
        kind = _determinism_kind(node)
        if kind is not None and node.parent is not None:
            message, hint = _DETERMINISM[kind]
            # At the whole expression: `new Date()` starts at `new`.
            warnings.append(Diagnostic(*text.position(node.parent), message + _DETERMINISM_WHY, hint, "warning"))
    return warnings


def _determinism_kind(node: Node) -> str | None:
    """Which nondeterministic use the identifier ``Date``/``Math`` at ``node`` starts, if any."""
    parent = node.parent
    if node.type != "identifier" or parent is None:
        return None
    name = node.text
    if parent.type in ("member_expression", "subscript_expression") and parent.child_by_field_name("object") == node:
        key = parent.child_by_field_name("property") or parent.child_by_field_name("index")
        key_text = (key.text or b"").strip(b"'\"`") if key is not None else b""
        if name == b"Date" and key_text == b"now":
            return "date_now"
        if name == b"Math" and key_text == b"random":
            return "math_random"
    if name == b"Date" and parent.type == "new_expression" and parent.child_by_field_name("constructor") == node:
        arguments = parent.child_by_field_name("arguments")
        if arguments is None or all(child.type == "comment" for child in arguments.named_children):
            return "new_date"
    if name == b"Date" and _is_callee(node):
        return "date_call"
    return None


# --- parsers ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Parsers:
    javascript: Parser
    typescript: Parser
    ts_query: Query


@cache
def _languages() -> tuple[Language, Language]:
    return Language(tree_sitter_javascript.language()), Language(tree_sitter_typescript.language_typescript())


@cache
def _ts_query() -> Query:
    return Query(_languages()[1], _TS_QUERY)


# Languages and queries are immutable and shared; a Parser is stateful, so each thread gets its
# own (checks run on worker threads), created once and reused.
_local = threading.local()


def _parsers() -> _Parsers:
    parsers: _Parsers | None = getattr(_local, "parsers", None)
    if parsers is None:
        javascript, typescript = _languages()
        parsers = _Parsers(Parser(javascript), Parser(typescript), _ts_query())
        _local.parsers = parsers
    return parsers
