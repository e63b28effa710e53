"""Group commit against a real Redis: many concurrent writers, order, errors, leadership."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import pytest
import redis

from worker.group_commit import GroupCommitter


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis[bytes]]:
    c: redis.Redis[bytes] = redis.Redis.from_url(redis_url)
    yield c
    c.close()


def test_a_lone_write_is_sent_at_once_and_returns_its_replies(client: redis.Redis[bytes]) -> None:
    key = f"gc-{uuid.uuid4().hex}"
    replies = GroupCommitter(client).write([("RPUSH", key, "a"), ("RPUSH", key, "b")])
    assert replies == [1, 2]
    assert client.lrange(key, 0, -1) == [b"a", b"b"]


def test_concurrent_writers_keep_their_own_order_and_all_land(
    client: redis.Redis[bytes],
) -> None:
    """64 threads each append 50 items in 50 writes: every item lands, each list in order."""
    committer = GroupCommitter(client, max_commands=40)
    prefix = f"gc-{uuid.uuid4().hex}"
    start = threading.Barrier(64)

    def writer(n: int) -> None:
        start.wait()
        for i in range(50):
            committer.write([("RPUSH", f"{prefix}:{n}", i)])

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    for n in range(64):
        assert [int(x) for x in client.lrange(f"{prefix}:{n}", 0, -1)] == list(range(50))
    assert not committer._flushing  # the lead was given up when the queue ran dry
    assert committer._queue == []


def test_a_failing_command_fails_only_its_writer(client: redis.Redis[bytes]) -> None:
    committer = GroupCommitter(client)
    key = f"gc-{uuid.uuid4().hex}"
    client.set(key, "a string")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        committer.write([("RPUSH", key, "x")])
    assert committer.write([("SET", key, "fine")]) == [True]


def test_a_dead_connection_fails_the_writes_that_used_it() -> None:
    dead: redis.Redis[bytes] = redis.Redis(port=1, socket_connect_timeout=0.2, retry=None)
    committer = GroupCommitter(dead)
    with pytest.raises(redis.ConnectionError):
        committer.write([("PING",)])
    assert not committer._flushing  # a failed flush still hands the lead back
