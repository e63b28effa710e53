"""The gateway's relay from job events to an Anthropic stream, resumed with Last-Event-ID."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from worker import events as ev
from worker.gateway.relay import (
    AnthropicRelay,
    http_status,
    parse_message_id,
    resume_point,
    terminal_error,
    valid_stream_id,
)

MESSAGE = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "m",
    "content": [{"type": "text", "text": "hi"}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {"input_tokens": 1, "output_tokens": 1},
}


def _event(seq: int, type_: str, attempt: int = 1, **fields: Any) -> dict[str, Any]:
    return {**ev.make_event("job", seq, attempt, type_, **fields), "stream_id": f"{seq}-0"}


def _live(seq: int, type_: str, attempt: int = 1, **fields: Any) -> dict[str, Any]:
    """An event as the gateway's own run hands it over: not stored yet, no stream id."""
    return ev.make_event("job", seq, attempt, type_, **fields)


def _ids_and_kinds(frames: list[bytes]) -> list[tuple[str, str]]:
    out = []
    for frame in frames:
        lines = frame.decode().split("\n")
        id_ = next(line[4:] for line in lines if line.startswith("id: "))
        out.extend((id_, orjson.loads(line[6:])["type"]) for line in lines if line[:6] == "data: ")
    return out


def _chunk(seq: int, kind: str, attempt: int = 1, *, live: bool = False) -> dict[str, Any]:
    return (_live if live else _event)(seq, ev.CHUNK, attempt, event={"type": kind})


def _kinds(frames: list[bytes]) -> list[str]:
    return [
        orjson.loads(line[6:])["type"]
        for frame in frames
        for line in frame.split(b"\n")
        if line.startswith(b"data: ")
    ]


def test_a_fresh_stream_replays_a_completed_message_and_hides_an_early_retry() -> None:
    relay = AnthropicRelay("job")
    assert list(relay.feed(_event(2, ev.RETRY, reason="http_529"))) == []
    kinds = _kinds(list(relay.feed(_event(3, ev.COMPLETED, message=MESSAGE))))
    assert kinds[0] == "message_start"
    assert kinds[-1] == "message_stop"


def test_a_resumed_stream_ends_with_an_error_at_a_retry() -> None:
    """The client holds chunks from before its Last-Event-ID: a retry voids them."""
    relay = AnthropicRelay("job", sent_output=True)
    assert _kinds(list(relay.feed(_event(5, ev.RETRY, reason="http_529")))) == ["error"]
    assert relay.done


def test_a_resumed_stream_does_not_replay_the_message_at_completion() -> None:
    relay = AnthropicRelay("job", sent_output=True)
    assert list(relay.feed(_event(9, ev.COMPLETED, message=MESSAGE))) == []
    assert relay.done


def _error_frame(frames: list[bytes]) -> dict[str, Any]:
    data = [
        line[6:] for frame in frames for line in frame.split(b"\n") if line.startswith(b"data: ")
    ]
    assert len(data) == 1
    error: dict[str, Any] = orjson.loads(data[0])["error"]
    return error


@pytest.mark.parametrize(
    "error",
    [
        {"type": "authentication_error", "message": "invalid x-api-key", "status_code": 401},
        {"type": "permission_error", "message": "no access to model", "status_code": 403},
        {"type": "invalid_request_error", "message": "bad key", "status_code": 401},
        # an error event inside a 200 stream has no status, only its type
        {"type": "authentication_error", "message": "key revoked", "status_code": None},
    ],
)
def test_the_upstream_refusing_our_key_is_a_502_api_error_naming_it(error: dict[str, Any]) -> None:
    """An upstream 401/403 is about this service's key, not the client's: the status is 502
    and the error an api_error that names the upstream, in the body and in the stream."""
    assert http_status(error, ev.FAILED) == 502
    body = terminal_error({"type": ev.FAILED, "error": error}, upstream="api.example.test")
    assert body["type"] == "api_error"
    assert "upstream api.example.test" in body["message"]
    assert error["message"] not in body["message"]  # the upstream's words stay in the job
    relay = AnthropicRelay("job", upstream="api.example.test")
    streamed = _error_frame(list(relay.feed(_event(4, ev.FAILED, error=error))))
    assert streamed["type"] == "api_error"
    assert "upstream api.example.test" in streamed["message"]


@pytest.mark.parametrize(
    ("status", "expected"), [(400, 400), (404, 404), (429, 429), (500, 500), (None, 502)]
)
def test_other_upstream_statuses_pass_through(status: int | None, expected: int) -> None:
    """Every other upstream status reaches the client as it was; no status at all is 502."""
    error = {"type": "invalid_request_error", "message": "m", "status_code": status}
    assert http_status(error, ev.FAILED) == expected
    assert terminal_error({"type": ev.FAILED, "error": error})["type"] == "invalid_request_error"


def test_a_ping_or_unknown_chunk_does_not_make_a_retry_visible() -> None:
    """Chunks that are no part of an answer (a ping, an unknown type) are relayed, but a
    retry after them is still hidden: the client holds nothing the retry voids."""
    relay = AnthropicRelay("job")
    for seq, kind in enumerate(["ping", "vendor_hello"], start=2):
        frames = list(relay.feed(_event(seq, ev.CHUNK, event={"type": kind})))
        assert _kinds(frames) == [kind]
    assert list(relay.feed(_event(4, ev.RETRY, reason="http_529"))) == []
    assert not relay.done
    assert _kinds(list(relay.feed(_event(5, ev.CHUNK, event={"type": "message_start"})))) == [
        "message_start"
    ]
    assert _kinds(list(relay.feed(_event(6, ev.RETRY, reason="http_529")))) == ["error"]


@pytest.mark.parametrize("value", ["1-0", "1700000000000-12"])
def test_stream_ids_of_ascii_digits_are_accepted(value: str) -> None:
    """A Redis stream id is two runs of ASCII digits."""
    assert valid_stream_id(value)


@pytest.mark.parametrize(
    "value", ["1-0\n2", "\u0661-\u0660", "1-", "-0", "1_0-0", "+1-0", "1-0-0", "1 -0", ""]
)
def test_other_stream_ids_are_refused(value: str) -> None:
    """Other scripts' digits, signs, separators or anything after a newline are not a stream
    id (the header's own surrounding whitespace is stripped)."""
    assert not valid_stream_id(value)


def test_events_not_yet_stored_are_named_by_their_place() -> None:
    """An event of the gateway's own run has no stream id yet: its frame's id is
    ``{job}/{attempt}.{seq}``; a stored event's is its stream id."""
    relay = AnthropicRelay("job")
    assert _ids_and_kinds(list(relay.feed(_chunk(2, "message_start", live=True)))) == [
        ("job/1.2", "message_start")
    ]
    assert _ids_and_kinds(list(relay.feed(_chunk(3, "content_block_start")))) == [
        ("job/3-0", "content_block_start")
    ]


def test_after_a_live_relay_redis_is_read_without_repeating_what_the_client_holds() -> None:
    """The run's events relayed live, then the job's stream read from its start (the run
    ended without the job's end): what was sent is skipped, the rest goes on."""
    relay = AnthropicRelay("job")
    for seq, kind in enumerate(["message_start", "content_block_start"], start=2):
        list(relay.feed(_chunk(seq, kind, live=True)))
    stored = [
        _event(1, ev.STARTED),
        _chunk(2, "message_start"),
        _chunk(3, "content_block_start"),
        _chunk(4, "content_block_delta"),
        _event(5, ev.CANCELLED, attempt=0),  # a cancel counts the attempts the hash holds
    ]
    frames = [frame for event in stored for frame in relay.feed(event)]
    assert _kinds(frames) == ["content_block_delta", "error"]
    assert relay.done


def test_a_place_resumes_after_the_event_it_names() -> None:
    """Resuming from a place: the events up to it (any earlier attempt's too) are skipped."""
    relay = AnthropicRelay("job", sent_output=True, place=(2, 6))
    stored = [
        _event(1, ev.STARTED),
        _chunk(2, "message_start"),
        _event(3, ev.RETRY, reason="http_529"),
        _event(4, ev.STARTED, attempt=2),
        _chunk(5, "message_start", attempt=2),
        _chunk(6, "content_block_start", attempt=2),
        _chunk(7, "content_block_delta", attempt=2),
    ]
    frames = [frame for event in stored for frame in relay.feed(event)]
    assert _ids_and_kinds(frames) == [("job/7-0", "content_block_delta")]


def test_a_later_attempts_output_voids_the_partial_answer() -> None:
    """A runner that died with events unstored: the next one numbers its events from what
    was stored, so they may repeat the seqs the client holds. An event of a later attempt is
    never taken for one the client holds; its output ends the stream with the void error
    instead of continuing the old answer with the new one."""
    relay = AnthropicRelay("job", sent_output=True, place=(1, 9))
    assert list(relay.feed(_chunk(5, "content_block_delta"))) == []  # held
    frames = list(relay.feed(_event(6, ev.STARTED, attempt=2)))
    assert _kinds(frames) == ["error"]
    assert relay.done
    # Likewise live: output of attempt 1, then a chunk of attempt 2.
    relay = AnthropicRelay("job")
    list(relay.feed(_chunk(2, "message_start", live=True)))
    assert _kinds(list(relay.feed(_chunk(3, "message_start", attempt=2)))) == ["error"]


def test_a_later_attempt_after_output_of_none_passes() -> None:
    """Without output sent (only a ping), a later attempt's answer is the answer."""
    relay = AnthropicRelay("job")
    list(relay.feed(_chunk(2, "ping")))
    assert _kinds(list(relay.feed(_chunk(4, "message_start", attempt=2)))) == ["message_start"]


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("job-1/1700000000000-12", ("job-1", "1700000000000-12", None)),
        ("job-1/2.17", ("job-1", "0-0", (2, 17))),
        (" job-1/1.3 ", ("job-1", "0-0", (1, 3))),
    ],
)
def test_a_messages_route_id_names_a_stream_id_or_a_place(
    header: str, expected: tuple[str, str, Any]
) -> None:
    parsed = parse_message_id(header)
    assert parsed is not None
    assert (parsed[0], *resume_point(parsed[1])) == expected


@pytest.mark.parametrize(
    "header", ["job-1/", "/1.2", "job-1/1.", "job-1/.2", "job-1/1.2.3", "job-1/-1.2", "job-1/a.b"]
)
def test_other_messages_route_ids_are_refused(header: str) -> None:
    assert parse_message_id(header) is None
