"""The deployment the README describes: a worker process on SASL_SSL Kafka (SCRAM-SHA-512 and a
client certificate) and TLS Redis with a least-privilege ACL user, secrets read from files;
a recommender reads the features as a read-only user. And a wrong password stops start-up."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from eventpulse import connections
from eventpulse.settings import load_settings
from eventpulse.tables.acl import reader_rules, worker_rules
from eventpulse.tables.client import AsyncFeatureClient
from tests.conftest import TlsRedis, unique, wait_until

KAFKA_USER, KAFKA_PASSWORD = "eventpulse-worker", "Kafka-Pa55-sss"
WORKER_PASSWORD, READER_PASSWORD = "Redis-worker-Pa55", "Redis-reader-Pa55"


def job(events: str) -> dict[str, Any]:
    return {"topics": {events: "behaviour"}, "partitions": 1, "features": [
        {"name": "clicks_5m", "topic": events, "entity": "user", "key": "user_id",
         "where": {"action": "click"}, "aggregation": "count",
         "window": {"type": "hopping", "size": "5m", "step": "10s", "lateness": "30s"}},
        {"name": "items_5m", "topic": events, "entity": "user", "key": "user_id",
         "value": "item_id", "aggregation": "distinct",
         "window": {"type": "hopping", "size": "5m", "step": "10s", "lateness": "30s"}}]}


def secure_env(front: Any, redis_server: TlsRedis, namespace: str, tmp_path: Path,
               kafka_password: str = KAFKA_PASSWORD) -> dict[str, str]:
    certs = redis_server.certs
    (tmp_path / "kafka-password").write_text(kafka_password + "\n")
    (tmp_path / "redis-password").write_text(WORKER_PASSWORD + "\n")
    return {
        "EVENTPULSE_BROKER_URL": f"kafka://127.0.0.1:{front.port}",
        "EVENTPULSE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "EVENTPULSE_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "EVENTPULSE_KAFKA_SASL_USERNAME": KAFKA_USER,
        "EVENTPULSE_KAFKA_SASL_PASSWORD_FILE": str(tmp_path / "kafka-password"),
        "EVENTPULSE_KAFKA_SSL_CAFILE": str(certs.ca),
        "EVENTPULSE_KAFKA_SSL_CERTFILE": str(certs.client_cert),
        "EVENTPULSE_KAFKA_SSL_KEYFILE": str(certs.client_key),
        "EVENTPULSE_REDIS_URL": redis_server.url,
        "EVENTPULSE_REDIS_NAMESPACE": namespace,
        "EVENTPULSE_REDIS_USERNAME": f"{namespace}-worker",
        "EVENTPULSE_REDIS_PASSWORD_FILE": str(tmp_path / "redis-password"),
        "EVENTPULSE_REDIS_SSL_CAFILE": str(certs.ca),
        "EVENTPULSE_REDIS_SSL_CERTFILE": str(certs.client_cert),
        "EVENTPULSE_REDIS_SSL_KEYFILE": str(certs.client_key),
    }


@pytest.fixture
def secure_setup(kafka_front: Any, tls_redis: TlsRedis, certs: Any) -> Any:
    namespace = unique("sec")
    front = kafka_front(users={KAFKA_USER: KAFKA_PASSWORD}, mechanisms=("SCRAM-SHA-512",),
                        certfile=certs.server_cert, keyfile=certs.server_key, client_ca=certs.ca)
    with tls_redis.admin() as admin:
        admin.acl_log_reset()
        admin.execute_command("ACL", "SETUSER", f"{namespace}-worker", "on",
                              f">{WORKER_PASSWORD}", *worker_rules(namespace))
        admin.execute_command("ACL", "SETUSER", f"{namespace}-reader", "on",
                              f">{READER_PASSWORD}", *reader_rules(namespace))
    yield front, namespace
    with tls_redis.admin() as admin:
        admin.acl_deluser(f"{namespace}-worker", f"{namespace}-reader")


@pytest.mark.slow
async def test_worker_on_sasl_ssl_kafka_and_tls_acl_redis(
        secure_setup: Any, tls_redis: TlsRedis, make_worker: Any, tmp_path: Path) -> None:
    front, namespace = secure_setup
    events = unique("events")
    env = secure_env(front, tls_redis, namespace, tmp_path)
    worker = make_worker(job(events), unique("secure"), **env).start()

    settings = load_settings(**{k.removeprefix("EVENTPULSE_").lower(): v for k, v in env.items()
                                if not k.endswith("_FILE")},
                             kafka_sasl_password=KAFKA_PASSWORD, redis_password=WORKER_PASSWORD)
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers,
                                enable_idempotence=False, **connections.kafka_options(settings))
    await producer.start()
    past = int(time.time() * 1000) - 20_000
    try:
        for i in range(3):
            record = {"timestamp": past, "user_id": "u1", "action": "click", "item_id": f"i{i}"}
            await producer.send_and_wait(events, json.dumps(record).encode(), key=b"u1")
        await producer.send_and_wait(events, b"not json", key=b"u1")
    finally:
        await producer.stop()

    # a recommender: the read-only user, over TLS
    reader = await wait_until(lambda: _reader(tls_redis, namespace), timeout=90,
                              message="the worker's published definitions")
    try:
        async def clicks() -> Any:
            row = await reader.get("user", "u1")
            return row if row["clicks_5m"].value == 3 else None

        row = await wait_until(clicks, timeout=90, message="clicks_5m of u1 == 3")
        assert row["items_5m"].value == 3
    finally:
        await reader.aclose()

    # the dead-letter tail goes through the same SASL_SSL settings
    tail = subprocess.run([sys.executable, "-m", "eventpulse", "dead-letters", "tail", "-n", "5"],
                          env=worker.env, capture_output=True, text=True, timeout=60)
    assert tail.returncode == 0, tail.stderr
    assert "not_json" in tail.stdout and "not json" in tail.stdout

    with tls_redis.admin() as admin:
        denied = [entry for entry in admin.acl_log() if entry["username"] == f"{namespace}-worker"]
    assert denied == [], "the worker's ACL rules cover every command it ran"
    assert {login[:2] for login in front.logins} == {("SCRAM-SHA-512", KAFKA_USER)}
    assert all(ok for *_, ok in front.logins)
    shown = worker.log() + worker.metrics() + tail.stdout + tail.stderr
    for secret in (KAFKA_PASSWORD, WORKER_PASSWORD, READER_PASSWORD):
        assert secret not in shown


async def _reader(server: TlsRedis, namespace: str) -> AsyncFeatureClient | None:
    certs = server.certs
    client = await AsyncFeatureClient.connect(
        server.url, namespace, username=f"{namespace}-reader", password=READER_PASSWORD,
        ssl_ca_certs=str(certs.ca))
    if not client.specs:
        await client.aclose()
        return None
    return client


def test_wrong_kafka_password_stops_startup_with_a_clear_error(
        secure_setup: Any, tls_redis: TlsRedis, tmp_path: Path) -> None:
    import os

    front, namespace = secure_setup
    config = tmp_path / "job.yaml"
    config.write_text(json.dumps(job(unique("events"))))
    env = {**os.environ, **secure_env(front, tls_redis, namespace, tmp_path,
                                      kafka_password="Wrong-Pa55"),
           "EVENTPULSE_CONFIG_PATH": str(config), "EVENTPULSE_METRICS_PORT": "0"}
    done = subprocess.run([sys.executable, "-m", "eventpulse", "worker"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "cannot connect to Kafka with SASL_SSL/SCRAM-SHA-512" in done.stderr
    assert "EVENTPULSE_KAFKA_SASL_PASSWORD" in done.stderr
    assert "Wrong-Pa55" not in done.stderr + done.stdout
    assert [login[2] for login in front.logins] == [False], "one attempt, then stop"
