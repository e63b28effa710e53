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
_SECRET_KEYS = frozenset({"authorization", "api_key", "x-api-key", "password", "secret", "token"})
_BEARER = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+")
#: Keys that hold prompt or completion text; dropped unless ``log_content`` is on.
_CONTENT_KEYS = frozenset({"messages", "system", "prompt", "text", "content", "completion"})


class Redactor:
    """A processor that removes the API key, bearer tokens and secret-named fields."""

    def __init__(self, secrets: list[str], *, log_content: bool) -> None:
        self._secrets = [s for s in secrets if s]
        self._log_content = log_content

    def _clean(self, value: Any) -> Any:
        if isinstance(value, str):
            for secret in self._secrets:
                if secret in value:
                    value = value.replace(secret, _REDACTED)
            return _BEARER.sub(r"\1" + _REDACTED, value)
        if isinstance(value, dict):
            return {
                k: (_REDACTED if str(k).lower() in _SECRET_KEYS else self._clean(v))
                for k, v in value.items()
            }
        if isinstance(value, list | tuple):
            return [self._clean(v) for v in value]
        return value

    def __call__(
        self, _logger: Any, _name: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        for key in list(event_dict):
            if key.lower() in _SECRET_KEYS:
                event_dict[key] = _REDACTED
            elif not self._log_content and key in _CONTENT_KEYS:
                event_dict[key] = "[content omitted]"
            else:
                event_dict[key] = self._clean(event_dict[key])
        return event_dict


def configure_logging(settings: Settings) -> None:
    """Configure structlog and the stdlib root logger once, for the whole process."""
    secrets = [settings.api_key_value() or ""]
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
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
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
