"""Start-up validation: wrong settings and configs stop with the field named and the fix."""

from __future__ import annotations

from typing import Any

import pytest

from eventpulse.config import ConfigError, load_config, parse_config
from eventpulse.durations import format_duration_ms, parse_duration_ms
from eventpulse.settings import SettingsError, load_settings


def test_defaults_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EVENTPULSE_BROKER_URL", raising=False)
    settings = load_settings()
    assert settings.bootstrap_servers == ["127.0.0.1:9092"]


def test_bad_broker_url_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVENTPULSE_BROKER_URL", "kafka://no-port-here")
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert "EVENTPULSE_BROKER_URL" in str(err.value)
    assert "kafka://localhost:9092" in str(err.value)


@pytest.mark.parametrize(("url", "expected"), [
    ("kafka://user:KPass77@127.0.0.1:9092", "a Kafka address carries no credentials"),
    ("127.0.0.1:9092,kafka://u:KPass77@b:9092", "a Kafka address carries no credentials"),
    ("http://127.0.0.1:9092", "expected kafka://host:port[,host:port], not a http:// URL"),
    ("kafka://127.0.0.1:9092,https://b:9092", "expected kafka://host:port[,host:port], not a "
                                              "https:// URL"),
    ("kafka://127.0.0.1:99999", "expected kafka://host:port"),
    ("kafka://", "no Kafka address given"),
])
def test_a_broker_url_kafka_cannot_take_is_refused_without_echoing_a_password(
        monkeypatch: pytest.MonkeyPatch, url: str, expected: str) -> None:
    """Found by an outside test: credentials in the broker URL were accepted and the Kafka
    clients logged the address, password and all, 13 times in 20 s; an http:// URL ended in
    a traceback from Faust."""
    monkeypatch.setenv("EVENTPULSE_BROKER_URL", url)
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert f"EVENTPULSE_BROKER_URL: {expected}" in str(err.value)
    assert "KPass77" not in str(err.value)


def test_the_log_handler_refuses_credentials_in_a_kafka_address() -> None:
    from eventpulse.logging.sender import KafkaSender

    with pytest.raises(ValueError, match="carries no credentials") as err:
        KafkaSender("kafka://user:KPass77@127.0.0.1:9092", "events")
    assert "KPass77" not in str(err.value)


def test_bad_redis_url_does_not_echo_the_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVENTPULSE_REDIS_URL", "http://user:hunter2@redis:6379")
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert "EVENTPULSE_REDIS_URL" in str(err.value)
    assert "hunter2" not in str(err.value)


def test_wrong_type_and_missing_config_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVENTPULSE_METRICS_PORT", "lots")
    monkeypatch.setenv("EVENTPULSE_CONFIG_PATH", "/nonexistent/eventpulse.yaml")
    with pytest.raises(SettingsError) as err:
        load_settings()
    text = str(err.value)
    assert "EVENTPULSE_METRICS_PORT" in text and "EVENTPULSE_CONFIG_PATH" in text


def test_slack_token_is_secret_in_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVENTPULSE_SLACK_TOKEN", "xoxb-very-secret")
    # and every other secret setting (tests/test_kafka_security.py checks the _FILE forms)
    secrets = {"EVENTPULSE_KAFKA_SASL_PASSWORD": "kafka-very-secret",
               "EVENTPULSE_KAFKA_SSL_KEY_PASSWORD": "key-very-secret",
               "EVENTPULSE_REDIS_PASSWORD": "redis-very-secret",
               "EVENTPULSE_PRIVACY_SECRET": "hmac-very-secret"}
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("EVENTPULSE_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("EVENTPULSE_KAFKA_SASL_MECHANISM", "PLAIN")
    monkeypatch.setenv("EVENTPULSE_KAFKA_SASL_USERNAME", "svc")
    settings = load_settings()
    shown = repr(settings) + str(settings) + repr(settings.kafka_security())
    assert "xoxb-very-secret" not in shown
    for value in secrets.values():
        assert value not in shown
    assert settings.slack_token is not None
    assert settings.slack_token.get_secret_value() == "xoxb-very-secret"


def test_durations() -> None:
    assert parse_duration_ms("250ms") == 250
    assert parse_duration_ms("5m") == 300_000
    assert parse_duration_ms(30) == 30_000
    assert format_duration_ms(300_000) == "5m"
    with pytest.raises(ValueError):
        parse_duration_ms("five minutes")


def test_bundled_example_config_is_valid() -> None:
    job = load_config(None)
    assert len(job.features) == 10
    assert {r.name for r in job.alerts.rules} >= {"DiskAlmostFull", "ModelErrorRateHigh"}


def feature(**overrides: Any) -> dict[str, Any]:
    base = {"name": "clicks_5m", "topic": "events", "entity": "user", "key": "user_id",
            "aggregation": "count", "window": {"size": "5m"}}
    return {**base, **overrides}


@pytest.mark.parametrize(("overrides", "expected"), [
    ({"window": {"size": "5m", "step": "7m", "type": "hopping"}}, "window"),
    ({"aggregation": "mean"}, "needs 'value'"),
    ({"aggregation": "median"}, "aggregation"),
    ({"topic": "nope"}, "topic 'nope'"),
    ({"where": {"status": {"between": [1, 2]}}}, "unknown operator"),
    ({"where": {"status": {"gt": True}}}, "gt needs a finite number"),
    ({"where": {"status": {"lte": float("nan")}}}, "lte needs a finite number"),
    ({"where": {"status": {"gte": "500"}}}, "gte needs a finite number"),
    ({"window": {"type": "hopping", "size": "1h", "step": "10s", "lateness": "1d"}},
     "window keeps 9001 windows per entity"),
    ({"ttl": "1m"}, "ttl"),
    # a record counts in the latest closed window until size + step after it: 90 s here
    ({"window": {"type": "hopping", "size": "1m", "step": "30s"}, "ttl": "80s"},
     "ttl must cover the window, one step and the lateness (90000 ms)"),
    ({"aggregation": "ratio"}, "numerator"),
])
def test_feature_errors_name_the_feature_and_field(overrides: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"features": [feature(name="ok_one"), feature(**overrides)]})
    text = str(err.value)
    assert "feature 'clicks_5m'" in text
    assert expected in text


def test_alert_rule_errors_name_the_rule() -> None:
    config = {"features": [feature()], "alerts": {"rules": [
        {"name": "ErrRate", "kind": "ratio", "feature": "clicks_5m", "threshold": 0.1}]}}
    with pytest.raises(ConfigError) as err:
        parse_config(config)
    assert "ErrRate" in str(err.value) and "ratio" in str(err.value)
    bad_clear = {"alerts": {"rules": [{"name": "Disk", "kind": "threshold", "metric": "d",
                                      "threshold": 90, "clear": 95}]}}
    with pytest.raises(ConfigError) as err:
        parse_config(bad_clear)
    assert "alert rule 'Disk'" in str(err.value) and "clear" in str(err.value)


def _disk_rule(**fields: Any) -> dict[str, Any]:
    return {"name": "DiskAlmostFull", "kind": "threshold", "metric": "disk_used_percent",
            "op": ">", **fields}


def test_a_misspelt_required_field_is_named_with_its_likely_meaning() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"alerts": {"rules": [_disk_rule(treshold=90)]}}, "job.yaml")
    assert str(err.value).splitlines()[1:] == [
        "  job.yaml: alert rule 'DiskAlmostFull': threshold: required, but missing",
        "  job.yaml: alert rule 'DiskAlmostFull': treshold: unknown field; did you mean "
        "'threshold'?"]


def test_our_own_sentences_come_without_pydantic_wording() -> None:
    window = {"size": "5m", "step": "7s", "type": "hopping"}
    with pytest.raises(ConfigError) as err:
        parse_config({"features": [feature(window=window)]}, "job.yaml")
    assert str(err.value) == ("invalid configuration: job.yaml: feature 'clicks_5m': window: "
                              "window.size must be a whole multiple of window.step")
    with pytest.raises(ConfigError) as err:
        parse_config({"alerts": {"rules": [_disk_rule(kind="treshold", threshold=1)]}}, "j.yaml")
    assert str(err.value) == ("invalid configuration: j.yaml: alert rule 'DiskAlmostFull': "
                              "'kind' 'treshold' is not one of 'threshold', 'ratio', 'absence', "
                              "'spike'")


def test_settings_messages_drop_pydantic_wording(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVENTPULSE_BROKER_URL", "kafka://no-port-here")
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert str(err.value).startswith("invalid settings: EVENTPULSE_BROKER_URL: expected kafka://")
    assert "Value error" not in str(err.value)


@pytest.mark.parametrize(("content", "expected"), [
    ("", "job.yaml: the file is empty"),
    ("# only a comment\n", "job.yaml: the file is empty"),
    ("{}\n", "job.yaml: the file is empty"),
    ("- a\n- b\n", "job.yaml: the top level must be a mapping of sections"),
    ("features: [\n", "job.yaml: not valid YAML: line 2, column 1: expected the node content"),
    ("a: b: c\n", "job.yaml: not valid YAML: line 1, column 5: mapping values are not allowed"),
    (b"\xff\xfe", "job.yaml: cannot read it: not UTF-8 text"),
])
def test_file_errors_name_the_file(tmp_path: Any, content: str | bytes, expected: str) -> None:
    path = tmp_path / "job.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert text.startswith(str(tmp_path) + "/" + expected), text
    assert "<unicode string>" not in text and "\n" not in text
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "absent.yaml")


def test_a_misspelt_setting_is_named_with_its_likely_name(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Found by an outside test: EVENTPULSE_REDIS_SHRADS=64 was ignored without a word (the
    shard count stayed at its default). Settings still load; each unknown variable is named
    once, with the setting it is likely a misspelling of."""
    import eventpulse.settings as settings_module

    monkeypatch.setattr(settings_module, "_warned_unknown", False)
    monkeypatch.setenv("EVENTPULSE_REDIS_SHRADS", "64")
    monkeypatch.setenv("EVENTPULSE_NOT_A_THING", "1")
    monkeypatch.setenv("EVENTPULSE_KAFKA_SASL_PASSWORD_FILE", "/dev/null")  # a secret as a file
    monkeypatch.setenv("EVENTPULSE_TRACEBACK", "1")
    with caplog.at_level("WARNING", logger="eventpulse.settings"):
        load_settings()
        load_settings()
    lines = [r.getMessage() for r in caplog.records if r.name == "eventpulse.settings"]
    assert lines == [
        "EVENTPULSE_NOT_A_THING is not a setting eventpulse reads; it is ignored",
        "EVENTPULSE_REDIS_SHRADS is not a setting eventpulse reads; it is ignored "
        "(did you mean EVENTPULSE_REDIS_SHARDS?)"]
