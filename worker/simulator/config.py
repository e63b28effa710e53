"""Settings of the fake Anthropic-compatible upstream.

One frozen value object, built by the CLI (``llm-worker simulate``) or by a test, and
passed down to :func:`worker.simulator.app.create_app`. Nothing here reads the
environment.

The fault mix and rate limits are reserved for a later change: their fields exist so that
callers can already be written against the final shape, and the request handler has a
single "fault decision" step (:func:`worker.simulator.app.decide_fault`) where they will
be consulted. Today that step never injects anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Fault kinds the later fault mix will understand; listed here so names are settled once.
FAULT_KINDS: frozenset[str] = frozenset(
    {
        "rate_limited",  # 429 with retry-after
        "server_error",  # 500
        "bad_gateway",  # 502
        "unavailable",  # 503
        "overloaded",  # 529 overloaded_error
        "reset",  # connection reset before the response
        "cut",  # stream cut mid-answer
        "error_event",  # `event: error` mid-stream
        "malformed",  # malformed SSE
        "stall",  # stream stops sending but stays open
        "drip",  # very slow token drip
    }
)


@dataclass(frozen=True, slots=True)
class FaultMix:
    """Probability of each fault kind per request (reserved; not applied yet)."""

    rates: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        for kind, rate in self.rates:
            if kind not in FAULT_KINDS:
                raise ValueError(f"unknown fault kind {kind!r}")
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"fault rate for {kind!r} must be within 0..1, got {rate}")


@dataclass(frozen=True, slots=True)
class RateLimits:
    """The simulator's own limits (reserved; not applied yet). None means unlimited."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None


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

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be within 0..65535, got {self.port}")
        if self.ttft_s < 0 or self.tokens_per_s < 0:
            raise ValueError("ttft_s and tokens_per_s must not be negative")
        if not 1 <= self.min_tokens <= self.max_tokens:
            raise ValueError("need 1 <= min_tokens <= max_tokens")
        if self.ping_every < 0:
            raise ValueError("ping_every must not be negative")
