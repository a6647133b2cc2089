"""Talking to a peer instance: fetch its identity card, send a signed message, verify the reply."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx

from federation import tracing
from federation.envelope import (
    Algorithm,
    Envelope,
    MessageType,
    check_recipient,
    check_signature,
    check_timestamp,
    parse_envelope,
    require_acceptable,
    sign_envelope,
)
from federation.errors import (
    EnvelopeError,
    FederationError,
    KeyNotEndorsed,
    PeerRefused,
    PeerResponseInvalid,
    PeerUnreachable,
)
from federation.identity import Identity
from federation.netpolicy import CARD_MAX_BYTES, request_bounded
from federation.settings import Settings
from federation.states import ConnectionStatus
from federation.store import repos
from federation.trust import continued_keys, lookup_key, public_keys

log = logging.getLogger(__name__)

API = "/api/v1/federation"
INCOMING_PATH = {
    MessageType.CONNECT: f"{API}/incoming/connect",
    MessageType.COMMAND: f"{API}/incoming/command",
    MessageType.EVENT: f"{API}/incoming/event",
}
REPLY_MAX_BYTES = 4 * 1024 * 1024  # what a peer's RESPONSE may hold unless a caller says


async def fetch_card(
    http: httpx.AsyncClient, url: str, *, timeout: float | None = None
) -> dict[str, Any]:
    """GET a peer's identity card; the URL must be the instance's base URL.

    Read through the outbound address policy with a 64 KiB cap and one total deadline. The
    errors never say what answered (status, body): the URL may be a stranger's probe.
    """
    base = url.rstrip("/")
    status, raw = await request_bounded(
        http, "GET", f"{base}{API}/instance", max_bytes=CARD_MAX_BYTES, deadline=timeout or 10.0
    )
    if status != 200:
        log.warning("identity card at %s: status %s", base, status)
        raise PeerUnreachable("no identity card could be read from the peer's URL")
    try:
        card = json.loads(raw)
        if not (
            isinstance(card, dict)
            and isinstance(card["instanceId"], str)
            and card["instanceId"]
            and isinstance(card["keys"], list)
        ):
            raise ValueError("not an identity card")
    except (ValueError, KeyError, RecursionError) as exc:
        raise PeerResponseInvalid("the peer's URL did not answer with an identity card") from exc
    return card


async def send_signed(
    http: httpx.AsyncClient,
    identity: Identity,
    *,
    url: str,
    recipient_id: str,
    recipient_keys: list[dict[str, Any]],
    type: MessageType,
    command_type: str | None,
    payload: dict[str, Any],
    window_seconds: int,
    timeout: float | None = None,
    refresh_keys: Callable[[], Awaitable[list[dict[str, Any]] | None]] | None = None,
    message_id: str | None = None,
    max_reply_bytes: int = REPLY_MAX_BYTES,
    connection_id: str | None = None,
) -> tuple[Envelope, dict[str, Any]]:
    """Sign and POST one message; return it and the verified payload of the signed RESPONSE.

    A refusal by the peer raises PeerRefused with the peer's problem code; a network failure
    or a 5xx raises PeerUnreachable (worth retrying); a reply that is not a valid RESPONSE
    signed by the recipient for this very message raises PeerResponseInvalid.

    A reply signed with a key `recipient_keys` lack (the peer rotated its key) makes us read the
    peer's identity card (`refresh_keys`, or directly from `url`) and accept a key it lists.
    `connection_id` (the connection the message goes over) names it in the send's span.
    """
    # OpenTelemetry on: the envelope carries this span's context, the POST is its child.
    agent_id = payload.get("agentId")
    with tracing.sending(
        type.value,
        command_type,
        peer_instance_id=recipient_id,
        agent_id=agent_id,
        connection_id=connection_id,
    ):
        envelope = sign_envelope(
            identity.signing_key,
            type=type,
            sender_id=identity.instance_id,
            recipient_id=recipient_id,
            command_type=command_type,
            payload=payload,
            message_id=message_id,
        )
        target = f"{url.rstrip('/')}{INCOMING_PATH[type]}"
        status, raw = await request_bounded(
            http,
            "POST",
            target,
            max_bytes=max_reply_bytes,
            deadline=timeout or 30.0,
            json=envelope.to_wire(),
        )
        reply = await _verified_reply(
            http,
            identity,
            envelope,
            url=url,
            answer=(status, raw),
            recipient_keys=recipient_keys,
            refresh_keys=refresh_keys,
            window_seconds=window_seconds,
        )
        return envelope, reply


async def _verified_reply(
    http: httpx.AsyncClient,
    identity: Identity,
    envelope: Envelope,
    *,
    url: str,
    answer: tuple[int, bytes],
    recipient_keys: list[dict[str, Any]],
    refresh_keys: Callable[[], Awaitable[list[dict[str, Any]] | None]] | None,
    window_seconds: int,
) -> dict[str, Any]:
    """The payload of the peer's signed RESPONSE to `envelope` (see `send_signed`)."""
    status, raw = answer
    if status >= 500:
        raise PeerUnreachable(f"{url} answered {status}")
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested past what is read
        raise PeerResponseInvalid(f"{url} answered {status} with no JSON") from exc
    if status >= 400:
        code = body.get("code", "unknown") if isinstance(body, dict) else "unknown"
        detail = body.get("detail", "") if isinstance(body, dict) else ""
        raise PeerRefused(
            f"{url} refused {envelope.commandType or envelope.type.value}: {code}: {detail}",
            peer_code=str(code),
            peer_status=status,
        )
    key_id = body.get("keyId") if isinstance(body, dict) else None
    if isinstance(key_id, str) and lookup_key(recipient_keys, key_id) == (None, False):
        peer = envelope.recipientId
        fresh = await (refresh_keys() if refresh_keys else _card_keys(http, url, peer))
        if fresh is not None:
            # Only keys that continue the trusted ones: the URL may have changed hands.
            recipient_keys, _ = continued_keys(recipient_keys, fresh, peer)
    reply = verify_response(
        body, identity, envelope, recipient_keys=recipient_keys, window_seconds=window_seconds
    )
    return reply.payload


@dataclass(frozen=True, kw_only=True)
class PeerLink:
    """Sends signed messages, as this instance, to the peer of one connection.

    `PeerLink.of(connection, ...)` takes the peer's URL, id and trusted keys from the
    connection's row and the window and timeout from the settings; `send` signs one message,
    POSTs it and returns it with the verified payload of the peer's signed RESPONSE (see
    `send_signed` for what it raises).
    """

    http: httpx.AsyncClient
    identity: Identity
    url: str
    recipient_id: str
    recipient_keys: list[dict[str, Any]]
    window_seconds: int
    timeout: float
    max_reply_bytes: int = REPLY_MAX_BYTES
    connection_id: str | None = None

    @classmethod
    def of(
        cls,
        connection: dict[str, Any],
        *,
        http: httpx.AsyncClient,
        identity: Identity,
        settings: Settings,
        timeout: float | None = None,
    ) -> PeerLink:
        return cls(
            http=http,
            identity=identity,
            url=connection["remote_url"],
            recipient_id=connection["remote_instance_id"],
            recipient_keys=connection["remote_keys"],
            window_seconds=settings.timestamp_window,
            timeout=timeout or settings.peer_request_timeout,
            connection_id=str(connection["connection_id"]),
        )

    async def send(
        self,
        type: MessageType,
        command_type: str,
        payload: dict[str, Any],
        *,
        message_id: str | None = None,
    ) -> tuple[Envelope, dict[str, Any]]:
        return await send_signed(
            self.http,
            self.identity,
            url=self.url,
            recipient_id=self.recipient_id,
            recipient_keys=self.recipient_keys,
            type=type,
            command_type=command_type,
            payload=payload,
            window_seconds=self.window_seconds,
            timeout=self.timeout,
            message_id=message_id,
            max_reply_bytes=self.max_reply_bytes,
            connection_id=self.connection_id,
        )


async def _card_keys(
    http: httpx.AsyncClient, url: str, instance_id: str
) -> list[dict[str, Any]] | None:
    try:
        card = await fetch_card(http, url, timeout=5.0)
    except FederationError as err:
        log.warning("could not refresh the keys of %s: %s", url, err.detail)
        return None
    if card["instanceId"] != instance_id:
        log.warning("the identity card at %s names another instance", url)
        return None
    keys: list[dict[str, Any]] = card["keys"]
    return keys


# One card fetch per sender at a time in this process, at most once per interval: the others
# wait for that answer and reuse it.
_refresh_locks: dict[str, asyncio.Lock] = {}
_last_fetch: dict[str, tuple[float, list[dict[str, Any]] | None]] = {}


class CardKeyRefresher:
    """Reads a connected peer's keys from its identity card, at most once per interval.

    Only keys that continue the trusted ones count (`trust.continued_keys`: a new key must be
    endorsed by a key the connection trusts), so whoever takes over the peer's URL cannot
    replace its keys: a message signed with a key the card lists unendorsed is refused
    `key_not_endorsed`, one with a key this instance never verifies with `key_unacceptable`.
    Nothing is written before the message that asked for it verifies with an accepted key:
    then the accepted keys replace the stored ones (a key the card no longer lists is dropped
    too), committed at once and recorded in the audit log. The card is fetched with no database
    connection held; `pool` is the API's small pool of its own for these writes.
    """

    def __init__(self, pool: asyncpg.Pool, http: httpx.AsyncClient, min_interval: float) -> None:
        self.pool = pool
        self.http = http
        self.min_interval = min_interval

    async def __call__(
        self, connection: dict[str, Any], envelope: Envelope, *, fetch: bool = True
    ) -> list[dict[str, Any]] | None:
        if connection["status"] == ConnectionStatus.DISCONNECTED or connection.get("kind") == "a2a":
            return None
        peer = str(connection["remote_instance_id"])
        lock = _refresh_locks.setdefault(peer, asyncio.Lock())
        async with lock:
            stored_now = await self.pool.fetchval(
                "SELECT remote_keys FROM connections WHERE connection_id = $1",
                connection["connection_id"],
            )
            if stored_now is not None and lookup_key(stored_now, envelope.keyId)[0] is not None:
                return list(stored_now)  # stored while this message waited for the lock
            last = _last_fetch.get(peer)
            if last is not None and time.monotonic() - last[0] < self.min_interval:
                keys = last[1]
            elif not fetch:
                return None
            else:
                keys = await _card_keys(self.http, connection["remote_url"], peer)
                _last_fetch[peer] = (time.monotonic(), keys)
            if keys is None:
                return None
            basis = stored_now if stored_now is not None else connection["remote_keys"]
            keys = _continuing(basis, keys, envelope, peer)
            key, _ = lookup_key(keys, envelope.keyId)
            if key is None:
                return None
            try:
                check_signature(envelope, key)
            except EnvelopeError:
                return None  # a forged message must not make us write anything
            return await self._store(connection, envelope, basis, keys)

    async def _store(
        self,
        connection: dict[str, Any],
        envelope: Envelope,
        basis: list[dict[str, Any]],
        keys: list[dict[str, Any]],
    ) -> list[dict[str, Any]] | None:
        """Store `keys` (continued from `basis`) unless the stored keys changed meanwhile:
        another process (an API replica: the lock above is this process's only) stored what
        a card read later said, and this answer, older maybe, must not undo it (put back a
        key the peer retired, drop one it added). Then the stored keys decide."""
        peer = str(connection["remote_instance_id"])
        async with self.pool.acquire() as conn, conn.transaction():
            stored = await conn.fetchval(
                "SELECT remote_keys FROM connections WHERE connection_id = $1 FOR NO KEY UPDATE",
                connection["connection_id"],
            )
            if stored == keys:
                return keys  # another message stored this very answer already
            if stored != basis:
                ours = stored if lookup_key(stored or [], envelope.keyId)[0] else None
                return list(ours) if ours is not None else None
            before = {k.get("keyId") for k in basis if isinstance(k, dict)}
            after = {k.get("keyId") for k in keys if isinstance(k, dict)}
            await repos.set_remote_keys(conn, connection["connection_id"], keys)
            if before != after:
                await repos.audit(
                    conn,
                    actor=f"peer:{peer}",
                    action="connection.keys_refreshed",
                    connectionId=str(connection["connection_id"]),
                    added=sorted(str(k) for k in after - before),
                    removed=sorted(str(k) for k in before - after),
                )
            return keys


def _continuing(
    trusted: list[dict[str, Any]], card: list[dict[str, Any]], envelope: Envelope, peer: str
) -> list[dict[str, Any]]:
    """The card's keys a connection trusting `trusted` may store; refuses the message at once
    when the card lists its key but that key may not be used."""
    listed = [k for k in card if isinstance(k, dict) and k.get("keyId") == envelope.keyId]
    if listed and listed[0].get("algorithm") in {a.value for a in Algorithm}:
        require_acceptable(
            envelope.keyId, str(listed[0]["algorithm"]), str(listed[0].get("publicKey", ""))
        )
    accepted, refused = continued_keys(trusted, card, peer)
    if envelope.keyId in refused:
        raise KeyNotEndorsed(
            f"key {envelope.keyId!r} of {peer!r} is refused: {refused[envelope.keyId]}; a new"
            " key must be endorsed by one this instance trusts (or the peers connect anew)"
        )
    return accepted


def verify_response(
    body: Any,
    identity: Identity,
    request: Envelope,
    *,
    recipient_keys: list[dict[str, Any]],
    window_seconds: int,
) -> Envelope:
    try:
        reply = parse_envelope(body)
        check_recipient(reply, identity.instance_id)
        check_timestamp(reply, window_seconds)
        if reply.type is not MessageType.RESPONSE or reply.senderId != request.recipientId:
            raise PeerResponseInvalid("reply is not a RESPONSE from the recipient")
        if reply.correlationId != request.messageId:
            raise PeerResponseInvalid("reply does not answer this message")
        key = public_keys(recipient_keys).get(reply.keyId)
        if key is None:
            raise PeerResponseInvalid(f"reply is signed with unknown key {reply.keyId!r}")
        check_signature(reply, key)
    except EnvelopeError as exc:
        raise PeerResponseInvalid(f"reply refused: {exc.code}: {exc.detail}") from exc
    except FederationError:
        raise
    return reply
