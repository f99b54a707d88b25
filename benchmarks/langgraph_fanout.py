"""LangGraph peer baseline: N no-op nodes fanned out with the Send API, SQLite checkpointer on.

Runs INSIDE the benchmark virtualenv (``benchmarks/.env``), never in quickflow's environment:

    benchmarks/.env/bin/python benchmarks/langgraph_fanout.py --n 1000 --concurrency 64 --trials 5

The graph is the map-reduce shape LangGraph documents: START → (conditional edge returning one
``Send("work", {"i": i})`` per item) → ``work`` (an async no-op returning its index into a reducer
list) → END, compiled with ``AsyncSqliteSaver`` on a temp file, so every task's writes and the
step's checkpoint go to SQLite. ``max_concurrency`` bounds in-flight nodes like quickflow's
concurrency option. Each trial is one ``ainvoke`` on a fresh thread id (one small warm-up per mode).

Batch mode prints one JSON object (per-trial seconds per durability mode, package versions).
``--serve`` is the worker mode ``run.py`` uses: it answers one trial request per stdin line, so the
peer's trials interleave with quickflow's under the same machine load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import operator
import os
import sys
import tempfile
import time
from importlib import metadata
from typing import Annotated, Any, TypedDict

from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
from langgraph.graph import END, START, StateGraph
from langgraph.types import Send


class State(TypedDict):
    n: int
    results: Annotated[list[int], operator.add]


class Item(TypedDict):
    i: int


def fan_out(state: State) -> list[Send]:
    return [Send("work", {"i": i}) for i in range(state["n"])]


async def work(item: Item) -> dict[str, Any]:
    return {"results": [item["i"]]}


def build() -> StateGraph:
    graph = StateGraph(State)
    graph.add_node("work", work)
    graph.add_conditional_edges(START, fan_out, ["work"])
    graph.add_edge("work", END)
    return graph


class Fanout:
    """One compiled graph per durability mode, each on its own SQLite file, reused across trials."""

    def __init__(self, directory: str, concurrency: int) -> None:
        self.directory = directory
        self.concurrency = concurrency
        self.stack = contextlib.AsyncExitStack()
        self.apps: dict[str, Any] = {}
        self.trials = 0

    async def app(self, mode: str) -> Any:
        if mode not in self.apps:
            db = os.path.join(self.directory, f"{mode}.db")
            saver = await self.stack.enter_async_context(AsyncSqliteSaver.from_conn_string(db))
            self.apps[mode] = build().compile(checkpointer=saver)
            await self.trial(mode, 50)  # warm-up: imports, table creation, first-use caches
        return self.apps[mode]

    async def trial(self, mode: str, n: int) -> float:
        """Seconds for one ``ainvoke`` fanning out ``n`` no-op nodes, on a fresh thread id."""
        app = await self.app(mode)
        self.trials += 1
        config = {"configurable": {"thread_id": f"{mode}-{self.trials}"}, "max_concurrency": self.concurrency}
        t0 = time.perf_counter()
        out = await app.ainvoke({"n": n, "results": []}, config, durability=mode)
        elapsed = time.perf_counter() - t0
        if len(out["results"]) != n:
            raise RuntimeError(f"expected {n} results, got {len(out['results'])}")
        return elapsed


def versions() -> dict[str, str]:
    names = ("langgraph", "langgraph-checkpoint", "langgraph-checkpoint-sqlite", "aiosqlite", "langchain-core")
    return {name: metadata.version(name) for name in names}


def emit(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def serve(fanout: Fanout, modes: list[str]) -> None:
    """Worker mode: one JSON request a line on stdin ({"mode": "async", "n": 1000}), one JSON reply a line."""
    loop = asyncio.get_running_loop()
    for mode in modes:
        await fanout.app(mode)  # warm up before saying ready
    emit({"ready": True, "versions": versions(), "python": sys.version.split()[0]})
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return
        request = json.loads(line)
        emit({"seconds": await fanout.trial(request["mode"], int(request["n"]))})


async def batch(fanout: Fanout, n: int, trials: int, modes: list[str]) -> None:
    results = {mode: [await fanout.trial(mode, n) for _ in range(trials)] for mode in modes}
    emit({"n": n, "concurrency": fanout.concurrency, "trials_s": results, "versions": versions(),
          "python": sys.version.split()[0]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--durability", nargs="+", default=["async", "sync"],
                        help="LangGraph durability modes to measure (async is LangGraph's default)")
    parser.add_argument("--serve", action="store_true",
                        help="worker mode: answer trial requests on stdin, so trials interleave with quickflow's")
    ns = parser.parse_args()

    async def go() -> None:
        with tempfile.TemporaryDirectory(prefix="lg-bench-") as tmp:
            fanout = Fanout(tmp, ns.concurrency)
            async with fanout.stack:
                if ns.serve:
                    await serve(fanout, ns.durability)
                else:
                    await batch(fanout, ns.n, ns.trials, ns.durability)

    asyncio.run(go())


if __name__ == "__main__":
    main()
