"""SPEC §3.3 as pure functions: journal keys, occurrences, and the resume plan (reuse / prefix).

The first part is plain sync tests over hand-built call records. The second replays the golden
journals in ``golden/`` against a real engine: each fixture holds a script, the journal of one
known run of it (written by hand, keys pinned), and for each replay the calls that must be
served from the journal and the ones that must run live, by prompt, in issue order.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest

from runtime import (
    CallRecord,
    Engine,
    MemoryStore,
    RunRecord,
    RunRequest,
    SimulateBackend,
    load_settings,
)
from runtime.journal import (
    RESUME_MODES,
    Occurrences,
    ResumePlan,
    call_key,
    canonical_json,
)

GOLDEN = Path(__file__).parent / "golden"

# --- call_key ---------------------------------------------------------------------------------


def test_call_key_is_sha256_of_the_canonical_identity() -> None:
    # Pinned: journals written by one version must still resume under the next.
    identity = '{"agentType":null,"effort":null,"isolation":null,"model":null,"prompt":"hello","schema":null}'
    assert call_key("hello") == hashlib.sha256(identity.encode()).hexdigest()


@pytest.mark.parametrize("prompt", ['say "hi"', "back\\slash", "café ünï", "emoji 😀", "tab\tnew\nline\x00",
                                    "line\u2028separator", "", " spaces  "])
def test_call_key_of_a_call_without_options_is_canonical_json_for_any_prompt(prompt: str) -> None:
    # Such calls take a shortcut; it must give the key the full encoder gives.
    identity = canonical_json({"prompt": prompt, "schema": None, "model": None, "effort": None, "agentType": None,
                               "isolation": None})
    assert call_key(prompt) == hashlib.sha256(identity.encode()).hexdigest()


@pytest.mark.anyio
async def test_the_key_of_a_call_from_a_script_keeps_a_schema_s_long_integers_exact() -> None:
    # JSON.stringify writes 2 ** 64 as the integer literal 18446744073709552000; the host must
    # read it back as that integer, not as a float, or the key would differ from the one
    # journaled before.
    script = "return await agent('p', {schema: {type: 'object', properties: {n: {maximum: 2 ** 64}}}})"
    schema = {"type": "object", "properties": {"n": {"maximum": 18446744073709552000}}}
    with anyio.fail_after(10):
        async with Engine(load_settings(), MemoryStore(), recover=False) as engine:
            record = await engine.wait((await engine.submit(RunRequest(script=script))).id)
            (call,) = await engine.list_agents(record.id)
    assert call.key == call_key("p", schema=schema)
    assert '"maximum":18446744073709552000' in canonical_json({"schema": schema})


def test_call_key_defaults_equal_explicit_nones() -> None:
    assert call_key("p") == call_key("p", schema=None, model=None, effort=None, agent_type=None, isolation=None)


SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}


@pytest.mark.parametrize(
    ("field", "a", "b"),
    [
        ("prompt", "p", "p2"),
        ("prompt", "p", "p "),  # whitespace is part of the prompt
        ("schema", None, SCHEMA),
        ("schema", SCHEMA, {**SCHEMA, "required": []}),
        ("model", None, "haiku"),
        ("model", "haiku", "claude-haiku-4-5"),  # the alias as written, not the resolved id
        ("effort", None, "high"),
        ("agent_type", None, "reviewer"),
        ("isolation", None, "worktree"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_call_key_changes_with_each_identity_field(field: str, a: Any, b: Any) -> None:
    def key(value: Any) -> str:
        fields: dict[str, Any] = {"prompt": "p", "model": "sonnet", field: value}
        return call_key(fields.pop("prompt"), **fields)

    assert key(a) != key(b)
    assert key(a) == key(a)


def test_call_key_has_no_room_for_label_phase_or_timeout() -> None:
    # label, phase and timeout are excluded by construction: call_key does not accept them.
    for excluded in ("label", "phase", "timeout"):
        with pytest.raises(TypeError):
            call_key("p", **{excluded: "x"})  # type: ignore[arg-type]


def test_call_key_ignores_key_order_at_every_depth() -> None:
    a = {"type": "object", "required": ["x"], "properties": {"x": {"type": "string", "minLength": 1}, "y": {}}}
    b = {"properties": {"y": {}, "x": {"minLength": 1, "type": "string"}}, "required": ["x"], "type": "object"}
    assert call_key("p", schema=a) == call_key("p", schema=b)
    # ...but not list order: `required: [a, b]` and `[b, a]` are different JSON.
    c = {**a, "required": ["x", "y"]}
    d = {**a, "required": ["y", "x"]}
    assert call_key("p", schema=c) != call_key("p", schema=d)


def test_canonical_json() -> None:
    assert canonical_json({"b": 1, "a": [{"d": 2, "c": None}]}) == '{"a":[{"c":null,"d":2}],"b":1}'
    assert canonical_json({"é": "ü"}) == '{"é":"ü"}'  # UTF-8, not \\u escapes
    assert call_key("résumé") == hashlib.sha256(
        '{"agentType":null,"effort":null,"isolation":null,"model":null,"prompt":"résumé","schema":null}'.encode()
    ).hexdigest()


# --- Occurrences ------------------------------------------------------------------------------


def test_occurrences_count_per_key_in_issue_order() -> None:
    occ = Occurrences()
    assert [occ.next(k) for k in ["a", "b", "a", "a", "c", "b"]] == [0, 0, 1, 2, 0, 1]


# --- ResumePlan -------------------------------------------------------------------------------


def rec(prompt: str, status: str = "completed", *, occurrence: int = 0, output: Any = "out", index: int = 0,
        **identity: Any) -> CallRecord:
    return CallRecord(run_id="src", index=index, key=call_key(prompt, **identity), occurrence=occurrence,
                      status=status, prompt=prompt, output=output)


def plan_of(mode: str, *records: CallRecord) -> ResumePlan:
    return ResumePlan(list(records), mode)


@dataclass(frozen=True)
class Ask:
    prompt: str
    occurrence: int = 0


def served(plan: ResumePlan, asks: list[Ask]) -> list[Any]:
    """For each call, in issue order: the served output, or ``LIVE``."""
    out = []
    for ask in asks:
        found = plan.lookup(call_key(ask.prompt), ask.occurrence)
        out.append("LIVE" if found is None else found.output)
    return out


def test_unknown_mode_is_refused_with_the_choices() -> None:
    assert RESUME_MODES == ("reuse", "prefix")
    with pytest.raises(ValueError, match="reuse, prefix"):
        ResumePlan([], "replay")


@pytest.mark.parametrize("mode", RESUME_MODES)
def test_only_completed_calls_with_an_output_are_reusable(mode: str) -> None:
    records = [
        rec("done", output="D"),
        rec("cached-in-source", status="cached", output="C"),  # a resumed run can be resumed from
        rec("failed", status="failed", output=None),
        rec("stopped", status="stopped", output=None),
        rec("completed-null", output=None),  # completed, but null is not worth reusing
        rec("queued", status="queued", output=None),
        rec("running", status="running", output=None),
        rec("falsy-but-real", output=""),  # an empty answer is still an answer
        rec("zero", output=0),
    ]
    plan = ResumePlan(records, mode)
    assert len(plan) == 4
    if mode == "reuse":
        asks = [Ask(r.prompt) for r in records]
        assert served(plan, asks) == ["D", "C", "LIVE", "LIVE", "LIVE", "LIVE", "LIVE", "", 0]


def test_reuse_serves_every_hit_after_misses() -> None:
    plan = plan_of("reuse", rec("a", output="A"), rec("b", status="failed", output=None), rec("c", output="C"))
    assert served(plan, [Ask("a"), Ask("b"), Ask("new"), Ask("c"), Ask("a", 1)]) == ["A", "LIVE", "LIVE", "C", "LIVE"]


def test_prefix_breaks_at_the_first_miss_and_never_serves_a_later_hit() -> None:
    plan = plan_of("prefix", rec("a", output="A"), rec("b", output="B"), rec("c", status="failed", output=None),
                   rec("d", output="D"), rec("e", output="E"))
    assert served(plan, [Ask("a"), Ask("b"), Ask("c"), Ask("d"), Ask("e")]) == ["A", "B", "LIVE", "LIVE", "LIVE"]
    # Broken for good: even a call that was served before is now live.
    assert plan.lookup(call_key("a"), 0) is None


@pytest.mark.parametrize(
    ("miss", "expected"),
    [
        (Ask("never-in-source"), ["A", "LIVE", "LIVE"]),  # a new call
        (Ask("a", 1), ["A", "LIVE", "LIVE"]),  # one occurrence more than the source had
        (Ask("stopped"), ["A", "LIVE", "LIVE"]),
        (Ask("null"), ["A", "LIVE", "LIVE"]),
    ],
    ids=["new-call", "extra-occurrence", "stopped", "completed-null"],
)
def test_prefix_miss_kinds(miss: Ask, expected: list[Any]) -> None:
    plan = plan_of("prefix", rec("a", output="A"), rec("b", output="B"), rec("stopped", status="stopped", output=None),
                   rec("null", output=None))
    assert served(plan, [Ask("a"), miss, Ask("b")]) == expected


def test_prefix_all_hits_serves_everything() -> None:
    plan = plan_of("prefix", rec("a", output="A"), rec("b", output="B"))
    assert served(plan, [Ask("a"), Ask("b")]) == ["A", "B"]


def test_duplicate_keys_are_matched_by_occurrence() -> None:
    records = [
        rec("same", occurrence=0, output="s0", index=0),
        rec("same", occurrence=1, status="failed", output=None, index=1),
        rec("same", occurrence=2, output="s2", index=2),
        rec("same", occurrence=3, status="stopped", output=None, index=3),
    ]
    asks = [Ask("same", n) for n in range(5)]
    assert served(ResumePlan(records, "reuse"), asks) == ["s0", "LIVE", "s2", "LIVE", "LIVE"]
    assert served(ResumePlan(records, "prefix"), asks) == ["s0", "LIVE", "LIVE", "LIVE", "LIVE"]


def test_identity_fields_separate_calls_with_the_same_prompt() -> None:
    plan = ResumePlan([rec("p", output="plain"), rec("p", output="on haiku", model="haiku")], "reuse")
    assert plan.lookup(call_key("p"), 0).output == "plain"  # type: ignore[union-attr]
    assert plan.lookup(call_key("p", model="haiku"), 0).output == "on haiku"  # type: ignore[union-attr]
    assert plan.lookup(call_key("p", model="opus"), 0) is None


@pytest.mark.parametrize("mode", RESUME_MODES)
def test_source_record_order_does_not_matter(mode: str) -> None:
    # The journal of a fan-out lists calls by index, but they completed in any order.
    records = [rec(f"p{i}", output=f"o{i}", index=i) for i in range(6)]
    records[3] = rec("p3", status="failed", output=None, index=3)
    asks = [Ask(f"p{i}") for i in range(6)]
    forward = served(ResumePlan(records, mode), asks)
    backward = served(ResumePlan(list(reversed(records)), mode), asks)
    assert forward == backward
    assert forward == (["o0", "o1", "o2", "LIVE", "o4", "o5"] if mode == "reuse" else ["o0", "o1", "o2"] + ["LIVE"] * 3)


# --- golden journals replayed against the engine ------------------------------------------------

# Live calls in a replay answer "LIVE" (and a schema'd summary {verdict: "live"}), so each
# replay's result is fully determined by which calls were served from the journal.
LIVE_ANSWERS = {"simulate": {"responses": [{"match": "summarize", "data": {"verdict": "live"}},
                                           {"match": ".", "text": "LIVE"}]}}

FIXTURES = sorted(GOLDEN.glob("*.json"))


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def source_calls(fixture: dict[str, Any]) -> list[CallRecord]:
    return [CallRecord(run_id=fixture["run_id"], **call) for call in fixture["calls"]]


def test_there_are_golden_journals() -> None:
    assert len(FIXTURES) >= 3


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_golden_keys_match_the_key_algorithm(path: Path) -> None:
    """The fixtures pin literal keys: if this fails, the key changed and old journals no longer resume."""
    for call in source_calls(load(path)):
        opts = call.options
        assert call.key == call_key(call.prompt, schema=opts.get("schema"), model=opts.get("model"),
                                    effort=opts.get("effort"), agent_type=opts.get("agentType"),
                                    isolation=opts.get("isolation")), call.prompt
    # Occurrences in the journal are what issue order assigns.
    occ = Occurrences()
    assert [c.occurrence for c in source_calls(load(path))] == [occ.next(c.key) for c in source_calls(load(path))]


REPLAYS = [(path, n) for path in FIXTURES for n in range(len(load(path)["replays"]))]


@pytest.mark.anyio
@pytest.mark.parametrize(("path", "n"), REPLAYS, ids=[f"{p.stem}-{n}-{load(p)['replays'][n]['mode']}" for p, n in REPLAYS])
async def test_golden_journal_replay(path: Path, n: int, tmp_path: Path) -> None:
    fixture = load(path)
    replay = fixture["replays"][n]
    store = MemoryStore()
    await store.save_run(RunRecord(id=fixture["run_id"], owner="local", status="completed", script=fixture["script"],
                                   created_at=1700000000.0, finished_at=1700000010.0, result=fixture["result"]))
    for call in source_calls(fixture):
        await store.save_call(call)
    record_file = tmp_path / "executions.jsonl"
    with anyio.fail_after(15):
        async with Engine(load_settings(), store, backends={"simulate": SimulateBackend(record_path=record_file)},
                          recover=False) as engine:
            submitted = await engine.submit(RunRequest(script=replay.get("script"), options=LIVE_ANSWERS,
                                                       resume_from=fixture["run_id"], resume_mode=replay["mode"]))
            final = await engine.wait(submitted.id)
            calls = await engine.list_agents(submitted.id)
            events = [e async for e in engine.follow(submitted.id)]
        stored = {c.index: c for c in await store.list_calls(submitted.id)}

    assert final.status == "completed", final.error
    assert final.resume_from == fixture["run_id"] and final.resume_mode == replay["mode"]
    assert final.result == replay["result"]
    assert [c.prompt for c in calls if c.status == "cached"] == replay["cached"]
    assert [c.prompt for c in calls if c.status != "cached"] == replay["live"]
    assert all(c.status == "completed" for c in calls if c.status != "cached")
    if "live_indices" in replay:
        assert [c.index for c in calls if c.status != "cached"] == replay["live_indices"]
    # The backend saw exactly the live calls, once each.
    executed = [json.loads(line) for line in record_file.read_text().splitlines()] if record_file.exists() else []
    assert sorted((e["index"], e["prompt"]) for e in executed) == [(c.index, c.prompt) for c in calls
                                                                   if c.status != "cached"]
    # Cached calls: an agent.cached event each, no tokens, and a pointer to the source call.
    assert sum(e.type == "agent.cached" for e in events) == len(replay["cached"])
    by_key = {(c.key, c.occurrence): c for c in source_calls(fixture)}
    for call in calls:
        if call.status == "cached":
            source = by_key[(call.key, call.occurrence)]
            assert call.output == source.output
            assert call.usage.get("output_tokens", 0) == 0
            pointer = [{"cached_from": fixture["run_id"], "index": source.index}]
            assert call.transcript == stored[call.index].transcript == pointer  # live view == journal
    live_tokens = sum(c.usage.get("output_tokens", 0) for c in calls if c.status != "cached")
    assert final.usage["tokens"]["output"] == live_tokens
