"""llm-worker: a Celery worker service for Anthropic-style ``/messages`` calls on Redis.

Producers use :class:`Client`; workers run ``llm-worker run`` (or
``celery -A worker.celery_app worker``).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from worker.errors import (
    JobCancelled,
    JobConflict,
    JobExpired,
    JobFailed,
    JobNotFound,
    LLMWorkerError,
    PermanentUpstreamError,
    RequestInvalid,
    SettingsError,
    TransientUpstreamError,
    UpstreamError,
)

if TYPE_CHECKING:
    from worker.client.aio import AsyncClient, AsyncJob
    from worker.client.sync import Client, Job
    from worker.settings import Settings

try:
    __version__ = version("llm-worker")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0.0.0"

__all__ = [
    "AsyncClient",
    "AsyncJob",
    "Client",
    "Job",
    "JobCancelled",
    "JobConflict",
    "JobExpired",
    "JobFailed",
    "JobNotFound",
    "LLMWorkerError",
    "PermanentUpstreamError",
    "RequestInvalid",
    "Settings",
    "SettingsError",
    "TransientUpstreamError",
    "UpstreamError",
]


def __getattr__(name: str) -> Any:
    # The client pulls in redis and pydantic models; keep ``import worker`` (and so the CLI's
    # and Celery's start) light until they are used.
    if name in {"Client", "Job"}:
        from worker.client import sync

        return getattr(sync, name)
    if name in {"AsyncClient", "AsyncJob"}:
        from worker.client import aio

        return getattr(aio, name)
    if name == "Settings":
        from worker.settings import Settings

        return Settings
    raise AttributeError(f"module 'worker' has no attribute {name!r}")
