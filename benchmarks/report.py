"""Targets, ratios and the Markdown report (``benchmarks/REPORT.md``), with an optional before/after table.

Results are one JSON document (``benchmarks/results/NAME.json``):

    {"meta": {machine, mode, settings...},
     "figures": {key: {label, unit, median, min, max, n, samples}},
     "ratios": {key: {label, value, numerator, denominator}},
     "targets": [{name, key, stat, op, limit, value, passed}]}

A ratio is always median ÷ median of two figures measured in the same run.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["RATIOS", "TARGETS", "compute_ratios", "evaluate_targets", "load_results", "render"]

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Ratio:
    key: str
    label: str
    numerator: str
    denominator: str


@dataclass(frozen=True)
class Target:
    name: str
    key: str  # a figure key or a ratio key
    op: str  # "<=", "<", ">=", "=="
    limit: float
    stat: str = "median"  # for figures: which statistic is judged ("max" for must-never counts)


RATIOS = (
    Ratio("overhead.parallel.vs_floor", "quickflow ÷ floor, 1000 agents via parallel",
          "overhead.parallel.quickflow", "overhead.parallel.floor"),
    Ratio("overhead.pipeline.vs_floor", "quickflow ÷ floor, 100 items × 3 stages via pipeline",
          "overhead.pipeline.quickflow", "overhead.pipeline.floor"),
    Ratio("overhead.parallel.anyio_vs_floor", "reference: anyio task-group fan-out ÷ asyncio floor",
          "overhead.parallel.floor_anyio", "overhead.parallel.floor"),
    Ratio("overhead.parallel.langgraph_vs", "LangGraph (default durability) ÷ quickflow, 1000-node fan-out",
          "overhead.parallel.langgraph", "overhead.parallel.quickflow"),
    Ratio("overhead.parallel.langgraph_sync_vs", "LangGraph (durability=sync) ÷ quickflow, 1000-node fan-out",
          "overhead.parallel.langgraph_sync", "overhead.parallel.quickflow"),
    Ratio("many.lag_hostile_vs_quiet", "loop lag p99 with hostile run ÷ without",
          "many.lag_hostile_p99", "many.lag_quiet_p99"),
)

TARGETS = (
    Target("overhead per durable agent ≤ 10× floor (parallel)", "overhead.parallel.vs_floor", "<=", 10),
    Target("overhead per durable agent ≤ 10× floor (pipeline)", "overhead.pipeline.vs_floor", "<=", 10),
    Target("≥ 10× faster than LangGraph fan-out", "overhead.parallel.langgraph_vs", ">=", 10),
    Target("scheduling ≤ 1.05× ideal", "scheduling.ratio", "<=", 1.05),
    Target("pipeline first item ≤ 1.5× ideal", "streaming.first_ratio", "<=", 1.5),
    Target("pipeline total ≤ 1.1× ideal", "streaming.total_ratio", "<=", 1.1),
    Target("resume of 1000 agents < 0.5 s", "resume.wall", "<", 0.5),
    Target("resume makes 0 live calls (worst trial)", "resume.live_calls", "==", 0, stat="max"),
    Target("≤ 300 kB memory per parked run", "many.kb_per_run", "<=", 300),
    Target("loop lag p99 ≤ 50 ms with a hostile run", "many.lag_hostile_p99", "<=", 50),
)

_OPS = {"<=": lambda a, b: a <= b, "<": lambda a, b: a < b, ">=": lambda a, b: a >= b, "==": lambda a, b: a == b}


def compute_ratios(figures: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for ratio in RATIOS:
        num, den = figures.get(ratio.numerator), figures.get(ratio.denominator)
        if num is None or den is None or not den["median"]:
            continue
        out[ratio.key] = {"label": ratio.label, "value": num["median"] / den["median"],
                          "numerator": ratio.numerator, "denominator": ratio.denominator}
    return out


def evaluate_targets(figures: Mapping[str, Any], ratios: Mapping[str, Any]) -> list[dict[str, Any]]:
    out = []
    for target in TARGETS:
        if target.key in ratios:
            value: float | None = ratios[target.key]["value"]
        elif target.key in figures:
            value = figures[target.key][target.stat]
        else:
            value = None
        out.append({"name": target.name, "key": target.key, "stat": target.stat, "op": target.op,
                    "limit": target.limit, "value": value,
                    "passed": None if value is None else bool(_OPS[target.op](value, target.limit))})
    return out


def load_results(name_or_path: str) -> dict[str, Any]:
    path = Path(name_or_path)
    if not path.suffix:
        path = RESULTS_DIR / f"{name_or_path}.json"
    data: dict[str, Any] = json.loads(path.read_text())
    return data


# --- rendering ------------------------------------------------------------------------------


def _num(value: float | None) -> str:
    if value is None:
        return "—"
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def _verdict(passed: bool | None) -> str:
    return {True: "PASS", False: "**FAIL**", None: "not run"}[passed]


def _outcome(target: Mapping[str, Any] | None) -> str:
    if target is None:
        return "—"
    if target["passed"] is None:
        return "not run"
    return f"{_verdict(target['passed'])} {_num(target['value'])}"


def _machine(meta: Mapping[str, Any]) -> list[str]:
    m = meta["machine"]
    packages = ", ".join(f"{k} {v}" for k, v in m["packages"].items())
    peer = meta.get("langgraph_versions")
    lines = [
        "## Machine",
        "",
        f"- CPU: {m['cpu_model']} — {m['cores']} cores ({m['usable_cores']} usable), {m['memory_gib']} GiB RAM",
        f"- Load average at start: {', '.join(f'{x:.2f}' for x in m['loadavg_at_start'])}"
        + (f"; at end: {', '.join(f'{x:.2f}' for x in meta['loadavg_at_end'])}" if meta.get("loadavg_at_end") else ""),
        f"- OS: {m['os']}; Python {m['python']} ({m['python_impl']})",
        f"- quickflow's hot path: {m.get('runtime', 'pure Python (before the nineteenth round)')}",
        f"- Packages: {packages}",
        f"- Peer (separate venv `benchmarks/.env`): "
        + (", ".join(f"{k} {v}" for k, v in peer.items()) if peer else "not measured"),
        f"- quickflow commit {m['git_commit']}" + (" + uncommitted changes" if m["git_dirty"] else ""),
        f"- Mode: {meta['mode']} — {meta['settings']}; finished in {meta.get('duration_s', 0):.0f} s "
        f"on {meta['started_at']}",
    ]
    return lines


def _figures_table(figures: Mapping[str, Any]) -> list[str]:
    lines = ["| figure | median | min | max | unit | trials |", "|---|---:|---:|---:|---|---:|"]
    for fig in figures.values():
        lines.append(f"| {fig['label']} | {_num(fig['median'])} | {_num(fig['min'])} | {_num(fig['max'])} "
                     f"| {fig['unit']} | {fig['n']} |")
    return lines


def _ratios_table(ratios: Mapping[str, Any]) -> list[str]:
    lines = ["| comparison | ratio |", "|---|---:|"]
    for ratio in ratios.values():
        lines.append(f"| {ratio['label']} | {_num(ratio['value'])}× |")
    return lines


def _targets_table(targets: list[dict[str, Any]]) -> list[str]:
    lines = ["| target | measured | limit | verdict |", "|---|---:|---:|---|"]
    for t in targets:
        lines.append(f"| {t['name']} | {_num(t['value'])} | {t['op']} {_num(t['limit'])} | {_verdict(t['passed'])} |")
    return lines


def _compare_table(before: Mapping[str, Any], after: Mapping[str, Any], name: str) -> list[str]:
    lines = [f"## Before/after (before = `{name}`, commit {before['meta']['machine']['git_commit']}, "
             f"{before['meta']['started_at']})", "",
             "Medians; after ÷ before < 1 means smaller (faster, leaner) for times, sizes and ratios to a floor.", "",
             "| figure | before | after | after ÷ before | unit |", "|---|---:|---:|---:|---|"]
    for key, fig in after["figures"].items():
        old = before["figures"].get(key)
        if old is None:
            continue
        change = fig["median"] / old["median"] if old["median"] else None
        lines.append(f"| {fig['label']} | {_num(old['median'])} | {_num(fig['median'])} | {_num(change)} "
                     f"| {fig['unit']} |")
    for key, ratio in after["ratios"].items():
        old = before["ratios"].get(key)
        if old is not None:
            lines.append(f"| {ratio['label']} | {_num(old['value'])}× | {_num(ratio['value'])}× "
                         f"| {_num(ratio['value'] / old['value'] if old['value'] else None)} | ratio |")
    lines += ["", "| target | before | after |", "|---|---|---|"]
    old_targets = {t["name"]: t for t in before.get("targets", [])}
    for t in after["targets"]:
        old = old_targets.get(t["name"])
        lines.append(f"| {t['name']} | {_outcome(old)} | {_outcome(t)} |")
    return lines


def render(results: Mapping[str, Any], *, before: Mapping[str, Any] | None = None,
           before_name: str = "") -> str:
    meta = results["meta"]
    lines = [
        "# quickflow benchmark report",
        "",
        f"Generated by `{meta['command']}`. Every figure is the median of N trials (min/max beside it); "
        "every comparison is a ratio of medians measured in this same run. See `benchmarks/README.md` "
        "for what each scenario does and why.",
        "",
        *_machine(meta),
        "",
        "## Targets",
        "",
        *_targets_table(results["targets"]),
        "",
        "## Comparisons",
        "",
        *_ratios_table(results["ratios"]),
        "",
        "## Figures",
        "",
        *_figures_table(results["figures"]),
    ]
    if meta.get("notes"):
        lines += ["", "## Notes", "", *[f"- {note}" for note in meta["notes"]]]
    if before is not None:
        lines += ["", *_compare_table(before, results, before_name)]
    return "\n".join(lines) + "\n"
