"""Checks applied to every incoming signed message, in a fixed order.

shape -> recipient -> timestamp -> sender and key (validity) -> signature -> replay; the
connection state and the grants are checked by the caller, which knows what kind of message it
expects. Every refusal is a `FederationError` with its own code.
"""

from __future__ import annotations

import fnmatch
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from agents.workspace import normalise_repository_url
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
    GrantAgentType,
    GrantCommandType,
    GrantConcurrency,
    GrantRepository,
    GrantTimeout,
    InvalidPayload,
    KeyExpired,
    ReplayedMessage,
    UnknownKey,
    UnknownSender,
)
from federation.models import Grants, SpawnPayload
from federation.store import repos

# Given a connection whose stored keys lack a keyId, fetch the peer's current keys from its
# identity card (or None when that is not possible now).
KeyRefresher = Callable[[dict[str, Any]], Awaitable[list[dict[str, Any]] | None]]


@dataclass(frozen=True)
class Verified:
    envelope: Envelope
    connection: dict[str, Any] | None


def _valid_until(entry: dict[str, Any]) -> datetime | None:
    value = entry.get("validUntil")
    if not value:
        return None
    moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def lookup_key(
    card_keys: list[dict[str, Any]], key_id: str, now: datetime | None = None
) -> tuple[PublicKey | None, bool]:
    """The key `key_id` of a card's key list, and whether it is past its validity."""
    moment = now or datetime.now(UTC)
    for entry in card_keys:
        try:
            if entry["keyId"] != key_id:
                continue
            key = PublicKey(entry["keyId"], Algorithm(entry["algorithm"]), entry["publicKey"])
            until = _valid_until(entry)
        except (KeyError, ValueError, TypeError):
            continue  # a key we cannot use is a key we do not accept
        if until is not None and until <= moment:
            return None, True
        return key, False
    return None, False


def public_keys(
    card_keys: list[dict[str, Any]], now: datetime | None = None
) -> dict[str, PublicKey]:
    """The keys of a card that verify now."""
    keys: dict[str, PublicKey] = {}
    for entry in card_keys:
        key_id = entry.get("keyId") if isinstance(entry, dict) else None
        if isinstance(key_id, str):
            key, _ = lookup_key([entry], key_id, now)
            if key is not None:
                keys[key_id] = key
    return keys


def key_of(
    card_keys: list[dict[str, Any]], envelope: Envelope, now: datetime | None = None
) -> PublicKey:
    key, expired = lookup_key(card_keys, envelope.keyId, now)
    if expired:
        raise KeyExpired(f"key {envelope.keyId!r} of {envelope.senderId!r} is past its validity")
    if key is None:
        raise UnknownKey(f"key {envelope.keyId!r} is not a key of {envelope.senderId!r}")
    return key


async def verify_incoming(
    db: repos.Executor,
    raw: Any,
    *,
    instance_id: str,
    window_seconds: int,
    sender_keys: list[dict[str, Any]] | None = None,
    check_replay: bool = True,
    now: datetime | None = None,
    refresh_keys: KeyRefresher | None = None,
) -> Verified:
    """Verify a wire message. `sender_keys` is given only for a first CONNECT from a stranger.

    A keyId the stored keys of a known sender lack makes `refresh_keys` (if given) read the
    sender's identity card once: a key only the card lists is accepted, never one from the
    message itself.
    """
    envelope = parse_envelope(raw)
    check_recipient(envelope, instance_id)
    check_timestamp(envelope, window_seconds, now)
    connection: dict[str, Any] | None = None
    if sender_keys is None:
        connection = await repos.connection_for_peer(db, envelope.senderId)
        if connection is None:
            raise UnknownSender(f"instance {envelope.senderId!r} has no connection with us")
        sender_keys = connection["remote_keys"]
        key, expired = lookup_key(sender_keys, envelope.keyId, now)
        if key is None and not expired and refresh_keys is not None:
            fresh = await refresh_keys(connection)
            if fresh is not None:
                sender_keys = fresh
                connection = {**connection, "remote_keys": fresh}
    key = key_of(sender_keys, envelope, now)
    check_signature(envelope, key)
    if check_replay:
        fresh_id = await repos.remember_message_id(
            db, envelope.senderId, envelope.messageId, expiry(window_seconds, now)
        )
        if not fresh_id:
            raise ReplayedMessage(f"messageId {envelope.messageId!r} was seen before")
    return Verified(envelope, connection)


def require_active(connection: dict[str, Any] | None) -> dict[str, Any]:
    if connection is None or connection["status"] != "ACTIVE":
        status = connection["status"] if connection else "none"
        raise ConnectionNotActive(
            f"the connection with this peer is {status}, not ACTIVE", connectionStatus=status
        )
    return connection


def grants_of(connection: dict[str, Any]) -> Grants:
    """The connection's grants, with defaults for what an older row does not say."""
    return Grants.model_validate(connection.get("grants") or {})


def check_grants(
    connection: dict[str, Any],
    command_type: str,
    payload: dict[str, Any],
    *,
    max_timeout: int | None = None,
    offered_agent_types: list[str] | None = None,
) -> None:
    """Refuse a command the connection's grants (or this instance's own limits) do not allow."""
    grants = grants_of(connection)
    if command_type not in grants.commandTypes:
        raise GrantCommandType(
            f"command {command_type!r} is not granted to this peer", grant="commandTypes"
        )
    if command_type != "agent.spawn":
        return
    try:
        spawn = SpawnPayload.model_validate(payload)
    except ValidationError as exc:
        fields = sorted({".".join(str(p) for p in e["loc"]) for e in exc.errors()})
        raise InvalidPayload(
            f"payload of agent.spawn is invalid: {', '.join(fields)}", fields=fields
        ) from exc
    if spawn.agentType not in grants.agentTypes:
        raise GrantAgentType(
            f"agent type {spawn.agentType!r} is not granted to this peer", grant="agentTypes"
        )
    if offered_agent_types is not None and spawn.agentType not in offered_agent_types:
        raise GrantAgentType(
            f"agent type {spawn.agentType!r} is not offered by this instance", grant="offered"
        )
    repository = spawn.context.repository
    # Globs match the form that is cloned (host lowercased, dot segments resolved), so that
    # `https://host/allowed/../other` cannot pass for `https://host/allowed/*`.
    if repository is not None and not any(
        fnmatch.fnmatchcase(_normalised(repository), pattern) for pattern in grants.repositories
    ):
        raise GrantRepository(
            f"repository {repository!r} matches none of this peer's allowed patterns",
            grant="repositories",
        )
    limits = [v for v in (grants.maxTimeout, max_timeout) if v is not None]
    if limits and spawn.options.timeout > min(limits):
        raise GrantTimeout(
            f"timeout {spawn.options.timeout} s is above the {min(limits)} s allowed",
            grant="maxTimeout",
            limit=min(limits),
        )


async def check_peer_concurrency(
    db: repos.Executor, connection: dict[str, Any], payload: Any
) -> None:
    """429 when this peer already runs as many agents here as its grant allows.

    A spawn of an agentId that already exists is a retry and passes. Call it inside the
    transaction that inserts the run: the lock serialises concurrent spawns of one peer.
    """
    limit = grants_of(connection).maxConcurrentAgents
    if limit is None:
        return
    peer = connection["remote_instance_id"]
    try:
        agent_id = uuid.UUID(str(payload.get("agentId")))
    except (ValueError, AttributeError):
        return  # the payload check refuses it
    if await repos.get_executed_agent(db, peer, agent_id) is not None:
        return
    await db.execute("SELECT pg_advisory_xact_lock(hashtext('fedagent:peer:' || $1))", peer)
    running = await repos.count_running_for_peer(db, peer)
    if running >= limit:
        raise GrantConcurrency(
            f"this peer runs {running} agents here; its grant allows {limit}",
            grant="maxConcurrentAgents",
            running=running,
            limit=limit,
        )


def _normalised(repository: str) -> str:
    try:
        return normalise_repository_url(repository)
    except ValueError:
        return "\0"  # matches no glob: refused as outside the grants
