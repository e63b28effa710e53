"""Settings of the fake Anthropic-compatible upstream.

Frozen value objects, built by the CLI (``llm-worker simulate``) or by a test, and
passed down to :func:`worker.simulator.app.create_app`. Nothing here reads the
environment. :meth:`FaultMix.from_json` and :meth:`RateLimits.from_json` parse the CLI's
``--faults`` / limit options and raise ValueError with a message fit for the user.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

# Every fault kind, in the order the fault mix lays its probabilities end to end (so the
# same seed picks the same kinds). Status faults answer before any byte of the body;
# mid-stream faults act after about half of the answer's deltas. See worker.simulator.faults.
FAULT_KINDS: tuple[str, ...] = (
    "429",  # rate_limit_error with retry-after / retry-after-ms
    "500",  # api_error
    "502",  # api_error
    "503",  # api_error
    "529",  # overloaded_error
    "reset",  # connection dropped before any response
    "cut",  # stream cut mid-answer, no message_stop
    "error_event",  # `event: error` (overloaded_error) mid-stream, then the end
    "malformed",  # a data line of broken JSON mid-stream, then the end
    "stall",  # silence for stall_s mid-stream, then the rest
    "slow",  # one delta every slow_gap_s; completes
    "pings",  # before the first delta, only pings (every PING_GAP_S) for stall_s; then the rest
)
_FAULT_PARAMS = ("retry_after_s", "stall_s", "slow_gap_s")


@dataclass(frozen=True, slots=True)
class FaultMix:
    """Probability of each fault kind per request, and the faults' timing.

    ``rates`` maps kinds of :data:`FAULT_KINDS` to probabilities in 0..1 whose sum is at
    most 1; the rest is the chance of no fault. It is stored as a tuple of pairs in
    :data:`FAULT_KINDS` order, so a mix is hashable and draws are reproducible.
    ``retry_after_s`` is the injected 429's retry-after, ``stall_s`` the silence of a stall,
    ``slow_gap_s`` the gap between deltas of a slow answer.
    """

    rates: Mapping[str, float] | tuple[tuple[str, float], ...] = ()
    retry_after_s: float = 1.0
    stall_s: float = 30.0
    slow_gap_s: float = 0.5

    def __post_init__(self) -> None:
        given = dict(self.rates)
        for kind, rate in given.items():
            if kind not in FAULT_KINDS:
                raise ValueError(f"unknown fault kind {kind!r}; expected one of {FAULT_KINDS}")
            if isinstance(rate, bool) or not isinstance(rate, int | float):
                raise ValueError(f"fault rate for {kind!r} must be a number, got {rate!r}")
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"fault rate for {kind!r} must be within 0..1, got {rate}")
        total = math.fsum(given.values())
        if total > 1.0 + 1e-9:
            raise ValueError(f"fault rates must sum to at most 1, got {total:g}")
        for name in _FAULT_PARAMS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if not 0 <= value < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if self.slow_gap_s <= 0:
            raise ValueError(f"slow_gap_s must be > 0, got {self.slow_gap_s}")
        ordered = tuple((k, float(given[k])) for k in FAULT_KINDS if given.get(k, 0.0) > 0)
        object.__setattr__(self, "rates", ordered)

    @classmethod
    def from_json(cls, text: str, **params: float) -> FaultMix:
        """Parse ``{"429": 0.1, "reset": 0.01}``; ``params`` set the timing fields.

        The object may also carry ``retry_after_s``, ``stall_s`` and ``slow_gap_s``;
        keyword arguments win over them.
        """
        raw = _json_object(text, "fault mix", example='{"429": 0.1, "500": 0.05}')
        timing = {name: raw.pop(name) for name in _FAULT_PARAMS if name in raw}
        return cls(rates=raw, **(timing | params))

    @property
    def enabled(self) -> bool:
        """Whether any kind has a non-zero rate."""
        return bool(self.rates)


@dataclass(frozen=True, slots=True)
class RateLimits:
    """The simulator's own limits over a sliding ``window_s``; None means unlimited.

    ``rpm`` caps the requests admitted in any window, ``tpm`` their tokens (the prompt's
    input tokens plus the answer's output tokens).
    """

    rpm: int | None = None
    tpm: int | None = None
    window_s: float = 60.0

    def __post_init__(self) -> None:
        for name in ("rpm", "tpm"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        window = self.window_s
        if isinstance(window, bool) or not isinstance(window, int | float):
            raise ValueError(f"window_s must be a number, got {window!r}")
        if not 0 < window < math.inf:
            raise ValueError(f"window_s must be a finite number > 0, got {window}")

    @classmethod
    def from_json(cls, text: str) -> RateLimits:
        """Parse ``{"rpm": 50, "tpm": 40000, "window_s": 60}`` (every key optional)."""
        raw = _json_object(text, "rate limits", example='{"rpm": 50, "tpm": 40000}')
        unknown = sorted(set(raw) - {"rpm", "tpm", "window_s"})
        if unknown:
            raise ValueError(f"unknown rate limit {unknown[0]!r}; expected rpm, tpm, window_s")
        return cls(**raw)

    @property
    def enabled(self) -> bool:
        """Whether any limit applies."""
        return self.rpm is not None or self.tpm is not None


def _json_object(text: str, what: str, *, example: str) -> dict[str, Any]:
    try:
        raw = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"{what} is not valid JSON ({exc}); expected e.g. {example}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{what} must be a JSON object, e.g. {example}")
    return raw


@dataclass(frozen=True, slots=True)
class SimulatorConfig:
    """How the simulator listens, authenticates, paces and generates.

    ``api_key=None`` (or empty) accepts any non-empty token. ``tokens_per_s=0`` sends every token as
    fast as possible (no sleeps after the first token). ``min_tokens``/``max_tokens`` bound
    the natural length of an answer before the request's own ``max_tokens`` cap.
    ``ping_every=0`` sends only the ping that follows ``message_start``.
    """

    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    seed: int = 0
    ttft_s: float = 0.05
    tokens_per_s: float = 0.0
    min_tokens: int = 20
    max_tokens: int = 60
    ping_every: int = 0
    stats_log_size: int = 100_000
    faults: FaultMix = field(default_factory=FaultMix)
    rate_limits: RateLimits = field(default_factory=RateLimits)
    #: Models served; a request for another gets a 400, as the real provider answers. Empty = any.
    models: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be within 0..65535, got {self.port}")
        if self.ttft_s < 0 or self.tokens_per_s < 0:
            raise ValueError("ttft_s and tokens_per_s must not be negative")
        if not 1 <= self.min_tokens <= self.max_tokens:
            raise ValueError("need 1 <= min_tokens <= max_tokens")
        if self.ping_every < 0:
            raise ValueError("ping_every must not be negative")
