"""worker.runtime.accumulate: the fold must give exactly the message the anthropic SDK accumulates.

Every stream here is also run through the SDK's own ``accumulate_event``, with events built
the way its ``Stream`` builds them (``construct_type`` on the decoded JSON). The comparison
is ``final_message(ours) == sdk_snapshot.to_dict(mode="json")`` (wire names, fields the
SDK set), plus a second check that our dict, validated as an SDK ``Message``, dumps with
every default exactly like the SDK's snapshot.
"""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import Iterable
from typing import Any

import orjson
import pytest
from anthropic._models import construct_type
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message, RawMessageStreamEvent
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.runtime.accumulate import AccumulateError, accumulate, final_message

Event = dict[str, Any]


def start(usage: dict[str, Any] | None = None) -> Event:
    return {
        "type": "message_start",
        "message": {
            "id": "msg_01",
            "type": "message",
            "role": "assistant",
            "model": "claude-x",
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage or {"input_tokens": 25, "output_tokens": 1},
        },
    }


def block_start(index: int, block: dict[str, Any]) -> Event:
    return {"type": "content_block_start", "index": index, "content_block": block}


def delta(index: int, **body: Any) -> Event:
    return {"type": "content_block_delta", "index": index, "delta": body}


def stop(index: int) -> Event:
    return {"type": "content_block_stop", "index": index}


def message_delta(stop_reason: str, stop_sequence: str | None = None, **usage: Any) -> Event:
    return {
        "type": "message_delta",
        "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
        "usage": {"output_tokens": 42, **usage},
    }


MESSAGE_STOP: Event = {"type": "message_stop"}
PING: Event = {"type": "ping"}


def text_block(index: int, pieces: Iterable[str]) -> list[Event]:
    events = [block_start(index, {"type": "text", "text": ""})]
    events += [delta(index, type="text_delta", text=piece) for piece in pieces]
    return [*events, stop(index)]


def tool_block(index: int, fragments: Iterable[str], kind: str = "tool_use") -> list[Event]:
    name = "web_search" if kind == "server_tool_use" else "get_weather"
    block = {"type": kind, "id": f"toolu_{index}", "name": name, "input": {}}
    events = [block_start(index, block), delta(index, type="input_json_delta", partial_json="")]
    events += [delta(index, type="input_json_delta", partial_json=f) for f in fragments]
    return [*events, stop(index)]


def thinking_block(index: int, pieces: Iterable[str]) -> list[Event]:
    events = [block_start(index, {"type": "thinking", "thinking": "", "signature": ""})]
    events += [delta(index, type="thinking_delta", thinking=piece) for piece in pieces]
    events.append(delta(index, type="signature_delta", signature="EqQBCgIYAhIM1gbcDa9GJwZA"))
    return [*events, stop(index)]


def chop(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


TOOL_INPUT = {"location": "São Paulo, BR", "unit": "celsius", "days": [1, 2.5, -3e-2], "x": None}
TOOL_JSON = json.dumps(TOOL_INPUT)  # ASCII with \u escapes, so splits land inside escapes too


def run_ours(events: Iterable[Event]) -> dict[str, Any]:
    snapshot: dict[str, Any] | None = None
    for event in events:
        snapshot = accumulate(snapshot, event)
    assert snapshot is not None
    return final_message(snapshot)


def run_sdk(events: Iterable[Event]) -> Any:
    snapshot: Any = None
    json_bufs: dict[int, bytes] = {}
    for event in events:
        # As the SDK's Stream does: ping is skipped, the rest is construct_type'd; and as its
        # MessageStream does: nothing before message_start is accumulated.
        if event["type"] == "ping" or (snapshot is None and event["type"] != "message_start"):
            continue
        built = construct_type(type_=RawMessageStreamEvent, value=copy.deepcopy(event))
        snapshot = accumulate_event(event=built, current_snapshot=snapshot, json_bufs=json_bufs)
    return snapshot


def assert_matches_sdk(events: list[Event]) -> dict[str, Any]:
    frozen = copy.deepcopy(events)
    ours = run_ours(events)
    sdk = run_sdk(events)
    assert events == frozen, "accumulate() mutated an event"
    assert ours == sdk.to_dict(mode="json")
    assert Message.model_validate(ours).model_dump(mode="json") == sdk.model_dump(mode="json")
    assert orjson.loads(orjson.dumps(ours)) == ours
    return ours


def test_plain_text_in_many_deltas() -> None:
    """Text deltas (multi-byte, one character each) concatenate into one text block."""
    text = "Hello, héllo 世界 🎉 — done."
    events = [start(), *text_block(0, list(text)), message_delta("end_turn"), MESSAGE_STOP]
    ours = assert_matches_sdk(events)
    assert ours["content"] == [{"type": "text", "text": text}]
    assert ours["usage"] == {"input_tokens": 25, "output_tokens": 42}


@pytest.mark.parametrize("size", [1, 2, 3, 7, len(TOOL_JSON)])
def test_tool_use_json_split_mid_token(size: int) -> None:
    """input_json_delta fragments split inside keys, numbers and escapes give the SDK's input."""
    events = [start(), *tool_block(0, chop(TOOL_JSON, size)), message_delta("tool_use")]
    ours = assert_matches_sdk([*events, MESSAGE_STOP])
    assert ours["content"][0]["input"] == TOOL_INPUT


def test_thinking_then_text() -> None:
    """Thinking deltas concatenate, signature_delta sets the signature, text follows."""
    events = [
        start(),
        *thinking_block(0, ["Let me ", "think… ", "🤔"]),
        *text_block(1, ["The answer", " is 4."]),
        message_delta("end_turn"),
        MESSAGE_STOP,
    ]
    ours = assert_matches_sdk(events)
    assert ours["content"][0]["thinking"] == "Let me think… 🤔"
    assert ours["content"][0]["signature"] == "EqQBCgIYAhIM1gbcDa9GJwZA"


def test_several_blocks() -> None:
    """Thinking, text and two tool_use blocks keep their order and their own inputs."""
    events = [
        start(),
        *thinking_block(0, ["plan"]),
        *text_block(1, ["Checking ", "two cities."]),
        *tool_block(2, chop(TOOL_JSON, 5)),
        *tool_block(3, ['{"location": "Oslo"', "}"]),
        message_delta("tool_use"),
        MESSAGE_STOP,
    ]
    ours = assert_matches_sdk(events)
    assert [block["type"] for block in ours["content"]] == [
        "thinking",
        "text",
        "tool_use",
        "tool_use",
    ]
    assert ours["content"][3]["input"] == {"location": "Oslo"}


def test_ping_and_unknown_events_change_nothing() -> None:
    """ping, unknown event types and unknown delta types leave the message unchanged."""
    events = [
        start(),
        PING,
        *text_block(0, ["a", "b"]),
        {"type": "some_future_event", "index": 0, "payload": {"x": 1}},
        delta(0, type="some_future_delta", stuff="zzz"),
        PING,
        message_delta("end_turn"),
        PING,
        MESSAGE_STOP,
    ]
    assert assert_matches_sdk(events)["content"] == [{"type": "text", "text": "ab"}]


def test_stop_sequence() -> None:
    """stop_reason stop_sequence carries the matched sequence."""
    events = [start(), *text_block(0, ["1, 2, 3"]), message_delta("stop_sequence", "4")]
    ours = assert_matches_sdk([*events, MESSAGE_STOP])
    assert (ours["stop_reason"], ours["stop_sequence"]) == ("stop_sequence", "4")


def test_max_tokens_with_truncated_tool_json() -> None:
    """max_tokens mid tool call: the truncated input is partially parsed exactly as the SDK does."""
    events = [
        start(),
        *text_block(0, ["Sure."]),
        *tool_block(1, ['{"location": "Lisbon", "unit": "cel']),
        message_delta("max_tokens"),
        MESSAGE_STOP,
    ]
    ours = assert_matches_sdk(events)
    assert ours["stop_reason"] == "max_tokens"
    assert ours["content"][1]["input"] == {"location": "Lisbon"}


def test_cut_stream_is_finished_by_final_message() -> None:
    """Without content_block_stop, final_message parses the pending tool JSON like the SDK."""
    events = [start(), *tool_block(0, chop(TOOL_JSON, 4))[:-1]]
    ours = assert_matches_sdk(events)
    assert ours["content"][0]["input"] == TOOL_INPUT
    assert "_partial_json" not in ours["content"][0]


def test_usage_is_cumulative() -> None:
    """message_delta usage replaces counts it carries and keeps message_start's otherwise."""
    usage = {
        "input_tokens": 10,
        "output_tokens": 1,
        "cache_creation_input_tokens": 5,
        "cache_read_input_tokens": 0,
        "service_tier": "standard",
    }
    events = [
        start(usage),
        *text_block(0, ["x"]),
        message_delta("end_turn", input_tokens=12, cache_read_input_tokens=7),
        message_delta(
            "end_turn", server_tool_use={"web_search_requests": 1, "web_fetch_requests": 0}
        ),
        MESSAGE_STOP,
    ]
    assert assert_matches_sdk(events)["usage"] == {
        "input_tokens": 12,
        "output_tokens": 42,
        "cache_creation_input_tokens": 5,
        "cache_read_input_tokens": 7,
        "service_tier": "standard",
        "server_tool_use": {"web_search_requests": 1, "web_fetch_requests": 0},
    }


def test_citations_and_server_tool_use() -> None:
    """citations_delta appends to the text block; server_tool_use tracks input JSON too."""
    citation = {
        "type": "char_location",
        "cited_text": "the sky is blue",
        "document_index": 0,
        "document_title": None,
        "start_char_index": 0,
        "end_char_index": 15,
    }
    events = [
        start(),
        *tool_block(0, ['{"query": ', '"sky"}'], kind="server_tool_use"),
        block_start(1, {"type": "text", "text": "", "citations": None}),
        delta(1, type="citations_delta", citation=citation),
        delta(1, type="text_delta", text="Blue."),
        delta(1, type="citations_delta", citation={**citation, "start_char_index": 4}),
        stop(1),
        message_delta("end_turn"),
        MESSAGE_STOP,
    ]
    ours = assert_matches_sdk(events)
    assert ours["content"][0]["input"] == {"query": "sky"}
    assert len(ours["content"][1]["citations"]) == 2


def test_earlier_snapshots_are_not_mutated() -> None:
    """Each step returns a new snapshot and leaves the previous one as it was."""
    events = [start(), *text_block(0, ["a", "b"]), *tool_block(1, ['{"a":', "1}"])]
    snapshot: dict[str, Any] | None = None
    history: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for event in events:
        snapshot = accumulate(snapshot, event)
        history.append((snapshot, copy.deepcopy(snapshot)))
    for seen, frozen in history:
        assert seen == frozen


# Integers stay within 64 bits because orjson (our serialiser) refuses bigger ones; jiter
# and so the SDK parse them to Python ints, and so do we.
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(
    tool_input=st.dictionaries(st.text(), json_values, max_size=5),
    ascii_only=st.booleans(),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12),
    truncate_at=st.none() | st.integers(min_value=1, max_value=400),
)
def test_random_tool_json_matches_sdk(
    tool_input: dict[str, Any], ascii_only: bool, cuts: list[int], truncate_at: int | None
) -> None:
    """Any JSON object, fragmented anywhere and possibly truncated, accumulates as in the SDK."""
    text = json.dumps(tool_input, ensure_ascii=ascii_only, allow_nan=False)
    if truncate_at is not None:
        text = text[: min(truncate_at, len(text))]
    points = [0, *sorted(min(c, len(text)) for c in cuts), len(text)]
    fragments = [text[a:b] for a, b in itertools.pairwise(points)]
    ours = assert_matches_sdk([start(), *tool_block(0, fragments), message_delta("tool_use")])
    if truncate_at is None:
        assert ours["content"][0]["input"] == tool_input


def test_anything_before_message_start_is_skipped() -> None:
    """A ping, unknown events and even message events before message_start are skipped, as
    the SDK's MessageStream skips them; the snapshot stays empty until message_start."""
    early = [
        PING,
        {"type": "vendor_hello", "server": "x"},
        delta(0, type="text_delta", text="orphan"),
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {}},
    ]
    snapshot: dict[str, Any] | None = None
    for event in early:
        snapshot = accumulate(snapshot, event)
        assert snapshot == {}
    events = [*early, start(), *text_block(0, ["a"]), message_delta("end_turn"), MESSAGE_STOP]
    assert assert_matches_sdk(events)["content"] == [{"type": "text", "text": "a"}]


def test_an_error_event_is_never_folded() -> None:
    """An error event raises, before message_start or after (the caller fails the attempt)."""
    error = {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}
    for events in ([error], [start(), error]):
        with pytest.raises(AccumulateError, match="error event"):
            run_ours(events)


def test_a_stream_without_message_start_has_no_message() -> None:
    """final_message of a stream that never started raises: there is no message to give."""
    with pytest.raises(AccumulateError, match="no message_start"):
        run_ours([PING, MESSAGE_STOP])


def test_accumulate_errors_are_the_upstreams_transient_malformed_stream() -> None:
    """AccumulateError is a transient upstream error (malformed_sse) wherever it is raised,
    so a runner retries the attempt instead of treating it as a bug of ours."""
    from worker.errors import TransientUpstreamError

    with pytest.raises(TransientUpstreamError) as info:
        final_message({})
    assert info.value.reason == "malformed_sse"
    assert info.value.retryable


@pytest.mark.parametrize(
    ("events", "message"),
    [
        ([start(), delta(0, type="text_delta", text="x")], "message has 0 block"),
        ([start(), *text_block(0, ["a"]), stop(1)], "content block 1"),
        ([start(), block_start(0, {"type": "text", "text": ""}), delta(-1, text="x")], "block -1"),
        ([start(), block_start(0, {"type": "text", "text": ""}), stop(True)], "integer index"),
        ([start(), *tool_block(0, ['{"a": ]'])], "not valid JSON"),
        ([{"type": "message_start", "message": {"usage": {}}}], "no content list"),
        ([start(), {"type": "message_delta", "usage": {}}], "no delta object"),
    ],
)
def test_events_that_cannot_apply_raise(events: list[Event], message: str) -> None:
    """Events out of order, for a missing block, or with broken tool JSON raise AccumulateError."""
    with pytest.raises(AccumulateError, match=message):
        run_ours(events)


# --- the same bytes through our upstream client and through the SDK ------------------------


def sse(events: list[Event]) -> bytes:
    """Events as the upstream sends them: `event:` named by type, one `data:` line each."""
    return b"".join(
        b"event: " + str(e["type"]).encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n"
        for e in events
    )


REQUEST: dict[str, Any] = {
    "model": "claude-x",
    "max_tokens": 64,
    "messages": [{"role": "user", "content": "hi"}],
}


def ours_from_bytes(body: bytes, chunk_size: int) -> dict[str, Any]:
    """Our path: UpstreamClient's SSE decoding over ``body`` in chunks, folded as the runner
    folds (every event of every read through accumulate)."""
    import httpx

    from worker.runtime.upstream import UpstreamClient
    from worker.settings import load_settings

    chunks = [body[i : i + chunk_size] for i in range(0, len(body), chunk_size)]
    transport = httpx.MockTransport(
        lambda _request: httpx.Response(
            200, headers={"content-type": "text/event-stream"}, content=iter(chunks)
        )
    )
    settings = load_settings(api_key="k", api_base_url="http://upstream.test")
    client = UpstreamClient(settings, transport=transport)
    snapshot: dict[str, Any] | None = None
    try:
        for batch in client.stream_batches(REQUEST):
            for event in batch:
                snapshot = accumulate(snapshot, event)
    finally:
        client.close()
    assert snapshot is not None
    return final_message(snapshot)


def sdk_from_bytes(body: bytes) -> dict[str, Any]:
    """The SDK's path: messages.stream over the same bytes, its final message as JSON."""
    import anthropic
    import httpx2

    transport = httpx2.MockTransport(
        lambda _request: httpx2.Response(
            200, headers={"content-type": "text/event-stream"}, content=body
        )
    )
    with (
        anthropic.Anthropic(
            api_key="k",
            base_url="http://upstream.test",
            max_retries=0,
            http_client=httpx2.Client(transport=transport),
        ) as sdk,
        sdk.messages.stream(**REQUEST) as stream,
    ):
        final: dict[str, Any] = stream.get_final_message().to_dict(mode="json")
    return final


UNKNOWN_EARLY: Event = {"type": "vendor_hello", "region": "eu"}
UNKNOWN_LATE: Event = {"type": "vendor_usage_estimate", "index": 0, "tokens": 12}

REPLAYED_STREAMS = {
    "opens_with_a_ping": [
        PING,
        start(),
        PING,
        *text_block(0, ["Hello", ", world"]),
        message_delta("end_turn"),
        MESSAGE_STOP,
    ],
    "unknown_event_types_everywhere": [
        UNKNOWN_EARLY,
        PING,
        start(),
        UNKNOWN_LATE,
        *text_block(0, ["Checking."]),
        UNKNOWN_LATE,
        *tool_block(1, chop(TOOL_JSON, 6)),
        delta(1, type="some_future_delta", stuff="zzz"),
        message_delta("tool_use"),
        UNKNOWN_LATE,
        MESSAGE_STOP,
    ],
    "message_stop_before_message_start": [
        PING,
        MESSAGE_STOP,
        start(),
        *text_block(0, ["after a stray stop"]),
        message_delta("end_turn"),
        MESSAGE_STOP,
    ],
    "message_events_before_message_start": [
        PING,
        delta(0, type="text_delta", text="orphan"),
        {"type": "content_block_stop", "index": 3},
        UNKNOWN_EARLY,
        start(),
        *thinking_block(0, ["hmm"]),
        *text_block(1, ["4"]),
        message_delta("end_turn"),
        MESSAGE_STOP,
    ],
}


@pytest.mark.parametrize("chunk_size", [1, 7, 1 << 20])
@pytest.mark.parametrize("name", sorted(REPLAYED_STREAMS))
def test_replayed_bytes_give_the_sdks_final_message(name: str, chunk_size: int) -> None:
    """Streams that open with a ping, carry unknown event types, or send events before
    message_start do not fail: from the same bytes, split anywhere, our upstream client and
    fold give exactly the message the anthropic SDK's messages.stream accumulates."""
    body = sse(REPLAYED_STREAMS[name])
    assert ours_from_bytes(body, chunk_size) == sdk_from_bytes(body)


def test_a_ping_with_junk_data_is_skipped_like_the_sdk() -> None:
    """An `event: ping` whose data is not JSON neither fails our stream nor the SDK's."""
    events = [start(), *text_block(0, ["ok"]), message_delta("end_turn"), MESSAGE_STOP]
    body = b"event: ping\ndata: keep-alive\n\n" + sse(events)
    assert ours_from_bytes(body, 5) == sdk_from_bytes(body)


def test_fifty_thousand_deltas_accumulate_without_rebuilding_the_text() -> None:
    """Each text delta appends in O(1): the block's text is not rebuilt per delta (which was
    quadratic in the answer's length), yet the final message has all 50,000 pieces in order,
    and an earlier snapshot still finishes to the text it had."""
    pieces = [f"{i % 10}" for i in range(50_000)]
    snapshot: dict[str, Any] | None = None
    middle: dict[str, Any] | None = None
    for number, event in enumerate([start(), *text_block(0, pieces)[:-1]]):
        snapshot = accumulate(snapshot, event)
        if number == 25_001:  # message_start, block start, then 25,000 deltas
            middle = snapshot
        if number > 1:
            # Mid-block, the text field holds no joined string: nothing grows per delta.
            assert snapshot["content"][0]["text"] == ""
    assert snapshot is not None
    assert middle is not None
    finished = final_message(accumulate(snapshot, {"type": "content_block_stop", "index": 0}))
    assert finished["content"][0]["text"] == "".join(pieces)
    assert "_pieces" not in finished["content"][0]
    # The chain is shared, never changed: the earlier snapshot has its own 25,000 pieces.
    assert final_message(middle)["content"][0]["text"] == "".join(pieces[:25_000])
