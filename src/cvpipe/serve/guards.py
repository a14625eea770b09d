"""Connection- and request-level limits: idle, slow and hostile clients cannot lock anyone out.

uvicorn alone gives none of this: its ``limit_concurrency`` counts *connections*, so a few
hundred sockets that never send a byte make every request (``/healthz`` too) a 503; a fresh
connection has no timeout at all until its first response; and a request head trickling in
one line at a time is waited for forever. Here:

* :class:`GuardedH11Protocol`, uvicorn's h11 protocol with one timer per connection while it
  waits for a request head (from the connection, and again after each response):

  - **idle timeout** (``idle_timeout_s``): not a byte of a request yet -> closed silently;
  - **header timeout** (``header_timeout_s``): the head started but is not complete -> ``408``
    and closed (a slowloris client sending one header line every few seconds);
  - **connection cap** (``max_connections``, a descriptor guard only): above it the oldest
    connection that is waiting for a head is closed to make room, never one with a request
    in progress.

  Chosen over a TCP front of our own (an asyncio server proxying to uvicorn): the front would
  have to parse HTTP anyway to know where a request head ends, adds a copy and a hop per
  request, and a second place for framing bugs. The subclass reuses uvicorn's parser and event
  loop and only adds a timer; it overrides four small hooks of ``H11Protocol`` (checked by the
  tests against the pinned uvicorn). ``http`` is forced to it, so installing httptools later
  cannot silently drop the guards.
* :class:`ActiveRequestLimit`, ASGI middleware: at most ``max_active_requests`` requests *in
  progress* (body upload, queue, inference, response); one more gets a fast ``503`` with
  ``Retry-After``. Idle connections hold no slot. ``/healthz`` is exempt (liveness must answer
  under load).
* :class:`FramingGuard`, ASGI middleware: a request with both ``Transfer-Encoding`` and
  ``Content-Length`` is ambiguous (h11 picks chunked; a proxy in front may pick the length:
  request smuggling) -> ``400`` and the connection is closed.

The slow *body* is :class:`cvpipe.serve.app.LimitsMiddleware`'s (``serve.request_timeout_s``).
"""

from __future__ import annotations

import asyncio
import functools
import json
from dataclasses import dataclass
from typing import Any, Optional

from uvicorn.protocols.http.h11_impl import H11Protocol

from cvpipe.core.config import ServeParams


@dataclass(frozen=True)
class ServeLimits:
    idle_timeout_s: float = 5.0  # no byte of a request within this -> closed (also uvicorn's keep-alive)
    header_timeout_s: float = 10.0  # the request head must be complete within this -> else 408, closed
    max_active_requests: int = 64  # requests in progress at once; more get 503 (healthz exempt)
    max_connections: int = 2048  # open sockets; above it the oldest idle one is closed
    exempt_paths: tuple[str, ...] = ("/healthz",)

    @classmethod
    def from_params(cls, s: ServeParams) -> "ServeLimits":
        """The limits ``serve.*`` sets (params.yaml or ``-S``)."""
        return cls(idle_timeout_s=s.idle_timeout_s, header_timeout_s=s.header_timeout_s,
                   max_active_requests=s.max_active_requests, max_connections=s.max_connections)


def uvicorn_options(limits: Optional[ServeLimits] = None) -> dict[str, Any]:
    """The ``uvicorn.Config`` keywords that install the guards (the CLI and ``BackgroundServer`` use them)."""
    limits = limits or ServeLimits()
    return {
        "http": functools.partial(GuardedH11Protocol, limits=limits),
        "timeout_keep_alive": max(1, int(limits.idle_timeout_s)),
        "limit_concurrency": None,  # it counts connections: ActiveRequestLimit counts requests instead
    }


_TIMEOUT_408 = json.dumps({"error": "request_timeout", "detail": "the request head was not sent in time"}).encode()


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with idle and header timeouts and a connection cap (see the module doc)."""

    def __init__(self, *args: Any, limits: ServeLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self._head_timer: Optional[asyncio.TimerHandle] = None
        self._head_since = 0.0  # loop time the wait for the next request head began
        self._head_bytes = 0  # bytes received since then

    # ------------------------------------------------------------------ uvicorn hooks
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_head()
        if len(self.connections) > self.limits.max_connections:
            self._shed_one()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._head_timer is not None:
            self._head_bytes += len(data)
        super().data_received(data)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a complete request head: it is the app's now, under its own deadline
            self._stop_head_timer()

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():
            self._await_head()  # before super(): a pipelined request it parses stops the timer again
        super().on_response_complete()

    # ------------------------------------------------------------------ the head timer
    def _await_head(self) -> None:
        self._stop_head_timer()
        self._head_since = self.loop.time()
        self._head_bytes = 0
        self._head_timer = self.loop.call_later(self.limits.idle_timeout_s, self._on_head_timer)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _on_head_timer(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._head_bytes == 0:
            self.transport.close()  # idle: nothing to answer
            return
        left = self._head_since + self.limits.header_timeout_s - self.loop.time()
        if left > 0:
            self._head_timer = self.loop.call_later(left, self._on_head_timer)
            return
        # h11 has no request to answer, so the 408 is written as bytes; the connection ends with it
        self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_TIMEOUT_408), _TIMEOUT_408))
        self.transport.close()

    def _shed_one(self) -> None:
        """Over the connection cap: close the longest-waiting connection without a request in progress."""
        waiting = [c for c in self.connections if isinstance(c, GuardedH11Protocol) and c._head_timer is not None]
        victim = min(waiting, key=lambda c: c._head_since) if waiting else self
        victim._stop_head_timer()
        victim.transport.close()


# ---------------------------------------------------------------------- ASGI middleware


async def _send_json(send, status: int, body: dict[str, str], headers: list[tuple[bytes, bytes]]) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": payload})


class ActiveRequestLimit:
    """At most *max_active* HTTP requests in progress; the next gets 503 at once (exempt paths never count)."""

    def __init__(self, app, max_active: int, exempt: tuple[str, ...] = ("/healthz",)):
        self.app, self.max_active, self.exempt = app, max_active, frozenset(exempt)
        self.active = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") in self.exempt:
            return await self.app(scope, receive, send)
        if self.active >= self.max_active:
            return await _send_json(send, 503, {
                "error": "overloaded",
                "detail": f"{self.active} requests are in progress (the limit is {self.max_active}); retry shortly",
            }, [(b"retry-after", b"1")])
        self.active += 1  # one event loop: no lock needed between the check and the increment
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1


class FramingGuard:
    """400 (and close) for a request framed two ways: ``Transfer-Encoding`` together with ``Content-Length``."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            names = {name.lower() for name, _ in scope.get("headers") or ()}
            if b"transfer-encoding" in names and b"content-length" in names:
                return await _send_json(send, 400, {
                    "error": "bad_request",
                    "detail": "ambiguous framing: both Transfer-Encoding and Content-Length were sent",
                }, [(b"connection", b"close")])
        return await self.app(scope, receive, send)
