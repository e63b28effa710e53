"""Where model fallbacks are decided (pure): which models a job may try, in which order, and
when the next attempt moves to the next one.

A job's chain is its model followed by its fallbacks (the job's own ``fallback_models``, else
``FALLBACKS[model]``), each checked once when the job starts (:func:`plan_chain`): a fallback
the catalogue does not allow, or whose ``max_tokens`` maximum the request exceeds, is left out
(the runner logs each). After ``FALLBACK_AFTER_ATTEMPTS`` failures that say the model is in
trouble (:func:`counts_toward_fallback`) on one model, the next attempt goes to the next model
(:func:`after_failure`); a model under a rate-limit cooldown is left at once when a later
model exists (:func:`skip_model`). Attempts on every model count toward ``MAX_ATTEMPTS``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from worker.catalogue import ModelCatalogue
from worker.errors import UpstreamError

#: A 429 whose ``retry-after`` asks for at least this long says the model will not serve us
#: soon: it counts toward a fallback. A shorter one is worth waiting out on the same model.
LONG_RETRY_AFTER_S = 5.0
#: ``error`` events inside a 200 stream that say the model (not the connection) is in trouble.
MODEL_STREAM_ERRORS = frozenset({"overloaded_error", "api_error"})


def counts_toward_fallback(exc: UpstreamError) -> bool:
    """True for a retryable failure that blames the model: a 5xx (529 included), a 429 with a
    long ``retry-after``, or an overloaded/api error event mid-stream. Network cuts, timeouts,
    malformed streams, 408/409 and short 429s are retried on the same model."""
    if not exc.retryable:
        return False
    if exc.reason == "stream_error_event":
        return exc.error_type in MODEL_STREAM_ERRORS
    code = exc.status_code
    if code == 429:
        return exc.retry_after_s is not None and exc.retry_after_s >= LONG_RETRY_AFTER_S
    return code is not None and code >= 500 and code != 501


@dataclass(frozen=True, slots=True)
class Skipped:
    """A fallback left out of a job's chain, and why (``not_allowed`` or ``max_tokens``)."""

    model: str
    reason: str
    detail: str


def plan_chain(
    model: str, fallbacks: Iterable[str], *, catalogue: ModelCatalogue, max_tokens: int
) -> tuple[tuple[str, ...], tuple[Skipped, ...]]:
    """The models a job may try, in order (its own first), and the fallbacks left out.

    Aliases become their model; a model named twice is tried once."""
    chain = [model]
    skipped: list[Skipped] = []
    for name in fallbacks:
        candidate = catalogue.canonical(name)
        if candidate in chain:
            continue
        if not catalogue.allows(candidate):
            skipped.append(
                Skipped(candidate, "not_allowed", "not in the catalogue or ALLOWED_MODELS")
            )
            continue
        limit = catalogue.max_tokens(candidate)
        if max_tokens > limit:
            skipped.append(
                Skipped(
                    candidate,
                    "max_tokens",
                    f"the request's max_tokens ({max_tokens}) exceeds its maximum ({limit})",
                )
            )
            continue
        chain.append(candidate)
    return tuple(chain), tuple(skipped)


@dataclass(frozen=True, slots=True)
class FallbackState:
    """Where a job stands in its chain: the model of its next attempt and how many failures
    that model has had that count toward a fallback."""

    chain: tuple[str, ...]
    index: int = 0
    failures: int = 0

    @property
    def model(self) -> str:
        return self.chain[self.index]

    @property
    def has_next(self) -> bool:
        return self.index + 1 < len(self.chain)

    @classmethod
    def resume(cls, chain: tuple[str, ...], model: str | None) -> FallbackState:
        """The state of a job taken up again (redelivered) whose last attempt went to
        ``model``; its failure count starts over."""
        if model and model in chain:
            return cls(chain, chain.index(model))
        return cls(chain)


def after_failure(
    state: FallbackState, exc: UpstreamError, *, after_attempts: int
) -> FallbackState:
    """The state for the attempt after ``exc``: the next model once the current one has had
    ``after_attempts`` failures that count toward a fallback, else the same model."""
    if not counts_toward_fallback(exc):
        return state
    failures = state.failures + 1
    if failures >= after_attempts and state.has_next:
        return FallbackState(state.chain, state.index + 1, 0)
    return replace(state, failures=failures)


def honours_retry_after(before: FallbackState, after: FallbackState, exc: UpstreamError) -> bool:
    """Whether the wait before the next attempt honours ``exc``'s ``retry-after``: not when
    that attempt goes to another model (the wait was the old model's), nor when a later model
    exists and the wait is long (the next attempt then meets the model's cooldown and moves
    on at once, or fails again and counts toward the switch)."""
    if after.model != before.model:
        return False
    long_wait = exc.retry_after_s is not None and exc.retry_after_s >= LONG_RETRY_AFTER_S
    return not (before.has_next and long_wait and counts_toward_fallback(exc))


def skip_model(state: FallbackState) -> FallbackState | None:
    """The next model at once (the current one is cooling down), or None when it is the last."""
    if not state.has_next:
        return None
    return FallbackState(state.chain, state.index + 1, 0)
