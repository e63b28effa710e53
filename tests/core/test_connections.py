"""Sentinel URLs, the Redis client factory and the Celery broker settings, as pure units (no
server: building a client opens no connection)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from worker.celery_app import celery_config
from worker.connections.clients import (
    AsyncBlockingSentinelPool,
    AsyncSentinelConnection,
    BlockingSentinelPool,
    ReplicaAck,
    ReplicationShort,
    SentinelConnection,
    async_redis_client,
    redis_client,
    retries_for,
)
from worker.connections.urls import mask_credentials, parse_sentinel_url
from worker.errors import SettingsError
from worker.settings import load_settings

SENTINELS = "sentinel://10.0.0.1:26379;sentinel://10.0.0.2:26380;sentinel://s3"


def test_a_sentinel_url_lists_every_sentinel_with_default_port_and_database() -> None:
    """Each `;`-separated entry is one Sentinel; no port means 26379, no path database 0."""
    parsed = parse_sentinel_url(SENTINELS)
    assert parsed.hosts == (("10.0.0.1", 26379), ("10.0.0.2", 26380), ("s3", 26379))
    assert parsed.db == 0
    assert parse_sentinel_url("sentinel://a:1/4;sentinel://b:2").db == 4


def test_a_sentinel_url_keeps_credentials_and_ipv6_hosts() -> None:
    """A password in the URL is the master's (kombu's habit); IPv6 hosts keep brackets."""
    parsed = parse_sentinel_url("sentinel://user:p%40ss@[::1]:26379/2")
    assert parsed.hosts == (("::1", 26379),)
    assert (parsed.username, parsed.password, parsed.db) == ("user", "p@ss", 2)
    assert "p@ss" not in repr(parsed)
    assert parse_sentinel_url(parsed.normalised()) == parsed


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("sentinel://a:1;", "empty entry"),
        ("sentinel://a:1;;sentinel://b:2", "empty entry"),
        ("sentinel://a:1;redis://b:2", "not a Sentinel address"),
        ("sentinel://a:port", "not a number"),
        ("sentinel://:26379", "names no host"),
        ("sentinel://a:1/x", "database must be a number"),
        ("sentinel://a:1/1;sentinel://b:2/2", "different databases"),
        ("sentinel://a:1?master=m", "query"),
    ],
)
def test_a_malformed_sentinel_url_is_refused_saying_why(url: str, says: str) -> None:
    """Each kind of malformed list gets its own message."""
    with pytest.raises(ValueError, match=says):
        parse_sentinel_url(url)


def test_settings_accept_sentinel_urls_normalised_for_kombu() -> None:
    """REDIS_URL and BROKER_URL take kombu's form; the database lands on every entry."""
    settings = load_settings(redis_url="sentinel://a:1/3;sentinel://b", redis_sentinel_master="m")
    assert settings.redis_url == "sentinel://a:1/3;sentinel://b:26379/3"
    assert settings.effective_broker_url == settings.redis_url
    broker = load_settings(broker_url=SENTINELS, redis_sentinel_master="m").effective_broker_url
    assert broker.startswith("sentinel://10.0.0.1:26379/0;")


@pytest.mark.parametrize("field", ["redis_url", "broker_url"])
def test_a_sentinel_url_without_the_master_name_is_refused(field: str) -> None:
    """A sentinel:// URL needs REDIS_SENTINEL_MASTER; the error names both variables."""
    with pytest.raises(SettingsError) as caught:
        load_settings(**{field: SENTINELS})
    names = [name for name, _ in caught.value.problems]
    assert names == ["LLM_WORKER_REDIS_SENTINEL_MASTER"]
    assert f"LLM_WORKER_{field.upper()}" in str(caught.value)


def test_a_malformed_sentinel_url_fails_at_settings_load_naming_the_variable() -> None:
    """The parser's reason reaches the settings error, under the variable's name."""
    with pytest.raises(SettingsError) as caught:
        load_settings(redis_url="sentinel://a:1;", redis_sentinel_master="m")
    assert caught.value.problems[0][0] == "LLM_WORKER_REDIS_URL"
    assert "empty entry" in str(caught.value)


def test_passwords_never_appear_in_settings_errors_or_reprs() -> None:
    """A password in a bad URL is masked in the error; the password settings are secrets."""
    with pytest.raises(SettingsError) as caught:
        load_settings(redis_url="sentinel://:hunter2@a:port", redis_sentinel_master="m")
    assert "hunter2" not in str(caught.value)
    with pytest.raises(SettingsError) as plain:
        load_settings(redis_url="redis://:hunter2@a:port/0")
    assert "hunter2" not in str(plain.value)
    settings = load_settings(redis_password="hunter2", redis_sentinel_password="swordfish")
    assert "hunter2" not in repr(settings)
    assert "swordfish" not in repr(settings)
    assert mask_credentials("x redis://u:pw@h:1/0 y") == "x redis://u:***@h:1/0 y"


def test_empty_sentinel_settings_mean_none() -> None:
    """docker-compose and the chart pass unset optional values as empty strings."""
    settings = load_settings(
        redis_sentinel_master="", redis_password="", redis_sentinel_password=" "
    )
    assert settings.redis_sentinel_master is None
    assert settings.redis_password is None
    assert settings.redis_sentinel_password is None


def _sentinel_settings(**extra: Any) -> Any:
    return load_settings(
        redis_url=SENTINELS,
        redis_sentinel_master="mymaster",
        redis_password="redis-secret",
        redis_sentinel_password="sentinel-secret",
        **extra,
    )


def test_the_factory_builds_a_blocking_sentinel_pool_that_follows_the_master() -> None:
    """A sentinel URL gives a master-following pool: the service name, the Redis password on
    master connections, the Sentinel password on Sentinel connections, the retry window."""
    settings = _sentinel_settings(redis_retry_s=10)
    client = redis_client(settings, max_connections=7)
    pool = client.connection_pool
    assert isinstance(pool, BlockingSentinelPool)
    assert pool.service_name == "mymaster"
    assert pool.max_connections == 7
    assert pool.connection_class is SentinelConnection
    assert pool.connection_kwargs["password"] == "redis-secret"
    assert pool.connection_kwargs["retry"]._retries == retries_for(10)
    sentinels = pool.sentinel_manager.sentinels
    assert [s.connection_pool.connection_kwargs["port"] for s in sentinels] == [
        26379,
        26380,
        26379,
    ]
    assert all(
        s.connection_pool.connection_kwargs["password"] == "sentinel-secret" for s in sentinels
    )


def test_the_async_factory_builds_the_same_for_asyncio() -> None:
    """``redis.asyncio`` gets the same pool, service name and passwords."""

    async def build() -> Any:
        client = async_redis_client(_sentinel_settings(), max_connections=3)
        pool = client.connection_pool
        await client.aclose()
        return pool

    pool = asyncio.run(build())
    assert isinstance(pool, AsyncBlockingSentinelPool)
    assert pool.service_name == "mymaster"
    assert pool.connection_class is AsyncSentinelConnection
    assert pool.connection_kwargs["password"] == "redis-secret"


def test_a_plain_url_takes_redis_password_unless_it_carries_one() -> None:
    """REDIS_PASSWORD serves a redis:// URL without one; a password in the URL wins."""
    settings = load_settings(redis_url="redis://h:6379/0", redis_password="from-setting")
    assert redis_client(settings).connection_pool.connection_kwargs["password"] == "from-setting"
    own = redis_client(settings, url="redis://:in-url@h:6379/0")
    assert own.connection_pool.connection_kwargs["password"] == "in-url"


def test_the_celery_broker_uses_our_sentinel_transport_with_its_secrets() -> None:
    """A sentinel broker runs our hardened channel on kombu's Sentinel pool: master name and
    the Sentinel password in the transport options, the Redis password outside the URL."""
    config = celery_config(_sentinel_settings())
    assert config["broker_transport"] == "worker.runtime.transport:SentinelTransport"
    options = config["broker_transport_options"]
    assert options["master_name"] == "mymaster"
    assert options["sentinel_kwargs"]["password"] == "sentinel-secret"
    assert config["broker_password"] == "redis-secret"
    assert "secret" not in config["broker_url"]


def test_a_failover_switch_between_sentinels_keeps_our_transport() -> None:
    """kombu switches to the next Sentinel of the URL after a lost connection, resolving the
    transport from the scheme again: it must still be ours (hardening, liveness)."""
    from worker.celery_app import app
    from worker.runtime.transport import SentinelTransport

    app.use_settings(_sentinel_settings())
    connection = app.connection_for_write()
    try:
        assert isinstance(connection.transport, SentinelTransport)
        connection.switch(connection.alt[1])
        assert isinstance(connection.transport, SentinelTransport)
        assert connection.port == 26380
    finally:
        connection.release()


def test_the_sentinel_channel_keeps_our_hardening() -> None:
    """Our Channel's inbox moves and kept deliveries come first in the Sentinel channel's
    order, and its connections ask the Sentinels on every reconnect."""
    from kombu.transport import redis as kombu_redis

    from worker.runtime import transport

    mro = transport.SentinelChannel.__mro__
    assert mro.index(transport.Channel) < mro.index(kombu_redis.SentinelChannel)
    assert transport.SentinelChannel._fetch_start is transport.Channel._fetch_start
    assert transport.SentinelChannel.QoS is transport.QoS
    assert transport.SentinelChannel.connection_class is SentinelConnection
    options = transport.SentinelChannel.from_transport_options
    assert {"master_name", "sentinel_kwargs"} <= set(options)
    assert set(transport.Channel.from_transport_options) <= set(options)
    assert transport.SentinelTransport.default_port == 26379


def test_replica_ack_checks_the_wait_reply_and_strips_it() -> None:
    """The WAIT reply ends the pipeline's results; short of the wanted count it raises an
    error naming the setting."""
    ack = ReplicaAck(wanted=2, timeout_s=1.5)
    assert ack.check([b"created", 2], "the job") == [b"created"]
    with pytest.raises(ReplicationShort, match="LLM_WORKER_REDIS_MIN_REPLICAS_ACK") as caught:
        ack.check([b"created", 1], "the job")
    assert (caught.value.acked, caught.value.wanted) == (1, 2)
    assert ReplicaAck().check([b"created"], "the job") == [b"created"]
    assert not ReplicaAck()


def test_the_log_redactor_knows_every_redis_secret() -> None:
    """Both passwords and a password inside a URL are redacted from log lines."""
    from worker.logs import Redactor

    settings = load_settings(
        redis_url="sentinel://:url-secret@a:1;sentinel://b:2",
        redis_sentinel_master="m",
        redis_password="hunter2",
        redis_sentinel_password="swordfish",
    )
    assert set(settings.secret_values()) == {"url-secret", "hunter2", "swordfish"}
    redact = Redactor(settings.secret_values(), log_content=False)
    line = redact(None, "info", {"event": "auth hunter2 swordfish url-secret"})
    assert line["event"] == "auth [redacted] [redacted] [redacted]"
