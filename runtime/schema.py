"""JSON Schema for structured agent output: checking a script's schema, validating answers.

Schemas come from scripts, so they are hostile input: a ``pattern`` could backtrack for
minutes inside Python's ``re`` on the event loop. Patterns are matched with the ``regex``
module instead, each match under a time limit and all the matching of one validation under a
budget; a pattern that runs out of time fails validation. Answers to a schema with patterns
are validated on a worker thread (``has_patterns``), and matching releases the GIL.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from typing import Any

import jsonschema
import regex
from jsonschema.exceptions import SchemaError, ValidationError
from jsonschema.validators import extend, validator_for

__all__ = ["PATTERNS_BUDGET_S", "PATTERN_TIMEOUT_S", "has_patterns", "safe_search", "schema_problem",
           "validation_error"]

PATTERN_TIMEOUT_S = 0.05
#: All the pattern matching of one validation (an answer may hold thousands of strings).
PATTERNS_BUDGET_S = 0.5

_deadline: ContextVar[float] = ContextVar("pattern_deadline", default=math.inf)


def safe_search(pattern: str, text: str) -> bool:
    """``re.search`` semantics, bounded in time; TimeoutError when the pattern backtracks too long
    (or the validation running it has spent its budget)."""
    left = _deadline.get() - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return regex.search(pattern, text, timeout=min(PATTERN_TIMEOUT_S, left), concurrent=True) is not None


def has_patterns(schema: Any) -> bool:
    """Whether validating against ``schema`` may match a regular expression."""
    if isinstance(schema, Mapping):
        return "pattern" in schema or "patternProperties" in schema or any(map(has_patterns, schema.values()))
    if isinstance(schema, list):
        return any(map(has_patterns, schema))
    return False


def _pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "string"):
        return
    try:
        matched = safe_search(pattern, instance)
    except TimeoutError:
        yield ValidationError(f"matching {pattern!r} took too long (catastrophic backtracking?)")
        return
    if not matched:
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


def _pattern_properties(validator: Any, properties: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in properties.items():
        for key, value in instance.items():
            try:
                matched = safe_search(pattern, key)
            except TimeoutError:
                yield ValidationError(f"matching {pattern!r} took too long (catastrophic backtracking?)")
                return
            if matched:
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


@functools.cache
def _bounded(cls: Any) -> Any:
    """The validator class for a draft, with time-bounded ``pattern`` and ``patternProperties``."""
    return extend(cls, {"pattern": _pattern, "patternProperties": _pattern_properties})


def _validator(schema: Mapping[str, Any]) -> Any:
    return _bounded(validator_for(schema, default=jsonschema.Draft202012Validator))(schema)


def schema_problem(schema: Any) -> str | None:
    """Why ``schema`` cannot be used with ``agent()``, or None. The message becomes a TypeError."""
    if not isinstance(schema, Mapping):
        return "schema must be a JSON Schema object"
    if schema.get("type") != "object":
        return "schema must have type: 'object' at its root"
    try:
        validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except SchemaError as exc:
        return f"schema is not valid JSON Schema: {exc.message}"
    unsatisfiable = _unsatisfiable(schema, "schema")
    if unsatisfiable:
        return unsatisfiable
    return None


def _unsatisfiable(schema: Mapping[str, Any], path: str) -> str | None:
    properties = schema.get("properties") or {}
    required = schema.get("required") or []
    if schema.get("additionalProperties") is False:
        for key in required:
            if key not in properties:
                return (
                    f"{path} can never be satisfied: {key!r} is required but additionalProperties is false "
                    "and it is not listed in properties"
                )
    for key, sub in properties.items():
        if sub is False and key in required:
            return f"{path} can never be satisfied: {key!r} is required but its schema is false"
        if isinstance(sub, Mapping) and sub.get("type") == "object":
            found = _unsatisfiable(sub, f"{path}.properties.{key}")
            if found:
                return found
    return None


def validation_error(instance: Any, schema: Mapping[str, Any]) -> str | None:
    """The most relevant validation error as one readable line, or None when valid."""
    budget = _deadline.set(time.monotonic() + PATTERNS_BUDGET_S)
    try:
        error = jsonschema.exceptions.best_match(_validator(schema).iter_errors(instance))
    finally:
        _deadline.reset(budget)
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path)
    return f"at {'/' + where if where else 'the root'}: {error.message}"
