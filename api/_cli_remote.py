"""The CLI commands that talk to a server: submit, runs, show, logs, controls, saved workflows.

Each command is one or two calls of :class:`api.client.Client` (one method per HTTP route) and
shares its output and exit codes with ``quickflow run`` (see :mod:`api.cli`).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.table import Table

from runtime.state import RunStatus

from .cli import (
    EXIT_OK,
    EXIT_REJECTED,
    TERMINAL,
    exit_code_for_status,
    main,
    parse_args,
    print_diagnostics,
    read_script,
    report_run,
    reported,
    run_options,
    summary_line,
    with_run_options,
)
from .client import Client, resolve_client
from .progress import PlainProgress, make_progress

# --- against a server (api.client) ------------------------------------------------------------


def with_server_options(fn: Any) -> Any:
    fn = click.option("--token", envvar="QUICKFLOW_TOKEN", show_envvar=True, metavar="TOKEN",
                      help="Bearer token (default: the local daemon's generated token).")(fn)
    fn = click.option("--url", envvar="QUICKFLOW_URL", show_envvar=True, metavar="URL",
                      help="Server URL (default: the local daemon started by `quickflow serve`).")(fn)
    return fn


def connect(url: str | None, token: str | None) -> Client:
    with reported():
        return resolve_client(url, token)


def usage_error(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(EXIT_REJECTED)


def request_body(args_text: str | None, flags: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """A run request body: the given fields, plus args and options when the flags set them."""
    body = {k: v for k, v in fields.items() if v is not None}
    args, has_args = parse_args(args_text)
    if has_args:
        body["args"] = args
    options = run_options(**flags)
    if options:
        body["options"] = options
    return body


def follow_events(client: Client, run_id: str, *, quiet: bool) -> dict[str, Any]:
    """Render the run's events live on stderr (as `run` does) until it ends; return the final run."""
    progress = make_progress(sys.stderr, quiet=quiet)
    if progress is None:
        for _ in client.events(run_id):
            pass
    else:
        with progress:
            for event in client.events(run_id):
                progress.update(event)
    return client.get_run(run_id)


def launch(client: Client, create: Callable[[bool], dict[str, Any]], *, wait: bool, follow: bool,
           as_json: bool, quiet: bool = False) -> int:
    """Start a run with ``create(wait)``, then print its id, or follow or wait for it and report it."""
    if follow:
        record = create(False)
        if not as_json:
            click.echo(f"run {record['id']} {record['status']}", err=True)
        return report_run(follow_events(client, record["id"], quiet=quiet or as_json), as_json=as_json)
    if wait:
        return report_run(create(True), as_json=as_json)
    record = create(False)
    click.echo(json.dumps(record) if as_json else record["id"])
    return EXIT_OK


_launch_flags = [
    click.option("--wait", is_flag=True, help="Block until the run ends, print its result, exit with its code."),
    click.option("--follow", "-f", is_flag=True, help="Show the run's progress live until it ends (implies --wait)."),
    click.option("--json", "as_json", is_flag=True,
                 help="Print JSON: the run (without --wait), or id, status, result, error, usage."),
    click.option("--quiet", "-q", is_flag=True, help="With --follow: no progress output."),
    click.option("--idempotency-key", metavar="KEY",
                 help="Submitting again with the same key returns the first run instead of starting another."),
]


def with_launch_options(fn: Any) -> Any:
    for flag in reversed(_launch_flags):
        fn = flag(fn)
    return fn


@main.command()
@click.argument("script")
@with_run_options
@with_launch_options
@with_server_options
def submit(script: str, args_text: str | None, wait: bool, follow: bool, as_json: bool, quiet: bool,
           idempotency_key: str | None, url: str | None, token: str | None, **flags: Any) -> None:
    """Submit SCRIPT to a server as a new run.

    Without --wait or --follow, prints the new run's id and exits 0 once the server accepted it.
    With them: exit code 0 completed, 1 failed or cancelled, 2 rejected (the server's
    diagnostics are printed as FILE:LINE:COL: message, like `quickflow check`).

    \b
    Examples:
      quickflow submit flow.js
      quickflow submit flow.js --args '{"topic": "retries"}' --follow
      quickflow submit flow.js --wait --json --idempotency-key nightly-2024-06-01
    """
    name, source = read_script(script)
    body = request_body(args_text, flags, script=source)
    client = connect(url, token)
    with client, reported(name):
        create = lambda wait_: client.create_run(body, wait=wait_, idempotency_key=idempotency_key)
        sys.exit(launch(client, create, wait=wait, follow=follow, as_json=as_json, quiet=quiet))


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _agents_text(usage: dict[str, Any]) -> str:
    agents = dict(usage.get("agents") or {})
    total = agents.pop("total", 0)
    states = ", ".join(f"{state} {n}" for state, n in agents.items() if n)
    return f"{total} ({states})" if states else str(total)


def _console() -> Console:
    # Wide enough that ids are never folded when the output goes to a pipe or a file.
    console = Console()
    return console if console.is_terminal else Console(width=160)


@main.command("runs")
@click.option("--status", type=click.Choice([s.value for s in RunStatus]), help="Only runs with this status.")
@click.option("--limit", type=click.IntRange(1, 500), default=20, show_default=True, help="Runs per page.")
@click.option("--before", metavar="RUN_ID", help="The next page: runs older than this one (printed as `next`).")
@click.option("--json", "as_json", is_flag=True, help="Print the page as JSON: {runs, next}.")
@with_server_options
def list_runs(status: str | None, limit: int, before: str | None, as_json: bool, url: str | None,
              token: str | None) -> None:
    """List runs on the server, newest first.

    \b
    Examples:
      quickflow runs
      quickflow runs --status failed --limit 5
      quickflow runs --json | jq -r '.runs[].id'
    """
    client = connect(url, token)
    with client, reported():
        page = client.list_runs(status=status, limit=limit, before=before)
    if as_json:
        click.echo(json.dumps(page))
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("run", "status", "workflow", "agents", "tokens out", "cost", "created", "duration"):
        table.add_column(column, no_wrap=True, justify="right" if column in ("tokens out", "cost", "duration") else "left")
    for run in page["runs"]:
        usage = run.get("usage") or {}
        table.add_row(
            run["id"], run["status"], run.get("workflow") or "-", _agents_text(usage),
            str((usage.get("tokens") or {}).get("output", 0)), f"${usage.get('cost_usd', 0.0):.4f}",
            _when(run.get("created_at")), f"{usage.get('duration_s', 0.0):.1f}s",
        )
    _console().print(table)
    if page.get("next"):
        click.echo(f"more: quickflow runs --before {page['next']}", err=True)


@main.command()
@click.argument("run_id", metavar="RUN")
@click.option("--agents", "with_agents", is_flag=True, help="Also list the run's agents.")
@click.option("--json", "as_json", is_flag=True, help="Print the run as JSON (with `agents` when --agents).")
@with_server_options
def show(run_id: str, with_agents: bool, as_json: bool, url: str | None, token: str | None) -> None:
    """Show one run: status, result or error, usage, phases (and agents with --agents).

    Exit code 0 when the run was found, whatever its status.

    \b
    Examples:
      quickflow show run_3f2a9c
      quickflow show run_3f2a9c --agents
      quickflow show run_3f2a9c --json | jq .usage
    """
    client = connect(url, token)
    with client, reported():
        record = client.get_run(run_id)
        agents = client.list_agents(run_id) if with_agents else None
    if as_json:
        if agents is not None:
            record["agents"] = agents
        click.echo(json.dumps(record))
        return
    console = _console()
    usage = record.get("usage") or {}
    tokens = usage.get("tokens") or {}
    lines = [f"run       {record['id']}", f"status    {record['status']}"]
    if record.get("workflow"):
        lines.append(f"workflow  {record['workflow']}")
    if record.get("resume_from"):
        lines.append(f"resumed   from {record['resume_from']} ({record.get('resume_mode') or 'reuse'})")
    lines += [
        f"created   {_when(record.get('created_at'))}",
        f"agents    {_agents_text(usage)}",
        f"tokens    in {tokens.get('input', 0)} / out {tokens.get('output', 0)}",
        f"cost      ${usage.get('cost_usd', 0.0):.4f}{' (estimated)' if usage.get('estimated') else ''}",
        f"duration  {usage.get('duration_s', 0.0):.2f}s",
    ]
    for line in lines:
        click.echo(line)
    if usage.get("phases"):
        table = Table(box=None, header_style="bold", pad_edge=False, title_justify="left")
        for column in ("phase", "agents", "tokens in", "tokens out", "cost", "elapsed"):
            table.add_column(column, justify="left" if column in ("phase", "agents") else "right")
        for p in usage["phases"]:
            states = ", ".join(f"{s} {n}" for s, n in (p.get("agents") or {}).items() if n) or "-"
            t = p.get("tokens") or {}
            table.add_row(p["title"], states, str(t.get("input", 0)), str(t.get("output", 0)),
                          f"${p.get('cost_usd', 0.0):.4f}", f"{p.get('elapsed_s', 0.0):.1f}s")
        click.echo()
        console.print(table)
    for title, key in (("warnings", "warnings"), ("failures", "failures")):
        if usage.get(key):
            click.echo(f"\n{title}:")
            for item in usage[key]:
                click.echo(f"  {item}")
    if agents:
        table = Table(box=None, header_style="bold", pad_edge=False)
        for column in ("#", "status", "label", "phase", "model", "attempts", "tokens out"):
            table.add_column(column, justify="right" if column in ("#", "attempts", "tokens out") else "left")
        for a in agents:
            table.add_row(str(a["index"]), a["status"], a.get("label") or "", a.get("phase") or "",
                          a.get("model") or "", str(a.get("attempts", 0)), str((a.get("usage") or {}).get("output_tokens", 0)))
        click.echo()
        console.print(table)
    if record["status"] == "completed":
        click.echo("\nresult:")
        click.echo(json.dumps(record.get("result"), indent=2, ensure_ascii=False))
    elif record.get("error"):
        click.echo(f"\nerror: {record['error'].get('message', '')}")


#: Without --follow, `logs` on a live run prints the events so far: the stream is read until no
#: event arrived for this long (the backlog is sent at once; the server offers no "snapshot" mode).
SNAPSHOT_IDLE_S = 1.0


@main.command()
@click.argument("run_id", metavar="RUN")
@click.option("--follow", "-f", is_flag=True, help="Keep printing events until the run ends; exit with its code.")
@click.option("--after", type=click.IntRange(0), default=0, help="Only events after this seq (resume a log).")
@click.option("--json", "as_json", is_flag=True, help="One NDJSON event per line: {seq, ts, run_id, type, data}.")
@with_server_options
def logs(run_id: str, follow: bool, after: int, as_json: bool, url: str | None, token: str | None) -> None:
    """Print a run's events: phases, log() lines, warnings, agent failures.

    With -f/--follow, waits for new events until the run ends and exits with the run's exit code
    (0 completed, 1 failed or cancelled); without it, prints the events so far and exits 0.

    \b
    Examples:
      quickflow logs run_3f2a9c
      quickflow logs -f run_3f2a9c
      quickflow logs run_3f2a9c --json > events.ndjson
    """
    client = connect(url, token)
    with client, reported():
        record = client.get_run(run_id)
        idle = None if follow or record["status"] in TERMINAL else SNAPSHOT_IDLE_S
        printer = PlainProgress(sys.stdout)
        for event in client.events(run_id, after, idle_timeout=idle):
            if as_json:
                click.echo(json.dumps(event, ensure_ascii=False))
            else:
                printer.update(event)
        if not follow:
            return
        final = client.get_run(run_id)
    if not as_json:
        click.echo(summary_line(final), err=True)
    sys.exit(exit_code_for_status(final["status"]))


def _control(action: str, doc: str) -> None:
    @main.command(action, help=doc)
    @click.argument("run_id", metavar="RUN")
    @click.option("--json", "as_json", is_flag=True, help="Print the run as JSON.")
    @with_server_options
    def command(run_id: str, as_json: bool, url: str | None, token: str | None) -> None:
        client = connect(url, token)
        with client, reported():
            record = getattr(client, action)(run_id)
        click.echo(json.dumps(record) if as_json else f"{record['id']} {record['status']}")


_control("cancel", """Cancel a live run; returns once it has ended (status cancelled).

    Exit code 0 when the run was cancelled; 1 when it is not live (already ended) or not found.
    A `submit --wait` or `logs -f` watching the run exits 1.

    \b
    Example:
      quickflow cancel run_3f2a9c
    """)

_control("pause", """Pause a live run: agents already running finish, no new agent starts.

    Continue it with `quickflow resume RUN`. Exit code 1 when the run is not running.

    \b
    Example:
      quickflow pause run_3f2a9c && quickflow resume run_3f2a9c
    """)


@main.command()
@click.argument("run_id", metavar="RUN")
@click.option("--script", "script_path", metavar="FILE",
              help="New run only: use this script instead of RUN's (e.g. an edited post-processing step).")
@click.option("--mode", type=click.Choice(["reuse", "prefix"]),
              help="New run only: reuse any completed call (default), or only the unchanged prefix of calls.")
@with_run_options
@with_launch_options
@with_server_options
def resume(run_id: str, script_path: str | None, mode: str | None, args_text: str | None, wait: bool,
           follow: bool, as_json: bool, quiet: bool, idempotency_key: str | None, url: str | None,
           token: str | None, **flags: Any) -> None:
    """Resume RUN: continue it when paused, else start a new run from its journal.

    This means one of two things, depending on RUN's status:

    \b
    * RUN is paused: continue it (POST /v1/runs/RUN/resume). Prints "RUN running".
    * RUN has ended (completed, failed, cancelled): start a NEW run that replays RUN's
      journal (resume_from): agent calls that completed in RUN are served from it (status
      cached, no tokens spent); the rest run live. It uses RUN's script and args unless
      --script/--args give new ones; run options apply to the new run. Prints the new
      run's id (or follows/waits for it with --follow/--wait).

    Exit codes as for `submit`; 1 when RUN is queued or running (nothing to resume).

    \b
    Examples:
      quickflow resume run_3f2a9c
      quickflow resume run_3f2a9c --script flow-fixed.js --follow
      quickflow resume run_3f2a9c --mode prefix --args @input.json --wait
    """
    new_run_only = script_path is not None or mode is not None or args_text is not None or bool(run_options(**flags)) \
        or idempotency_key is not None
    name, source = read_script(script_path) if script_path is not None else ("<script>", None)
    client = connect(url, token)
    with client, reported(name):
        record = client.get_run(run_id)
        if record["status"] not in TERMINAL:
            if new_run_only:
                usage_error(f"run {run_id} is {record['status']}: --script, --mode, --args, --idempotency-key "
                            "and run options only apply when starting a new run from an ended one")
            record = client.resume(run_id)
            if follow or wait:
                final = follow_events(client, run_id, quiet=quiet or as_json or not follow)
                sys.exit(report_run(final, as_json=as_json))
            click.echo(json.dumps(record) if as_json else f"{record['id']} {record['status']}")
            return
        body = request_body(args_text, flags, resume_from=run_id, resume_mode=mode or "reuse", script=source)
        create = lambda wait_: client.create_run(body, wait=wait_, idempotency_key=idempotency_key)
        sys.exit(launch(client, create, wait=wait, follow=follow, as_json=as_json, quiet=quiet))


# --- saved workflows -----------------------------------------------------------------------------


@main.group()
def workflows() -> None:
    """Saved workflows on the server: list, save, show, run, delete.

    \b
    Examples:
      quickflow workflows save examples/code-audit.js
      quickflow workflows list
      quickflow workflows run code-audit --args '{"files": ["a.py"]}' --follow
    """


@workflows.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the workflows as JSON.")
@with_server_options
def workflows_list(as_json: bool, url: str | None, token: str | None) -> None:
    """List saved workflows with their description and phases.

    \b
    Example:
      quickflow workflows list
    """
    client = connect(url, token)
    with client, reported():
        found = client.list_workflows()
    if as_json:
        click.echo(json.dumps(found))
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("name", "description", "phases", "source", "updated"):
        table.add_column(column, no_wrap=column == "name")
    for w in found:
        meta = w.get("meta") or {}
        phases = ", ".join(p.get("title", "") for p in meta.get("phases") or []) or "-"
        table.add_row(w["name"], meta.get("description") or "", phases, w.get("source") or "", _when(w.get("updated_at")))
    _console().print(table)


@workflows.command("save")
@click.argument("file")
@click.option("--json", "as_json", is_flag=True, help="Print the saved workflow as JSON.")
@with_server_options
def workflows_save(file: str, as_json: bool, url: str | None, token: str | None) -> None:
    """Save FILE on the server under the name in its `export const meta`.

    The script is checked first (as `quickflow check --require-meta`); a refused script exits 2
    with FILE:LINE:COL: message lines. Saving again replaces the workflow.

    \b
    Example:
      quickflow workflows save examples/code-audit.js
    """
    name, source = read_script(file)
    client = connect(url, token)
    with client, reported(name):
        checked = client.check(source, require_meta=True)
        print_diagnostics(name, [*checked.get("errors", []), *checked.get("warnings", [])])
        if not checked.get("ok") or not checked.get("meta"):
            sys.exit(EXIT_REJECTED)
        saved = client.put_workflow(checked["meta"]["name"], source)
    click.echo(json.dumps(saved) if as_json else f"saved workflow {saved['name']}")


@workflows.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the workflow (meta and script) as JSON.")
@with_server_options
def workflows_show(name: str, as_json: bool, url: str | None, token: str | None) -> None:
    """Show a saved workflow: its meta, then its script.

    \b
    Example:
      quickflow workflows show code-audit
    """
    client = connect(url, token)
    with client, reported():
        found = client.get_workflow(name)
    if as_json:
        click.echo(json.dumps(found))
        return
    meta = found.get("meta") or {}
    click.echo(f"name         {found['name']}")
    click.echo(f"description  {meta.get('description') or ''}")
    if meta.get("whenToUse"):
        click.echo(f"when to use  {meta['whenToUse']}")
    for phase in meta.get("phases") or []:
        detail = f" — {phase['detail']}" if phase.get("detail") else ""
        click.echo(f"phase        {phase.get('title', '')}{detail}")
    click.echo(f"source       {found.get('source') or ''} · updated {_when(found.get('updated_at'))}")
    click.echo()
    click.echo(found.get("script", ""))


@workflows.command("run")
@click.argument("name")
@with_run_options
@with_launch_options
@with_server_options
def workflows_run(name: str, args_text: str | None, wait: bool, follow: bool, as_json: bool, quiet: bool,
                  idempotency_key: str | None, url: str | None, token: str | None, **flags: Any) -> None:
    """Run the saved workflow NAME; output and exit codes as for `submit`.

    \b
    Examples:
      quickflow workflows run code-audit --args '{"files": ["a.py"]}'
      quickflow workflows run code-audit --args @input.json --follow
    """
    body = request_body(args_text, flags)
    client = connect(url, token)
    with client, reported(name):
        create = lambda wait_: client.run_workflow(name, body, wait=wait_, idempotency_key=idempotency_key)
        sys.exit(launch(client, create, wait=wait, follow=follow, as_json=as_json, quiet=quiet))


@workflows.command("delete")
@click.argument("name")
@with_server_options
def workflows_delete(name: str, url: str | None, token: str | None) -> None:
    """Delete the saved workflow NAME (runs of it are kept).

    \b
    Example:
      quickflow workflows delete code-audit
    """
    client = connect(url, token)
    with client, reported():
        client.delete_workflow(name)
    click.echo(f"deleted workflow {name}")
