"""Redis over TLS with ACL users, and the least-privilege rules of eventpulse.tables.acl, against
a real redis-server started with ``--tls-port`` (no plain port) and a password-protected admin."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.exceptions import NoPermissionError

from eventpulse import connections
from eventpulse.connections import ConnectionCheckError
from eventpulse.settings import Settings, SettingsError, load_settings
from eventpulse.tables.acl import acl_setuser, reader_rules, worker_rules
from eventpulse.tables.client import FeatureClient, registry_key
from eventpulse.tables.keys import control_key, features_key, fence_key, offsets_key
from eventpulse.tables.spec import FeatureSpec
from eventpulse.tables.writebounds import DEFAULT_SHARDS
from tests.conftest import TlsRedis, unique

ROOT = Path(__file__).resolve().parent.parent
WORKER_PASSWORD, READER_PASSWORD = "worker-Pa55-ttt", "reader-Pa55-rrr"


@pytest.fixture
def namespace(tls_redis: TlsRedis) -> Iterator[str]:
    """A namespace with a worker user and a reader user holding eventpulse's rules."""
    ns = unique("ns")
    admin = tls_redis.admin()
    admin.execute_command("ACL", "SETUSER", f"{ns}-worker", "on", f">{WORKER_PASSWORD}",
                          *worker_rules(ns))
    admin.execute_command("ACL", "SETUSER", f"{ns}-reader", "on", f">{READER_PASSWORD}",
                          *reader_rules(ns))
    yield ns
    admin.acl_deluser(f"{ns}-worker", f"{ns}-reader")
    admin.close()


def user_settings(server: TlsRedis, user: str, password: str, **extra: Any) -> Settings:
    certs = server.certs
    options: dict[str, Any] = {
        "redis_url": server.url, "redis_username": user, "redis_password": password,
        "redis_ssl_cafile": str(certs.ca), "redis_ssl_certfile": str(certs.client_cert),
        "redis_ssl_keyfile": str(certs.client_key), **extra}
    return load_settings(**options)


def client(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(settings.redis_url, **connections.redis_options(settings))


async def test_rediss_with_acl_user_and_client_certificate(tls_redis: TlsRedis,
                                                           namespace: str) -> None:
    settings = user_settings(tls_redis, f"{namespace}-worker", WORKER_PASSWORD)
    await connections.check_redis(settings)
    with client(settings) as r:
        assert r.ping() is True
    # the same user given in the URL instead; the URL's password never shows either
    in_url = load_settings(
        redis_url=f"rediss://{namespace}-worker:{WORKER_PASSWORD}@127.0.0.1:{tls_redis.port}/0",
        redis_ssl_cafile=str(tls_redis.certs.ca))
    await connections.check_redis(in_url)
    assert WORKER_PASSWORD not in repr(in_url) + str(in_url)
    assert f"{namespace}-worker:***@127.0.0.1" in repr(in_url)


async def test_wrong_password_and_untrusted_certificate_are_clear(tls_redis: TlsRedis,
                                                                  namespace: str) -> None:
    wrong = user_settings(tls_redis, f"{namespace}-worker", "not-the-Pa55")
    with pytest.raises(ConnectionCheckError) as err:
        await connections.check_redis(wrong)
    assert "EVENTPULSE_REDIS_PASSWORD" in str(err.value) and "not-the-Pa55" not in str(err.value)
    untrusted = user_settings(tls_redis, f"{namespace}-worker", WORKER_PASSWORD,
                              redis_ssl_cafile=str(tls_redis.certs.other_ca))
    with pytest.raises(ConnectionCheckError) as err:
        await connections.check_redis(untrusted)
    assert "EVENTPULSE_REDIS_SSL_CAFILE" in str(err.value)


def test_credentials_in_the_url_or_in_settings_not_both(tls_redis: TlsRedis) -> None:
    url = f"rediss://u:url-Pa55@127.0.0.1:{tls_redis.port}/0"
    with pytest.raises(SettingsError) as err:
        load_settings(redis_url=url, redis_password="settings-Pa55")
    assert "EVENTPULSE_REDIS_PASSWORD" in str(err.value)
    assert "url-Pa55" not in str(err.value) and "settings-Pa55" not in str(err.value)
    with pytest.raises(SettingsError) as err:
        load_settings(redis_url="redis://127.0.0.1:6379/0",
                      redis_ssl_cafile=str(tls_redis.certs.ca))
    assert "EVENTPULSE_REDIS_URL: TLS files are given but the URL is not rediss://" in str(err.value)


def test_worker_rules_refuse_what_the_worker_never_does(tls_redis: TlsRedis,
                                                        namespace: str) -> None:
    with client(user_settings(tls_redis, f"{namespace}-worker", WORKER_PASSWORD)) as r:
        r.hset(offsets_key(namespace, "g"), "events:0", "1:2")  # its own namespace: allowed
        script = r.register_script("return redis.call('HGET', KEYS[1], ARGV[1])")
        assert script(keys=[offsets_key(namespace, "g")], args=["events:0"]) == b"1:2"
        refused = [lambda: r.get("other-app:key"), lambda: r.keys("*"), lambda: r.flushall(),
                   lambda: r.config_get("*"),
                   # a script runs with the caller's rights: it cannot reach outside either
                   lambda: r.eval("return redis.call('GET', KEYS[1])", 1, "other-app:key")]
        for command in refused:
            with pytest.raises(NoPermissionError):
                command()


def test_feature_reader_reads_features_and_definitions_and_nothing_else(
        tls_redis: TlsRedis, namespace: str) -> None:
    specs = [FeatureSpec.model_validate({
        "name": name, "topic": "events", "entity": "user", "key": "user_id",
        "aggregation": aggregation, "window": {"size": "5m"}, **extra})
        for name, aggregation, extra in [("clicks_5m", "count", {}),
                                         ("items_5m", "distinct", {"value": "item_id"})]]
    with tls_redis.admin() as admin:
        for spec in specs:  # as the worker publishes them
            admin.hset(registry_key(namespace), spec.name, spec.model_dump_json())
        admin.set(control_key(namespace, "alerts:thread:x"), "1")
        admin.set("other-app:key", "1")
    reader = user_settings(tls_redis, f"{namespace}-reader", READER_PASSWORD)
    features = FeatureClient.connect(reader.redis_url, namespace,
                                     **connections.redis_options(reader))
    try:
        assert set(features.specs) == {"clicks_5m", "items_5m"}
        row = features.get("user", "u1")  # HGET meta, MGET, PFCOUNT: all allowed
        assert row["clicks_5m"].status == "missing" and row["clicks_5m"].value == 0
        assert row["items_5m"].status == "missing"
    finally:
        features.close()
    with client(reader) as r:
        shards = DEFAULT_SHARDS
        for command in [lambda: r.set(features_key(namespace, "user", "u1", shards), b"x"),
                        lambda: r.hset(registry_key(namespace), "x", "y"),
                        lambda: r.delete(features_key(namespace, "user", "u1", shards)),
                        lambda: r.get("other-app:key"),
                        lambda: r.get(control_key(namespace, "alerts:thread:x")),
                        lambda: r.hgetall(offsets_key(namespace, "g")),
                        # the fences share the entities' shard tags, and stay out of reach
                        lambda: r.hgetall(fence_key(namespace, "eventpulse", 3, shards)),
                        lambda: r.hgetall(fence_key(namespace, "eventpulse", shards, shards)),
                        lambda: r.eval("return 1", 0)]:
            with pytest.raises(NoPermissionError):
                command()


def test_every_command_a_script_calls_is_in_the_worker_rules() -> None:
    """Scripts run with the caller's rights: a command a script calls that the rule lacks fails
    the worker at its first batch (it happened: TIME, for the slices' cost model)."""
    import re

    from eventpulse.tables.acl import WORKER_COMMANDS

    called: set[str] = set()
    for path in (ROOT / "eventpulse").rglob("*"):
        if path.suffix in (".lua", ".py"):
            called |= {c.lower() for c in re.findall(r"redis\.call\('([A-Za-z]+)'",
                                                     path.read_text())}
    assert called and called <= set(WORKER_COMMANDS), called - set(WORKER_COMMANDS)


def test_documented_rules_are_the_code_rules() -> None:
    """docs/security.md shows the ACL lines for the default namespace: the same as the code."""
    text = (ROOT / "docs" / "security.md").read_text()
    assert acl_setuser("eventpulse-worker", worker_rules("ep")) in text
    assert acl_setuser("feature-reader", reader_rules("ep")) in text


async def test_unreachable_redis_at_startup_is_logged_not_fatal(
        caplog: pytest.LogCaptureFixture) -> None:
    """As during any outage, the worker retries Redis; only refusals stop start-up."""
    from eventpulse.local.servers import free_port

    settings = load_settings(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    with caplog.at_level("WARNING", logger="eventpulse.connections"):
        await connections.check_redis(settings, timeout_s=5)
    assert "not reachable at start-up" in caplog.text


class RequiringRedis(TlsRedis):
    """The same TLS Redis, but every client must present a certificate."""

    def command(self) -> list[str]:
        return [*(a if a != "optional" else "yes" for a in super().command())]


async def test_a_missing_client_certificate_stops_startup_naming_the_settings(
        certs: Any) -> None:
    """A Redis that requires client certificates refuses the handshake: that is a setting to
    fix, not an outage to wait out (found by an outside test: the worker retried forever)."""
    with RequiringRedis(certs) as server:
        settings = load_settings(redis_url=server.url, redis_password=connections_admin(),
                                 redis_ssl_cafile=str(certs.ca))
        with pytest.raises(ConnectionCheckError) as err:
            await connections.check_redis(settings)
        assert "EVENTPULSE_REDIS_SSL_CERTFILE" in str(err.value)
        assert "EVENTPULSE_REDIS_SSL_KEYFILE" in str(err.value)


def connections_admin() -> str:
    from tests.conftest import REDIS_ADMIN_PASSWORD

    return str(REDIS_ADMIN_PASSWORD)


def test_tls_files_that_are_not_pem_are_named_at_startup(certs: Any, tmp_path: Path) -> None:
    """A CA bundle or client key that does not load is a settings error naming the variable,
    for Redis and for Kafka alike, not a bare SSLError on the first connection."""
    text = tmp_path / "not-a-cert.txt"
    text.write_text("hello\n")
    with pytest.raises(SettingsError) as err:
        load_settings(redis_url="rediss://127.0.0.1:6380/0", redis_ssl_cafile=str(text))
    assert "EVENTPULSE_REDIS_SSL_CAFILE" in str(err.value) and "no PEM" in str(err.value)
    with pytest.raises(SettingsError) as err:
        load_settings(redis_url="rediss://127.0.0.1:6380/0", redis_ssl_cafile=str(certs.ca),
                      redis_ssl_certfile=str(certs.client_cert), redis_ssl_keyfile=str(text))
    assert "EVENTPULSE_REDIS_SSL_CERTFILE" in str(err.value)
    with pytest.raises(SettingsError) as err:
        load_settings(kafka_security_protocol="SSL", kafka_ssl_cafile=str(text))
    assert "EVENTPULSE_KAFKA_SSL_CAFILE" in str(err.value) and "no PEM" in str(err.value)
    load_settings(kafka_security_protocol="SSL", kafka_ssl_cafile=str(certs.ca),
                  kafka_ssl_certfile=str(certs.client_cert),
                  kafka_ssl_keyfile=str(certs.client_key))
