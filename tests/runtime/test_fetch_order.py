"""The fetch script's order on a real Redis, without a worker: priority with aging, fair share
between tenants (round-robin or weighted), FIFO within a tenant, and what it does with
messages that carry no class or are not messages at all."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import redis
from prometheus_client import REGISTRY

from worker.broker import task_message
from worker.keys import QUEUE_SEP, TrafficKeys
from worker.process.scrape import ScrapeGauges, class_gauges
from worker.runtime.transport import _FETCH, FILE_LIMIT
from worker.settings import load_settings

pytestmark = pytest.mark.integration

PRIORITY_LISTS = ("", f"{QUEUE_SEP}3", f"{QUEUE_SEP}6", f"{QUEUE_SEP}9")  # kombu's steps


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis[bytes]]:
    client: redis.Redis[bytes] = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def queue() -> str:
    return f"fetch-{uuid.uuid4().hex[:8]}"


def push(r: redis.Redis[bytes], queue: str, name: str, **payload: Any) -> None:
    """What a producer does: the envelope onto the queue's plain list."""
    r.lpush(
        queue,
        task_message(name, {"job_id": name, "submitted_at": time.time(), **payload}, queue=queue),
    )


def fetch_many(
    r: redis.Redis[bytes],
    queue: str,
    most: int,
    *,
    aging_s: float = 60,
    weights: dict[str, float] | None = None,
) -> list[str]:
    """One fetch of up to ``most`` messages as the transport sends it; the job ids it moved
    into the inbox, in the order served."""
    keys = [f"{queue}{suffix}" for suffix in PRIORITY_LISTS]
    inboxes = [f"{k}{QUEUE_SEP}inbox{QUEUE_SEP}test" for k in keys]
    base = TrafficKeys(queue).base
    reply = r.eval(
        _FETCH,
        len(keys) * 2,
        *keys,
        *inboxes,
        aging_s,
        orjson.dumps(weights or {}),
        FILE_LIMIT,
        *([base] * len(keys)),
        most,
    )
    if not reply:
        return []
    key, items = reply[0].decode(), reply[1:]
    assert key == queue  # delivered as the queue's (its inbox, its routing)
    assert r.lrange(inboxes[0], 0, -1) == items[::-1]  # moved into the inbox, nowhere else
    r.delete(inboxes[0])
    return [job_name(item) for item in items]


def job_name(item: bytes) -> str:
    try:
        return str(orjson.loads(item)["headers"]["id"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return item.decode()


def fetch(
    r: redis.Redis[bytes],
    queue: str,
    *,
    aging_s: float = 60,
    weights: dict[str, float] | None = None,
) -> str | None:
    """One fetch of one message; its job id, or None."""
    served = fetch_many(r, queue, 1, aging_s=aging_s, weights=weights)
    return served[0] if served else None


def drain(r: redis.Redis[bytes], queue: str, **options: Any) -> list[str]:
    served = []
    while (job := fetch(r, queue, **options)) is not None:
        served.append(job)
    return served


def test_higher_priority_first_fifo_within(r: redis.Redis[bytes], queue: str) -> None:
    """Interleaved priorities come out highest first, each priority in submission order."""
    for i in range(4):
        for priority in (2, 5, 8):
            push(r, queue, f"p{priority}-{i}", priority=priority)
    assert drain(r, queue) == [f"p{p}-{i}" for p in (8, 5, 2) for i in range(4)]


def test_tenants_at_one_priority_take_turns(r: redis.Redis[bytes], queue: str) -> None:
    """A tenant with 10 jobs queued first and one with 3 queued after alternate; each in order."""
    for i in range(10):
        push(r, queue, f"a{i}", tenant="a", priority=2)
    for i in range(3):
        push(r, queue, f"b{i}", tenant="b", priority=2)
    served = drain(r, queue)
    assert served[:6] == ["a0", "b0", "a1", "b1", "a2", "b2"]
    assert served[6:] == [f"a{i}" for i in range(3, 10)]


def test_a_tenant_arriving_later_is_served_next(r: redis.Redis[bytes], queue: str) -> None:
    """Behind a backlog already being served, a new tenant's job is the next one out; it gets
    no credit for the time it was idle (turns alternate from there)."""
    for i in range(50):
        push(r, queue, f"a{i}", tenant="a")
    assert [fetch(r, queue) for _ in range(20)] == [f"a{i}" for i in range(20)]
    for i in range(3):
        push(r, queue, f"b{i}", tenant="b")
    assert [fetch(r, queue) for _ in range(6)] == ["b0", "a20", "b1", "a21", "b2", "a22"]


def test_weights_share_the_turns(r: redis.Redis[bytes], queue: str) -> None:
    """With weights 4:1, the first 40 jobs served are 32 of the heavy tenant and 8 of the other."""
    for i in range(100):
        push(r, queue, f"heavy-{i}", tenant="heavy")
        push(r, queue, f"light-{i}", tenant="light")
    served = [fetch(r, queue, weights={"heavy": 4}) for _ in range(40)]
    counts = Counter(str(job).split("-")[0] for job in served)
    assert counts == {"heavy": 32, "light": 8}


def test_jobs_without_tenant_share_like_a_tenant(r: redis.Redis[bytes], queue: str) -> None:
    """Jobs without a tenant are one more party in the turns, not ahead or behind the rest."""
    for i in range(3):
        push(r, queue, f"t{i}", tenant="t")
    for i in range(3):
        push(r, queue, f"n{i}")
    served = drain(r, queue)
    assert [sorted(served[i : i + 2]) for i in (0, 2, 4)] == [[f"n{i}", f"t{i}"] for i in range(3)]


def test_a_priority_left_unserved_ages_up(r: redis.Redis[bytes], queue: str) -> None:
    """A priority unserved for (levels + 1) x aging seconds gets one job out ahead of a higher
    one, then waits again; strict priority (aging 0) never lets it."""
    for i in range(5):
        push(r, queue, f"low{i}", priority=2)
        push(r, queue, f"high{i}", priority=8)
    assert fetch(r, queue) == "high0"
    clock = TrafficKeys(queue).clock
    r.hset(clock, "since2", time.time() - 6 * 60 - 1)  # 2 + 6 = 8: a tie goes to the higher
    assert fetch(r, queue) == "high1"
    assert fetch(r, queue, aging_s=0) == "high2"
    r.hset(clock, "since2", time.time() - 7 * 60 - 1)  # 2 + 7 = 9 > 8
    assert fetch(r, queue, aging_s=0) == "high3"
    assert fetch(r, queue) == "low0"
    assert fetch(r, queue) == "high4"  # served, the low priority starts waiting afresh


def test_messages_from_kombu_priority_lists_and_old_producers_are_served(
    r: redis.Redis[bytes], queue: str
) -> None:
    """A message without class headers (an older producer) is priority 5 without a tenant;
    one on a kombu priority list (a restore by kombu's priority) is filed too."""
    envelope = orjson.loads(task_message("old", {"job_id": "old"}, queue=queue))
    for header in [h for h in envelope["headers"] if h.startswith("llmw_")]:
        del envelope["headers"][header]
    r.lpush(queue, orjson.dumps(envelope))
    r.lpush(
        f"{queue}{QUEUE_SEP}6",
        task_message("kombu6", {"job_id": "kombu6", "priority": 4}, queue=queue),
    )
    push(r, queue, "p6", priority=6)
    push(r, queue, "p4", priority=4)
    assert drain(r, queue) == ["p6", "old", "p4", "kombu6"]


def test_bad_class_headers_fall_back_to_the_defaults(r: redis.Redis[bytes], queue: str) -> None:
    """A priority out of range or a tenant that is no tenant name does not break the fetch:
    the message is served as priority 5 without a tenant."""
    envelope = orjson.loads(task_message("odd", {"job_id": "odd"}, queue=queue))
    envelope["headers"].update({"llmw_priority": 42, "llmw_tenant": "a b:c"})
    r.lpush(queue, orjson.dumps(envelope))
    push(r, queue, "p4", priority=4)
    assert drain(r, queue) == ["odd", "p4"]
    assert r.exists(TrafficKeys(queue).waiting(5, "")) == 0


def test_an_item_that_is_not_a_message_is_delivered_as_is(
    r: redis.Redis[bytes], queue: str
) -> None:
    """Bytes that are not an envelope are handed to the consumer (which dead-letters them),
    not filed where they would wait forever."""
    push(r, queue, "first")
    r.lpush(queue, b"not a message")
    assert fetch(r, queue) == "not a message"
    assert fetch(r, queue) == "first"
    assert fetch(r, queue) is None


def test_items_behind_one_that_is_not_a_message_stay_queued_in_order(
    r: redis.Redis[bytes], queue: str
) -> None:
    """What came before the bad item is filed, what came after stays on the queue's list as it
    was, and both are served in submission order afterwards."""
    push(r, queue, "first")
    r.lpush(queue, b"not a message")
    push(r, queue, "second")
    push(r, queue, "third")
    assert fetch(r, queue) == "not a message"
    assert [job_name(item) for item in r.lrange(queue, 0, -1)] == ["third", "second"]
    assert drain(r, queue) == ["first", "second", "third"]


def _mixed_backlog(r: redis.Redis[bytes], queue: str) -> None:
    for i in range(6):
        push(r, queue, f"a{i}", tenant="a", priority=2)
        push(r, queue, f"b{i}", tenant="b", priority=2)
        push(r, queue, f"h{i}", tenant="a", priority=8)
        push(r, queue, f"n{i}", priority=5)
    for i in range(4):
        r.lpush(
            f"{queue}{QUEUE_SEP}6",
            task_message(f"k{i}", {"job_id": f"k{i}", "priority": 5, "tenant": "b"}, queue=queue),
        )


def test_a_batch_serves_what_as_many_single_fetches_would(
    r: redis.Redis[bytes], queue: str
) -> None:
    """Up to N messages per fetch come out in the order, and leave the virtual clocks, of N
    fetches of one: priorities, tenants, weights, aging and new arrivals between fetches."""
    other = f"{queue}-batched"
    weights = {"a": 2}
    for q in (queue, other):
        _mixed_backlog(r, q)
        r.hset(TrafficKeys(q).clock, "since2", time.time() - 7 * 60 - 1)  # aged up to 9
    singles = [fetch(r, queue, weights=weights) for _ in range(7)]
    batched = fetch_many(r, other, 7, weights=weights)
    assert batched == singles
    assert "a0" in batched  # the aged priority was served once
    for q in (queue, other):
        push(r, q, "late", tenant="c", priority=8)
    singles = drain(r, queue, weights=weights)
    batched = []
    while served := fetch_many(r, other, 5, weights=weights):
        batched += served
    assert batched == singles
    assert len(singles) == 6 * 4 + 4 - 7 + 1

    def virtual_times(q: str) -> dict[bytes, bytes]:
        fields = r.hgetall(TrafficKeys(q).clock)
        return {k: v for k, v in fields.items() if k.startswith(b"v")}

    assert virtual_times(other) == virtual_times(queue)
    assert set(r.hkeys(TrafficKeys(other).clock)) == set(r.hkeys(TrafficKeys(queue).clock))


def test_class_gauges_report_depth_and_oldest_age(r: redis.Redis[bytes], queue: str) -> None:
    """The scrape's view: waiting jobs and the oldest one's age per priority and tenant."""
    now = time.time()
    for i in range(3):
        r.lpush(
            queue,
            task_message(
                f"a{i}",
                {"job_id": f"a{i}", "priority": 2, "submitted_at": now - 100 + i},
                queue=queue,
            ),
        )
    r.lpush(
        queue,
        task_message("u", {"job_id": "u", "priority": 8, "submitted_at": now - 5}, queue=queue),
    )
    assert fetch(r, queue) == "u"  # files everything, serves the urgent one
    gauges = class_gauges(r, queue, now)
    assert gauges == {("2", "none"): (3, pytest.approx(100))}


def test_the_scrape_sets_and_clears_the_class_gauges(
    r: redis.Redis[bytes], queue: str, redis_url: str
) -> None:
    """A scrape exports each class's depth and oldest age under bounded tenant labels (a
    configured tenant, none, other), counts them as waiting, and drops a class once empty."""
    settings = load_settings(redis_url=redis_url, queue=queue, tenant_weights={"acme": 2})
    gauges = ScrapeGauges(settings, results=r, broker=r, alive=lambda: True)
    push(r, queue, "a1", tenant="acme", priority=8)
    push(r, queue, "a2", tenant="acme", priority=8)
    push(r, queue, "x1", tenant="unnamed", priority=2)
    push(r, queue, "n1")
    assert fetch(r, queue) == "a1"
    gauges.refresh()

    def sample(name: str, priority: str, tenant: str) -> float | None:
        labels = {"queue": queue, "priority": priority, "tenant": tenant}
        return REGISTRY.get_sample_value(name, labels)

    assert sample("llm_worker_queue_class_depth", "8", "acme") == 1
    assert sample("llm_worker_queue_class_depth", "2", "other") == 1
    assert sample("llm_worker_queue_class_depth", "5", "none") == 1
    assert (sample("llm_worker_queue_oldest_age_seconds", "8", "acme") or 0) >= 0
    labels = {"queue": queue, "state": "waiting"}
    assert REGISTRY.get_sample_value("llm_worker_queue_depth", labels) == 3
    drain(r, queue)
    gauges.refresh()
    assert sample("llm_worker_queue_class_depth", "8", "acme") is None
