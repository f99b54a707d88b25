"""The pipeline model in benchmarks/ against schedules whose outcome is known by hand."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from benchmarks.pipeline_model import ORDERS, simulate

LONGEST_FIRST, LATER_FIRST, FIFO = ORDERS.values()


@pytest.mark.parametrize("order", [LONGEST_FIRST, LATER_FIRST, FIFO])
def test_free_calls_fill_every_wave(order: Callable[[int, int, int, int], tuple[int, ...]]) -> None:
    # 64 items × 3 stages on 16 slots with no cost between calls: 12 full waves of 20 ms.
    _, total = simulate(order, holds=0, late_ms=0, gap_ms=0)
    assert total == pytest.approx(1.0)


def test_a_held_item_runs_its_stages_back_to_back() -> None:
    first, _ = simulate(LATER_FIRST, holds=16, late_ms=0, gap_ms=0)
    assert first == pytest.approx(1.0)
    first, _ = simulate(LATER_FIRST, holds=16, late_ms=0, gap_ms=5)
    assert first == pytest.approx((3 * 20 + 2 * 5) / 60)


def test_gaps_cost_the_total_only_through_held_slots() -> None:
    # Without holds, other items' calls fill the gaps; a held slot idles through them.
    _, free = simulate(LATER_FIRST, holds=0, late_ms=0, gap_ms=4)
    _, held = simulate(LATER_FIRST, holds=16, late_ms=0, gap_ms=4)
    assert free == pytest.approx(1.0)
    assert held > free


def test_late_calls_stretch_every_wave() -> None:
    _, total = simulate(FIFO, holds=0, late_ms=2, gap_ms=0)
    assert total == pytest.approx(22 / 20)


def test_starting_the_longest_chains_first_keeps_the_end_free_of_gaps() -> None:
    # Later stages first leaves the last items' stages to run one after another at the end,
    # each a gap after the one before; the longest chains first ends on independent calls.
    _, longest = simulate(LONGEST_FIRST, holds=16, late_ms=0, gap_ms=3)
    _, later = simulate(LATER_FIRST, holds=16, late_ms=0, gap_ms=3)
    _, unheld = simulate(LONGEST_FIRST, holds=0, late_ms=0, gap_ms=3)
    assert unheld == pytest.approx(1.0)  # every gap is filled by another item's call
    assert longest < later


def test_rounds_keep_the_total_of_one_round() -> None:
    # Rounds of 2 x concurrency items end as one round over the whole pipeline does: on last
    # stages that do not wait for each other. 256 items: the streaming 16, then 7 rounds (the last of 48).
    def one_round(stage: int, item: int, stages: int, items: int) -> tuple[int, ...]:
        return (item >= 16, stage, item)

    _, rounds = simulate(LONGEST_FIRST, holds=16, items=256, late_ms=0.5, gap_ms=3)
    _, whole = simulate(one_round, holds=16, items=256, late_ms=0.5, gap_ms=3)
    _, later = simulate(LATER_FIRST, holds=16, items=256, late_ms=0.5, gap_ms=3)
    assert rounds == pytest.approx(whole)
    assert rounds < later
