"""What runs a job inside a Celery worker process.

The task (:mod:`~worker.runtime.task`) is thin; :mod:`~worker.runtime.runner` drives a job's
attempts. The parts that decide are pure (:mod:`~worker.runtime.sse`,
:mod:`~worker.runtime.accumulate`, :mod:`~worker.runtime.coalesce`,
:mod:`~worker.runtime.retry_policy`); I/O sits at the edges (:mod:`~worker.runtime.upstream`,
:mod:`~worker.runtime.job_store`, :mod:`~worker.runtime.group_commit`,
:mod:`~worker.runtime.leases`, :mod:`~worker.runtime.transport`).
"""
