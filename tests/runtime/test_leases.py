"""Leases on a real Redis: who may run a job, takeover after expiry, the delivery limit,
renewal, hand-back, and the keeper relaying cancel and shutdown to a job's handle."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from tests.support import wait_for
from worker import events as ev
from worker.keys import Keys
from worker.runtime.context import redis_client
from worker.runtime.job_store import Claim, LeaseLost, WorkerStore, is_lease_lost
from worker.runtime.leases import LeaseKeeper, new_token
from worker.settings import load_settings

pytestmark = pytest.mark.integration


@pytest.fixture(params=[True, False], ids=["shared-round-trips", "own-round-trips"])
def store(redis_url: str, request: pytest.FixtureRequest) -> Iterator[WorkerStore]:
    """A worker's store, its claims and ends sent through the group committer (a worker's
    way) or each in its own round trip (the gateway's): every test holds for both."""
    settings = load_settings(redis_url=redis_url, key_prefix=f"llmw-lease-{uuid.uuid4().hex[:6]}")
    client = redis_client(settings)
    yield WorkerStore(
        client, Keys(settings.key_prefix), result_ttl_s=60, shared_round_trips=request.param
    )
    client.close()


def _claim(
    store: WorkerStore,
    job_id: str,
    token: str,
    *,
    ttl_s: float = 5,
    limit: int = 5,
    start: bool = False,
    deadline_at: float | None = None,
) -> Claim:
    return store.claim(
        job_id,
        worker=token.split(":", maxsplit=1)[0],
        model="m",
        ttl_s=60,
        token=token,
        lease_ttl_s=ttl_s,
        max_deliveries=limit,
        start_attempt=start,
        deadline_at=deadline_at,
    )


def _events(store: WorkerStore, job_id: str) -> list[bytes]:
    return [fields[b"data"] for _, fields in store.redis.xrange(store.keys.events(job_id))]


def test_a_live_lease_parks_a_second_delivery_without_counting_it(store: WorkerStore) -> None:
    first = _claim(store, "job", new_token("a"))
    second = _claim(store, "job", new_token("b"))
    assert first.state_before == "missing"
    assert second.state_before == "leased"
    assert 0 < second.lease_wait_s <= 5
    assert store.job_hash("job")["deliveries"] == "1"  # type: ignore[index]


def test_an_expired_lease_is_taken_over_and_counted(store: WorkerStore) -> None:
    _claim(store, "job", new_token("a"), ttl_s=0.2)
    taken = wait_for(
        lambda: (c := _claim(store, "job", new_token("b"))).state_before != "leased" and c,
        5,
        "the lease to lapse",
    )
    assert taken.state_before == "running"
    assert taken.deliveries == 2


def test_takeovers_past_the_limit_are_poison(store: WorkerStore) -> None:
    _claim(store, "job", new_token("a"), ttl_s=0.1, limit=1)
    poison = wait_for(
        lambda: (c := _claim(store, "job", new_token("b"), limit=1)).state_before != "leased" and c,
        5,
        "the lease to lapse",
    )
    assert poison.state_before == "poison"
    assert poison.deliveries == 2


def test_renew_reports_held_cancelled_and_lost(store: WorkerStore) -> None:
    a, b = new_token("a"), new_token("b")
    _claim(store, "one", a)
    _claim(store, "two", a, ttl_s=0.1)
    wait_for(lambda: _claim(store, "two", b).state_before == "running", 5, "takeover of two")
    assert store.renew([("one", a), ("two", a)], lease_ttl_s=5) == [1, 0]
    assert store.cancel("one") == "requested"
    assert store.renew([("one", a)], lease_ttl_s=5) == [2]
    assert store.renew([], lease_ttl_s=5) == []


def test_release_hands_back_only_for_the_holder_and_does_not_count(store: WorkerStore) -> None:
    a, b = new_token("a"), new_token("b")
    _claim(store, "job", a)
    assert store.release("job", b) is False
    assert store.release("job", a) is True
    state = store.job_hash("job")
    assert state is not None
    assert state["state"] == "queued"
    assert state["deliveries"] == "0"
    assert "lease" not in state
    assert _claim(store, "job", b).state_before == "queued"  # no wait: the lease is gone


def test_keeper_relays_a_cancel_to_the_running_job_at_once(store: WorkerStore) -> None:
    keeper = LeaseKeeper(store, lease_ttl_s=30)  # renewal too slow to be what delivers it
    token = new_token("a")
    _claim(store, "job", token)
    handle = keeper.register("job", token)
    interrupted: list[bool] = []
    handle.set_interrupt(lambda: interrupted.append(True))
    try:
        # The subscriber is up when a first sweep has run; publish after that.
        wait_for(lambda: store.redis.pubsub_numsub(store.keys.cancels_channel)[0][1] > 0, 5, "sub")
        assert store.cancel("job") == "requested"
        # Woken, not timed out: the next renewal (which also reports cancels) is 10 s away.
        assert handle.sleep(5) is True
        assert handle.stop_reason == "cancelled"
        assert interrupted == [True]
    finally:
        keeper.close()


def test_keeper_notices_a_lost_lease(store: WorkerStore) -> None:
    keeper = LeaseKeeper(store, lease_ttl_s=0.3)
    token = new_token("a")
    _claim(store, "job", token, ttl_s=0.3)
    handle = keeper.register("job", token)
    try:
        store.redis.hset(store.keys.job("job"), "lease", "someone-else")
        wait_for(lambda: handle.stop_reason == "lease_lost", 5, "lease_lost")
    finally:
        keeper.close()


def test_a_lease_gone_while_the_job_writes_its_end_is_not_taken_for_lost(
    store: WorkerStore,
) -> None:
    """The end (``finish.lua``) drops the lease; a renewal that runs between the end being
    stored and the job unregistering finds it gone: that is no takeover to warn of or stop."""
    keeper = LeaseKeeper(store, lease_ttl_s=60)  # no renewal of its own during the test
    token = new_token("a")
    _claim(store, "job", token, ttl_s=60)
    ending = keeper.register("job", token)
    other_token = new_token("b")
    _claim(store, "other", other_token, ttl_s=60)
    other = keeper.register("other", other_token)
    try:
        ending.ending = True
        store.redis.hdel(store.keys.job("job"), "lease")  # as the end's script does
        store.redis.hset(store.keys.job("other"), "lease", "someone-else")
        keeper.renew_once()
        assert ending.stop_reason is None
        assert other.stop_reason == "lease_lost"
    finally:
        keeper.close()


def test_drain_wakes_waiters_at_once_and_stops_running_jobs_after_the_grace(
    store: WorkerStore,
) -> None:
    keeper = LeaseKeeper(store, lease_ttl_s=30)
    token = new_token("a")
    _claim(store, "job", token)
    handle = keeper.register("job", token)
    try:
        keeper.drain(grace_s=0.5)
        assert handle.sleep(5) is True
        assert handle.draining
        assert handle.stop_reason is None  # the grace is still running
        assert keeper.sleep(5) is True  # parked duplicates wake too
        wait_for(lambda: handle.stop_reason == "shutdown", 5, "the end of the grace")
    finally:
        keeper.close()


def test_only_the_first_start_of_a_job_is_reported_as_first(store: WorkerStore) -> None:
    """Time in queue is measured once: a hand-back (shutdown, rate-limit requeue) or a
    takeover does not make the next claim a first start."""
    a, b = new_token("a"), new_token("b")
    assert _claim(store, "job", a).first_start is True
    store.release("job", a)
    assert _claim(store, "job", b).first_start is False


def test_a_claim_can_start_the_first_attempt_in_the_same_step(store: WorkerStore) -> None:
    """The `started` event claim.lua writes is the one the runner would have written: same
    fields in the same order, on the stream and the channel, with the stream's expiry."""
    job_id = 'job-"quoted"/1'
    pubsub = store.redis.pubsub()
    pubsub.subscribe(store.keys.channel(job_id))
    wait_for(lambda: pubsub.get_message(timeout=0.1), 5, "the subscription")
    claim = _claim(store, job_id, new_token("a"), start=True)
    assert (claim.started, claim.attempts, claim.last_seq) == (True, 1, 1)
    [(stream_id, _)] = store.redis.xrange(store.keys.events(job_id))
    assert claim.started_id == stream_id.decode()  # a reader can start after it
    [data] = _events(store, job_id)
    event = ev.loads(data)
    expected = ev.make_event(job_id, 1, 1, ev.STARTED)
    assert list(event) == list(expected)
    assert {**event, "ts": 0} == {**expected, "ts": 0}
    assert abs(event["ts"] - time.time()) < 60
    message = wait_for(lambda: pubsub.get_message(timeout=0.1), 5, "the published event")
    assert ev.loads(message["data"]) == event
    pubsub.close()
    assert store.job_hash(job_id)["attempts"] == "1"  # type: ignore[index]
    assert 0 < store.redis.ttl(store.keys.events(job_id)) <= 60


def test_a_claim_starts_the_attempt_after_the_last_one(store: WorkerStore) -> None:
    """After a hand-back the next attempt continues the sequence and the attempt count."""
    a, b = new_token("a"), new_token("b")
    _claim(store, "job", a, start=True)
    store.release("job", a)
    claim = _claim(store, "job", b, start=True)
    assert (claim.started, claim.attempts, claim.last_seq) == (True, 2, 2)
    assert [ev.loads(d)["attempt"] for d in _events(store, "job")] == [1, 2]


@pytest.mark.parametrize("obstacle", ["cancel", "deadline", "takeover"])
def test_a_claim_leaves_the_start_to_the_worker_when_something_stands_in_the_way(
    store: WorkerStore, obstacle: str
) -> None:
    job_key = store.keys.job("job")
    if obstacle == "cancel":
        store.redis.hset(job_key, mapping={"state": "queued", "cancel_requested": "1"})
    elif obstacle == "deadline":
        store.redis.hset(job_key, mapping={"state": "queued", "deadline_at": time.time() - 1})
    else:  # a worker died during its attempt: the next must publish a retry first
        _claim(store, "job", new_token("dead"), start=True)
        store.redis.hset(job_key, "lease_until", 0)  # its lease lapsed
    before = len(_events(store, "job"))
    claim = _claim(store, "job", new_token("a"), start=True)
    assert claim.started is False
    assert len(_events(store, "job")) == before


def test_a_claim_retried_after_a_lost_reply_answers_as_the_first_did(store: WorkerStore) -> None:
    """redis-py retries a script whose reply was lost: the same token's second claim counts no
    second delivery, starts no second attempt and reports no takeover (no false worker_lost)."""
    token = new_token("a")
    first = _claim(store, "job", token, start=True)
    again = _claim(store, "job", token, start=True)
    assert (first.state_before, first.deliveries, first.attempts, first.started) == (
        "missing",
        1,
        1,
        True,
    )
    assert again == first
    assert first.started_id
    assert store.job_hash("job")["deliveries"] == "1"  # type: ignore[index]
    assert [ev.loads(e)["type"] for e in _events(store, "job")] == [ev.STARTED]


def test_a_writer_that_lost_its_lease_can_neither_extend_nor_end_the_job(
    store: WorkerStore,
) -> None:
    """A worker frozen past its lease (another took the job over) has its event writes and
    its end refused; the holder's go through."""
    stale, holder = new_token("a"), new_token("b")
    _claim(store, "job", stale, ttl_s=0.05, start=True)
    wait_for(lambda: _claim(store, "job", holder).state_before == "running", 5, "the takeover")
    before = _events(store, "job")
    chunk = ev.make_event("job", 2, 1, ev.CHUNK, event={"type": "ping"})
    with pytest.raises(redis.ResponseError) as refused:
        store.publish("job", [chunk], token=stale)
    assert is_lease_lost(refused.value)
    end = ev.make_event("job", 2, 1, ev.COMPLETED, message={})
    with pytest.raises(LeaseLost):
        store.finish("job", end, message={}, token=stale)
    assert _events(store, "job") == before
    assert store.job_hash("job")["state"] == "running"  # type: ignore[index]
    store.publish("job", [chunk], token=holder)
    assert store.finish("job", ev.make_event("job", 3, 1, ev.COMPLETED), token=holder) is True
    assert store.job_hash("job")["state"] == "completed"  # type: ignore[index]


def test_a_message_whose_record_is_gone_is_judged_by_its_deadline(store: WorkerStore) -> None:
    """No record (it expired while the message waited): the claim takes the deadline from the
    message, so a message past it starts no attempt (the runner ends it expired)."""
    past = time.time() - 1
    claim = _claim(store, "gone", new_token("a"), start=True, deadline_at=past)
    assert claim.state_before == "missing"
    assert claim.started is False
    assert claim.deadline_at == pytest.approx(past)
    assert _events(store, "gone") == []
    fresh = _claim(store, "fresh", new_token("a"), start=True, deadline_at=time.time() + 60)
    assert fresh.started is True


def test_a_cancelled_job_keeps_its_record_while_its_message_may_wait(store: WorkerStore) -> None:
    """Cancelling a queued job never shortens its record's life (its tombstone), which
    submission set to outlive the deadline, to the shorter result TTL."""
    short = WorkerStore(store.redis, store.keys, result_ttl_s=5)
    created = short.submit_script()(
        keys=[store.keys.job("queued")],
        args=["sha", time.time(), "m", "{}", 1000, "", time.time() + 900],
    )
    assert int(created[0]) == 1
    assert short.cancel("queued") == "cancelled"
    assert store.redis.ttl(store.keys.job("queued")) > 900


def test_the_keeper_ends_a_running_call_at_its_deadline(store: WorkerStore) -> None:
    """The watchdog stops a handle whose deadline passed (interrupting its call), whatever the
    call is doing; a handle with time left is not touched."""
    keeper = LeaseKeeper(store, lease_ttl_s=30)
    due, later = new_token("a"), new_token("b")
    _claim(store, "due", due)
    _claim(store, "later", later)
    handle = keeper.register("due", due)
    other = keeper.register("later", later)
    interrupted: list[bool] = []
    handle.set_interrupt(lambda: interrupted.append(True))
    handle.deadline_at = time.time() + 0.2
    other.deadline_at = time.time() + 600
    try:
        wait_for(lambda: handle.stop_reason == "expired", 5, "the deadline")
        assert interrupted == [True]
        assert other.stop_reason is None
    finally:
        keeper.close()


def test_renewal_refreshes_the_delivery_of_each_job_it_keeps(store: WorkerStore) -> None:
    """Each lease renewal marks its job's broker delivery alive (the visibility clock), and
    only for leases still held."""
    touched: list[list[str]] = []
    keeper = LeaseKeeper(store, lease_ttl_s=30, touch_deliveries=touched.append)
    held, lost = new_token("a"), new_token("b")
    _claim(store, "held", held)
    _claim(store, "lost", lost)
    store.redis.hset(store.keys.job("lost"), "lease", "someone-else")
    keeper.register("held", held, delivery_tag="tag-held")
    keeper.register("lost", lost, delivery_tag="tag-lost")
    try:
        keeper.renew_once()  # (the keeper's own loop may renew as well)
        assert touched
        assert all(tags == ["tag-held"] for tags in touched), touched
    finally:
        keeper.close()
