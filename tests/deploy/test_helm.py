"""The Helm chart: lint, render with Helm's own engine, and check what reaches the cluster."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from worker.settings import Settings

DEFAULT_SHUTDOWN_GRACE_S = str(Settings.model_fields["shutdown_grace_s"].default)

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "llm-worker"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
CHART_ALERTS = CHART / "files" / "alerts.yml"

STANDARD_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
    "helm.sh/chart",
)

# Every optional part on: monitoring, PDB, KEDA with a TriggerAuthentication, embedded Redis,
# the API key from an existing Secret, a non-default queue and deadline.
ALL_ON: dict[str, Any] = {
    "apiKey": {"existingSecret": "llm-api", "key": "token"},
    "redis": {"embedded": {"enabled": True}},
    "serviceMonitor": {"enabled": True, "labels": {"release": "kps"}},
    "prometheusRule": {"enabled": True, "labels": {"release": "kps"}},
    "podDisruptionBudget": {"enabled": True, "maxUnavailable": None, "minAvailable": 1},
    "autoscaling": {
        "keda": {
            "enabled": True,
            "redis": {"authSecret": {"name": "redis-auth", "passwordKey": "password"}},
        }
    },
    "config": {"LLM_WORKER_QUEUE": "jobs-high", "LLM_WORKER_JOB_DEADLINE_S": "600"},
}

# The other way to wire secrets: both from existing Secrets, with a CPU HPA.
EXISTING_SECRETS: dict[str, Any] = {
    "apiKey": {"existingSecret": "llm-api", "key": "token"},
    "redis": {"existingSecret": "redis-conn", "key": "url"},
    "autoscaling": {"hpa": {"enabled": True}},
    "serviceMonitor": {"enabled": True},
    "prometheusRule": {"enabled": True},
}

INLINE: dict[str, Any] = {
    "apiKey": {"value": "sk-inline-secret-value"},
    "redis": {"url": "redis://redis.example.internal:6380/3"},
    "autoscaling": {"keda": {"enabled": True, "listLength": 25}},
    "config": {"LLM_WORKER_QUEUE": "batch", "LLM_WORKER_JOB_DEADLINE_S": "1800"},
    "terminationGracePeriodSeconds": 1900,
}
INLINE["autoscaling"]["keda"]["cooldownPeriod"] = 1800

VALUE_SETS = {"defaults": None, "all-on": ALL_ON, "existing-secrets": EXISTING_SECRETS}
VALUE_SETS["inline"] = INLINE


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Render the chart offline and parse every manifest into objects."""
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values=values, name="rel", namespace="ns")
    objects: list[dict[str, Any]] = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def only(objects: list[dict[str, Any]], kind: str, component: str | None = None) -> dict[str, Any]:
    """The single object of a kind (and component label), failing on none or several."""
    found = [
        o
        for o in objects
        if o["kind"] == kind
        and (
            component is None
            or o["metadata"]["labels"].get("app.kubernetes.io/component") == component
        )
    ]
    assert len(found) == 1, f"expected one {kind} ({component}), got {len(found)}"
    return found[0]


def worker_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """The worker container of the worker Deployment."""
    spec = only(objects, "Deployment", "worker")["spec"]["template"]["spec"]
    (container,) = [c for c in spec["containers"] if c["name"] == "worker"]
    return container


def config_data(objects: list[dict[str, Any]]) -> dict[str, str]:
    """The worker ConfigMap's data."""
    return only(objects, "ConfigMap")["data"]


def env_by_name(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The container's env entries keyed by name."""
    return {e["name"]: e for e in container.get("env", [])}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """Each named value set rendered once for the module."""
    return {name: render(values) for name, values in VALUE_SETS.items()}


def test_lint_strict_passes() -> None:
    """helm lint --strict reports no warning or error with the default values."""
    report = helm.lint(CHART, strict=True)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("name", ["all-on", "existing-secrets", "inline"])
def test_lint_strict_passes_with_optional_parts(name: str) -> None:
    """helm lint --strict also passes with every optional part switched on."""
    report = helm.lint(CHART, VALUE_SETS[name], strict=True)
    assert report["errors"] == []


def test_default_render_objects(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The defaults render the worker, its config, Secret, ServiceAccount, Service and PDB."""
    kinds = sorted(o["kind"] for o in rendered["defaults"])
    assert kinds == sorted(
        ["ConfigMap", "Deployment", "PodDisruptionBudget", "Secret", "Service", "ServiceAccount"]
    )


def test_all_on_render_objects(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """With everything on the chart adds monitoring, KEDA and the embedded Redis."""
    kinds = sorted(o["kind"] for o in rendered["all-on"])
    assert kinds == sorted(
        [
            "ConfigMap",
            "Deployment",
            "Deployment",
            "PodDisruptionBudget",
            "PrometheusRule",
            "ScaledObject",
            "Secret",
            "Service",
            "Service",
            "ServiceAccount",
            "ServiceMonitor",
            "TriggerAuthentication",
        ]
    )
    assert "HorizontalPodAutoscaler" in {o["kind"] for o in rendered["existing-secrets"]}


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_every_object_has_standard_labels(
    rendered: dict[str, list[dict[str, Any]]], name: str
) -> None:
    """Every rendered object carries the standard Kubernetes and Helm labels."""
    for obj in rendered[name]:
        labels = obj["metadata"].get("labels", {})
        missing = [label for label in STANDARD_LABELS if not labels.get(label)]
        assert not missing, f"{obj['kind']}/{obj['metadata']['name']} lacks {missing}"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/instance"] == "rel"


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_probes_hit_health_endpoints_on_metrics_port(
    rendered: dict[str, list[dict[str, Any]]], name: str
) -> None:
    """Liveness checks /healthz, readiness /readyz, both on the port named metrics (9464)."""
    container = worker_container(rendered[name])
    assert container["command"] == ["llm-worker"]
    assert container["args"] == ["run"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": 9464}
    service = only(rendered[name], "Service", "worker")
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    deployment = only(rendered[name], "Deployment", "worker")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_security_context_is_locked_down(
    rendered: dict[str, list[dict[str, Any]]], name: str
) -> None:
    """The worker runs as UID 10001, read-only, unprivileged, with /tmp on an emptyDir."""
    deployment = only(rendered[name], "Deployment", "worker")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    ctx = worker_container(rendered[name])["securityContext"]
    assert ctx["runAsNonRoot"] is True
    assert ctx["runAsUser"] == 10001
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"]["drop"] == ["ALL"]
    assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    mounts = {m["mountPath"]: m["name"] for m in worker_container(rendered[name])["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_config_is_loaded_with_env_from(
    rendered: dict[str, list[dict[str, Any]]], name: str
) -> None:
    """The ConfigMap holds only LLM_WORKER_* strings and the worker loads it with envFrom."""
    objects = rendered[name]
    configmap = only(objects, "ConfigMap")
    assert all(key.startswith("LLM_WORKER_") for key in configmap["data"])
    assert all(isinstance(value, str) for value in configmap["data"].values())
    assert "LLM_WORKER_API_KEY" not in configmap["data"]
    assert "LLM_WORKER_REDIS_URL" not in configmap["data"]
    env_from = worker_container(objects)["envFrom"]
    assert {"configMapRef": {"name": configmap["metadata"]["name"]}} in env_from


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_api_key_and_redis_url_come_from_secrets(
    rendered: dict[str, list[dict[str, Any]]], name: str
) -> None:
    """LLM_WORKER_API_KEY and LLM_WORKER_REDIS_URL use secretKeyRef, never a literal value."""
    env = env_by_name(worker_container(rendered[name]))
    for var in ("LLM_WORKER_API_KEY", "LLM_WORKER_REDIS_URL"):
        assert "value" not in env[var]
        ref = env[var]["valueFrom"]["secretKeyRef"]
        assert ref["name"]
        assert ref["key"]
    texts = yaml.safe_dump_all(
        [o for o in rendered[name] if o["kind"] not in {"Secret"}], sort_keys=True
    )
    assert "sk-inline-secret-value" not in texts


def test_inline_secrets_go_into_the_chart_secret(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    """apiKey.value and redis.url are stored base64 in the chart's Secret and referenced."""
    objects = rendered["inline"]
    secret = only(objects, "Secret")
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert data == {
        "api-key": "sk-inline-secret-value",
        "redis-url": "redis://redis.example.internal:6380/3",
    }
    env = env_by_name(worker_container(objects))
    assert env["LLM_WORKER_API_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": secret["metadata"]["name"],
        "key": "api-key",
    }
    assert env["LLM_WORKER_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": secret["metadata"]["name"],
        "key": "redis-url",
    }


def test_existing_secrets_are_referenced(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """With existing Secrets the chart creates none and references the given names and keys."""
    objects = rendered["existing-secrets"]
    assert "Secret" not in {o["kind"] for o in objects}
    env = env_by_name(worker_container(objects))
    assert env["LLM_WORKER_API_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "llm-api",
        "key": "token",
    }
    assert env["LLM_WORKER_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "redis-conn",
        "key": "url",
    }


def test_embedded_redis_is_wired_to_the_workers(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    """The embedded Redis runs AOF with noeviction, and the workers' URL points at its Service."""
    objects = rendered["all-on"]
    redis = only(objects, "Deployment", "redis")
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    args = " ".join(container["command"] + container["args"])
    assert "--appendonly yes" in args
    assert "--maxmemory-policy noeviction" in args
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    service = only(objects, "Service", "redis")
    secret = only(objects, "Secret")
    url = base64.b64decode(secret["data"]["redis-url"]).decode()
    assert url == f"redis://{service['metadata']['name']}:6379/0"
    assert "api-key" not in secret["data"]  # the API key comes from the existing Secret


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_grace_period_exceeds_the_shutdown_grace(
    rendered: dict[str, list[dict[str, Any]]], name: str
) -> None:
    """terminationGracePeriodSeconds leaves the worker its SHUTDOWN_GRACE_S and time to exit."""
    objects = rendered[name]
    shutdown_grace = float(
        config_data(objects).get("LLM_WORKER_SHUTDOWN_GRACE_S", DEFAULT_SHUTDOWN_GRACE_S)
    )
    grace = only(objects, "Deployment", "worker")["spec"]["template"]["spec"][
        "terminationGracePeriodSeconds"
    ]
    assert grace > shutdown_grace + 10


@pytest.mark.parametrize("name", ["all-on", "inline"])
def test_keda_watches_the_configured_queue(
    rendered: dict[str, list[dict[str, Any]]], name: str
) -> None:
    """The KEDA redis trigger's listName is LLM_WORKER_QUEUE and its cooldown covers a job."""
    objects = rendered[name]
    scaled = only(objects, "ScaledObject")
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "redis"
    config = config_data(objects)
    assert trigger["metadata"]["listName"] == config["LLM_WORKER_QUEUE"]
    assert all(isinstance(v, str) for v in trigger["metadata"].values())
    assert scaled["spec"]["minReplicaCount"] >= 1
    assert scaled["spec"]["cooldownPeriod"] >= float(config["LLM_WORKER_JOB_DEADLINE_S"])
    deployment = only(objects, "Deployment", "worker")
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert "replicas" not in deployment["spec"]


def test_keda_address_follows_redis_url(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """KEDA's address and database come from redis.url, or from the embedded Redis Service."""
    inline = only(rendered["inline"], "ScaledObject")["spec"]["triggers"][0]["metadata"]
    assert inline["address"] == "redis.example.internal:6380"
    assert inline["databaseIndex"] == "3"
    assert inline["listLength"] == "25"
    all_on = rendered["all-on"]
    trigger = only(all_on, "ScaledObject")["spec"]["triggers"][0]
    redis_service = only(all_on, "Service", "redis")["metadata"]["name"]
    assert trigger["metadata"]["address"] == f"{redis_service}:6379"
    auth = only(all_on, "TriggerAuthentication")
    assert trigger["authenticationRef"] == {"name": auth["metadata"]["name"]}
    assert auth["spec"]["secretTargetRef"] == [
        {"parameter": "password", "name": "redis-auth", "key": "password"}
    ]


def test_hpa_replaces_fixed_replicas(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """With the HPA on, the Deployment leaves replicas to it; by default replicas is fixed."""
    objects = rendered["existing-secrets"]
    hpa = only(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert "replicas" not in only(objects, "Deployment", "worker")["spec"]
    assert only(rendered["defaults"], "Deployment", "worker")["spec"]["replicas"] == 2


def test_chart_alerts_are_a_copy_of_deploy_alerts() -> None:
    """helm/llm-worker/files/alerts.yml is byte-for-byte deploy/prometheus/alerts.yml."""
    assert ALERTS.exists(), f"{ALERTS} is missing"
    assert CHART_ALERTS.read_bytes() == ALERTS.read_bytes(), (
        "copy it: cp deploy/prometheus/alerts.yml helm/llm-worker/files/alerts.yml"
    )


@pytest.mark.parametrize("name", ["all-on", "existing-secrets"])
def test_prometheus_rule_has_the_deploy_alerts(
    rendered: dict[str, list[dict[str, Any]]], name: str
) -> None:
    """The PrometheusRule's groups equal the groups of deploy/prometheus/alerts.yml."""
    rule = only(rendered[name], "PrometheusRule")
    expected = yaml.safe_load(ALERTS.read_text())["groups"]
    assert rule["spec"]["groups"] == expected
    assert rule["metadata"]["labels"].get("release") == ("kps" if name == "all-on" else None)


def test_service_monitor_scrapes_the_metrics_port(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    """The ServiceMonitor selects the metrics Service and names the job as the alerts expect."""
    objects = rendered["all-on"]
    monitor = only(objects, "ServiceMonitor")
    service = only(objects, "Service", "worker")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= (
        service["metadata"]["labels"].items()
    )
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics"
    assert endpoint["path"] == "/metrics"
    assert {"action": "replace", "targetLabel": "job", "replacement": "llm-worker"} in endpoint[
        "relabelings"
    ]
    assert 'job="llm-worker"' in ALERTS.read_text()


def test_pod_disruption_budget_selects_workers(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The PDB selects the worker pods only, with maxUnavailable 1 by default."""
    for name, field, value in (("defaults", "maxUnavailable", 1), ("all-on", "minAvailable", 1)):
        objects = rendered[name]
        pdb = only(objects, "PodDisruptionBudget")
        assert pdb["spec"][field] == value
        selector = only(objects, "Deployment", "worker")["spec"]["selector"]
        assert pdb["spec"]["selector"] == selector


def test_config_checksum_rolls_pods_on_change() -> None:
    """Changing a config value changes the pod template's checksum annotation."""

    def checksum(values: dict[str, Any] | None) -> str:
        deployment = only(render(values), "Deployment", "worker")
        return deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    assert checksum(None) != checksum({"config": {"LLM_WORKER_CONCURRENCY": "300"}})


BAD_VALUES = [
    pytest.param({"replicaCount": "three"}, ["/replicaCount", "want integer"], id="wrong-type"),
    pytest.param({"replicas": 3}, ["additional properties 'replicas'"], id="unknown-top-key"),
    pytest.param(
        {"autoscaling": {"mode": "keda"}},
        ["/autoscaling", "additional properties 'mode'"],
        id="unknown-autoscaling-mode",
    ),
    pytest.param(
        {"config": {"LLM_WORKER_POOL": "fork"}},
        ["/config/LLM_WORKER_POOL", "gevent"],
        id="unknown-pool",
    ),
    pytest.param({"config": {"queue": "x"}}, ["'queue'", "LLM_WORKER_"], id="config-key"),
    pytest.param(
        {"config": {"LLM_WORKER_CONCURRENCY": "many"}},
        ["/config/LLM_WORKER_CONCURRENCY"],
        id="config-not-a-number",
    ),
    pytest.param(
        {"autoscaling": {"keda": {"minReplicaCount": 0}}},
        ["/autoscaling/keda/minReplicaCount", "minimum"],
        id="keda-min-zero",
    ),
    pytest.param(
        {"autoscaling": {"keda": {"enabled": True}, "hpa": {"enabled": True}}},
        ["autoscaling.hpa.enabled and autoscaling.keda.enabled are mutually exclusive"],
        id="keda-and-hpa",
    ),
    pytest.param(
        {"terminationGracePeriodSeconds": 300},
        ["terminationGracePeriodSeconds (300) must be greater than", "SHUTDOWN_GRACE_S (300) + 10"],
        id="grace-without-margin",
    ),
    pytest.param(
        {"config": {"LLM_WORKER_SHUTDOWN_GRACE_S": "400"}},
        ["terminationGracePeriodSeconds (330) must be greater than", "SHUTDOWN_GRACE_S (400)"],
        id="shutdown-grace-above-pod-grace",
    ),
    pytest.param(
        {
            "config": {"LLM_WORKER_JOB_DEADLINE_S": "900"},
            "autoscaling": {"keda": {"enabled": True, "cooldownPeriod": 300}},
        },
        ["autoscaling.keda.cooldownPeriod (300) must be at least"],
        id="keda-cooldown-below-deadline",
    ),
    pytest.param(
        {"config": {"LLM_WORKER_API_KEY": "sk-oops"}},
        ["config.LLM_WORKER_API_KEY is not allowed"],
        id="api-key-in-config",
    ),
    pytest.param(
        {"config": {"LLM_WORKER_VISIBILITY_TIMEOUT_S": "15"}},
        ["LLM_WORKER_VISIBILITY_TIMEOUT_S (15) must be greater than", "LEASE_TTL_S (20)"],
        id="visibility-below-lease",
    ),
    pytest.param(
        {"redis": {"existingSecret": "r", "embedded": {"enabled": True}}},
        ["redis.existingSecret and redis.embedded.enabled are mutually exclusive"],
        id="redis-secret-and-embedded",
    ),
    pytest.param(
        {"redis": {"url": ""}},
        ["no Redis configured"],
        id="no-redis",
    ),
    pytest.param(
        {"redis": {"existingSecret": "r"}, "autoscaling": {"keda": {"enabled": True}}},
        ["autoscaling.keda.redis.address is required"],
        id="keda-without-address",
    ),
    pytest.param(
        {"redis": {"url": "redis://:pw@r:6379/0"}, "autoscaling": {"keda": {"enabled": True}}},
        ["redis.url carries a password"],
        id="keda-without-password",
    ),
    pytest.param(
        {"redis": {"url": "sentinel://s1:26379;sentinel://s2:26379"}},
        ["set redis.sentinel.master"],
        id="sentinel-without-master",
    ),
    pytest.param(
        {"config": {"LLM_WORKER_REDIS_PASSWORD": "pw"}},
        ["config.LLM_WORKER_REDIS_PASSWORD is not allowed"],
        id="redis-password-in-config",
    ),
    pytest.param(
        {
            "redis": {"url": "sentinel://s1:26379", "sentinel": {"master": "m"}},
            "autoscaling": {"keda": {"enabled": True}},
        },
        ["KEDA's redis trigger needs one host:port"],
        id="keda-with-sentinel",
    ),
    pytest.param(
        {"podDisruptionBudget": {"minAvailable": 1}},
        ["podDisruptionBudget: set either minAvailable or maxUnavailable"],
        id="pdb-both",
    ),
]


def test_sentinel_setup_passes_the_master_name_and_both_passwords_from_secrets() -> None:
    """A sentinel:// redis.url with its service name and password Secrets: the URL stays in
    the chart's Secret, the passwords come from the named Secrets, never the ConfigMap, and the
    worker's settings load from what the chart renders."""
    url = "sentinel://s1:26379;sentinel://s2:26379;sentinel://s3:26379/0"
    objects = render(
        {
            "redis": {
                "url": url,
                "sentinel": {"master": "mymaster", "passwordSecret": {"name": "sentinel-auth"}},
                "passwordSecret": {"name": "redis-auth", "key": "pw"},
            }
        }
    )
    env = env_by_name(worker_container(objects))
    assert env["LLM_WORKER_REDIS_SENTINEL_MASTER"]["value"] == "mymaster"
    assert env["LLM_WORKER_REDIS_SENTINEL_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "sentinel-auth",
        "key": "sentinel-password",
    }
    assert env["LLM_WORKER_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "redis-auth",
        "key": "pw",
    }
    secret = only(objects, "Secret")
    assert base64.b64decode(secret["data"]["redis-url"]).decode() == url
    assert not any("PASSWORD" in key for key in config_data(objects))
    from worker.settings import settings_from_env

    rendered_env = {
        **config_data(objects),
        "LLM_WORKER_REDIS_URL": url,
        "LLM_WORKER_REDIS_SENTINEL_MASTER": env["LLM_WORKER_REDIS_SENTINEL_MASTER"]["value"],
    }
    loaded = settings_from_env(rendered_env)
    assert loaded.redis_sentinel_master == "mymaster"


def test_no_sentinel_env_by_default(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Without Sentinel values the worker gets no Sentinel or password variables."""
    env = env_by_name(worker_container(rendered["defaults"]))
    assert not {n for n in env if "SENTINEL" in n or n == "LLM_WORKER_REDIS_PASSWORD"}


@pytest.mark.parametrize(("values", "fragments"), BAD_VALUES)
def test_bad_values_fail_with_a_clear_message(values: dict[str, Any], fragments: list[str]) -> None:
    """A bad values file fails to render with a message naming the problem."""
    with pytest.raises(helm.HelmError) as excinfo:
        render(values)
    message = str(excinfo.value)
    for fragment in fragments:
        assert fragment in message, message


# -- the gateway ----------------------------------------------------------------------------

GATEWAY_KEY = "team-a:sk-gateway-inline-secret"
GATEWAY_DIGEST = "0123456789abcdef" * 4
# The gateway on, with both kinds of keys kept by the chart, a Sentinel Redis and extra env.
GATEWAY_INLINE: dict[str, Any] = {
    "apiKey": {"value": "sk-inline-secret-value"},
    "redis": {
        "url": "sentinel://s1:26379;sentinel://s2:26379",
        "sentinel": {"master": "mymaster"},
        "passwordSecret": {"name": "redis-auth"},
    },
    "extraEnv": [{"name": "LLM_WORKER_BROKER_URL", "value": "amqp://rabbitmq:5672//"}],
    "gateway": {
        "enabled": True,
        "apiKeys": {"value": GATEWAY_KEY},
        "keysFile": {"entries": [f"team-b:{GATEWAY_DIGEST}"]},
        "extraEnv": [{"name": "LLM_WORKER_GATEWAY_MAX_STREAMS", "value": "300"}],
    },
}
# The gateway on with its keys in the user's Secrets.
GATEWAY_EXISTING: dict[str, Any] = {
    "apiKey": {"existingSecret": "llm-api"},
    "redis": {"existingSecret": "redis-conn", "key": "url"},
    "gateway": {
        "enabled": True,
        "replicaCount": 3,
        "port": 8080,
        "apiKeys": {"existingSecret": "gw-keys", "key": "pairs"},
        "keysFile": {"existingSecret": "gw-keys-file", "key": "lines"},
        "podDisruptionBudget": {"maxUnavailable": None, "minAvailable": 2},
    },
}
GATEWAY_SETS = {"gateway-inline": GATEWAY_INLINE, "gateway-existing": GATEWAY_EXISTING}


@pytest.fixture(scope="module")
def gateway_rendered() -> dict[str, list[dict[str, Any]]]:
    """Each gateway value set rendered once for the module."""
    return {name: render(values) for name, values in GATEWAY_SETS.items()}


def gateway_pod(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """The gateway Deployment's pod spec."""
    pod: dict[str, Any] = only(objects, "Deployment", "gateway")["spec"]["template"]["spec"]
    return pod


def gateway_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """The gateway container."""
    (container,) = gateway_pod(objects)["containers"]
    assert container["name"] == "gateway"
    return container


def gateway_service(objects: list[dict[str, Any]], port_name: str) -> dict[str, Any]:
    """The gateway's Service that has a port of this name (``http`` or ``metrics``)."""
    (service,) = [
        o
        for o in objects
        if o["kind"] == "Service"
        and o["metadata"]["labels"]["app.kubernetes.io/component"] == "gateway"
        and any(p["name"] == port_name for p in o["spec"]["ports"])
    ]
    return service


def components(objects: list[dict[str, Any]]) -> set[str]:
    """The component labels of the rendered objects."""
    return {o["metadata"]["labels"].get("app.kubernetes.io/component") for o in objects}


@pytest.mark.parametrize("name", list(GATEWAY_SETS))
def test_lint_strict_passes_with_the_gateway(name: str) -> None:
    """helm lint --strict passes with the gateway on."""
    report = helm.lint(CHART, GATEWAY_SETS[name], strict=True)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_gateway_objects_render_only_when_enabled(
    rendered: dict[str, list[dict[str, Any]]], gateway_rendered: dict[str, list[dict[str, Any]]]
) -> None:
    """No gateway object by default (nor with every other option on); enabled, a Deployment,
    its public Service and its metrics Service, a PDB and, for keys kept by the chart, two
    Secrets: the name:key pairs, and the keys file apart so that it can change without a
    restart."""
    for name in VALUE_SETS:
        assert "gateway" not in components(rendered[name]), name
    disabled = render({"gateway": {"enabled": False, "apiKeys": {"value": GATEWAY_KEY}}})
    assert "gateway" not in components(disabled)

    def gateway_kinds(objects: list[dict[str, Any]]) -> list[str]:
        return sorted(
            o["kind"]
            for o in objects
            if o["metadata"]["labels"].get("app.kubernetes.io/component") == "gateway"
        )

    assert gateway_kinds(gateway_rendered["gateway-inline"]) == [
        "Deployment",
        "PodDisruptionBudget",
        "Secret",
        "Secret",
        "Service",
        "Service",
    ]
    assert gateway_kinds(gateway_rendered["gateway-existing"]) == [
        "Deployment",
        "PodDisruptionBudget",
        "Service",
        "Service",
    ]


@pytest.mark.parametrize("name", list(GATEWAY_SETS))
def test_every_gateway_object_has_standard_labels(
    gateway_rendered: dict[str, list[dict[str, Any]]], name: str
) -> None:
    """The gateway's objects carry the standard labels, as every other object."""
    for obj in gateway_rendered[name]:
        labels = obj["metadata"].get("labels", {})
        assert not [label for label in STANDARD_LABELS if not labels.get(label)], obj["kind"]


@pytest.mark.parametrize("name", list(GATEWAY_SETS))
def test_gateway_keys_never_reach_a_configmap_or_a_plain_env_value(
    gateway_rendered: dict[str, list[dict[str, Any]]], name: str
) -> None:
    """LLM_WORKER_GATEWAY_API_KEYS comes from a secretKeyRef, the ConfigMap has no gateway
    key, and the pairs appear in no rendered object but a Secret."""
    objects = gateway_rendered[name]
    env = env_by_name(gateway_container(objects))
    keys_env = env["LLM_WORKER_GATEWAY_API_KEYS"]
    assert set(keys_env) == {"name", "valueFrom"}
    ref = keys_env["valueFrom"]["secretKeyRef"]
    assert ref["name"]
    assert ref["key"]
    plain = {name for name, entry in env.items() if "value" in entry}
    assert not plain & {
        "LLM_WORKER_GATEWAY_API_KEYS",
        "LLM_WORKER_API_KEY",
        "LLM_WORKER_REDIS_URL",
        "LLM_WORKER_REDIS_PASSWORD",
        "LLM_WORKER_REDIS_SENTINEL_PASSWORD",
    }
    data = config_data(objects)
    assert not {k for k in data if k.startswith("LLM_WORKER_GATEWAY_API_KEYS")}
    outside_secrets = yaml.safe_dump_all([o for o in objects if o["kind"] != "Secret"])
    assert GATEWAY_KEY not in outside_secrets
    assert GATEWAY_KEY.split(":", 1)[1] not in outside_secrets


def test_inline_gateway_keys_go_into_secrets_of_the_gateway(
    gateway_rendered: dict[str, list[dict[str, Any]]],
) -> None:
    """gateway.apiKeys.value is stored base64 in the gateway's Secret (not the workers', so
    that changing it restarts no worker) and referenced; the keys file's lines in another."""
    objects = gateway_rendered["gateway-inline"]
    secrets = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Secret"}
    env = env_by_name(gateway_container(objects))
    ref = env["LLM_WORKER_GATEWAY_API_KEYS"]["valueFrom"]["secretKeyRef"]
    pairs = base64.b64decode(secrets[ref["name"]]["data"][ref["key"]]).decode()
    assert pairs == GATEWAY_KEY
    worker_secret = only(objects, "Secret", "worker")
    assert ref["name"] != worker_secret["metadata"]["name"]
    worker_data = [base64.b64decode(v).decode() for v in worker_secret["data"].values()]
    assert not any(GATEWAY_KEY in value for value in worker_data)
    (volume,) = [v for v in gateway_pod(objects)["volumes"] if "secret" in v]
    file_secret = secrets[volume["secret"]["secretName"]]
    (item,) = volume["secret"]["items"]
    lines = base64.b64decode(file_secret["data"][item["key"]]).decode()
    assert lines == f"team-b:{GATEWAY_DIGEST}\n"


def test_gateway_keys_from_existing_secrets_are_referenced(
    gateway_rendered: dict[str, list[dict[str, Any]]],
) -> None:
    """With existing Secrets the gateway references the given names and keys, and the chart
    creates no Secret at all."""
    objects = gateway_rendered["gateway-existing"]
    assert "Secret" not in {o["kind"] for o in objects}
    env = env_by_name(gateway_container(objects))
    assert env["LLM_WORKER_GATEWAY_API_KEYS"]["valueFrom"]["secretKeyRef"] == {
        "name": "gw-keys",
        "key": "pairs",
    }
    (volume,) = [v for v in gateway_pod(objects)["volumes"] if "secret" in v]
    assert volume["secret"]["secretName"] == "gw-keys-file"
    assert volume["secret"]["items"] == [{"key": "lines", "path": "keys.txt"}]


@pytest.mark.parametrize("name", list(GATEWAY_SETS))
def test_gateway_keys_file_is_a_whole_secret_volume(
    gateway_rendered: dict[str, list[dict[str, Any]]], name: str
) -> None:
    """The keys file is mounted read-only as a whole Secret volume (a subPath mount would
    never see an update) and LLM_WORKER_GATEWAY_API_KEYS_FILE names the file in it."""
    objects = gateway_rendered[name]
    container = gateway_container(objects)
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    (volume,) = [v for v in gateway_pod(objects)["volumes"] if "secret" in v]
    mount = mounts[volume["name"]]
    assert mount["readOnly"] is True
    assert "subPath" not in mount
    path = env_by_name(container)["LLM_WORKER_GATEWAY_API_KEYS_FILE"]["value"]
    (item,) = volume["secret"]["items"]
    assert path == f"{mount['mountPath']}/{item['path']}"


def test_gateway_without_a_keys_file_mounts_none() -> None:
    """With name:key pairs only, no keys-file variable, volume or Secret."""
    objects = render({"gateway": {"enabled": True, "apiKeys": {"value": GATEWAY_KEY}}})
    container = gateway_container(objects)
    assert "LLM_WORKER_GATEWAY_API_KEYS_FILE" not in env_by_name(container)
    assert [m["mountPath"] for m in container["volumeMounts"]] == ["/tmp"]
    assert len([o for o in objects if o["kind"] == "Secret"]) == 2  # the workers' and the pairs'


def test_a_keys_file_change_keeps_the_pods_and_a_pairs_change_rolls_them() -> None:
    """The keys file's Secret is outside the pod template's checksums (the kubelet updates
    the mounted file, the gateway rereads it), while the name:key pairs, read at start, are in."""

    def annotations(gateway: dict[str, Any]) -> dict[str, str]:
        values = {"gateway": {"enabled": True, **gateway}}
        deployment = only(render(values), "Deployment", "gateway")
        result: dict[str, str] = deployment["spec"]["template"]["metadata"]["annotations"]
        return result

    base = {"apiKeys": {"value": GATEWAY_KEY}, "keysFile": {"entries": [f"a:{GATEWAY_DIGEST}"]}}
    rotated_file = {**base, "keysFile": {"entries": [f"a:{'f' * 64}"]}}
    rotated_pairs = {**base, "apiKeys": {"value": "team-a:sk-another-secret-key"}}
    assert annotations(base) == annotations(rotated_file)
    assert annotations(base) != annotations(rotated_pairs)


@pytest.mark.parametrize("name", list(GATEWAY_SETS))
def test_gateway_probes_hit_healthz_on_its_port(
    gateway_rendered: dict[str, list[dict[str, Any]]], name: str
) -> None:
    """Liveness is a TCP check of the port named http (a Redis outage must not restart the
    gateways), readiness GET /healthz there; the Service targets it and selects gateway pods
    only (no worker Service or PDB selects them)."""
    objects = gateway_rendered[name]
    container = gateway_container(objects)
    port = GATEWAY_SETS[name]["gateway"].get("port", 8000)
    assert container["livenessProbe"]["tcpSocket"] == {"port": "http"}
    assert "httpGet" not in container["livenessProbe"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "http": port,
        "metrics": 9465,
    }
    service = gateway_service(objects, "http")
    assert [(p["name"], p["targetPort"]) for p in service["spec"]["ports"]] == [("http", "http")]
    gateway_labels = only(objects, "Deployment", "gateway")["spec"]["template"]["metadata"][
        "labels"
    ]
    worker_labels = only(objects, "Deployment", "worker")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= gateway_labels.items()
    assert not service["spec"]["selector"].items() <= worker_labels.items()
    for kind in ("Service", "PodDisruptionBudget"):
        worker_obj = only(objects, kind, "worker")
        selector = worker_obj["spec"]["selector"]
        selector = selector.get("matchLabels", selector)
        assert not selector.items() <= gateway_labels.items(), kind


@pytest.mark.parametrize("name", list(GATEWAY_SETS))
def test_gateway_command_is_one_the_cli_accepts(
    gateway_rendered: dict[str, list[dict[str, Any]]], name: str
) -> None:
    """The container runs `llm-worker gateway` on every interface, on its container port, as
    the CLI's own parser reads the arguments."""
    from worker.cli import build_parser, cmd_gateway

    container = gateway_container(gateway_rendered[name])
    assert container["command"] == ["llm-worker"]
    args = build_parser().parse_args(container["args"])
    assert args.func is cmd_gateway
    assert args.host == "0.0.0.0"
    assert args.port == {p["name"]: p["containerPort"] for p in container["ports"]}["http"]


@pytest.mark.parametrize("name", list(GATEWAY_SETS))
def test_gateway_runs_locked_down_like_the_workers(
    gateway_rendered: dict[str, list[dict[str, Any]]], name: str
) -> None:
    """The gateway pod has the workers' pod and container security contexts, service
    account and image, with /tmp on an emptyDir under the read-only root."""
    objects = gateway_rendered[name]
    pod = gateway_pod(objects)
    worker_pod = only(objects, "Deployment", "worker")["spec"]["template"]["spec"]
    assert pod["securityContext"] == worker_pod["securityContext"]
    assert pod["serviceAccountName"] == worker_pod["serviceAccountName"]
    container = gateway_container(objects)
    assert container["securityContext"] == worker_container(objects)["securityContext"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["image"] == worker_container(objects)["image"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert "emptyDir" in {v["name"]: v for v in pod["volumes"]}[mounts["/tmp"]]


@pytest.mark.parametrize("name", list(GATEWAY_SETS))
def test_gateway_shares_the_workers_config_redis_and_upstream_key(
    gateway_rendered: dict[str, list[dict[str, Any]]], name: str
) -> None:
    """The gateway loads the workers' ConfigMap, their Redis env (URL Secret, Sentinel
    master, password Secrets), the upstream key's secretKeyRef (its fast path calls the
    upstream) and the top-level extraEnv."""
    objects = gateway_rendered[name]
    container = gateway_container(objects)
    assert container["envFrom"] == worker_container(objects)["envFrom"]
    env = env_by_name(container)
    worker_env = env_by_name(worker_container(objects))
    assert env["LLM_WORKER_API_KEY"] == worker_env["LLM_WORKER_API_KEY"]
    assert "value" not in env["LLM_WORKER_API_KEY"]
    redis_vars = {n for n in worker_env if n.startswith("LLM_WORKER_REDIS_")}
    assert "LLM_WORKER_REDIS_URL" in redis_vars
    for var in redis_vars:
        assert env[var] == worker_env[var], var
    for entry in GATEWAY_SETS[name].get("extraEnv", []):
        assert env[entry["name"]] == entry
    for entry in GATEWAY_SETS[name]["gateway"].get("extraEnv", []):
        assert env[entry["name"]] == entry
        assert entry["name"] not in worker_env


def test_gateway_settings_load_from_what_the_chart_renders(
    gateway_rendered: dict[str, list[dict[str, Any]]],
) -> None:
    """The gateway's settings load from the rendered ConfigMap, Secret and env, and hold
    the pairs of gateway.apiKeys and the keys file's path."""
    from worker.settings import settings_from_env

    objects = gateway_rendered["gateway-inline"]
    env = env_by_name(gateway_container(objects))
    secrets = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Secret"}

    def resolve(entry: dict[str, Any]) -> str:
        if "value" in entry:
            return str(entry["value"])
        ref = entry["valueFrom"]["secretKeyRef"]
        if ref["name"] not in secrets:  # the user's own Secret (the Redis password)
            return "from-the-users-secret"
        return base64.b64decode(secrets[ref["name"]]["data"][ref["key"]]).decode()

    loaded = settings_from_env(
        {**config_data(objects), **{name: resolve(entry) for name, entry in env.items()}}
    )
    assert [k.get_secret_value() for k in loaded.gateway_api_keys] == [GATEWAY_KEY]
    assert str(loaded.gateway_api_keys_file) == "/etc/llm-worker/gateway-keys/keys.txt"
    assert loaded.redis_sentinel_master == "mymaster"
    assert loaded.gateway_max_streams == 300


@pytest.mark.parametrize("name", list(GATEWAY_SETS))
def test_gateway_shuts_down_gracefully(
    gateway_rendered: dict[str, list[dict[str, Any]]], name: str
) -> None:
    """A preStop sleep lets endpoints drop the pod before SIGTERM, within a grace period
    that covers it and the SHUTDOWN_GRACE_S after which the fast path hands its jobs back;
    rollouts keep every old pod until a new one is ready."""
    objects = gateway_rendered[name]
    deployment = only(objects, "Deployment", "gateway")
    pod = gateway_pod(objects)
    sleep = gateway_container(objects)["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    shutdown_grace = float(
        config_data(objects).get("LLM_WORKER_SHUTDOWN_GRACE_S", DEFAULT_SHUTDOWN_GRACE_S)
    )
    assert pod["terminationGracePeriodSeconds"] > int(sleep[1]) + shutdown_grace + 10
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    no_sleep = render(
        {"gateway": {"enabled": True, "apiKeys": {"value": GATEWAY_KEY}, "preStopSleepSeconds": 0}}
    )
    assert "lifecycle" not in gateway_container(no_sleep)


def test_gateway_replicas_and_disruption_budget(
    gateway_rendered: dict[str, list[dict[str, Any]]],
) -> None:
    """gateway.replicaCount sets the replicas; the gateway's PDB selects its pods only, with
    maxUnavailable 1 by default, and can be switched off."""
    inline = gateway_rendered["gateway-inline"]
    existing = gateway_rendered["gateway-existing"]
    assert only(inline, "Deployment", "gateway")["spec"]["replicas"] == 2
    assert only(existing, "Deployment", "gateway")["spec"]["replicas"] == 3
    for objects, field, value in ((inline, "maxUnavailable", 1), (existing, "minAvailable", 2)):
        pdb = only(objects, "PodDisruptionBudget", "gateway")
        assert pdb["spec"][field] == value
        assert pdb["spec"]["selector"] == only(objects, "Deployment", "gateway")["spec"]["selector"]
    off = render(
        {
            "gateway": {
                "enabled": True,
                "apiKeys": {"value": GATEWAY_KEY},
                "podDisruptionBudget": {"enabled": False},
            }
        }
    )
    assert "gateway" not in {
        o["metadata"]["labels"]["app.kubernetes.io/component"]
        for o in off
        if o["kind"] == "PodDisruptionBudget"
    }


def test_notes_show_how_to_reach_the_gateway() -> None:
    """NOTES.txt names the gateway's Service and port when it is on, and not otherwise."""

    def notes(values: dict[str, Any] | None) -> str:
        with helm.Chart.load(CHART) as chart:
            manifests = chart.render(values=values, name="rel", namespace="ns")
        (text,) = [t for path, t in manifests.items() if path.endswith("NOTES.txt")]
        return text

    on = notes(GATEWAY_INLINE)
    assert "svc/rel-llm-worker-gateway 8000:8000" in on
    assert "/etc/llm-worker/gateway-keys/keys.txt" in on
    assert GATEWAY_KEY not in on
    assert "gateway" not in notes(None)


def test_gateway_metrics_are_served_apart_from_its_public_service() -> None:
    """The gateway's /metrics port (LLM_WORKER_GATEWAY_METRICS_PORT, 9465) is a container port
    named metrics behind a ClusterIP Service of its own, never on the public Service (the
    series name every tenant); with serviceMonitor on, a ServiceMonitor scrapes it under the
    job deploy/prometheus/prometheus.yml gives it; port 0 renders none of this."""
    values: dict[str, Any] = {
        "serviceMonitor": {"enabled": True, "labels": {"release": "kps"}},
        "gateway": {**GATEWAY_ON, "service": {"type": "LoadBalancer"}},
    }
    objects = render(values)
    ports = {p["name"]: p["containerPort"] for p in gateway_container(objects)["ports"]}
    assert ports["metrics"] == 9465
    public = gateway_service(objects, "http")
    assert public["spec"]["type"] == "LoadBalancer"
    assert [p["name"] for p in public["spec"]["ports"]] == ["http"]
    metrics = gateway_service(objects, "metrics")
    assert metrics["spec"]["type"] == "ClusterIP"
    assert metrics["spec"]["ports"][0]["targetPort"] == "metrics"
    monitor = only(objects, "ServiceMonitor", "gateway")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= metrics["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics"
    assert {"action": "replace", "targetLabel": "job", "replacement": "llm-worker-gateway"} in (
        endpoint["relabelings"]
    )
    assert monitor["metadata"]["labels"]["release"] == "kps"
    prometheus = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    assert jobs["llm-worker-gateway"]["static_configs"][0]["targets"] == ["gateway:9465"]
    worker_selector = only(objects, "ServiceMonitor", "worker")["spec"]["selector"]["matchLabels"]
    assert not worker_selector.items() <= metrics["metadata"]["labels"].items()
    off = render({**values, "config": {"LLM_WORKER_GATEWAY_METRICS_PORT": "0"}})
    assert "metrics" not in {p["name"] for p in gateway_container(off)["ports"]}
    assert "gateway" not in components([o for o in off if o["kind"] == "ServiceMonitor"])
    assert len([o for o in off if o["kind"] == "Service"]) == 2  # the workers' and the public


GATEWAY_ON = {"enabled": True, "apiKeys": {"value": GATEWAY_KEY}}
BAD_GATEWAY_VALUES = [
    pytest.param(
        {"gateway": {**GATEWAY_ON, "livenessProbe": {"tcpSocket": None, "periodSeconds": 5}}},
        ["/gateway/livenessProbe"],
        id="gateway-liveness-without-a-check",
    ),
    pytest.param(
        {"gateway": {**GATEWAY_ON, "replicaCount": -1}},
        ["/gateway/replicaCount", "minimum"],
        id="gateway-negative-replicas",
    ),
    pytest.param(
        {"gateway": {**GATEWAY_ON, "replicaCount": "two"}},
        ["/gateway/replicaCount", "want integer"],
        id="gateway-replicas-wrong-type",
    ),
    pytest.param(
        {"gateway": {**GATEWAY_ON, "enabled": "yes"}},
        ["/gateway/enabled", "want boolean"],
        id="gateway-enabled-wrong-type",
    ),
    pytest.param(
        {"gateway": {**GATEWAY_ON, "port": 70000}},
        ["/gateway/port", "maximum"],
        id="gateway-port-out-of-range",
    ),
    pytest.param(
        {"gateway": {**GATEWAY_ON, "apiKey": "x"}},
        ["/gateway", "additional properties 'apiKey'"],
        id="gateway-unknown-key",
    ),
    pytest.param(
        {"gateway": {**GATEWAY_ON, "keysFile": {"entries": [f"a:{GATEWAY_DIGEST}", "b:sk-oops"]}}},
        ["gateway.keysFile.entries[1] is not name:sha256-of-key", "never the key"],
        id="gateway-keys-file-line-holds-a-key",
    ),
    pytest.param(
        {"gateway": {**GATEWAY_ON, "service": {"type": "Ingress"}}},
        ["/gateway/service/type"],
        id="gateway-service-type",
    ),
    pytest.param(
        {"gateway": {"enabled": True}},
        ["gateway.enabled needs producer keys"],
        id="gateway-without-keys",
    ),
    pytest.param(
        {"config": {"LLM_WORKER_GATEWAY_API_KEYS": "team-a:sk-oops"}},
        ["config.LLM_WORKER_GATEWAY_API_KEYS is not allowed"],
        id="gateway-keys-in-config",
    ),
    pytest.param(
        {"config": {"LLM_WORKER_GATEWAY_API_KEYS_FILE": "/keys"}},
        ["config.LLM_WORKER_GATEWAY_API_KEYS_FILE is not allowed"],
        id="gateway-keys-file-in-config",
    ),
    pytest.param(
        {"gateway": {**GATEWAY_ON, "podDisruptionBudget": {"minAvailable": 1}}},
        ["gateway.podDisruptionBudget: set either minAvailable or maxUnavailable"],
        id="gateway-pdb-both",
    ),
    pytest.param(
        {
            "config": {"LLM_WORKER_GATEWAY_FAST_PATH": "false"},
            "gateway": {**GATEWAY_ON, "terminationGracePeriodSeconds": 5},
        },
        [
            "gateway.terminationGracePeriodSeconds (5) must be greater than",
            "preStopSleepSeconds (5)",
        ],
        id="gateway-grace-within-prestop",
    ),
    pytest.param(
        {"gateway": {**GATEWAY_ON, "terminationGracePeriodSeconds": 310}},
        [
            "gateway.terminationGracePeriodSeconds (310) must be greater than",
            "preStopSleepSeconds (5) + config.LLM_WORKER_SHUTDOWN_GRACE_S (300) + 10",
            "fast path",
        ],
        id="gateway-grace-below-the-fast-path-shutdown",
    ),
]


def test_gateway_grace_follows_the_fast_path() -> None:
    """With the fast path off, the gateway's grace need only cover the preStop sleep and its
    streams; with it on (the default), a raised SHUTDOWN_GRACE_S needs a longer grace."""
    short = {**GATEWAY_ON, "terminationGracePeriodSeconds": 60}
    objects = render({"config": {"LLM_WORKER_GATEWAY_FAST_PATH": "False"}, "gateway": short})
    assert gateway_pod(objects)["terminationGracePeriodSeconds"] == 60
    with pytest.raises(helm.HelmError, match="fast path"):
        render({"gateway": short})
    with pytest.raises(helm.HelmError, match=r"SHUTDOWN_GRACE_S \(400\)"):
        render(
            {
                "config": {"LLM_WORKER_SHUTDOWN_GRACE_S": "400"},
                "terminationGracePeriodSeconds": 500,
                "gateway": GATEWAY_ON,
            }
        )


@pytest.mark.parametrize(("values", "fragments"), BAD_GATEWAY_VALUES)
def test_bad_gateway_values_fail_with_a_clear_message(
    values: dict[str, Any], fragments: list[str]
) -> None:
    """A bad gateway value fails to render with a message naming it, and never echoes the
    producer key."""
    with pytest.raises(helm.HelmError) as excinfo:
        render(values)
    message = str(excinfo.value)
    for fragment in fragments:
        assert fragment in message, message
    assert "sk-gateway-inline-secret" not in message
    assert "sk-oops" not in message
