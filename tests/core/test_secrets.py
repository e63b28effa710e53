"""The API key never leaves the worker's memory: not in Redis, logs, metrics or errors."""

from __future__ import annotations

import httpx
import pytest
import redis

from tests.support import TEST_API_KEY, WorkerProcess, make_request
from worker.client.sync import Client

pytestmark = pytest.mark.integration


def _redis_dump(client: redis.Redis[bytes]) -> bytes:
    """Every key and every value in the database, as bytes."""
    out = bytearray()
    for key in client.scan_iter(count=1000):
        out += key
        kind = client.type(key)
        if kind == b"string":
            out += client.get(key) or b""
        elif kind == b"hash":
            for field, value in client.hgetall(key).items():
                out += field + value
        elif kind == b"list":
            out += b"".join(client.lrange(key, 0, -1))
        elif kind == b"set":
            out += b"".join(client.smembers(key))
        elif kind == b"zset":
            out += b"".join(client.zrange(key, 0, -1))
        elif kind == b"stream":
            for _id, fields in client.xrange(key):
                for field, value in fields.items():
                    out += field + value
    return bytes(out)


def test_canary_key_is_nowhere_after_a_run(client: Client, worker: WorkerProcess) -> None:
    """After completed and failed jobs, no Redis key or value and no worker log line holds it."""
    client.submit(make_request("secret check [[sim tokens=3]]")).result(timeout=30)
    failed = client.submit({**make_request("x"), "model": "no-such/model"})
    list(failed.events(timeout=30))
    canary = TEST_API_KEY.encode()
    assert canary not in _redis_dump(client.redis)
    assert TEST_API_KEY not in worker.log()


def test_canary_key_is_not_in_metrics(redis_url: str, simulator_url: str) -> None:
    """`llm-worker run`'s /metrics never shows the key."""
    import sys

    from tests.support import worker_env

    env = worker_env(redis_url, simulator_url, queue="llmw-secret-metrics")
    proc = WorkerProcess([sys.executable, "-m", "worker.cli", "run", "--concurrency", "5"], env)
    try:
        proc.ready()
        port = env["LLM_WORKER_METRICS_PORT"]
        body = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        log = proc.log()
    finally:
        proc.stop()
    assert "llm_worker_jobs_finished_total" in body
    assert TEST_API_KEY not in body
    assert TEST_API_KEY not in log
