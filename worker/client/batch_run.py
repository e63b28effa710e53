"""``llm-worker batch FILE --out RESULTS``: submit a batch file, follow it, write the results.

Resumable by construction: job ids derive from the file's bytes and each ``custom_id``
(:func:`worker.client.batch_file.job_id_for`), and submitting an existing id is a no-op in
Redis, so a rerun after an interruption creates only the jobs the first run never submitted;
the results file keeps every complete line and gets the rest.

Waiting costs little: the results channel names each job as it ends, and a full poll of the
open jobs' states (one pipeline) every ``POLL_S`` catches what pub/sub missed and feeds the
queued/running counts.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

from worker import events as ev
from worker.client import batch_file as b
from worker.client.core import BATCH_PRIORITY, check_traffic_options, qualified_id
from worker.client.sync import Client

SUBMIT_CHUNK = 500
POLL_S = 1.0


@dataclass
class Progress:
    """Counts by state, for the progress bar and the summary."""

    total: int
    counts: Counter[str] = field(default_factory=Counter)

    @property
    def finished(self) -> int:
        return sum(self.counts[kind] for kind in b.RESULT_TYPES)

    def describe(self) -> str:
        shown = ("queued", "running", *b.RESULT_TYPES)
        return "  ".join(f"{kind} {self.counts[kind]}" for kind in shown if self.counts[kind])


@dataclass(frozen=True, slots=True)
class BatchOptions:
    """``--priority``, ``--tenant`` and ``--deadline`` of a batch run (None: the defaults,
    priority 2 and BATCH_DEADLINE_S)."""

    priority: int | None = None
    tenant: str | None = None
    deadline_s: float | None = None


class BatchRun:
    """One run of one batch file against one results file."""

    def __init__(
        self,
        client: Client,
        items: list[b.BatchItem],
        batch_id: str,
        out_path: Path,
        options: BatchOptions | None = None,
    ) -> None:
        self.client = client
        self.items = items
        self.batch_id = batch_id
        self.out_path = out_path
        self.options = options or BatchOptions()
        self.plain_ids = {item.custom_id: b.job_id_for(batch_id, item.custom_id) for item in items}
        # The ids in Redis: a tenant's jobs are ``<tenant>/<id>``.
        self.job_ids = {
            custom_id: qualified_id(self.options.tenant, job_id)
            for custom_id, job_id in self.plain_ids.items()
        }
        self.progress = Progress(total=len(items))
        self.submitted_now = 0

    # -- steps -----------------------------------------------------------------------------

    def recover(self) -> b.Recovered:
        """Keep the complete lines of an earlier run; rewrite the file if any were torn."""
        if not self.out_path.exists():
            return b.Recovered({}, 0, [])
        recovered = b.recover_results(self.out_path.read_bytes(), self.job_ids)
        if recovered.foreign:
            raise BatchOutputMismatch(self.out_path, recovered.foreign)
        if recovered.dropped:
            tmp = self.out_path.with_name(self.out_path.name + ".tmp")
            tmp.write_bytes(b"".join(recovered.done.values()))
            os.replace(tmp, self.out_path)
        for line in recovered.done.values():
            self.progress.counts[orjson.loads(line)["result"]["type"]] += 1
        return recovered

    def submit(self, pending: list[b.BatchItem]) -> None:
        """Submit what is not done; ids that exist already (an earlier run's) are no-ops."""
        queue_counts = self.client.keys.submitted_counts(self.client.settings.queue)
        before = _total(self.client.redis.hgetall(queue_counts))
        for start in range(0, len(pending), SUBMIT_CHUNK):
            chunk = pending[start : start + SUBMIT_CHUNK]
            self.client.submit_many(
                [item.params for item in chunk],
                job_ids=[self.plain_ids[item.custom_id] for item in chunk],
                metadata=[{"batch_id": self.batch_id, "custom_id": i.custom_id} for i in chunk],
                priority=self.options.priority,
                tenant=self.options.tenant,
                deadline_s=self.options.deadline_s or self.client.settings.batch_deadline_s,
                default_priority=BATCH_PRIORITY,
            )
        # Other producers may add to the same counter; this is for the summary only.
        self.submitted_now = max(0, _total(self.client.redis.hgetall(queue_counts)) - before)

    def collect(self, pending: list[b.BatchItem], out: IO[bytes], on_change: Any) -> None:
        """Wait for every pending job to end, appending each result as it does."""
        open_ids = {self.job_ids[item.custom_id]: item.custom_id for item in pending}
        pubsub = self.client.redis.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(self.client.keys.results_channel)
        try:
            next_poll = 0.0
            while open_ids:
                ended: set[str] = set()
                if time.monotonic() >= next_poll:
                    ended |= self._poll_states(open_ids)
                    next_poll = time.monotonic() + POLL_S
                message = pubsub.get_message(timeout=min(POLL_S, 0.2))
                while message is not None:
                    job_id = _job_id_of(message.get("data"))
                    if job_id in open_ids:
                        ended.add(job_id)
                    message = pubsub.get_message(timeout=0)
                self._write_results(ended & open_ids.keys(), open_ids, out)
                on_change(self.progress)
        finally:
            pubsub.close()

    # -- Redis -------------------------------------------------------------------------------

    def _poll_states(self, open_ids: dict[str, str]) -> set[str]:
        ids = list(open_ids)
        pipe = self.client.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hget(self.client.keys.job(job_id), "state")
        states = [s.decode() if s else None for s in pipe.execute()]
        live = Counter(s for s in states if s in {ev.QUEUED, ev.RUNNING})
        self.progress.counts["queued"] = live[ev.QUEUED]
        self.progress.counts["running"] = live[ev.RUNNING]
        missing = [job_id for job_id, s in zip(ids, states, strict=True) if s is None]
        if missing:
            # Jobs vanish only when their results expire (RESULT_TTL_S) before being read.
            raise BatchJobsVanished(missing)
        return {job_id for job_id, s in zip(ids, states, strict=True) if b.result_type(s)}

    def _write_results(
        self, ended: Iterable[str], open_ids: dict[str, str], out: IO[bytes]
    ) -> None:
        ended = list(ended)
        if not ended:
            return
        pipe = self.client.redis.pipeline(transaction=False)
        for job_id in ended:
            pipe.hmget(self.client.keys.job(job_id), ["state", "error"])
            pipe.get(self.client.keys.result(job_id))
        replies = pipe.execute()
        for index, job_id in enumerate(ended):
            state, error = replies[2 * index]
            stored = replies[2 * index + 1]
            result = b.batch_result(
                state.decode() if state else None,
                orjson.loads(stored) if stored else None,
                orjson.loads(error) if error else None,
                upstream=self.client.settings.upstream_name,
            )
            if result is None:
                continue
            out.write(b.result_line(open_ids.pop(job_id), result))
            self.progress.counts[result["type"]] += 1
        # One flush per round: a kill loses at most the lines of this round, never a whole
        # line's worth of corruption (recover() drops a torn tail).
        out.flush()


def _total(counts: dict[Any, Any]) -> int:
    return sum(int(v) for v in counts.values())


def _job_id_of(data: Any) -> str | None:
    try:
        value = orjson.loads(data)
    except (orjson.JSONDecodeError, TypeError):
        return None
    job_id = value.get("job_id") if isinstance(value, dict) else None
    return job_id if isinstance(job_id, str) else None


class BatchOutputMismatch(Exception):
    """The results file holds results of another batch."""

    def __init__(self, path: Path, foreign: list[str]) -> None:
        shown = ", ".join(foreign[:5]) + (" …" if len(foreign) > 5 else "")
        super().__init__(
            f"{path} holds results for {len(foreign)} custom_id(s) not in this batch file "
            f"({shown}); it belongs to another batch: choose another --out"
        )


class BatchJobsVanished(Exception):
    """Jobs of the batch are gone from Redis before their results were written."""

    def __init__(self, job_ids: list[str]) -> None:
        self.job_ids = job_ids
        super().__init__(
            f"{len(job_ids)} job(s) of this batch are no longer in Redis (results expire after "
            f"RESULT_TTL_S), e.g. {job_ids[0]}; rerun to submit them again"
        )


def _options_ok(err: Any, opts: BatchOptions) -> bool:
    problems = check_traffic_options(opts.priority, opts.tenant, opts.deadline_s, None, "--")
    for problem in problems:
        err.print(f"llm-worker batch: {problem['loc']}: {problem['msg']}", markup=False)
    return not problems


def run_batch(  # noqa: PLR0911 - one exit code per way a run can end
    path: Path,
    out_path: Path,
    *,
    batch_id: str | None = None,
    timeout_s: float | None = None,
    options: BatchOptions | None = None,
) -> int:
    """The ``batch`` command: 0 when every request has its result line, else an exit code."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.progress import Progress as Bar

    from worker.errors import JobConflict, QuotaExceeded, RequestInvalid

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    if batch_id is not None and not b.BATCH_ID_PATTERN.match(batch_id):
        err.print("llm-worker batch: --batch-id must be 1-40 of A-Z a-z 0-9 _ -", markup=False)
        return 2
    if not _options_ok(err, options or BatchOptions()):
        return 2
    try:
        content = path.read_bytes()
    except OSError as exc:
        err.print(f"llm-worker batch: cannot read {path}: {exc.strerror}", markup=False)
        return 2
    with Client() as client:
        try:
            items = b.parse_batch_file(client.settings, content)
        except RequestInvalid as exc:
            lines = b.bad_lines(exc)
            err.print(
                f"llm-worker batch: {path} refused, nothing submitted: "
                f"{len(lines)} bad line(s): {', '.join(map(str, lines[:50]))}"
                + (" …" if len(lines) > 50 else ""),
                markup=False,
            )
            for error in exc.errors[:100]:
                err.print(f"  {error['loc']}: {error['msg']}", markup=False)
            if len(exc.errors) > 100:
                err.print(f"  … and {len(exc.errors) - 100} more", markup=False)
            return 2
        run = BatchRun(client, items, batch_id or b.file_batch_id(content), out_path, options)
        try:
            recovered = run.recover()
            pending = [item for item in items if item.custom_id not in recovered.done]
            err.print(
                f"batch {run.batch_id}: {len(items)} requests, {len(recovered.done)} already "
                f"in {out_path}, {len(pending)} to go",
                markup=False,
            )
            run.submit(pending)
        except (BatchOutputMismatch, JobConflict, QuotaExceeded) as exc:
            # Over its quota, what was submitted stays; the same command again goes on.
            again = (
                "; run the same command again to go on" if isinstance(exc, QuotaExceeded) else ""
            )
            err.print(f"llm-worker batch: {exc}{again}", markup=False)
            return 1 if again else 2
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        bar = Bar(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[counts]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=err,
        )

        def on_change(progress: Progress) -> None:
            bar.update(task, completed=progress.finished, counts=progress.describe())
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"not finished within {timeout_s} s; rerun to resume")

        try:
            with bar, out_path.open("ab") as out:
                task = bar.add_task(
                    "batch", total=len(items), completed=len(recovered.done), counts=""
                )
                on_change(run.progress)
                run.collect(pending, out, on_change)
        except (TimeoutError, BatchJobsVanished) as exc:
            err.print(f"llm-worker batch: {exc}", markup=False)
            return 1
        except KeyboardInterrupt:
            err.print(
                "llm-worker batch: interrupted; the jobs keep running. Run the same command "
                "again to collect the rest.",
                markup=False,
            )
            return 130
        counts = run.progress.counts
        err.print(
            f"done: {len(items)} results in {out_path} ("
            + ", ".join(f"{kind} {counts[kind]}" for kind in b.RESULT_TYPES)
            + f"); {run.submitted_now} submitted by this run",
            markup=False,
        )
    return 0
