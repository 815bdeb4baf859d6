"""Every Kafka and Redis client eventpulse makes is configured here, from :class:`Settings`.

One place, so that TLS, SASL and ACL credentials reach all of them: the record agent's consumer
and dead-letter producer, the Faust app, topic creation, ``dead-letters tail``, the demo, the
feature readers and the alert commands. :func:`preflight` connects once to each before the worker
starts, so that a wrong password or an untrusted certificate stops start-up with a sentence
naming the setting, instead of a client retrying forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import ssl
from typing import Any

from eventpulse.redisconn import RedisModeError, check_mode, ping
from eventpulse.redisretry import is_transient
from eventpulse.settings import ENV_PREFIX, Settings

log = logging.getLogger("eventpulse.connections")


class ConnectionCheckError(RuntimeError):
    """Kafka or Redis refused the configured connection; the message names what to fix."""


def kafka_options(settings: Settings) -> dict[str, Any]:
    """Security keyword arguments for any aiokafka client (producer, consumer, admin)."""
    return settings.kafka_security().client_options()


def faust_credentials(settings: Settings) -> Any:
    """The same security for the Faust app (``broker_credentials``), None for PLAINTEXT."""
    import faust

    security = settings.kafka_security().check()
    context = security.ssl_context()
    if security.uses_sasl:
        if security.sasl_mechanism == "OAUTHBEARER":
            return faust.OAuthCredentials(oauth_cb=security.token_provider(), ssl_context=context)
        return faust.SASLCredentials(username=security.sasl_username,
                                     password=security.sasl_password, ssl_context=context,
                                     mechanism=security.sasl_mechanism)
    if context is not None:
        return faust.SSLCredentials(context)
    return None


def redis_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for ``redis.Redis.from_url(settings.redis_url, ...)`` (the URL's own
    user and password, if any, win; settings refuse both being given)."""
    options: dict[str, Any] = {}
    if settings.redis_username:
        options["username"] = settings.redis_username
    if settings.redis_password is not None:
        options["password"] = settings.redis_password.get_secret_value()
    if settings.redis_url.startswith(("rediss://", "rediss+cluster://")):
        options["ssl_check_hostname"] = settings.redis_ssl_check_hostname
        if settings.redis_ssl_cafile:
            options["ssl_ca_certs"] = settings.redis_ssl_cafile
        if settings.redis_ssl_certfile:
            options["ssl_certfile"] = settings.redis_ssl_certfile
            options["ssl_keyfile"] = settings.redis_ssl_keyfile
    return options


def async_redis(settings: Settings) -> Any:
    """The asyncio Redis client of the worker and the alert commands."""
    from eventpulse.redisconn import connect_async

    return connect_async(settings.redis_url, **redis_options(settings))


async def check_kafka(settings: Settings, timeout_s: float = 15.0) -> None:
    """Open one connection to a bootstrap server with the configured security and
    authenticate; raise :class:`ConnectionCheckError` naming the settings to look at."""
    from eventpulse.logging.security import connection_errors

    errors = await connection_errors(settings.bootstrap_servers, kafka_options(settings),
                                     timeout_s)
    if not errors:
        return
    plain = settings.kafka_security_protocol == "PLAINTEXT"
    if all(_unreachable(exc, plain) for _, exc in errors):
        # nobody listens there (yet): the worker waits for the broker, as it does for Redis
        # (eventpulse.agents.reachable); only a broker that answers and refuses stops start-up
        log.warning("Kafka is not reachable at start-up (%s); the worker keeps retrying",
                    "; ".join(f"{server}: {_describe(exc)}" for server, exc in errors))
        return
    raise ConnectionCheckError(_kafka_failure(settings, errors))


def _unreachable(exc: BaseException, plain: bool) -> bool:
    """Connection refused, no route or a name that does not resolve (yet): no broker at that
    address, as opposed to one that answered and refused TLS or the credentials. Without TLS
    and SASL there is nothing to refuse, so a closed connection or a time-out (a broker
    starting or stopping) is unreachable too."""
    from aiokafka.errors import KafkaConnectionError

    if isinstance(exc, socket.gaierror):
        return True
    if plain and isinstance(exc, KafkaConnectionError | ConnectionError | TimeoutError):
        return True
    return (isinstance(exc, OSError) and not isinstance(exc, ssl.SSLError)
            and exc.errno in _UNREACHABLE_ERRNOS)


_UNREACHABLE_ERRNOS = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH,
                                 errno.EADDRNOTAVAIL})


def _kafka_failure(settings: Settings, errors: list[tuple[str, BaseException]]) -> str:
    security = settings.kafka_security()
    how = security.security_protocol + (f"/{security.sasl_mechanism}" if security.uses_sasl else "")
    lines = [f"cannot connect to Kafka with {how}:"]
    for server, exc in errors:
        lines.append(f"  {server}: {_describe(exc)}")
    hint = _kafka_hint(settings, [exc for _, exc in errors])
    if hint:
        lines.append("  " + hint)
    return "\n".join(lines)


def _kafka_hint(settings: Settings, errors: list[BaseException]) -> str:
    from aiokafka import errors as kafka_errors

    kafka = f"{ENV_PREFIX}KAFKA_"
    security = settings.kafka_security()
    for exc in errors:
        if isinstance(exc, ssl.SSLCertVerificationError):
            return (f"the broker's certificate is not trusted: set {kafka}SSL_CAFILE to the CA "
                    "that signed it")
        if isinstance(exc, ssl.SSLError):
            return (f"TLS failed: check {kafka}SECURITY_PROTOCOL (does the listener speak TLS?) "
                    f"and, if the broker requires a client certificate, {kafka}SSL_CERTFILE / "
                    f"{kafka}SSL_KEYFILE")
        if isinstance(exc, kafka_errors.UnsupportedSaslMechanismError):
            return (f"the broker does not accept {security.sasl_mechanism}: change "
                    f"{kafka}SASL_MECHANISM")
        if (isinstance(exc, kafka_errors.KafkaConnectionError) and security.uses_tls
                and not security.ssl_certfile):
            return (f"the broker closed the connection after TLS: if it requires a client "
                    f"certificate (mutual TLS), set {kafka}SSL_CERTFILE and {kafka}SSL_KEYFILE"
                    + (f"; check {kafka}SASL_MECHANISM={security.sasl_mechanism}, "
                       f"{kafka}SASL_USERNAME / {kafka}SASL_PASSWORD" if security.uses_sasl
                       else ""))
        if isinstance(exc, kafka_errors.KafkaConnectionError) and security.uses_sasl:
            return (f"the broker closed the connection during authentication: check that it "
                    f"enables {kafka}SASL_MECHANISM={security.sasl_mechanism}, and "
                    f"{kafka}SASL_USERNAME / {kafka}SASL_PASSWORD")
        if isinstance(exc, kafka_errors.SaslAuthenticationFailed) or (
                security.uses_sasl and not isinstance(exc, OSError | TimeoutError)):
            if security.sasl_mechanism == "OAUTHBEARER":
                return f"the broker refused the token: check {kafka}OAUTH_TOKEN_PROVIDER"
            return (f"authentication failed: check {kafka}SASL_USERNAME and {kafka}SASL_PASSWORD "
                    f"(and {kafka}SASL_MECHANISM)")
    return f"check {ENV_PREFIX}BROKER_URL and {kafka}SECURITY_PROTOCOL"


def _describe(exc: BaseException) -> str:
    """The error's type and message; aiokafka's SCRAM client reports a server error as a bare
    KeyError of the missing proof field, which says nothing to an operator."""
    if isinstance(exc, KeyError):
        return "the SASL exchange failed (the server sent an error instead of its proof)"
    if isinstance(exc, TimeoutError):
        return "timed out"
    name, text = type(exc).__name__, str(exc)
    return text if text.startswith(name) else f"{name}: {text or 'no detail'}"


async def check_redis(settings: Settings, timeout_s: float = 10.0) -> None:
    """PING Redis with the configured URL, credentials and TLS. Refused credentials, a
    missing ACL permission or an untrusted certificate stop start-up; Redis merely unreachable
    does not (the worker retries Redis as during any outage), it is logged."""
    from redis import exceptions

    client = async_redis(settings)
    redis = f"{ENV_PREFIX}REDIS_"
    try:
        async with asyncio.timeout(timeout_s):
            await _ping_twice_on_reset(client)
            await check_mode(client)  # a cluster URL on a standalone Redis, or the reverse
    except exceptions.AuthenticationError as exc:
        raise ConnectionCheckError(
            f"Redis refused the credentials ({exc}): check {redis}USERNAME and {redis}PASSWORD "
            f"(or the user:password in {redis}URL)") from None
    except RedisModeError as exc:
        raise ConnectionCheckError(str(exc)) from None
    except exceptions.RedisClusterException as exc:  # what cluster_start_error leaves as is
        raise ConnectionCheckError(f"the Redis Cluster of {redis}URL cannot be used: "
                                   f"{str(exc).splitlines()[0][:300]}") from None
    except exceptions.NoPermissionError as exc:
        raise ConnectionCheckError(
            f"Redis ACL refused a command ({exc}): give the user the worker's rules "
            "(eventpulse redis-acl worker; docs/security.md)") from None
    except exceptions.ResponseError as exc:
        if not is_transient(exc):
            raise
        # BUSY (someone else's script), MASTERDOWN...: states that end by themselves, waited
        # out by the worker's retry policy like any outage
        log.warning("Redis is not ready at start-up (%s); the worker keeps retrying",
                    str(exc).splitlines()[0][:160])
    except (ssl.SSLError, exceptions.ConnectionError, OSError, TimeoutError) as exc:
        text = str(exc)
        if "CERTIFICATE_REQUIRED" in text or (
                settings.redis_url.startswith("rediss://") and not settings.redis_ssl_certfile
                and "reset by peer" in text):
            # TLS 1.3 sends the server's "certificate required" alert after the handshake:
            # depending on timing the client reads the alert or only a reset connection
            raise ConnectionCheckError(
                f"Redis requires a client certificate: set {redis}SSL_CERTFILE and "
                f"{redis}SSL_KEYFILE") from None
        if isinstance(exc, ssl.SSLError) or "[SSL" in text or "[X509" in text:
            raise ConnectionCheckError(
                f"TLS to Redis failed: {_describe(exc)}; set {redis}SSL_CAFILE to the CA that "
                f"signed Redis's certificate (and {redis}SSL_CERTFILE / {redis}SSL_KEYFILE if it "
                "requires a client certificate)") from None
        log.warning("Redis is not reachable at start-up (%s); the worker keeps retrying",
                    _describe(exc))
    finally:
        with contextlib.suppress(Exception):
            await client.aclose()


async def _ping_twice_on_reset(client: Any) -> None:
    """A connection reset once can be a server restarting; twice in a row, it is a refusal."""
    from redis import exceptions

    try:
        await ping(client)
    except exceptions.ConnectionError as exc:
        if "reset by peer" not in str(exc):
            raise
        await asyncio.sleep(0.5)
        await ping(client)


async def preflight(settings: Settings) -> None:
    """Both checks, at start-up."""
    await check_kafka(settings)
    await check_redis(settings)
