"""The worker's side of the job store: claim and leases, events, the end, dead letters.

Every multi-key change that must be atomic is one Lua script (``worker/lua/``); events are
written through :mod:`worker.runtime.group_commit`, so that concurrent jobs share a round trip.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import orjson
import redis
import structlog

from worker import events as ev
from worker.accounting.pricing import USAGE_RETENTION_S
from worker.connections.clients import ReplicaAck, ReplicationShort, execute_pipeline
from worker.errors import LLMWorkerError
from worker.keys import Keys
from worker.runtime.group_commit import GroupCommitter, Pending
from worker.store import (
    JobStore,
    bounded_payload,
    ending_script,
    load_lua,
    queued_key,
    text,
)

log = structlog.get_logger("worker.runtime.job_store")


@dataclass(frozen=True, slots=True)
class Claim:
    """What a worker learns when it takes a delivered job."""

    #: queued, running (taken over from a worker that died), missing, a terminal state,
    #: ``leased`` (a live worker runs it) or ``poison`` (past the delivery limit).
    state_before: str
    deliveries: int
    attempts: int
    last_seq: int
    cancel_requested: bool
    deadline_at: float | None
    #: For ``leased``: how long the current holder's lease still runs.
    lease_wait_s: float = 0.0
    #: No worker had started the job before this claim (time in queue is measured once).
    first_start: bool = False
    #: The type of the job's last event (``chunk``: a worker died mid-stream).
    last_event_type: str = ""
    #: The claim also started the next attempt (its ``started`` event is written, and
    #: ``attempts`` and ``last_seq`` include it); see ``start_attempt``.
    started: bool = False
    #: The stream id of the ``started`` event this claim wrote ('' when it wrote none).
    started_id: str = ""

    @property
    def already_ended(self) -> bool:
        return self.state_before in ev.TERMINAL_TYPES


@dataclass(frozen=True, slots=True)
class Spend:
    """What one ended job adds to its tenant's usage counters (``Keys.usage``, ``Keys.spend``):
    the model that answered, its final usage's tokens and the exact cost."""

    tenant: str
    model: str
    day: str
    month: str
    input_tokens: int
    output_tokens: int
    cost_pusd: int


def claim_call(
    keys: Keys,
    job_id: str,
    *,
    worker: str,
    model: str,
    ttl_s: int,
    token: str,
    lease_ttl_s: float,
    max_deliveries: int,
    start_attempt: bool,
    result_ttl_s: int,
    submitted_at: float | None = None,
    deadline_at: float | None = None,
    held_in: str | None = None,
) -> tuple[list[str], list[Any]]:
    """``claim.lua``'s keys and arguments (see :meth:`WorkerStore.claim`). ``held_in``: an
    outbox key; the claim then takes only a queued job whose message that outbox holds (the
    gateway's fast path, whose claim is sent with the submit: see
    :mod:`worker.gateway.fast_path`), and the job's end takes the message out of it."""
    return (
        [keys.job(job_id), keys.events(job_id), keys.channel(job_id)],
        [
            time.time(),
            worker,
            model,
            ttl_s,
            token,
            int(lease_ttl_s * 1000),
            max_deliveries,
            1 if start_attempt else 0,
            job_id,
            result_ttl_s,
            "" if submitted_at is None else submitted_at,
            "" if deadline_at is None else deadline_at,
            queued_key(keys, job_id),
            held_in or "",
            keys.outbox_message(job_id) if held_in else "",
        ],
    )


def parse_claim(raw: list[Any]) -> Claim:
    """``claim.lua``'s reply as a :class:`Claim`."""
    state, deliveries, attempts, seq, cancel, deadline, wait_ms = raw[:7]
    deadline_text = text(deadline)
    return Claim(
        state_before=text(state),
        deliveries=int(deliveries),
        attempts=int(attempts),
        last_seq=int(seq),
        cancel_requested=bool(int(cancel)),
        deadline_at=float(deadline_text) if deadline_text else None,
        lease_wait_s=int(wait_ms) / 1000,
        first_start=len(raw) > 7 and bool(int(raw[7])),
        last_event_type=text(raw[8]) if len(raw) > 8 else "",
        started=len(raw) > 9 and bool(int(raw[9])),
        started_id=text(raw[10]) if len(raw) > 10 else "",
    )


class LeaseLost(LLMWorkerError):
    """Another worker holds this job's lease now: this one lost it without knowing (frozen
    past its TTL) and may neither extend nor end the job."""


def is_lease_lost(exc: BaseException) -> bool:
    """True for :class:`LeaseLost` and for an event write that ``append.lua`` refused."""
    if isinstance(exc, LeaseLost):
        return True
    return isinstance(exc, redis.ResponseError) and str(exc).startswith("LEASE_LOST")


class WorkerStore(JobStore):
    """:class:`~worker.store.JobStore` with what only a worker does to a job."""

    def __init__(
        self,
        client: redis.Redis[bytes],
        keys: Keys,
        *,
        result_ttl_s: int,
        dead_letters_max: int = 10_000,
        dead_letter_payload_bytes: int = 65_536,
        replica_ack: ReplicaAck | None = None,
        publish_linger_s: float = 0.0,
        shared_round_trips: bool = True,
    ) -> None:
        """``shared_round_trips``: the claim and the end go through the group committer, as
        the events do (a worker's hundreds of jobs share their round trips: 5-7% less CPU per
        streamed job in the burst benchmark); False: each is its own round trip from the
        calling thread (the gateway's few jobs, where a hand-off to the committer's thread
        would be on the answer's path)."""
        super().__init__(client, keys, result_ttl_s=result_ttl_s, replica_ack=replica_ack)
        #: The dead-letter stream is bounded in entries and in each entry's payload, so its
        #: memory is bounded (Redis runs with noeviction).
        self.dead_letters_max = dead_letters_max
        self.dead_letter_payload_bytes = dead_letter_payload_bytes
        self._claim = client.register_script(load_lua("claim.lua"))
        self._finish = client.register_script(ending_script("finish.lua"))
        self._renew = client.register_script(load_lua("renew.lua"))
        self._release = client.register_script(load_lua("release.lua"))
        self._writer = GroupCommitter(client, linger_s=publish_linger_s)
        self._append_sha = self._writer.script(load_lua("append.lua"))
        self._shared_round_trips = shared_round_trips
        self._claim_sha = self._writer.script(load_lua("claim.lua"))
        self._finish_sha = self._writer.script(ending_script("finish.lua"))

    def claim(
        self,
        job_id: str,
        *,
        worker: str,
        model: str,
        ttl_s: int,
        token: str,
        lease_ttl_s: float,
        max_deliveries: int,
        start_attempt: bool = False,
        submitted_at: float | None = None,
        deadline_at: float | None = None,
    ) -> Claim:
        """Take the job's lease (see ``claim.lua``) unless a live worker holds it.

        With ``start_attempt`` the same step starts the next attempt when nothing stands in
        its way (cancel, deadline, a takeover): one round trip fewer per job.
        ``submitted_at`` and ``deadline_at`` come from the message: a job whose record is gone
        is judged by them (past its deadline, it ends ``expired`` without a call).
        """
        keys, args = claim_call(
            self.keys,
            job_id,
            worker=worker,
            model=model,
            ttl_s=ttl_s,
            token=token,
            lease_ttl_s=lease_ttl_s,
            max_deliveries=max_deliveries,
            start_attempt=start_attempt,
            result_ttl_s=self.result_ttl_s,
            submitted_at=submitted_at,
            deadline_at=deadline_at,
        )
        if self._shared_round_trips:
            return parse_claim(self._shared_call(self._claim_sha, keys, args))
        return parse_claim(self._claim(keys=keys, args=args))

    def _shared_call(self, sha: str, keys: list[str], args: list[Any]) -> Any:
        """One script call in the group committer's next round trip; its reply once stored."""
        return self._writer.write([("EVALSHA", sha, len(keys), *keys, *args)])[0]

    def position(self, job_id: str) -> tuple[int, int]:
        """The job's last event ``seq`` and its attempts so far (0, 0 for an unknown job)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.xrevrange(self.keys.events(job_id), "+", "-", count=1)
        pipe.hget(self.keys.job(job_id), "attempts")
        last, attempts = pipe.execute()
        seq = int(ev.loads(last[0][1][b"data"]).get("seq", 0)) if last else 0
        return seq, int(attempts or 0)

    def renew(self, leases: list[tuple[str, str]], *, lease_ttl_s: float) -> list[int]:
        """Renew ``(job_id, token)`` leases: per job 1 held, 2 held and cancelled, 0 lost."""
        if not leases:
            return []
        raw = self._renew(
            keys=[self.keys.job(job_id) for job_id, _ in leases],
            args=[int(lease_ttl_s * 1000), *(token for _, token in leases)],
        )
        return [int(x) for x in raw]

    def release(self, job_id: str, token: str, *, attempts: int | None = None) -> bool:
        """Give a running job back to the queue (shutdown, a postponement); False if the lease
        was not ours. ``attempts``: what the job hash should count (a postponed attempt that
        never reached the upstream does not)."""
        args = [token, "" if attempts is None else attempts]
        return bool(self._release(keys=[self.keys.job(job_id)], args=args))

    def publish(
        self,
        job_id: str,
        events: list[dict[str, Any]],
        *,
        token: str,
        hash_fields: dict[str, Any] | None = None,
        expire_s: int | None = None,
        pending: Pending | None = None,
        urgent: bool = False,
    ) -> None:
        """Append events to the job's stream and channel while ``token`` holds its lease
        (``append.lua``); returns once they are stored, or at once with ``pending`` (the job
        settles it before its end; ``urgent``: without the publishing linger). A writer that
        lost the lease gets a ``LEASE_LOST``
        :class:`redis.ResponseError` (:func:`is_lease_lost`), now or when it settles.

        The round trip is shared with every other job of the process that writes at the same
        time (:mod:`worker.runtime.group_commit`).
        """
        k = self.keys
        flat = [part for item in (hash_fields or {}).items() for part in item]
        command = (
            "EVALSHA",
            self._append_sha,
            3,
            k.job(job_id),
            k.events(job_id),
            k.channel(job_id),
            token,
            "" if expire_s is None else expire_s,
            len(flat) // 2,
            *flat,
            *(ev.dumps(event) for event in events),
        )
        if pending is None:
            self._writer.write([command])
        else:
            pending.add(self._writer.post([command], urgent=urgent))

    def finish(
        self,
        job_id: str,
        event: dict[str, Any],
        *,
        message: dict[str, Any] | None = None,
        usage: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
        stop_reason: str | None = None,
        dead_letter: tuple[str, Any] | None = None,
        token: str = "",
        answered_by: str | None = None,
        cost_usd: str | None = None,
        spend: Spend | None = None,
    ) -> bool:
        """Write the terminal event and state; False when the job had ended already.

        ``dead_letter`` is ``(reason, payload)``: kept in the dead-letter stream in the same
        step when this call ends the job. With ``token`` (the writer's lease), raises
        :class:`LeaseLost` when another worker holds the job's lease now. ``answered_by`` and
        ``cost_usd`` go to the job hash; ``spend`` is added to its tenant's day usage and
        spend counters in the same step (so it is counted exactly once).
        """
        k = self.keys
        keys = [k.job(job_id), k.events(job_id), k.channel(job_id), k.results_channel]
        keys += [k.result(job_id), k.dead_letters]
        dlq_args: list[Any] = ["", "", ""]
        if dead_letter is not None:
            reason, payload = dead_letter
            payload_data = bounded_payload(payload, self.dead_letter_payload_bytes)
            dlq_args = [reason, payload_data, self.dead_letters_max]
        spend_args: list[Any] = ["", "", "", "", ""]  # read only with the usage keys
        if spend is not None:
            keys += [
                k.usage(spend.tenant, spend.day),
                k.spend(spend.tenant, spend.day),
                k.spend(spend.tenant, spend.month),
            ]
            spend_args = [
                spend.model,
                spend.input_tokens,
                spend.output_tokens,
                spend.cost_pusd,
                USAGE_RETENTION_S,
            ]
        ended = self._end(
            job_id,
            keys,
            [
                event["type"],
                ev.dumps(event),
                orjson.dumps(message) if message is not None else "",
                self.result_ttl_s,
                time.time(),
                orjson.dumps(usage) if usage is not None else "",
                orjson.dumps(error) if error is not None else "",
                stop_reason or "",
                token,
                k.batch_counts(""),
                job_id,
                *dlq_args,
                answered_by or "",
                cost_usd or "",
                *spend_args,
                queued_key(self.keys, job_id),
            ],
        )
        if int(ended) == -1:
            raise LeaseLost(job_id)
        return bool(ended)

    def _end(self, job_id: str, keys: list[str], args: list[Any]) -> Any:
        """Run ``finish.lua``; with REDIS_MIN_REPLICAS_ACK, then wait for the replicas. The
        job has ended either way: a short wait is logged, not raised (the end is on the
        master; failing the job for it would be wrong)."""
        if not self.replica_ack:
            if self._shared_round_trips:
                return self._shared_call(self._finish_sha, keys, args)
            return self._finish(keys=keys, args=args)

        def fill(pipe: Any) -> None:
            self._finish(keys=keys, args=args, client=pipe)
            self.replica_ack.add(pipe)

        results = execute_pipeline(self.redis, fill)
        try:
            self.replica_ack.check(results, f"the end of job {job_id!r}")
        except ReplicationShort as exc:
            log.warning("job_end_not_replicated", job_id=job_id, acked=exc.acked, wanted=exc.wanted)
        return results[0]

    def dead_letter(self, *, job_id: str, reason: str, payload: Any) -> None:
        """Keep what could not be run, with why, for ``llm-worker dlq``."""
        self.redis.xadd(
            self.keys.dead_letters,
            {
                "job_id": job_id,
                "reason": reason,
                "payload": bounded_payload(payload, self.dead_letter_payload_bytes),
                "ts": str(time.time()),
            },
            maxlen=self.dead_letters_max,
            approximate=True,
        )
