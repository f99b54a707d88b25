"""The simulate backend: offline, deterministic agents for dry runs, tests and benchmarks.

Answers are derived from the request alone (a hash of the prompt), so the same call always
gets the same answer: text for plain agents, an object generated from the schema otherwise.
Token counts are non-zero and derived from the text. Per-run settings shape a run without
code (``options.simulate``):

    latency_ms:      N or [min, max]   (per call, deterministic within the range)
    output_tokens:   N                 (override the derived count)
    fail:            [regex, ...]      (label or prompt matches → the call fails terminally)
    invalid:         [regex, ...]      (matches → schema output never validates)
    invalid_attempts: N                (with ``invalid``: only the first N schema attempts are invalid)
    responses:       [{match, text?, data?}, ...]   (canned answers)

``record_path`` (or ``QUICKFLOW_SIMULATE_RECORD``) appends one JSON line per execution, so a
test can count executions across processes (the crash test does).
"""

from __future__ import annotations

import hashlib
import json
import os
import regex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio

from ..errors import InvalidRequest, TerminalBackendError
from ..schema import safe_search
from ._prompts import SYSTEM_PROMPT
from ._protocol import AgentRequest, AgentResult, Usage

__all__ = ["SimulateBackend", "check_simulate_settings", "sample_from_schema"]

_WORDS = (
    "alpha beta gamma delta signal vector buffer module review finding verified claim source "
    "handler index cache token parser result summary risk owner branch"
).split()


_WORD_OF_BYTE = tuple(_WORDS[b % len(_WORDS)] for b in range(256))


def _seed(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("\x1f".join(parts).encode()).digest()[:8], "big")


def sample_from_schema(schema: Any, seed: str, path: str = "$") -> Any:
    """A value valid for common JSON Schemas, chosen deterministically from ``seed``."""
    if not isinstance(schema, Mapping):
        return None
    n = _seed(seed, path)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema and schema["enum"]:
        options = list(schema["enum"])
        return options[n % len(options)]
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):
            return sample_from_schema(schema[key][0], seed, path)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), kind[0] if kind else None)
    if kind is None:
        kind = "object" if "properties" in schema else "string"
    if kind == "object":
        props = schema.get("properties") or {}
        return {key: sample_from_schema(sub, seed, f"{path}.{key}") for key, sub in props.items()}
    if kind == "array":
        low = int(schema.get("minItems", 0))
        high = int(schema.get("maxItems", max(low, 3)))
        count = max(low, min(high, n % 4))
        return [sample_from_schema(schema.get("items", {}), seed, f"{path}[{i}]") for i in range(count)]
    if kind == "string":
        text = " ".join(_WORDS[(n >> (4 * i)) % len(_WORDS)] for i in range(3))
        min_len = int(schema.get("minLength", 0))
        if len(text) < min_len:
            text = text + "x" * (min_len - len(text))
        if "maxLength" in schema:
            text = text[: int(schema["maxLength"])]
        return text
    if kind == "integer":
        low = int(schema.get("minimum", 0))
        high = int(schema.get("maximum", low + 10))
        return low + n % (high - low + 1)
    if kind == "number":
        lo = float(schema.get("minimum", 0.0))
        hi = float(schema.get("maximum", lo + 1.0))
        return round(lo + (n % 1000) / 1000 * (hi - lo), 3)
    if kind == "boolean":
        return bool(n & 1)
    return None


_SYSTEM_PROMPT_CHARS = len(SYSTEM_PROMPT)


def _plain_answer(label: str, prompt: str) -> str:
    # Eight words picked by the prompt's digest, written out: a third of the time of joining a
    # map over the digest, and this runs once per simulated agent.
    d, w = hashlib.sha256(prompt.encode()).digest(), _WORD_OF_BYTE
    return (f"Simulated answer for {label or prompt[:60]!r}: "
            f"{w[d[0]]} {w[d[1]]} {w[d[2]]} {w[d[3]]} {w[d[4]]} {w[d[5]]} {w[d[6]]} {w[d[7]]}.")


def _result(request: AgentRequest, text: str, output_tokens: int, schema_chars: int = 0,
            data: Any = None) -> AgentResult:
    # Input as a real backend would send it: the subagent system prompt, the prompt, the schema.
    usage = Usage(max(1, (_SYSTEM_PROMPT_CHARS + len(request.prompt) + schema_chars) // 4), output_tokens)
    # Positional (text, usage, model, stop_reason, cost_usd, data, transcript): once per call.
    return AgentResult(text, usage, request.model or "simulate", "end_turn", 0.0, data,
                       ({"role": "user", "content": request.prompt}, {"role": "assistant", "content": text}))


def _plain_result(request: AgentRequest) -> AgentResult:
    text = _plain_answer(request.label, request.prompt)
    return _result(request, text, _tokens(text))


def _tokens(text: str) -> int:
    return max(1, len(text) // 4)


def check_simulate_settings(settings: Any) -> dict[str, Any]:
    """Validate ``options.simulate``; raise InvalidRequest with the reason."""
    if settings is None:
        return {}
    if not isinstance(settings, Mapping):
        raise InvalidRequest("options.simulate must be an object")
    latency = settings.get("latency_ms", 0)
    if isinstance(latency, list):
        if len(latency) != 2 or not all(isinstance(x, (int, float)) and x >= 0 for x in latency):
            raise InvalidRequest("options.simulate.latency_ms must be a number or [min, max]")
    elif not isinstance(latency, (int, float)) or latency < 0:
        raise InvalidRequest("options.simulate.latency_ms must be a non-negative number or [min, max]")
    responses = settings.get("responses", [])
    if not isinstance(responses, list) or not all(isinstance(r, Mapping) for r in responses):
        raise InvalidRequest("options.simulate.responses must be a list of {match, text | data} objects")
    for canned in responses:
        match = canned.get("match", "")
        if not isinstance(match, str):
            raise InvalidRequest("options.simulate.responses: each 'match' must be a regular expression string")
        try:
            regex.compile(match)
        except regex.error as exc:
            raise InvalidRequest(f"options.simulate.responses: bad regular expression {match!r}: {exc}") from exc
    for key in ("fail", "invalid"):
        patterns = settings.get(key, [])
        if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
            raise InvalidRequest(f"options.simulate.{key} must be a list of regular expressions")
        for pattern in patterns:
            try:
                regex.compile(pattern)
            except regex.error as exc:
                raise InvalidRequest(f"options.simulate.{key}: bad regular expression {pattern!r}: {exc}") from exc
    return dict(settings)


class SimulateBackend:
    name = "simulate"
    eager = True  # call() awaits nothing but a plain sleep: see AgentBackend

    def __init__(self, record_path: Path | None = None) -> None:
        env = os.environ.get("QUICKFLOW_SIMULATE_RECORD")
        self.record_path = record_path or (Path(env) if env else None)
        self.executions = 0

    def answer_now(self, request: AgentRequest) -> AgentResult | None:
        """A plain answer, the common case, without a coroutine (see ``AgentBackend``): None when
        the run's settings or a schema shape the answer, executions are recorded, or ``call`` was
        overridden or patched (which is then asked instead)."""
        if (request.settings or request.schema is not None or self.record_path is not None
                or getattr(self.call, "__func__", None) is not _CALL):  # a subclass's or a patched call()
            return None
        answer = _plain_result(request)
        self.executions += 1  # once answered: the dispatcher calls call() if this raised
        return answer

    async def call(self, request: AgentRequest) -> AgentResult:
        settings = request.settings
        self.executions += 1
        if self.record_path is not None:
            self._record(request)
        if settings:
            latency = settings.get("latency_ms")
            if latency:
                delay = _latency(latency, request.prompt)
                if delay > 0:
                    await anyio.sleep(delay)
            fail = settings.get("fail")
            if fail and any(_matches(p, request.label) or _matches(p, request.prompt) for p in fail):
                raise TerminalBackendError(f"simulated failure (options.simulate.fail matched {request.label!r})")
            if (request.schema is not None or settings.get("responses") or settings.get("invalid")
                    or settings.get("output_tokens")):
                return self._shaped(request, settings)
        elif request.schema is not None:
            return self._shaped(request, {})
        # A plain answer: the common case, without the rule lookups (once per agent in dry runs).
        return _plain_result(request)

    def _shaped(self, request: AgentRequest, settings: Mapping[str, Any]) -> AgentResult:
        """An answer that settings or a schema shape: canned, invalid, or sampled from the schema."""
        text, data = self._answer(request, settings)
        out_tokens = int(settings.get("output_tokens") or _tokens(text))
        schema_chars = len(json.dumps(request.schema)) if request.schema is not None else 0
        return _result(request, text, out_tokens, schema_chars, data)

    def _answer(self, request: AgentRequest, settings: Mapping[str, Any]) -> tuple[str, Any]:
        responses, invalid = settings.get("responses"), settings.get("invalid")
        # Matched against label and prompt together; built only when there is a rule to match.
        subject = f"{request.label}\n{request.prompt}" if responses or invalid else ""
        for canned in responses or ():
            if _matches(str(canned.get("match", "")), subject):
                if "data" in canned:
                    return json.dumps(canned["data"]), canned["data"]
                return str(canned.get("text", "")), None
        if request.schema is not None:
            attempts = settings.get("invalid_attempts")
            # Structured-output attempts of this call: the corrections fed back so far, plus this one.
            if (invalid and any(_matches(p, subject) for p in invalid)
                    and (attempts is None or len(request.corrections) + 1 <= int(attempts))):
                return json.dumps({"__invalid__": True}), {"__invalid__": True}
            data = sample_from_schema(request.schema, request.prompt)
            return json.dumps(data), data
        return _plain_answer(request.label, request.prompt), None

    def _record(self, request: AgentRequest) -> None:
        assert self.record_path is not None
        line = json.dumps({"run_id": request.run_id, "index": request.index, "prompt": request.prompt}) + "\n"
        with open(self.record_path, "a", encoding="utf-8") as fh:
            fh.write(line)


_CALL = SimulateBackend.call  # see answer_now


def _matches(pattern: str, text: str) -> bool:
    # Run options arrive over HTTP: a hostile pattern must not stall the event loop.
    try:
        return safe_search(pattern, text)
    except TimeoutError:
        return False


def _latency(value: Any, prompt: str) -> float:
    if isinstance(value, list) and len(value) == 2:
        low, high = float(value[0]), float(value[1])
        return (low + (_seed(prompt, "latency") % 1000) / 1000 * (high - low)) / 1000
    return float(value or 0) / 1000
