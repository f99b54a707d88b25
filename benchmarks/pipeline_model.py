"""A model of the pipeline-streaming scenario: what the queue order, the slot holds and the
per-call costs do to the first item and the total, without the noise of a real trial.

``concurrency`` slots run ``items`` chains of ``stages`` calls. Each call takes ``latency_ms``
plus ``late_ms`` (the simulated sleep's overshoot and the loop's turn); an item's next stage
becomes ready ``gap_ms`` after its previous call ends (the journal commit, then the script's
slice). The first ``holds`` items keep their slot through each gap, much as ``Run._worker`` lets them.
Figures are ratios against the same ideals as the benchmark. ``benchmarks/PROFILING.md``
(sixth round) compares them with measured trials.

    python -m benchmarks.pipeline_model [--late-ms 1.45] [--gap-ms 3.8]
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import math
from collections.abc import Callable

from runtime.scheduling import queue_priority

#: ``order(stage, item, stages, items)``: the queue key of an item's stage (1-based); smaller
#: goes first.
Order = Callable[[int, int, int, int], tuple[int, ...]]

#: The modelled scenario's concurrency, which quickflow's order depends on.
_SLOTS = 16


def _quickflow(stage: int, item: int, stages: int, items: int) -> tuple[int, ...]:
    """The run's own queue order (``scheduling.queue_priority``) at the scenario's 16 slots."""
    return queue_priority((stage - 1, item, stages, items), 0, _SLOTS)


ORDERS: dict[str, Order] = {
    "quickflow (rounds, most stages ahead first)": _quickflow,
    "later stages first (quickflow until the fifteenth round)": lambda stage, item, stages, items: (-stage, item),
    "ready order (FIFO)": lambda stage, item, stages, items: (),
}


def simulate(order: Order, *, holds: int, items: int = 64, stages: int = 3, concurrency: int = 16,
             latency_ms: float = 20.0, late_ms: float = 1.45, gap_ms: float = 3.8) -> tuple[float, float]:
    """(first item done ÷ its ideal, total ÷ ideal) for one schedule."""
    tie = itertools.count()
    ready = [(order(1, item, stages, items), next(tie), item, 1) for item in range(items)]
    heapq.heapify(ready)
    events: list[tuple[float, int, str, int, int]] = []  # (time, tie, kind, item, stage)
    free = concurrency
    first_done = math.inf
    end = 0.0

    def start(now: float, item: int, stage: int) -> None:
        heapq.heappush(events, (now + latency_ms + late_ms, next(tie), "done", item, stage))

    now = 0.0
    while True:
        while free and ready:
            _, _, item, stage = heapq.heappop(ready)
            free -= 1
            start(now, item, stage)
        if not events:
            break
        now, _, kind, item, stage = heapq.heappop(events)
        if kind == "ready":
            if item < holds:
                start(now, item, stage)  # on the slot it held
            else:
                heapq.heappush(ready, (order(stage, item, stages, items), next(tie), item, stage))
            continue
        end = now
        if stage == stages:
            first_done = min(first_done, now)
        else:
            heapq.heappush(events, (now + gap_ms, next(tie), "ready", item, stage + 1))
        if stage == stages or item >= holds:
            free += 1
    total_ideal = math.ceil(items * stages / concurrency) * latency_ms
    return first_done / (stages * latency_ms), end / total_ideal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--late-ms", type=float, nargs="+", default=[0.4, 0.9, 1.45])
    parser.add_argument("--gap-ms", type=float, nargs="+", default=[1.0, 3.8])
    ns = parser.parse_args()
    print("| order | holds | late ms | gap ms | first item ÷ ideal | total ÷ ideal |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, order in ORDERS.items():
        for holds in (0, 1, 16):
            for late in ns.late_ms:
                for gap in ns.gap_ms:
                    first, total = simulate(order, holds=holds, late_ms=late, gap_ms=gap)
                    print(f"| {name} | {holds} | {late:g} | {gap:g} | {first:.2f} | {total:.3f} |")


if __name__ == "__main__":
    main()
