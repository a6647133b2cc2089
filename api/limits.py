"""Refuse request bodies above a size limit before anything parses them (413 problem+json).

A declared Content-Length above the limit is refused at once; a body without one (chunked) is
counted as it streams in and refused as soon as it crosses the limit. Below the limit the body
is handed to the app unchanged.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import metrics
from federation.errors import ConnectBusy, RateLimited
from federation.store import repos

log = logging.getLogger(__name__)
INCOMING = "/api/v1/federation/incoming/"
ENDPOINTS = ("connect", "command", "event")

PROBLEM = "application/problem+json"
# After refusing, read and drop at most this much more so the client can read the answer
# instead of failing on a write to a closed connection; past it the connection is dropped.
DRAIN_LIMIT = 8 * 1024 * 1024


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = None
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await self._refuse(scope, send, 400, "content_length_invalid", 0)
                    return
        if declared is not None and declared > self.max_bytes:
            await self._drain(receive, declared)
            await self._refuse(scope, send, 413, "body_too_large", declared)
            return
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._drain(receive, size)
                await self._refuse(scope, send, 413, "body_too_large", size)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            if messages:
                return messages.pop(0)
            return await receive()

        await self.app(scope, replay, send)

    async def _drain(self, receive: Receive, already: int) -> None:
        if already > DRAIN_LIMIT:
            return
        seen = 0
        while seen <= DRAIN_LIMIT:
            message = await receive()
            if message["type"] != "http.request":
                return
            seen += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    async def _refuse(self, scope: Scope, send: Send, status: int, code: str, size: int) -> None:
        path = str(scope.get("path", ""))
        if path.startswith(INCOMING):
            # Refusals of unparsed bodies count against the sender's address like any other:
            # past the burst they are answered 429 and counted, not audited.
            state = getattr(scope.get("app"), "state", None)
            limiter = getattr(state, "refusal_limiter", None)
            client = scope.get("client")
            if limiter is not None and not limiter.take(client[0] if client else "unknown"):
                metrics.REFUSALS_RATE_LIMITED.inc()
                status, code = 429, "rate_limited"
            else:
                await self._audit(scope, path, code, size)
        if status == 429:
            title = "Too many refused messages from this address"
            detail = "too many refused messages from this address; slow down"
        elif status == 413:
            title = "Request body too large"
            detail = f"the body is larger than the {self.max_bytes} bytes this API accepts"
        else:
            title = "Invalid Content-Length"
            detail = "the Content-Length header is not a number"
        body: dict[str, Any] = {
            "type": f"urn:fedagent:problem:{code}",
            "title": title,
            "status": status,
            "detail": detail,
            "code": code,
            "instance": scope.get("path", ""),
            "limit": self.max_bytes,
        }
        payload = json.dumps(body).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", PROBLEM.encode()),
                    (b"content-length", str(len(payload)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})

    async def _audit(self, scope: Scope, path: str, code: str, size: int) -> None:
        """A refused peer message is audited like any other, sender unknown (never parsed)."""
        pool = getattr(getattr(scope.get("app"), "state", None), "pool", None)
        if pool is None:
            return
        client = scope.get("client")
        endpoint = path.removeprefix(INCOMING)
        try:
            await repos.audit(
                pool,
                actor="peer:unknown",
                # The path is the sender's: only our endpoints' names are kept as they are.
                action=f"incoming.{endpoint if endpoint in ENDPOINTS else 'other'}",
                outcome="refused",
                code=code,
                reason=f"body of {size} bytes or more; the limit is {self.max_bytes}",
                remoteAddr=client[0] if client else None,
            )
        except Exception as exc:  # noqa: BLE001 - the refusal stands without its audit entry
            log.warning("could not audit a refused body: %r", exc)


def source_key(address: str) -> str:
    """Who a limit counts a request against: its IPv4 address, or the /64 of its IPv6 address
    (one subscriber gets a whole /64: counting single addresses would give it 2^64 budgets)."""
    try:
        parsed = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        return str(ipaddress.IPv6Network((parsed, 64), strict=False))
    return str(parsed)


class RefusalLimiter:
    """A token bucket per source (`source_key`) for refused peer messages.

    Each refusal takes a token; past the burst a refusal is answered 429 `rate_limited` and
    only counted (a metric), so unauthenticated senders cannot fill the audit log. Sources
    whose bucket is full again are forgotten, so the table stays as small as the abuse."""

    def __init__(self, burst: int, rate: float) -> None:
        self.burst = float(burst)
        self.rate = rate
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, address: str) -> bool:
        address = source_key(address)
        now = time.monotonic()
        tokens, at = self._buckets.get(address, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if len(self._buckets) > 10_000:
            self._forget_full(now)
        if tokens < 1.0:
            self._buckets[address] = (tokens, now)
            return False
        self._buckets[address] = (tokens - 1.0, now)
        return True

    def _forget_full(self, now: float) -> None:
        for address, (tokens, at) in list(self._buckets.items()):
            if tokens + (now - at) * self.rate >= self.burst:
                del self._buckets[address]


class StrangerFetches:
    """Card fetches that strangers' connection requests cause, bounded before any starts.

    At most `total` at once, `per_source` for one sender (`source_key`) and `per_host` naming
    one host; past a bound the request is refused at once (429 `rate_limited` for a sender or
    a host, 503 `connect_busy` for all), so slow or silent URLs cannot queue up requests."""

    def __init__(self, total: int, per_source: int, per_host: int) -> None:
        self.total = total
        self.per_source = per_source
        self.per_host = per_host
        self._sources: Counter[str] = Counter()
        self._hosts: Counter[str] = Counter()

    @contextlib.contextmanager
    def slot(self, source: str, host: str) -> Iterator[None]:
        if self._sources[source] >= self.per_source:
            raise RateLimited("this address already has connection requests being checked")
        if self._hosts[host] >= self.per_host:
            raise RateLimited("connection requests naming this host are already being checked")
        if sum(self._sources.values()) >= self.total:
            raise ConnectBusy("too many connection requests are being checked; try again later")
        self._sources[source] += 1
        self._hosts[host] += 1
        try:
            yield
        finally:
            self._sources[source] -= 1
            self._hosts[host] -= 1
            # Counter keeps zeros: drop them so the tables stay as small as the traffic.
            self._sources += Counter()
            self._hosts += Counter()
