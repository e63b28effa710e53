"""The simulator over real HTTP: auth, validation errors, JSON and SSE shapes, stop rules."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest

from worker.simulator import SimulatorConfig, running_simulator

Body = Callable[..., dict[str, Any]]
Sse = Callable[[str], list[tuple[str | None, Any]]]
TOOL = {
    "name": "lookup",
    "input_schema": {
        "type": "object",
        "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}},
        "required": ["query", "limit"],
    },
}


def text_of(message: dict[str, Any]) -> str:
    return "".join(b["text"] for b in message["content"] if b["type"] == "text")


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"authorization": "Bearer wrong"},
        {"x-api-key": "wrong"},
        {"authorization": "Basic dGVzdC1rZXk="},
    ],
)
def test_missing_or_wrong_key_is_401(
    sim_url: str, make_body: Body, headers: dict[str, str]
) -> None:
    """Without the configured key the answer is 401 authentication_error."""
    response = httpx.post(f"{sim_url}/messages", json=make_body(), headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"
    assert response.json()["type"] == "error"
    assert response.headers["request-id"].startswith("req_")


def test_x_api_key_header_is_accepted(sim_url: str, make_body: Body, api_key: str) -> None:
    """The SDK's x-api-key header authenticates like a Bearer token."""
    response = httpx.post(f"{sim_url}/messages", json=make_body(), headers={"x-api-key": api_key})
    assert response.status_code == 200


def test_any_token_accepted_without_configured_key(make_body: Body) -> None:
    """api_key=None accepts any non-empty token, and still rejects none at all."""
    with running_simulator(SimulatorConfig(port=0, ttft_s=0)) as url:
        assert httpx.post(
            f"{url}/messages", json=make_body(), headers={"x-api-key": "x"}
        ).is_success
        assert httpx.post(f"{url}/messages", json=make_body()).status_code == 401


BAD_REQUESTS: list[tuple[str, dict[str, Any]]] = [
    ("model", {"model": None}),
    ("max_tokens", {"max_tokens": None}),
    ("max_tokens", {"max_tokens": 0}),
    ("max_tokens", {"max_tokens": "9"}),
    ("messages", {"messages": []}),
    ("messages", {"messages": [{"role": "user", "content": "x"}] * 11}),
    ("messages", {"messages": None}),
    ("role", {"messages": [{"role": "robot", "content": "x"}]}),
    ("content", {"messages": [{"role": "user", "content": ""}]}),
    ("content", {"messages": [{"role": "user", "content": []}]}),
    ("content", {"messages": [{"role": "user"}]}),
    ("temperature", {"temperature": 2.5}),
    ("top_p", {"top_p": 0.05}),
    ("top_k", {"top_k": 51}),
    ("frequency_penalty", {"frequency_penalty": 1}),
    ("stream", {"stream": "yes"}),
    ("stop_sequences", {"stop_sequences": [1]}),
    ("tools", {"tools": [{"name": "t"}]}),
    ("tool_choice", {"tool_choice": {"type": "maybe"}}),
    ("tool_choice", {"tools": [TOOL], "tool_choice": {"type": "tool", "name": "other"}}),
    ("sim directive", {"messages": [{"role": "user", "content": "[[sim tokens=many]]"}]}),
]


@pytest.mark.parametrize(("field", "change"), BAD_REQUESTS)
def test_invalid_request_is_400(
    client: httpx.Client, make_body: Body, field: str, change: dict[str, Any]
) -> None:
    """Each kind of invalid request is a 400 invalid_request_error naming the field."""
    payload = {k: v for k, v in (make_body() | change).items() if v is not None}
    response = client.post("/messages", json=payload)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert field in error["message"]


def test_invalid_json_is_400(client: httpx.Client) -> None:
    """A body that is not JSON is a 400 invalid_request_error."""
    response = client.post("/messages", content=b"{not json")
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_unknown_path_is_json_404(client: httpx.Client) -> None:
    """Unknown paths answer in the upstream's error shape too."""
    response = client.get("/nowhere")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"


def test_non_streamed_message_shape(client: httpx.Client, make_body: Body) -> None:
    """A non-streamed answer is a complete message object with usage."""
    response = client.post("/messages", json=make_body())
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.headers["request-id"].startswith("req_")
    message = response.json()
    assert set(message) == {
        "id", "type", "role", "model", "content", "stop_reason", "stop_sequence", "usage",
    }  # fmt: skip
    assert message["id"].startswith("msg_")
    assert (message["type"], message["role"], message["model"]) == ("message", "assistant", "sim-1")
    assert message["content"][0]["type"] == "text"
    assert (message["stop_reason"], message["stop_sequence"]) == ("end_turn", None)
    assert message["usage"]["input_tokens"] >= 1
    assert 20 <= message["usage"]["output_tokens"] <= 60


def test_stream_event_order(client: httpx.Client, make_body: Body, sse: Sse) -> None:
    """A text stream has exactly the upstream's event order and ends with [DONE]."""
    response = client.post("/messages", json=make_body("[[sim tokens=4]]", stream=True))
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse(response.text)
    names = [name for name, _ in events]
    assert names == [
        "message_start", "ping", "content_block_start",
        *["content_block_delta"] * 4,
        "content_block_stop", "message_delta", "message_stop", None,
    ]  # fmt: skip
    assert events[-1][1] == "[DONE]"
    assert events[0][1]["message"]["usage"]["output_tokens"] <= 1
    assert events[-3][1]["usage"]["output_tokens"] == 4
    assert events[-3][1]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}


def test_stream_and_json_carry_the_same_answer(
    client: httpx.Client, make_body: Body, sse: Sse
) -> None:
    """Streamed deltas concatenate to the text of the same non-streamed request."""
    plain = client.post("/messages", json=make_body()).json()
    events = sse(client.post("/messages", json=make_body(stream=True)).text)
    deltas = [d["delta"]["text"] for n, d in events if n == "content_block_delta"]
    assert "".join(deltas) == text_of(plain)
    assert events[-3][1]["usage"]["output_tokens"] == plain["usage"]["output_tokens"]


def test_output_is_deterministic_per_seed(client: httpx.Client, make_body: Body) -> None:
    """The same request twice gives the same text; another seed gives another."""
    first = text_of(client.post("/messages", json=make_body()).json())
    assert text_of(client.post("/messages", json=make_body()).json()) == first
    with running_simulator(SimulatorConfig(port=0, ttft_s=0, seed=1)) as url:
        other = httpx.post(f"{url}/messages", json=make_body(), headers={"x-api-key": "k"})
    assert text_of(other.json()) != first


def test_max_tokens_cut(client: httpx.Client, make_body: Body, sse: Sse) -> None:
    """A cut answer reports stop_reason max_tokens and output_tokens == max_tokens."""
    message = client.post("/messages", json=make_body("[[sim tokens=30]]", max_tokens=5)).json()
    assert (message["stop_reason"], message["usage"]["output_tokens"]) == ("max_tokens", 5)
    events = sse(
        client.post(
            "/messages", json=make_body("[[sim tokens=30]]", max_tokens=5, stream=True)
        ).text
    )
    assert events[-3][1]["delta"]["stop_reason"] == "max_tokens"
    assert events[-3][1]["usage"]["output_tokens"] == 5


def test_stop_sequence_honoured(client: httpx.Client, make_body: Body, sse: Sse) -> None:
    """A word the answer contains, given as stop sequence, ends the text just before it."""
    full = text_of(client.post("/messages", json=make_body()).json())
    stop = full.split(" ")[3]
    message = client.post("/messages", json=make_body(stop_sequences=[stop])).json()
    assert (message["stop_reason"], message["stop_sequence"]) == ("stop_sequence", stop)
    assert full.startswith(text_of(message))
    assert stop not in text_of(message)
    events = sse(client.post("/messages", json=make_body(stop_sequences=stop, stream=True)).text)
    assert events[-3][1]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": stop}
    deltas = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta")
    assert deltas == text_of(message)


def test_streamed_tool_use(client: httpx.Client, make_body: Body, sse: Sse) -> None:
    """input_json_delta fragments concatenate to JSON with every required key."""
    events = sse(client.post("/messages", json=make_body(tools=[TOOL], stream=True)).text)
    starts = [d["content_block"] for n, d in events if n == "content_block_start"]
    assert [b["type"] for b in starts] == ["text", "tool_use"]
    assert starts[1]["name"] == "lookup"
    assert starts[1]["id"].startswith("toolu_")
    fragments = [
        d["delta"]["partial_json"]
        for n, d in events
        if n == "content_block_delta" and d["delta"]["type"] == "input_json_delta"
    ]
    assert len(fragments) >= 2
    arguments = orjson.loads("".join(fragments))
    assert {"query", "limit"} <= set(arguments)
    assert isinstance(arguments["query"], str)
    assert isinstance(arguments["limit"], int)
    assert events[-3][1]["delta"]["stop_reason"] == "tool_use"
    plain = client.post("/messages", json=make_body(tools=[TOOL])).json()
    assert plain["content"][-1]["input"] == arguments
