"""Instrumenting an inference service with eventpulse.logging: a minimal ASGI middleware.

Every request produces one inference log (model, version, latency, status, request id) on the
``inference`` topic, which eventpulse turns into p95 latency and error-rate features and alerts.
Run it with any ASGI server, e.g. ``uvicorn examples.inference_service:app``; no eventpulse worker
code is imported, only ``eventpulse.logging``.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from eventpulse.logging import KafkaHandler, configure_events, log_event, request_id

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

BROKERS = os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:9092")
inference_log = logging.getLogger("inference")
inference_log.setLevel(logging.INFO)
inference_log.addHandler(KafkaHandler(BROKERS, topic="inference", key_field="model"))
configure_events(BROKERS, topic="events")


class InferenceLogMiddleware:
    """Logs one inference record per HTTP request; never delays or fails the request."""

    def __init__(self, app: ASGIApp, model: str, model_version: str) -> None:
        self.app = app
        self.model = model
        self.model_version = model_version

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode() or uuid.uuid4().hex
        token = request_id.set(rid)
        status = 500
        started = time.perf_counter()

        async def send_and_capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_capture)
        finally:
            inference_log.info("inference", extra={
                "model": self.model, "model_version": self.model_version,
                "latency_ms": round((time.perf_counter() - started) * 1000, 3),
                "status": status, "request_id": rid, "path": scope.get("path")})
            request_id.reset(token)


async def recommend(scope: Scope, receive: Receive, send: Send) -> None:
    """A toy model endpoint: /recommend?user=u1 returns items and logs a behaviour event."""
    query = dict(p.split("=", 1) for p in scope.get("query_string", b"").decode().split("&") if "=" in p)
    user = query.get("user", "anonymous")
    items = ["i3", "i9", "i1"]
    log_event(action="view", user_id=user, item_id=items[0], device="web")
    body = json.dumps({"user": user, "items": items}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


app = InferenceLogMiddleware(recommend, model="ranker", model_version="3.1")
