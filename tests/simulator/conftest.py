"""Fixtures for the simulator's tests: one real server per module, an authed client."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest

from worker.simulator import SimulatorConfig, running_simulator

API_KEY = "test-key"
SseEvents = list[tuple[str | None, Any]]


def parse_sse(body: str) -> SseEvents:
    """Split an SSE body into (event name, decoded data) pairs; ``[DONE]`` stays a string."""
    events: SseEvents = []
    for chunk in body.split("\n\n"):
        if not chunk.strip():
            continue
        name: str | None = None
        data = ""
        for line in chunk.split("\n"):
            field, _, value = line.partition(": ")
            if field == "event":
                name = value
            elif field == "data":
                data = value
        events.append((name, data if data == "[DONE]" else orjson.loads(data)))
    return events


@pytest.fixture(scope="module")
def sim_url() -> Iterator[str]:
    with running_simulator(SimulatorConfig(port=0, ttft_s=0.0, api_key=API_KEY)) as url:
        yield url


@pytest.fixture
def client(sim_url: str) -> Iterator[httpx.Client]:
    headers = {"authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=sim_url, headers=headers, timeout=10) as http:
        yield http


@pytest.fixture
def api_key() -> str:
    return API_KEY


@pytest.fixture
def sse() -> Callable[[str], SseEvents]:
    return parse_sse


def make_body(text: str = "Hello there", **extra: Any) -> dict[str, Any]:
    """A minimal valid request body; keyword arguments add or replace fields."""
    minimal = {
        "model": "sim-1",
        "max_tokens": 1000,
        "messages": [{"role": "user", "content": text}],
    }
    return minimal | extra


@pytest.fixture(name="make_body")
def make_body_fixture() -> Callable[..., dict[str, Any]]:
    return make_body
