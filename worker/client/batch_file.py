"""Message Batches, the pure parts: reading a batch file, naming its jobs, and turning a
job's end into Anthropic's per-request result. No I/O here; ``worker/client/batch_run.py`` (the
``llm-worker batch`` command) and the gateway's batch routes do the Redis work.

A batch file is JSONL, one ``{"custom_id": "...", "params": {...request...}}`` per line, as
in Anthropic's Message Batches. A result line is ``{"custom_id": "...", "result": {...}}``
with ``result.type`` one of ``succeeded`` (``message``), ``errored`` (``error``: Anthropic's
error response), ``canceled`` or ``expired``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from worker import events as ev
from worker.client.core import validate_one
from worker.errors import RequestInvalid
from worker.settings import Settings

#: Anthropic's rule for ``custom_id``; it also keeps derived job ids within their pattern.
CUSTOM_ID_PATTERN = re.compile(r"^[a-zA-Z0-9_-]{1,64}\Z")
#: A batch id given by hand; with the prefix and a custom_id it stays a valid job id.
BATCH_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,40}\Z")
#: An upstream's answers that mean it refused *our* credentials (LLM_WORKER_API_KEY), not the
#: client's: by status, or by type in an error event of a stream (which has no status).
UPSTREAM_REFUSAL_STATUSES = frozenset({401, 403})
UPSTREAM_REFUSAL_TYPES = frozenset({"authentication_error", "permission_error"})
#: What a client of ours gets instead: the upstream failed us, as a gateway would say it.
UPSTREAM_REFUSAL_STATUS = 502
#: The error types Anthropic's SDKs know; ours that are not among them become ``api_error``.
ANTHROPIC_ERROR_TYPES = frozenset(
    {
        "invalid_request_error",
        "authentication_error",
        "billing_error",
        "permission_error",
        "not_found_error",
        "request_too_large",
        "rate_limit_error",
        "timeout_error",
        "api_error",
        "overloaded_error",
    }
)
#: Result types, in the order progress shows them.
RESULT_TYPES = ("succeeded", "errored", "canceled", "expired")
_STATE_TO_RESULT = {
    ev.COMPLETED: "succeeded",
    ev.FAILED: "errored",
    ev.CANCELLED: "canceled",
    ev.EXPIRED: "expired",
}


@dataclass(frozen=True, slots=True)
class BatchItem:
    """One request of a batch, validated."""

    line: int
    custom_id: str
    params: dict[str, Any]


def parse_item(settings: Settings, data: Any, where: str) -> tuple[BatchItem | None, list[Any]]:
    """Validate one ``{"custom_id", "params"}`` object; ``where`` prefixes error locations."""
    if not isinstance(data, Mapping):
        return None, [{"loc": where, "msg": 'must be a JSON object {"custom_id", "params"}'}]
    errors: list[dict[str, str]] = []
    unknown = sorted(set(data) - {"custom_id", "params"})
    if unknown:
        errors.append({"loc": where, "msg": f"unknown fields: {', '.join(unknown)}"})
    custom_id = data.get("custom_id")
    if not (isinstance(custom_id, str) and CUSTOM_ID_PATTERN.match(custom_id)):
        errors.append(
            {
                "loc": f"{where}custom_id",
                "msg": "required: 1-64 characters of letters, digits, '_' or '-'",
            }
        )
    params = None
    if "params" not in data:
        errors.append({"loc": f"{where}params", "msg": "required: the /messages request"})
    else:
        try:
            params = validate_one(settings, data["params"], f"{where}params.")
        except RequestInvalid as exc:
            errors.extend(exc.errors)
    if errors or params is None or not isinstance(custom_id, str):
        return None, errors
    return BatchItem(0, custom_id, params), []


def parse_batch_file(settings: Settings, content: bytes) -> list[BatchItem]:
    """Every request of a batch file, or :class:`RequestInvalid` naming every bad line.

    Blank lines are skipped; line numbers count from 1 as an editor shows them.
    """
    items: list[BatchItem] = []
    errors: list[dict[str, str]] = []
    first_line: dict[str, int] = {}
    for number, raw in enumerate(content.split(b"\n"), start=1):
        if not raw.strip():
            continue
        where = f"line {number}: "
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            errors.append({"loc": f"line {number}", "msg": f"not JSON: {exc}"})
            continue
        item, problems = parse_item(settings, data, where)
        errors.extend(problems)
        if item is None:
            continue
        if item.custom_id in first_line:
            errors.append(
                {
                    "loc": f"{where}custom_id",
                    "msg": f"{item.custom_id!r} repeats line {first_line[item.custom_id]}",
                }
            )
            continue
        first_line[item.custom_id] = number
        items.append(BatchItem(number, item.custom_id, item.params))
    if not items and not errors:
        errors.append({"loc": "(file)", "msg": "holds no requests"})
    if errors:
        raise RequestInvalid(errors)
    return items


def bad_lines(exc: RequestInvalid) -> list[int]:
    """The line numbers a :func:`parse_batch_file` error names, in order."""
    numbers = {int(m.group(1)) for e in exc.errors if (m := re.match(r"line (\d+)", e["loc"]))}
    return sorted(numbers)


def file_batch_id(content: bytes) -> str:
    """A batch's id from its file's bytes: the same file is the same batch on every run."""
    return "b" + hashlib.sha256(content).hexdigest()[:20]


def job_id_for(batch_id: str, custom_id: str) -> str:
    """The job of one request: fixed by the batch and ``custom_id``, so a rerun finds it."""
    return f"batch-{batch_id}-{custom_id}"


def result_type(state: str | None) -> str | None:
    """The result type a job state ends in; None while the job has not ended."""
    return _STATE_TO_RESULT.get(state or "")


def batch_result(
    state: str | None,
    message: Mapping[str, Any] | None,
    error: Mapping[str, Any] | None,
    *,
    upstream: str = "the upstream",
) -> dict[str, Any] | None:
    """Anthropic's ``result`` object for a job that has ended; None if it has not.

    A job that completed but whose message has expired is reported ``expired``: there is
    nothing left to give. An error is shown as :func:`client_error` shows it.
    """
    kind = result_type(state)
    if kind is None:
        return None
    if kind == "succeeded":
        if message is None:
            return {"type": "expired"}
        return {"type": "succeeded", "message": dict(message)}
    if kind == "errored":
        return {"type": "errored", "error": error_response(client_error(error or {}, upstream))}
    return {"type": kind}


def upstream_refused_us(error: Mapping[str, Any]) -> bool:
    """Whether a job's error is the upstream refusing this service's own API key."""
    status = error.get("status_code")
    return status in UPSTREAM_REFUSAL_STATUSES or error.get("type") in UPSTREAM_REFUSAL_TYPES


def client_error(error: Mapping[str, Any], upstream: str = "the upstream") -> dict[str, Any]:
    """A job's ``{"type", "message", "status_code"}`` as a client of ours should see it.

    An upstream 401/403 means the upstream refused the key *this service* sends, not the
    client's (which was accepted to submit the job): passed on as it is, the client would
    take it for its own key failing. It becomes a 502 ``api_error`` naming the upstream;
    the upstream's own words stay in the job's record and the worker's log. Any other error
    is returned unchanged.
    """
    if not upstream_refused_us(error):
        return dict(error)
    status = error.get("status_code")
    what = f"HTTP {status} {error.get('type')}" if status else str(error.get("type"))
    return {
        "type": "api_error",
        "message": f"the upstream {upstream} refused this service's own API key ({what}); "
        "your key was accepted, and the service's operator must fix its upstream credentials",
        "status_code": UPSTREAM_REFUSAL_STATUS,
    }


def error_response(error: Mapping[str, Any]) -> dict[str, Any]:
    """Our ``{"type", "message", "status_code"}`` as Anthropic's error response body."""
    kind = str(error.get("type") or "api_error")
    message = str(error.get("message") or "the request failed")
    if kind not in ANTHROPIC_ERROR_TYPES:
        message = f"{kind}: {message}"
        kind = "api_error"
    return {"type": "error", "error": {"type": kind, "message": message}}


def result_line(custom_id: str, result: Mapping[str, Any]) -> bytes:
    """One line of a results file, newline included."""
    return orjson.dumps({"custom_id": custom_id, "result": dict(result)}) + b"\n"


@dataclass(frozen=True, slots=True)
class Recovered:
    """What a results file from an earlier run already holds."""

    done: dict[str, bytes]  # custom_id -> its line
    dropped: int  # torn or unreadable lines (the file is rewritten without them)
    foreign: list[str]  # custom_ids that are not in this batch


def recover_results(content: bytes, custom_ids: Iterable[str]) -> Recovered:
    """Read back the complete result lines of an interrupted run.

    A run that was killed may leave a torn last line; it (and any line that does not parse)
    is dropped and its request collected again. The first line per ``custom_id`` wins.
    """
    wanted = set(custom_ids)
    done: dict[str, bytes] = {}
    foreign: list[str] = []
    dropped = 0
    lines = content.split(b"\n")
    complete, tail = lines[:-1], lines[-1]
    if tail.strip():
        dropped += 1  # no newline: the write was cut
    for raw in complete:
        if not raw.strip():
            continue
        try:
            data = orjson.loads(raw)
            custom_id = data["custom_id"]
            kind = data["result"]["type"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            dropped += 1
            continue
        if custom_id not in wanted:
            foreign.append(str(custom_id))
        elif kind in RESULT_TYPES and custom_id not in done:
            done[custom_id] = raw + b"\n"
        else:
            dropped += 1
    return Recovered(done, dropped, foreign)
