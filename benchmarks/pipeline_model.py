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

Order = Callable[[int, int], tuple[int, ...]]

# quickflow serves a pipeline's first ``concurrency`` items first (16 in the modelled scenario),
# then the others in rounds of 2 x ``concurrency`` items, the last round taking what is left
# over: 64 items make one round, so within it, the most stages ahead first.
ORDERS: dict[str, Order] = {
    "most stages ahead first (quickflow)": lambda stage, item: (item >= 16, stage, item),
    "later stages first (quickflow until the fifteenth round)": lambda stage, item: (-stage, item),
    "ready order (FIFO)": lambda stage, item: (),
}


def simulate(order: Order, *, holds: int, items: int = 64, stages: int = 3, concurrency: int = 16,
             latency_ms: float = 20.0, late_ms: float = 1.45, gap_ms: float = 3.8) -> tuple[float, float]:
    """(first item done ÷ its ideal, total ÷ ideal) for one schedule."""
    tie = itertools.count()
    ready = [(order(1, item), next(tie), item, 1) for item in range(items)]
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
                heapq.heappush(ready, (order(stage, item), next(tie), item, stage))
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
