"""docker-compose.yml: validated by docker-compose itself (no engine needed) and cross-checked."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from worker.settings import Settings

DEFAULT_SHUTDOWN_GRACE_S = str(Settings.model_fields["shutdown_grace_s"].default)

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
CLI_SUBCOMMANDS = {"run", "simulate", "gateway"}  # the `llm-worker` words the stack uses


def compose_command() -> list[str] | None:
    """docker-compose (v1) or the `docker compose` plugin (v2), whichever is installed."""
    if exe := shutil.which("docker-compose"):
        return [exe]
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, text=True, check=False
        )
        if probe.returncode == 0:
            return [docker, "compose"]
    return None


COMPOSE = compose_command()
pytestmark = pytest.mark.skipif(
    COMPOSE is None,
    reason="docker-compose not found (apt-get install docker-compose, or the compose plugin)",
)


def compose_config(*args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `docker-compose -f docker-compose.yml [args] config` and parse its output."""
    assert COMPOSE is not None
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_WORKER_", "GF_"))}
    clean.update(env or {})
    proc = subprocess.run(
        [*COMPOSE, "-f", str(COMPOSE_FILE), *args, "config"],
        cwd=REPO,
        env=clean,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    config: dict[str, Any] = yaml.safe_load(proc.stdout)
    return config


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    """The default configuration as docker-compose resolves it."""
    return compose_config()


@pytest.fixture(scope="module")
def sim_config() -> dict[str, Any]:
    """The documented simulator setup: --profile sim with the worker pointed at it."""
    return compose_config(
        "--profile",
        "sim",
        env={"LLM_WORKER_API_BASE_URL": "http://simulator:8080", "LLM_WORKER_API_KEY": "sim"},
    )


def host_paths(service: dict[str, Any]) -> list[tuple[Path, str]]:
    """Bind-mounted host paths of a service with their container targets."""
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            if volume.get("type") == "bind":
                mounts.append((Path(volume["source"]), volume["target"]))
            continue
        source, target = volume.split(":")[:2]
        if source.startswith(("/", ".")):
            mounts.append(((REPO / source).resolve(), target))
    return mounts


def command_words(service: dict[str, Any]) -> list[str]:
    """A service's command as a list of words."""
    command = service.get("command", [])
    return command.split() if isinstance(command, str) else list(command)


def test_config_validates(config: dict[str, Any]) -> None:
    """docker-compose config accepts the file and sees every service."""
    assert {"redis", "worker", "prometheus", "grafana"} <= set(config["services"])


def test_config_validates_with_sim_profile(sim_config: dict[str, Any]) -> None:
    """The simulator sits behind the `sim` profile, and the profile validates."""
    simulator = sim_config["services"]["simulator"]
    assert simulator["profiles"] == ["sim"]
    assert "profiles" not in sim_config["services"]["worker"]


def test_build_contexts_exist(config: dict[str, Any]) -> None:
    """Every build context is in the repository and holds a Dockerfile."""
    built = {name: s for name, s in config["services"].items() if "build" in s}
    assert {"worker", "simulator"} <= set(built)
    for name, service in built.items():
        build = service["build"]
        context = Path(build["context"] if isinstance(build, dict) else build).resolve()
        dockerfile = build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else ""
        assert context == REPO, f"{name} builds from {context}"
        assert (context / (dockerfile or "Dockerfile")).is_file()
    assert built["worker"]["image"] == built["simulator"]["image"]


def test_mounted_host_paths_exist(config: dict[str, Any]) -> None:
    """Every bind-mounted host path exists in the repository."""
    seen = {}
    for name, service in config["services"].items():
        for path, target in host_paths(service):
            assert path.exists(), f"{name} mounts missing {path}"
            assert REPO in path.parents or path == REPO, f"{name} mounts {path} outside the repo"
            seen[target] = path
    assert seen["/etc/prometheus"] == REPO / "deploy" / "prometheus"
    assert seen["/etc/grafana/provisioning"] == REPO / "deploy" / "grafana" / "provisioning"
    assert seen["/var/lib/grafana/dashboards"] == REPO / "deploy" / "grafana" / "dashboards"


def test_prometheus_config_and_rules_are_mounted(config: dict[str, Any]) -> None:
    """Prometheus reads deploy/prometheus/prometheus.yml, whose rules and target exist."""
    prometheus = config["services"]["prometheus"]
    flags = dict(w.split("=", 1) for w in command_words(prometheus) if "=" in w)
    assert flags["--config.file"] == "/etc/prometheus/prometheus.yml"
    prom_dir = REPO / "deploy" / "prometheus"
    prom_config = yaml.safe_load((prom_dir / "prometheus.yml").read_text())
    for rule_file in prom_config.get("rule_files", []):
        relative = rule_file.removeprefix("/etc/prometheus/")
        assert (prom_dir / relative).is_file(), rule_file
    targets = [
        target
        for job in prom_config["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    ]
    assert "worker:9464" in targets


def test_worker_runs_llm_worker_subcommands(sim_config: dict[str, Any]) -> None:
    """The worker runs `llm-worker run` and the simulator `llm-worker simulate` on 8080."""
    services = sim_config["services"]
    worker = command_words(services["worker"])
    simulator = command_words(services["simulator"])
    assert worker[0] == "run"
    assert simulator[:5] == ["simulate", "--host", "0.0.0.0", "--port", "8080"]
    assert {worker[0], simulator[0]} <= CLI_SUBCOMMANDS
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(r'^ENTRYPOINT \["llm-worker"\]', dockerfile, re.M)


def test_sim_profile_wires_the_worker_to_the_simulator(sim_config: dict[str, Any]) -> None:
    """With the documented variables the worker calls the simulator with the key it accepts."""
    services = sim_config["services"]
    env = services["worker"]["environment"]
    assert env["LLM_WORKER_API_BASE_URL"] == "http://simulator:8080"
    simulator = command_words(services["simulator"])
    assert simulator[simulator.index("--api-key") + 1] == env["LLM_WORKER_API_KEY"] == "sim"
    assert "8080" in [str(p) for p in services["simulator"].get("expose", [])]


def test_worker_settings(config: dict[str, Any]) -> None:
    """The worker uses gevent, the compose Redis, and a concurrency overridable from env."""
    worker = config["services"]["worker"]
    env = worker["environment"]
    assert env["LLM_WORKER_POOL"] == "gevent"
    assert env["LLM_WORKER_REDIS_URL"] == "redis://redis:6379/0"
    assert int(env["LLM_WORKER_CONCURRENCY"]) > 0
    assert "LLM_WORKER_API_KEY" in env
    overridden = compose_config(env={"LLM_WORKER_CONCURRENCY": "37", "LLM_WORKER_API_KEY": "k"})
    assert overridden["services"]["worker"]["environment"]["LLM_WORKER_CONCURRENCY"] == "37"
    assert overridden["services"]["worker"]["environment"]["LLM_WORKER_API_KEY"] == "k"
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"


def test_worker_scales(config: dict[str, Any]) -> None:
    """The worker has no container_name and publishes no host port, so --scale works."""
    worker = config["services"]["worker"]
    assert "container_name" not in worker
    assert "ports" not in worker


def test_worker_grace_period_covers_the_shutdown_grace(config: dict[str, Any]) -> None:
    """stop_grace_period exceeds LLM_WORKER_SHUTDOWN_GRACE_S (SIGTERM is a warm shutdown)."""
    worker = config["services"]["worker"]
    grace = worker["stop_grace_period"]
    match = re.fullmatch(r"(?:(\d+)m)?(\d+)s", grace)
    assert match, grace
    seconds = int(match.group(1) or 0) * 60 + int(match.group(2))
    assert (
        seconds
        > float(worker["environment"].get("LLM_WORKER_SHUTDOWN_GRACE_S", DEFAULT_SHUTDOWN_GRACE_S))
        + 10
    )


def test_redis_is_durable_and_never_evicts(config: dict[str, Any]) -> None:
    """Redis 7 runs with appendonly yes, maxmemory-policy noeviction and a data volume."""
    redis = config["services"]["redis"]
    assert redis["image"].startswith("redis:7")
    command = " ".join(command_words(redis))
    assert "--appendonly yes" in command
    assert "--maxmemory-policy noeviction" in command
    data = [v for v in redis["volumes"] if isinstance(v, str) and ":/data" in v]
    assert data, redis["volumes"]
    assert data[0].split(":")[0] in config["volumes"]


def test_every_long_running_service_has_a_healthcheck(sim_config: dict[str, Any]) -> None:
    """Redis, worker, simulator, Prometheus and Grafana each declare a healthcheck."""
    for name in ("redis", "worker", "simulator", "prometheus", "grafana"):
        test = sim_config["services"][name]["healthcheck"]["test"]
        assert test[0] in {"CMD", "CMD-SHELL"}, name
    worker_check = " ".join(sim_config["services"]["worker"]["healthcheck"]["test"])
    assert "/healthz" in worker_check
    assert "9464" in worker_check
    grafana = sim_config["services"]["grafana"]
    assert grafana["depends_on"]["prometheus"]["condition"] == "service_healthy"
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


def test_rabbitmq_profile_wires_the_worker_to_a_durable_rabbitmq() -> None:
    """--profile rabbitmq with the documented broker URL: a RabbitMQ service (3.10 or later,
    for quorum queues) with its data on a volume, and the worker's broker pointing at it;
    without the profile the broker stays the Redis."""
    from worker.settings import load_settings

    url = "amqp://llmw:llmw@rabbitmq:5672//"
    rabbit = compose_config("--profile", "rabbitmq", env={"LLM_WORKER_BROKER_URL": url})
    service = rabbit["services"]["rabbitmq"]
    major, minor = (int(x) for x in service["image"].split(":")[1].split("-")[0].split(".")[:2])
    assert (major, minor) >= (3, 10)
    assert any("/var/lib/rabbitmq" in str(v) for v in service["volumes"])
    env = rabbit["services"]["worker"]["environment"]
    assert env["LLM_WORKER_BROKER_URL"] == url
    user = service["environment"]["RABBITMQ_DEFAULT_USER"]
    assert url.startswith(f"amqp://{user}:")
    default = compose_config()["services"]["worker"]["environment"]
    assert default["LLM_WORKER_BROKER_URL"] == default["LLM_WORKER_REDIS_URL"]
    assert load_settings(broker_url=url).effective_broker_url == url


@pytest.fixture(scope="module")
def sentinel_config() -> dict[str, Any]:
    """The documented Sentinel setup: --profile sentinel."""
    return compose_config("--profile", "sentinel", env={"LLM_WORKER_API_KEY": "sk-x"})


SENTINEL_SERVICES = {
    "redis-master",
    "redis-replica",
    "sentinel-1",
    "sentinel-2",
    "sentinel-3",
    "worker-sentinel",
}


def test_sentinel_profile_runs_a_master_a_replica_three_sentinels_and_a_worker(
    config: dict[str, Any], sentinel_config: dict[str, Any]
) -> None:
    """The profile validates; its services (each with a healthcheck) stay out of the default
    stack; the replica follows the master and every Sentinel watches it with quorum 2."""
    # (docker-compose config lists every service; the profile keeps these out of `up`.)
    assert all(config["services"][name]["profiles"] == ["sentinel"] for name in SENTINEL_SERVICES)
    assert "profiles" not in config["services"]["worker"]
    services = sentinel_config["services"]
    assert set(services) >= SENTINEL_SERVICES
    for name in SENTINEL_SERVICES:
        assert services[name]["profiles"] == ["sentinel"], name
        assert services[name]["healthcheck"]["test"][0] in {"CMD", "CMD-SHELL"}, name
    assert "--replicaof redis-master 6379" in " ".join(command_words(services["redis-replica"]))
    for name in ("redis-master", "redis-replica"):
        assert "--maxmemory-policy noeviction" in " ".join(command_words(services[name]))
    for name in ("sentinel-1", "sentinel-2", "sentinel-3"):
        script = " ".join(command_words(services[name]))
        assert "sentinel monitor llmw redis-master 6379 2" in script
        assert "--sentinel" in script
        assert services[name]["environment"]["SENTINEL_NAME"] == name


def test_sentinel_worker_finds_the_master_through_the_three_sentinels(
    sentinel_config: dict[str, Any],
) -> None:
    """worker-sentinel's settings load: a sentinel:// URL naming the three Sentinels and the
    service name they monitor."""
    from worker.connections.urls import parse_sentinel_url
    from worker.settings import settings_from_env

    worker = sentinel_config["services"]["worker-sentinel"]
    env = {k: str(v) for k, v in worker["environment"].items()}
    settings = settings_from_env(env)
    assert settings.redis_sentinel_master == "llmw"
    hosts = parse_sentinel_url(settings.redis_url).hosts
    assert hosts == (("sentinel-1", 26379), ("sentinel-2", 26379), ("sentinel-3", 26379))
    assert settings.redis_min_replicas_ack == 0
    for name in ("sentinel-1", "sentinel-2", "sentinel-3", "redis-replica"):
        assert worker["depends_on"][name]["condition"] == "service_healthy"


# -- profile "gateway" ------------------------------------------------------------------------

GATEWAY_PAIRS = "team-a:sk-compose-gateway-key"
KEYS_DIR_TARGET = "/etc/llm-worker/gateway"


@pytest.fixture(scope="module")
def gateway_config() -> dict[str, Any]:
    """The documented gateway setup: --profile gateway with producer keys in the environment."""
    return compose_config(
        "--profile", "gateway", env={"LLM_WORKER_GATEWAY_API_KEYS": GATEWAY_PAIRS}
    )


def test_gateway_is_behind_its_profile(
    config: dict[str, Any], gateway_config: dict[str, Any]
) -> None:
    """The gateway sits behind the `gateway` profile (a plain `up` starts what it did), and
    the file validates with the profile on."""
    assert config["services"]["gateway"]["profiles"] == ["gateway"]
    for name in ("redis", "worker", "prometheus", "grafana"):
        assert "profiles" not in config["services"][name], name
    assert gateway_config["services"]["gateway"]["profiles"] == ["gateway"]


def test_gateway_runs_llm_worker_gateway_on_a_published_port(
    gateway_config: dict[str, Any],
) -> None:
    """The gateway runs the worker's image as `llm-worker gateway` on every interface of its
    container, published on the host's loopback, after Redis is healthy."""
    from worker.cli import build_parser, cmd_gateway

    services = gateway_config["services"]
    gateway = services["gateway"]
    assert gateway["image"] == services["worker"]["image"]
    args = build_parser().parse_args(command_words(gateway))
    assert args.func is cmd_gateway
    assert args.host == "0.0.0.0"
    (published,) = gateway["ports"]
    host_ip, host_port, target = str(published).removesuffix("/tcp").split(":")
    assert host_ip == "127.0.0.1"
    assert int(target) == args.port
    assert host_port == "8000"
    moved = compose_config("--profile", "gateway", env={"LLM_WORKER_GATEWAY_HOST_PORT": "18000"})
    assert str(moved["services"]["gateway"]["ports"][0]).startswith("127.0.0.1:18000:")
    assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
    assert gateway["environment"]["LLM_WORKER_REDIS_URL"] == "redis://redis:6379/0"


def test_gateway_healthcheck_probes_its_own_healthz(gateway_config: dict[str, Any]) -> None:
    """The gateway's healthcheck GETs /healthz on the gateway's port (not the worker's 9464,
    which the image's HEALTHCHECK probes), and its stop grace covers SHUTDOWN_GRACE_S."""
    gateway = gateway_config["services"]["gateway"]
    port = str(build_port(gateway))
    check = " ".join(gateway["healthcheck"]["test"])
    assert gateway["healthcheck"]["test"][0] == "CMD"
    assert f"127.0.0.1:{port}/healthz" in check
    assert "9464" not in check
    grace = re.fullmatch(r"(\d+)s", gateway["stop_grace_period"])
    assert grace, gateway["stop_grace_period"]
    shutdown_grace = gateway["environment"].get(
        "LLM_WORKER_SHUTDOWN_GRACE_S", DEFAULT_SHUTDOWN_GRACE_S
    )
    assert int(grace.group(1)) > float(shutdown_grace) + 10  # the fast path's hand-back


def test_every_prometheus_target_is_a_service_port(gateway_config: dict[str, Any]) -> None:
    """Each static target of deploy/prometheus/prometheus.yml is a compose service exposing
    that port, with the metrics server on it: the worker on 9464, the gateway on 9465."""
    prom_config = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    services = gateway_config["services"]
    ports = {
        "worker": "LLM_WORKER_METRICS_PORT",
        "gateway": "LLM_WORKER_GATEWAY_METRICS_PORT",
    }
    seen = set()
    for job in prom_config["scrape_configs"]:
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, port = target.split(":")
                assert port in [str(p) for p in services[host].get("expose", [])], target
                assert str(services[host]["environment"][ports[host]]) == port, target
                seen.add(host)
    assert seen == {"worker", "gateway"}


def test_gateway_calls_the_upstream_the_worker_calls(sim_config: dict[str, Any]) -> None:
    """The gateway gets the worker's upstream URL and key (its fast path runs jobs itself):
    with --profile sim and the documented variables, both call the simulator with its key."""
    services = sim_config["services"]
    gateway, worker = services["gateway"]["environment"], services["worker"]["environment"]
    for name in ("LLM_WORKER_API_BASE_URL", "LLM_WORKER_API_KEY", "LLM_WORKER_BROKER_URL"):
        assert gateway[name] == worker[name], name
    assert gateway["LLM_WORKER_API_BASE_URL"] == "http://simulator:8080"


def build_port(service: dict[str, Any]) -> int:
    """The --port a service's `llm-worker gateway` command gives."""
    words = command_words(service)
    return int(words[words.index("--port") + 1])


def test_gateway_keys_come_from_the_environment_never_the_file(
    config: dict[str, Any], gateway_config: dict[str, Any]
) -> None:
    """LLM_WORKER_GATEWAY_API_KEYS is taken from the environment (or .env) and is empty
    otherwise (the gateway then refuses to start, saying so): docker-compose.yml holds no key;
    the gateway's settings load from what compose resolves."""
    from worker.settings import settings_from_env

    assert config["services"]["gateway"]["environment"]["LLM_WORKER_GATEWAY_API_KEYS"] == ""
    raw = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["gateway"]["environment"]
    assert raw["LLM_WORKER_GATEWAY_API_KEYS"] == "${LLM_WORKER_GATEWAY_API_KEYS:-}"
    env = {k: str(v) for k, v in gateway_config["services"]["gateway"]["environment"].items()}
    assert env["LLM_WORKER_GATEWAY_API_KEYS"] == GATEWAY_PAIRS
    settings = settings_from_env(env)
    assert [k.get_secret_value() for k in settings.gateway_api_keys] == [GATEWAY_PAIRS]
    assert settings.gateway_api_keys_file is None


def test_gateway_keys_file_directory_is_mounted_read_only() -> None:
    """The keys directory (./deploy/gateway) is mounted read-only as a directory, so that a
    keys file replaced by rename is seen inside; the documented path of the file in it loads,
    the shipped example parses, and keys.txt itself is ignored by git."""
    from worker.accounting.tenancy import parse_keys_file
    from worker.settings import settings_from_env

    path = f"{KEYS_DIR_TARGET}/keys.txt"
    with_file = compose_config(
        "--profile", "gateway", env={"LLM_WORKER_GATEWAY_API_KEYS_FILE": path}
    )
    gateway = with_file["services"]["gateway"]
    mounts = [v for v in gateway["volumes"] if isinstance(v, str) and KEYS_DIR_TARGET in v]
    (mount,) = mounts
    source, target, mode = mount.split(":")
    assert (target, mode) == (KEYS_DIR_TARGET, "ro")
    assert Path(source) == REPO / "deploy" / "gateway"
    assert Path(source).is_dir()
    env = {k: str(v) for k, v in gateway["environment"].items()}
    assert str(settings_from_env(env).gateway_api_keys_file) == path
    example = (REPO / "deploy" / "gateway" / "keys.txt.example").read_text()
    assert parse_keys_file(example) == []  # comments only: no working key is shipped
    assert path in example
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "deploy/gateway/keys.txt"], cwd=REPO, check=False
    )
    assert ignored.returncode == 0, "deploy/gateway/keys.txt must be ignored by git"
