"""A local HTTP server that answers like Slack's Web API, for the real slack-sdk client to talk to.

It implements what eventpulse calls (``chat.postMessage``, ``chat.update``,
``conversations.history`` with message metadata) and can be told to fail: answer 429 with a
``Retry-After`` header, answer 500, or hang past the client's timeout, for the next N calls.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from aiohttp import web


@dataclass
class Posted:
    method: str
    channel: str
    ts: str
    text: str
    blocks: list[dict[str, Any]]
    thread_ts: str | None
    metadata: dict[str, Any] | None
    received_at: float = field(default_factory=time.time)


class FakeSlack:
    def __init__(self) -> None:
        self.calls: list[Posted] = []
        self.messages: dict[tuple[str, str], Posted] = {}
        self.failures: list[tuple[int, int]] = []  # (status, retry_after)
        self.hang_s = 0.0
        #: answer this late, after the message is recorded (a client that dies meanwhile
        #: posted it without learning so)
        self.delay_response_s = 0.0
        self.tokens_seen: set[str] = set()
        self._ts = itertools.count(1)
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self.port = 0
        self._thread: threading.Thread | None = None

    # -- control ---------------------------------------------------------------------------
    def fail_next(self, count: int, status: int = 500, retry_after: int = 1) -> None:
        with self._lock:
            self.failures += [(status, retry_after)] * count

    def posts(self) -> list[Posted]:
        with self._lock:
            return [c for c in self.calls if c.method == "chat.postMessage"]

    def updates(self) -> list[Posted]:
        with self._lock:
            return [c for c in self.calls if c.method == "chat.update"]

    def reset(self) -> None:
        with self._lock:
            self.calls.clear()
            self.messages.clear()
            self.failures.clear()
            self.hang_s = 0.0
            self.delay_response_s = 0.0
        #: answer this late, after the message is recorded (a client that dies meanwhile
        #: posted it without learning so)
        self.delay_response_s = 0.0

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
        with self._lock:
            failure = self.failures.pop(0) if self.failures else None
        if failure is not None:
            status, retry_after = failure
            headers = {"Retry-After": str(retry_after)} if status == 429 else {}
            body = {"ok": False, "error": "ratelimited" if status == 429 else "internal_error"}
            return web.json_response(body, status=status, headers=headers)
        if request.method == "GET":
            args = dict(request.query)
        elif request.content_type == "application/json":
            args = await request.json()
        else:
            args = {k: v[0] for k, v in parse_qs(await request.text()).items()}
        for key in ("blocks", "metadata"):
            if isinstance(args.get(key), str):
                args[key] = json.loads(args[key])
        if method == "chat.postMessage":
            response = self._post(args)
            if self.delay_response_s:
                await asyncio.sleep(self.delay_response_s)
            return response
        if method == "chat.update":
            return self._update(args)
        if method == "conversations.history":
            return self._history(args)
        if method == "webhook":  # an incoming webhook: no channel, no ts, plain "ok"
            with self._lock:
                self.calls.append(Posted("webhook", "", "", args.get("text", ""),
                                         args.get("blocks") or [], None, None))
            return web.Response(text="ok")
        return web.json_response({"ok": False, "error": "unknown_method"})

    def _post(self, args: dict[str, Any]) -> web.Response:
        with self._lock:
            ts = f"{int(time.time())}.{next(self._ts):06d}"
            posted = Posted("chat.postMessage", args["channel"], ts, args.get("text", ""),
                            args.get("blocks") or [], args.get("thread_ts"), args.get("metadata"))
            self.calls.append(posted)
            self.messages[(args["channel"], ts)] = posted
        return web.json_response({"ok": True, "channel": args["channel"], "ts": ts,
                                  "message": {"text": posted.text}})

    def _update(self, args: dict[str, Any]) -> web.Response:
        with self._lock:
            key = (args["channel"], args["ts"])
            if key not in self.messages:
                return web.json_response({"ok": False, "error": "message_not_found"})
            updated = Posted("chat.update", args["channel"], args["ts"], args.get("text", ""),
                             args.get("blocks") or [], None, None)
            self.calls.append(updated)
            self.messages[key].text = updated.text
        return web.json_response({"ok": True, "channel": args["channel"], "ts": args["ts"]})

    def _history(self, args: dict[str, Any]) -> web.Response:
        oldest = float(args.get("oldest", 0))
        with self._lock:
            found = [
                {"ts": p.ts, "text": p.text, "metadata": p.metadata}
                for (channel, ts), p in self.messages.items()
                if channel == args["channel"] and float(ts) >= oldest
            ]
        return web.json_response({"ok": True, "messages": found[::-1], "has_more": False})

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
