"""Shared test setup. Async tests run on asyncio through anyio's pytest plugin, each under a deadline."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
