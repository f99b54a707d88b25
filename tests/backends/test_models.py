"""Model aliases, prices and thinking budgets (runtime/models.py): plain sync tests."""

from __future__ import annotations

import pytest

from runtime import models
from runtime.backends._protocol import Usage
from runtime.config import ModelPrice


def test_default_aliases_are_the_sdks_newest_models() -> None:
    known = set(models.sdk_model_ids())
    assert known, "the SDK's Model literal could not be read"
    for family in ("sonnet", "opus", "haiku"):
        assert models.default_aliases()[family] in known
        assert family in models.default_aliases()[family]


def test_newest_by_family_prefers_higher_versions_and_undated_ids() -> None:
    ids = [
        "claude-sonnet-4-5-20250929",
        "claude-sonnet-4-5",
        "claude-sonnet-4",
        "claude-3-7-sonnet-latest",
        "claude-opus-4-1-20250805",
        "claude-opus-5",
        "claude-opus-4-8",
        "claude-haiku-4-5-20251001",
        "claude-mythos-preview",
    ]
    assert models.newest_by_family(ids) == {
        "sonnet": "claude-sonnet-4-5",
        "opus": "claude-opus-5",
        "haiku": "claude-haiku-4-5-20251001",
    }


@pytest.mark.parametrize(
    ("name", "default", "aliases", "expected"),
    [
        ("sonnet", "opus", None, models.default_aliases()["sonnet"]),
        ("inherit", "opus", None, models.default_aliases()["opus"]),
        (None, "haiku", None, models.default_aliases()["haiku"]),
        ("", "claude-x-1", None, "claude-x-1"),
        ("claude-opus-4-1", "sonnet", None, "claude-opus-4-1"),
        ("sonnet", "sonnet", {"sonnet": "claude-sonnet-4-5"}, "claude-sonnet-4-5"),
        ("fast", "sonnet", {"fast": "haiku"}, models.default_aliases()["haiku"]),
        ("loop", "sonnet", {"loop": "pool", "pool": "loop"}, "loop"),
    ],
)
def test_resolve_model(name: str | None, default: str, aliases: dict[str, str] | None, expected: str) -> None:
    assert models.resolve_model(name, default, aliases=aliases) == expected


def test_resolve_model_rejects_an_inherit_default() -> None:
    with pytest.raises(ValueError):
        models.resolve_model("inherit", "inherit")


@pytest.mark.parametrize(
    ("model", "input_price", "output_price"),
    [
        ("claude-sonnet-4-5-20250929", 3.0, 15.0),
        ("claude-opus-4-5", 5.0, 25.0),
        ("claude-opus-4-1-20250805", 15.0, 75.0),
        ("claude-haiku-4-5", 1.0, 5.0),
        ("claude-3-5-haiku-latest", 0.8, 4.0),
        (models.default_aliases()["sonnet"], 3.0, 15.0),
    ],
)
def test_default_prices(model: str, input_price: float, output_price: float) -> None:
    price = models.price_for(model)
    assert price is not None
    assert (price.input, price.output) == (input_price, output_price)
    assert price.cache_read == pytest.approx(input_price * 0.1)
    assert price.cache_write == pytest.approx(input_price * 1.25)


def test_cost_counts_every_token_kind() -> None:
    usage = Usage(
        input_tokens=1_000_000, output_tokens=2_000_000, cache_read_tokens=1_000_000, cache_write_tokens=1_000_000
    )
    assert models.cost_usd("claude-haiku-4-5", usage) == pytest.approx(1.0 + 10.0 + 0.1 + 1.25)


def test_configured_prices_win_by_id_alias_or_prefix() -> None:
    usage = Usage(input_tokens=1_000_000)
    by_id = {"claude-sonnet-4-5": ModelPrice(input=9.0, output=0.0)}
    assert models.cost_usd("claude-sonnet-4-5", usage, prices=by_id) == pytest.approx(9.0)
    by_alias = {"haiku": ModelPrice(input=7.0, output=0.0)}
    assert models.cost_usd(models.default_aliases()["haiku"], usage, prices=by_alias) == pytest.approx(7.0)
    by_prefix = {"claude-opus": ModelPrice(input=2.0, output=0.0), "claude-opus-4": ModelPrice(input=4.0, output=0.0)}
    assert models.cost_usd("claude-opus-4-1", usage, prices=by_prefix) == pytest.approx(4.0)
    custom = {"my-model": ModelPrice(input=1.5, output=0.0)}
    assert models.cost_usd("my-model", usage, prices=custom) == pytest.approx(1.5)


def test_unknown_model_costs_nothing() -> None:
    assert models.price_for("gpt-nope") is None
    assert models.cost_usd("gpt-nope", Usage(input_tokens=10**9)) == 0.0


def test_thinking_budgets_and_support() -> None:
    budgets = [models.thinking_budget(level) for level in ("low", "medium", "high", "xhigh", "max")]
    assert budgets == sorted(budgets) and budgets[0] >= 1024
    with pytest.raises(ValueError, match="unknown effort"):
        models.thinking_budget("extreme")
    assert models.supports_thinking("claude-sonnet-4-5")
    assert models.supports_thinking("claude-opus-4-1-20250805")
    assert models.supports_thinking("claude-3-7-sonnet-latest")
    assert not models.supports_thinking("claude-3-5-haiku-latest")
    assert not models.supports_thinking("some-other-model")


def test_choose_model_prefers_script_then_profile_then_run_default() -> None:
    aliases = models.default_aliases()
    assert models.choose_model("opus", profile_model="haiku", default="sonnet") == aliases["opus"]
    assert models.choose_model(None, profile_model="haiku", default="sonnet") == aliases["haiku"]
    assert models.choose_model(None, profile_model=None, default="sonnet") == aliases["sonnet"]
    # An explicit "inherit" means the run's model, even when the profile names one.
    assert models.choose_model("inherit", profile_model="haiku", default="sonnet") == aliases["sonnet"]
