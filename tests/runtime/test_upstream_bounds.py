"""The HTTP boundary reads a bounded amount of one response, whatever the upstream sends."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from worker.errors import PermanentUpstreamError
from worker.runtime.upstream import UpstreamClient
from worker.settings import load_settings

CHUNK = 65_536
HUGE = 64 * 1_048_576  # what the upstream would send: 64 MiB
CAP = 1_048_576  # MAX_RESPONSE_BYTES for these tests
REQUEST = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}


class Endless:
    """A body of ``HUGE`` bytes made on demand; counts what the reader took."""

    def __init__(self, piece: bytes) -> None:
        self.piece = piece
        self.sent = 0

    def __iter__(self) -> Iterator[bytes]:
        while self.sent < HUGE:
            self.sent += len(self.piece)
            yield self.piece


def _client(body: Endless, content_type: str) -> UpstreamClient:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": content_type}, content=body)

    settings = load_settings(api_key="k", max_response_bytes=CAP)
    return UpstreamClient(settings, transport=httpx.MockTransport(answer))


def test_a_64_mib_json_body_is_cut_at_the_cap() -> None:
    """A non-streamed body past MAX_RESPONSE_BYTES fails the call (response_too_large, not
    retried) after reading just past the cap, not the 64 MiB."""
    body = Endless(b"x" * CHUNK)
    client = _client(body, "application/json")
    with pytest.raises(PermanentUpstreamError) as refused:
        client.create(REQUEST)
    assert refused.value.reason == "response_too_large"
    assert "MAX_RESPONSE_BYTES" in str(refused.value)
    assert body.sent <= CAP + CHUNK


def test_a_stream_with_a_line_that_never_ends_is_cut_at_the_cap() -> None:
    """An SSE line that never ends (the decoder would buffer it all) stops at the cap too."""
    body = Endless(b"data: " + b"y" * (CHUNK - 6))
    client = _client(body, "text/event-stream")
    with pytest.raises(PermanentUpstreamError) as refused:
        list(client.stream_batches(REQUEST))
    assert refused.value.reason == "response_too_large"
    assert body.sent <= CAP + CHUNK


def test_a_response_within_the_cap_is_read_whole() -> None:
    """The cap refuses only what passes it: a message of normal size is returned."""
    message = (
        b'{"id":"msg_1","type":"message","role":"assistant","model":"m","content":[],'
        b'"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":1,'
        b'"output_tokens":0}}'
    )

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=message)

    settings = load_settings(api_key="k", max_response_bytes=CAP)
    client = UpstreamClient(settings, transport=httpx.MockTransport(answer))
    assert client.create(REQUEST)["id"] == "msg_1"
