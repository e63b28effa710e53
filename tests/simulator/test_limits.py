"""The simulator's own rate limits: the sliding window, over HTTP and as plain arithmetic."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from worker.simulator import RateLimits, SimulatorConfig, running_simulator
from worker.simulator.limits import SlidingWindowLimiter, retry_after_headers

Body = Callable[..., dict[str, Any]]
HEADERS = {"x-api-key": "k"}


def test_rpm_limit_refuses_the_sixth_request(make_body: Body) -> None:
    """With rpm=5 the 6th request in the window is a 429 with retry-after, counted apart."""
    config = SimulatorConfig(port=0, ttft_s=0, rate_limits=RateLimits(rpm=5))
    with running_simulator(config) as url, httpx.Client(base_url=url, headers=HEADERS) as http:
        statuses = [http.post("/messages", json=make_body()).status_code for _ in range(5)]
        refused = http.post("/messages", json=make_body(stream=True))
        stats = http.get("/stats").json()
    assert statuses == [200] * 5
    assert refused.status_code == 429
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    retry_after_ms = int(refused.headers["retry-after-ms"])
    assert 55_000 <= retry_after_ms <= 60_001
    assert int(refused.headers["retry-after"]) == -(-retry_after_ms // 1000)
    assert stats["rate_limited"] == 1
    assert stats["faults"] == {}
    assert stats["by_status"] == {"200": 5, "429": 1}
    assert sum(stats["accepted_per_s"].values()) == 5
    assert [e["rate_limited"] for e in stats["requests_log"]] == [False] * 5 + [True]


def test_tpm_limit_counts_input_and_output_tokens(make_body: Body) -> None:
    """With tpm set, a request whose tokens would pass the limit in the window is a 429."""
    config = SimulatorConfig(port=0, ttft_s=0, rate_limits=RateLimits(tpm=100))
    with running_simulator(config) as url, httpx.Client(base_url=url, headers=HEADERS) as http:
        first = http.post("/messages", json=make_body("[[sim tokens=40]]"))
        second = http.post("/messages", json=make_body("[[sim tokens=40]]"))
        third = http.post("/messages", json=make_body("[[sim tokens=40]]"))
        small = http.post("/messages", json=make_body("[[sim tokens=1]]"))
        huge = http.post("/messages", json=make_body("[[sim tokens=200]]"))
        stats = http.get("/stats", params={"log": "0"}).json()
    usage = first.json()["usage"]
    cost = usage["input_tokens"] + usage["output_tokens"]
    assert 2 * cost <= 100 < 3 * cost
    assert (first.status_code, second.status_code, third.status_code) == (200, 200, 429)
    assert third.headers["retry-after"].isdigit()
    assert small.status_code == 200  # 2 * 44 + 5 still fits: tokens, not requests, count
    assert huge.status_code == 400  # can never fit: a permanent error, not a 429
    assert "limit" in huge.json()["error"]["message"]
    assert stats["rate_limited"] == 1


def test_no_window_ever_holds_more_than_rpm() -> None:
    """Under bursty random arrivals no window_s span holds more than rpm admissions."""
    limiter = SlidingWindowLimiter(RateLimits(rpm=7, window_s=10))
    rng = random.Random(1)
    now = 0.0
    admitted: list[float] = []
    for _ in range(3000):
        now += rng.expovariate(2.0)
        if limiter.admit(1, now) is None:
            admitted.append(now)
    for index, start in enumerate(admitted):
        in_window = [t for t in admitted[index : index + 9] if t <= start + 10]
        assert len(in_window) <= 7
    assert len(admitted) > 7 * (now / 10) * 0.9  # and it does not starve either


def test_retry_after_is_when_the_slot_frees() -> None:
    """A refused request fits once the advertised wait has passed, and not before."""
    limiter = SlidingWindowLimiter(RateLimits(rpm=2, window_s=60))
    assert limiter.admit(1, 0.0) is None
    assert limiter.admit(1, 10.0) is None
    wait_s = limiter.admit(1, 30.0)
    assert wait_s == pytest.approx(30.0, abs=0.01)
    assert limiter.admit(1, 30.0 + wait_s - 0.01) is not None
    assert limiter.admit(1, 30.0 + wait_s) is None


def test_tpm_wait_frees_enough_tokens() -> None:
    """The tpm retry-after waits until enough of the oldest requests' tokens have left."""
    limiter = SlidingWindowLimiter(RateLimits(tpm=100, window_s=60))
    assert limiter.admit(30, 0.0) is None
    assert limiter.admit(30, 5.0) is None
    assert limiter.admit(30, 10.0) is None
    wait_s = limiter.admit(50, 20.0)  # needs 40 freed: the first two requests
    assert wait_s == pytest.approx(45.0, abs=0.01)
    assert limiter.never_fits(101)
    assert not limiter.never_fits(100)


def test_refused_requests_take_no_slot() -> None:
    """Hammering a full window does not push the moment a slot frees any later."""
    limiter = SlidingWindowLimiter(RateLimits(rpm=1, window_s=1))
    assert limiter.admit(1, 0.0) is None
    for step in range(1, 10):
        assert limiter.admit(1, step / 10) is not None
    assert limiter.admit(1, 1.01) is None


def test_retry_after_headers_round_up() -> None:
    """retry-after is whole seconds rounded up (at least 1); retry-after-ms rounds up too."""
    assert retry_after_headers(0.2) == {"retry-after": "1", "retry-after-ms": "200"}
    assert retry_after_headers(1.0001) == {"retry-after": "2", "retry-after-ms": "1001"}
    assert retry_after_headers(0.0) == {"retry-after": "1", "retry-after-ms": "1"}


def test_rate_limits_validate_arguments() -> None:
    """RateLimits rejects non-positive or non-integer limits with a ValueError."""
    with pytest.raises(ValueError, match="rpm must be a positive integer"):
        RateLimits(rpm=0)
    with pytest.raises(ValueError, match="window_s"):
        RateLimits(rpm=1, window_s=-1)
    assert RateLimits.from_json('{"rpm": 50, "tpm": 40000}') == RateLimits(rpm=50, tpm=40000)
    assert not RateLimits().enabled


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{rpm: 5}", "not valid JSON"),
        ("5", "must be a JSON object"),
        ('{"rps": 5}', "unknown rate limit 'rps'"),
        ('{"rpm": 0}', "rpm must be a positive integer"),
        ('{"tpm": 2.5}', "tpm must be a positive integer"),
        ('{"rpm": "5"}', "rpm must be a positive integer"),
        ('{"window_s": 0}', "window_s must be a finite number > 0"),
    ],
)
def test_rate_limits_from_json_rejects_bad_input(text: str, message: str) -> None:
    """RateLimits.from_json raises a ValueError that says what is wrong."""
    with pytest.raises(ValueError, match=message):
        RateLimits.from_json(text)
