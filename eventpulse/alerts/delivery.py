"""Drain the outbox to Slack: in order, grouped, paced, retried, and never twice.

Exactly-once over an API without idempotency keys: before posting, the attempt is recorded; the
message carries its outbox keys in Slack message metadata; if the worker dies between posting and
recording, the next attempt first looks for that metadata in the channel's recent history and, if
the message is there, records it instead of posting again. Incoming webhooks cannot be read back,
so webhook mode is at-least-once across a crash (documented).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_async_handlers import (
    AsyncConnectionErrorRetryHandler,
    AsyncRateLimitErrorRetryHandler,
    AsyncServerErrorRetryHandler,
)
from slack_sdk.web.async_client import AsyncWebClient
from slack_sdk.webhook.async_client import AsyncWebhookClient

from eventpulse import cancellation
from eventpulse.alerts import message
from eventpulse.alerts.outbox import AlertStore, OutboxEntry
from eventpulse.alerts.rules import AlertingConfig, Rule
from eventpulse.alerts.state import Kind

log = logging.getLogger("eventpulse.alerts")
METADATA_EVENT = "eventpulse_alert"


@dataclass
class Posted:
    channel: str
    ts: str | None


class Transport(Protocol):
    threaded: bool

    async def post(self, channel: str, text: str, blocks: list[dict[str, Any]],
                   keys: list[str], thread_ts: str | None = None) -> Posted: ...

    async def update(self, channel: str, ts: str, text: str,
                     blocks: list[dict[str, Any]]) -> None: ...

    async def find(self, channel: str, key: str, since_ms: int) -> Posted | None: ...


class LogTransport:
    """No Slack configured: the alert goes to the log (and the demo's terminal)."""

    threaded = False

    def __init__(self, sink: Callable[[str], None] | None = None) -> None:
        self.sink = sink

    async def post(self, channel: str, text: str, blocks: list[dict[str, Any]],
                   keys: list[str], thread_ts: str | None = None) -> Posted:
        readable = message.unescape(text)
        if self.sink is not None:
            self.sink(f"[{channel}] {readable}")
        log.warning("alert (no Slack configured) to %s:\n%s", channel, readable)
        return Posted(channel, None)

    async def update(self, channel: str, ts: str, text: str, blocks: list[dict[str, Any]]) -> None:
        return None

    async def find(self, channel: str, key: str, since_ms: int) -> Posted | None:
        return None


class WebhookTransport:
    threaded = False

    def __init__(self, url: str) -> None:
        self.client = AsyncWebhookClient(url, timeout=10, retry_handlers=_retry_handlers())

    async def post(self, channel: str, text: str, blocks: list[dict[str, Any]],
                   keys: list[str], thread_ts: str | None = None) -> Posted:
        response = await self.client.send(text=text, blocks=blocks)
        if response.status_code != 200:
            raise DeliveryError(f"webhook answered HTTP {response.status_code}")
        return Posted(channel, None)

    async def update(self, channel: str, ts: str, text: str, blocks: list[dict[str, Any]]) -> None:
        return None

    async def find(self, channel: str, key: str, since_ms: int) -> Posted | None:
        return None


class BotTransport:
    threaded = True

    def __init__(self, token: str, base_url: str | None = None, timeout: int = 10) -> None:
        kwargs: dict[str, Any] = {"token": token, "timeout": timeout,
                                  "retry_handlers": _retry_handlers()}
        if base_url:
            kwargs["base_url"] = base_url
        self.client = AsyncWebClient(**kwargs)

    async def post(self, channel: str, text: str, blocks: list[dict[str, Any]],
                   keys: list[str], thread_ts: str | None = None) -> Posted:
        response = await self.client.chat_postMessage(
            channel=channel, text=text, blocks=blocks, thread_ts=thread_ts, unfurl_links=False,
            metadata={"event_type": METADATA_EVENT, "event_payload": {"keys": ",".join(keys)}},
        )
        return Posted(str(response["channel"]), str(response["ts"]))

    async def update(self, channel: str, ts: str, text: str, blocks: list[dict[str, Any]]) -> None:
        await self.client.chat_update(channel=channel, ts=ts, text=text, blocks=blocks)

    async def find(self, channel: str, key: str, since_ms: int) -> Posted | None:
        response = await self.client.conversations_history(
            channel=channel, oldest=f"{since_ms / 1000 - 5:.6f}", include_all_metadata=True,
            limit=200)
        messages: list[dict[str, Any]] = response.get("messages", []) or []
        for item in messages:
            payload = (item.get("metadata") or {}).get("event_payload") or {}
            if key in str(payload.get("keys", "")).split(","):
                return Posted(str(response.get("channel", channel)), str(item["ts"]))
        return None


def _retry_handlers() -> list[Any]:
    # Inside one call: honour Retry-After on 429, retry a 500/503 and a dropped connection twice.
    # Beyond that the delivery loop keeps the entry and retries with backoff, forever.
    return [AsyncRateLimitErrorRetryHandler(max_retry_count=3),
            AsyncServerErrorRetryHandler(max_retry_count=2),
            AsyncConnectionErrorRetryHandler(max_retry_count=2)]


class DeliveryError(Exception):
    pass


class DeliveryHooks(Protocol):
    def sent(self, kind: str, latency_s: float) -> None: ...
    def failed(self, reason: str) -> None: ...
    def suppressed(self) -> None: ...


class NullHooks:
    def sent(self, kind: str, latency_s: float) -> None: ...
    def failed(self, reason: str) -> None: ...
    def suppressed(self) -> None: ...


class Deliverer:
    """Sends what the outbox holds. One per worker; safe to run in several (keys dedupe)."""

    def __init__(self, store: AlertStore, config: AlertingConfig, transport: Transport,
                 hooks: DeliveryHooks | None = None, pace_s: float = 1.0,
                 max_backoff_s: float = 30.0, rules: Mapping[str, Rule] | None = None) -> None:
        self.store = store
        self.config = config
        # the engine's rules: the configured ones plus eventpulse's own (pipeline lag)
        self.rules = dict(rules) if rules is not None else {r.name: r for r in config.rules}
        self.transport = transport
        self.hooks = hooks or NullHooks()
        self.pace_s = pace_s
        self.max_backoff_s = max_backoff_s
        self._last_post: dict[str, float] = {}
        self.wakeup = asyncio.Event()

    async def run(self, stopping: Callable[[], bool] | None = None) -> None:
        backoff = 0.2
        while not (stopping and stopping()):
            if cancellation.requested():  # cancelled, and something on the way swallowed it
                raise asyncio.CancelledError
            try:
                delay = await self.deliver_due()
                backoff = 0.2
            except Exception as exc:  # Slack or Redis trouble: keep the entry, try again later
                if cancellation.requested():  # a cancel that redis-py turned into an error
                    raise asyncio.CancelledError from exc
                self.hooks.failed(type(exc).__name__)
                log.warning("alert delivery failed, will retry in %.1fs: %s", backoff,
                            _safe(exc))
                delay = backoff
                backoff = min(backoff * 2, self.max_backoff_s)
            self.wakeup.clear()
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancel that
            # lands as the wakeup fires (CPython gh-86296)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self.wakeup.wait()

    async def deliver_due(self) -> float:
        """Deliver every group that is due; return how long to wait before looking again."""
        while True:
            entries = await self.store.outbox()
            if not entries:
                return 0.5
            now = int(time.time() * 1000)
            head = entries[0]
            if head.not_before_ms > now:
                return min(0.5, (head.not_before_ms - now) / 1000)
            per_alert = head.transition.kind != Kind.FIRING  # resolves go to their own thread
            # as Alertmanager: whatever joined the group while its head waited goes out with it
            group = [e for e in entries if e.group == head.group
                     and e.transition.kind == head.transition.kind
                     and (not per_alert or e.transition.fingerprint == head.transition.fingerprint)]
            await self._deliver(group)

    async def _deliver(self, group: list[OutboxEntry]) -> None:
        head = group[0]
        already = await self.store.sent_keys([e.key for e in group])
        if already:
            done = [e for e in group if e.key in already]
            receipt = already[done[0].key]
            await self.store.mark_sent(done, receipt["channel"], receipt["ts"], None)
            return
        to_send = [e for e in group if e.transition.silenced_until is None]
        if not to_send:  # evaluated while silenced: recorded, not sent
            for _ in group:
                self.hooks.suppressed()
            await self.store.mark_sent(group, head.channel, None, None)
            return
        rule = self.rules.get(head.rule)
        if rule is None:
            log.warning("dropping outbox entries of unknown rule %s", head.rule)
            await self.store.mark_sent(group, head.channel, None, None)
            return
        transitions = [e.transition for e in to_send]
        text = message.plain_text(rule, transitions)
        blocks = message.blocks(rule, transitions)
        keys = [e.key for e in group]
        posted: Posted | None = None
        attempt = await self.store.attempt(head.key)
        thread_ts = None
        original: dict[str, Any] | None = None
        if head.transition.kind in (Kind.RESOLVED, Kind.REMINDER) and self.transport.threaded:
            original = await self.store.thread_of(head.transition.fingerprint)
            thread_ts = original["ts"] if original else None
        channel = original["channel"] if original else head.channel
        if attempt is not None:
            posted = await self.transport.find(attempt["channel"], head.key, attempt["at"])
        if posted is None:
            await self._pace(channel)
            await self.store.note_attempt(head.key, channel)
            posted = await self.transport.post(channel, text, blocks, keys, thread_ts)
        # counted once Slack has it, before the outbox forgets it (whoever watches the outbox
        # drain sees the counts too)
        now = time.time()
        for entry in to_send:
            self.hooks.sent(entry.transition.kind.value, max(0.0, now - entry.decided_ms / 1000))
        record = None
        if head.transition.kind == Kind.FIRING and posted.ts is not None:
            record = {"channel": posted.channel, "ts": posted.ts}
            await self.store.save_thread(_message_key(posted.channel, posted.ts),
                                         {"text": text, "blocks": blocks})
        if original is not None and head.transition.kind == Kind.RESOLVED:
            await self._mark_original_resolved(original, text)
        await self.store.mark_sent(group, posted.channel, posted.ts, record)

    async def _mark_original_resolved(self, original: dict[str, Any], resolve_text: str) -> None:
        """Edit the firing message so that whoever scrolls past it sees it is over."""
        key = _message_key(original["channel"], original["ts"])
        content = await self.store.thread_of(key)
        if content is None:
            return
        note = f":white_check_mark: Resolved - {resolve_text.splitlines()[0]}"
        content["blocks"].append({"type": "context", "elements": [{"type": "mrkdwn", "text": note}]})
        content["text"] += "\n" + note
        await self._pace(original["channel"])
        await self.transport.update(original["channel"], original["ts"], content["text"],
                                    content["blocks"])
        await self.store.save_thread(key, content)

    async def _pace(self, channel: str) -> None:
        """Slack allows about one message per second per channel."""
        last = self._last_post.get(channel)
        now = time.monotonic()
        if last is not None and now - last < self.pace_s:
            await asyncio.sleep(self.pace_s - (now - last))
        self._last_post[channel] = time.monotonic()


def _message_key(channel: str, ts: str) -> str:
    return f"msg:{channel}:{ts}"


def _safe(exc: Exception) -> str:
    """An error line without secrets: Slack errors are reduced to their API error code."""
    if isinstance(exc, SlackApiError):
        return f"Slack API error {exc.response.get('error', '?')}"
    return type(exc).__name__
