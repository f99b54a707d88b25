"""The event loop quickflow runs on (runtime/eventloop.py): epoll's events through a wait whose
timeout has microseconds, and the same loop under the tests, the CLI and the service."""
from __future__ import annotations

import asyncio
import select
import selectors
import socket

import anyio
import pytest
import uvicorn

from runtime import eventloop

pytestmark = pytest.mark.skipif(not hasattr(selectors, "EpollSelector"), reason="epoll is Linux's")


def test_a_wait_ends_when_a_registered_descriptor_is_ready() -> None:
    selector = eventloop.PreciseEpollSelector()
    left, right = socket.socketpair()
    try:
        key = selector.register(left, selectors.EVENT_READ, data="left")
        right.send(b"x")
        # An hour: only the descriptor's readiness can end this wait (the test's deadline is 120 s).
        ready = selector.select(3600)
        assert [(k.data, events) for k, events in ready] == [(key.data, selectors.EVENT_READ)]
    finally:
        selector.close()
        left.close()
        right.close()


def test_a_wait_takes_its_timeout_in_microseconds(monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[tuple[list[int], float | None]] = []
    real = select.select

    def spy(rlist: list[int], wlist: object, xlist: object, timeout: float | None = None) -> object:
        waits.append((list(rlist), timeout))
        return real(rlist, wlist, xlist, timeout)  # type: ignore[arg-type]

    def waits_on(fd: int) -> list[float | None]:
        # Only this selector's: another thread's loop may wait meanwhile.
        return [timeout for rlist, timeout in waits if rlist == [fd]]

    monkeypatch.setattr(select, "select", spy)
    selector = eventloop.PreciseEpollSelector()
    try:
        assert selector.select(0.0013) == []
        assert waits_on(selector.fileno()) == [0.0013]  # not epoll's 2 ms
        waits.clear()
        assert selector.select(0) == []  # a poll does not wait
        assert waits_on(selector.fileno()) == []
    finally:
        selector.close()

    async def sleep() -> None:
        await asyncio.sleep(0.0013)

    loop = eventloop.new_event_loop()
    try:
        fd = loop._selector.fileno()  # type: ignore[attr-defined]
        loop.run_until_complete(sleep())
    finally:
        loop.close()
    # The loop's wait for the timer, in microseconds: at most the 1.3 ms left, never rounded up.
    timed = waits_on(fd)
    assert timed and all(timeout is not None and 0 < timeout <= 0.0013 for timeout in timed)


def test_a_wait_with_nothing_ready_ends_with_no_events() -> None:
    selector = eventloop.PreciseEpollSelector()
    left, right = socket.socketpair()
    try:
        selector.register(left, selectors.EVENT_READ)
        assert selector.select(0.0013) == []
        assert selector.select(0) == []
    finally:
        selector.close()
        left.close()
        right.close()


def test_a_descriptor_select_cannot_take_leaves_the_wait_to_epoll(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(eventloop, "_FD_SETSIZE", 0)  # as if a thousand files were open first
    selector = eventloop.PreciseEpollSelector()

    def refuse(*args: object) -> None:
        raise AssertionError("select() would raise ValueError for this descriptor")

    monkeypatch.setattr(select, "select", refuse)
    left, right = socket.socketpair()
    try:
        selector.register(left, selectors.EVENT_READ)
        assert selector.select(0.0013) == []
        right.send(b"x")
        assert len(selector.select(3600)) == 1
    finally:
        selector.close()
        left.close()
        right.close()


def test_timers_and_io_run_on_the_loop() -> None:
    async def main() -> bytes:
        reader, writer = await asyncio.open_connection(sock=server)
        await asyncio.sleep(0.0013)
        client.send(b"ping")
        data = await reader.readexactly(4)
        writer.close()
        return data

    server, client = socket.socketpair()
    try:
        assert anyio.run(main, backend_options=eventloop.run_options()) == b"ping"
    finally:
        client.close()


@pytest.mark.anyio
async def test_the_tests_run_on_it() -> None:
    with anyio.fail_after(5):  # every async test runs under a deadline
        selector = asyncio.get_running_loop()._selector  # type: ignore[attr-defined]
        assert isinstance(selector, eventloop.PreciseEpollSelector)


def test_the_service_runs_on_it() -> None:
    from api import server

    factory = uvicorn.Config(app=None, loop=server.LOOP).get_loop_factory()
    assert factory is eventloop.new_event_loop
    loop = factory()
    try:
        assert isinstance(loop._selector, eventloop.PreciseEpollSelector)  # type: ignore[attr-defined]
    finally:
        loop.close()
