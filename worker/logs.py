"""One structlog pipeline for our logs and for Celery's and the libraries' stdlib logs.

JSON (one object per line) or console rendering by setting; ``job_id``, ``attempt`` and
``model`` come from contextvars bound by the task; secrets are redacted in every line.
"""

from __future__ import annotations

import logging
import logging.config
import re
from collections.abc import MutableMapping
from typing import Any

import structlog

from worker.settings import Settings

_REDACTED = "[redacted]"
_OMITTED = "[content omitted]"
_SECRET_KEYS = frozenset({"authorization", "api_key", "x-api-key", "password", "secret", "token"})
_BEARER = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+")
#: Keys that hold prompt or completion text, at any depth (a request's ``messages``, a content
#: block's ``text``, a tool call's ``input``, a delta's ``partial_json``); omitted unless
#: ``log_content`` is on.
_CONTENT_KEYS = frozenset(
    {
        "messages",
        "system",
        "prompt",
        "text",
        "content",
        "completion",
        "thinking",
        "partial_json",
        "input",
    }
)


class Redactor:
    """A processor that removes the API key, bearer tokens and secret-named fields anywhere
    in an event, and prompt/completion text anywhere unless ``log_content`` is on."""

    def __init__(self, secrets: list[str], *, log_content: bool) -> None:
        self._secrets = [s for s in secrets if s]
        self._log_content = log_content

    def _clean_text(self, value: str) -> str:
        for secret in self._secrets:
            if secret in value:
                value = value.replace(secret, _REDACTED)
        return _BEARER.sub(r"\1" + _REDACTED, value)

    def _clean_field(self, key: Any, value: Any) -> Any:
        name = str(key).lower()
        if name in _SECRET_KEYS:
            return _REDACTED
        if not self._log_content and name in _CONTENT_KEYS:
            return _OMITTED
        return self._clean(value)

    def _clean(self, value: Any) -> Any:
        if isinstance(value, str):
            return self._clean_text(value)
        if isinstance(value, bytes | bytearray):
            return self._clean_text(bytes(value).decode("utf-8", "replace"))
        if isinstance(value, dict):
            return {
                self._clean(k) if isinstance(k, str) else k: self._clean_field(k, v)
                for k, v in value.items()
            }
        if isinstance(value, list | tuple | set | frozenset):
            return [self._clean(v) for v in value]
        return value

    def __call__(
        self, _logger: Any, _name: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        for key in list(event_dict):
            # The event text itself is the log message, never omitted; secrets still go.
            event_dict[key] = (
                self._clean(event_dict[key])
                if key == "event"
                else self._clean_field(key, event_dict[key])
            )
        return event_dict


def configure_logging(settings: Settings) -> None:
    """Configure structlog and the stdlib root logger once, for the whole process."""
    # The gateway's producer keys too (a bare key, or the part after ``name:``).
    secrets = settings.secret_values() + [
        spec.get_secret_value().rpartition(":")[2] for spec in settings.gateway_api_keys
    ]
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        Redactor(secrets, log_content=settings.log_content),
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if settings.log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        # Level first: a filtered call (the per-job INFO lines at WARNING) costs no processing.
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.ExtraAdder(), *shared],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler()
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    # httpx logs every request at INFO; one line per upstream call is noise at our volume.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
