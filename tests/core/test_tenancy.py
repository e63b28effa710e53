"""Tenants' pure parts: key specs and keys files, the key ring, quotas' settings, the limit
key, the producers' status view, usage ranges and the gateway's counted places."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from pathlib import Path

import pytest

from worker.accounting.tenancy import bare_key_tenant, match_tenant, parse_key_spec, parse_keys_file
from worker.accounting.usage import UsageRow, day_range, report
from worker.client import core as p
from worker.errors import SettingsError
from worker.gateway.auth import KeyRing, KeysFileError
from worker.gateway.guard import Busy, Slots
from worker.ratelimit.cost import limit_key_for
from worker.settings import load_settings


def _sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def test_a_named_key_names_its_tenant_and_a_bare_key_a_hash_of_itself() -> None:
    """`team-a:secret-1` is tenant team-a; a bare key's tenant is key- and 8 hex digits of
    its sha256, the same every time and not the key."""
    assert parse_key_spec("team-a:secret-key-1").tenant == "team-a"
    bare = parse_key_spec("secret-key-2")
    assert bare.tenant == bare_key_tenant("secret-key-2") == "key-" + _sha("secret-key-2")[:8]
    assert "secret" not in repr(bare)


@pytest.mark.parametrize(
    "spec",
    [
        "a/b:secret-key",
        ":secret-key",
        "team a:secret-key",
        "team:short",
        "team:has space!",
        "x" * 65 + ":secret-key",
    ],
)
def test_a_malformed_key_spec_fails_the_settings_without_echoing_it(spec: str) -> None:
    """A bad entry names GATEWAY_API_KEYS and its position, never its text (a secret)."""
    with pytest.raises(SettingsError) as info:
        load_settings(gateway_api_keys=f"ok:good-key-1,{spec}")
    message = str(info.value)
    assert "LLM_WORKER_GATEWAY_API_KEYS" in message
    assert "entry 2" in message
    secret = spec.rpartition(":")[2]
    assert secret not in message


def test_a_keys_file_holds_digests_comments_and_blank_lines() -> None:
    """`name:sha256` lines match their keys; `#` lines and blank lines are skipped."""
    keys = parse_keys_file(
        f"# rotation 12\n\nteam-a:{_sha('k-a-123456')}\n team-b : {_sha('k-b-123456').upper()}\n"
    )
    assert [k.tenant for k in keys] == ["team-a", "team-b"]
    assert match_tenant(keys, "k-a-123456") == "team-a"
    assert match_tenant(keys, "k-b-123456") == "team-b"
    assert match_tenant(keys, "k-c-123456") is None
    assert match_tenant(keys, "") is None


def test_a_bad_keys_file_names_every_bad_line_and_repeats_none() -> None:
    """A key pasted instead of its digest, a bad name and a missing colon are each named by
    line number; the text itself is never repeated."""
    content = f"ok:{_sha('x')}\nteam:my-raw-secret-key\nbad name:{_sha('y')}\nno-colon-here\n"
    with pytest.raises(ValueError, match="line 2") as info:
        parse_keys_file(content)
    assert "line 3" in str(info.value)
    assert "line 4" in str(info.value)
    assert "my-raw-secret-key" not in str(info.value)


def test_the_key_ring_rereads_a_changed_file_and_keeps_its_keys_when_it_breaks(
    tmp_path: Path,
) -> None:
    """A changed file is seen on the next check; a file that stops parsing keeps the keys in
    force (a typo must not lock everyone out); a file bad at start is an error."""
    path = tmp_path / "keys"
    path.write_text(f"rot:{_sha('old-key-1')}\n")
    ring = KeyRing(["static:static-key-1"], path)
    assert ring.tenant_of("old-key-1") == "rot"
    assert ring.tenant_of("static-key-1") == "static"
    path.write_text(f"rot:{_sha('new-key-22')}\n")
    os.utime(path, ns=(1, 1))  # a different stamp, whatever the clock's resolution
    ring.maybe_reload(now=10**9)
    assert ring.tenant_of("new-key-22") == "rot"
    assert ring.tenant_of("old-key-1") is None
    path.write_text("rot:nonsense\n")
    assert ring.reload() is False
    assert ring.tenant_of("new-key-22") == "rot"
    with pytest.raises(KeysFileError, match="line 1"):
        KeyRing([], path)
    with pytest.raises(KeysFileError, match="cannot read"):
        KeyRing([], tmp_path / "missing")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('{"default": 50, "team-a": 5}', {"default": 50, "team-a": 5}),
        ("7", {"default": 7}),
        ('{"team-a": 3}', {"team-a": 3}),
    ],
)
def test_tenant_max_queued_takes_json_or_a_number(value: str, expected: dict[str, int]) -> None:
    """A default and per-tenant overrides, or one number for every tenant."""
    settings = load_settings(tenant_max_queued=value)
    assert settings.tenant_max_queued == expected
    assert settings.max_queued_for("team-a") == expected.get("team-a", expected.get("default"))


def test_an_empty_keys_file_setting_is_none() -> None:
    """`${LLM_WORKER_GATEWAY_API_KEYS_FILE:-}` in a compose file means no file."""
    assert load_settings(gateway_api_keys_file="").gateway_api_keys_file is None


def test_the_default_quota_fits_one_full_message_batch() -> None:
    """Unset, every tenant may have 100,000 queued jobs."""
    assert load_settings().max_queued_for("anyone") == 100_000


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("{nope", "not valid JSON"),
        ('{"a/b": 3}', "not a tenant name"),
        ('{"default": 0}', "at least 1"),
        ('{"default": "many"}', "integer"),
    ],
)
def test_a_bad_tenant_max_queued_fails_naming_it(value: str, problem: str) -> None:
    """Bad JSON, a name that cannot be a tenant, a quota below 1 or not a number."""
    with pytest.raises(SettingsError) as info:
        load_settings(tenant_max_queued=value)
    assert "LLM_WORKER_TENANT_MAX_QUEUED" in str(info.value)
    assert problem in str(info.value)


def test_the_tenant_is_the_limit_key_when_rate_limits_name_it() -> None:
    """An explicit limit_key wins; else the tenant when RATE_LIMITS names it; else the model
    (a tenant without limits of its own shares the model's, the upstream's, limit)."""
    limits = {"team-a": object(), "default": object()}
    model = "deepseek-ai/DeepSeek-V3"
    assert limit_key_for(model, None, "team-a", limits) == "team-a"
    assert limit_key_for(model, {"limit_key": "batch"}, "team-a", limits) == "batch"
    assert limit_key_for(model, None, "team-b", limits) == model
    assert limit_key_for(model, None, None, limits) == model


def test_the_producers_status_hides_the_lease_worker_and_request_hash() -> None:
    """Job.status() and GET /v1/jobs/{id} show the job's public fields only."""
    raw = {
        "state": "running",
        "attempts": "1",
        "deliveries": "1",
        "submitted_at": "10.5",
        "started_at": "11",
        "model": "m",
        "metadata": '{"a": 1}',
        "priority": "5",
        "tenant": "team-a",
        "deadline_at": "910.5",
        "cancel_requested": "12.5",
        "request_sha": "ab" * 32,
        "worker": "celery@host-1:4242",
        "lease": "token-xyz",
        "lease_until": "123",
        "claim_before": "queued",
        "claim_first": "1",
        "claim_started": "1",
        "claim_started_id": "1-0",
        "held_in": "llmw:outbox:llmw",
        "held_msg": "llmw:outbox_message:team-a/j",
        "batch": "msgbatch_1",
    }
    status = p.parse_status("team-a/j", raw)
    assert status == {
        "job_id": "team-a/j",
        "state": "running",
        "attempts": 1,
        "deliveries": 1,
        "submitted_at": 10.5,
        "started_at": 11.0,
        "model": "m",
        "metadata": {"a": 1},
        "priority": 5,
        "tenant": "team-a",
        "deadline_at": 910.5,
        "cancel_requested": 12.5,
    }


def test_usage_ranges_default_to_30_days_and_refuse_bad_input() -> None:
    """Days are UTC dates, both ends included; malformed, backwards or over 400 days is a
    ValueError naming the parameter."""
    today = dt.date(2026, 3, 31)
    days = day_range(None, None, today=today)
    assert (len(days), days[0], days[-1]) == (30, "2026-03-02", "2026-03-31")
    assert day_range("2026-02-28", "2026-03-01", today=today) == ["2026-02-28", "2026-03-01"]
    for start, end, problem in (
        ("2026-3-1", None, "start must be a UTC date"),
        (None, "2026-02-30", "end is not a calendar date"),
        ("2026-03-02", "2026-03-01", "start must not be after end"),
        ("2024-01-01", "2026-01-01", "at most 400"),
        ("\uff12\uff10\uff12\uff16-01-01", None, "start must be a UTC date"),  # other digits
    ):
        with pytest.raises(ValueError, match=problem):
            day_range(start, end, today=today)


def test_the_usage_report_has_the_rows_and_their_totals() -> None:
    """GET /v1/usage's body: the range, one row per day and model (no tenant: it is the
    caller's), and totals with the exact cost."""
    rows = [
        UsageRow("2026-01-01", "t", "m1", jobs=2, input_tokens=10, output_tokens=20, cost_pusd=5),
        UsageRow(
            "2026-01-02", "t", "m2", jobs=1, input_tokens=1, output_tokens=2, cost_pusd=10**12
        ),
    ]
    body = report("t", ["2026-01-01", "2026-01-02"], rows)
    assert (body["tenant"], body["start"], body["end"]) == ("t", "2026-01-01", "2026-01-02")
    assert body["data"][0] == {
        "day": "2026-01-01",
        "model": "m1",
        "jobs": 2,
        "input_tokens": 10,
        "output_tokens": 20,
        "cost_usd": "0.000000000005",
    }
    assert body["totals"] == {
        "jobs": 3,
        "input_tokens": 11,
        "output_tokens": 22,
        "cost_usd": "1.000000000005",
    }


def test_counted_places_refuse_per_tenant_with_429_and_overall_with_503() -> None:
    """A tenant at its bound gets 429 while another still gets a place; at the overall bound
    everyone gets 503; giving a place back frees it."""
    slots = Slots("streams", overall=3, per_tenant=2)
    slots.take("a")
    slots.take("a")
    with pytest.raises(Busy) as info:
        slots.take("a")
    assert info.value.status == 429
    slots.take("b")
    with pytest.raises(Busy) as info:
        slots.take("c")
    assert info.value.status == 503
    assert info.value.response().headers["retry-after"] == "1"
    slots.give("a")
    slots.take("c")
    assert slots.by_tenant == {"a": 1, "b": 1, "c": 1}
