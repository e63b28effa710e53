"""Group commit against a real Redis: many concurrent writers, order, errors, posting without
waiting, back-pressure, and the RESP packing."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import pytest
import redis

from worker.runtime.group_commit import GroupCommitter, Pending, pack

pytestmark = pytest.mark.integration


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
    assert not committer._queue


def test_a_failing_command_fails_only_its_writer(client: redis.Redis[bytes]) -> None:
    committer = GroupCommitter(client)
    key = f"gc-{uuid.uuid4().hex}"
    client.set(key, "a string")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        committer.write([("RPUSH", key, "x")])
    assert committer.write([("SET", key, "fine")]) == [b"OK"]  # raw replies


def test_a_dead_connection_fails_the_writes_that_used_it() -> None:
    dead: redis.Redis[bytes] = redis.Redis(port=1, socket_connect_timeout=0.2, retry=None)
    committer = GroupCommitter(dead)
    with pytest.raises(redis.ConnectionError):
        committer.write([("PING",)])
    with pytest.raises(redis.ConnectionError):  # the flusher lives on for the next write
        committer.write([("PING",)])


def test_posted_writes_land_in_order_and_settle_waits_for_them(
    client: redis.Redis[bytes],
) -> None:
    committer = GroupCommitter(client)
    key = f"gc-{uuid.uuid4().hex}"
    pending = Pending()
    for i in range(500):
        pending.add(committer.post([("RPUSH", key, i)]))
    pending.settle()
    assert [int(x) for x in client.lrange(key, 0, -1)] == list(range(500))


def test_a_posted_write_that_failed_is_raised_by_the_next_post_or_settle(
    client: redis.Redis[bytes],
) -> None:
    committer = GroupCommitter(client)
    key = f"gc-{uuid.uuid4().hex}"
    client.set(key, "a string")
    pending = Pending()
    failed = committer.post([("RPUSH", key, "x")])
    pending.add(failed)
    failed.done.wait(10)
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        pending.add(committer.post([("PING",)]))
    pending = Pending()
    pending.add(committer.post([("RPUSH", key, "y")]))
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        pending.settle()
    pending.settle()  # raised once: nothing left


@pytest.mark.parametrize("max_pending", [5, 20_000])
def test_past_max_pending_a_post_waits_until_stored(
    client: redis.Redis[bytes], max_pending: int
) -> None:
    """Back-pressure: while Redis stalls, posts queue up to the bound; past it a post returns
    only once its write is stored. Within the bound none waits."""
    committer = GroupCommitter(client, max_commands=10, max_pending=max_pending)
    key = f"gc-{uuid.uuid4().hex}"
    client.execute_command("CLIENT", "PAUSE", 1000, "ALL")
    done_on_return = []
    writes = []
    for i in range(4):
        writes.append(committer.post([("RPUSH", key, i)] * 3))
        done_on_return.append(writes[-1].done.is_set())
    assert any(done_on_return) is (max_pending == 5)
    for w in writes:
        w.outcome()
    assert [int(x) for x in client.lrange(key, 0, -1)] == [i for i in range(4) for _ in range(3)]
    client.execute_command("CLIENT", "UNPAUSE")


def test_a_forked_child_gets_its_own_flusher(client: redis.Redis[bytes]) -> None:
    """Prefork children inherit the committer but not its thread: the first post starts one."""
    import os

    committer = GroupCommitter(client)
    key = f"gc-{uuid.uuid4().hex}"
    committer.write([("RPUSH", key, "parent")])
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through Redis and its exit code
        try:
            client.connection_pool.reset()
            committer.write([("RPUSH", key, "child")])
        finally:
            os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    assert client.lrange(key, 0, -1) == [b"parent", b"child"]


def test_pack_is_the_resp_that_redis_py_sends() -> None:
    from redis.connection import Encoder, PythonRespSerializer

    serializer = PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode)
    command = ("XADD", "llmw:events:j", "*", "data", rb'{"a":"\u00e9 \r\n"}', 7, 1.5, "é")
    assert pack(command) == b"".join(serializer.pack(*command))
    with pytest.raises(TypeError):
        pack(("SET", "k", None))
    with pytest.raises(TypeError):
        pack(("SET", "k", True))


def test_posts_linger_for_company_and_a_waited_write_cuts_the_linger(
    client: redis.Redis[bytes],
) -> None:
    """With a linger, posted chunk writes wait for more to join them; a write someone waits
    for does not wait out the linger: it goes at once, with the posts queued before it, in
    order."""
    committer = GroupCommitter(client, linger_s=600)  # far longer than the test may take
    key = f"gc-{uuid.uuid4().hex}"
    posted = [committer.post([("RPUSH", key, i)]) for i in range(3)]
    assert not any(p.done.is_set() for p in posted)  # lingering (600 s), not sent
    done = threading.Event()

    def waited() -> None:
        committer.write([("RPUSH", key, "w")])
        done.set()

    threading.Thread(target=waited, daemon=True).start()
    assert done.wait(30), "the waited write sat out the linger"
    assert all(p.done.is_set() and p.error is None for p in posted)
    assert client.lrange(key, 0, -1) == [b"0", b"1", b"2", b"w"]


def test_a_lone_post_is_sent_once_its_linger_ends(client: redis.Redis[bytes]) -> None:
    committer = GroupCommitter(client, linger_s=0.05)
    key = f"gc-{uuid.uuid4().hex}"
    pending = Pending()
    pending.add(committer.post([("RPUSH", key, "a")]))
    pending.settle()
    assert client.lrange(key, 0, -1) == [b"a"]
