"""The compose file and Dockerfile speak the same settings as the code."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from eventpulse.settings import ENV_PREFIX, Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent


def test_compose_worker_uses_only_real_settings() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert {"kafka", "redis", "worker", "prometheus"} <= set(compose["services"])
    env = compose["services"]["worker"]["environment"]
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    assert set(env) <= known, set(env) - known
    assert env["EVENTPULSE_BROKER_URL"].startswith("kafka://kafka:")
    assert compose["services"]["worker"]["build"] == "."
    config_mount = compose["services"]["worker"]["volumes"][0].split(":")[0]
    assert (ROOT / config_mount).is_file()
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    assert scrape["scrape_configs"][0]["static_configs"][0]["targets"] == [
        f"worker:{env['EVENTPULSE_METRICS_PORT']}"]


def test_empty_optional_secrets_mean_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVENTPULSE_SLACK_TOKEN", "")
    monkeypatch.setenv("EVENTPULSE_SLACK_WEBHOOK_URL", "")
    settings = load_settings()
    assert settings.slack_token is None and settings.slack_webhook_url is None
