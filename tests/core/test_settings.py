"""worker.settings: defaults, environment parsing, and errors that name the variable."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from worker.catalogue import MAX_TOKENS_CAP, ModelSpec
from worker.errors import SettingsError
from worker.settings import SEED_MODELS, RateLimit, Settings, load_settings

CANARY = "sk-canary-4f9a2b7c"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No LLM_WORKER_* variable and no .env from the developer's machine."""
    for name in list(os.environ):
        if name.startswith("LLM_WORKER_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def _error(monkeypatch: pytest.MonkeyPatch, **env: str) -> SettingsError:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    return info.value


def test_defaults_match_the_design() -> None:
    """With no environment, every setting has the default the design page lists."""
    s = load_settings()
    assert str(s.redis_url) == "redis://localhost:6379/0"
    assert str(s.api_base_url).rstrip("/") == "https://api.woagent.net"
    assert s.api_key is None
    assert s.api_key_value() is None
    assert s.allowed_models is None  # unset: the catalogue's models
    assert s.catalogue.allowed == SEED_MODELS
    assert len(SEED_MODELS) == 7
    assert {name: spec.max_tokens for name, spec in s.models.items()} == dict.fromkeys(
        SEED_MODELS, 8192
    )
    assert s.max_attempts == 5
    assert (s.backoff_base_s, s.backoff_max_s) == (0.5, 30.0)
    assert (s.connect_timeout_s, s.first_byte_timeout_s, s.idle_timeout_s) == (10, 120, 60)
    assert s.job_deadline_s == 900
    assert s.result_ttl_s == 86_400
    assert s.pool == "gevent"
    assert s.concurrency == 200
    assert s.metrics_port == 9464
    assert (s.log_level, s.log_format) == ("INFO", "json")
    assert s.key_prefix == "llmw"
    assert s.queue == "llmw"
    assert s.rate_limits == {}


def test_default_visibility_timeout_follows_the_lease_not_the_deadline() -> None:
    """Without a setting, a lapsed delivery comes back after 1.5 lease TTLs (30 s at the
    defaults), whatever the deadline: workers refresh what they hold, so it bounds recovery."""
    s = load_settings()
    assert s.effective_visibility_timeout_s == 1.5 * s.lease_ttl_s == 30
    assert load_settings(job_deadline_s=5000).effective_visibility_timeout_s == 30
    assert load_settings(lease_ttl_s=40).effective_visibility_timeout_s == 60


def test_explicit_visibility_timeout_is_used() -> None:
    """A visibility timeout above the lease TTL is taken as given."""
    assert load_settings(visibility_timeout_s=1000).effective_visibility_timeout_s == 1000


def test_environment_overrides_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """LLM_WORKER_* variables set the matching fields, with type conversion."""
    monkeypatch.setenv("LLM_WORKER_MAX_ATTEMPTS", "7")
    monkeypatch.setenv("LLM_WORKER_POOL", "threads")
    monkeypatch.setenv("LLM_WORKER_LOG_LEVEL", "debug")
    monkeypatch.setenv("LLM_WORKER_REDIS_URL", "redis://cache:6380/2")
    s = load_settings()
    assert s.max_attempts == 7
    assert s.pool == "threads"
    assert s.log_level == "DEBUG"
    assert str(s.redis_url) == "redis://cache:6380/2"


def test_keyword_overrides_win_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """load_settings(**overrides) takes precedence over the environment."""
    monkeypatch.setenv("LLM_WORKER_CONCURRENCY", "10")
    assert load_settings(concurrency=20).concurrency == 20


def test_settings_are_frozen() -> None:
    """A Settings object cannot be changed after it is built."""
    s = load_settings()
    with pytest.raises(Exception):  # noqa: B017, PT011 - pydantic's frozen error is a ValidationError
        s.max_attempts = 9  # type: ignore[misc]


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("LLM_WORKER_MAX_ATTEMPTS", "zero"),
        ("LLM_WORKER_MAX_ATTEMPTS", "0"),
        ("LLM_WORKER_POOL", "fork"),
        ("LLM_WORKER_REDIS_URL", "http://x"),
        ("LLM_WORKER_API_BASE_URL", "ftp://x"),
        ("LLM_WORKER_BACKOFF_BASE_S", "-1"),
        ("LLM_WORKER_CONCURRENCY", "0"),
        ("LLM_WORKER_PROCESSES", "0"),
        ("LLM_WORKER_PROCESSES", "65"),
        ("LLM_WORKER_PROCESSES", "two"),
        ("LLM_WORKER_METRICS_PORT", "70000"),
        ("LLM_WORKER_PUBLISH_LINGER_S", "-0.001"),
        ("LLM_WORKER_PUBLISH_LINGER_S", "1"),
        ("LLM_WORKER_GATEWAY_METRICS_PORT", "-1"),
        ("LLM_WORKER_GATEWAY_METRICS_PORT", "nine"),
        ("LLM_WORKER_LOG_FORMAT", "xml"),
        ("LLM_WORKER_LOG_LEVEL", "loud"),
        ("LLM_WORKER_KEY_PREFIX", "has space"),
        ("LLM_WORKER_RESULT_TTL_S", "0"),
        ("LLM_WORKER_RATE_LIMITS", '{"m": {"rpm": -1}}'),
        ("LLM_WORKER_RATE_LIMITS", '{"m": {"rps": 5}}'),
        ("LLM_WORKER_ALLOWED_MODELS", "[not json"),
        ("LLM_WORKER_ALLOWED_MODELS", "has space"),
        ("LLM_WORKER_ALLOWED_MODELS", '["a", 7]'),
        ("LLM_WORKER_QUEUE", "llmw\n"),
        ("LLM_WORKER_KEY_PREFIX", "llmw\n"),
        ("LLM_WORKER_KEY_PREFIX", "x" * 201),
    ],
)
def test_bad_value_names_its_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    """Each malformed value raises SettingsError whose message names the variable."""
    error = _error(monkeypatch, **{variable: value})
    assert variable in str(error)
    assert variable in [name for name, _ in error.problems]


def test_rate_limits_that_are_not_json_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """LLM_WORKER_RATE_LIMITS='not json' raises our SettingsError, naming the variable."""
    error = _error(monkeypatch, LLM_WORKER_RATE_LIMITS="not json")
    assert "LLM_WORKER_RATE_LIMITS" in str(error)


@pytest.mark.parametrize(
    ("variable", "env"),
    [
        (
            "LLM_WORKER_VISIBILITY_TIMEOUT_S",
            {"LLM_WORKER_VISIBILITY_TIMEOUT_S": "20", "LLM_WORKER_LEASE_TTL_S": "30"},
        ),
        (
            "LLM_WORKER_BACKOFF_MAX_S",
            {"LLM_WORKER_BACKOFF_BASE_S": "5", "LLM_WORKER_BACKOFF_MAX_S": "1"},
        ),
        ("LLM_WORKER_PROCESSES", {"LLM_WORKER_PROCESSES": "2", "LLM_WORKER_POOL": "prefork"}),
    ],
)
def test_inconsistent_pair_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, env: dict[str, str]
) -> None:
    """A value that contradicts another setting is refused, naming the variable to fix."""
    error = _error(monkeypatch, **env)
    assert variable in str(error)


@pytest.mark.parametrize(
    "env",
    [
        {"LLM_WORKER_VISIBILITY_TIMEOUT_S": "20", "LLM_WORKER_LEASE_TTL_S": "30"},
        {"LLM_WORKER_RESULT_TTL_S": "50", "LLM_WORKER_VISIBILITY_TIMEOUT_S": "30"},
        {"LLM_WORKER_RESULT_TTL_S": "40"},  # against the default visibility timeout, 30
        {"LLM_WORKER_BACKOFF_BASE_S": "5", "LLM_WORKER_BACKOFF_MAX_S": "1"},
    ],
)
def test_inconsistent_pair_is_refused(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    """A visibility timeout not above the lease TTL, a result TTL not above twice the
    visibility timeout, or backoff max below base is refused, naming both variables."""
    error = _error(monkeypatch, **env)
    assert "must" in str(error)
    text = str(error)
    named = set(env) | (
        {"LLM_WORKER_VISIBILITY_TIMEOUT_S"} if "LLM_WORKER_RESULT_TTL_S" in env else set()
    )
    for name in named - {"LLM_WORKER_BACKOFF_BASE_S", "LLM_WORKER_BACKOFF_MAX_S"}:
        assert name in text, name


def test_several_bad_values_are_all_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """One SettingsError names every bad variable, not just the first."""
    error = _error(
        monkeypatch,
        LLM_WORKER_MAX_ATTEMPTS="zero",
        LLM_WORKER_POOL="fork",
        LLM_WORKER_REDIS_URL="http://x",
    )
    text = str(error)
    for variable in ("LLM_WORKER_MAX_ATTEMPTS", "LLM_WORKER_POOL", "LLM_WORKER_REDIS_URL"):
        assert variable in text


def test_bad_value_is_quoted_in_the_message(monkeypatch: pytest.MonkeyPatch) -> None:
    """The message shows the offending (non-secret) value so the user can find it."""
    error = _error(monkeypatch, LLM_WORKER_POOL="fork")
    assert "'fork'" in str(error)


def test_api_key_is_a_secret_in_repr_and_str(monkeypatch: pytest.MonkeyPatch) -> None:
    """repr() and str() of Settings never show the key; api_key_value() returns it."""
    monkeypatch.setenv("LLM_WORKER_API_KEY", CANARY)
    s = load_settings()
    assert CANARY not in repr(s)
    assert CANARY not in str(s)
    assert CANARY not in repr(s.model_dump())
    assert s.api_key_value() == CANARY


def test_api_key_never_appears_in_a_settings_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """When other settings fail, the error does not echo the key."""
    error = _error(monkeypatch, LLM_WORKER_API_KEY=CANARY, LLM_WORKER_MAX_ATTEMPTS="zero")
    assert CANARY not in str(error)
    assert CANARY not in repr(error.problems)


def test_bad_api_key_is_named_without_its_value() -> None:
    """A malformed key names LLM_WORKER_API_KEY but never shows the value."""
    with pytest.raises(SettingsError) as info:
        load_settings(api_key=[CANARY])
    assert "LLM_WORKER_API_KEY" in str(info.value)
    assert CANARY not in str(info.value)
    assert CANARY not in repr(info.value.problems)


def test_api_key_in_a_whole_settings_error_is_hidden() -> None:
    """A cross-field error raised while a key is set does not show the key."""
    with pytest.raises(SettingsError) as info:
        load_settings(api_key=CANARY, backoff_base_s=5, backoff_max_s=1)
    assert CANARY not in str(info.value)


@pytest.mark.parametrize("value", ["", "   "])
def test_empty_api_key_means_none(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    """An empty LLM_WORKER_API_KEY (docker-compose's ${X:-}) means no key."""
    monkeypatch.setenv("LLM_WORKER_API_KEY", value)
    s = load_settings()
    assert s.api_key is None
    assert s.api_key_value() is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("a,b", ("a", "b")),
        (" a , b ,", ("a", "b")),
        ('["a","b"]', ("a", "b")),
        ("deepseek-ai/DeepSeek-V3", ("deepseek-ai/DeepSeek-V3",)),
        ("", ()),
    ],
)
def test_allowed_models_forms(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: tuple[str, ...]
) -> None:
    """ALLOWED_MODELS accepts a comma list, a JSON list, or empty (meaning any model)."""
    monkeypatch.setenv("LLM_WORKER_ALLOWED_MODELS", value)
    assert load_settings().allowed_models == expected
    assert load_settings().catalogue.allowed == expected


def test_dotenv_in_the_working_directory_is_read(tmp_path: Path) -> None:
    """A .env file in the current directory supplies settings; unrelated lines are ignored."""
    (tmp_path / ".env").write_text(
        "LLM_WORKER_MAX_ATTEMPTS=3\nLLM_WORKER_KEY_PREFIX=test\nOTHER_TOOL_SETTING=1\n",
        encoding="utf-8",
    )
    s = load_settings()
    assert s.max_attempts == 3
    assert s.key_prefix == "test"


def test_environment_wins_over_dotenv(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A real environment variable overrides the same name in .env."""
    (tmp_path / ".env").write_text("LLM_WORKER_MAX_ATTEMPTS=3\n", encoding="utf-8")
    monkeypatch.setenv("LLM_WORKER_MAX_ATTEMPTS", "4")
    assert load_settings().max_attempts == 4


def test_bad_value_in_dotenv_names_the_variable(tmp_path: Path) -> None:
    """A malformed value read from .env is reported by its variable name too."""
    (tmp_path / ".env").write_text("LLM_WORKER_POOL=fork\n", encoding="utf-8")
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert "LLM_WORKER_POOL" in str(info.value)


def test_rate_limits_are_parsed_into_rate_limit_objects(monkeypatch: pytest.MonkeyPatch) -> None:
    """RATE_LIMITS JSON becomes RateLimit values; absent limits are None."""
    monkeypatch.setenv(
        "LLM_WORKER_RATE_LIMITS",
        '{"default": {"rpm": 60}, "m": {"rpm": 10, "input_tpm": 1000, "max_in_flight": 4}}',
    )
    s = load_settings()
    assert s.rate_limits["m"] == RateLimit(rpm=10, input_tpm=1000, max_in_flight=4)
    assert s.rate_limits["m"].output_tpm is None
    assert isinstance(s.rate_limits["default"], RateLimit)


def test_rate_limit_for_falls_back_to_default() -> None:
    """rate_limit_for(model) is the model's limit, else 'default', else None."""
    s = load_settings(rate_limits={"default": {"rpm": 60}, "m": {"rpm": 10}})
    assert s.rate_limit_for("m") == RateLimit(rpm=10)
    assert s.rate_limit_for("other") == RateLimit(rpm=60)
    assert load_settings(rate_limits={"m": {"rpm": 10}}).rate_limit_for("other") is None


def test_effective_broker_url_defaults_to_the_redis_url(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without BROKER_URL the Celery broker is the Redis URL; with it, the broker URL."""
    monkeypatch.setenv("LLM_WORKER_REDIS_URL", "redis://cache:6380/1")
    assert load_settings().effective_broker_url == "redis://cache:6380/1"
    monkeypatch.setenv("LLM_WORKER_BROKER_URL", "amqp://guest@rabbit//")
    assert load_settings().effective_broker_url.startswith("amqp://guest@rabbit")


def test_settings_class_reads_the_same_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings() directly sees the LLM_WORKER_ prefix as load_settings does."""
    monkeypatch.setenv("LLM_WORKER_METRICS_PORT", "9999")
    assert Settings().metrics_port == 9999


# --- LLM_WORKER_MODELS: the catalogue ------------------------------------------------------


def test_models_replace_the_default_catalogue_and_become_the_allowed_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """LLM_WORKER_MODELS replaces the defaults whole; unset ALLOWED_MODELS follows it."""
    monkeypatch.setenv(
        "LLM_WORKER_MODELS",
        '{"vendor/a": {"max_tokens": 4096, "context_window": 65536, "aliases": ["a"]},'
        ' "vendor/b": {"max_tokens": 32000}}',
    )
    s = load_settings()
    assert s.models == {
        "vendor/a": ModelSpec(max_tokens=4096, context_window=65536, aliases=("a",)),
        "vendor/b": ModelSpec(max_tokens=32000),
    }
    assert s.catalogue.allowed == ("vendor/a", "vendor/b")
    assert s.catalogue.canonical("a") == "vendor/a"
    assert s.catalogue.max_tokens("a") == 4096
    assert not s.catalogue.allows(SEED_MODELS[0])


def test_allowed_models_narrow_or_widen_the_catalogue(monkeypatch: pytest.MonkeyPatch) -> None:
    """ALLOWED_MODELS may name a subset (an alias names its model), a model the catalogue
    does not know (bounded by the global cap), or be empty (any model)."""
    monkeypatch.setenv("LLM_WORKER_MODELS", '{"vendor/a": {"max_tokens": 10, "aliases": ["a"]}}')
    monkeypatch.setenv("LLM_WORKER_ALLOWED_MODELS", "a,vendor/new")
    catalogue = load_settings().catalogue
    assert catalogue.allowed == ("vendor/a", "vendor/new")
    assert catalogue.max_tokens("vendor/new") == MAX_TOKENS_CAP
    monkeypatch.setenv("LLM_WORKER_ALLOWED_MODELS", "")
    assert load_settings().catalogue.allows("anything/else")


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "dictionary"),
        ("{}", "lists no model"),
        ('{"m": {"max_tokens": 0}}', "greater than or equal to 1"),
        ('{"m": {"max_tokens": -5}}', "greater than or equal to 1"),
        ('{"m": {"max_tokens": 1000001}}', "less than or equal to 1000000"),
        ('{"m": {"max_tokens": true}}', "valid integer"),
        ('{"m": {"max_tokens": "8192"}}', "valid integer"),
        ('{"m": {"max_tokens": 8192.5}}', "valid integer"),
        ('{"m": {}}', "Field required"),
        ('{"m": {"max_tokens": 10, "max_output": 5}}', "Extra inputs are not permitted"),
        ('{"m": {"max_tokens": 10, "context_window": 5}}', "exceeds context_window"),
        ('{"m": {"max_tokens": 10, "aliases": "x"}}', "tuple"),
        ('{"m": {"max_tokens": 10, "aliases": ["has space"]}}', "1-128 characters"),
        ('{"bad name": {"max_tokens": 10}}', "1-128 characters"),
        ('{"m": {"max_tokens": 10, "aliases": ["n"]}, "n": {"max_tokens": 5}}', "model's name"),
        (
            '{"m": {"max_tokens": 10, "aliases": ["x"]}, "n": {"max_tokens": 5, "aliases": ["x"]}}',
            "names both",
        ),
    ],
)
def test_a_bad_catalogue_fails_at_start_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, value: str, fragment: str
) -> None:
    """Malformed JSON, an empty catalogue, unknown fields, a max_tokens that is 0, negative,
    over the cap, a bool, a string or a fraction, a context window below it, a bad name or an
    ambiguous alias: SettingsError naming LLM_WORKER_MODELS and what is wrong."""
    error = _error(monkeypatch, LLM_WORKER_MODELS=value)
    assert [name for name, _ in error.problems] == ["LLM_WORKER_MODELS"]
    assert fragment in str(error)


def test_a_catalogue_given_in_code_is_checked_the_same_way() -> None:
    """load_settings(models=...) takes JSON text or a mapping, with the same checks."""
    assert load_settings(models='{"m": {"max_tokens": 3}}').catalogue.max_tokens("m") == 3
    assert load_settings(models={"m": {"max_tokens": 3}}).catalogue.max_tokens("m") == 3
    with pytest.raises(SettingsError, match="LLM_WORKER_MODELS"):
        load_settings(models={"m": {"max_tokens": 0}})


def test_settings_round_trip_keeps_the_catalogue() -> None:
    """Settings rebuilt from their own values (as clients do) keep the same catalogue."""
    s = load_settings(models={"m": {"max_tokens": 3, "aliases": ["mm"]}}, allowed_models="m,x")
    again = load_settings(**dict(s))
    assert again.catalogue == s.catalogue


def test_processes_default_to_one_per_usable_core(monkeypatch: pytest.MonkeyPatch) -> None:
    """PROCESSES is `auto` by default: one per usable core; prefork (which forks its own) 1."""
    monkeypatch.setattr("worker.settings.usable_cpus", lambda: 3)
    assert load_settings().processes == 3
    monkeypatch.setenv("LLM_WORKER_PROCESSES", "auto")
    assert load_settings().processes == 3
    assert load_settings(pool="prefork").processes == 1
    monkeypatch.setenv("LLM_WORKER_PROCESSES", "2")
    assert load_settings().processes == 2
    monkeypatch.setattr("worker.settings.usable_cpus", lambda: 200)
    monkeypatch.delenv("LLM_WORKER_PROCESSES")
    assert load_settings().processes == 64  # the setting's own bound


def test_usable_cpus_follow_the_affinity_and_the_cgroup_quota(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The core count is the CPU affinity's, within a cgroup's `cpu.max` quota."""
    import worker.settings as settings_module

    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3}, raising=False)
    quota = tmp_path / "cpu.max"
    real_path = settings_module.Path

    def fake_path(name: str) -> Path:
        return quota if name == "/sys/fs/cgroup/cpu.max" else real_path(name)

    monkeypatch.setattr(settings_module, "Path", fake_path)
    assert settings_module.usable_cpus() == 4  # no cgroup file: the affinity
    quota.write_text("150000 100000\n")
    assert settings_module.usable_cpus() == 2  # 1.5 CPUs: rounded up
    quota.write_text("max 100000\n")
    assert settings_module.usable_cpus() == 4
