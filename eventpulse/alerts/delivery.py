"""Drain the outbox to Slack: in order, grouped, paced, retried, and never twice.

Exactly-once over an API without idempotency keys: before posting, the attempt is recorded with
the channel's ID (and the thread, for a reply); the message carries its outbox keys in Slack
message metadata; if the worker dies between posting and recording, the next attempt first looks
for that metadata where the attempt went (``conversations.history`` for a channel message,
``conversations.replies`` for a thread reply, which history does not list) and, if the message is
there, records it instead of posting again. Incoming webhooks cannot be read back, so webhook mode
is at-least-once across a crash (documented).

What Slack refuses for good (archived channel, bot not in the channel, invalid blocks...) is
parked with its reason, out of the way of the other alerts, until a person retries it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from redis.exceptions import ResponseError
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
from eventpulse.redisretry import failure_name, is_transient, server_reply

log = logging.getLogger("eventpulse.alerts")
#: what slack-sdk logs, at WARNING and above only: at INFO its retry handlers print every
#: retried request's full URL, and an incoming webhook's URL is a secret (an outside tester
#: found it in the worker's log, once per retry of an outage)
_SDK_LOG = logging.getLogger("eventpulse.alerts.slack_sdk")
_SDK_LOG.setLevel(logging.WARNING)
METADATA_EVENT = "eventpulse_alert"


#: A Slack conversation ID (public ``C``, private/legacy ``G``, direct message ``D``); anything
#: else in the configuration is a channel name, resolved with conversations.list.
CHANNEL_ID = re.compile(r"^[CGD][A-Z0-9]{2,}$")

#: chat.postMessage/chat.update errors no retry can fix (docs.slack.dev/reference/methods/
#: chat.postMessage, "Errors"): the entries are parked for a person instead of retried forever.
#: Authentication errors (invalid_auth, token_revoked...) are not here: they concern every entry
#: alike, so the outbox keeps retrying and says why in the log.
PERMANENT_ERRORS = frozenset({
    "channel_not_found", "is_archived", "not_in_channel", "no_text", "msg_too_long",
    "msg_blocks_too_long", "invalid_blocks", "invalid_blocks_format", "invalid_metadata_format",
    "invalid_metadata_schema", "metadata_too_large", "too_many_attachments", "restricted_action",
    "restricted_action_read_only_channel", "restricted_action_thread_only_channel",
    "restricted_action_non_threadable_channel", "channel_type_not_supported", "invalid_arguments",
    "messages_tab_disabled",
})


@dataclass
class Posted:
    #: the channel's ID as Slack answered it (for a webhook or the log: as configured)
    channel: str
    ts: str | None
    #: for a message found after a crash: the outbox keys its metadata names
    keys: frozenset[str] = frozenset()


class PermanentError(Exception):
    """Slack will never accept this as it is: park the entries with ``reason``."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.reason = f"{code}: {detail}"


class Transport(Protocol):
    threaded: bool

    async def resolve(self, channel: str) -> str: ...

    async def post(self, channel: str, text: str, blocks: list[dict[str, Any]],
                   keys: list[str], thread_ts: str | None = None) -> Posted: ...

    async def update(self, channel: str, ts: str, text: str,
                     blocks: list[dict[str, Any]]) -> None: ...

    async def find(self, channel: str, keys: set[str], since_ms: int,
                   thread_ts: str | None) -> Posted | None: ...


class _Unthreaded:
    """Transports that cannot read back: names stay names, nothing is ever found."""

    threaded = False

    async def resolve(self, channel: str) -> str:
        return channel

    async def update(self, channel: str, ts: str, text: str, blocks: list[dict[str, Any]]) -> None:
        return None

    async def find(self, channel: str, keys: set[str], since_ms: int,
                   thread_ts: str | None) -> Posted | None:
        return None


class LogTransport(_Unthreaded):
    """No Slack configured: the alert goes to the log (and the demo's terminal)."""

    def __init__(self, sink: Callable[[str], None] | None = None) -> None:
        self.sink = sink

    async def post(self, channel: str, text: str, blocks: list[dict[str, Any]],
                   keys: list[str], thread_ts: str | None = None) -> Posted:
        readable = message.unescape(text)
        if self.sink is not None:
            self.sink(f"[{channel}] {readable}")
        log.warning("alert (no Slack configured) to %s:\n%s", channel, readable)
        return Posted(channel, None)


class WebhookTransport(_Unthreaded):
    def __init__(self, url: str) -> None:
        self.client = AsyncWebhookClient(url, timeout=10, retry_handlers=_retry_handlers(),
                                         logger=_SDK_LOG)

    async def post(self, channel: str, text: str, blocks: list[dict[str, Any]],
                   keys: list[str], thread_ts: str | None = None) -> Posted:
        response = await self.client.send(text=text, blocks=blocks)
        if response.status_code != 200:
            raise DeliveryError(f"webhook answered HTTP {response.status_code}")
        return Posted(channel, None)


class BotTransport:
    """The Web API with a bot token: IDs everywhere, threads, and a read-back after a crash."""

    threaded = True

    def __init__(self, token: str, base_url: str | None = None, timeout: int = 10,
                 relist_s: float = 60.0, list_page: int = 1000) -> None:
        kwargs: dict[str, Any] = {"token": token, "timeout": timeout,
                                  "retry_handlers": _retry_handlers(), "logger": _SDK_LOG}
        if base_url:
            kwargs["base_url"] = base_url
        self.client = AsyncWebClient(**kwargs)
        #: channel name -> ID, from conversations.list (Tier 2: at most once per relist_s)
        self._ids: dict[str, str] = {}
        self._listed_at: float | None = None
        self.relist_s = relist_s
        self.list_page = list_page

    async def resolve(self, channel: str) -> str:
        """The ID of a configured channel (``C0123ABCD`` as is, ``#name`` or ``name`` looked up)."""
        if CHANNEL_ID.match(channel):
            return channel
        name = channel.removeprefix("#")
        if name not in self._ids and (self._listed_at is None
                                      or time.monotonic() - self._listed_at >= self.relist_s):
            await self._list_channels()
        if name not in self._ids:
            raise PermanentError("channel_not_found", (
                f"no channel named #{name} is visible to the bot (conversations.list); create it, "
                "invite the bot, or configure the channel ID"))
        return self._ids[name]

    async def _list_channels(self) -> None:
        ids: dict[str, str] = {}
        archived: dict[str, str] = {}
        cursor: str | None = None
        try:
            while True:
                response = await self.client.conversations_list(
                    types="public_channel,private_channel", limit=self.list_page, cursor=cursor)
                channels: list[dict[str, Any]] = response.get("channels", []) or []
                for item in channels:
                    # a name can be reused after archiving: the live channel wins
                    (archived if item.get("is_archived") else ids)[str(item["name"])] = str(
                        item["id"])
                cursor = (response.get("response_metadata") or {}).get("next_cursor") or None
                if not cursor:
                    break
        except SlackApiError as exc:
            error = str(exc.response.get("error", ""))
            if error in PERMANENT_ERRORS or error == "missing_scope":  # channels:read, groups:read
                raise PermanentError(error, (
                    "conversations.list refused to resolve channel names; grant channels:read "
                    "and groups:read or configure channel IDs")) from None
            raise
        self._ids = {**archived, **ids}
        self._listed_at = time.monotonic()

    async def post(self, channel: str, text: str, blocks: list[dict[str, Any]],
                   keys: list[str], thread_ts: str | None = None) -> Posted:
        try:
            response = await self.client.chat_postMessage(
                channel=channel, text=text, blocks=blocks, thread_ts=thread_ts,
                unfurl_links=False,
                metadata={"event_type": METADATA_EVENT, "event_payload": {"keys": ",".join(keys)}},
            )
        except SlackApiError as exc:
            error = str(exc.response.get("error", ""))
            if error in PERMANENT_ERRORS:
                if error == "channel_not_found":  # deleted since it was listed: look again
                    self._ids = {k: v for k, v in self._ids.items() if v != channel}
                raise PermanentError(error, f"chat.postMessage to {channel} refused") from None
            raise
        return Posted(str(response["channel"]), str(response["ts"]))

    async def update(self, channel: str, ts: str, text: str, blocks: list[dict[str, Any]]) -> None:
        await self.client.chat_update(channel=channel, ts=ts, text=text, blocks=blocks)

    async def find(self, channel: str, keys: set[str], since_ms: int,
                   thread_ts: str | None) -> Posted | None:
        """A message of ours carrying any of ``keys``: in the thread (conversations.replies,
        as history lists parent messages only) or among the channel's messages since then."""
        cursor: str | None = None
        try:
            while True:
                if thread_ts is not None:
                    response = await self.client.conversations_replies(
                        channel=channel, ts=thread_ts, include_all_metadata=True, limit=200,
                        cursor=cursor)
                else:
                    # Slack's clock, not ours, stamps ts: allow for skew
                    response = await self.client.conversations_history(
                        channel=channel, oldest=f"{since_ms / 1000 - 120:.6f}",
                        include_all_metadata=True, limit=200, cursor=cursor)
                messages: list[dict[str, Any]] = response.get("messages", []) or []
                for item in messages:
                    metadata = item.get("metadata") or {}
                    if metadata.get("event_type") != METADATA_EVENT:
                        continue
                    named = set(str((metadata.get("event_payload") or {}).get("keys", ""))
                                .split(","))
                    if named & keys:
                        return Posted(channel, str(item["ts"]), frozenset(named & keys))
                cursor = (response.get("response_metadata") or {}).get("next_cursor") or None
                if not cursor:
                    return None
        except SlackApiError as exc:
            error = str(exc.response.get("error", ""))
            if error == "thread_not_found":  # the parent was deleted: nothing was posted there
                return None
            if error in PERMANENT_ERRORS:
                raise PermanentError(error, (
                    f"cannot read {channel} to check whether it was posted before a crash "
                    "(the bot must be a member of the channel)")) from None
            raise


class _Episode:
    """A failure that recurs while it lasts (a BUSY Redis or a Slack outage fails every retry
    the same way): one warning when it starts or its reason changes, debug lines for the
    repeats (the metrics count them all)."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.failures = 0

    def failed(self, reason: str, message: str, *args: object) -> None:
        self.failures += 1
        log.log(logging.DEBUG if reason == self.reason else logging.WARNING, message, *args)
        self.reason = reason

    def healed(self) -> int | None:
        """The attempts the episode that just ended took (None: none was going on)."""
        if self.reason is None:
            return None
        failures, self.reason, self.failures = self.failures, None, 0
        return failures


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
    def parked(self, reason: str) -> None: ...
    def outbox(self, pending: int, parked: int) -> None: ...
    def unresolved_channels(self, count: int) -> None: ...


class NullHooks:
    def sent(self, kind: str, latency_s: float) -> None: ...
    def failed(self, reason: str) -> None: ...
    def suppressed(self) -> None: ...
    def parked(self, reason: str) -> None: ...
    def outbox(self, pending: int, parked: int) -> None: ...
    def unresolved_channels(self, count: int) -> None: ...


class Deliverer:
    """Sends what the outbox holds. One per worker; in several workers only the holder of the
    delivery lease posts (receipts dedupe what a crashed holder recorded, the channel's
    history what it posted but did not record)."""

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
        self._channels_checked = False
        #: the channel check's failure to reach Slack, said once while it lasts
        self._check_failing = _Episode()
        self.wakeup = asyncio.Event()

    async def run(self, stopping: Callable[[], bool] | None = None) -> None:
        try:
            await self._run(stopping)
        finally:  # hand delivery to another worker now, not when the lease runs out
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await self.store.release_delivery_lease()

    async def _run(self, stopping: Callable[[], bool] | None) -> None:
        backoff = 0.2
        failing = _Episode()
        while not (stopping and stopping()):
            if cancellation.requested():  # cancelled, and something on the way swallowed it
                raise asyncio.CancelledError
            try:
                if not self._channels_checked:
                    await self.check_channels()
                delay = await self.deliver_due() if await self.store.hold_delivery_lease() \
                    else self.pace_s
                backoff = 0.2
                if (failures := failing.healed()) is not None:
                    log.info("alert delivery works again, after %d failed attempts", failures)
            except Exception as exc:  # Slack or Redis trouble: keep the entry, try again later
                if cancellation.requested():  # a cancel that redis-py turned into an error
                    raise asyncio.CancelledError from exc
                self.hooks.failed(type(exc).__name__)
                reason = _safe(exc)
                if is_transient(exc):
                    # Redis restarting, loading or busy: nothing failed that will not heal
                    failing.failed(reason, "alert delivery waits for Redis (%s); retrying in "
                                   "%.1fs", failure_name(exc), backoff)
                else:
                    failing.failed(reason, "alert delivery failed, will retry in %.1fs: %s",
                                   backoff, reason)
                delay = backoff
                backoff = min(backoff * 2, self.max_backoff_s)
            self.wakeup.clear()
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancel that
            # lands as the wakeup fires (CPython gh-86296)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self.wakeup.wait()

    async def check_channels(self) -> list[str]:
        """At start-up: resolve every configured channel once and say which cannot be, so that
        a wrong name shows in the log and the metrics before its first alert is parked."""
        channels = sorted({self.config.default_channel, *(r.channel for r in self.config.routes)})
        unresolved = []
        for channel in channels:
            try:
                channel_id = await self.transport.resolve(channel)
            except PermanentError as exc:
                unresolved.append(channel)
                log.error("Slack channel %s cannot be resolved, its alerts will be parked "
                          "(eventpulse alerts outbox): %s", channel, exc.reason)
                continue
            except Exception as exc:  # Slack unreachable: check again on the next round
                if cancellation.requested():
                    raise
                reason = _safe(exc)
                self._check_failing.failed(reason, "could not check Slack channel %s yet: %s",
                                           channel, reason)
                return unresolved
            if channel_id != channel:
                log.info("Slack channel %s is %s", channel, channel_id)
        self.hooks.unresolved_channels(len(unresolved))
        self._channels_checked = True
        return unresolved

    async def deliver_due(self) -> float:
        """Deliver every batch that is due; return how long to wait before looking again."""
        while True:
            entries = await self.store.outbox()
            parked_entries = await self.store.parked()
            parked = {p.entry.transition.fingerprint: p.entry.key for p in parked_entries}
            self.hooks.outbox(len(entries), len(parked_entries))
            if not entries:
                return 0.5
            choice = next_batch(entries, int(time.time() * 1000), parked)
            if isinstance(choice, float):
                return choice
            batch, behind = choice
            if not await self.store.hold_delivery_lease():  # renewed before every batch
                return self.pace_s
            if behind is not None:
                await self._park(batch, f"behind_parked: {behind} of the same alert is parked; "
                                        "retry that one first")
                continue
            await self._deliver(batch)

    async def _deliver(self, batch: list[OutboxEntry]) -> None:
        head = batch[0]
        keys = [e.key for e in batch]
        already = await self.store.sent_keys(keys)
        if already:
            done = [e for e in batch if e.key in already]
            receipt = already[done[0].key]
            await self.store.mark_sent(done, receipt["channel"], receipt["ts"], None)
            return
        to_send = [e for e in batch if e.transition.silenced_until is None]
        if not to_send:  # evaluated while silenced: recorded, not sent
            for _ in batch:
                self.hooks.suppressed()
            await self.store.mark_sent(batch, head.channel, None, None)
            return
        rule = self.rules.get(head.rule)
        if rule is None:
            log.warning("dropping outbox entries of unknown rule %s", head.rule)
            await self.store.mark_sent(batch, head.channel, None, None)
            return
        original = await self._thread_of(head)
        try:
            posted = await self._find_earlier_post(keys)
            if posted is not None:  # posted before a crash: record it, do not post again
                batch = [e for e in batch if e.key in posted.keys]
                to_send = [e for e in to_send if e.key in posted.keys]
            else:
                channel = (original["channel"] if original
                           else await self.transport.resolve(head.channel))
                thread_ts = original["ts"] if original else None
                text, blocks = self._render(rule, to_send)
                await self._pace(channel)
                await self.store.note_attempt(keys, channel, thread_ts)
                posted = await self.transport.post(channel, text, blocks, keys, thread_ts)
        except PermanentError as exc:
            await self._park(batch, exc.reason)
            return
        # counted once Slack has it, before the outbox forgets it (whoever watches the outbox
        # drain sees the counts too)
        now = time.time()
        for entry in to_send:
            self.hooks.sent(entry.transition.kind.value, max(0.0, now - entry.decided_ms / 1000))
        text, blocks = self._render(rule, to_send or batch)
        record = None
        if head.transition.kind == Kind.FIRING and posted.ts is not None:
            record = {"channel": posted.channel, "ts": posted.ts}
            await self.store.save_thread(_message_key(posted.channel, posted.ts),
                                         {"text": text, "blocks": blocks})
        if original is not None and head.transition.kind == Kind.RESOLVED:
            await self._mark_original_resolved(original, text)
        await self.store.mark_sent(batch, posted.channel, posted.ts, record)

    async def _thread_of(self, head: OutboxEntry) -> dict[str, Any] | None:
        """The firing message of this episode, for a resolve or reminder to reply under."""
        if head.transition.kind == Kind.FIRING or not self.transport.threaded:
            return None
        original = await self.store.thread_of(head.transition.fingerprint)
        if original is None:
            return None
        since = original.get("active_since")
        if since is not None and since != head.transition.active_since:
            return None  # another episode's message (this one's firing was never sent)
        return original

    async def _find_earlier_post(self, keys: list[str]) -> Posted | None:
        """After a crash between posting and recording: the message Slack already has for any
        of these keys, looked up where each attempt went (channel history or thread replies)."""
        attempts = await self.store.attempts(keys)
        tried: set[tuple[str, str | None]] = set()
        for attempt in sorted(attempts.values(), key=lambda a: a["at"]):
            where = (attempt["channel"], attempt.get("thread_ts"))
            if where in tried:
                continue
            tried.add(where)
            # attempts written before channel IDs were recorded may hold a name
            channel = await self.transport.resolve(attempt["channel"])
            found = await self.transport.find(channel, set(keys), attempt["at"],
                                              attempt.get("thread_ts"))
            if found is not None:
                return found
        return None

    @staticmethod
    def _render(rule: Rule, entries: list[OutboxEntry]) -> tuple[str, list[dict[str, Any]]]:
        transitions = [e.transition for e in entries]
        return message.plain_text(rule, transitions), message.blocks(rule, transitions)

    async def _park(self, batch: list[OutboxEntry], reason: str) -> None:
        log.error("alert notification parked, Slack will not take it as it is: %s "
                  "(%d entr%s of %s; see and retry with `eventpulse alerts outbox`)", reason,
                  len(batch), "y" if len(batch) == 1 else "ies", batch[0].rule)
        for _ in batch:
            self.hooks.parked(reason.split(":", 1)[0])
        await self.store.park(batch, reason)

    async def _mark_original_resolved(self, original: dict[str, Any], resolve_text: str) -> None:
        """Edit the firing message so that whoever scrolls past it sees it is over (cosmetic:
        a refusal is logged, never retried at the expense of later alerts)."""
        key = _message_key(original["channel"], original["ts"])
        content = await self.store.thread_of(key)
        if content is None:
            return
        note = f":white_check_mark: Resolved - {resolve_text.splitlines()[0]}"
        content["blocks"].append({"type": "context", "elements": [{"type": "mrkdwn", "text": note}]})
        content["text"] += "\n" + note
        await self._pace(original["channel"])
        try:
            await self.transport.update(original["channel"], original["ts"], content["text"],
                                        content["blocks"])
        except SlackApiError as exc:
            log.warning("could not mark the firing message resolved: %s", _safe(exc))
            return
        await self.store.save_thread(key, content)

    async def _pace(self, channel: str) -> None:
        """Slack allows about one message per second per channel."""
        last = self._last_post.get(channel)
        now = time.monotonic()
        if last is not None and now - last < self.pace_s:
            await asyncio.sleep(self.pace_s - (now - last))
        self._last_post[channel] = time.monotonic()


def next_batch(entries: list[OutboxEntry], now_ms: int, parked: Mapping[str, str]
               ) -> tuple[list[OutboxEntry], str | None] | float:
    """What to send next, or how many seconds until something is due.

    Per alert (fingerprint) the outbox order is the order of its transitions, and only an
    alert's oldest entry may go: so Slack shows each alert's transitions in order, each firing
    episode gets its own message (and thread), and a later episode never overtakes an earlier
    one. Different alerts are independent: one waiting out its ``group_wait`` does not hold the
    others. A firing takes along the other alerts of its group whose oldest entry is a firing
    (Alertmanager's grouping), never a second episode of an alert. Returns ``(batch, key)`` with
    ``key`` set when the batch's alert has a parked entry: it must be parked behind it.
    """
    heads: list[OutboxEntry] = []
    seen: set[str] = set()
    for entry in entries:
        if entry.transition.fingerprint not in seen:
            seen.add(entry.transition.fingerprint)
            heads.append(entry)
    for entry in heads:
        behind = parked.get(entry.transition.fingerprint)
        if behind is not None:
            return [entry], behind
    due = [e for e in heads if e.not_before_ms <= now_ms]
    if not due:
        return min(0.5, min(e.not_before_ms - now_ms for e in heads) / 1000)
    head = due[0]
    if head.transition.kind != Kind.FIRING:  # resolves and reminders go to their own thread
        return [head], None
    return [head] + [e for e in heads if e is not head and e.group == head.group
                     and e.transition.kind == Kind.FIRING and e.channel == head.channel], None


def _message_key(channel: str, ts: str) -> str:
    return f"msg:{channel}:{ts}"


def _safe(exc: Exception) -> str:
    """An error line without secrets: Slack errors are reduced to their API error code."""
    if isinstance(exc, SlackApiError):
        return f"Slack API error {exc.response.get('error', '?')}"
    if isinstance(exc, PermanentError):
        return exc.reason
    if isinstance(exc, ResponseError):  # Redis' own reply names the state (BUSY...), no secret
        return f"{type(exc).__name__}: {server_reply(exc).splitlines()[0][:120]}"
    return type(exc).__name__
