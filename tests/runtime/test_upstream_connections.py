"""The upstream's connections are kept between calls, streamed ones included, over real HTTP;
an upstream that holds a stream's body open after ``message_stop`` costs its connection, not
the call."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support import TEST_API_KEY, make_request
from worker.runtime.upstream import UpstreamClient
from worker.settings import load_settings

MODEL = "deepseek-ai/DeepSeek-V3"


def _pooled(client: UpstreamClient) -> list[Any]:
    return list(client._transport._pool.connections)  # type: ignore[attr-defined]


@pytest.mark.parametrize("stream", [True, False])
def test_calls_one_after_another_reuse_one_connection(simulator_url: str, stream: bool) -> None:
    """Five calls in a row use one kept-alive connection: a streamed call reads its body's
    end after message_stop, so httpcore keeps the connection (before, every streamed call
    connected again, and against a real upstream negotiated TLS again)."""
    settings = load_settings(api_key=TEST_API_KEY, api_base_url=simulator_url)
    client = UpstreamClient(settings)
    request = make_request("keep it [[sim tokens=6]]", model=MODEL, stream=stream)
    seen = []
    for _ in range(5):
        if stream:
            batches = list(client.stream_batches(request))
            assert batches[-1][-1]["type"] == "message_stop"
        else:
            assert client.create(request)["type"] == "message"
        seen.append(_pooled(client))
    first = seen[0]
    assert len(first) == 1
    assert all(pooled == first for pooled in seen)


@pytest.fixture
def holding_upstream() -> Iterator[tuple[str, threading.Event]]:
    """An upstream that streams a whole answer, then never ends the chunked body (until the
    test lets it go)."""
    events = [
        {
            "type": "message_start",
            "message": {
                "id": "msg_1",
                "type": "message",
                "role": "assistant",
                "model": MODEL,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": 1, "output_tokens": 0},
            },
        },
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}},
        {"type": "content_block_stop", "index": 0},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {"output_tokens": 1},
        },
        {"type": "message_stop"},
    ]
    import orjson

    body = b"".join(
        b"event: %s\ndata: %s\n\n" % (e["type"].encode(), orjson.dumps(e)) for e in events
    )
    release = threading.Event()
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, _, rest = data.partition(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            while len(rest) < length:
                rest += conn.recv(65536)
            conn.sendall(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"transfer-encoding: chunked\r\n\r\n" + b"%x\r\n%s\r\n" % (len(body), body)
            )
            release.wait(30)  # the body's last chunk never comes while the test runs

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}", release
    finally:
        release.set()
        server.close()
        thread.join(10)


def test_a_body_held_open_after_message_stop_does_not_hold_the_call(
    holding_upstream: tuple[str, threading.Event],
) -> None:
    """The answer is complete at message_stop: the call returns it although the body never
    ends, and the connection is dropped rather than kept half-read."""
    url, _release = holding_upstream
    settings = load_settings(api_key="k", api_base_url=url, idle_timeout_s=600)
    client = UpstreamClient(settings)
    result: list[Any] = []
    call = threading.Thread(
        target=lambda: result.append(list(client.stream_batches(make_request("x", model=MODEL)))),
        daemon=True,
    )
    call.start()
    call.join(60)  # the idle timeout (600 s) would hold it far longer
    assert not call.is_alive(), "the call waited for the body's end"
    events = [e for batch in result[0] for e in batch]
    assert events[-1]["type"] == "message_stop"
    assert _pooled(client) == []
