"""Process settings, read from ``EVENTPULSE_*`` environment variables.

Everything a deployment changes without touching code lives here; what the job computes (features,
alert rules) lives in the YAML file that ``config_path`` names. Validation happens once at start-up
so that a typo stops the worker with a sentence naming the variable, instead of a traceback an hour
later.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "EVENTPULSE_"


class Settings(BaseSettings):
    """Runtime settings of the worker and the command-line tools."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    broker_url: str = Field(
        default="kafka://127.0.0.1:9092",
        description="Kafka bootstrap servers, comma separated, as kafka://host:port[,host:port]",
    )
    redis_url: str = Field(default="redis://127.0.0.1:6379/0",
                           description="redis://, rediss:// or unix:// URL of one Redis; "
                                       "redis+cluster:// or rediss+cluster:// of a Redis Cluster")
    redis_namespace: str = Field(default="ep", description="Prefix of every Redis key eventpulse owns")
    redis_shards: int = Field(default=64, ge=1, le=4096,
                              description="Fence shards the entities are spread over (fixed once used)")
    redis_script_budget_ms: float = Field(default=20.0, gt=0, le=5000,
                                          description="Longest a write script may keep Redis busy")
    redis_wait_replicas: int = Field(
        default=0, ge=0, le=16,
        description="Replicas each written primary must acknowledge a batch to (WAIT) before its "
                    "Kafka commit; 0 = no wait")
    redis_wait_timeout_ms: int = Field(default=1000, ge=1, le=60_000,
                                       description="Longest one WAIT for replicas blocks")
    slack_token: SecretStr | None = Field(default=None, description="Slack bot token (xoxb-...)")
    slack_webhook_url: SecretStr | None = Field(default=None, description="Incoming-webhook URL")
    slack_base_url: str | None = Field(
        default=None, description="Override of https://slack.com/api/ (tests, proxies)"
    )
    metrics_port: int = Field(default=9108, ge=0, le=65535, description="Prometheus port, 0 = off")
    config_path: Path | None = Field(default=None, description="YAML file with features and alerts")
    log_format: Literal["json", "text"] = Field(default="text")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(default="INFO")
    consumer_group: str = Field(default="eventpulse", description="Kafka consumer group id prefix")
    batch_max_records: int = Field(default=50_000, ge=1, description="Records per feature batch")
    batch_max_wait_ms: int = Field(default=100, ge=1, description="Longest wait to fill a batch")
    session_timeout_ms: int = Field(default=10_000, ge=1000, description="Kafka group session timeout")
    privacy_secret: SecretStr | None = Field(
        default=None, description="HMAC key for fields configured to be pseudonymised"
    )

    @field_validator("slack_token", "slack_webhook_url", "slack_base_url", "privacy_secret",
                     "config_path", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        """``VAR=`` (as compose files write for optional secrets) means unset."""
        return None if value == "" else value

    @field_validator("broker_url")
    @classmethod
    def _broker_url_is_kafka(cls, value: str) -> str:
        for server in bootstrap_servers(value):
            host, _, port = server.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(
                    f"expected kafka://host:port[,host:port], got {value!r}; "
                    "set EVENTPULSE_BROKER_URL to e.g. kafka://localhost:9092"
                )
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url_has_scheme(cls, value: str) -> str:
        if urlsplit(value).scheme not in {"redis", "rediss", "unix", "redis+cluster",
                                          "rediss+cluster"}:
            # Never echo the value back: it may carry a password.
            raise ValueError(
                "expected a redis://, rediss:// or unix:// URL, or redis+cluster:// (or "
                "rediss+cluster://) for a Redis Cluster; "
                "set EVENTPULSE_REDIS_URL to e.g. redis://localhost:6379/0"
            )
        return value

    @field_validator("config_path")
    @classmethod
    def _config_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"no such file {str(value)!r}; set EVENTPULSE_CONFIG_PATH to a YAML file")
        return value

    @property
    def bootstrap_servers(self) -> list[str]:
        return bootstrap_servers(self.broker_url)


def bootstrap_servers(url: str) -> list[str]:
    """``kafka://a:1,b:2`` -> ``["a:1", "b:2"]`` (the scheme is optional)."""
    body = url.split("://", 1)[1] if "://" in url else url
    return [part.strip().split("://", 1)[-1] for part in body.split(",") if part.strip()]


class SettingsError(Exception):
    """Start-up settings are wrong; the message names each variable and what it expects."""


def load_settings(**overrides: object) -> Settings:
    """Read settings, turning pydantic's report into one line per wrong environment variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for error in exc.errors(include_input=False, include_url=False):
            field = ".".join(str(part) for part in error["loc"])
            lines.append(f"{ENV_PREFIX}{field.upper()}: {error['msg']}")
        raise SettingsError("invalid settings:\n  " + "\n  ".join(lines)) from None
