"""Reading ``export const meta = {...}`` from the syntax tree, without running the script.

Meta must be a *pure literal*: objects, arrays, strings (template strings only without
``${...}``), numbers (optionally negated), booleans and null. Anything that would need evaluation
(identifiers, calls, spreads, computed keys, substitutions, methods) is an error at the offending
node. The literal is turned into Python values, then its fields are validated: ``name``
(``[a-z0-9][a-z0-9-_]*``) and ``description`` are required, ``whenToUse`` and ``phases`` optional;
unknown keys are warnings, not errors.

Positions come from a ``Locate`` callable supplied by the caller, so this module never deals with
byte/character offsets itself.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tree_sitter import Node

from ._source import Diagnostic

__all__ = ["Locate", "PhaseSpec", "ScriptMeta", "meta_declarator", "read_meta"]

Locate = Callable[[Node], tuple[int, int]]

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]*")
_MAX_DEPTH = 32  # meta is a small config object; bounding depth keeps the walk off Python's stack limit
_LITERAL_HINT = (
    "meta is read without running the script: use only strings, numbers, booleans, null, "
    "arrays and objects"
)
_META_KEYS = ("name", "description", "whenToUse", "phases")
_PHASE_KEYS = ("title", "detail", "model")
_SIMPLE_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f", "v": "\v", "0": "\0"}
_SKIP = frozenset({"comment"})

Path = tuple[str | int, ...]


@dataclass(frozen=True)
class PhaseSpec:
    """One entry of ``meta.phases``: a progress group registered before the script runs."""

    title: str
    detail: str | None = None
    model: str | None = None

    def to_dict(self) -> dict[str, str]:
        data = {"title": self.title}
        if self.detail is not None:
            data["detail"] = self.detail
        if self.model is not None:
            data["model"] = self.model
        return data


@dataclass(frozen=True)
class ScriptMeta:
    """The validated ``export const meta`` of a script."""

    name: str
    description: str
    when_to_use: str | None
    phases: tuple[PhaseSpec, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "whenToUse": self.when_to_use,
            "phases": [phase.to_dict() for phase in self.phases],
        }


def meta_declarator(statement: Node) -> Node | None:
    """The ``meta`` declarator if ``statement`` is ``export const meta = ...`` (one declarator), else None."""
    if statement.type != "export_statement":
        return None
    declaration = statement.child_by_field_name("declaration")
    if declaration is None or declaration.type != "lexical_declaration":
        return None
    kind = declaration.child_by_field_name("kind")
    declarators = [child for child in declaration.named_children if child.type == "variable_declarator"]
    if kind is None or kind.type != "const" or len(declarators) != 1:
        return None
    name = declarators[0].child_by_field_name("name")
    if name is None or name.type != "identifier" or _text(name) != "meta":
        return None
    return declarators[0]


def read_meta(declarator: Node, locate: Locate) -> tuple[ScriptMeta | None, list[Diagnostic], list[Diagnostic]]:
    """Evaluate and validate the value of the ``meta`` declarator: ``(meta, errors, warnings)``."""
    value = declarator.child_by_field_name("value")
    value = _unparenthesize(value) if value is not None else None
    if value is None or value.type != "object":
        at = value if value is not None else declarator
        line, column = locate(at)
        message = "`meta` must be an object literal: export const meta = { name: '...', description: '...' }"
        return None, [Diagnostic(line, column, message, _LITERAL_HINT)], []
    reader = _LiteralReader(locate)
    data = reader.value(value, (), 0)
    if reader.errors:
        return None, reader.errors, []
    assert isinstance(data, dict)  # an object node always evaluates to a dict
    return _validate(data, reader)


class _LiteralReader:
    """Turns literal nodes into Python values, recording errors and where each value came from."""

    def __init__(self, locate: Locate) -> None:
        self.locate = locate
        self.errors: list[Diagnostic] = []
        self.values: dict[Path, Node] = {}  # path -> value node
        self.keys: dict[Path, Node] = {}  # path -> key node (objects only)

    def error(self, node: Node, message: str, hint: str | None = _LITERAL_HINT) -> None:
        line, column = self.locate(node)
        self.errors.append(Diagnostic(line, column, message, hint))

    def value(self, node: Node, path: Path, depth: int) -> Any:
        node = _unparenthesize(node)
        self.values[path] = node
        if depth > _MAX_DEPTH:
            self.error(node, f"meta is nested more than {_MAX_DEPTH} levels deep")
            return None
        kind = node.type
        if kind == "object":
            return self._object(node, path, depth)
        if kind == "array":
            return self._array(node, path, depth)
        if kind == "string":
            return _string_value(node, template=False)
        if kind == "template_string":
            substitutions = [child for child in node.named_children if child.type == "template_substitution"]
            if substitutions:
                message = "meta must be a pure literal: template substitutions (`${...}`) are not allowed"
                self.error(substitutions[0], message)
                return None
            return _string_value(node, template=True)
        if kind == "number":
            return self._number(node, node, negate=False)
        if kind == "unary_expression":
            operator = node.child_by_field_name("operator")
            argument = node.child_by_field_name("argument")
            if operator is not None and argument is not None and argument.type == "number":
                if operator.type in ("-", "+"):
                    return self._number(argument, node, negate=operator.type == "-")
        if kind in ("true", "false"):
            return kind == "true"
        if kind == "null":
            return None
        if kind in ("identifier", "undefined"):
            name = _text(node)
            if name == "undefined":
                message = "meta must be a pure literal: `undefined` is not allowed (leave the key out or use null)"
                self.error(node, message)
            else:
                self.error(node, f"meta must be a pure literal: identifier `{name}` is not allowed")
            return None
        self.error(node, f"meta must be a pure literal: {_describe(node)} is not allowed")
        return None

    def _object(self, node: Node, path: Path, depth: int) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for child in node.named_children:
            if child.type in _SKIP:
                continue
            if child.type != "pair":
                self.error(child, f"meta must be a pure literal: {_describe(child)} is not allowed")
                continue
            key_node = child.child_by_field_name("key")
            value_node = child.child_by_field_name("value")
            if key_node is None or value_node is None:  # pragma: no cover - the grammar always sets both
                continue
            key = self._key(key_node)
            if key is None:
                continue
            self.keys[path + (key,)] = key_node
            result[key] = self.value(value_node, path + (key,), depth + 1)
        return result

    def _key(self, node: Node) -> str | None:
        if node.type == "property_identifier":
            return _text(node)
        if node.type == "string":
            return _string_value(node, template=False)
        if node.type == "number":
            number = self._number(node, node, negate=False)
            return None if number is None else _js_number_text(number)
        self.error(node, "meta must be a pure literal: computed keys (`[...]`) are not allowed")
        return None

    def _array(self, node: Node, path: Path, depth: int) -> list[Any]:
        result: list[Any] = []
        previous = "["
        for child in node.children:
            if child.type == "," and previous in ("[", ","):
                self.error(child, "meta must be a pure literal: array holes (`[a, , b]`) are not allowed")
            if child.type in _SKIP:
                continue
            previous = child.type
            if not child.is_named:
                continue
            if child.type == "spread_element":
                self.error(child, "meta must be a pure literal: spread (`...`) is not allowed")
                continue
            result.append(self.value(child, path + (len(result),), depth + 1))
        return result

    def _number(self, literal: Node, at: Node, *, negate: bool) -> int | float | None:
        text = _text(literal).replace("_", "")
        lowered = text.lower()
        try:
            if lowered.endswith("n"):
                self.error(at, "meta must be a pure literal: BigInt literals are not allowed (they are not JSON)")
                return None
            if lowered.startswith(("0x", "0o", "0b")):
                number: int | float = int(text[2:], {"x": 16, "o": 8, "b": 2}[lowered[1]])
            elif re.fullmatch(r"0[0-7]+", text):  # legacy octal, still valid in sloppy-mode scripts
                number = int(text, 8)
            else:
                number = float(text)
        except ValueError:  # pragma: no cover - tree-sitter only produces valid number tokens
            self.error(at, f"meta: cannot read the number `{text}`")
            return None
        if not math.isfinite(number):
            self.error(at, f"meta: the number `{text}` is out of range")
            return None
        if isinstance(number, float) and number.is_integer() and abs(number) < 2**53:
            number = int(number)
        return -number if negate else number


def _validate(
    data: dict[str, Any], reader: _LiteralReader
) -> tuple[ScriptMeta | None, list[Diagnostic], list[Diagnostic]]:
    errors: list[Diagnostic] = []
    warnings: list[Diagnostic] = []

    def at(path: Path) -> tuple[int, int]:
        node = reader.values.get(path)
        while node is None and path:
            path = path[:-1]
            node = reader.values.get(path)
        assert node is not None  # the root object is always recorded
        return reader.locate(node)

    def error(path: Path, message: str, hint: str | None = None) -> None:
        errors.append(Diagnostic(*at(path), message, hint))

    def unknown_keys(obj: dict[str, Any], path: Path, known: tuple[str, ...], where: str) -> None:
        for key in obj:
            if key not in known:
                line, column = reader.locate(reader.keys[path + (key,)])
                expected = ", ".join(known)
                message = f"unknown key `{key}` in {where} (ignored)"
                warnings.append(Diagnostic(line, column, message, f"known keys: {expected}", "warning"))

    def optional_string(obj: dict[str, Any], path: Path, key: str, label: str) -> str | None:
        value = obj.get(key)
        if value is not None and not isinstance(value, str):
            error(path + (key,), f"{label} must be a string")
            return None
        return value

    name = data.get("name")
    if "name" not in data:
        error((), "meta.name is required", "add name: 'my-workflow' (lowercase letters, digits, '-' and '_')")
    elif not isinstance(name, str) or NAME_PATTERN.fullmatch(name) is None:
        error(
            ("name",),
            f"meta.name must match [a-z0-9][a-z0-9-_]* (got {_show(name)})",
            "use lowercase letters, digits, '-' and '_', starting with a letter or digit",
        )
    description = data.get("description")
    if "description" not in data:
        error((), "meta.description is required", "add description: 'what the workflow does'")
    elif not isinstance(description, str) or not description.strip():
        error(("description",), "meta.description must be a non-empty string")
    when_to_use = optional_string(data, (), "whenToUse", "meta.whenToUse")
    unknown_keys(data, (), _META_KEYS, "meta")

    phases: list[PhaseSpec] = []
    raw_phases = data.get("phases")
    if raw_phases is not None and not isinstance(raw_phases, list):
        error(("phases",), "meta.phases must be an array of {title, detail?, model?}")
    for index, raw in enumerate(raw_phases if isinstance(raw_phases, list) else []):
        path: Path = ("phases", index)
        label = f"meta.phases[{index}]"
        if not isinstance(raw, dict):
            error(path, f"{label} must be an object {{title, detail?, model?}}")
            continue
        title = raw.get("title")
        if not isinstance(title, str) or not title.strip():
            error(path + ("title",) if "title" in raw else path, f"{label}.title must be a non-empty string")
        detail = optional_string(raw, path, "detail", f"{label}.detail")
        model = optional_string(raw, path, "model", f"{label}.model")
        unknown_keys(raw, path, _PHASE_KEYS, label)
        if isinstance(title, str):
            phases.append(PhaseSpec(title, detail, model))

    if errors:
        return None, errors, warnings
    assert isinstance(name, str) and isinstance(description, str)  # validated above
    return ScriptMeta(name, description, when_to_use, tuple(phases)), errors, warnings


def _text(node: Node) -> str:
    return (node.text or b"").decode("utf-8", "replace")


def _show(value: Any) -> str:
    """A wrong value as a message shows it: strings quoted, anything else by its JSON type."""
    if isinstance(value, str):
        return repr(value)
    kinds = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", list: "an array"}
    return kinds.get(type(value), "an object")


def _unparenthesize(node: Node) -> Node:
    while node.type == "parenthesized_expression":
        inner = [child for child in node.named_children if child.type not in _SKIP]
        if len(inner) != 1:
            break
        node = inner[0]
    return node


def _describe(node: Node) -> str:
    names = {
        "call_expression": "a function call",
        "spread_element": "spread (`...`)",
        "shorthand_property_identifier": f"shorthand property `{_text(node)}` (write `{_text(node)}: <literal>`)",
        "method_definition": "a method",
        "arrow_function": "a function",
        "function_expression": "a function",
        "member_expression": f"`{_text(node)}`",
        "regex": "a regular expression",
    }
    return names.get(node.type, "a " + node.type.replace("_", " "))


def _string_value(node: Node, *, template: bool) -> str:
    parts: list[str] = []
    for child in node.named_children:
        text = _text(child)
        if child.type == "escape_sequence":
            parts.append(_unescape(text))
        elif template:
            parts.append(text.replace("\r\n", "\n"))
        else:
            parts.append(text)
    # \uD83D\uDE00 pairs arrive as two surrogates; the UTF-16 round trip joins them.
    return "".join(parts).encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def _unescape(sequence: str) -> str:
    body = sequence[1:]
    if not body or body[0] in "\r\n\u2028\u2029":  # line continuation
        return ""
    first = body[0]
    if first == "x" and len(body) == 3:
        return chr(int(body[1:], 16))
    if first == "u":
        digits = body[2:-1] if body.startswith("u{") else body[1:]
        code = int(digits, 16)
        return chr(code) if code <= 0x10FFFF else "\ufffd"
    if re.fullmatch(r"[0-7]{1,3}", body) and body != "0":  # legacy octal escape
        return chr(int(body, 8))
    return _SIMPLE_ESCAPES.get(body, body)


def _js_number_text(number: int | float) -> str:
    if isinstance(number, float) and number.is_integer():
        return str(int(number))
    return str(number)
