"""Worker threads that run isolate slices off the event loop.

A slice blocks the thread that runs it for up to one slice limit. Running slices on a small
pool of worker threads keeps the event loop responsive (quickjs-ng releases the GIL while JS
runs) and lets several runs compute at once. The pool is a FIFO-fair ``CapacityLimiter`` over
its threads: a hostile run can hold one worker for at most one slice before every waiting run
gets its turn. An isolate runs on one thread at a time, because its run awaits each slice
before it asks for the next.

**Overruns.** The engine polls its time limit between bytecodes, and only every few thousand
of them, so one built-in call runs to its end however long that takes: ``join()`` of an array
with four billion holes, a quadratic string search, or a loop of slow built-in calls between
two polls. A slice given a deadline (``overrun_after_s``) is abandoned when it is still
running at that deadline: its caller gets :class:`SliceOverrun`, its worker token goes back
to the pool, and a new thread takes the next slice. The abandoned thread runs on until the
engine's next poll stops the script, which nothing can hasten, so it gets the lowest CPU
priority (nice 19: it runs on what the service leaves idle) and exits when it is done. The
threads are daemons, so an abandoned one never holds up the process's exit. Each slice may
name its ``owner``: ``overrunning(owner)`` counts that owner's abandoned slices still running,
so that the engine can stop an owner from piling up threads (and their heaps) that nothing can
stop.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import anyio
import anyio.lowlevel

__all__ = ["SliceOverrun", "SlicePool", "SlicePoolStatistics", "SliceRefused"]

T = TypeVar("T")

# An idle worker thread exits after this long; the next slice starts a new one.
IDLE_EXIT_S = 10.0


class SliceRefused(Exception):
    """The slice's owner has ``stuck`` abandoned slices still running, its limit (see ``SlicePool.run``)."""

    def __init__(self, stuck: int) -> None:
        super().__init__(f"{stuck} abandoned slice(s) of this owner still run")
        self.stuck = stuck


class SliceOverrun(Exception):
    """A slice was still running at its deadline and was abandoned (see the module docstring)."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"the slice was still running after {seconds:g} s")
        self.seconds = seconds


@dataclass(frozen=True)
class SlicePoolStatistics:
    workers: int
    running: int
    waiting: int
    slices_total: int
    overruns_total: int = 0  # slices abandoned at their deadline
    overrunning: int = 0  # abandoned slices whose thread is still running them


class _Job(Generic[T]):
    """One slice handed to a worker thread. ``started_at``, ``finished`` and ``abandoned``
    change under the pool's lock: a slice either finishes or is abandoned, never both."""

    __slots__ = ("abandoned", "finished", "fn", "future", "owner", "pool", "started_at", "thread_id", "timer")

    def __init__(self, pool: SlicePool, fn: Callable[[], T], future: asyncio.Future[T], owner: str | None) -> None:
        self.pool = pool
        self.fn = fn
        self.future = future
        self.owner = owner
        self.started_at: float | None = None  # time.monotonic() on its thread
        self.thread_id: int | None = None  # the kernel's id of that thread
        self.finished = False
        self.abandoned = False
        self.timer: asyncio.TimerHandle | None = None  # the deadline's check (see SlicePool._check)

    def run(self) -> bool:
        """On a worker thread: run the slice and hand its outcome to the loop. True when it
        was abandoned meanwhile (its thread may run at the lowest priority now)."""
        with self.pool._lock:
            self.thread_id = threading.get_native_id()
            self.started_at = time.monotonic()
        outcome: tuple[bool, Any]
        try:
            outcome = (True, self.fn())
        except BaseException as exc:  # handed to the awaiting task, which raises it
            outcome = (False, exc)
        with self.pool._lock:
            self.finished = True
            abandoned = self.abandoned
        try:
            self.future.get_loop().call_soon_threadsafe(self._resolve, outcome)
        except RuntimeError:  # the loop is closed: nobody waits for this slice any more
            pass
        return abandoned

    def _resolve(self, outcome: tuple[bool, Any]) -> None:
        if self.abandoned:
            self.pool._overrunning -= 1
            self.pool._count_owner(self.owner, -1)
        if self.future.done():
            return
        ok, value = outcome
        if ok:
            self.future.set_result(value)
        else:
            self.future.set_exception(value)


def _lowest_priority(thread_id: int) -> None:
    """Nice 19 for one thread (on Linux a thread is a task of its own; raising nice needs no
    privilege, lowering it does: the thread exits rather than serve again)."""
    try:
        os.setpriority(os.PRIO_PROCESS, thread_id, 19)
    except (AttributeError, OSError):  # not on this platform
        pass


class SlicePool:
    def __init__(self, workers: int | None = None) -> None:
        self.workers = workers or max(4, os.cpu_count() or 1)
        self._limiter = anyio.CapacityLimiter(self.workers)
        self._jobs: queue.SimpleQueue[_Job[Any]] = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards the three counts below and the jobs' states
        self._threads = 0  # started and not exited
        self._busy = 0  # running a job (abandoned ones included)
        self._queued = 0  # jobs submitted and not yet taken by a thread
        self._total = 0
        self._overruns_total = 0
        self._overrunning = 0
        self._overrunning_by_owner: dict[str, int] = {}  # changed on the event loop only

    async def run(self, fn: Callable[[], T], *, overrun_after_s: float | None = None, owner: str | None = None,
                  stuck_limit: int = 0) -> T:
        """Run one slice on a worker thread. Cancellation waits for the slice to end: an isolate
        runs one slice at a time. With ``overrun_after_s``, a slice still running that many
        seconds after it started is abandoned and :class:`SliceOverrun` raised; it counts
        towards ``overrunning(owner)`` until its thread is done with it. With ``stuck_limit``,
        a slice whose owner has that many abandoned slices still running when it gets a worker
        does not run: :class:`SliceRefused`. An owner then has at most ``stuck_limit`` of them,
        plus those of its slices that were running when the last one was abandoned."""
        self._total += 1
        # A turn first, as anyio.to_thread gives: every run that asks for a slice in this turn
        # is in the queue before any waits in it (runtime.script evicts only while none wait).
        await anyio.lowlevel.checkpoint()
        async with self._limiter:
            stuck = self.overrunning(owner) if owner is not None else 0
            if 0 < stuck_limit <= stuck:
                raise SliceRefused(stuck)
            loop = asyncio.get_running_loop()
            future: asyncio.Future[T] = loop.create_future()
            job = _Job(self, fn, future, owner)
            self._submit(job)
            if overrun_after_s is not None:
                job.timer = loop.call_later(overrun_after_s, self._check, job, overrun_after_s)
            try:
                with anyio.CancelScope(shield=True):
                    result = await future
            finally:
                if job.timer is not None:
                    job.timer.cancel()
        return result

    def _check(self, job: _Job[Any], seconds: float) -> None:
        """On the loop: abandon the slice if it has run ``seconds``, else look again when it would have."""
        with self._lock:
            if job.finished:
                return
            started_at = job.started_at
            due = (started_at if started_at is not None else time.monotonic()) + seconds
            if started_at is None or time.monotonic() < due:
                job.timer = job.future.get_loop().call_later(due - time.monotonic(), self._check, job, seconds)
                return
            job.abandoned = True
            assert job.thread_id is not None
            _lowest_priority(job.thread_id)  # under the lock: the thread cannot have gone on to another slice
        self._overruns_total += 1
        self._overrunning += 1
        self._count_owner(job.owner, 1)
        job.future.set_exception(SliceOverrun(seconds))

    def _count_owner(self, owner: str | None, change: int) -> None:
        if owner is None:
            return
        count = self._overrunning_by_owner.get(owner, 0) + change
        if count:
            self._overrunning_by_owner[owner] = count
        else:
            del self._overrunning_by_owner[owner]

    def overrunning(self, owner: str) -> int:
        """How many of ``owner``'s slices were abandoned and still run on their threads."""
        return self._overrunning_by_owner.get(owner, 0)

    def _submit(self, job: _Job[Any]) -> None:
        with self._lock:
            self._queued += 1
            # A thread for every queued job; abandoned threads hold no token but still run,
            # so the pool may need one more each.
            spawn = self._threads - self._busy < self._queued and self._threads < self.workers + self._overrunning
            if spawn:
                self._threads += 1
            self._jobs.put(job)
        if spawn:
            threading.Thread(target=self._work, name="quickflow slice worker", daemon=True).start()

    def _work(self) -> None:
        while True:
            job = self._next_job()
            if job is None:
                return
            abandoned = job.run()
            with self._lock:
                self._busy -= 1
                if abandoned:  # its thread may run at the lowest priority now
                    self._threads -= 1
                    return
            del job  # the finished slice's result must not wait here for the next one

    def _next_job(self) -> _Job[Any] | None:
        """The next job, or None once this thread has idled IDLE_EXIT_S with more threads
        free than jobs queued."""
        while True:
            try:
                job = self._jobs.get(timeout=IDLE_EXIT_S)
            except queue.Empty:
                with self._lock:
                    if self._threads - self._busy > self._queued:
                        self._threads -= 1
                        return None
                continue
            with self._lock:
                self._queued -= 1
                self._busy += 1
            return job

    def statistics(self) -> SlicePoolStatistics:
        stats = self._limiter.statistics()
        return SlicePoolStatistics(
            workers=self.workers,
            running=stats.borrowed_tokens,
            waiting=stats.tasks_waiting,
            slices_total=self._total,
            overruns_total=self._overruns_total,
            overrunning=self._overrunning,
        )
