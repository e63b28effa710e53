"""Directive-driven pacing, pings, the stats endpoint and the server thread's lifecycle."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from worker.simulator import ServerThread, SimulatorConfig, running_simulator

Body = Callable[..., dict[str, Any]]
Sse = Callable[[str], list[tuple[str | None, Any]]]


def delta_times(client: httpx.Client, payload: dict[str, Any]) -> tuple[float, list[float]]:
    """Arrival time of message_start and of each content delta line, in seconds."""
    start = time.monotonic()
    first = 0.0
    deltas: list[float] = []
    with client.stream("POST", "/messages", json=payload) as response:
        for line in response.iter_lines():
            if line == "event: message_start":
                first = time.monotonic() - start
            elif line == "event: content_block_delta":
                deltas.append(time.monotonic() - start)
    return first, deltas


def test_tokens_directive_sets_length(client: httpx.Client, make_body: Body) -> None:
    """[[sim tokens=N]] makes the answer exactly N tokens long."""
    message = client.post("/messages", json=make_body("Go [[sim tokens=7]]")).json()
    assert message["usage"]["output_tokens"] == 7
    assert len(message["content"][0]["text"].split()) == 7


def test_ttft_directive_delays_first_delta(client: httpx.Client, make_body: Body) -> None:
    """[[sim ttft_ms=N]] holds the first content delta (not message_start) for N ms."""
    first, deltas = delta_times(client, make_body("[[sim tokens=3 ttft_ms=150]]", stream=True))
    assert len(deltas) == 3
    assert deltas[0] - first >= 0.14
    started = time.monotonic()
    client.post("/messages", json=make_body("[[sim tokens=3 ttft_ms=150]]"))
    assert time.monotonic() - started >= 0.14


def test_tps_directive_paces_tokens(client: httpx.Client, make_body: Body) -> None:
    """[[sim tps=N]] spaces the deltas 1/N s apart, streamed or not."""
    _, deltas = delta_times(client, make_body("[[sim tokens=6 tps=50 ttft_ms=0]]", stream=True))
    assert len(deltas) == 6
    assert deltas[-1] - deltas[0] >= 5 / 50 - 0.01
    started = time.monotonic()
    client.post("/messages", json=make_body("[[sim tokens=6 tps=50 ttft_ms=0]]"))
    assert time.monotonic() - started >= 5 / 50 - 0.01


def test_ping_every_n_tokens(make_body: Body, sse: Sse) -> None:
    """ping_every=N adds a ping every N deltas besides the one after message_start."""
    config = SimulatorConfig(port=0, ttft_s=0, ping_every=3)
    with running_simulator(config) as url:
        payload = make_body("[[sim tokens=7]]", stream=True)
        text = httpx.post(f"{url}/messages", json=payload, headers={"x-api-key": "k"}).text
    names = [name for name, _ in sse(text)]
    assert names.count("ping") == 1 + 2
    assert names[:2] == ["message_start", "ping"]


def test_stats_count_requests_and_reset(make_body: Body) -> None:
    """/stats counts requests by status and logs each; /stats/reset clears them."""
    with running_simulator(SimulatorConfig(port=0, ttft_s=0, api_key="k")) as url:
        headers = {"x-api-key": "k"}
        with httpx.Client(base_url=url, headers=headers) as http:
            http.post("/messages", json=make_body())
            http.post("/v1/messages", json=make_body(stream=True))
            http.post("/messages", json=make_body(max_tokens=0))
            httpx.post(f"{url}/messages", json=make_body())
            stats = http.get("/stats").json()
            assert stats["requests"] == 4
            assert stats["by_status"] == {"200": 2, "400": 1, "401": 1}
            assert stats["in_flight"] == 0
            assert stats["max_in_flight"] == 1
            log = stats["requests_log"]
            assert [(e["status"], e["stream"], e["path"]) for e in log] == [
                (200, False, "/messages"),
                (200, True, "/v1/messages"),
                (400, False, "/messages"),
                (401, False, "/messages"),
            ]
            assert log[1]["model"] == "sim-1"
            assert log[1]["ts"] <= log[1]["first_byte_ts"] <= log[1]["end_ts"]
            assert stats["first_request_ts"] == log[0]["ts"]
            assert stats["last_request_ts"] == log[-1]["ts"]
            assert http.get("/stats", params={"log": "0"}).json()["requests_log"] == []
            assert http.post("/stats/reset").status_code == 200
            stats = http.get("/stats").json()
            assert (stats["requests"], stats["by_status"], stats["requests_log"]) == (0, {}, [])
            assert http.get("/healthz").status_code == 200


def test_in_flight_tracks_concurrent_streams(make_body: Body) -> None:
    """Concurrent streams are counted in max_in_flight and released when done."""

    async def run(url: str) -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=url, headers={"x-api-key": "k"}) as http:
            payload = make_body("[[sim tokens=3 ttft_ms=200]]", stream=True)
            await asyncio.gather(*(http.post("/messages", json=payload) for _ in range(5)))
            stats: dict[str, Any] = (await http.get("/stats")).json()
            return stats

    with running_simulator() as url:
        stats = asyncio.run(run(url))
    assert stats["max_in_flight"] == 5
    assert stats["in_flight"] == 0
    assert stats["by_status"] == {"200": 5}


def test_client_leaving_mid_stream_ends_the_request(make_body: Body) -> None:
    """A stream whose client disconnects stops and leaves in_flight at zero."""
    with running_simulator() as url, httpx.Client(base_url=url, headers={"x-api-key": "k"}) as http:
        payload = make_body("[[sim tokens=50 tps=20 ttft_ms=0]]", stream=True)
        with http.stream("POST", "/messages", json=payload) as response:
            next(response.iter_raw())
        deadline = time.monotonic() + 5
        while (stats := http.get("/stats").json())["in_flight"] and time.monotonic() < deadline:
            time.sleep(0.02)  # the server notices the disconnect at its next paced frame
        assert stats["in_flight"] == 0
        assert stats["requests_log"][0]["end_ts"] - stats["requests_log"][0]["ts"] < 1.0


def test_server_thread_binds_a_free_port_and_stops() -> None:
    """port=0 binds a free port, the URL names it, and stop() frees the thread."""
    thread = ServerThread(SimulatorConfig(port=0))
    thread.start()
    try:
        assert thread.port > 0
        assert httpx.get(f"{thread.url}/healthz").json() == {"status": "ok"}
    finally:
        thread.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{thread.url}/healthz")
