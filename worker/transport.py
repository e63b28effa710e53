"""kombu's Redis transport, hardened against bytes on the queue that are not a message.

kombu pops a list item and parses it inside the consumer's event loop; an item that is not a
broker envelope (not JSON, or JSON of the wrong shape) raises out of the loop and Celery stops
the worker as "unrecoverable". The item is already popped, so we record it as a dead letter
and carry on consuming.
"""

from __future__ import annotations

from typing import Any

import structlog
from kombu.transport import redis as kombu_redis

log = structlog.get_logger("worker.transport")


class Channel(kombu_redis.Channel):
    def _brpop_read(self, **options: Any) -> Any:
        try:
            return super()._brpop_read(**options)  # type: ignore[misc]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.error("queue_item_not_a_message", error=f"{type(exc).__name__}: {exc}"[:300])
            _dead_letter_unreadable(repr(exc)[:300])
            return True


class Transport(kombu_redis.Transport):
    Channel = Channel


def _dead_letter_unreadable(detail: str) -> None:
    try:
        from worker.celery_app import app
        from worker.runtime import get_runtime
        from worker.settings import load_settings

        rt = get_runtime(app.settings or load_settings())
        rt.store.dead_letter(job_id="", reason="unreadable_queue_item", payload=detail)
    except Exception:
        log.exception("dead_letter_failed")
