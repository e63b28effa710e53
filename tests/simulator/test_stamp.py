"""The ``stamp=1`` directive: send times in delta events, for the streaming benchmark."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx

Body = Callable[..., dict[str, Any]]
Sse = Callable[[str], list[tuple[str | None, Any]]]


def test_stamp_directive_sets_send_time_on_every_delta(
    client: httpx.Client, make_body: Body, sse: Sse
) -> None:
    """With stamp=1 each delta carries sim_sent_at, the wall clock when its frame was written."""
    before = time.time()
    body = make_body("Go [[sim tokens=5 tps=200 stamp=1]]", stream=True)
    events = sse(client.post("/messages", json=body).text)
    after = time.time()
    deltas = [data for name, data in events if name == "content_block_delta"]
    assert len(deltas) == 5
    stamps = [d["sim_sent_at"] for d in deltas]
    assert all(before <= s <= after for s in stamps)
    assert stamps == sorted(stamps)
    # On the pacing schedule: the fifth token is due 4/200 s after the first. A busy machine
    # only delays frames (a late first frame lets the rest catch up), so bound from the start.
    assert stamps[-1] - before >= 4 / 200 * 0.9
    assert all(d["delta"]["type"] == "text_delta" for d in deltas)


def test_without_stamp_deltas_carry_no_send_time(
    client: httpx.Client, make_body: Body, sse: Sse
) -> None:
    """Stamping is off by default: delta events are exactly the upstream's shape."""
    events = sse(client.post("/messages", json=make_body("Go", stream=True)).text)
    deltas = [data for name, data in events if name == "content_block_delta"]
    assert deltas
    assert all(set(d) == {"type", "index", "delta"} for d in deltas)
