"""JSON Schema for structured agent output: checking a script's schema, validating answers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jsonschema
from jsonschema.exceptions import SchemaError
from jsonschema.validators import validator_for

__all__ = ["schema_problem", "validation_error"]


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
    validator = validator_for(schema, default=jsonschema.Draft202012Validator)(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(instance))
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path)
    return f"at {'/' + where if where else 'the root'}: {error.message}"
