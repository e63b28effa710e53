"""worker.runtime.sse: the incremental SSE decoder and the event parser, fed plain bytes."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.support import MESSAGE_START
from worker.errors import TransientUpstreamError
from worker.runtime.sse import DONE, MalformedStreamError, ServerSentEvent, SSEDecoder, parse_event

TEXT = "héllo 世界 🎉"


def _event_lines(event: str, payload: dict[str, object]) -> list[str]:
    return [f"event: {event}", "data: " + json.dumps(payload, ensure_ascii=False), ""]


def _realistic_stream() -> bytes:
    """An Anthropic-style stream with CRLF endings and every oddity the decoder must survive."""
    lines: list[str] = [": stream opened by proxy", ""]
    lines += _event_lines(
        "message_start",
        MESSAGE_START,
    )
    lines += _event_lines("ping", {"type": "ping"})
    lines += _event_lines(
        "content_block_start",
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    )
    lines += _event_lines(
        "content_block_delta",
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": TEXT}},
    )
    # A JSON document spread over three data lines, joined back with "\n".
    lines += [
        "event: content_block_delta",
        'data: {"type": "content_block_delta", "index": 0,',
        'data: "delta": {"type": "text_delta",',
        'data: "text": " x\u2028y"}}',
        "",
    ]
    lines += _event_lines("some_future_event", {"type": "some_future_event", "n": 1})
    lines += _event_lines("content_block_stop", {"type": "content_block_stop", "index": 0})
    lines += _event_lines("message_stop", {"type": "message_stop"})
    lines += ["data: [DONE]", "", ""]
    return "\r\n".join(lines).encode("utf-8")


STREAM = _realistic_stream()


def _decode_chunks(chunks: Iterable[bytes]) -> list[ServerSentEvent]:
    decoder = SSEDecoder()
    events: list[ServerSentEvent] = []
    for chunk in chunks:
        events += decoder.decode(chunk)
    return events + decoder.flush()


def _decode(data: bytes) -> list[ServerSentEvent]:
    return _decode_chunks([data])


EXPECTED = _decode(STREAM)


def test_realistic_stream_whole() -> None:
    """The whole stream decodes to its nine events, names and data intact."""
    names = [event.event for event in EXPECTED]
    assert names == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "some_future_event",
        "content_block_stop",
        "message_stop",
        None,
    ]
    parsed = [parse_event(event) for event in EXPECTED]
    assert parsed[-1] is DONE
    assert parsed[3] == {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "text_delta", "text": TEXT},
    }
    assert EXPECTED[4].data.count("\n") == 2
    assert parsed[4] == {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "text_delta", "text": " x\u2028y"},
    }
    assert parsed[5] == {"type": "some_future_event", "n": 1}


def test_every_two_piece_split_gives_the_same_events() -> None:
    """Splitting the stream at any one byte offset (inside UTF-8, inside CRLF) changes nothing."""
    for offset in range(len(STREAM) + 1):
        assert _decode_chunks([STREAM[:offset], STREAM[offset:]]) == EXPECTED, offset


def test_byte_by_byte_gives_the_same_events() -> None:
    """Feeding one byte at a time gives the same events as one chunk."""
    assert _decode_chunks(STREAM[i : i + 1] for i in range(len(STREAM))) == EXPECTED


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=40))
def test_random_splits_give_the_same_events(cuts: list[int]) -> None:
    """Any set of split points, including empty chunks, gives the same events."""
    points = [0, *sorted(cuts), len(STREAM)]
    assert _decode_chunks(STREAM[a:b] for a, b in itertools.pairwise(points)) == EXPECTED


@given(st.sampled_from(["\n", "\r", "\r\n"]), st.lists(st.integers(0, 200), max_size=10))
def test_every_line_ending_style_is_equivalent(newline: str, cuts: list[int]) -> None:
    """LF, CR and CRLF endings give the same events, whatever the chunking."""
    body = STREAM.decode().replace("\r\n", newline).encode()
    points = [0, *sorted(min(c, len(body)) for c in cuts), len(body)]
    assert _decode_chunks(body[a:b] for a, b in itertools.pairwise(points)) == EXPECTED


def test_cr_then_lf_in_next_chunk_is_one_line_break() -> None:
    """A CR ending one chunk and an LF starting the next are one line break, not a blank line."""
    events = _decode_chunks([b"data: a\r", b"\ndata: b\r\n\r\n"])
    assert events == [ServerSentEvent(event=None, data="a\nb")]


def test_cr_alone_then_blank_line_dispatches() -> None:
    """Bare CR endings work: CR CR ends an event."""
    assert _decode(b"event: e\rdata: x\r\r") == [ServerSentEvent(event="e", data="x")]


def test_multibyte_split_across_chunks() -> None:
    """A four-byte emoji split into single bytes decodes to the emoji."""
    raw = "data: 🎉\n\n".encode()
    assert _decode_chunks([raw[:7], raw[7:8], raw[8:9], raw[9:]]) == [
        ServerSentEvent(event=None, data="🎉")
    ]


def test_comments_are_ignored() -> None:
    """Lines starting with a colon are comments and do not touch the event."""
    assert _decode(b": hi\ndata: x\n:data: y\n\n") == [ServerSentEvent(event=None, data="x")]


def test_only_one_space_after_colon_is_stripped() -> None:
    """One optional space after the colon is stripped; a second one is data."""
    assert _decode(b"data:x\n\ndata:  y\n\n") == [
        ServerSentEvent(event=None, data="x"),
        ServerSentEvent(event=None, data=" y"),
    ]


def test_field_without_colon_has_empty_value() -> None:
    """A bare "data" line contributes an empty line of data."""
    assert _decode(b"data\ndata: b\n\n") == [ServerSentEvent(event=None, data="\nb")]


def test_unknown_fields_are_ignored() -> None:
    """Fields other than event/data/id/retry are ignored."""
    assert _decode(b"foo: bar\ndata: x\nDATA: y\n\n") == [ServerSentEvent(event=None, data="x")]


def test_block_without_data_dispatches_nothing() -> None:
    """An event name with no data lines is not an event."""
    assert _decode(b"event: ping\n\n\n\n") == []


def test_id_persists_and_retry_is_per_event() -> None:
    """id carries over to later events; retry applies to its own event; bad values ignored."""
    events = _decode(b"id: 7\nretry: 150\ndata: a\n\ndata: b\n\nid: x\0y\nretry: 1s\ndata: c\n\n")
    assert events == [
        ServerSentEvent(event=None, data="a", id="7", retry=150),
        ServerSentEvent(event=None, data="b", id="7", retry=None),
        ServerSentEvent(event=None, data="c", id="7", retry=None),
    ]


def test_empty_event_name_is_none() -> None:
    """An empty event: field is the same as none."""
    assert _decode(b"event:\ndata: x\n\n") == [ServerSentEvent(event=None, data="x")]


def test_flush_dispatches_an_unterminated_last_event() -> None:
    """A stream ending without its blank line still yields the last event at flush."""
    decoder = SSEDecoder()
    assert decoder.decode(b"data: [DONE]") == []
    assert decoder.flush() == [ServerSentEvent(event=None, data="[DONE]")]


def test_leading_bom_is_dropped() -> None:
    """A UTF-8 byte-order mark at the start of the stream is not part of the first field name."""
    raw = b"\xef\xbb\xbfdata: x\n\n"
    assert _decode_chunks([raw[:1], raw[1:2], raw[2:]]) == [ServerSentEvent(event=None, data="x")]


def test_invalid_utf8_becomes_replacement_character() -> None:
    """Invalid bytes decode to U+FFFD (as the SSE spec says) instead of raising."""
    assert _decode(b"data: a\xffb\n\n") == [ServerSentEvent(event=None, data="a\ufffdb")]


def test_parse_done_and_keepalive() -> None:
    """[DONE] gives the DONE sentinel and whitespace-only data gives None."""
    assert parse_event(ServerSentEvent(event=None, data="[DONE]")) is DONE
    assert parse_event(ServerSentEvent(event="ping", data=" ")) is None


def test_parse_trusts_json_type_over_event_name() -> None:
    """When the event: name and the JSON type disagree, the JSON type wins."""
    sse = ServerSentEvent(event="content_block_stop", data='{"type": "ping"}')
    assert parse_event(sse) == {"type": "ping"}


def test_parse_fills_missing_type_from_event_name() -> None:
    """A JSON object without a type takes the event: name."""
    sse = ServerSentEvent(event="message_stop", data="{}")
    assert parse_event(sse) == {"type": "message_stop"}


@pytest.mark.parametrize(
    "data",
    ['{"type": "message_start", "mess', "[1, 2]", '"text"', "{}", '{"type": 3}', "nan"],
)
def test_parse_malformed_raises(data: str) -> None:
    """Invalid JSON, a non-object or an object with no usable type is a MalformedStreamError."""
    with pytest.raises(MalformedStreamError) as info:
        parse_event(ServerSentEvent(event=None, data=data))
    assert isinstance(info.value, TransientUpstreamError)
    assert info.value.retryable
    assert info.value.reason == "malformed_sse"
    assert info.value.error_type == "api_error"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ('{"type": "ping"}', {"type": "ping"}),
        ("{}", {"type": "ping"}),
        ('{"type": "ping", "ts": 1}', {"type": "ping", "ts": 1}),
        ("not json", None),
        ("[1]", None),
        ('{"type": "content_block_delta", "index": 0}', None),
    ],
)
def test_a_ping_never_fails_whatever_its_data(data: str, expected: object) -> None:
    """An `event: ping` is skipped unread by the SDK, so it never fails a stream here: a ping
    object comes back verbatim, anything else as None (nothing to apply)."""
    assert parse_event(ServerSentEvent(event="ping", data=data)) == expected
