"""Injected faults: what a client sees for each kind, directives, the seeded mix, stats."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest

from worker.simulator import FaultMix, SimulatorConfig, running_simulator
from worker.simulator.faults import FaultDecider, choose_kind, rewrite_plan, split_plan
from worker.simulator.textgen import Directives, Generation, TextBlock, generate
from worker.simulator.wire import stream_frames

Body = Callable[..., dict[str, Any]]
Sse = Callable[[str], list[tuple[str | None, Any]]]
STALL_S = 0.4
SLOW_GAP_S = 0.03
MIX = FaultMix(retry_after_s=2, stall_s=STALL_S, slow_gap_s=SLOW_GAP_S)


@pytest.fixture(scope="module")
def fault_url() -> Iterator[str]:
    with running_simulator(SimulatorConfig(port=0, ttft_s=0, faults=MIX)) as url:
        yield url


@pytest.fixture
def http(fault_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fault_url, headers={"x-api-key": "k"}, timeout=5) as client:
        yield client


def lines_until_error(
    http: httpx.Client, payload: dict[str, Any], error: type[Exception]
) -> list[str]:
    """The SSE lines received before the stream fails with ``error``."""
    lines: list[str] = []
    statuses: list[int] = []

    def read() -> None:
        with http.stream("POST", "/messages", json=payload) as response:
            statuses.append(response.status_code)
            lines.extend(response.iter_lines())

    with pytest.raises(error):
        read()
    assert statuses == [200]
    return lines


@pytest.mark.parametrize(
    ("kind", "error_type"),
    [
        ("429", "rate_limit_error"),
        ("500", "api_error"),
        ("502", "api_error"),
        ("503", "api_error"),
        ("529", "overloaded_error"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_status_fault_answers_error(
    http: httpx.Client, make_body: Body, kind: str, error_type: str, stream: bool
) -> None:
    """fault=<status> answers that status with the upstream's error body, streamed or not."""
    response = http.post("/messages", json=make_body(f"Hi [[sim fault={kind}]]", stream=stream))
    assert response.status_code == int(kind)
    assert response.json()["error"]["type"] == error_type
    if kind == "429":
        assert response.headers["retry-after"] == "2"
        assert response.headers["retry-after-ms"] == "2000"
    else:
        assert "retry-after" not in response.headers


@pytest.mark.parametrize("stream", [False, True])
def test_reset_drops_connection_without_response(
    http: httpx.Client, make_body: Body, stream: bool
) -> None:
    """fault=reset resets the connection before any status line: httpx raises ReadError."""
    with pytest.raises(httpx.ReadError):
        http.post("/messages", json=make_body("Hi [[sim fault=reset]]", stream=stream))
    assert http.get("/healthz").status_code == 200  # the server itself carries on


def test_cut_ends_stream_early(http: httpx.Client, make_body: Body) -> None:
    """fault=cut closes the stream after about half the deltas: RemoteProtocolError."""
    payload = make_body("Hi [[sim fault=cut tokens=10]]", stream=True)
    lines = lines_until_error(http, payload, httpx.RemoteProtocolError)
    assert lines.count("event: content_block_delta") == 5
    assert "event: message_stop" not in lines


def test_cut_non_streamed_sends_half_a_body(http: httpx.Client, make_body: Body) -> None:
    """A non-streamed cut announces the full length, sends half and closes."""
    with pytest.raises(httpx.RemoteProtocolError, match="expected"):
        http.post("/messages", json=make_body("Hi [[sim fault=cut]]"))


def test_error_event_mid_stream(http: httpx.Client, make_body: Body, sse: Sse) -> None:
    """fault=error_event sends an overloaded_error event after half the deltas, then ends."""
    payload = make_body("Hi [[sim fault=error_event tokens=6]]", stream=True)
    response = http.post("/messages", json=payload)
    events = sse(response.text)
    assert response.status_code == 200
    assert [name for name, _ in events].count("content_block_delta") == 3
    assert events[-1] == (
        "error",
        {
            "type": "error",
            "error": {"type": "overloaded_error", "message": "Overloaded (injected mid-stream)"},
        },
    )
    plain = http.post("/messages", json=make_body("Hi [[sim fault=error_event]]"))
    assert plain.status_code == 529
    assert plain.json()["error"]["type"] == "overloaded_error"


def test_malformed_sends_broken_json(http: httpx.Client, make_body: Body) -> None:
    """fault=malformed sends one data line of broken JSON mid-stream (or a truncated body)."""
    payload = make_body("Hi [[sim fault=malformed tokens=4]]", stream=True)
    response = http.post("/messages", json=payload)
    data = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert data[-1].startswith('{"type":"content_block_delta"')
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(data[-1])
    assert [orjson.loads(line) for line in data[:-1]][-1]["type"] == "content_block_delta"
    plain = http.post("/messages", json=make_body("Hi [[sim fault=malformed]]"))
    assert plain.status_code == 200
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(plain.content)


def test_stall_outlasts_a_short_read_timeout(fault_url: str, make_body: Body) -> None:
    """fault=stall goes silent mid-stream: a shorter read timeout fires, a longer one completes."""
    payload = make_body("Hi [[sim fault=stall tokens=6]]", stream=True)
    headers = {"x-api-key": "k"}
    short = httpx.Timeout(5, read=STALL_S / 4)
    with httpx.Client(base_url=fault_url, headers=headers, timeout=short) as http:
        lines = lines_until_error(http, payload, httpx.ReadTimeout)
    assert lines.count("event: content_block_delta") == 3
    started = time.monotonic()
    with httpx.Client(base_url=fault_url, headers=headers, timeout=5) as http:
        text = http.post("/messages", json=payload).text
    assert time.monotonic() - started >= STALL_S - 0.05
    assert "event: message_stop" in text


def test_slow_drip_completes(fault_url: str, make_body: Body, sse: Sse) -> None:
    """fault=slow spaces deltas slow_gap_s apart, each gap under the timeout, and completes."""
    headers = {"x-api-key": "k"}
    payload = make_body("Hi [[sim fault=slow tokens=5]]", stream=True)
    gaps = httpx.Timeout(5, read=SLOW_GAP_S * 10)
    started = time.monotonic()
    with httpx.Client(base_url=fault_url, headers=headers, timeout=gaps) as http:
        events = sse(http.post("/messages", json=payload).text)
    assert time.monotonic() - started >= 4 * SLOW_GAP_S - 0.01
    assert [name for name, _ in events][-2:] == ["message_stop", None]


def test_fault_times_fails_then_succeeds(http: httpx.Client, make_body: Body) -> None:
    """fault_times=2 fails the first two requests with that prompt; the third succeeds."""
    payload = make_body("Retry me [[sim fault=503 fault_times=2]]")
    statuses = [http.post("/messages", json=payload).status_code for _ in range(4)]
    assert statuses == [503, 503, 200, 200]
    other = make_body("Another prompt [[sim fault=503 fault_times=2]]")
    assert http.post("/messages", json=other).status_code == 503


def test_fault_without_times_applies_every_time(http: httpx.Client, make_body: Body) -> None:
    """Without fault_times the forced fault hits every request."""
    payload = make_body("Always [[sim fault=500]]")
    assert [http.post("/messages", json=payload).status_code for _ in range(3)] == [500] * 3


@pytest.mark.parametrize(
    "directive",
    ["fault=nope", "fault=503 fault_times=0", "fault_times=2", "fault=500 fault_times=x"],
)
def test_bad_fault_directive_is_400(http: httpx.Client, make_body: Body, directive: str) -> None:
    """A malformed fault directive is a 400 invalid_request_error naming it."""
    response = http.post("/messages", json=make_body(f"Hi [[sim {directive}]]"))
    assert response.status_code == 400
    assert "fault" in response.json()["error"]["message"]


def test_mix_is_seeded_and_matches_rates() -> None:
    """The drawn faults repeat for a seed and follow the rates over 1000 requests."""
    mix = FaultMix(rates={"429": 0.2, "reset": 0.1, "cut": 0.05})

    def draws(seed: int) -> list[str | None]:
        decider = FaultDecider(mix, seed)
        faults = (decider.decide({}, lambda: 0) for _ in range(1000))
        return [None if f is None else f.kind for f in faults]

    first = draws(7)
    assert first == draws(7)
    assert first != draws(8)
    counts = Counter(first)
    assert 160 <= counts["429"] <= 240
    assert 70 <= counts["reset"] <= 130
    assert 30 <= counts["cut"] <= 75
    assert 570 <= counts[None] <= 730


def test_choose_kind_lays_rates_end_to_end() -> None:
    """choose_kind maps a draw in [0, 1) to the kind whose slice holds it, else None."""
    rates = (("429", 0.25), ("500", 0.25))
    assert [choose_kind(rates, d) for d in (0.0, 0.24, 0.25, 0.49, 0.5, 0.99)] == [
        "429",
        "429",
        "500",
        "500",
        None,
        None,
    ]


def test_mix_over_http_follows_the_seed(make_body: Body) -> None:
    """Over HTTP the mix injects exactly what a decider with the same seed predicts."""
    mix = FaultMix(rates={"503": 0.5})
    decider = FaultDecider(mix, 3)
    expected = [503 if decider.decide({}, lambda: 0) else 200 for _ in range(20)]
    config = SimulatorConfig(port=0, ttft_s=0, seed=3, faults=mix)
    with running_simulator(config) as url, httpx.Client(base_url=url) as http:
        headers = {"x-api-key": "k"}
        got = [
            http.post("/messages", json=make_body(), headers=headers).status_code for _ in range(20)
        ]
    assert got == expected
    assert 0 < expected.count(503) < 20


def test_stats_count_every_fault(make_body: Body) -> None:
    """/stats counts injected faults by kind and marks each logged request with its fault."""
    kinds = ["429", "500", "reset", "cut", "error_event", "malformed", "slow"]
    config = SimulatorConfig(port=0, ttft_s=0, faults=MIX)
    with running_simulator(config) as url, httpx.Client(base_url=url, timeout=5) as http:
        headers = {"x-api-key": "k"}
        for kind in kinds:
            try:
                payload = make_body(f"[[sim fault={kind} tokens=2]]", stream=True)
                http.post("/messages", json=payload, headers=headers)
            except httpx.TransportError:
                pass  # reset and cut are meant to fail
        http.post("/messages", json=make_body(), headers=headers)
        stats = http.get("/stats").json()
    assert stats["faults"] == dict.fromkeys(sorted(kinds), 1)
    assert stats["rate_limited"] == 0
    assert [e["fault"] for e in stats["requests_log"]] == [*kinds, None]
    assert stats["by_status"] == {"0": 1, "200": 5, "429": 1, "500": 1}
    assert stats["in_flight"] == 0


def test_split_plan_cuts_inside_a_merged_frame() -> None:
    """An unpaced answer is one frame after the preamble; the split still falls at a delta."""
    message = {"role": "user", "content": "[[sim tokens=8]]"}
    generation = generate(0, {"model": "m", "max_tokens": 50, "messages": [message]})
    frames = stream_frames(generation, "msg_1", "m", ttft_s=0.1, tokens_per_s=0)
    before, after = split_plan(frames, 4)
    joined = b"".join(f.data for f in before)
    assert joined.count(b"event: content_block_delta") == 4
    assert b"".join(f.data for f in before + after) == b"".join(f.data for f in frames)
    stalled, close = rewrite_plan(frames, "stall", 8, 2.0)
    assert not close
    assert stalled[-1].at_s == pytest.approx(2.1)


def test_split_plan_without_deltas_splits_before_the_end() -> None:
    """A zero-token answer is cut before message_delta."""
    generation = Generation((TextBlock(()),), "end_turn", None, 1, 0, Directives())
    frames = stream_frames(generation, "msg_1", "m", ttft_s=0, tokens_per_s=0)
    cut, close = rewrite_plan(frames, "cut", 0, 1.0)
    assert close
    assert b"message_delta" not in b"".join(f.data for f in cut)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", "not valid JSON"),
        ("[0.1]", "must be a JSON object"),
        ('{"418": 0.1}', "unknown fault kind '418'"),
        ('{"429": 1.5}', "within 0..1"),
        ('{"429": -0.1}', "within 0..1"),
        ('{"429": "0.1"}', "must be a number"),
        ('{"429": true}', "must be a number"),
        ('{"429": 0.6, "500": 0.6}', "sum to at most 1"),
        ('{"stall_s": -1}', "stall_s"),
    ],
)
def test_fault_mix_from_json_rejects_bad_input(text: str, message: str) -> None:
    """FaultMix.from_json raises a ValueError that says what is wrong."""
    with pytest.raises(ValueError, match=message):
        FaultMix.from_json(text)


def test_fault_mix_from_json_parses_rates_and_timing() -> None:
    """from_json reads rates, optional timing keys, and keyword overrides."""
    mix = FaultMix.from_json('{"500": 0.05, "429": 0.1, "stall_s": 3}', retry_after_s=2)
    assert mix.rates == (("429", 0.1), ("500", 0.05))
    assert (mix.retry_after_s, mix.stall_s, mix.slow_gap_s) == (2, 3, 0.5)
    assert FaultMix.from_json("{}") == FaultMix()
    assert FaultMix(rates={"500": 0.05, "429": 0.1}) == FaultMix(rates={"429": 0.1, "500": 0.05})
