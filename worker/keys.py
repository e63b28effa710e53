"""Every Redis key and channel name, in one place. All start with the configured prefix.

Pub/sub ignores the database number, so channels carry the prefix too.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = "llmw"

    def events(self, job_id: str) -> str:
        """Redis Stream of every event of the job (field ``data``), replayable."""
        return f"{self.prefix}:events:{job_id}"

    def channel(self, job_id: str) -> str:
        """Pub/sub channel with the same events, live."""
        return f"{self.prefix}:channel:{job_id}"

    @property
    def results_channel(self) -> str:
        """Pub/sub channel of every job's terminal event."""
        return f"{self.prefix}:results"

    def job(self, job_id: str) -> str:
        """Hash: state, attempts, timestamps, model, usage, error."""
        return f"{self.prefix}:job:{job_id}"

    def result(self, job_id: str) -> str:
        """String: the final message JSON."""
        return f"{self.prefix}:result:{job_id}"

    @property
    def cancels_channel(self) -> str:
        """Pub/sub channel of cancellation requests for running jobs (message: the job id)."""
        return f"{self.prefix}:cancels"

    def submitted_counts(self, queue: str) -> str:
        """Hash: jobs ever submitted to ``queue``, by model (producers add, workers export)."""
        return f"{self.prefix}:submitted:{queue}"

    def outbox(self, queue: str) -> str:
        """Sorted set of the jobs of ``queue`` whose message the broker has not confirmed yet
        (a broker other than the results Redis); score: when a sweeper may publish it again
        (Redis server time, epoch seconds). See :mod:`worker.client.outbox`."""
        return f"{self.prefix}:outbox:{queue}"

    def outbox_lock(self, queue: str) -> str:
        """String: held by the one worker that sweeps ``queue``'s outbox this tick."""
        return f"{self.prefix}:outbox_lock:{queue}"

    def outbox_message(self, job_id: str) -> str:
        """String: the message of a job in an outbox (JSON ``{"payload", "priority"}``), kept
        until the broker confirmed it; expires with the queued job's record."""
        return f"{self.prefix}:outbox_message:{job_id}"

    def batch(self, batch_id: str) -> str:
        """Hash of one Message Batch (gateway): created_at, expires_at, count, cancel time."""
        return f"{self.prefix}:batch:{batch_id}"

    def batch_items(self, batch_id: str) -> str:
        """List of a batch's custom_ids in request order (their jobs' ids derive from them)."""
        return f"{self.prefix}:batch:{batch_id}:items"

    def batch_counts(self, batch_id: str) -> str:
        """Hash of one Message Batch's ended requests: a count per terminal job state
        (``completed``, ``failed``, ``cancelled``, ``expired``), ``ended_at`` (the last end)
        and ``total`` (its requests). The job's end adds to it in the same Lua step.

        The batch id comes last on purpose: ``finish.lua`` and ``cancel.lua`` build this name
        as ``batch_counts("")`` followed by the job hash's ``batch`` field.
        """
        return f"{self.prefix}:batch_counts:{batch_id}"

    def tenant_batches(self, tenant: str) -> str:
        """Sorted set of one tenant's batch ids by creation time, for its list."""
        return f"{self.prefix}:batches:{tenant}"

    @property
    def dead_letters(self) -> str:
        """Stream of jobs that could not be run, with the reason and the payload."""
        return f"{self.prefix}:dlq"

    def limiter(self, limit_key: str, kind: str) -> str:
        """Rate limiter state of one limit key (a model name, or ``default``).

        ``kind`` is ``requests`` (sorted set: slot expiry by reservation id), ``input`` and
        ``output`` (hashes: token bucket ``level``, ``updated_s``), ``leases`` (sorted set:
        lease expiry by reservation id) or ``cooldown`` (string: server time it ends).
        The limit key is a hash tag, so one key's state lives in one Redis Cluster slot.
        """
        return f"{self.prefix}:limiter:{{{limit_key}}}:{kind}"

    def usage(self, tenant: str, day: str) -> str:
        """Hash of one tenant's usage on one UTC day (``YYYY-MM-DD``): per model,
        ``<model>|jobs``, ``<model>|input_tokens``, ``<model>|output_tokens``,
        ``<model>|cost_pusd`` (exact, integer pico-dollars) and ``<model>|cost_usd`` (the same,
        as a float). Jobs without a tenant count under tenant ``""``. The job's end adds to it
        in the same Lua step."""
        return f"{self.prefix}:usage:{tenant}:{day}"

    def spend(self, tenant: str, period: str) -> str:
        """String: a tenant's spend in one UTC day (``YYYY-MM-DD``) or month (``YYYY-MM``), in
        integer pico-dollars, added by the job's end; what budgets are checked against."""
        return f"{self.prefix}:spend:{tenant}:{period}"

    def tenant_queued(self, tenant: str) -> str:
        """Sorted set of one tenant's queued jobs (member: the job hash key; score: when that
        record would expire), for its quota (TENANT_MAX_QUEUED). ``submit.lua`` adds a job,
        the step that takes it off ``queued`` (``claim.lua``, ``cancel.lua``,
        ``finish.lua``) removes it; members past their score are records that expired."""
        return f"{self.prefix}:tenant_queued:{tenant}"


#: kombu's separator in the names of a queue's extra lists (``{queue}\x06\x16{priority}``).
QUEUE_SEP = "\x06\x16"


@dataclass(frozen=True, slots=True)
class TrafficKeys:
    """A queue's traffic-class structures on the broker Redis (see docs/traffic-classes.md).

    They belong to the queue, not to the key prefix: the broker's consumer
    (``worker/lua/fetch.lua``, which builds the same names from :attr:`base`) files every
    message of the queue's kombu lists into them and serves them in priority, then tenant,
    order.
    """

    queue: str

    @property
    def base(self) -> str:
        return f"{self.queue}{QUEUE_SEP}traffic"

    def waiting(self, priority: int, tenant: str | None) -> str:
        """List of one tenant's waiting messages at one priority (LPUSH new, RPOP next);
        the tenant ``""`` is jobs without one."""
        return f"{self.base}{QUEUE_SEP}q{QUEUE_SEP}{priority}{QUEUE_SEP}{tenant or ''}"

    def turns(self, priority: int) -> str:
        """Sorted set of the tenants with waiting messages at one priority, scored by virtual
        time: the lowest is served next, then moves on by 1 / its weight."""
        return f"{self.base}{QUEUE_SEP}turns{QUEUE_SEP}{priority}"

    @property
    def clock(self) -> str:
        """Hash: ``v<p>`` the virtual time of priority ``p`` (a tenant that starts waiting
        starts there), ``since<p>`` when priority ``p`` was last served (or began waiting)."""
        return f"{self.base}{QUEUE_SEP}clock"
