"""The package's exceptions, all under one root.

    LLMWorkerError
    ├── SettingsError            a setting is missing or malformed (names the variable)
    ├── RequestInvalid           a request failed validation (lists every bad field); ValueError too
    ├── JobConflict              a job_id that exists already, with a different request
    ├── JobNotFound              no job with that id (or it expired)
    ├── BudgetExceeded           the tenant has reached its budget (LLM_WORKER_BUDGETS)
    ├── QuotaExceeded            a tenant has as many queued jobs as TENANT_MAX_QUEUED allows
    ├── JobFailed                the job ended without a result (carries the upstream's error)
    │   ├── JobCancelled
    │   └── JobExpired
    └── UpstreamError            raised at the HTTP boundary, and only there
        ├── TransientUpstreamError   worth another attempt (429, 5xx, network, cut stream)
        └── PermanentUpstreamError   not worth one (400, 401, 403, 404, 413, 422)

Transient versus permanent is part of the type, decided once where the response is read
(:mod:`worker.runtime.retry_policy`); everything further in trusts the type.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydantic import ValidationError

# Fields whose values must never be repeated in an error message.
_SECRET_FIELDS = frozenset(
    {"api_key", "gateway_api_keys", "redis_password", "redis_sentinel_password"}
)


class LLMWorkerError(Exception):
    """Root of every exception this package raises on purpose."""


class SettingsError(LLMWorkerError):
    """One or more settings are invalid; the message names each environment variable."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        lines = "\n".join(f"  {name}: {message}" for name, message in problems)
        super().__init__(f"invalid settings:\n{lines}")

    @classmethod
    def from_validation(
        cls, exc: ValidationError, env_prefix: str, fields: Iterable[str] = ()
    ) -> SettingsError:
        problems: list[tuple[str, str]] = []
        for error in exc.errors():
            loc = [str(part) for part in error["loc"]]
            field = loc[0] if loc else ""
            if not field:
                # A check across fields has no location; its message starts with the field
                # the user should change.
                known = set(fields)
                words = str(error["msg"]).replace("Value error, ", "").split()
                names = [w.removeprefix(env_prefix).lower() for w in words]
                field = next((w for w in names if w in known), "")
            name = (env_prefix + field.upper()) if field else f"{env_prefix}* (settings as a whole)"
            detail = ".".join(loc[1:])
            message = error["msg"] + (f" (at {detail})" if detail else "")
            # Only a located error's input is that field's value; a cross-field error's input
            # is every setting, the API key included.
            if loc and field not in _SECRET_FIELDS and "input" in error:
                from worker.connections.urls import mask_credentials

                shown = mask_credentials(repr(error["input"]))
                message += f"; got {shown[:80]}"
            problems.append((name, message))
        return cls(problems)


class RequestInvalid(LLMWorkerError, ValueError):
    """A request failed validation. ``errors`` holds one ``{"loc", "msg"}`` per bad field."""

    def __init__(self, errors: Iterable[Mapping[str, Any]]) -> None:
        self.errors = [{"loc": str(e["loc"]), "msg": str(e["msg"])} for e in errors]
        lines = "\n".join(f"  {e['loc']}: {e['msg']}" for e in self.errors)
        count = len(self.errors)
        super().__init__(f"invalid request ({count} error{'s' if count != 1 else ''}):\n{lines}")


class JobConflict(LLMWorkerError):
    """A job with this id exists and was submitted with a different request."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"job {job_id!r} exists with a different request; choose another job_id")


class JobNotFound(LLMWorkerError, KeyError):
    """No job with this id exists (it never did, or its results expired)."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(job_id)

    def __str__(self) -> str:
        return f"no job {self.job_id!r} (never submitted, or expired)"


class BudgetExceeded(LLMWorkerError):
    """The tenant has reached a budget of ``LLM_WORKER_BUDGETS``: nothing was submitted. The
    message names the budget (per day or month) and what was spent; it lifts when the period
    rolls over (UTC) or the budget is raised."""

    def __init__(self, tenant: str, message: str) -> None:
        self.tenant = tenant
        super().__init__(message)


class QuotaExceeded(LLMWorkerError):
    """A tenant has as many queued jobs as ``TENANT_MAX_QUEUED`` allows; the refused jobs were
    not written (``job_ids``: their ids). Jobs of the same call listed in ``created`` were."""

    def __init__(
        self, tenant: str, limit: int, job_ids: list[str], created: list[str] | None = None
    ) -> None:
        self.tenant = tenant
        self.limit = limit
        self.job_ids = job_ids
        self.created = created or []
        super().__init__(
            f"tenant {tenant!r} has {limit} queued jobs, its quota (TENANT_MAX_QUEUED); "
            f"{len(job_ids)} job(s) refused: submit again once some have started"
        )


class JobFailed(LLMWorkerError):
    """The job ended without a result. ``error`` is ``{"type", "message", "status_code"}``."""

    def __init__(self, job_id: str, error: Mapping[str, Any]) -> None:
        self.job_id = job_id
        self.error = dict(error)
        self.error_type = str(error.get("type", "error"))
        self.status_code = error.get("status_code")
        status = f" (HTTP {self.status_code})" if self.status_code else ""
        super().__init__(
            f"job {job_id} {self._verb}: {self.error_type}{status}: {error.get('message', '')}"
        )

    _verb = "failed"


class JobCancelled(JobFailed):
    """The job was cancelled before it completed."""

    _verb = "was cancelled"


class JobExpired(JobFailed):
    """The job passed its deadline before it completed."""

    _verb = "expired"


class UpstreamError(LLMWorkerError):
    """The upstream call failed. Raised at the HTTP boundary with the decision already made."""

    retryable = False

    def __init__(
        self,
        message: str,
        *,
        error_type: str = "api_error",
        status_code: int | None = None,
        reason: str = "error",
        retry_after_s: float | None = None,
    ) -> None:
        self.message = message
        self.error_type = error_type
        self.status_code = status_code
        #: A short, bounded label for metrics and ``retry`` events (``http_429``, ``timeout``…).
        self.reason = reason
        self.retry_after_s = retry_after_s
        super().__init__(message)

    def to_error(self) -> dict[str, Any]:
        """The ``error`` object of a ``failed`` or ``retry`` event."""
        return {"type": self.error_type, "message": self.message, "status_code": self.status_code}


class TransientUpstreamError(UpstreamError):
    """Another attempt may succeed."""

    retryable = True


class PermanentUpstreamError(UpstreamError):
    """Another attempt would fail the same way."""

    retryable = False
