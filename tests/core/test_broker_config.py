"""The Celery configuration and the priority bands for each kind of broker (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.broker import band_of, band_queue, band_queues
from worker.celery_app import celery_config
from worker.settings import load_settings

AMQP = "amqp://guest:guest@rabbit:5672//"


@pytest.mark.parametrize(
    ("priority", "queue"),
    [
        (9, "llmw.high"),
        (7, "llmw.high"),
        (6, "llmw"),
        (5, "llmw"),
        (3, "llmw"),
        (None, "llmw"),
        (2, "llmw.low"),
        (0, "llmw.low"),
    ],
)
def test_priorities_map_to_three_bands(priority: int | None, queue: str) -> None:
    """7-9 go to the high band, 3-6 (and no priority) to the queue itself, 0-2 to the low band."""
    assert band_queue("llmw", priority) == queue


@pytest.mark.parametrize("priority", [-1, 10])
def test_a_priority_outside_zero_to_nine_is_refused(priority: int) -> None:
    """No band takes a priority outside 0-9: the error says so instead of picking one."""
    with pytest.raises(ValueError, match="0-9"):
        band_queue("llmw", priority)


def test_band_names_fold_back_to_their_queue() -> None:
    """Every band of a queue names that queue as its base; the queue itself is no band."""
    assert band_queues("jobs") == ["jobs.high", "jobs", "jobs.low"]
    assert [band_of(name) for name in band_queues("jobs")] == ["jobs", None, "jobs"]


def test_amqp_gets_quorum_queues_confirms_and_no_redis_options() -> None:
    """On AMQP: a durable quorum queue per band, publisher confirms, and none of the Redis
    transport's options (which py-amqp would receive as connection arguments)."""
    config = celery_config(load_settings(broker_url=AMQP))
    assert config["broker_transport"] is None
    assert config["broker_transport_options"] == {"confirm_publish": True}
    queues = config["task_queues"]
    assert [q.name for q in queues] == ["llmw.high", "llmw", "llmw.low"]
    for queue in queues:
        assert queue.durable
        assert queue.queue_arguments == {"x-queue-type": "quorum"}
        assert queue.exchange.type == "topic"
        assert queue.routing_key == queue.name
    assert config["task_acks_late"] is True
    assert config["worker_prefetch_multiplier"] == 1
    assert config["task_default_queue_type"] == "quorum"


def test_redis_keeps_its_hardened_transport_and_one_queue() -> None:
    """On Redis nothing changes: our transport, the visibility options, no declared queues."""
    config = celery_config(load_settings(redis_url="redis://cache:6379/0"))
    assert config["broker_transport"] == "worker.runtime.transport:Transport"
    assert config["broker_transport_options"]["visibility_timeout"] == 30
    assert "confirm_publish" not in config["broker_transport_options"]
    assert "task_queues" not in config


def test_the_green_loop_reads_the_events_connection_without_waiting() -> None:
    """After worker_init, Celery's gevent loop drains the event dispatcher's connection with
    no timeout: its 0.1 s wait there had cost every AMQP delivery 0.1 s of the consumer."""
    from celery import signals
    from celery.worker import loops

    import worker.celery_app  # noqa: F401  (connects the receiver)

    seen: list[float | None] = []

    class Connection:
        def drain_events(self, timeout: float | None = None) -> None:
            seen.append(timeout)

    original = loops._quick_drain
    try:
        signals.worker_init.send(sender=None)
        signals.worker_init.send(sender=None)  # twice: wrapped once
        loops._quick_drain(Connection())
    finally:
        loops._quick_drain = original
    assert seen == [0]


def test_without_rabbitmq_server_the_broker_tests_say_how_to_get_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Where Debian's rabbitmq-server is missing, the RabbitMQ tests skip naming `make tools`."""
    from worker.dev import rabbitmq

    monkeypatch.setattr(rabbitmq, "SERVER", tmp_path / "no-rabbitmq-server")
    reason = rabbitmq.unavailable_reason()
    assert reason is not None
    assert "make tools" in reason


def test_on_amqp_a_queue_named_like_a_band_is_refused_at_start() -> None:
    """QUEUE=jobs.high with an AMQP broker would collide with the bands of a queue `jobs`:
    refused, naming the variable; on Redis the name is fine."""
    from worker.errors import SettingsError

    with pytest.raises(SettingsError, match="LLM_WORKER_QUEUE"):
        load_settings(broker_url=AMQP, queue="jobs.high")
    assert load_settings(queue="jobs.high").queue == "jobs.high"
