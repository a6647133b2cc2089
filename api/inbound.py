"""The opening every peer endpoint shares: read the body, verify the envelope, audit a refusal.

`InboundDep` hands a route the message it received (`Inbound`). `Inbound.verified(kind)` opens
one transaction and yields the verified envelope inside it: what the route does there is undone
by a refusal, which is written to the audit log (with only validated scalars) and re-raised as
problem+json. The transaction is the route's to close: what must wait for the commit (starting a
workflow, a long-poll) runs after the `async with` block.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Annotated, Any

import asyncpg
import httpx
from fastapi import Depends, Request

from api import metrics
from api.deps import (
    IdentityDep,
    KeyRefresherDep,
    PoolDep,
    RefusalLimiterDep,
    SettingsDep,
    StrangerFetchesDep,
    StrangerHttpDep,
)
from api.limits import RefusalLimiter, StrangerFetches, source_key
from federation import tracing
from federation.envelope import Envelope, MessageType
from federation.errors import FederationError, MalformedEnvelope, RateLimited
from federation.identity import Identity
from federation.peer import CardKeyRefresher, fetch_card
from federation.settings import Settings
from federation.store import repos
from federation.trust import (
    SAFE_INSTANCE_ID,
    check_card_matches,
    refresh_keys_first,
    verify_connection_request,
    verify_incoming,
)
from operations.peer_connect import StrangerRequest, check_waiting, expire_pending_requests


@dataclass(frozen=True, kw_only=True)
class VerifiedMessage:
    """An envelope whose signature, recipient, timestamp and messageId were checked, inside the
    transaction `conn` that recorded its messageId; `connection` is the sender's (None for a
    stranger's request)."""

    conn: asyncpg.Connection
    envelope: Envelope
    connection: dict[str, Any] | None


@dataclass(frozen=True, kw_only=True)
class Inbound:
    """One message a peer POSTed to `endpoint`, parsed as JSON but not yet trusted."""

    body: Any
    endpoint: str
    address: str  # the client address, for the audit and the refusal limit
    pool: asyncpg.Pool
    identity: Identity
    settings: Settings
    refresher: CardKeyRefresher
    limiter: RefusalLimiter

    @contextlib.asynccontextmanager
    async def refusals(self) -> AsyncIterator[None]:
        """A `FederationError` raised inside is audited as a refusal, then re-raised."""
        try:
            yield
        except FederationError as err:
            await refuse(self, err)
            raise

    @contextlib.asynccontextmanager
    async def verified(
        self, kind: MessageType, *, now: datetime | None = None
    ) -> AsyncIterator[VerifiedMessage]:
        """The message verified as a `kind` from a known sender, in one transaction; a refusal
        raised inside is audited."""
        async with self.refusals(), self.opened(kind, now=now) as message:
            yield message

    @contextlib.asynccontextmanager
    async def opened(
        self,
        kind: MessageType,
        *,
        now: datetime | None = None,
        sender_keys: list[dict[str, Any]] | None = None,
    ) -> AsyncIterator[VerifiedMessage]:
        """`verified` without the audit, for a caller whose own `refusals()` block is wider.

        `sender_keys` only for a stranger's first CONNECT: the keys its own card lists. A known
        sender's keys are refreshed first if it signed with a key we do not have yet (before
        the transaction: that may read its card)."""
        if sender_keys is None:
            await refresh_keys_first(
                self.pool,
                self.body,
                self.refresher,
                instance_id=self.identity.instance_id,
                window_seconds=self.settings.timestamp_window,
            )
        async with self.pool.acquire() as conn, conn.transaction():
            verified = await verify_incoming(
                conn,
                self.body,
                instance_id=self.identity.instance_id,
                window_seconds=self.settings.timestamp_window,
                sender_keys=sender_keys,
                now=now,
                refresh_keys=self.refresher,
            )
            envelope = verified.envelope
            tracing.receive(envelope, verified.connection)
            if envelope.type is not kind:
                raise MalformedEnvelope(f"this endpoint takes {kind.value} messages")
            yield VerifiedMessage(conn=conn, envelope=envelope, connection=verified.connection)


def _scalar(value: Any, limit: int = 256) -> str | None:
    """A field of a refused message worth keeping: a short string, or nothing at all."""
    if isinstance(value, str) and len(value) <= limit:
        return value
    return None


async def refuse(inbound: Inbound, err: FederationError) -> None:
    """Audit a refusal with only validated scalars (each <= 256 chars, <= 2 KiB in all).

    Past the per-address limit the refusal becomes a 429 `rate_limited`, counted, not audited.
    """
    if not inbound.limiter.take(inbound.address):
        metrics.REFUSALS_RATE_LIMITED.inc()
        raise RateLimited("too many refused messages from this address; slow down") from err
    fields = inbound.body if isinstance(inbound.body, dict) else {}
    sender = _scalar(fields.get("senderId"), 64)
    if sender is not None and not SAFE_INSTANCE_ID.fullmatch(sender):
        sender = None
    details = {
        "code": err.code,
        "reason": err.detail[:256],
        "messageId": _scalar(fields.get("messageId"), 128),
        "commandType": _scalar(fields.get("commandType"), 64),
        "source": inbound.address[:64],
    }
    await repos.audit(
        inbound.pool,
        actor=f"peer:{sender}" if sender else "peer:unknown",
        action=f"incoming.{inbound.endpoint}",
        outcome="refused",
        **{k: v for k, v in details.items() if v is not None},
    )


async def _inbound(
    request: Request,
    pool: PoolDep,
    identity: IdentityDep,
    settings: SettingsDep,
    refresher: KeyRefresherDep,
    limiter: RefusalLimiterDep,
) -> Inbound:
    raw = await request.body()
    inbound = Inbound(
        body=None,
        endpoint=request.url.path.rsplit("/", 1)[-1],
        address=request.client.host if request.client else "unknown",
        pool=pool,
        identity=identity,
        settings=settings,
        refresher=refresher,
        limiter=limiter,
    )
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        err = MalformedEnvelope("body is not JSON")
        await refuse(inbound, err)
        raise err from exc
    return replace(inbound, body=body)


InboundDep = Annotated[Inbound, Depends(_inbound)]


@dataclass(frozen=True, kw_only=True)
class StrangerGate:
    """What reading a stranger's card goes through: its own client and the fetch slots."""

    http: httpx.AsyncClient
    fetches: StrangerFetches


def _stranger_gate(http: StrangerHttpDep, fetches: StrangerFetchesDep) -> StrangerGate:
    return StrangerGate(http=http, fetches=fetches)


StrangerGateDep = Annotated[StrangerGate, Depends(_stranger_gate)]


async def stranger_request(inbound: Inbound, gate: StrangerGate) -> StrangerRequest:
    """A stranger's connection.request: its signature is checked with the keys it sent and the
    caps of waiting requests and fetches before anything is fetched; then the card at its own
    URL (read through the strangers' own client) must list the same key and the same URL."""
    settings = inbound.settings
    payload = verify_connection_request(
        inbound.body,
        instance_id=inbound.identity.instance_id,
        window_seconds=settings.timestamp_window,
    )
    source = source_key(inbound.address)
    host = (payload.url.host or "").lower().rstrip(".")
    await expire_pending_requests(inbound.pool, settings)
    await check_waiting(inbound.pool, settings, source, host)
    with gate.fetches.slot(source, host):
        card = await fetch_card(
            gate.http, str(payload.url), timeout=settings.stranger_fetch_timeout
        )
    check_card_matches(card, inbound.body, payload)
    return StrangerRequest(payload, card, source, host)
