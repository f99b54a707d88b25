"""Rendering a run's events for people: a live progress tree on a terminal, plain lines otherwise.

Both renderers consume the same event dicts (``{seq, ts, type, data}``) whether they come from
an in-process engine or from a server's event stream, so ``run``, ``submit --follow`` and
``logs -f`` look alike.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

__all__ = ["LiveProgress", "PlainProgress", "make_progress"]

_STATES = ("queued", "running", "completed", "cached", "failed", "stopped")
_STATE_STYLE = {
    "queued": "dim",
    "running": "cyan",
    "completed": "green",
    "cached": "blue",
    "failed": "red",
    "stopped": "yellow",
}
_AGENT_STATES = {
    "agent.queued": "queued",
    "agent.started": "running",
    "agent.completed": "completed",
    "agent.cached": "cached",
    "agent.failed": "failed",
    "agent.stopped": "stopped",
}


class _Tally:
    """Agent states per phase, folded from events."""

    def __init__(self) -> None:
        self.phases: dict[str, dict[str, int]] = {}
        self.agent_state: dict[int, tuple[str, str]] = {}  # index -> (phase, state)
        self.output_tokens = 0
        self.input_tokens = 0
        self.started = time.monotonic()

    def fold(self, event: Mapping[str, Any]) -> None:
        kind, data = event["type"], event.get("data", {})
        if kind == "phase.started":
            self.phases.setdefault(data.get("title", "?"), {})
        state = _AGENT_STATES.get(kind)
        if state is None:
            return
        index, phase = data.get("index"), data.get("phase") or "(no phase)"
        counts = self.phases.setdefault(phase, {})
        previous = self.agent_state.get(index)
        if previous is not None:
            counts[previous[1]] = counts.get(previous[1], 0) - 1
        counts[state] = counts.get(state, 0) + 1
        self.agent_state[index] = (phase, state)
        tokens = data.get("tokens")
        if isinstance(tokens, Mapping):
            self.output_tokens += int(tokens.get("output", 0))
            self.input_tokens += int(tokens.get("input", 0))


def _line(event: Mapping[str, Any]) -> str | None:
    """The narrator line for an event, or None for events a person need not read one by one."""
    kind, data = event["type"], event.get("data", {})
    if kind == "log":
        return str(data.get("message", ""))
    if kind == "warning":
        return f"warning: {data.get('message', '')}"
    if kind == "phase.started":
        return f"▶ {data.get('title', '')}"
    if kind == "agent.failed":
        return f"✗ agent {data.get('index')} {data.get('label', '')!r} failed: {data.get('error', '')}"
    if kind == "agent.stopped":
        return f"■ agent {data.get('index')} {data.get('label', '')!r} stopped"
    if kind == "agent.retrying":
        return f"↻ agent {data.get('index')} {data.get('label', '')!r} attempt {data.get('attempt')}: {data.get('reason', '')}"
    if kind in ("run.paused", "run.resumed", "run.cancelled"):
        return str(kind).split(".")[1]
    if kind == "run.failed":
        return f"run failed: {(data.get('error') or {}).get('message', '')}"
    return None


class PlainProgress:
    """One line per notable event, for logs and pipes."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def update(self, event: Mapping[str, Any]) -> None:
        line = _line(event)
        if line is not None:
            print(line, file=self._stream, flush=True)


class LiveProgress:
    """A live tree on a terminal: phases → agent counts by state, tokens, elapsed; log lines above."""

    def __init__(self, console: Console) -> None:
        self._console = console
        self._tally = _Tally()
        self._live = Live(self._render(), console=console, refresh_per_second=8, transient=True)

    def __enter__(self) -> LiveProgress:
        self._live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._live.update(self._render())
        self._live.__exit__(*exc)
        self._console.print(self._render())

    def update(self, event: Mapping[str, Any]) -> None:
        self._tally.fold(event)
        line = _line(event)
        if line is not None:
            self._console.print(Text(line))
        self._live.update(self._render())

    def _render(self) -> Group:
        tally = self._tally
        table = Table(box=None, show_header=True, header_style="bold", pad_edge=False)
        table.add_column("phase")
        for state in _STATES:
            table.add_column(state, justify="right", style=_STATE_STYLE[state])
        for title, counts in tally.phases.items():
            table.add_row(title, *(str(counts.get(s, 0) or "") for s in _STATES))
        elapsed = time.monotonic() - tally.started
        footer = Text(
            f"agents {len(tally.agent_state)} · tokens in {tally.input_tokens} / out {tally.output_tokens} "
            f"· {elapsed:.1f}s",
            style="dim",
        )
        return Group(table, footer)


def make_progress(stream: TextIO, *, quiet: bool = False) -> PlainProgress | LiveProgress | None:
    if quiet:
        return None
    console = Console(file=stream)
    if console.is_terminal:
        return LiveProgress(console)
    return PlainProgress(stream)
