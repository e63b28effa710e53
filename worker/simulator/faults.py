"""Which fault a request gets, and how a fault rewrites a stream's frame plan: no I/O.

A request gets a fault in one of two ways:

- forced, by its directive: ``[[sim fault=KIND]]`` every time, or
  ``[[sim fault=KIND fault_times=N]]`` for the first N requests with the same prompt
  (same :func:`~worker.simulator.textgen.request_digest`), then never again; with
  ``fault_model=MODEL`` only requests for that model get it (a model that is down while
  the others answer);
- drawn from :class:`~worker.simulator.config.FaultMix`: one ``random()`` per request from
  a generator seeded with the config seed, so the same seed and the same order of
  requests give the same faults. A request with a directive draws nothing.

The no-fault path costs nothing when the mix is empty: no draw, no digest.

What a fault does (the app carries it out):

- ``429 500 502 503 529``: an error status before any body (429 carries ``retry-after``);
- ``reset``: the connection is dropped before any response;
- ``cut`` / ``error_event`` / ``malformed`` / ``stall``: the stream is rewritten after
  about half of its deltas (at least one) by :func:`rewrite_plan`;
- ``slow``: the answer is paced at one delta per ``slow_gap_s``.

On a non-streamed request, ``cut`` sends half of the JSON body under the full
content-length and closes; ``malformed`` sends a truncated JSON body (200, consistent
length); ``error_event`` answers 529 ``overloaded_error``; ``stall`` holds the response
``stall_s`` longer; ``slow`` waits as long as the slow stream would take.
- ``pings``: a stream sends ``message_start``, then only ``ping`` events for ``stall_s``
  (every ``PING_GAP_S``), then its answer: alive by every per-read timeout, so only a
  deadline ends it. A non-streamed answer waits ``stall_s`` longer.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from worker.simulator.config import FAULT_KINDS, FaultMix
from worker.simulator.textgen import DirectiveError
from worker.simulator.wire import PING, Frame, event

# kind -> (status, error type) for the faults that are an error response.
STATUS_FAULTS: Mapping[str, tuple[int, str]] = {
    "429": (429, "rate_limit_error"),
    "500": (500, "api_error"),
    "502": (502, "api_error"),
    "503": (503, "api_error"),
    "529": (529, "overloaded_error"),
}
MID_STREAM_FAULTS: frozenset[str] = frozenset({"cut", "error_event", "malformed", "stall", "pings"})
#: The gap between the ``pings`` fault's pings: a stream alive by every per-read timeout.
PING_GAP_S = 0.5
STATUS_MESSAGES: Mapping[int, str] = {
    429: "Number of requests has exceeded your rate limit (injected by the simulator)",
    500: "Internal server error (injected by the simulator)",
    502: "Bad gateway (injected by the simulator)",
    503: "Service unavailable (injected by the simulator)",
    529: "Overloaded (injected by the simulator)",
}
ERROR_EVENT = event(
    "error",
    {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "Overloaded (injected mid-stream)"},
    },
)
# A delta whose JSON stops in the middle of a string: no decoder can accept it.
MALFORMED_EVENT = (
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":"unterminated\n\n'
)
_DELTA_MARK = b"event: content_block_delta\n"
_END_MARK = b"event: message_delta\n"


@dataclass(frozen=True, slots=True)
class Fault:
    """A fault chosen for one request; ``forced`` when a directive asked for it."""

    kind: str
    forced: bool = False


def choose_kind(rates: tuple[tuple[str, float], ...], draw: float) -> str | None:
    """The kind whose slice of ``[0, 1)`` holds ``draw``, slices laid end to end; else None."""
    edge = 0.0
    for kind, rate in rates:
        edge += rate
        if draw < edge:
            return kind
    return None


def forced_fault(extra: Mapping[str, str]) -> tuple[str, int | None] | None:
    """``(kind, times)`` from a directive's ``fault=`` / ``fault_times=``, or None."""
    kind = extra.get("fault")
    times_raw = extra.get("fault_times")
    if kind is None:
        if times_raw is not None:
            raise DirectiveError("sim directive fault_times= needs fault=")
        if "fault_model" in extra:
            raise DirectiveError("sim directive fault_model= needs fault=")
        return None
    if kind not in FAULT_KINDS:
        raise DirectiveError(f"sim directive fault={kind!r} is not one of {FAULT_KINDS}")
    if times_raw is None:
        return kind, None
    if not times_raw.isdigit() or int(times_raw) < 1:
        raise DirectiveError(f"sim directive fault_times={times_raw!r} must be an integer >= 1")
    return kind, int(times_raw)


class FaultDecider:
    """Picks each request's fault; owns the seeded generator and the fault_times counts."""

    __slots__ = ("_random", "_rates", "_seen")

    def __init__(self, mix: FaultMix, seed: int) -> None:
        self._rates = tuple(dict(mix.rates).items())
        self._random = random.Random(seed)
        self._seen: dict[int, int] = {}

    def decide(
        self, extra: Mapping[str, str], request_key: Callable[[], int], model: str | None = None
    ) -> Fault | None:
        """The fault for a request with directive ``extra``; ``request_key`` is its digest.
        A forced fault with ``fault_model=M`` applies only to requests for model ``M``.

        Raises DirectiveError for a malformed ``fault=`` directive.
        """
        if extra:
            forced = forced_fault(extra)
            only_for = extra.get("fault_model")
            if forced is not None and only_for is not None and only_for != model:
                return None  # a request with a directive draws nothing
            if forced is not None:
                kind, times = forced
                if times is None:
                    return Fault(kind, forced=True)
                key = request_key()
                seen = self._seen.get(key, 0)
                self._seen[key] = seen + 1
                return Fault(kind, forced=True) if seen < times else None
        if not self._rates:
            return None
        return self._draw()

    def _draw(self) -> Fault | None:
        drawn = choose_kind(self._rates, self._random.random())
        return None if drawn is None else Fault(drawn)


def split_plan(frames: list[Frame], deltas_before: int) -> tuple[list[Frame], list[Frame]]:
    """Split a plan just before delta number ``deltas_before`` (0-based).

    A stream with fewer deltas splits before its ``message_delta``, so every delta is
    sent first; frames are cut inside when events share one.
    """
    seen = 0
    for number, frame in enumerate(frames):
        data = frame.data
        at = data.find(_DELTA_MARK)
        while at >= 0:
            if seen == deltas_before:
                return _cut_frame(frames, number, at)
            seen += 1
            at = data.find(_DELTA_MARK, at + len(_DELTA_MARK))
    for number, frame in enumerate(frames):
        at = frame.data.find(_END_MARK)
        if at >= 0:
            return _cut_frame(frames, number, at)
    return frames, []


def _cut_frame(frames: list[Frame], number: int, at: int) -> tuple[list[Frame], list[Frame]]:
    frame = frames[number]
    head = [Frame(frame.at_s, frame.data[:at])] if at else []
    tail = [Frame(frame.at_s, frame.data[at:])]
    return frames[:number] + head, tail + frames[number + 1 :]


def rewrite_plan(
    frames: list[Frame], kind: str, deltas: int, stall_s: float
) -> tuple[list[Frame], bool]:
    """Apply a mid-stream fault to a plan of ``deltas`` deltas.

    Returns the new plan and whether the connection is closed after it (``cut``) rather
    than the body ended cleanly.
    """
    if kind == "pings":  # kept alive, never answering (until stall_s has passed)
        before, after = split_plan(frames, 0)
        at_s = before[-1].at_s if before else 0.0
        count = int(stall_s / PING_GAP_S)
        pings = [Frame(at_s + PING_GAP_S * (n + 1), PING) for n in range(count)]
        return before + pings + [Frame(f.at_s + stall_s, f.data) for f in after], False
    before, after = split_plan(frames, max(1, deltas // 2))
    at_s = before[-1].at_s if before else 0.0
    if kind == "cut":
        return before, True
    if kind == "error_event":
        return [*before, Frame(at_s, ERROR_EVENT)], False
    if kind == "malformed":
        return [*before, Frame(at_s, MALFORMED_EVENT)], False
    if kind == "stall":
        return before + [Frame(f.at_s + stall_s, f.data) for f in after], False
    raise ValueError(f"{kind!r} is not a mid-stream fault")
