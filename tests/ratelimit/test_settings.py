"""RATE_LIMITS and the RATE_LIMIT_* settings: the format, and clear errors for bad values."""

from __future__ import annotations

import pytest

from worker.errors import SettingsError
from worker.settings import RateLimit, load_settings, settings_from_env


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("{not json", "not valid JSON"),
        ('[{"rpm": 5}]', "valid dictionary"),
        ('{"m": 5}', "(at m)"),
        ('{"m": {"rpm": 0}}', "(at m.rpm)"),
        ('{"m": {"rpm": 1.5}}', "(at m.rpm)"),
        ('{"m": {"rpm": "ten"}}', "(at m.rpm)"),
        ('{"m": {"requests_per_minute": 5}}', "(at m.requests_per_minute)"),
        ('{"": {"rpm": 5}}', "limit key"),
    ],
)
def test_bad_rate_limits_name_the_variable_and_the_problem(
    monkeypatch: pytest.MonkeyPatch, value: str, says: str
) -> None:
    """Each malformed RATE_LIMITS fails at start, naming the variable and where it is wrong."""
    monkeypatch.setenv("LLM_WORKER_RATE_LIMITS", value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    ((name, message),) = info.value.problems
    assert name == "LLM_WORKER_RATE_LIMITS"
    assert says in message


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("LLM_WORKER_RATE_LIMIT_MAX_WAIT_S", "-1"),
        ("LLM_WORKER_RATE_LIMIT_PERIOD_S", "0"),
        ("LLM_WORKER_RATE_LIMIT_LEASE_TTL_S", "soon"),
    ],
)
def test_bad_rate_limit_durations_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    """A negative wait, a zero period or a non-number lease TTL is refused by name."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert [name for name, _ in info.value.problems] == [variable]


def test_rate_limit_defaults() -> None:
    """No limits; a minute's period; a 60 s wait before requeueing; 60 s leases."""
    s = load_settings()
    assert s.rate_limits == {}
    assert (s.rate_limit_max_wait_s, s.rate_limit_period_s, s.rate_limit_lease_ttl_s) == (
        60.0,
        60.0,
        60.0,
    )


def test_rate_limits_json_reads_the_same_from_env_and_from_a_child_env() -> None:
    """settings_from_env (dev, demo, tests) decodes RATE_LIMITS as the environment does."""
    s = settings_from_env(
        {"LLM_WORKER_RATE_LIMITS": '{"default": {}, "m": {"rpm": 10, "max_in_flight": 2}}'}
    )
    assert s.rate_limit_for("m") == RateLimit(rpm=10, max_in_flight=2)
    assert s.rate_limit_for("other") == RateLimit()
