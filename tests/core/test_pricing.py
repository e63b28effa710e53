"""worker.accounting.pricing: exact costs in pico-dollars, price and budget settings, budget
checks."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.accounting.pricing import (
    Budget,
    Price,
    budget_problem,
    cost_pusd,
    usd_text,
    utc_day,
    utc_month,
)
from worker.errors import SettingsError
from worker.settings import load_settings

PRICE = Price(input_per_mtok=0.27, output_per_mtok="1.10")


def test_cost_is_usage_times_price_exactly() -> None:
    """1,234 input and 567 output tokens at 0.27/1.10 per Mtok cost exactly 0.00095688 USD."""
    cost = cost_pusd({"input_tokens": 1234, "output_tokens": 567}, PRICE)
    expected = (Decimal(1234) * Decimal("0.27") + Decimal(567) * Decimal("1.10")) / 10**6
    assert Decimal(usd_text(cost)) == expected
    assert usd_text(cost) == "0.00095688"


@given(
    st.integers(0, 10**7),
    st.integers(0, 10**7),
    st.decimals(0, 1000, places=6, allow_nan=False, allow_infinity=False),
    st.decimals(0, 1000, places=6, allow_nan=False, allow_infinity=False),
)
def test_cost_matches_decimal_arithmetic(
    inp: int, out: int, in_price: Decimal, out_price: Decimal
) -> None:
    """For any usage and prices of at most six decimals the integer cost is the exact product."""
    price = Price(input_per_mtok=str(in_price), output_per_mtok=str(out_price))
    cost = cost_pusd({"input_tokens": inp, "output_tokens": out}, price)
    assert Decimal(usd_text(cost)) == (inp * in_price + out * out_price) / 10**6


def test_cache_tokens_use_their_prices_or_the_input_price() -> None:
    """Cache reads and writes are billed at their own prices, else at the input price."""
    usage = {
        "input_tokens": 0,
        "output_tokens": 0,
        "cache_read_input_tokens": 10**6,
        "cache_creation_input_tokens": 10**6,
    }
    assert usd_text(cost_pusd(usage, PRICE)) == "0.54"
    priced = Price(
        input_per_mtok=3,
        output_per_mtok=15,
        cache_read_per_mtok="0.3",
        cache_write_per_mtok="3.75",
    )
    assert usd_text(cost_pusd(usage, priced)) == "4.05"


def test_no_price_or_no_usage_costs_nothing() -> None:
    """A model without a price, or a call without usage, costs 0; nonsense counts are ignored."""
    assert cost_pusd({"input_tokens": 5}, None) == 0
    assert cost_pusd(None, PRICE) == 0
    assert cost_pusd({"input_tokens": -3, "output_tokens": True}, PRICE) == 0


def test_usd_text_is_exact() -> None:
    """Pico-dollars print as plain decimals, no exponent, no trailing zeros."""
    assert usd_text(0) == "0"
    assert usd_text(1) == "0.000000000001"
    assert usd_text(1_500_000_000_000) == "1.5"
    assert usd_text(12 * 10**12) == "12"


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ('{"m": {"input_per_mtok": 0.1234567, "output_per_mtok": 1}}', "6 decimals"),
        ('{"m": {"input_per_mtok": -1, "output_per_mtok": 1}}', "from 0"),
        ('{"m": {"input_per_mtok": 1}}', "output_per_mtok"),
        ('{"m": {"input_per_mtok": 1, "output_per_mtok": 1, "bogus": 1}}', "bogus"),
        ('{"m": {"input_per_mtok": "x", "output_per_mtok": 1}}', "USD per million"),
        ("[1]", "LLM_WORKER_PRICES"),
    ],
)
def test_bad_prices_are_refused_by_name(value: str, problem: str) -> None:
    """A malformed LLM_WORKER_PRICES stops the settings with a message naming it."""
    with pytest.raises(SettingsError) as caught:
        load_settings(prices=value)
    assert "LLM_WORKER_PRICES" in str(caught.value)
    assert problem in str(caught.value)


@pytest.mark.parametrize(
    "value",
    [
        '{"t": {}}',
        '{"t/x": {"usd_per_day": 1}}',
        '{"t": {"usd_per_week": 1}}',
        '{"t": {"usd_per_day": -1}}',
    ],
)
def test_bad_budgets_are_refused_by_name(value: str) -> None:
    """A budget without a period, a bad tenant name, an unknown period or a negative sum fails."""
    with pytest.raises(SettingsError) as caught:
        load_settings(budgets=value)
    assert "LLM_WORKER_BUDGETS" in str(caught.value)


def test_bad_fallbacks_are_refused_by_name() -> None:
    """More than eight fallbacks, or a malformed model name, stops the settings."""
    many = '{"a": [' + ",".join(f'"m{i}"' for i in range(9)) + "]}"
    for value in (many, '{"a": ["bad name"]}', '{"a": "b"}'):
        with pytest.raises(SettingsError) as caught:
            load_settings(fallbacks=value)
        assert "LLM_WORKER_FALLBACKS" in str(caught.value)


def test_budget_problem_names_the_budget_reached() -> None:
    """At or over a day or month budget the problem names the tenant, the budget and the spend."""
    ts = 1_764_250_000.0  # 2025-11-27 UTC
    budget = Budget(usd_per_day="0.5", usd_per_month=10)
    assert budget_problem("acme", budget, {"day": 10**11, "month": 10**11}, ts) is None
    problem = budget_problem("acme", budget, {"day": 5 * 10**11}, ts)
    assert problem is not None
    assert "'acme'" in problem
    assert "0.5 USD per day" in problem
    assert "2025-11-27" in problem
    month = budget_problem("acme", budget, {"day": 0, "month": 10**13}, ts)
    assert month is not None
    assert "10 USD per month" in month
    assert "2025-11" in month


def test_periods_are_utc() -> None:
    """Day and month periods are UTC calendar dates."""
    assert utc_day(0) == "1970-01-01"
    assert utc_month(86_400 * 31) == "1970-02"


def test_an_alias_as_a_price_or_fallback_key_is_refused() -> None:
    """Jobs carry the model's name, so a price or fallback list keyed by an alias would never
    apply: the settings refuse it, naming the variable."""
    models = '{"a/b": {"max_tokens": 10, "aliases": ["ab"]}}'
    price = '{"ab": {"input_per_mtok": 1, "output_per_mtok": 1}}'
    for overrides in ({"prices": price}, {"fallbacks": '{"ab": ["c"]}'}):
        with pytest.raises(SettingsError) as caught:
            load_settings(models=models, **overrides)
        name = "PRICES" if "prices" in overrides else "FALLBACKS"
        assert f"LLM_WORKER_{name}:" in str(caught.value)
        assert "alias of 'a/b'" in str(caught.value)
