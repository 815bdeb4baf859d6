"""A TLS and SASL front for the Tansu broker: what the bundled Tansu 0.6.0 cannot do itself.

Measured on this machine (docs/security.md has the details): Tansu 0.6.0's ``broker`` refuses
``--cert`` together with ``--key`` (the two options are declared in one mutually exclusive
argument group), so it cannot serve TLS; with ``--authentication`` it offers SCRAM-SHA-256,
SCRAM-SHA-512 and OAUTHBEARER, but its only storage engine in this build (dynostore) keeps no
SCRAM credentials (``tansu user create`` succeeds and stores nothing) and it has no OAUTHBEARER
validator, so no login can ever succeed. To run eventpulse's real Kafka clients through a real
TLS handshake and real SASL exchanges, this front listens on its own port, speaks TLS (optionally
requiring a client certificate) and performs the SASL server side the way Apache Kafka does
(KIP-43 ``SaslHandshake`` v0-1, KIP-152 ``SaslAuthenticate`` v0-1; SCRAM per RFC 5802 with the
``scramp`` library, PLAIN per RFC 4616, OAUTHBEARER per RFC 7628), then relays every other request
to Tansu. Like Kafka it refuses a wrong password with ``SaslAuthenticate`` error 58
(SASL_AUTHENTICATION_FAILED) and its message, refuses a mechanism it does not enable with error
33 (UNSUPPORTED_SASL_MECHANISM), and closes a connection that sends other requests before
authenticating. Tansu is started with the front's port as its advertised listener, so metadata
sends clients back through the front.

Requests are relayed one at a time per connection, in order (as a Kafka broker processes them);
a produce request with ``acks=0`` (no response) is not supported: eventpulse never sends one.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scramp import ScramException, ScramMechanism

API_VERSIONS, SASL_HANDSHAKE, SASL_AUTHENTICATE = 18, 17, 36
NONE, UNSUPPORTED_SASL_MECHANISM, ILLEGAL_SASL_STATE, SASL_AUTHENTICATION_FAILED = 0, 33, 34, 58


@dataclass
class KafkaFront:
    upstream_port: int
    port: int
    #: user -> password; the same users for PLAIN and both SCRAM mechanisms
    users: dict[str, str] = field(default_factory=dict)
    #: None: no SASL (SSL or PLAINTEXT listener)
    mechanisms: tuple[str, ...] | None = None
    oauth_tokens: set[str] = field(default_factory=set)
    #: or a check of each bearer token (e.g. the shape of an AWS MSK IAM token)
    oauth_validator: Callable[[str], bool] | None = None
    certfile: Path | None = None
    keyfile: Path | None = None
    #: CA of client certificates: set, a client certificate is required (mutual TLS)
    client_ca: Path | None = None
    #: (mechanism, user, ok) per completed exchange, for assertions
    logins: list[tuple[str, str, bool]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._scram = {name: ScramMechanism(name) for name in ("SCRAM-SHA-256", "SCRAM-SHA-512")}
        self._auth_info = {(name, user): mech.make_auth_info(password, iteration_count=4096)
                           for name, mech in self._scram.items()
                           for user, password in self.users.items()}

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> KafkaFront:
        ready = threading.Event()

        def run() -> None:
            loop = self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            context = self._ssl_context()
            self._server = loop.run_until_complete(asyncio.start_server(
                self._serve, "127.0.0.1", self.port, ssl=context))
            ready.set()
            loop.run_forever()
            for task in asyncio.all_tasks(loop):
                task.cancel()
            loop.run_until_complete(asyncio.gather(*asyncio.all_tasks(loop),
                                                   return_exceptions=True))
            self._server.close()
            loop.run_until_complete(self._server.wait_closed())
            loop.close()

        self._thread = threading.Thread(target=run, name="kafka-front", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the Kafka front did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def _ssl_context(self) -> ssl.SSLContext | None:
        if self.certfile is None:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.certfile, self.keyfile)
        if self.client_ca is not None:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(self.client_ca)
        return context

    # -- one client connection -----------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        authenticated = self.mechanisms is None
        session: _Session | None = None
        try:
            while True:
                frame = await _read_frame(reader)
                if frame is None:
                    return
                api_key, version, correlation = struct.unpack(">hhi", frame[4:12])
                if api_key == SASL_HANDSHAKE and not authenticated:
                    mechanism = _string(frame, _body_offset(frame))
                    enabled = list(self.mechanisms or ())
                    ok = mechanism in enabled
                    session = _Session(mechanism, version) if ok else None
                    body = struct.pack(">h", NONE if ok else UNSUPPORTED_SASL_MECHANISM)
                    body += struct.pack(">i", len(enabled)) + b"".join(_pack_string(m)
                                                                       for m in enabled)
                    await _respond(writer, correlation, body)
                    if not ok:
                        return
                    continue
                if api_key == SASL_AUTHENTICATE and not authenticated:
                    if session is None:
                        await _respond(writer, correlation, _auth_body(
                            version, ILLEGAL_SASL_STATE, "SaslHandshake first", b""))
                        return
                    offset = _body_offset(frame)
                    (size,) = struct.unpack(">i", frame[offset:offset + 4])
                    token = frame[offset + 4:offset + 4 + size]
                    error, reply, done = self._step(session, token)
                    message = None if not error else (
                        "Authentication failed during authentication due to invalid credentials "
                        f"with SASL mechanism {session.mechanism}")
                    await _respond(writer, correlation, _auth_body(version, error, message, reply))
                    if error:
                        return
                    authenticated = done
                    continue
                if not authenticated and api_key != API_VERSIONS:
                    return  # Kafka closes a connection that skips authentication
                if upstream is None:
                    upstream = await asyncio.open_connection("127.0.0.1", self.upstream_port)
                upstream[1].write(frame)
                await upstream[1].drain()
                response = await _read_frame(upstream[0])
                if response is None:
                    return
                writer.write(response)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError,
                asyncio.CancelledError):  # cancelled: the front is stopping
            return
        finally:
            for w in (writer, upstream[1] if upstream else None):
                if w is not None:
                    with contextlib.suppress(Exception):
                        w.close()

    def _step(self, session: _Session, token: bytes) -> tuple[int, bytes, bool]:
        """(error code, server bytes, authenticated) for one client message."""
        mechanism = session.mechanism
        if mechanism == "PLAIN":
            _, user, password = token.decode().split("\0")
            ok = self.users.get(user) == password
            self.logins.append((mechanism, user, ok))
            return (NONE if ok else SASL_AUTHENTICATION_FAILED), b"", ok
        if mechanism == "OAUTHBEARER":
            fields = dict(part.split("=", 1) for part in token.decode().split("\x01")[1:]
                          if "=" in part)
            bearer = fields.get("auth", "").removeprefix("Bearer ")
            ok = bearer in self.oauth_tokens or bool(
                self.oauth_validator and self.oauth_validator(bearer))
            self.logins.append((mechanism, "(token)", ok))
            return (NONE if ok else SASL_AUTHENTICATION_FAILED), b"", ok
        if session.scram is None:  # client-first
            scram = self._scram[mechanism].make_server(
                lambda user: self._auth_info[(mechanism, user)])
            attributes = dict(part.split("=", 1) for part in token.decode().split(",")[2:])
            session.user = attributes.get("n", "?")
            try:
                scram.set_client_first(token.decode())
            except (ScramException, KeyError):
                self.logins.append((mechanism, "?", False))
                return SASL_AUTHENTICATION_FAILED, b"", False
            session.scram = scram
            return NONE, scram.get_server_first().encode(), False
        try:  # client-final
            session.scram.set_client_final(token.decode())
        except ScramException:
            self.logins.append((mechanism, session.user, False))
            return SASL_AUTHENTICATION_FAILED, b"", False
        self.logins.append((mechanism, session.user, True))
        return NONE, session.scram.get_server_final().encode(), True


@dataclass
class _Session:
    mechanism: str
    handshake_version: int
    scram: Any = None
    user: str = "?"


async def _read_frame(reader: asyncio.StreamReader) -> bytes | None:
    try:
        head = await reader.readexactly(4)
    except asyncio.IncompleteReadError:
        return None
    (size,) = struct.unpack(">i", head)
    return head + await reader.readexactly(size)


def _body_offset(frame: bytes) -> int:
    """After the size, request header v1 (key, version, correlation id, client id)."""
    (client_id_len,) = struct.unpack(">h", frame[12:14])
    return 14 + max(client_id_len, 0)


def _string(frame: bytes, offset: int) -> str:
    (size,) = struct.unpack(">h", frame[offset:offset + 2])
    return frame[offset + 2:offset + 2 + size].decode()


def _pack_string(text: str) -> bytes:
    data = text.encode()
    return struct.pack(">h", len(data)) + data


def _auth_body(version: int, error: int, message: str | None, data: bytes) -> bytes:
    body = struct.pack(">h", error)
    body += _pack_string(message) if message is not None else struct.pack(">h", -1)
    body += struct.pack(">i", len(data)) + data
    if version >= 1:
        body += struct.pack(">q", 0)  # session lifetime: no re-authentication
    return body


async def _respond(writer: asyncio.StreamWriter, correlation: int, body: bytes) -> None:
    payload = struct.pack(">i", correlation) + body
    writer.write(struct.pack(">i", len(payload)) + payload)
    await writer.drain()
