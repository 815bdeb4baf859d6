"""What every ``eventpulse`` command shares: failures as one sentence, times as people read them.

A newcomer's first commands meet a Redis that is not running or a broker at the wrong address;
they should read one line saying which server and which variable to change, not 40 lines of
traceback. :class:`FriendlyGroup` turns what commands raise into that line (exit 1), a Ctrl-C
into exit 130 (the shell convention for SIGINT), and leaves the traceback to
``EVENTPULSE_TRACEBACK=1`` for whoever debugs eventpulse itself.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import signal
import ssl
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from eventpulse.addresses import broker_address, redis_url_address
from eventpulse.durations import MAX_EPOCH_MS, MIN_EPOCH_MS, parse_duration_ms
from eventpulse.durations import wall_ms as now_ms
from eventpulse.settings import TRACEBACK_VARIABLE
from eventpulse.streams.schemas import MILLIS_THRESHOLD

#: The exit status of a process ended by Ctrl-C (128 + SIGINT).
INTERRUPTED = 130
#: ... and by SIGTERM, once its clean-up ran (128 + SIGTERM).
TERMINATED = 143


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the command is (:func:`sigterm_interrupts`)."""


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raised as an interrupt for the block: what the command started (a private
    Redis, a broker, processes) is stopped by the same clean-up as after Ctrl-C, where Python's
    default would end the process on the spot (found by an outside test: a training set's
    private redis-server outlived a SIGTERM). :class:`FriendlyGroup` then exits 143."""
    def on_term(signum: int, frame: object) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class FriendlyGroup(click.Group):
    """The top-level group: every subcommand runs inside its :meth:`invoke`."""

    def invoke(self, ctx: click.Context) -> Any:
        # aiokafka logs each refused connection itself; the sentence below says it once
        # (the worker configures logging its own way and shows them)
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
        try:
            return super().invoke(ctx)
        except click.BadParameter as exc:  # a wrong value: the usage would only repeat --help
            raise OneLineError(None, exc.format_message()) from None
        except click.exceptions.NoArgsIsHelpError:  # a bare group: its help is the answer
            raise
        except click.UsageError as exc:  # an unknown command, a missing argument: one line
            raise OneLineError(None, f"{exc.format_message()} (see "
                               f"{exc.ctx.command_path if exc.ctx else 'eventpulse'} --help)"
                               ) from None
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Terminated:
            click.echo("terminated", err=True)
            raise click.exceptions.Exit(TERMINATED) from None
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            raise click.exceptions.Exit(INTERRUPTED) from None
        except Exception as exc:
            if wants_traceback():
                raise
            raise click.ClickException(describe_failure(exc)) from None


def wants_traceback() -> bool:
    """Whether ``EVENTPULSE_TRACEBACK`` asks for tracebacks: set, and not to a word for "no"
    (an outside test set it to 0 to turn them off and got them)."""
    value = os.environ.get(TRACEBACK_VARIABLE, "").strip().lower()
    return value not in ("", "0", "false", "no", "off")


def describe_failure(exc: Exception) -> str:
    """One sentence for what a command raised: which server, which variable, what to do."""
    from aiokafka.errors import KafkaConnectionError, KafkaError
    from redis.exceptions import AuthenticationError, RedisClusterException, RedisError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    from eventpulse.local.servers import ServerError
    from eventpulse.redisconn import TO_STANDALONE, RedisModeError

    if isinstance(exc, RedisModeError):  # its text is the sentence, fix included
        return str(exc)
    if isinstance(exc, RedisClusterException) and "not enabled" in str(exc):
        return f"{TO_STANDALONE} (at {_redis_address()})"
    if isinstance(exc, AuthenticationError):
        return (f"Redis at {_redis_address()} refused the credentials of EVENTPULSE_REDIS_URL "
                f"({_first_line(exc)})")
    if isinstance(exc, RedisConnectionError | RedisTimeoutError):
        # the node that failed, where redis-py names it (a cluster's may not be the URL's)
        node = re.search(r"connecting to (\S+:\d+)", str(exc))
        where = _redis_address()
        if node and not where.startswith(node.group(1) + "/"):
            where = node.group(1)
        return (f"cannot reach Redis at {where} ({redis_reason(exc)}); start it or "
                "set EVENTPULSE_REDIS_URL")
    if isinstance(exc, RedisError):
        return f"Redis at {_redis_address()} answered with an error: {_first_line(exc)}"
    if isinstance(exc, ServerError):  # the demo's or replay's own local servers
        return str(exc)
    if isinstance(exc, KafkaConnectionError):
        return (f"cannot reach the Kafka broker at {_broker_address()}; start it or set "
                "EVENTPULSE_BROKER_URL")
    if isinstance(exc, KafkaError):
        return f"the Kafka broker at {_broker_address()} failed: {type(exc).__name__}: " + (
            _first_line(exc))
    return (f"unexpected {type(exc).__name__}: {_first_line(exc)} (run with "
            f"{TRACEBACK_VARIABLE}=1 for the traceback, and please report it)")


def _settings() -> Any:
    from eventpulse.settings import SettingsError, load_settings

    try:
        return load_settings()
    except SettingsError:
        return None


def _redis_address() -> str:
    settings = _settings()
    return redis_url_address(settings.redis_url) if settings else "EVENTPULSE_REDIS_URL"


def _broker_address() -> str:
    settings = _settings()
    return broker_address(settings.bootstrap_servers) if settings else "EVENTPULSE_BROKER_URL"


def redis_reason(exc: BaseException) -> str:
    """The operating system's reason (``connection refused``) where the error chain has one;
    redis-py words it differently in its sync and asyncio clients."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):  # its errno is OpenSSL's, not the system's
            return (f"TLS failed: {seen.reason or _first_line(seen)}; check the "
                    "EVENTPULSE_REDIS_SSL_* settings")
        if isinstance(seen, OSError) and (seen.errno or seen.strerror):
            return (os.strerror(seen.errno) if seen.errno else str(seen.strerror)).lower()
        seen = seen.__cause__ or seen.__context__
    text = _first_line(exc).rstrip(".")
    return text.rsplit(". ", 1)[-1].lower() if ". " in text else text or "no answer"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class OneLineError(click.ClickException):
    """A bad option value, said in one line (click's usage errors repeat the usage first)."""

    exit_code = 2

    def __init__(self, option: str | None, problem: str) -> None:
        super().__init__(f"{option}: {problem}" if option else problem)


class Duration(click.ParamType):
    """``30s``, ``5m``, ``2h``, ``7d`` -> milliseconds."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None
                ) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_duration_ms(value)
        except ValueError as exc:
            raise OneLineError(_option(param), str(exc)) from None


class Moment(click.ParamType):
    """A point in time: ISO-8601 (``2026-12-01T18:00:00Z``; no zone means UTC), epoch
    milliseconds (or seconds: a number below 10^11, as records' timestamps), or a duration
    (``2h``) from now: ahead of it (``ahead``, a silence's end) or that long ago (``ago``, a
    report's start) -> epoch milliseconds."""

    name = "time"

    def __init__(self, ahead: bool = False, ago: bool = False) -> None:
        self.ahead = ahead
        self.ago = ago

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None
                ) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip()
        if text.removeprefix("-").isdigit():  # epoch seconds or milliseconds, as in records
            number = int(text)
            return self._in_range(number * 1000 if abs(number) < MILLIS_THRESHOLD else number,
                                  text, param)
        if self.ahead or self.ago:
            with contextlib.suppress(ValueError):
                return now_ms() + (1 if self.ahead else -1) * parse_duration_ms(text)
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            ahead = (", a duration from now such as 2h," if self.ahead else
                     ", a duration such as 2h (that long ago)," if self.ago else "")
            raise OneLineError(_option(param), f"expected an ISO-8601 time such as "
                               f"2026-12-01T18:00:00Z{ahead} or epoch seconds or milliseconds, got {text!r}"
                               ) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return self._in_range(math.floor(moment.timestamp() * 1000), text, param)

    @staticmethod
    def _in_range(ms: int, text: str, param: click.Parameter | None) -> int:
        """``ms`` if records can be read at it: 1970 to the end of year 9999 (an offset or a
        fraction of a millisecond can carry an ISO time past either end)."""
        if not MIN_EPOCH_MS <= ms <= MAX_EPOCH_MS:
            raise OneLineError(_option(param), f"epoch milliseconds go from {MIN_EPOCH_MS} "
                               f"(1970) to {MAX_EPOCH_MS} (year 9999), got {text}")
        return ms


def _option(param: click.Parameter | None) -> str:
    if param is None:
        return "value"
    opts = getattr(param, "opts", None)
    return max(opts, key=len) if opts else (param.human_readable_name or "value")



def unwritable(path: Path) -> str | None:
    """Why a file cannot be written at ``path`` (checked before a command's work, which would
    otherwise end in an error after it), or None."""
    if not path.parent.is_dir():
        return f"no directory {path.parent}"
    if path.is_dir():
        return "is a directory; name a file in it"
    return None


def iso(ms: int) -> str:
    """Epoch milliseconds -> ``2026-12-01T03:15:00Z`` (UTC, to the second)."""
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_UNITS = (("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1))


def relative(ms: int, now: int) -> str:
    """``in 1h55m`` / ``5m ago`` / ``now``: the largest unit and the next one, to the second."""
    delta = ms - now
    seconds = (abs(delta) + 500) // 1000
    if seconds == 0:
        return "now"
    span = ""
    for i, (unit, size) in enumerate(_UNITS):
        if seconds >= size:
            major, rest = divmod(seconds, size)
            span = f"{major}{unit}"
            if i + 1 < len(_UNITS) and rest // _UNITS[i + 1][1]:
                span += f"{rest // _UNITS[i + 1][1]}{_UNITS[i + 1][0]}"
            break
    return f"in {span}" if delta > 0 else f"{span} ago"


def when(ms: int, now: int) -> str:
    """``2026-12-01T05:15:00Z (in 2h)``."""
    return f"{iso(ms)} ({relative(ms, now)})"
