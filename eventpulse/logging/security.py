"""How every eventpulse Kafka client authenticates: TLS, mutual TLS and SASL, in one place.

The worker (consumer, producers, the Faust app, topic admin, the dead-letter tail), the demo and
the producing side (:mod:`eventpulse.logging`) all build their aiokafka options here, from the
same ``EVENTPULSE_KAFKA_*`` variables, so a service that logs to Kafka and the worker that reads
it are configured the same way. This module lives under :mod:`eventpulse.logging` because the
producing side must install without the worker: it imports nothing of the worker (only the
standard library and aiokafka).

Secrets never appear in a ``repr``, an error or a log line: ``sasl_password`` and
``ssl_key_password`` are excluded from the dataclass ``repr``, and :meth:`KafkaSecurity.problems`
names settings, never values.
"""

from __future__ import annotations

import importlib
import os
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from aiokafka.abc import AbstractTokenProvider

ENV_PREFIX = "EVENTPULSE_KAFKA_"
PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER")
#: SASL mechanisms that authenticate with a username and a password
PASSWORD_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


#: why a Kafka address may not carry ``user:password@``: the Kafka clients log addresses
CREDENTIALS_IN_ADDRESS = "a Kafka address carries no credentials (user:password@host)"


def has_credentials(address: str) -> bool:
    """True for a bootstrap address with a userinfo part (``user:secret@host:9092``)."""
    return "@" in address


class KafkaSecurityError(ValueError):
    """The Kafka security settings are inconsistent; the message names each setting."""


class SecretFileError(ValueError):
    """A ``*_FILE`` variable names a file that cannot be read, or clashes with the variable."""


@dataclass(frozen=True)
class KafkaSecurity:
    """The security part of a Kafka client's configuration (field ``x`` is read from
    ``EVENTPULSE_KAFKA_X`` or from the file that ``EVENTPULSE_KAFKA_X_FILE`` names)."""

    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)
    #: CA bundle that signed the brokers' certificates (default: the system's trust store)
    ssl_cafile: str | None = None
    #: client certificate and key, for brokers that require mutual TLS
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_key_password: str | None = field(default=None, repr=False)
    ssl_check_hostname: bool = True
    #: OAUTHBEARER: ``package.module:name``, a token-provider class or a factory returning one
    oauth_token_provider: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "security_protocol", (self.security_protocol or "PLAINTEXT").upper())
        if self.sasl_mechanism:
            object.__setattr__(self, "sasl_mechanism", self.sasl_mechanism.upper())

    # -- reading -------------------------------------------------------------------------------
    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None,
                 prefix: str = ENV_PREFIX) -> KafkaSecurity:
        """Read ``PREFIX<FIELD>`` or ``PREFIX<FIELD>_FILE`` (a secret mounted as a file)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            value = read_setting(env, prefix + f.name.upper())
            if value is None:
                continue
            values[f.name] = value.lower() not in ("0", "false", "no") if f.type == "bool" else value
        return cls(**values)

    # -- checking ------------------------------------------------------------------------------
    @property
    def uses_tls(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    @property
    def uses_sasl(self) -> bool:
        return self.security_protocol in ("SASL_PLAINTEXT", "SASL_SSL")

    def problems(self) -> list[tuple[str, str]]:
        """``(field, what is wrong and how to fix it)`` for every inconsistency; no values."""
        out: list[tuple[str, str]] = []
        if self.security_protocol not in PROTOCOLS:
            out.append(("security_protocol", f"expected one of {', '.join(PROTOCOLS)}"))
            return out
        mechanism = self.sasl_mechanism
        if self.uses_sasl:
            if mechanism is None:
                out.append(("sasl_mechanism", f"{self.security_protocol} needs a SASL mechanism: "
                                              f"one of {', '.join(MECHANISMS)}"))
            elif mechanism not in MECHANISMS:
                out.append(("sasl_mechanism", f"expected one of {', '.join(MECHANISMS)}"))
            elif mechanism in PASSWORD_MECHANISMS:
                for name in ("sasl_username", "sasl_password"):
                    if not getattr(self, name):
                        out.append((name, f"SASL {mechanism} needs a username and a password; "
                                          f"set {env_name(name)} (or {env_name(name)}_FILE)"))
            elif mechanism == "OAUTHBEARER":
                if not self.oauth_token_provider:
                    out.append(("oauth_token_provider", "SASL OAUTHBEARER needs a token provider: "
                                "an import path such as package.module:Provider"))
                else:
                    try:
                        load_token_provider(self.oauth_token_provider)
                    except Exception as exc:
                        out.append(("oauth_token_provider", f"cannot load it: {exc}"))
        elif mechanism or self.sasl_username or self.sasl_password:
            out.append(("security_protocol", f"SASL settings are given but the protocol is "
                        f"{self.security_protocol}; set {env_name('security_protocol')} to "
                        "SASL_SSL (or SASL_PLAINTEXT)"))
        tls_files = ("ssl_cafile", "ssl_certfile", "ssl_keyfile")
        if not self.uses_tls and any(getattr(self, name) for name in tls_files):
            out.append(("security_protocol", f"TLS files are given but the protocol is "
                        f"{self.security_protocol}; set {env_name('security_protocol')} to SSL "
                        "or SASL_SSL"))
        out += tls_file_problems(self.ssl_cafile, self.ssl_certfile, self.ssl_keyfile,
                                 ("ssl_cafile", "ssl_certfile", "ssl_keyfile"), env_name,
                                 self.ssl_key_password)
        return out

    def check(self) -> KafkaSecurity:
        """Raise :class:`KafkaSecurityError` listing every problem by variable name."""
        found = self.problems()
        if found:
            raise KafkaSecurityError("invalid Kafka security settings:\n  " + "\n  ".join(
                f"{env_name(name)}: {message}" for name, message in found))
        return self

    # -- building clients ----------------------------------------------------------------------
    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context of SSL / SASL_SSL (None otherwise)."""
        if not self.uses_tls:
            return None
        context = ssl.create_default_context(cafile=self.ssl_cafile)
        context.check_hostname = self.ssl_check_hostname
        if self.ssl_certfile:
            context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile,
                                    password=self.ssl_key_password)
        return context

    def token_provider(self) -> Any:
        """An ``aiokafka.abc.AbstractTokenProvider`` for OAUTHBEARER (None otherwise)."""
        if self.sasl_mechanism != "OAUTHBEARER" or not self.oauth_token_provider:
            return None
        return load_token_provider(self.oauth_token_provider)

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments for any aiokafka client (producer, consumer, admin)."""
        self.check()
        options: dict[str, Any] = {"security_protocol": self.security_protocol}
        context = self.ssl_context()
        if context is not None:
            options["ssl_context"] = context
        if self.uses_sasl:
            options["sasl_mechanism"] = self.sasl_mechanism
            if self.sasl_mechanism == "OAUTHBEARER":
                options["sasl_oauth_token_provider"] = self.token_provider()
            else:
                options["sasl_plain_username"] = self.sasl_username
                options["sasl_plain_password"] = self.sasl_password
        return options


async def connection_errors(servers: list[str], options: Mapping[str, Any],
                            timeout_s: float = 15.0) -> list[tuple[str, BaseException]]:
    """Connect and authenticate to each bootstrap server in turn until one accepts: ``[]``, or
    why each refused. aiokafka's clients only say "Unable to bootstrap"; this says why (a
    SASL error, a certificate the CA does not verify, a closed connection...)."""
    import asyncio

    from aiokafka.conn import create_conn

    errors: list[tuple[str, BaseException]] = []
    for server in servers:
        host, _, port = server.rpartition(":")
        try:
            async with asyncio.timeout(timeout_s):
                conn = await create_conn(host, int(port), request_timeout_ms=int(timeout_s * 1000),
                                         **options)
            conn.close()
            return []
        except Exception as exc:
            errors.append((server, exc))
    return errors


def env_name(name: str, prefix: str = ENV_PREFIX) -> str:
    return prefix + name.upper()


def read_setting(environ: Mapping[str, str], name: str) -> str | None:
    """``NAME``, or the contents of the file ``NAME_FILE`` names (one trailing newline dropped,
    as ``echo`` and editors add one). Both set is refused: which one wins would be a guess."""
    direct, path = environ.get(name), environ.get(name + "_FILE")
    if path:
        if direct:
            raise SecretFileError(f"{name} and {name}_FILE are both set; keep one")
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise SecretFileError(f"{name}_FILE: cannot read {path!r} ({exc.strerror})") from None
        return text[:-1] if text.endswith("\n") else text
    return direct or None


def load_token_provider(path: str) -> Any:
    """Import ``package.module:name`` and return an aiokafka token provider: ``name`` is an
    ``AbstractTokenProvider`` subclass or instance, or a callable returning one (or returning
    an object with an async ``token()``, which is adapted)."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise KafkaSecurityError(f"expected package.module:name, got {path!r}")
    target: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        target = getattr(target, part)
    provider = target() if callable(target) and not isinstance(target, AbstractTokenProvider) \
        else target
    if isinstance(provider, AbstractTokenProvider):
        return provider
    token = getattr(provider, "token", None)
    if not callable(token):
        raise KafkaSecurityError(f"{path} gave {type(provider).__name__}, which has no token() "
                                 "method")
    return _Adapter(token)


class _Adapter(AbstractTokenProvider):  # type: ignore[misc]
    """Wraps an object with ``async token()`` as the AbstractTokenProvider aiokafka insists on."""

    def __init__(self, token: Callable[[], Any]) -> None:
        self._token = token

    async def token(self) -> str:
        result = self._token()
        if hasattr(result, "__await__"):
            result = await result
        return str(result)


def tls_file_problems(cafile: str | None, certfile: str | None, keyfile: str | None,
                      names: tuple[str, str, str], variable: Callable[[str], str],
                      key_password: str | None = None) -> list[tuple[str, str]]:
    """The CA bundle, client certificate and key of a TLS connection (Kafka's or Redis's), each
    named by its setting: missing, one of the pair without the other, or not loadable (not PEM,
    a key that does not match its certificate) is said here, at start-up, rather than as a bare
    SSLError on the first connection."""
    out: list[tuple[str, str]] = []
    ca_name, cert_name, key_name = names
    missing = False
    for name, path in ((ca_name, cafile), (cert_name, certfile), (key_name, keyfile)):
        if path and not Path(path).is_file():
            out.append((name, f"no such file {path!r}"))
            missing = True
    if bool(certfile) != bool(keyfile):
        given, absent = (cert_name, key_name) if certfile else (key_name, cert_name)
        out.append((absent, f"{variable(given)} is set: mutual TLS needs both the client "
                            f"certificate and its key; set {variable(absent)}"))
        missing = True
    if missing:
        return out
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cafile:
        try:
            context.load_verify_locations(cafile=cafile)
        except (ssl.SSLError, ValueError) as exc:
            out.append((ca_name, f"{cafile!r} holds no PEM CA certificate ({_ssl_reason(exc)})"))
    if certfile and keyfile:
        try:
            context.load_cert_chain(certfile, keyfile, password=key_password)
        except (ssl.SSLError, ValueError) as exc:
            out.append((cert_name, f"cannot load the client certificate {certfile!r} with its "
                                   f"key {keyfile!r} ({_ssl_reason(exc)})"))
    return out


def _ssl_reason(exc: BaseException) -> str:
    """OpenSSL's reason ("NO_CERTIFICATE_OR_CRL_FOUND"), not the whole "[X509: ...] (_ssl.c)"."""
    reason = getattr(exc, "reason", None)
    return str(reason) if reason else str(exc)
