"""Shared test setup. Async tests run on asyncio through anyio's pytest plugin, each under a deadline."""

from __future__ import annotations

from typing import Any

import pytest

from runtime import eventloop


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    # The loop the service and the CLI run on.
    return "asyncio", eventloop.run_options()
