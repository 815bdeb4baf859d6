"""A local HTTP server that answers like Slack's Web API, for the real slack-sdk client to talk to.

Written from Slack's method documentation (docs.slack.dev/reference/methods/...), not from what
eventpulse sends, on the points a delivery depends on:

- channels have IDs (``C...``); ``chat.postMessage`` takes an ID or a name and answers with the
  ID; ``chat.update``, ``conversations.history`` and ``conversations.replies`` take the ID only
  (a name is ``channel_not_found``);
- ``chat.postMessage`` refuses with the documented errors: ``channel_not_found``,
  ``is_archived``, ``not_in_channel`` (the bot is not a member and has no ``chat:write.public``),
  ``no_text``, ``invalid_blocks`` (Block Kit limits: 50 blocks, header text 150, section text
  3000, 10 fields of 2000), ``msg_too_long`` (text over 40,000), ``invalid_metadata_format``;
- ``conversations.history`` returns parent messages only (a thread's replies are not in it),
  newest first, ``oldest``/``latest`` exclusive unless ``inclusive``, cursor pagination
  (``has_more``, ``response_metadata.next_cursor``); ``not_in_channel`` if the bot is no member;
- ``conversations.replies`` returns a thread (parent first, then replies, oldest first) for the
  ts of its parent or of any reply, ``thread_not_found`` for an unknown ts, paginated;
- message ``metadata`` is in history and replies answers only with ``include_all_metadata``;
- ``conversations.list`` lists public channels (private ones the bot is in with
  ``types=private_channel``), ``exclude_archived``, ``limit`` up to 1000, cursor pagination.

It can also be told to fail: answer 429 with ``Retry-After``, 5xx, a documented error for the
next N calls, hang, or answer ``chat.postMessage`` late after recording the message.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from aiohttp import web

#: Block Kit limits from Slack's block reference (header, section, context) and message docs.
MAX_BLOCKS = 50
MAX_HEADER_TEXT = 150
MAX_SECTION_TEXT = 3000
MAX_FIELDS = 10
MAX_FIELD_TEXT = 2000
MAX_CONTEXT_ELEMENTS = 10
MAX_TEXT = 40_000
BLOCK_TYPES = {"header", "section", "context", "divider", "actions", "image", "rich_text",
               "input", "file", "video", "markdown"}


@dataclass
class Posted:
    method: str
    #: the channel's ID, whatever the caller named it by
    channel: str
    ts: str
    text: str
    blocks: list[dict[str, Any]]
    thread_ts: str | None
    metadata: dict[str, Any] | None
    received_at: float = field(default_factory=time.time)
    #: what the caller passed as ``channel``
    channel_arg: str = ""

    def outbox_keys(self) -> list[str]:
        """The outbox keys eventpulse put in the message metadata (a test's view)."""
        payload = (self.metadata or {}).get("event_payload") or {}
        return [k for k in str(payload.get("keys", "")).split(",") if k]


@dataclass
class Channel:
    id: str
    name: str
    is_private: bool = False
    is_archived: bool = False
    #: whether the bot is a member (a bot without chat:write.public must be one to post)
    is_member: bool = True


@dataclass
class Failure:
    status: int
    error: str
    retry_after: int = 1
    methods: frozenset[str] | None = None
    #: only calls whose ``text`` argument contains this
    matching: str | None = None

    def applies(self, method: str, args: dict[str, Any]) -> bool:
        return ((self.methods is None or method in self.methods)
                and (self.matching is None or self.matching in str(args.get("text", ""))))


class FakeSlack:
    DEFAULT_CHANNELS = ("oncall", "alerts", "x", "general")

    def __init__(self) -> None:
        self.calls: list[Posted] = []
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.messages: dict[tuple[str, str], Posted] = {}
        self.channels: dict[str, Channel] = {}
        self.failures: list[Failure] = []
        self.hang_s = 0.0
        #: answer chat.postMessage this late, after the message is recorded (a client that dies
        #: meanwhile posted it without learning so)
        self.delay_response_s = 0.0
        self.tokens_seen: set[str] = set()
        self._ts = itertools.count(1)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self.port = 0
        self._thread: threading.Thread | None = None
        self._default_channels()

    # -- control ---------------------------------------------------------------------------
    def add_channel(self, name: str, *, private: bool = False, archived: bool = False,
                    member: bool = True) -> str:
        with self._lock:
            channel_id = f"C{next(self._ids):08d}"
            self.channels[channel_id] = Channel(channel_id, name, private, archived, member)
            return channel_id

    def channel_id(self, name: str) -> str:
        with self._lock:
            return next(c.id for c in self.channels.values() if c.name == name.lstrip("#"))

    def fail_next(self, count: int, status: int = 500, retry_after: int = 1,
                  error: str | None = None, methods: set[str] | None = None,
                  matching: str | None = None) -> None:
        """The next ``count`` calls (of ``methods``, default any; with ``matching`` in their
        text) fail: HTTP ``status`` with ``error`` (for 200: a Slack error answer such as
        ``invalid_blocks``)."""
        default = "ratelimited" if status == 429 else "internal_error"
        failure = Failure(status, error or default, retry_after,
                          frozenset(methods) if methods else None, matching)
        with self._lock:
            self.failures += [failure] * count

    def clear_failures(self) -> None:
        with self._lock:
            self.failures.clear()

    def posts(self) -> list[Posted]:
        with self._lock:
            return [c for c in self.calls if c.method == "chat.postMessage"]

    def updates(self) -> list[Posted]:
        with self._lock:
            return [c for c in self.calls if c.method == "chat.update"]

    def called(self, method: str) -> list[dict[str, Any]]:
        with self._lock:
            return [args for name, args in self.requests if name == method]

    def reset(self) -> None:
        with self._lock:
            self.calls.clear()
            self.requests.clear()
            self.messages.clear()
            self.failures.clear()
            self.channels.clear()
            self.hang_s = 0.0
            self.delay_response_s = 0.0
        self._default_channels()

    def _default_channels(self) -> None:
        for name in self.DEFAULT_CHANNELS:
            self.add_channel(name)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/"

    # -- server ----------------------------------------------------------------------------
    async def _handle(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        auth = request.headers.get("Authorization", "")
        self.tokens_seen.add(auth)
        if self.hang_s:
            await asyncio.sleep(self.hang_s)
        if request.method == "GET":
            args: dict[str, Any] = dict(request.query)
        elif request.content_type == "application/json":
            args = await request.json()
        else:
            args = {k: v[0] for k, v in parse_qs(await request.text()).items()}
        with self._lock:
            self.requests.append((method, dict(args)))
            failure = next((f for f in self.failures if f.applies(method, args)), None)
            if failure is not None:
                self.failures.remove(failure)
        if failure is not None:
            headers = {"Retry-After": str(failure.retry_after)} if failure.status == 429 else {}
            return web.json_response({"ok": False, "error": failure.error},
                                     status=failure.status, headers=headers)
        if method == "webhook":  # an incoming webhook: no channel, no ts, plain "ok"
            with self._lock:
                self.calls.append(Posted("webhook", "", "", args.get("text", ""),
                                         _json_arg(args.get("blocks")) or [], None, None))
            return web.Response(text="ok")
        if not auth.startswith("Bearer ") and "token" not in args:
            return _error("not_authed")
        handler = {
            "chat.postMessage": self._post,
            "chat.update": self._update,
            "conversations.history": self._history,
            "conversations.replies": self._replies,
            "conversations.list": self._list,
        }.get(method)
        if handler is None:
            return _error("unknown_method")
        try:
            answer = handler(args)
        except _SlackError as exc:
            return _error(exc.code)
        if method == "chat.postMessage" and self.delay_response_s:
            await asyncio.sleep(self.delay_response_s)
        return web.json_response(answer)

    # -- methods (called with the lock not held) ------------------------------------------
    def _channel(self, value: Any, by_name: bool) -> Channel:
        """``by_name``: the method accepts a channel name as well as an ID."""
        value = str(value or "")
        with self._lock:
            if value in self.channels:
                return self.channels[value]
            if by_name:
                name = value.lstrip("#")
                for channel in self.channels.values():
                    if channel.name == name and not (channel.is_private and not channel.is_member):
                        return channel
        raise _SlackError("channel_not_found")

    def _post(self, args: dict[str, Any]) -> dict[str, Any]:
        channel = self._channel(args.get("channel"), by_name=True)
        if channel.is_archived:
            raise _SlackError("is_archived")
        if not channel.is_member:
            raise _SlackError("not_in_channel")
        text = str(args.get("text") or "")
        blocks = _json_arg(args.get("blocks"))
        if not text and not blocks and not args.get("attachments"):
            raise _SlackError("no_text")
        if len(text) > MAX_TEXT:
            raise _SlackError("msg_too_long")
        if blocks is not None and not _valid_blocks(blocks):
            raise _SlackError("invalid_blocks")
        metadata = _json_arg(args.get("metadata"))
        if metadata is not None and not (
                isinstance(metadata, dict) and isinstance(metadata.get("event_type"), str)
                and isinstance(metadata.get("event_payload"), dict)):
            raise _SlackError("invalid_metadata_format")
        thread_ts = args.get("thread_ts") or None
        with self._lock:
            if thread_ts is not None:
                parent = self.messages.get((channel.id, str(thread_ts)))
                if parent is not None and parent.thread_ts not in (None, parent.ts):
                    thread_ts = parent.thread_ts  # a reply's ts names its parent's thread
            ts = f"{int(time.time())}.{next(self._ts):06d}"
            posted = Posted("chat.postMessage", channel.id, ts, text, blocks or [],
                            str(thread_ts) if thread_ts else None, metadata,
                            channel_arg=str(args.get("channel")))
            self.calls.append(posted)
            self.messages[(channel.id, ts)] = posted
        return {"ok": True, "channel": channel.id, "ts": ts,
                "message": {"type": "message", "text": text, "ts": ts, "bot_id": "B0BOT"}}

    def _update(self, args: dict[str, Any]) -> dict[str, Any]:
        channel = self._channel(args.get("channel"), by_name=False)
        ts = str(args.get("ts") or "")
        blocks = _json_arg(args.get("blocks"))
        if blocks is not None and not _valid_blocks(blocks):
            raise _SlackError("invalid_blocks")
        with self._lock:
            original = self.messages.get((channel.id, ts))
            if original is None:
                raise _SlackError("message_not_found")
            if channel.is_archived:
                raise _SlackError("is_archived")
            updated = Posted("chat.update", channel.id, ts, str(args.get("text") or ""),
                             blocks or [], None, None, channel_arg=str(args.get("channel")))
            self.calls.append(updated)
            original.text = updated.text
            if blocks is not None:
                original.blocks = blocks
        return {"ok": True, "channel": channel.id, "ts": ts, "text": updated.text}

    def _readable(self, args: dict[str, Any]) -> Channel:
        channel = self._channel(args.get("channel"), by_name=False)
        if not channel.is_member:
            raise _SlackError("not_in_channel")
        return channel

    def _history(self, args: dict[str, Any]) -> dict[str, Any]:
        channel = self._readable(args)
        with self._lock:
            parents = [p for (cid, _), p in self.messages.items()
                       if cid == channel.id and p.thread_ts in (None, p.ts)]
            found = [self._as_message(p, args) for p in sorted(
                _in_range(parents, args), key=lambda p: float(p.ts), reverse=True)]
        return _page(found, args, "messages", default_limit=100, max_limit=999)

    def _replies(self, args: dict[str, Any]) -> dict[str, Any]:
        channel = self._readable(args)
        ts = str(args.get("ts") or "")
        with self._lock:
            message = self.messages.get((channel.id, ts))
            if message is None:
                raise _SlackError("thread_not_found")
            root = message.thread_ts or message.ts
            thread = [p for (cid, _), p in self.messages.items()
                      if cid == channel.id and (p.ts == root or p.thread_ts == root)]
            found = [self._as_message(p, args) for p in sorted(
                _in_range(thread, args), key=lambda p: float(p.ts))]
        return _page(found, args, "messages", default_limit=1000, max_limit=1000)

    def _as_message(self, posted: Posted, args: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "message", "ts": posted.ts, "text": posted.text,
                               "bot_id": "B0BOT", "blocks": posted.blocks}
        replies = [p for (cid, _), p in self.messages.items()
                   if cid == posted.channel and p.thread_ts == posted.ts and p.ts != posted.ts]
        if posted.thread_ts is not None:
            out["thread_ts"] = posted.thread_ts
            out["parent_user_id"] = "U0BOT"
        if replies:
            out["thread_ts"] = posted.ts
            out["reply_count"] = len(replies)
            out["latest_reply"] = max(p.ts for p in replies)
        if posted.metadata is not None and _flag(args.get("include_all_metadata")):
            out["metadata"] = posted.metadata
        return out

    def _list(self, args: dict[str, Any]) -> dict[str, Any]:
        types = set(str(args.get("types") or "public_channel").split(","))
        if not types <= {"public_channel", "private_channel", "mpim", "im"}:
            raise _SlackError("invalid_types")
        exclude_archived = _flag(args.get("exclude_archived"))
        with self._lock:
            listed = [
                {"id": c.id, "name": c.name, "is_channel": True, "is_private": c.is_private,
                 "is_archived": c.is_archived, "is_member": c.is_member}
                for c in self.channels.values()
                if (("private_channel" in types and c.is_private and c.is_member)
                    or ("public_channel" in types and not c.is_private))
                and not (exclude_archived and c.is_archived)
            ]
        return _page(listed, args, "channels", default_limit=100, max_limit=1000)

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> FakeSlack:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            app = web.Application()
            app.router.add_route("*", "/api/{method}", self._handle)
            self._runner = web.AppRunner(app)
            loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)


class _SlackError(Exception):
    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


def _error(code: str) -> web.Response:
    return web.json_response({"ok": False, "error": code})  # Slack answers errors with HTTP 200


def _flag(value: Any) -> bool:
    return str(value).lower() in ("1", "true")


def _json_arg(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return {"invalid": value}
    return value


def _in_range(messages: list[Posted], args: dict[str, Any]) -> list[Posted]:
    oldest = float(args.get("oldest") or 0)
    latest = float(args.get("latest") or time.time() + 1)
    if _flag(args.get("inclusive")):
        return [p for p in messages if oldest <= float(p.ts) <= latest]
    return [p for p in messages if oldest < float(p.ts) < latest]


def _page(items: list[dict[str, Any]], args: dict[str, Any], name: str, default_limit: int,
          max_limit: int) -> dict[str, Any]:
    try:
        limit = int(args.get("limit") or default_limit)
    except ValueError:
        raise _SlackError("invalid_limit") from None
    if limit < 1:
        raise _SlackError("invalid_limit")
    limit = min(limit, max_limit)
    start = 0
    if args.get("cursor"):
        try:
            start = int(base64.b64decode(str(args["cursor"])).decode().removeprefix("offset:"))
        except ValueError:
            raise _SlackError("invalid_cursor") from None
    chunk = items[start:start + limit]
    more = start + limit < len(items)
    cursor = base64.b64encode(f"offset:{start + limit}".encode()).decode() if more else ""
    answer: dict[str, Any] = {"ok": True, name: chunk,
                              "response_metadata": {"next_cursor": cursor}}
    if name == "messages":
        answer["has_more"] = more
    return answer


def _valid_blocks(blocks: Any) -> bool:
    if not isinstance(blocks, list) or len(blocks) > MAX_BLOCKS:
        return False
    for block in blocks:
        if not isinstance(block, dict) or block.get("type") not in BLOCK_TYPES:
            return False
        text = block.get("text")
        if block["type"] == "header" and not (
                isinstance(text, dict) and text.get("type") == "plain_text"
                and 0 < len(str(text.get("text", ""))) <= MAX_HEADER_TEXT):
            return False
        if block["type"] == "section":
            fields = block.get("fields") or []
            if text is None and not fields:
                return False
            if text is not None and not _valid_text(text, MAX_SECTION_TEXT):
                return False
            if len(fields) > MAX_FIELDS or not all(_valid_text(f, MAX_FIELD_TEXT) for f in fields):
                return False
        if block["type"] == "context":
            elements = block.get("elements") or []
            if not 0 < len(elements) <= MAX_CONTEXT_ELEMENTS:
                return False
    return True


def _valid_text(obj: Any, limit: int) -> bool:
    return (isinstance(obj, dict) and obj.get("type") in ("plain_text", "mrkdwn")
            and 0 < len(str(obj.get("text", ""))) <= limit)
