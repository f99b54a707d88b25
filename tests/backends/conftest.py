"""Fixtures for backend tests: a fake Messages API server on loopback."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fakes.messages_server import FakeMessagesServer


@pytest.fixture
def messages_server() -> Iterator[FakeMessagesServer]:
    """A running fake Messages API; script it with ``enqueue``/``default``/``responder``."""
    with FakeMessagesServer() as server:
        yield server
