"""Model aliases, prices and thinking budgets: pure functions over plain tables.

Scripts name models by alias (``sonnet``, ``opus``, ``haiku``), by full id, or ``inherit`` (the
run's default model). The default aliases point at the newest model of each family that the
installed ``anthropic`` SDK knows, so upgrading the SDK moves them forward; configuration
(``Settings.models``) overrides any alias.

Prices are USD per million tokens. A price table is keyed by exact model id, by alias, or by id
prefix (``claude-sonnet`` covers every Sonnet); configured prices (``Settings.prices``) win over
the defaults. An unknown model costs 0.0 rather than failing: cost is reporting, not control.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import typing
from pathlib import Path
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from .backends._protocol import Usage

__all__ = [
    "DEFAULT_ALIASES",
    "DEFAULT_PRICES",
    "EFFORT_BUDGETS",
    "INHERIT",
    "Price",
    "PriceLike",
    "choose_model",
    "cost_usd",
    "usage_cost",
    "default_aliases",
    "newest_by_family",
    "price_for",
    "resolve_model",
    "sdk_model_ids",
    "supports_thinking",
    "thinking_budget",
]

INHERIT = "inherit"
FAMILIES = ("sonnet", "opus", "haiku")

# Used only if the SDK's model list cannot be read (it is a typing Literal, an implementation detail).
_FALLBACK_ALIASES = {
    "sonnet": "claude-sonnet-4-5",
    "opus": "claude-opus-4-5",
    "haiku": "claude-haiku-4-5",
}

# "claude-sonnet-4-5", "claude-opus-5", "claude-3-7-sonnet-latest"; a trailing 8-digit date is a
# dated snapshot of the same version, which an alias should not prefer over the undated name.
_NEW_STYLE = re.compile(r"^claude-(?P<family>[a-z]+)-(?P<major>\d+)(?:-(?P<minor>\d{1,2}))?(?P<date>-\d{8})?$")
_OLD_STYLE = re.compile(r"^claude-(?P<major>\d+)(?:-(?P<minor>\d{1,2}))?-(?P<family>[a-z]+)")


def sdk_model_ids() -> tuple[str, ...]:
    """Model ids listed in the installed SDK's ``anthropic.types.Model`` literal (may be empty)."""
    Model = _sdk_model_type()
    ids: list[str] = []
    for arg in typing.get_args(Model):
        ids.extend(value for value in typing.get_args(arg) if isinstance(value, str))
    return tuple(ids)


def _sdk_model_type() -> Any:
    # The literal lives in anthropic/types/model.py, which needs only `typing`. Loading that one
    # file takes milliseconds; importing the `anthropic` package takes over a second.
    spec = importlib.util.find_spec("anthropic")
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(location) / "types" / "model.py"
        if path.is_file():
            module_spec = importlib.util.spec_from_file_location("_quickflow_anthropic_model", path)
            if module_spec is not None and module_spec.loader is not None:
                module = importlib.util.module_from_spec(module_spec)
                try:
                    module_spec.loader.exec_module(module)
                    return module.Model
                except Exception:  # an SDK layout we do not know: fall back to the import
                    break
    try:
        from anthropic.types import Model
    except ImportError:  # pragma: no cover - anthropic is a core dependency
        return None
    return Model


def _parse(model_id: str) -> tuple[str, tuple[int, int], bool] | None:
    """(family, (major, minor), dated) for a Claude model id, None when it is not one."""
    m = _NEW_STYLE.match(model_id) or _OLD_STYLE.match(model_id)
    if m is None:
        return None
    version = (int(m["major"]), int(m["minor"] or 0))
    dated = bool(m.groupdict().get("date"))
    return m["family"], version, dated


def newest_by_family(model_ids: Iterable[str], families: Iterable[str] = FAMILIES) -> dict[str, str]:
    """For each family, the id with the highest version; an undated id beats its dated snapshot."""
    wanted = set(families)
    best: dict[str, tuple[tuple[int, int], bool, str]] = {}
    for model_id in model_ids:
        parsed = _parse(model_id)
        if parsed is None or parsed[0] not in wanted:
            continue
        family, version, dated = parsed
        key = (version, not dated, model_id)
        current = best.get(family)
        if current is None or key[:2] > current[:2]:
            best[family] = key
    return {family: entry[2] for family, entry in best.items()}


@functools.cache
def default_aliases() -> Mapping[str, str]:
    """The built-in aliases. Computed on first use: importing the SDK's types costs over a second,
    which every CLI start would otherwise pay."""
    return {**_FALLBACK_ALIASES, **newest_by_family(sdk_model_ids())}


def __getattr__(name: str) -> object:
    # ``models.DEFAULT_ALIASES`` stays available as a module attribute, computed lazily.
    if name == "DEFAULT_ALIASES":
        return default_aliases()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def resolve_model(alias_or_id: str | None, default: str, *, aliases: Mapping[str, str] | None = None) -> str:
    """The model id to send for ``alias_or_id``.

    ``None``, ``""`` and ``"inherit"`` mean ``default`` (the run's model), which may itself be an
    alias. ``aliases`` (configuration) is consulted before :data:`default_aliases()`; an alias may
    point at another alias. Anything that is not an alias is returned unchanged, as a model id.
    """
    name = alias_or_id.strip() if alias_or_id else ""
    if not name or name == INHERIT:
        name = default.strip()
        if not name or name == INHERIT:
            raise ValueError("the default model cannot be empty or 'inherit'")
    table = {**default_aliases(), **(aliases or {})}
    seen: set[str] = set()
    # Follow alias chains (e.g. configured "fast" -> "haiku"); the seen-set stops cycles.
    while name in table and name not in seen:
        seen.add(name)
        name = table[name]
    return name


def choose_model(
    requested: str | None,
    *,
    profile_model: str | None,
    default: str,
    aliases: Mapping[str, str] | None = None,
) -> str:
    """The model for one agent: the script's ``model`` option, else its profile's, else the run's.

    An explicit ``"inherit"`` skips the profile and takes the run's default.
    """
    if not requested and profile_model:
        requested = profile_model
    return resolve_model(requested, default, aliases=aliases)


class PriceLike(Protocol):
    """Anything with the four per-MTok prices, e.g. ``runtime.config.ModelPrice``."""

    @property
    def input(self) -> float: ...
    @property
    def output(self) -> float: ...
    @property
    def cache_read(self) -> float: ...
    @property
    def cache_write(self) -> float: ...


@dataclass(frozen=True)
class Price:
    """USD per million tokens. ``cache_write`` is the 5-minute cache write price."""

    input: float
    output: float
    cache_read: float = 0.0
    cache_write: float = 0.0


def _p(inp: float, out: float) -> Price:
    # Anthropic's published ratios: cache reads cost 0.1x input, 5-minute cache writes 1.25x.
    return Price(inp, out, round(inp * 0.1, 6), round(inp * 1.25, 6))


# Longest matching key wins, so the specific old generations override their family default.
DEFAULT_PRICES: Mapping[str, Price] = {
    "claude-opus": _p(5.0, 25.0),
    "claude-opus-4-0": _p(15.0, 75.0),
    "claude-opus-4-1": _p(15.0, 75.0),
    "claude-opus-4-2025": _p(15.0, 75.0),
    "claude-3-opus": _p(15.0, 75.0),
    "claude-sonnet": _p(3.0, 15.0),
    "claude-3-7-sonnet": _p(3.0, 15.0),
    "claude-3-5-sonnet": _p(3.0, 15.0),
    "claude-haiku": _p(1.0, 5.0),
    "claude-3-5-haiku": _p(0.8, 4.0),
    "claude-3-haiku": _p(0.25, 1.25),
}


def price_for(
    model: str,
    prices: Mapping[str, PriceLike] | None = None,
    *,
    aliases: Mapping[str, str] | None = None,
) -> PriceLike | None:
    """The price of ``model``: configured table first, then the defaults; None when unknown.

    Within one table: an exact id, then an alias that resolves to this id, then the longest key
    that is a prefix of the id.
    """
    for table in (prices or {}, DEFAULT_PRICES):
        found = _lookup(model, table, aliases)
        if found is not None:
            return found
    return None


def _lookup(model: str, table: Mapping[str, PriceLike], aliases: Mapping[str, str] | None) -> PriceLike | None:
    if model in table:
        return table[model]
    merged = {**default_aliases(), **(aliases or {})}
    for key, price in table.items():
        if key in merged and resolve_model(key, model, aliases=aliases) == model:
            return price
    prefixes = [key for key in table if model.startswith(key)]
    return table[max(prefixes, key=len)] if prefixes else None


def cost_usd(
    model: str,
    usage: Usage,
    *,
    prices: Mapping[str, PriceLike] | None = None,
    aliases: Mapping[str, str] | None = None,
) -> float:
    """USD cost of ``usage`` on ``model``; 0.0 when the model has no known price."""
    return usage_cost(price_for(model, prices, aliases=aliases), usage)


def usage_cost(price: PriceLike | None, usage: Usage) -> float:
    """USD cost of ``usage`` at ``price`` (per million tokens); 0.0 without a price."""
    if price is None:
        return 0.0
    total = (
        usage.input_tokens * price.input
        + usage.output_tokens * price.output
        + usage.cache_read_tokens * price.cache_read
        + usage.cache_write_tokens * price.cache_write
    )
    return total / 1_000_000


# effort -> extended-thinking budget in tokens. The API needs >= 1024 and < max_tokens; the
# backend raises max_tokens by the budget so the visible answer keeps its own room.
EFFORT_BUDGETS: Mapping[str, int] = {
    "low": 1024,
    "medium": 4096,
    "high": 16000,
    "xhigh": 32000,
    "max": 48000,
}


def thinking_budget(effort: str) -> int:
    """The thinking budget for an effort level; ValueError for an unknown level."""
    try:
        return EFFORT_BUDGETS[effort]
    except KeyError:
        levels = ", ".join(EFFORT_BUDGETS)
        raise ValueError(f"unknown effort {effort!r}; expected one of {levels}") from None


def supports_thinking(model: str) -> bool:
    """Whether ``model`` accepts extended thinking: Claude 3.7 Sonnet and every Claude 4+ model."""
    parsed = _parse(model)
    if parsed is None:
        return False
    family, (major, minor), _ = parsed
    if major >= 4:
        return True
    return (major, minor) == (3, 7) and family == "sonnet"
