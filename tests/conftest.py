"""Session fixtures: our own Redis, the simulator and a real Celery worker, as processes.

Tests never touch a Redis they did not start, unless ``LLM_WORKER_TEST_REDIS_URL`` says so.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests import support
from tests.support import (
    WorkerProcess,
    celery_worker_args,
    start_simulator,
    stop_process,
    worker_env,
)
from worker.client.sync import Client
from worker.dev.embedded import EmbeddedRedis
from worker.dev.rabbitmq import RabbitServer
from worker.dev.rabbitmq import unavailable_reason as rabbitmq_unavailable
from worker.settings import SEED_MODELS

# A developer's own settings must not leak into the suite.
for _name in [n for n in os.environ if n.startswith("LLM_WORKER_")]:
    if not _name.startswith("LLM_WORKER_TEST_"):
        del os.environ[_name]


@pytest.fixture(scope="session", autouse=True)
def _work_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Processes the tests start write their logs and files under pytest's tmp folder."""
    support.WORK_DIR = tmp_path_factory.mktemp("processes")
    yield
    support.WORK_DIR = None


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis server for the session: ``LLM_WORKER_TEST_REDIS_URL``, or one we start."""
    explicit = os.environ.get("LLM_WORKER_TEST_REDIS_URL")
    if explicit:
        yield explicit
        return
    with EmbeddedRedis() as server:
        yield server.url


@pytest.fixture(scope="session")
def simulator_url() -> Iterator[str]:
    """The fake upstream, in its own process, accepting only the test key."""
    proc, url = start_simulator("--models", ",".join(SEED_MODELS))
    yield url
    stop_process(proc)


@pytest.fixture(scope="session")
def worker(redis_url: str, simulator_url: str) -> Iterator[WorkerProcess]:
    """One gevent worker started the plain Celery way (``celery -A worker.celery_app``)."""
    proc = WorkerProcess(celery_worker_args(), worker_env(redis_url, simulator_url))
    try:
        yield proc.ready()
    finally:
        proc.stop()


@pytest.fixture
def client(worker: WorkerProcess) -> Iterator[Client]:
    """A producer client on the worker's Redis and queue."""
    with Client(worker.settings()) as c:
        yield c


@pytest.fixture(scope="session")
def rabbitmq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitServer]:
    """A RabbitMQ node of our own (not the machine's), for the session; skipped where
    Debian's rabbitmq-server cannot be had."""
    reason = rabbitmq_unavailable()
    if reason is not None:
        pytest.skip(reason)
    server = RabbitServer(tmp_path_factory.mktemp("rabbitmq")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def amqp_worker(
    redis_url: str, simulator_url: str, rabbitmq: RabbitServer
) -> Iterator[WorkerProcess]:
    """One gevent worker on the AMQP broker (records, events and limits in Redis)."""
    env = worker_env(redis_url, simulator_url, broker_url=rabbitmq.url, queue="llmw-amqp")
    proc = WorkerProcess(celery_worker_args(queue="llmw-amqp"), env)
    try:
        yield proc.ready()
    finally:
        proc.stop()
