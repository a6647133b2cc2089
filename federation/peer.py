"""Talking to a peer instance: fetch its identity card, send a signed message, verify the reply."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import httpx

from federation.envelope import (
    Envelope,
    MessageType,
    check_recipient,
    check_signature,
    check_timestamp,
    parse_envelope,
    sign_envelope,
)
from federation.errors import (
    EnvelopeError,
    FederationError,
    PeerRefused,
    PeerResponseInvalid,
    PeerUnreachable,
)
from federation.identity import Identity
from federation.store import repos
from federation.trust import lookup_key, public_keys

log = logging.getLogger(__name__)

API = "/api/v1/federation"
INCOMING_PATH = {
    MessageType.CONNECT: f"{API}/incoming/connect",
    MessageType.COMMAND: f"{API}/incoming/command",
    MessageType.EVENT: f"{API}/incoming/event",
}


async def fetch_card(
    http: httpx.AsyncClient, url: str, *, timeout: float | None = None
) -> dict[str, Any]:
    """GET a peer's identity card; the URL must be the instance's base URL."""
    try:
        kwargs: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        response = await http.get(f"{url.rstrip('/')}{API}/instance", **kwargs)
    except httpx.HTTPError as exc:
        raise PeerUnreachable(f"could not reach {url}: {exc.__class__.__name__}") from exc
    if response.status_code != 200:
        raise PeerUnreachable(f"{url} answered {response.status_code} for its identity card")
    try:
        card = response.json()
        if not (isinstance(card, dict) and card["instanceId"] and isinstance(card["keys"], list)):
            raise ValueError("not an identity card")
    except (ValueError, KeyError) as exc:
        raise PeerResponseInvalid(f"{url} did not answer with an identity card") from exc
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
) -> tuple[Envelope, dict[str, Any]]:
    """Sign and POST one message; return it and the verified payload of the signed RESPONSE.

    A refusal by the peer raises PeerRefused with the peer's problem code; a network failure
    or a 5xx raises PeerUnreachable (worth retrying); a reply that is not a valid RESPONSE
    signed by the recipient for this very message raises PeerResponseInvalid.

    A reply signed with a key `recipient_keys` lack (the peer rotated its key) makes us read the
    peer's identity card (`refresh_keys`, or directly from `url`) and accept a key it lists.
    """
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
    try:
        response = await http.post(target, json=envelope.to_wire(), timeout=timeout)
    except httpx.HTTPError as exc:
        raise PeerUnreachable(f"could not reach {url}: {exc.__class__.__name__}") from exc
    if response.status_code >= 500:
        raise PeerUnreachable(f"{url} answered {response.status_code}")
    try:
        body = response.json()
    except ValueError as exc:
        raise PeerResponseInvalid(f"{url} answered {response.status_code} with no JSON") from exc
    if response.status_code >= 400:
        code = body.get("code", "unknown") if isinstance(body, dict) else "unknown"
        detail = body.get("detail", "") if isinstance(body, dict) else ""
        raise PeerRefused(
            f"{url} refused {command_type or type.value}: {code}: {detail}",
            peer_code=str(code),
            peer_status=response.status_code,
        )
    key_id = body.get("keyId") if isinstance(body, dict) else None
    if isinstance(key_id, str) and lookup_key(recipient_keys, key_id) == (None, False):
        fresh = await (refresh_keys() if refresh_keys else _card_keys(http, url, recipient_id))
        if fresh is not None:
            recipient_keys = fresh
    reply = verify_response(
        body, identity, envelope, recipient_keys=recipient_keys, window_seconds=window_seconds
    )
    return envelope, reply.payload


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


# One refresh per connection at a time in this process: the others wait and reuse its result.
_refresh_locks: dict[str, asyncio.Lock] = {}


class CardKeyRefresher:
    """Reads a connected peer's keys from its identity card, at most once per interval.

    The keys the card lists replace the stored ones (so a key the card no longer lists is
    dropped too); the change is committed at once, whatever becomes of the message that
    triggered it, and recorded in the audit log. `pool` must not be the pool whose connection
    the caller holds while it waits here (the API gives it a small pool of its own), or a burst
    of messages signed with a new key could take every connection and wait forever.
    """

    def __init__(self, pool: asyncpg.Pool, http: httpx.AsyncClient, min_interval: float) -> None:
        self.pool = pool
        self.http = http
        self.min_interval = min_interval

    async def __call__(self, connection: dict[str, Any]) -> list[dict[str, Any]] | None:
        if connection["status"] == "DISCONNECTED":
            return None
        connection_id = connection["connection_id"]
        lock = _refresh_locks.setdefault(str(connection_id), asyncio.Lock())
        async with lock:
            stored: list[dict[str, Any]] | None = await self.pool.fetchval(
                "SELECT remote_keys FROM connections WHERE connection_id = $1", connection_id
            )
            if stored is not None and stored != connection["remote_keys"]:
                return stored  # refreshed while this message waited
            if not await repos.claim_key_refresh(self.pool, connection_id, self.min_interval):
                return stored
            keys = await _card_keys(
                self.http, connection["remote_url"], connection["remote_instance_id"]
            )
            if keys is None:
                return stored
            before = {k.get("keyId") for k in connection["remote_keys"] if isinstance(k, dict)}
            after = {k.get("keyId") for k in keys if isinstance(k, dict)}
            await repos.set_remote_keys(self.pool, connection_id, keys)
            if before != after:
                await repos.audit(
                    self.pool,
                    actor=f"peer:{connection['remote_instance_id']}",
                    action="connection.keys_refreshed",
                    connectionId=str(connection_id),
                    added=sorted(str(k) for k in after - before),
                    removed=sorted(str(k) for k in before - after),
                )
            return keys


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
