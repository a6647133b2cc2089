"""Talking to a peer instance: fetch its identity card, send a signed message, verify the reply."""

from __future__ import annotations

from typing import Any

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
from federation.trust import public_keys

API = "/api/v1/federation"
INCOMING_PATH = {
    MessageType.CONNECT: f"{API}/incoming/connect",
    MessageType.COMMAND: f"{API}/incoming/command",
    MessageType.EVENT: f"{API}/incoming/event",
}


async def fetch_card(http: httpx.AsyncClient, url: str) -> dict[str, Any]:
    """GET a peer's identity card; the URL must be the instance's base URL."""
    try:
        response = await http.get(f"{url.rstrip('/')}{API}/instance")
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
) -> tuple[Envelope, dict[str, Any]]:
    """Sign and POST one message; return it and the verified payload of the signed RESPONSE.

    A refusal by the peer raises PeerRefused with the peer's problem code; a network failure
    or a 5xx raises PeerUnreachable (worth retrying); a reply that is not a valid RESPONSE
    signed by the recipient for this very message raises PeerResponseInvalid.
    """
    envelope = sign_envelope(
        identity.signing_key,
        type=type,
        sender_id=identity.instance_id,
        recipient_id=recipient_id,
        command_type=command_type,
        payload=payload,
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
    reply = verify_response(
        body, identity, envelope, recipient_keys=recipient_keys, window_seconds=window_seconds
    )
    return envelope, reply.payload


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
