"""How a user script becomes engine source, and how engine positions map back.

The body is wrapped in an async function so top-level ``await`` and ``return`` are legal. The
prefix sits on the body's first line (no newline), so every line number is the user's own and
only columns on line 1 shift, by ``len(WRAP_PREFIX)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

__all__ = ["Diagnostic", "WRAP_PREFIX", "WRAP_SUFFIX", "engine_position", "to_user_position", "wrap_body"]

WRAP_PREFIX = "(async function () {"
WRAP_SUFFIX = "\n})"

# quickjs reports positions as "<input>:LINE:COL" in messages and stack frames.
_POSITION = re.compile(r"<input>:(\d+):(\d+)")


def wrap_body(body: str) -> str:
    return WRAP_PREFIX + body + WRAP_SUFFIX


def to_user_position(line: int, column: int) -> tuple[int, int]:
    """Map a 1-based engine position inside ``wrap_body(body)`` to the user's 1-based position."""
    if line == 1:
        column = max(1, column - len(WRAP_PREFIX))
    return line, column


def engine_position(text: str) -> tuple[int, int] | None:
    """The first ``<input>:L:C`` position in an engine message or stack, mapped to the user's source."""
    match = _POSITION.search(text)
    if match is None:
        return None
    return to_user_position(int(match.group(1)), int(match.group(2)))


@dataclass(frozen=True)
class Diagnostic:
    """One finding about a script, at a 1-based ``line``/``column`` of the user's source."""

    line: int
    column: int
    message: str
    hint: str | None = None
    severity: str = "error"  # error | warning

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "line": self.line,
            "column": self.column,
            "message": self.message,
            "severity": self.severity,
        }
        if self.hint:
            data["hint"] = self.hint
        return data

    def format(self, filename: str) -> str:
        text = f"{filename}:{self.line}:{self.column}: {self.message}"
        if self.severity == "warning":
            text = f"{filename}:{self.line}:{self.column}: warning: {self.message}"
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text
