"""worker.metrics: the model label is bounded; models outside the configuration are `other`.

Pure: uses prometheus-client's default registry in this process only.
"""

from __future__ import annotations

import uuid

from prometheus_client import REGISTRY

from worker import metrics as m
from worker.catalogue import SEED_MODELS
from worker.settings import load_settings


def _sample(name: str, labels: dict[str, str]) -> float:
    value = REGISTRY.get_sample_value(name, labels)
    return value or 0.0


def test_a_configured_model_keeps_its_name_and_others_are_other() -> None:
    """The seed's models label as themselves; a model nobody configured labels as `other`."""
    assert m.model_label(SEED_MODELS[0]) == SEED_MODELS[0]
    assert m.model_label(f"random/{uuid.uuid4().hex}") == m.OTHER_MODEL


def test_every_metric_with_a_model_label_folds_it_where_it_is_set() -> None:
    """labels() of a model-labelled metric folds the model, by position or by keyword, so no
    caller (the runner, the limiter, the clients) can add an unbounded label value."""
    unknown = f"random/{uuid.uuid4().hex}"
    other = {"model": "other", "outcome": "failed", "tenant": "none"}
    before = _sample("llm_worker_jobs_finished_total", other)
    m.JOBS_FINISHED.labels(unknown, "failed", "").inc()
    m.JOBS_FINISHED.labels(model=unknown, outcome="failed", tenant="").inc()
    after = _sample("llm_worker_jobs_finished_total", other)
    assert after - before == 2
    assert _sample("llm_worker_jobs_finished_total", {"model": unknown, "outcome": "failed"}) == 0
    m.QUEUE_JOBS_SUBMITTED.labels("llmw", unknown, "").inc()  # model is the second label here
    assert (
        _sample("llm_worker_queue_jobs_submitted_total", {"queue": "llmw", "model": unknown}) == 0
    )
    m.JOBS_IN_FLIGHT.labels(unknown).inc()
    m.JOBS_IN_FLIGHT.labels(unknown).dec()
    m.UPSTREAM_LATENCY.labels(unknown).observe(0.1)
    assert _sample("llm_worker_upstream_latency_seconds_count", {"model": unknown}) == 0


def test_models_of_the_settings_become_label_values_once_registered() -> None:
    """A process's settings add their catalogue and allow list (clients, the worker's runtime
    and the scrape register them); nothing is ever removed."""
    name = f"vendor/{uuid.uuid4().hex[:12]}"
    settings = load_settings(models={name: {"max_tokens": 10}}, allowed_models=f"{name},extra/x")
    assert m.model_label(name) == m.OTHER_MODEL
    m.add_model_labels(settings.catalogue.label_names())
    assert m.model_label(name) == name
    assert m.model_label("extra/x") == "extra/x"
    assert m.model_label(SEED_MODELS[0]) == SEED_MODELS[0]


def test_a_tenant_label_is_a_configured_name_none_or_other() -> None:
    """Registered tenants keep their name; no tenant is ``none``; any other is ``other``, also
    when a metric's ``labels()`` is given it, so tenant labels stay bounded."""
    name = f"t-{uuid.uuid4().hex[:6]}"
    assert m.tenant_label(name) == "other"
    m.add_tenant_labels([name])
    assert m.tenant_label(name) == name
    assert m.tenant_label(None) == m.tenant_label("") == "none"
    counter = m.ModelCounter(
        f"llmw_test_tenant_{uuid.uuid4().hex[:6]}", "test", ["model", "tenant"], registry=None
    )
    assert counter.labels("x", "stranger")._labelvalues == ("other", "other")
    assert counter.labels(model="x", tenant=name)._labelvalues == ("other", name)
