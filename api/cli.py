"""The ``quickflow`` command line: thin over the library (in-process) and the HTTP API (client).

``run`` and ``check`` work in this process; ``serve`` starts the service; every other command
is one or two calls of :class:`api.client.Client`, which maps 1:1 to the HTTP routes.

Exit codes, everywhere: 0 the run completed (or the command succeeded), 1 the run failed or was
cancelled (or the command failed: no server, bad token, not found, a control that does not apply
now), 2 the script or the request was rejected.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import click

from runtime import Engine, MemoryStore, RunRecord, RunRequest, eventloop, load_settings
from runtime.errors import QuickflowError
from runtime.options import BACKENDS
from runtime.state import RunStatus

from .progress import make_progress

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_REJECTED = 0, 1, 2

# Error codes (the error JSON's ``code``) that mean "your input was refused": exit 2. Every
# other error (not found, conflict, unauthorized, unreachable, server error) exits 1.
REJECTED_CODES = frozenset({"script_rejected", "invalid_request", "invalid_json", "body_too_large"})

TERMINAL = frozenset(s.value for s in RunStatus if s.terminal)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="quickflow")
def main() -> None:
    """quickflow runs JavaScript workflow scripts that orchestrate LLM subagents.

    `run` and `check` work in this process; `serve` starts the HTTP service; the other commands
    talk to a server: --url/--token, else QUICKFLOW_URL/QUICKFLOW_TOKEN, else the local daemon
    that `quickflow serve` publishes.

    \b
    Exit codes:
      0  the run completed, or the command succeeded
      1  the run failed or was cancelled, or the command failed (no server, invalid token,
         run or workflow not found, a control that does not apply to the run now)
      2  the script or the request was rejected (static checks, invalid options or input)

    \b
    Examples:
      quickflow run examples/code-audit.js --args '{"files": ["a.py"]}'
      quickflow check my-workflow.js
      quickflow serve
      quickflow submit flow.js --follow
      quickflow runs --status running
    """


# --- shared helpers --------------------------------------------------------------------------


def read_script(path: str) -> tuple[str, str]:
    """(display name, source). ``-`` reads standard input."""
    if path == "-":
        return "<stdin>", sys.stdin.read()
    try:
        return path, Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise click.BadParameter(f"cannot read script {path}: {exc}", param_hint="SCRIPT") from exc


def parse_args(text: str | None) -> tuple[Any, bool]:
    """``--args`` as JSON text or ``@file``: (value, present)."""
    if text is None:
        return None, False
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text(encoding="utf-8")
        except OSError as exc:
            raise click.BadParameter(f"cannot read {text[1:]}: {exc}", param_hint="--args") from exc
    try:
        return json.loads(text), True
    except ValueError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}", param_hint="--args") from exc


def print_diagnostics(name: str, diagnostics: list[dict[str, Any]]) -> None:
    for d in diagnostics:
        prefix = "warning: " if d.get("severity") == "warning" else ""
        click.echo(f"{name}:{d['line']}:{d['column']}: {prefix}{d['message']}", err=True)
        if d.get("hint"):
            click.echo(f"  hint: {d['hint']}", err=True)


def summary_line(record: dict[str, Any]) -> str:
    """``completed · 3 agents · tokens in 40 / out 61 · $0.0009 · 0.05s``."""
    usage = record.get("usage") or {}
    agents = (usage.get("agents") or {}).get("total", 0)
    tokens = usage.get("tokens") or {}
    cost = usage.get("cost_usd", 0.0)
    estimate = " (estimated)" if usage.get("estimated") else ""
    return (
        f"{record['status']} · {agents} agents · tokens in {tokens.get('input', 0)} / out {tokens.get('output', 0)} "
        f"· ${cost:.4f}{estimate} · {usage.get('duration_s', 0):.2f}s"
    )


def exit_code_for_status(status: str) -> int:
    return EXIT_OK if status == "completed" else EXIT_FAILED


def report_run(record: dict[str, Any], *, as_json: bool) -> int:
    """Print a finished run (result to stdout, summary to stderr); return the exit code."""
    status = record["status"]
    if as_json:
        click.echo(json.dumps({key: record.get(key) for key in ("id", "status", "result", "error", "usage")}))
    else:
        if status == "completed":
            click.echo(json.dumps(record.get("result"), indent=2, ensure_ascii=False))
        elif record.get("error"):
            click.echo(f"run {status}: {record['error'].get('message', '')}", err=True)
        click.echo(summary_line(record), err=True)
    return exit_code_for_status(status)


def exit_code_for(exc: QuickflowError) -> int:
    return EXIT_REJECTED if exc.code in REJECTED_CODES else EXIT_FAILED


def fail(exc: QuickflowError, name: str = "") -> int:
    """Report an error (diagnostics as FILE:LINE:COL for a refused script); return the exit code.

    Works alike for in-process errors and for :class:`api.client.ApiError`, which carries the
    server's error code and details.
    """
    diagnostics = exc.details.get("diagnostics") if exc.code == "script_rejected" else None
    if diagnostics:
        print_diagnostics(name or "<script>", diagnostics)
        return EXIT_REJECTED
    click.echo(f"error: {exc.message}", err=True)
    return exit_code_for(exc)


@contextmanager
def reported(name: str = "") -> Iterator[None]:
    """Turn a QuickflowError raised inside into its message and exit code."""
    try:
        yield
    except QuickflowError as exc:
        sys.exit(fail(exc, name))


def run_options(**values: Any) -> dict[str, Any]:
    # Identity, not equality: an explicit 0 (e.g. --budget-tokens 0) is a value, not "unset".
    options = {k: v for k, v in values.items() if v is not None and v is not False and v != ()}
    simulate: dict[str, Any] = {}
    if "simulate_latency_ms" in options:
        simulate["latency_ms"] = options.pop("simulate_latency_ms")
    if "simulate_fail" in options:
        simulate["fail"] = list(options.pop("simulate_fail"))
    if simulate:
        options["simulate"] = simulate
    return options


_run_option_flags = [
    click.option("--args", "args_text", metavar="JSON|@FILE", help="The run's input as JSON, or @path to a JSON file."),
    click.option("--backend", type=click.Choice(BACKENDS), help="Agent backend (default: configured, else simulate)."),
    click.option("--model", help="Default model for agents (alias such as sonnet, or a model id)."),
    click.option("--concurrency", type=int, help="Agents running at once in this run."),
    click.option("--max-agents", type=int, help="Most agents this run may start."),
    click.option("--budget-tokens", type=int, help="Output-token budget; agent() throws once it is spent."),
    click.option("--agent-timeout", "agent_timeout_s", type=float, help="Per-agent timeout in seconds."),
    click.option("--timeout", "timeout_s", type=float, help="Wall-clock limit for the run in seconds."),
    click.option("--simulate-latency-ms", type=float, help="simulate backend: latency of each agent."),
    click.option("--simulate-fail", multiple=True, metavar="REGEX", help="simulate backend: fail agents whose label/prompt match."),
    click.option("--dry-run", is_flag=True, help="Run on the simulate backend and report the estimated cost."),
]


def with_run_options(fn: Any) -> Any:
    for flag in reversed(_run_option_flags):
        fn = flag(fn)
    return fn


# --- run and check (in-process) --------------------------------------------------------------


@main.command()
@click.argument("script")
@with_run_options
@click.option("--workflows-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Load saved workflows (for workflow()) from this directory.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: id, status, result, error, usage.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
def run(script: str, args_text: str | None, workflows_dir: Path | None, as_json: bool, quiet: bool,
        **flags: Any) -> None:
    """Run SCRIPT in this process with a live progress view and print its result.

    SCRIPT is a file, or - for standard input. Exit code 0 completed, 1 failed, 2 rejected.

    \b
    Examples:
      quickflow run examples/code-audit.js --args '{"files": ["a.py", "b.py"]}'
      quickflow run flow.js --dry-run --json
      echo "return await agent('hi')" | quickflow run -
    """
    name, source = read_script(script)
    args, has_args = parse_args(args_text)
    request = RunRequest(script=source, args=args, has_args=has_args, options=run_options(**flags))
    sys.exit(anyio.run(_run_local, name, request, workflows_dir, as_json, quiet,
                       backend_options=eventloop.run_options()))


async def _run_local(name: str, request: RunRequest, workflows_dir: Path | None, as_json: bool, quiet: bool) -> int:
    settings = load_settings()
    async with Engine(settings, MemoryStore(), recover=False) as engine:
        if workflows_dir is not None:
            await engine.load_workflows_dir(workflows_dir)
        try:
            record = await engine.submit(request)
        except QuickflowError as exc:
            return fail(exc, name)
        progress = make_progress(sys.stderr, quiet=quiet or as_json)
        if progress is not None:
            with progress:
                async for event in engine.follow(record.id):
                    progress.update(event.to_dict())
        final: RunRecord = await engine.wait(record.id)
    return report_run(final.to_dict(), as_json=as_json)


@main.command()
@click.argument("script")
@click.option("--json", "as_json", is_flag=True, help="Print the diagnostics and meta as JSON.")
@click.option("--require-meta", is_flag=True, help="Fail when `export const meta` is missing (saved workflows).")
def check(script: str, as_json: bool, require_meta: bool) -> None:
    """Check SCRIPT without running it: syntax, TypeScript, imports, meta.

    Prints FILE:LINE:COL: message for each problem. Exit code 0 ok, 2 rejected.

    \b
    Example:
      quickflow check examples/code-audit.js
    """
    from sandbox import check_script

    name, source = read_script(script)
    result = check_script(source, require_meta=require_meta, max_bytes=load_settings().limits.script_bytes)
    if as_json:
        click.echo(json.dumps(result.to_dict()))
    else:
        print_diagnostics(name, [d.to_dict() for d in (*result.errors, *result.warnings)])
        if result.ok:
            meta = f" ({result.meta.name})" if result.meta else ""
            click.echo(f"{name}: ok{meta}", err=True)
    sys.exit(EXIT_OK if result.ok else EXIT_REJECTED)


# --- the service -------------------------------------------------------------------------------


@main.command()
@click.option("--host", help="Address to bind (default 127.0.0.1; other addresses need configured tokens).")
@click.option("--port", type=int, help="Port (default 8765; 0 picks a free one).")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), help="Where the SQLite store lives.")
@click.option("--workflows-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Load saved workflows from this directory at start.")
def serve(host: str | None, port: int | None, data_dir: Path | None, workflows_dir: Path | None) -> None:
    """Start the HTTP service (API, live events, dashboard) with the embedded SQLite store.

    Prints "quickflow listening on URL" once the socket is bound; GET /healthz answers once runs
    that were live when the last process stopped have been picked up again.

    \b
    Examples:
      quickflow serve
      quickflow serve --port 0 --data-dir /var/lib/quickflow
      QUICKFLOW_TOKENS="ci:s3cret" quickflow serve --host 0.0.0.0
    """
    from .server import serve_forever

    try:
        settings = load_settings(host=host, port=port, data_dir=data_dir, workflows_dir=workflows_dir)
        sys.exit(serve_forever(settings))
    except QuickflowError as exc:
        click.echo(f"error: {exc.message}", err=True)
        sys.exit(EXIT_FAILED)


# The commands that talk to a server register themselves on `main`.
from . import _cli_remote  # noqa: E402,F401

if __name__ == "__main__":  # pragma: no cover
    # Run as `python -m api.cli`, this file is __main__; the commands registered themselves on
    # the `main` of the importable module api.cli, so that is the one to call.
    from api.cli import main as cli_main

    cli_main()
