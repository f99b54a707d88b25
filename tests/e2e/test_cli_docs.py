"""The CLI's documentation is a tested contract: every command has help with an example, and the
main help documents the exit codes. In-process (click's CliRunner), so it is fast."""

from __future__ import annotations

import re
from collections.abc import Iterator

import click
import pytest
from click.testing import CliRunner

from api.cli import EXIT_FAILED, EXIT_OK, EXIT_REJECTED, main


def command_paths(group: click.Group = main, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        assert command is not None
        yield (*prefix, name)
        if isinstance(command, click.Group):
            yield from command_paths(command, (*prefix, name))


ALL_COMMANDS = sorted(command_paths())

# The client commands SPEC §6 names; a rename or removal must update the spec and this list.
CLIENT_COMMANDS = [
    ("submit",), ("runs",), ("show",), ("logs",), ("cancel",), ("pause",), ("resume",),
    ("workflows", "list"), ("workflows", "save"), ("workflows", "run"), ("workflows", "show"),
    ("workflows", "delete"),
]


def help_text(*path: str) -> str:
    result = CliRunner().invoke(main, [*path, "--help"], prog_name="quickflow")
    assert result.exit_code == 0, result.output
    return result.output


def test_the_spec_commands_exist() -> None:
    for path in [("run",), ("check",), ("serve",), *CLIENT_COMMANDS]:
        assert path in ALL_COMMANDS, f"quickflow {' '.join(path)} is missing"


@pytest.mark.parametrize("path", ALL_COMMANDS, ids=lambda p: " ".join(p))
def test_every_command_has_help_with_an_example(path: tuple[str, ...]) -> None:
    text = help_text(*path)
    assert re.search(r"^\s*Examples?:\s*$", text, re.MULTILINE), f"`quickflow {' '.join(path)} --help` has no Example section"
    examples = text.split("Example", 1)[1]
    assert f"quickflow {path[0]}" in examples, "the example should show the command itself"


@pytest.mark.parametrize("path", ALL_COMMANDS, ids=lambda p: " ".join(p))
def test_every_option_is_explained(path: tuple[str, ...]) -> None:
    ctx = click.Context(main)
    command: click.Command | None = main
    for name in path:
        assert isinstance(command, click.Group)
        command = command.get_command(ctx, name)
    assert command is not None
    for param in command.params:
        if isinstance(param, click.Option) and param.name != "help":
            assert param.help, f"{' '.join(path)} {param.opts[0]} has no help text"


def test_main_help_documents_the_exit_codes() -> None:
    text = help_text()
    section = text.split("Exit codes:", 1)[1]
    for code, words in ((EXIT_OK, "completed"), (EXIT_FAILED, "failed or was cancelled"), (EXIT_REJECTED, "rejected")):
        assert re.search(rf"^\s*{code}\s+.*{words}", section, re.MULTILINE), f"exit code {code} is not documented"
    assert (EXIT_OK, EXIT_FAILED, EXIT_REJECTED) == (0, 1, 2)


def test_server_discovery_is_documented() -> None:
    text = help_text()
    for words in ("--url", "QUICKFLOW_URL", "QUICKFLOW_TOKEN", "local daemon"):
        assert words in text
    for path in CLIENT_COMMANDS:
        options = help_text(*path)
        assert "--url" in options and "QUICKFLOW_URL" in options and "--token" in options


def test_resume_documents_both_meanings() -> None:
    text = help_text("resume")
    assert "paused" in text and "NEW run" in text and "resume_from" in text
