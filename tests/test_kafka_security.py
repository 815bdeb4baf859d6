"""Kafka security: settings checked at start-up, and every mechanism exercised for real.

Two kinds of server (docs/security.md says which mechanism was tested against which):

- the bundled Tansu 0.6.0 with ``--authentication``: what it accepts and refuses, and that each
  refusal becomes a start-up error naming the setting (no hang, no retry loop);
- Tansu behind :class:`tests.kafkafront.KafkaFront`, which terminates TLS (optionally requiring a
  client certificate) and does the SASL server side as Kafka does: eventpulse's real aiokafka
  clients go through real TLS handshakes and real PLAIN / SCRAM / OAUTHBEARER exchanges.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.abc import AbstractTokenProvider

from eventpulse import connections
from eventpulse.connections import ConnectionCheckError
from eventpulse.local.servers import TansuBroker
from eventpulse.logging import KafkaHandler
from eventpulse.logging.security import KafkaSecurity, KafkaSecurityError
from eventpulse.settings import Settings, SettingsError, load_settings
from tests.conftest import unique

USER, PASSWORD = "svc-eventpulse", "S3cr3t-kafka-Pa55"
TOKEN = "eyJ0ZXN0IjoidG9rZW4ifQ.test-token"
#: how many times the test token provider was asked for a token (OAUTHBEARER reached the broker)
TOKENS_ISSUED: list[str] = []


class TestTokenProvider(AbstractTokenProvider):  # type: ignore[misc]
    """Named by import path in EVENTPULSE_KAFKA_OAUTH_TOKEN_PROVIDER, as a deployment would."""

    __test__ = False

    async def token(self) -> str:
        TOKENS_ISSUED.append(TOKEN)
        return TOKEN


class BareTokenSource:
    """Not an AbstractTokenProvider: anything with an async ``token()`` is adapted."""

    async def token(self) -> str:
        return TOKEN


PROVIDER = "tests.test_kafka_security:TestTokenProvider"


def settings_for(port: int, **security: Any) -> Settings:
    return load_settings(broker_url=f"kafka://127.0.0.1:{port}", **security)


def sasl(mechanism: str, protocol: str = "SASL_SSL", password: str = PASSWORD,
         **extra: Any) -> dict[str, Any]:
    options: dict[str, Any] = {"kafka_security_protocol": protocol,
                               "kafka_sasl_mechanism": mechanism, **extra}
    if mechanism == "OAUTHBEARER":
        options["kafka_oauth_token_provider"] = PROVIDER
    else:
        options.update(kafka_sasl_username=USER, kafka_sasl_password=password)
    return options


def tls(certs: Any, client_cert: bool = False) -> dict[str, Any]:
    options = {"kafka_ssl_cafile": str(certs.ca)}
    if client_cert:
        options.update(kafka_ssl_certfile=str(certs.client_cert),
                       kafka_ssl_keyfile=str(certs.client_key))
    return options


async def round_trip(settings: Settings) -> list[bytes]:
    """Produce one record and consume it back with the settings' security."""
    topic = unique("secure")
    options = connections.kafka_options(settings)
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers,
                                enable_idempotence=False, **options)
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"over the secured connection")
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=settings.bootstrap_servers,
                                auto_offset_reset="earliest", **options)
    await consumer.start()
    try:
        batch = await consumer.getmany(timeout_ms=5000)
    finally:
        await consumer.stop()
    return [m.value for messages in batch.values() for m in messages]


# -- start-up validation ---------------------------------------------------------------------

@pytest.mark.parametrize(("security", "variable", "words"), [
    ({"kafka_security_protocol": "SASL_SSL"}, "EVENTPULSE_KAFKA_SASL_MECHANISM", "needs a SASL"),
    ({"kafka_security_protocol": "SASL_SSL", "kafka_sasl_mechanism": "SCRAM-SHA-512"},
     "EVENTPULSE_KAFKA_SASL_PASSWORD", "needs a username and a password"),
    ({"kafka_security_protocol": "SASL_SSL", "kafka_sasl_mechanism": "GSSAPI",
      "kafka_sasl_username": "u", "kafka_sasl_password": "p"},
     "EVENTPULSE_KAFKA_SASL_MECHANISM", "expected one of"),
    ({"kafka_security_protocol": "SASL_SSL", "kafka_sasl_mechanism": "OAUTHBEARER"},
     "EVENTPULSE_KAFKA_OAUTH_TOKEN_PROVIDER", "needs a token provider"),
    ({"kafka_security_protocol": "SASL_SSL", "kafka_sasl_mechanism": "OAUTHBEARER",
      "kafka_oauth_token_provider": "no.such.module:Provider"},
     "EVENTPULSE_KAFKA_OAUTH_TOKEN_PROVIDER", "cannot load it"),
    ({"kafka_security_protocol": "SSL", "kafka_ssl_cafile": "/nonexistent/ca.pem"},
     "EVENTPULSE_KAFKA_SSL_CAFILE", "no such file"),
    ({"kafka_security_protocol": "TLS"}, "EVENTPULSE_KAFKA_SECURITY_PROTOCOL", "expected one of"),
    ({"kafka_sasl_mechanism": "PLAIN", "kafka_sasl_username": "u", "kafka_sasl_password": "p"},
     "EVENTPULSE_KAFKA_SECURITY_PROTOCOL", "set EVENTPULSE_KAFKA_SECURITY_PROTOCOL to SASL_SSL"),
])
def test_inconsistent_kafka_security_stops_startup_naming_the_setting(
        security: dict[str, Any], variable: str, words: str) -> None:
    with pytest.raises(SettingsError) as err:
        load_settings(**security)
    assert f"{variable}: " in str(err.value) and words in str(err.value), str(err.value)
    assert "'p'" not in str(err.value)


def test_client_certificate_without_its_key(certs: Any) -> None:
    with pytest.raises(SettingsError) as err:
        load_settings(kafka_security_protocol="SSL", kafka_ssl_certfile=str(certs.client_cert))
    assert "EVENTPULSE_KAFKA_SSL_KEYFILE: " in str(err.value)
    with pytest.raises(SettingsError) as err:
        load_settings(kafka_ssl_cafile=str(certs.ca))  # TLS file with PLAINTEXT
    assert "set EVENTPULSE_KAFKA_SECURITY_PROTOCOL to SSL" in str(err.value)


def test_secrets_come_from_files_and_never_show(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    secrets = {"KAFKA_SASL_PASSWORD": PASSWORD, "REDIS_PASSWORD": "redis-Pa55-zzz",
               "SLACK_TOKEN": "xoxb-from-a-file", "PRIVACY_SECRET": "hmac-key-from-file",
               "KAFKA_SSL_KEY_PASSWORD": "key-Pa55-yyy"}
    for name, value in secrets.items():
        path = tmp_path / name.lower()
        path.write_text(value + "\n")  # as `echo` and editors write it: the newline is dropped
        monkeypatch.setenv(f"EVENTPULSE_{name}_FILE", str(path))
    monkeypatch.setenv("EVENTPULSE_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("EVENTPULSE_KAFKA_SASL_MECHANISM", "scram-sha-512")
    monkeypatch.setenv("EVENTPULSE_KAFKA_SASL_USERNAME", USER)
    settings = load_settings()
    assert settings.kafka_sasl_password is not None
    assert settings.kafka_sasl_password.get_secret_value() == PASSWORD
    assert settings.redis_password is not None
    assert settings.redis_password.get_secret_value() == "redis-Pa55-zzz"
    security = settings.kafka_security()
    assert security.sasl_mechanism == "SCRAM-SHA-512"
    # the producing side reads the same variables, files included
    assert KafkaSecurity.from_env() == security
    shown = " ".join([repr(settings), str(settings), repr(security), str(security),
                      repr(settings.model_dump())])
    for value in secrets.values():
        assert value not in shown


def test_secret_file_errors_name_the_variable(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVENTPULSE_REDIS_PASSWORD_FILE", str(tmp_path / "missing"))
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert "EVENTPULSE_REDIS_PASSWORD_FILE: cannot read" in str(err.value)
    (tmp_path / "pw").write_text("x")
    monkeypatch.setenv("EVENTPULSE_REDIS_PASSWORD_FILE", str(tmp_path / "pw"))
    monkeypatch.setenv("EVENTPULSE_REDIS_PASSWORD", "also-set-Pa55")
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert "both set" in str(err.value) and "also-set-Pa55" not in str(err.value)


def test_token_provider_import_paths() -> None:
    from eventpulse.logging.security import load_token_provider

    assert isinstance(load_token_provider(PROVIDER), TestTokenProvider)
    adapted = load_token_provider("tests.test_kafka_security:BareTokenSource")
    assert isinstance(adapted, AbstractTokenProvider)
    assert asyncio.run(adapted.token()) == TOKEN
    with pytest.raises(KafkaSecurityError):
        load_token_provider("tests.test_kafka_security")  # no :name
    with pytest.raises(KafkaSecurityError, match="no token"):
        load_token_provider("tests.test_kafka_security:USER")


# -- the bundled Tansu 0.6.0 with --authentication -----------------------------------------

@pytest.fixture(scope="module")
def tansu_auth() -> Any:
    with TansuBroker(extra_args=["--authentication"]) as broker:
        yield broker


async def test_tansu_refuses_plain_with_a_clear_startup_error(tansu_auth: TansuBroker) -> None:
    """Tansu 0.6.0 does not enable PLAIN; it closes the connection at the SASL handshake."""
    settings = settings_for(tansu_auth.port, **sasl("PLAIN", protocol="SASL_PLAINTEXT"))
    with pytest.raises(ConnectionCheckError) as err:
        async with asyncio.timeout(30):
            await connections.check_kafka(settings)
    assert "closed the connection during authentication" in str(err.value)
    assert "EVENTPULSE_KAFKA_SASL_MECHANISM=PLAIN" in str(err.value)


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-512"])
async def test_tansu_scram_wrong_password_is_a_clear_startup_error(
        tansu_auth: TansuBroker, mechanism: str) -> None:
    """Tansu 0.6.0 offers SCRAM but its memory storage keeps no credentials: every exchange ends
    with a server error, which is what a wrong password looks like to the client."""
    settings = settings_for(tansu_auth.port, **sasl(mechanism, protocol="SASL_PLAINTEXT",
                                                    password="wrong-password"))
    with pytest.raises(ConnectionCheckError) as err:
        async with asyncio.timeout(30):
            await connections.check_kafka(settings)
    text = str(err.value)
    assert f"SASL_PLAINTEXT/{mechanism}" in text and "authentication failed" in text
    assert "EVENTPULSE_KAFKA_SASL_PASSWORD" in text and "wrong-password" not in text


async def test_tansu_oauthbearer_token_reaches_the_broker_and_is_refused(
        tansu_auth: TansuBroker) -> None:
    TOKENS_ISSUED.clear()
    settings = settings_for(tansu_auth.port, **sasl("OAUTHBEARER", protocol="SASL_PLAINTEXT"))
    with pytest.raises(ConnectionCheckError) as err:
        async with asyncio.timeout(30):
            await connections.check_kafka(settings)
    assert TOKENS_ISSUED, "the configured provider was asked for the token"
    assert "refused the token" in str(err.value) and TOKEN not in str(err.value)


# -- Tansu behind the TLS / SASL front ---------------------------------------------------------

MECHANISMS = ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"]


@pytest.mark.parametrize("mechanism", MECHANISMS)
async def test_sasl_ssl_round_trip(kafka_front: Any, certs: Any, mechanism: str) -> None:
    front = kafka_front(users={USER: PASSWORD}, mechanisms=tuple(MECHANISMS),
                        oauth_tokens={TOKEN}, certfile=certs.server_cert, keyfile=certs.server_key)
    settings = settings_for(front.port, **sasl(mechanism), **tls(certs))
    await connections.check_kafka(settings)
    assert await round_trip(settings) == [b"over the secured connection"]
    user = "(token)" if mechanism == "OAUTHBEARER" else USER
    assert (mechanism, user, True) in front.logins
    assert not [login for login in front.logins if not login[2]]


async def test_sasl_plaintext_scram(kafka_front: Any) -> None:
    front = kafka_front(users={USER: PASSWORD}, mechanisms=("SCRAM-SHA-256",))
    settings = settings_for(front.port, **sasl("SCRAM-SHA-256", protocol="SASL_PLAINTEXT"))
    assert await round_trip(settings) == [b"over the secured connection"]


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-512"])
async def test_wrong_password_is_a_clear_startup_error(kafka_front: Any, certs: Any,
                                                        mechanism: str) -> None:
    front = kafka_front(users={USER: PASSWORD}, mechanisms=(mechanism,),
                        certfile=certs.server_cert, keyfile=certs.server_key)
    settings = settings_for(front.port, **sasl(mechanism, password="not-the-Pa55word"),
                            **tls(certs))
    with pytest.raises(ConnectionCheckError) as err:
        async with asyncio.timeout(30):
            await connections.check_kafka(settings)
    text = str(err.value)
    assert "SaslAuthenticationFailed" in text and "EVENTPULSE_KAFKA_SASL_PASSWORD" in text
    assert "not-the-Pa55word" not in text and PASSWORD not in text
    assert front.logins == [(mechanism, USER, False)], "one attempt, no retry loop"


async def test_mutual_tls(kafka_front: Any, certs: Any) -> None:
    front = kafka_front(certfile=certs.server_cert, keyfile=certs.server_key, client_ca=certs.ca)
    with_cert = settings_for(front.port, kafka_security_protocol="SSL", **tls(certs, True))
    assert await round_trip(with_cert) == [b"over the secured connection"]
    without_cert = settings_for(front.port, kafka_security_protocol="SSL", **tls(certs))
    with pytest.raises(ConnectionCheckError) as err:
        await connections.check_kafka(without_cert)
    assert "EVENTPULSE_KAFKA_SSL_CERTFILE" in str(err.value)


async def test_untrusted_broker_certificate(kafka_front: Any, certs: Any) -> None:
    front = kafka_front(certfile=certs.server_cert, keyfile=certs.server_key)
    settings = settings_for(front.port, kafka_security_protocol="SSL",
                            kafka_ssl_cafile=str(certs.other_ca))
    with pytest.raises(ConnectionCheckError) as err:
        await connections.check_kafka(settings)
    assert "not trusted" in str(err.value) and "EVENTPULSE_KAFKA_SSL_CAFILE" in str(err.value)


async def test_producing_side_over_sasl_ssl_from_the_environment(
        kafka_front: Any, certs: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A service configures KafkaHandler like the worker: EVENTPULSE_KAFKA_* (a file secret)."""
    front = kafka_front(users={USER: PASSWORD}, mechanisms=("SCRAM-SHA-512",),
                        certfile=certs.server_cert, keyfile=certs.server_key, client_ca=certs.ca)
    (tmp_path / "kafka-password").write_text(PASSWORD)
    for name, value in {"SECURITY_PROTOCOL": "SASL_SSL", "SASL_MECHANISM": "SCRAM-SHA-512",
                        "SASL_USERNAME": USER, "SASL_PASSWORD_FILE": str(tmp_path / "kafka-password"),
                        "SSL_CAFILE": str(certs.ca), "SSL_CERTFILE": str(certs.client_cert),
                        "SSL_KEYFILE": str(certs.client_key)}.items():
        monkeypatch.setenv(f"EVENTPULSE_KAFKA_{name}", value)
    topic = unique("inference")
    handler = KafkaHandler(f"127.0.0.1:{front.port}", topic=topic)
    logger = logging.getLogger(unique("svc"))
    logger.addHandler(handler)
    logger.propagate = False
    logger.warning("inference", extra={"model": "ranker", "latency_ms": 3.0, "status": 200})
    assert await asyncio.to_thread(handler.sender.flush, 20.0)
    logger.removeHandler(handler)
    handler.close()
    assert handler.dropped == 0
    assert ("SCRAM-SHA-512", USER, True) in front.logins
    settings = load_settings(broker_url=f"kafka://127.0.0.1:{front.port}")
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=settings.bootstrap_servers,
                                auto_offset_reset="earliest", **connections.kafka_options(settings))
    await consumer.start()
    try:
        batch = await consumer.getmany(timeout_ms=5000)
    finally:
        await consumer.stop()
    values = [m.value for messages in batch.values() for m in messages]
    assert len(values) == 1 and b'"model": "ranker"' in values[0]


async def test_producing_side_with_a_wrong_password_says_so_once_and_never_raises(
        kafka_front: Any, certs: Any, capsys: pytest.CaptureFixture[str]) -> None:
    front = kafka_front(users={USER: PASSWORD}, mechanisms=("SCRAM-SHA-256",),
                        certfile=certs.server_cert, keyfile=certs.server_key)
    security = {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-256",
                "sasl_username": USER, "sasl_password": "Wrong-Pa55", "ssl_cafile": str(certs.ca)}
    handler = KafkaHandler(f"127.0.0.1:{front.port}", topic=unique("inference"),
                           flush_timeout=0.5, security=security)  # as dictConfig passes it
    logger = logging.getLogger(unique("svc"))
    logger.addHandler(handler)
    logger.propagate = False
    for _ in range(3):
        logger.warning("inference", extra={"model": "ranker"})  # never raises
    assert not await asyncio.to_thread(handler.sender.flush, 2.0)
    logger.removeHandler(handler)
    handler.close()
    err = capsys.readouterr().err
    assert err.count("eventpulse.logging: cannot send to") == 1, err
    assert "SaslAuthenticationFailed" in err and "Wrong-Pa55" not in err
    assert handler.dropped == 3 and len(front.logins) >= 2  # retried with backoff


def _is_msk_iam_token(token: str) -> bool:
    """What AWS's signer makes: a base64url SigV4-presigned kafka-cluster:Connect request."""
    import base64
    from urllib.parse import parse_qs, urlsplit

    url = urlsplit(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode())
    query = parse_qs(url.query)
    return (url.hostname == "kafka.eu-west-1.amazonaws.com"
            and query.get("Action") == ["kafka-cluster:Connect"]
            and query.get("X-Amz-Algorithm") == ["AWS4-HMAC-SHA256"]
            and "AKIDEXAMPLE/" in query.get("X-Amz-Credential", [""])[0]
            and bool(query.get("X-Amz-Signature")))


async def test_msk_iam_provider_is_wired_through_oauthbearer(
        kafka_front: Any, certs: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Signed locally from (fake) static credentials: no AWS is reached. Real MSK: not tested."""
    for name, value in {"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "not-a-key",
                        "AWS_REGION": "eu-west-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(name, value)
    front = kafka_front(mechanisms=("OAUTHBEARER",), oauth_validator=_is_msk_iam_token,
                        certfile=certs.server_cert, keyfile=certs.server_key)
    settings = settings_for(
        front.port, kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="OAUTHBEARER",
        kafka_oauth_token_provider="eventpulse.logging.msk:MSKIAMTokenProvider", **tls(certs))
    await connections.check_kafka(settings)
    assert front.logins == [("OAUTHBEARER", "(token)", True)]


def test_demo_keeps_security_for_the_users_servers_only(monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path) -> None:
    from eventpulse.local.demo import _demo_settings

    (tmp_path / "pw").write_text(PASSWORD)
    monkeypatch.setenv("EVENTPULSE_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("EVENTPULSE_KAFKA_SASL_MECHANISM", "SCRAM-SHA-256")
    monkeypatch.setenv("EVENTPULSE_KAFKA_SASL_USERNAME", USER)
    monkeypatch.setenv("EVENTPULSE_KAFKA_SASL_PASSWORD_FILE", str(tmp_path / "pw"))
    monkeypatch.delenv("EVENTPULSE_BROKER_URL", raising=False)
    # the demo started its own broker: its (PLAINTEXT) worker must not get the user's SASL
    settings, env = _demo_settings("kafka://127.0.0.1:1111", "redis://127.0.0.1:2222/0")
    assert settings.kafka_security().security_protocol == "PLAINTEXT"
    assert not [k for k in env if k.startswith("EVENTPULSE_KAFKA_")]
    # the user's own broker: kept, for the worker (env) and the demo's traffic (settings)
    monkeypatch.setenv("EVENTPULSE_BROKER_URL", "kafka://kafka-1:9093")
    settings, env = _demo_settings("kafka://kafka-1:9093", "redis://127.0.0.1:2222/0")
    assert settings.kafka_security().sasl_password == PASSWORD
    assert env["EVENTPULSE_KAFKA_SASL_PASSWORD_FILE"] == str(tmp_path / "pw")


def test_faust_app_gets_the_same_security(certs: Any) -> None:
    """The Faust app's credentials carry the same mechanism, user and TLS context."""
    import faust

    assert connections.faust_credentials(load_settings()) is None
    scram = connections.faust_credentials(load_settings(**sasl("SCRAM-SHA-512"), **tls(certs)))
    assert isinstance(scram, faust.SASLCredentials)
    assert (scram.mechanism.value, scram.username, scram.password) == (
        "SCRAM-SHA-512", USER, PASSWORD)
    assert scram.protocol.value == "SASL_SSL" and scram.ssl_context is not None
    assert PASSWORD not in repr(scram)
    oauth = connections.faust_credentials(load_settings(**sasl("OAUTHBEARER"), **tls(certs)))
    assert isinstance(oauth, faust.OAuthCredentials)
    assert isinstance(oauth.oauth_cb, TestTokenProvider)
    mtls = connections.faust_credentials(load_settings(kafka_security_protocol="SSL",
                                                       **tls(certs, client_cert=True)))
    assert isinstance(mtls, faust.SSLCredentials) and mtls.context.verify_mode.name == "CERT_REQUIRED"


def test_producing_side_reads_booleans_and_files_like_the_worker(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    security = KafkaSecurity.from_env({
        "EVENTPULSE_KAFKA_SECURITY_PROTOCOL": "sasl_ssl", "EVENTPULSE_KAFKA_SASL_MECHANISM": "PLAIN",
        "EVENTPULSE_KAFKA_SASL_USERNAME": USER,
        "EVENTPULSE_KAFKA_SASL_PASSWORD_FILE": str(tmp_path / "pw"),
        "EVENTPULSE_KAFKA_SSL_CHECK_HOSTNAME": "false"})
    assert security.security_protocol == "SASL_SSL" and security.sasl_password == PASSWORD
    assert security.ssl_check_hostname is False
    context = security.ssl_context()
    assert context is not None and context.check_hostname is False
