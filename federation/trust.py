"""Checks applied to every incoming signed message, in a fixed order.

shape -> recipient -> timestamp -> sender and key -> signature -> replay; the connection state
and the grants are checked by the caller, which knows what kind of message it expects.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from federation.envelope import (
    Algorithm,
    Envelope,
    PublicKey,
    check_recipient,
    check_signature,
    check_timestamp,
    expiry,
    parse_envelope,
)
from federation.errors import (
    ConnectionNotActive,
    GrantDenied,
    ReplayedMessage,
    UnknownKey,
    UnknownSender,
)
from federation.store import repos


@dataclass(frozen=True)
class Verified:
    envelope: Envelope
    connection: dict[str, Any] | None


def public_keys(card_keys: list[dict[str, Any]]) -> dict[str, PublicKey]:
    keys: dict[str, PublicKey] = {}
    for entry in card_keys:
        try:
            keys[entry["keyId"]] = PublicKey(
                entry["keyId"], Algorithm(entry["algorithm"]), entry["publicKey"]
            )
        except (KeyError, ValueError, TypeError):
            continue  # a key we cannot use is a key we do not accept
    return keys


async def verify_incoming(
    db: repos.Executor,
    raw: Any,
    *,
    instance_id: str,
    window_seconds: int,
    sender_keys: list[dict[str, Any]] | None = None,
    check_replay: bool = True,
    now: datetime | None = None,
) -> Verified:
    """Verify a wire message. `sender_keys` is given only for a first CONNECT from a stranger."""
    envelope = parse_envelope(raw)
    check_recipient(envelope, instance_id)
    check_timestamp(envelope, window_seconds, now)
    connection: dict[str, Any] | None = None
    if sender_keys is None:
        connection = await repos.connection_for_peer(db, envelope.senderId)
        if connection is None:
            raise UnknownSender(f"instance {envelope.senderId!r} has no connection with us")
        sender_keys = connection["remote_keys"]
    key = public_keys(sender_keys).get(envelope.keyId)
    if key is None:
        raise UnknownKey(f"key {envelope.keyId!r} is not a key of {envelope.senderId!r}")
    check_signature(envelope, key)
    if check_replay:
        fresh = await repos.remember_message_id(
            db, envelope.senderId, envelope.messageId, expiry(window_seconds, now)
        )
        if not fresh:
            raise ReplayedMessage(f"messageId {envelope.messageId!r} was seen before")
    return Verified(envelope, connection)


def require_active(connection: dict[str, Any] | None) -> dict[str, Any]:
    if connection is None or connection["status"] != "ACTIVE":
        status = connection["status"] if connection else "none"
        raise ConnectionNotActive(f"the connection with this peer is {status}, not ACTIVE")
    return connection


def check_grants(connection: dict[str, Any], command_type: str, payload: dict[str, Any]) -> None:
    grants = connection.get("grants") or {}
    allowed = grants.get("commandTypes", repos.DEFAULT_GRANTS["commandTypes"])
    if command_type not in allowed:
        raise GrantDenied(
            f"command {command_type!r} is not granted to this peer", grant="commandTypes"
        )
    if command_type == "agent.spawn":
        agent_types = grants.get("agentTypes", repos.DEFAULT_GRANTS["agentTypes"])
        if payload.get("agentType") not in agent_types:
            raise GrantDenied(
                f"agent type {payload.get('agentType')!r} is not granted to this peer",
                grant="agentTypes",
            )
