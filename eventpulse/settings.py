"""Process settings, read from ``EVENTPULSE_*`` environment variables.

Everything a deployment changes without touching code lives here; what the job computes (features,
alert rules) lives in the YAML file that ``config_path`` names. Validation happens once at start-up
so that a typo stops the worker with a sentence naming the variable, instead of a traceback an hour
later.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from eventpulse.logging.security import (
    CREDENTIALS_IN_ADDRESS,
    KafkaSecurity,
    SecretFileError,
    has_credentials,
    read_setting,
    tls_file_problems,
)
from eventpulse.streams.deadletter import MIN_DEAD_LETTER_BYTES
from eventpulse.tables.writebounds import DEFAULT_SHARDS, SCRIPT_BUDGET_MS
from eventpulse.validation import messages, report

ENV_PREFIX = "EVENTPULSE_"
log = logging.getLogger("eventpulse.settings")


class FileVariables(PydanticBaseSettingsSource):
    """``EVENTPULSE_X_FILE=/run/secrets/x``: setting ``x`` is the file's contents, the way
    Kubernetes and Docker mount secrets (any setting may be given so; secrets should be)."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return read_setting(os.environ, ENV_PREFIX + field_name.upper()), field_name, False

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name in self.settings_cls.model_fields:
            if os.environ.get(ENV_PREFIX + name.upper() + "_FILE"):
                values[name] = read_setting(os.environ, ENV_PREFIX + name.upper())
        return values


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
    redis_shards: int | None = Field(
        default=None, ge=1, le=4096,
        description="Fence shards the entities are spread over, fixed once used; unset: what "
                    f"Redis already holds, else {DEFAULT_SHARDS}")
    redis_script_budget_ms: float = Field(default=SCRIPT_BUDGET_MS, gt=0, le=5000,
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
    health_loop_stall_s: float = Field(
        default=10.0, gt=1.0, description="/healthz fails when the event loop's heartbeat is older")
    ready_redis_outage_s: float = Field(
        default=30.0, gt=0, description="/readyz fails once Redis has been unreachable this long")
    ready_stall_s: float = Field(
        default=120.0, gt=0,
        description="/readyz fails when records wait and no batch has been applied for this long")
    stop_timeout_s: float = Field(
        default=25.0, gt=0, le=600,
        description="Longest stop after SIGTERM/SIGINT: the batch in hand is finished and "
                    "committed, else (broker or Redis gone) the process exits at this bound")
    # -- Kafka security (docs/security.md); every Kafka client eventpulse makes uses these
    kafka_security_protocol: str = Field(
        default="PLAINTEXT", description="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL")
    kafka_sasl_mechanism: str | None = Field(
        default=None, description="PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 or OAUTHBEARER")
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: str | None = Field(default=None, description="CA bundle (PEM) of the brokers")
    kafka_ssl_certfile: str | None = Field(default=None, description="client certificate (mTLS)")
    kafka_ssl_keyfile: str | None = Field(default=None, description="client key (mTLS)")
    kafka_ssl_key_password: SecretStr | None = None
    kafka_ssl_check_hostname: bool = True
    kafka_oauth_token_provider: str | None = Field(
        default=None, description="OAUTHBEARER token provider, package.module:name")
    # -- Redis security: the URL may carry them too (rediss://user:password@host:port/0)
    redis_username: str | None = Field(default=None, description="Redis ACL user")
    redis_password: SecretStr | None = None
    redis_ssl_cafile: str | None = Field(default=None, description="CA bundle (PEM) of Redis")
    redis_ssl_certfile: str | None = Field(default=None, description="client certificate")
    redis_ssl_keyfile: str | None = Field(default=None, description="client key")
    redis_ssl_check_hostname: bool = True

    dead_letter_max_request_size: int = Field(
        default=1_048_576, ge=MIN_DEAD_LETTER_BYTES, le=1_073_741_824,
        description="max_request_size of the dead-letter producer; letters are cut to fit it",
    )

    # --- the parquet archive (eventpulse.archive; docs/archive.md) --------------------------
    archive_url: str | None = Field(
        default=None, description="Where the archive writes: s3://bucket[/prefix], a directory "
        "path or file:///dir; unset = no archive")
    archive_topics: str | None = Field(
        default=None, description="Comma-separated topics to archive (default: every job topic)")
    archive_s3_endpoint: str | None = Field(
        default=None, description="S3 API endpoint URL (MinIO, GCS interop, tests); unset = AWS")
    archive_s3_region: str | None = Field(default=None, description="S3 region")
    archive_s3_access_key_id: SecretStr | None = Field(default=None, description="S3 access key id")
    archive_s3_secret_access_key: SecretStr | None = Field(
        default=None, description="S3 secret access key")
    archive_max_records: int = Field(default=50_000, ge=1, description="Records per file at most")
    archive_max_bytes: int = Field(default=16 * 1024 * 1024, ge=1024,
                                   description="Raw record bytes per file at most")
    archive_max_span_ms: int = Field(default=300_000, ge=1000,
                                     description="Event time one file spans at most")
    archive_mode: Literal["process", "inline"] = Field(
        default="process", description="process: the worker runs the archive as a supervised "
        "child process (its own interpreter lock); inline: in the worker's event loop")
    archive_metrics_port: int | None = Field(
        default=None, ge=0, le=65535,
        description="Metrics port of the archive process (default: EVENTPULSE_METRICS_PORT + 1)")
    archive_nice: int = Field(
        default=10, ge=0, le=19, description="CPU niceness of the archive process: under "
        "contention the features go first and the archive catches up after (Kafka buffers)")
    archive_idle_flush_ms: int = Field(default=60_000, ge=100,
                                       description="Land a partition's open file after this long "
                                       "without new records")

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, FileVariables(settings_cls), env_settings, dotenv_settings,
                file_secret_settings)

    @field_validator("slack_token", "slack_webhook_url", "slack_base_url", "privacy_secret",
                     "config_path", "kafka_sasl_mechanism", "kafka_sasl_username",
                     "kafka_sasl_password", "kafka_ssl_cafile", "kafka_ssl_certfile",
                     "kafka_ssl_keyfile", "kafka_ssl_key_password", "kafka_oauth_token_provider",
                     "redis_username", "redis_password", "redis_ssl_cafile", "redis_ssl_certfile",
                     "redis_ssl_keyfile", "archive_url", "archive_topics", "archive_s3_endpoint",
                     "archive_s3_region", "archive_s3_access_key_id",
                     "archive_s3_secret_access_key", "archive_metrics_port", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        """``VAR=`` (as compose files write for optional secrets) means unset."""
        return None if value == "" else value

    @field_validator("broker_url")
    @classmethod
    def _broker_url_is_kafka(cls, value: str) -> str:
        example = "set EVENTPULSE_BROKER_URL to e.g. kafka://localhost:9092"
        schemes = {part.split("://", 1)[0].strip().lower()
                   for part in value.split(",") if "://" in part}
        if schemes - {"kafka"}:
            raise ValueError(f"expected kafka://host:port[,host:port], not a "
                             f"{'/'.join(sorted(schemes - {'kafka'}))}:// URL; {example}")
        servers = bootstrap_servers(value)
        if any(has_credentials(server) for server in servers):
            # never echo the value back: the part before the @ is a password, or may be one
            raise ValueError(
                f"{CREDENTIALS_IN_ADDRESS}: set EVENTPULSE_KAFKA_SASL_USERNAME and "
                "EVENTPULSE_KAFKA_SASL_PASSWORD (docs/security.md) and give "
                "EVENTPULSE_BROKER_URL as kafka://host:port")
        for server in servers:
            host, _, port = server.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"expected kafka://host:port[,host:port], got {value!r}; "
                                 f"{example}")
        if not servers:
            raise ValueError(f"no Kafka address given; {example}")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url_has_scheme(cls, value: str) -> str:
        try:
            urlsplit(value).port  # noqa: B018  # raises for a port that is not a number 0-65535
        except ValueError:
            # Never echo the value back: it may carry a password.
            raise ValueError("the port is not a number from 1 to 65535; set EVENTPULSE_REDIS_URL "
                             "to e.g. redis://localhost:6379/0") from None
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

    @field_validator("archive_url")
    @classmethod
    def _archive_url_scheme(cls, value: str | None) -> str | None:
        if value is None:
            return value
        parts = urlsplit(value)
        if parts.scheme == "s3" and not parts.netloc:
            raise ValueError("expected s3://bucket[/prefix]; set EVENTPULSE_ARCHIVE_URL to e.g. "
                             "s3://my-bucket/eventpulse")
        if parts.scheme not in {"s3", "file", ""}:
            raise ValueError("expected s3://bucket[/prefix], file:///dir or a directory path; "
                             "set EVENTPULSE_ARCHIVE_URL accordingly")
        return value

    @model_validator(mode="after")
    def _security_is_consistent(self) -> Settings:
        """Kafka and Redis security checked together, every problem named by its variable."""
        problems = [f"{ENV_PREFIX}KAFKA_{name.upper()}: {message}"
                    for name, message in self.kafka_security().problems()]
        problems += [f"{ENV_PREFIX}{name.upper()}: {message}"
                     for name, message in self._redis_problems()]
        if problems:
            raise ValueError("\n  ".join(problems))
        return self

    def _redis_problems(self) -> list[tuple[str, str]]:
        url = urlsplit(self.redis_url)
        out = []
        if url.password and self.redis_password is not None:
            out.append(("redis_password", "a password is also in EVENTPULSE_REDIS_URL; keep one"))
        if url.username and self.redis_username:
            out.append(("redis_username", "a user is also in EVENTPULSE_REDIS_URL; keep one"))
        tls_files = ("redis_ssl_cafile", "redis_ssl_certfile", "redis_ssl_keyfile")
        if url.scheme not in ("rediss", "rediss+cluster") and any(
                getattr(self, name) for name in tls_files):
            out.append(("redis_url", "TLS files are given but the URL is not rediss://; "
                                     "use rediss://host:port/0"))
        out += tls_file_problems(self.redis_ssl_cafile, self.redis_ssl_certfile,
                                 self.redis_ssl_keyfile, tls_files,
                                 lambda name: ENV_PREFIX + name.upper())
        return out

    def kafka_security(self) -> KafkaSecurity:
        """The Kafka security options of every client eventpulse makes."""
        return KafkaSecurity(
            security_protocol=self.kafka_security_protocol,
            sasl_mechanism=self.kafka_sasl_mechanism,
            sasl_username=self.kafka_sasl_username,
            sasl_password=_reveal(self.kafka_sasl_password),
            ssl_cafile=self.kafka_ssl_cafile,
            ssl_certfile=self.kafka_ssl_certfile,
            ssl_keyfile=self.kafka_ssl_keyfile,
            ssl_key_password=_reveal(self.kafka_ssl_key_password),
            ssl_check_hostname=self.kafka_ssl_check_hostname,
            oauth_token_provider=self.kafka_oauth_token_provider,
        )

    @property
    def bootstrap_servers(self) -> list[str]:
        return bootstrap_servers(self.broker_url)

    def __repr_args__(self) -> Any:
        """A password inside the Redis URL is a secret too: never in ``repr()``/``str()``."""
        for name, value in super().__repr_args__():
            yield name, redact_url(value) if name == "redis_url" else value


def redact_url(url: str) -> str:
    """``rediss://user:secret@host/0`` -> ``rediss://user:***@host/0``."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def _reveal(secret: SecretStr | None) -> str | None:
    return None if secret is None else secret.get_secret_value()


def bootstrap_servers(url: str) -> list[str]:
    """``kafka://a:1,b:2`` -> ``["a:1", "b:2"]`` (the scheme is optional)."""
    body = url.split("://", 1)[1] if "://" in url else url
    return [part.strip().split("://", 1)[-1] for part in body.split(",") if part.strip()]


class SettingsError(Exception):
    """Start-up settings are wrong; the message names each variable and what it expects."""


#: the commands show a Python traceback instead of one sentence when this is set to anything
#: but an empty string, 0, false, no or off (cliutil.py)
TRACEBACK_VARIABLE = ENV_PREFIX + "TRACEBACK"
#: the worker's pid, given to its archive child so that it stops with it (archive/process.py)
ARCHIVE_PARENT_VARIABLE = ENV_PREFIX + "ARCHIVE_PARENT_PID"
#: variables eventpulse reads that are not settings
OTHER_VARIABLES = frozenset({TRACEBACK_VARIABLE, ARCHIVE_PARENT_VARIABLE})
#: the test tooling's own variables (scripts/test, tests/conftest.py)
TEST_PREFIX = ENV_PREFIX + "TEST_"
_warned_unknown = False


def unknown_variables(environ: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """``EVENTPULSE_*`` variables no setting reads, each with the setting it is likely a
    misspelling of (pydantic-settings ignores them, so ``EVENTPULSE_REDIS_SHRADS=64`` would
    leave the shard count at its default without a word)."""
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    accepted = known | {name + "_FILE" for name in known} | OTHER_VARIABLES
    names = [name.upper() for name in Settings.model_fields]  # compared without the prefix

    def likely(name: str) -> str | None:
        close = difflib.get_close_matches(name.removeprefix(ENV_PREFIX), names, n=1, cutoff=0.8)
        return ENV_PREFIX + close[0] if close else None

    return [(name, likely(name)) for name in sorted(environ)
            if name.startswith(ENV_PREFIX) and not name.startswith(TEST_PREFIX)
            and name not in accepted]


def _warn_unknown_variables() -> None:
    """One warning per unknown variable, once per process (settings are read many times)."""
    global _warned_unknown
    if _warned_unknown:
        return
    _warned_unknown = True
    for name, guess in unknown_variables(os.environ):
        log.warning("%s is not a setting eventpulse reads; it is ignored%s", name,
                    f" (did you mean {guess}?)" if guess else "")


def load_settings(**overrides: object) -> Settings:
    """Read settings, turning pydantic's report into one line per wrong environment variable."""
    _warn_unknown_variables()
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except SecretFileError as exc:
        raise SettingsError(f"invalid settings:\n  {exc}") from None
    except ValidationError as exc:
        lines = []
        for loc, text in messages(exc.errors(include_input=False, include_url=False)):
            field = ".".join(str(part) for part in loc)
            # a check across fields has no location: its message names the variables
            lines.append(f"{ENV_PREFIX}{field.upper()}: {text}" if field else text)
        raise SettingsError(report("invalid settings", lines)) from None
