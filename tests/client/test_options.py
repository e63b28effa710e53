"""worker.client.core, the pure parts a producer runs before anything is written: job ids,
metadata, and the per-model counts; with the catalogue applied as settings configure it."""

from __future__ import annotations

from typing import Any

import pytest

from worker.client import core as p
from worker.errors import RequestInvalid
from worker.keys import Keys
from worker.settings import load_settings

REQUEST: dict[str, Any] = {
    "model": "deepseek-ai/DeepSeek-V3",
    "max_tokens": 16,
    "messages": [{"role": "user", "content": "Hi"}],
}


@pytest.mark.parametrize("job_id", ["a", "A-b_c.d:e", "x" * 128, "batch-b0-custom"])
def test_job_ids_of_the_pattern_are_valid(job_id: str) -> None:
    """1-128 letters, digits, '_', '.', ':' or '-' make a job id."""
    assert p.valid_job_id(job_id)
    assert p.check_options(job_id, None) == []


@pytest.mark.parametrize(
    "job_id", ["", "x" * 129, "job\n", "job\n\n", "a/b", "a b", "\u0661", 7, True, b"job"]
)
def test_other_job_ids_are_refused(job_id: object) -> None:
    """Anything else, a trailing newline included (the pattern ends in \\Z), is refused."""
    assert not p.valid_job_id(job_id)
    assert [e["loc"] for e in p.check_options(job_id, None)] == ["job_id"]


@pytest.mark.parametrize("limit_key", ["tenant-1", "x" * 200, "a b"])
def test_a_limit_key_in_metadata_is_a_short_string(limit_key: str) -> None:
    """metadata.limit_key, when given, is a non-blank string of at most 200 characters."""
    assert p.check_options(None, {"limit_key": limit_key}) == []


@pytest.mark.parametrize("limit_key", ["", "   ", "x" * 201, 7, None, ["t"], True])
def test_a_limit_key_of_another_kind_is_refused(limit_key: object) -> None:
    """An empty, blank, too long or non-string limit_key is refused at metadata.limit_key
    (the limiter would silently ignore it)."""
    errors = p.check_options(None, {"limit_key": limit_key}, "requests[2].")
    assert [e["loc"] for e in errors] == ["requests[2].metadata.limit_key"]


def test_a_submission_lists_every_problem_of_every_request() -> None:
    """Strict types, the catalogue's maximum and the options are all reported at once, each
    at its request's location."""
    settings = load_settings()
    requests = [
        {**REQUEST, "max_tokens": "16"},
        {**REQUEST, "stream": 1},
        {**REQUEST, "max_tokens": 8193},
    ]
    with pytest.raises(RequestInvalid) as info:
        p.prepare_submission(settings, requests, ["ok", "bad\n", None], None)
    locs = sorted(e["loc"] for e in info.value.errors)
    assert locs == [
        "requests[0].max_tokens",
        "requests[1].job_id",
        "requests[1].stream",
        "requests[2].max_tokens",
    ]


def test_a_submission_enqueues_an_alias_under_its_models_name() -> None:
    """The request a job carries names the model, not the alias the producer wrote; the
    idempotency fingerprint is that of the rewritten request."""
    settings = load_settings(
        models={"deepseek-ai/DeepSeek-V3": {"max_tokens": 8192, "aliases": ["ds-v3"]}}
    )
    aliased = p.prepare_submission(settings, [{**REQUEST, "model": "ds-v3"}], ["j"], None)
    plain = p.prepare_submission(settings, [REQUEST], ["j"], None)
    assert aliased.requests == plain.requests
    assert aliased.requests[0]["model"] == "deepseek-ai/DeepSeek-V3"
    assert p.request_sha(aliased.requests[0]) == p.request_sha(plain.requests[0])


def test_counts_by_model_fold_unknown_models_into_other() -> None:
    """The Redis counter behind llm_worker_queue_jobs_submitted_total gets one field per
    configured model and one `other`, however many model names producers send."""
    counts = p.count_by_model(
        ["deepseek-ai/DeepSeek-V3", "no-such/model-1", "no-such/model-2", "deepseek-ai/DeepSeek-V3"]
    )
    assert counts == {"deepseek-ai/DeepSeek-V3": 2, "other": 2}


# -- priority, tenant, deadline_s, fallback_models -------------------------------------------


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("priority", -1),
        ("priority", 10),
        ("priority", 5.0),
        ("priority", "5"),
        ("priority", True),
        ("tenant", ""),
        ("tenant", "a/b"),
        ("tenant", "a:b"),
        ("tenant", "x" * 65),
        ("tenant", 7),
        ("deadline_s", 0),
        ("deadline_s", -3),
        ("deadline_s", 7 * 86_400 + 1),
        ("deadline_s", "60"),
        ("deadline_s", False),
        ("fallback_models", "deepseek-ai/DeepSeek-V3"),
        ("fallback_models", [""]),
        ("fallback_models", [7]),
        ("fallback_models", ["m"] * 9),
    ],
)
def test_a_bad_job_option_is_refused_by_name(option: str, value: object) -> None:
    """Each option out of its range or of the wrong type is refused at its own location,
    before anything is written."""
    with pytest.raises(RequestInvalid) as info:
        p.prepare_submission(load_settings(), [REQUEST], None, None, **{option: value})
    assert [e["loc"] for e in info.value.errors] == [option]


def test_options_default_to_priority_5_no_tenant_and_the_settings_deadline() -> None:
    """Without options a job has priority 5, no tenant, and JOB_DEADLINE_S from submission."""
    settings = load_settings(job_deadline_s=120)
    submission = p.prepare_submission(settings, [REQUEST], ["j"], None)
    assert submission.options == [p.JobOptions(priority=5)]
    (call,) = p.submit_calls(settings, Keys("t"), submission, now=1000.0, same_redis=True)
    assert call.payload["deadline_at"] == 1120.0
    assert call.payload["priority"] == 5
    assert "tenant" not in call.payload


def test_a_tenants_job_id_is_qualified_by_its_tenant() -> None:
    """Two tenants using the same job_id get two ids, ``<tenant>/<job_id>``, in Redis."""
    submission = p.prepare_submission(
        load_settings(), [REQUEST, REQUEST], ["same", "same"], None, tenant=["a", "b"]
    )
    assert submission.ids == ["a/same", "b/same"]
    assert p.split_qualified_id("a/same") == ("a", "same")
    assert p.split_qualified_id("same") == (None, "same")
    assert p.valid_qualified_id("a/same")
    assert not p.valid_qualified_id("a/b/c")


def test_options_may_be_given_per_request() -> None:
    """A list gives one value per request; a list of model names is one value for all."""
    settings = load_settings()
    submission = p.prepare_submission(
        settings,
        [REQUEST, REQUEST],
        None,
        None,
        priority=[9, None],
        deadline_s=30,
        fallback_models=["moonshotai/Kimi-K2-Instruct"],
        default_priority=2,
    )
    assert [o.priority for o in submission.options] == [9, 2]
    assert [o.deadline_s for o in submission.options] == [30.0, 30.0]
    assert {o.fallback_models for o in submission.options} == {("moonshotai/Kimi-K2-Instruct",)}
    with pytest.raises(ValueError, match="one entry per request"):
        p.prepare_submission(settings, [REQUEST, REQUEST], None, None, priority=[1])
