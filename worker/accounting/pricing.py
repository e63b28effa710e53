"""Prices, the exact cost of a call, and budgets (pure: no I/O).

Money is counted in whole **pico-dollars** (10^-12 USD), as integers. A price per million
tokens with at most six decimals (``PRICE_DECIMALS``) is a whole number of micro-dollars per
million tokens, and ``tokens * price / 10^6`` USD is then exactly ``tokens * price_micro``
pico-dollars: sums of costs are sums of integers, never rounded. :func:`usd_text` writes a
pico-dollar amount as an exact decimal string (``"0.000123456"``).

The cost of a call is its final ``usage`` times its model's price::

    input_tokens * input_per_mtok + output_tokens * output_per_mtok
      + cache_read_input_tokens * cache_read_per_mtok
      + cache_creation_input_tokens * cache_write_per_mtok        (all / 10^6, USD)

A cache price that is not set is the input price (cached tokens are input tokens).
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Final

from pydantic import BaseModel, BeforeValidator, ConfigDict, model_validator

#: Prices may have at most this many decimals (USD per million tokens).
PRICE_DECIMALS: Final = 6
#: The largest price accepted, USD per million tokens.
MAX_PRICE: Final = Decimal(1_000_000)
PICO_PER_USD: Final = 10**12
#: Day and month counters are kept this long (a little over a year).
USAGE_RETENTION_S: Final = 400 * 86_400


def _decimal(value: Any) -> Decimal:
    """A price as written: a JSON number (read back through its shortest repr, so ``0.27``
    is exactly 0.27) or a decimal string."""
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        raise ValueError("must be a number of USD per million tokens")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        value = repr(value)
    try:
        price = Decimal(value)
    except InvalidOperation:
        raise ValueError("must be a number of USD per million tokens") from None
    if not price.is_finite() or price < 0 or price > MAX_PRICE:
        raise ValueError(f"must be from 0 to {MAX_PRICE} USD per million tokens")
    exponent = price.normalize().as_tuple().exponent
    if isinstance(exponent, int) and -exponent > PRICE_DECIMALS:
        raise ValueError(f"may have at most {PRICE_DECIMALS} decimals")
    return price


PriceValue = Annotated[Decimal, BeforeValidator(_decimal)]


class Price(BaseModel):
    """One model's prices (a value of ``LLM_WORKER_PRICES``), USD per million tokens."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_per_mtok: PriceValue
    output_per_mtok: PriceValue
    cache_read_per_mtok: PriceValue | None = None
    cache_write_per_mtok: PriceValue | None = None

    def micro(self) -> tuple[int, int, int, int]:
        """Input, output, cache read and cache write prices in micro-dollars per Mtok."""
        cache_read = self.cache_read_per_mtok
        cache_write = self.cache_write_per_mtok
        return (
            _micro(self.input_per_mtok),
            _micro(self.output_per_mtok),
            _micro(self.input_per_mtok if cache_read is None else cache_read),
            _micro(self.input_per_mtok if cache_write is None else cache_write),
        )


def _micro(price: Decimal) -> int:
    return int(price.scaleb(PRICE_DECIMALS))  # exact: at most PRICE_DECIMALS decimals


def token_count(usage: Mapping[str, Any], name: str) -> int:
    """A token count of a ``usage`` object: a non-negative integer, else 0."""
    value = usage.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return 0  # absent, null or nonsense from the upstream: nothing to bill
    return value


def cost_pusd(usage: Mapping[str, Any] | None, price: Price | None) -> int:
    """The exact cost of one call's final ``usage`` in pico-dollars; 0 without a price or
    usage."""
    if price is None or not usage:
        return 0
    input_p, output_p, read_p, write_p = price.micro()
    return (
        token_count(usage, "input_tokens") * input_p
        + token_count(usage, "output_tokens") * output_p
        + token_count(usage, "cache_read_input_tokens") * read_p
        + token_count(usage, "cache_creation_input_tokens") * write_p
    )


def usd_text(pusd: int) -> str:
    """``pusd`` pico-dollars as an exact decimal string of USD (``"0"``, ``"1.5"``)."""
    sign = "-" if pusd < 0 else ""
    whole, frac = divmod(abs(pusd), PICO_PER_USD)
    digits = f"{frac:012d}".rstrip("0")
    return f"{sign}{whole}.{digits}" if digits else f"{sign}{whole}"


def usd_to_pusd(usd: Decimal) -> int:
    """A USD amount (a budget) in pico-dollars, rounded down."""
    return int(usd.scaleb(12))


def utc_day(ts: float) -> str:
    """The UTC day of a time, ``YYYY-MM-DD``: the period of day counters and budgets."""
    return dt.datetime.fromtimestamp(ts, dt.UTC).date().isoformat()  # (strftime is slower)


def utc_month(ts: float) -> str:
    """The UTC month of a time, ``YYYY-MM``."""
    return dt.datetime.fromtimestamp(ts, dt.UTC).date().isoformat()[:7]


def seconds_to_next_day(ts: float) -> float:
    """Seconds from ``ts`` to the next UTC midnight (when a day's budget rolls over)."""
    return 86_400.0 - (ts % 86_400.0)


class Budget(BaseModel):
    """One tenant's budget (a value of ``LLM_WORKER_BUDGETS``), USD per UTC day and/or month."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    usd_per_day: PriceValue | None = None
    usd_per_month: PriceValue | None = None

    @model_validator(mode="after")
    def _one_at_least(self) -> Budget:
        if self.usd_per_day is None and self.usd_per_month is None:
            raise ValueError("set usd_per_day and/or usd_per_month")
        return self

    def limits(self, ts: float) -> list[tuple[str, str, int]]:
        """``(period name, period, limit in pico-dollars)`` of each budget in force at ``ts``."""
        out = []
        if self.usd_per_day is not None:
            out.append(("day", utc_day(ts), usd_to_pusd(self.usd_per_day)))
        if self.usd_per_month is not None:
            out.append(("month", utc_month(ts), usd_to_pusd(self.usd_per_month)))
        return out


def budget_problem(tenant: str, budget: Budget, spent: Mapping[str, int], ts: float) -> str | None:
    """Why ``tenant`` may not spend more now (its spend per period name has reached a
    budget), or None. The message names the budget."""
    for name, period, limit in budget.limits(ts):
        used = spent.get(name, 0)
        if used >= limit:
            return (
                f"tenant {tenant!r} has reached its budget of {usd_text(limit)} USD per "
                f"{name} (spent {usd_text(used)} USD in {period} UTC)"
            )
    return None
