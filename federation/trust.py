"""Checks applied to every incoming signed message, in a fixed order.

shape -> recipient -> timestamp -> sender and key (validity) -> signature -> replay; the
connection state and the grants are checked by the caller, which knows what kind of message it
expects. Every refusal is a `FederationError` with its own code.
"""

from __future__ import annotations

import fnmatch
import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from agents.workspace import normalise_repository_url
from federation.envelope import (
    INSTANCE_ID_PATTERN,
    Algorithm,
    Envelope,
    PublicKey,
    b64url_decode,
    check_recipient,
    check_signature,
    check_timestamp,
    endorsement_bytes,
    expiry,
    key_problem,
    parse_envelope,
    parse_timestamp,
    require_acceptable,
)
from federation.errors import (
    AgentIdConflict,
    ConnectionNotActive,
    FederationError,
    GrantAgentType,
    GrantCommandType,
    GrantConcurrency,
    GrantRepository,
    GrantTimeout,
    InvalidPayload,
    KeyExpired,
    PeerSpeaksA2A,
    QueueFull,
    ReplayedMessage,
    UnknownKey,
    UnknownSender,
)
from federation.models import ConnectRequestPayload, Grants, SpawnPayload
from federation.states import ConnectionKind, ConnectionStatus
from federation.store import repos

# Given a connection whose stored keys lack a message's keyId, the peer's current keys from its
# identity card (or None when that is not possible now). With fetch=False only an answer
# already fetched within the interval is used: the caller holds a database transaction.
KeyRefresher = Callable[..., Awaitable[list[dict[str, Any]] | None]]


SAFE_INSTANCE_ID = re.compile(INSTANCE_ID_PATTERN)


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


def require_acceptable_keys(entries: list[Any]) -> None:
    """KeyUnacceptable for a listed key this instance will not verify with (weak RSA, material
    that is not of its algorithm). Entries of algorithms it does not know are left aside:
    `lookup_key` never uses them."""
    known = {a.value for a in Algorithm}
    for entry in entries:
        if isinstance(entry, dict) and entry.get("algorithm") in known:
            require_acceptable(
                str(entry.get("keyId")), str(entry["algorithm"]), str(entry.get("publicKey", ""))
            )


def continued_keys(
    trusted: list[dict[str, Any]],
    offered: list[Any],
    instance_id: str,
    now: datetime | None = None,
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The keys of a connected peer's card the connection may store, and why each other one
    is refused.

    A key the connection trusts stays (its validity the earlier of the stored one and the
    card's: a card shortens a key's life, never lengthens it). A new key needs an
    `endorsement` that verifies with a trusted key valid now, or with a new key accepted so
    (a chain of rotations): whoever takes over the peer's URL adds no key of its own."""
    anchors = public_keys(trusted, now)
    stored = {e["keyId"]: e for e in trusted if isinstance(e, dict) and "keyId" in e}
    entries = [e for e in offered if isinstance(e, dict) and isinstance(e.get("keyId"), str)]
    accepted: dict[str, dict[str, Any]] = {}
    refused: dict[str, str] = {}
    # Entries refused for a reason no later pass changes: each endorsement is verified once,
    # however the card orders a chain (a card of forged endorsements costs one check each).
    settled: set[int] = set()
    grown = True
    while grown:
        grown = False
        for index, entry in enumerate(entries):
            key_id = entry["keyId"]
            if key_id in accepted or index in settled:
                continue
            reason = _why_not_continued(entry, stored.get(key_id), anchors, instance_id)
            if reason is not None:
                refused[key_id] = reason
                if reason != UNENDORSED:  # only an endorser not accepted yet may come later
                    settled.add(index)
                continue
            accepted[key_id] = _kept_entry(entry, stored.get(key_id))
            refused.pop(key_id, None)
            key, _ = lookup_key([accepted[key_id]], key_id, now)
            if key is not None:
                anchors[key_id] = key
            grown = True
    return [accepted[e["keyId"]] for e in entries if e["keyId"] in accepted], refused


UNENDORSED = "not endorsed by a key this connection trusts"


def _why_not_continued(
    entry: dict[str, Any],
    stored: dict[str, Any] | None,
    anchors: dict[str, PublicKey],
    instance_id: str,
) -> str | None:
    algorithm, pem = str(entry.get("algorithm")), str(entry.get("publicKey", ""))
    problem = key_problem(algorithm, pem)
    if problem is not None:
        return problem
    try:
        _valid_until(entry)
    except ValueError:
        return "its validUntil is not an RFC 3339 time"
    if stored is not None:
        same = stored.get("algorithm") == algorithm and str(stored.get("publicKey")).strip() == (
            pem.strip()
        )
        return None if same else "another key than the trusted one of this keyId"
    endorsement = entry.get("endorsement")
    if not isinstance(endorsement, dict):
        return UNENDORSED
    signer = anchors.get(str(endorsement.get("keyId")))
    if signer is None:
        return UNENDORSED
    try:
        signature = b64url_decode(str(endorsement.get("signature")))
    except (ValueError, TypeError):
        return "its endorsement is not base64url"
    if not signer.verify(signature, endorsement_bytes(instance_id, entry["keyId"], algorithm, pem)):
        return "its endorsement does not verify"
    return None


def _kept_entry(entry: dict[str, Any], stored: dict[str, Any] | None) -> dict[str, Any]:
    if stored is None:
        return dict(entry)
    mine, theirs = _valid_until(stored), _valid_until(entry)
    if mine is not None and (theirs is None or mine < theirs):
        return {**entry, "validUntil": stored["validUntil"]}
    return dict(entry)


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
        if connection is None or connection.get("kind") == ConnectionKind.A2A:
            # An A2A agent signs nothing: a message in its name is a stranger's.
            raise UnknownSender(f"instance {envelope.senderId!r} has no connection with us")
        sender_keys = connection["remote_keys"]
        key, expired = lookup_key(sender_keys, envelope.keyId, now)
        if key is None and not expired and refresh_keys is not None:
            fresh = await refresh_keys(connection, envelope, fetch=False)
            if fresh is not None:
                sender_keys = fresh
                connection = {**connection, "remote_keys": fresh}
    key = key_of(sender_keys, envelope, now)
    check_signature(envelope, key)
    if check_replay:
        fresh_id = await repos.remember_message_id(
            db,
            envelope.senderId,
            envelope.messageId,
            expiry(window_seconds, now, parse_timestamp(envelope.timestamp)),
        )
        if not fresh_id:
            raise ReplayedMessage(f"messageId {envelope.messageId!r} was seen before")
    return Verified(envelope, connection)


async def refresh_keys_first(
    pool: Any,
    raw: Any,
    refresh_keys: KeyRefresher,
    *,
    instance_id: str,
    window_seconds: int,
) -> None:
    """Before a transaction is opened: read a known sender's card if it signed with a keyId we
    do not know. No pool connection is held while the card is fetched; a message that fails
    any cheap check (shape, recipient, time) fetches nothing, and the refresher writes the
    new keys only once the message's signature verifies with one of them."""
    try:
        envelope = parse_envelope(raw)
        check_recipient(envelope, instance_id)
        check_timestamp(envelope, window_seconds)
    except FederationError:
        return  # verify_incoming refuses it with the right code
    connection = await repos.connection_for_peer(pool, envelope.senderId)
    if connection is None:
        return
    key, expired = lookup_key(connection["remote_keys"], envelope.keyId)
    if key is None and not expired:
        await refresh_keys(connection, envelope, fetch=True)


def verify_connection_request(
    raw: Any, *, instance_id: str, window_seconds: int
) -> ConnectRequestPayload:
    """A stranger's connection.request, verified with the keys it carries; nothing fetched."""
    envelope = parse_envelope(raw)
    check_recipient(envelope, instance_id)
    check_timestamp(envelope, window_seconds)
    try:
        request = ConnectRequestPayload.model_validate(envelope.payload)
    except ValidationError as exc:
        fields = sorted({".".join(str(p) for p in e["loc"]) for e in exc.errors()})
        raise InvalidPayload(
            "connection.request needs connectionId, url, name and the sender's keys",
            fields=fields,
        ) from exc
    url = request.url
    if url.query is not None or url.fragment is not None or url.username or url.password:
        raise InvalidPayload("payload.url must be the instance's base URL", fields=["url"])
    sent = [k.model_dump() for k in request.keys]
    require_acceptable_keys(sent)
    key = key_of(sent, envelope)
    check_signature(envelope, key)
    return request


def check_card_matches(
    card: dict[str, Any], raw: dict[str, Any], request: ConnectRequestPayload
) -> None:
    """The card read from the sender's URL must be the sender's: same id, URL and key."""
    instance_id = card.get("instanceId")
    if not isinstance(instance_id, str) or not SAFE_INSTANCE_ID.fullmatch(instance_id):
        raise UnknownSender("the identity card at the sender's URL has no valid instanceId")
    if instance_id != raw.get("senderId"):
        raise UnknownSender("the identity card at the sender's URL names another instance")
    if str(card.get("url") or "").rstrip("/") != str(request.url).rstrip("/"):
        raise UnknownSender("the identity card at the sender's URL names another URL")
    require_acceptable_keys(card["keys"])
    sent = {k.keyId: k.publicKey.strip() for k in request.keys}
    key_id = raw.get("keyId")
    listed = [k for k in card.get("keys") or [] if isinstance(k, dict) and k.get("keyId") == key_id]
    if not listed or str(listed[0].get("publicKey", "")).strip() != sent.get(str(key_id)):
        raise UnknownKey("the identity card at the sender's URL does not list the signing key")


def require_active(connection: dict[str, Any] | None) -> dict[str, Any]:
    if connection is None or connection["status"] != ConnectionStatus.ACTIVE:
        status = connection["status"] if connection else "none"
        raise ConnectionNotActive(
            f"the connection with this peer is {status}, not ACTIVE", connectionStatus=status
        )
    return connection


# What a connection that ended (suspended or disconnected) still carries: only what ends the
# runs it already had, so both sides agree on how they ended. Nothing new is admitted.
ENDED = (ConnectionStatus.SUSPENDED, ConnectionStatus.DISCONNECTED)
RUN_ENDING_COMMANDS = ("agent.kill", "agent.status")


def require_fedagent(connection: dict[str, Any]) -> dict[str, Any]:
    """A connection whose peer speaks fedagent/1 (an A2A agent takes no signed message)."""
    if connection.get("kind") == ConnectionKind.A2A:
        raise PeerSpeaksA2A(
            f"{connection['remote_name']} is an A2A agent: it takes no fedagent/1 message"
        )
    return connection


def require_active_or_ending(connection: dict[str, Any] | None, *, ending: bool) -> dict[str, Any]:
    """ACTIVE; or SUSPENDED or DISCONNECTED when `ending` (a run's final event, a kill or a
    status ask of a run the connection already had: the caller checks the run is its)."""
    if ending and connection is not None and connection["status"] in ENDED:
        return connection
    return require_active(connection)


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


def check_peer_command(
    connection: dict[str, Any],
    command_type: str,
    payload: dict[str, Any],
    *,
    max_timeout: int,
    offered_agent_types: list[str] | None,
) -> None:
    """A peer's command against its connection's grants and this instance's own limits.

    The one rule the ingress applies to a command and every try of a run applies again, so
    neither can leave out an instance limit (`max_timeout` has no default on purpose)."""
    check_grants(
        connection,
        # Reading a run's transcript is reading its status: the same grant.
        "agent.status" if command_type == "agent.transcript" else command_type,
        payload,
        max_timeout=max_timeout,
        offered_agent_types=offered_agent_types,
    )


async def check_peer_concurrency(
    db: repos.Executor,
    connection: dict[str, Any],
    payload: Any,
    *,
    default_limit: int | None = None,
    queue_cap: int = 0,
) -> None:
    """429 when this peer already has as many runs here as it may.

    Its grant's maxConcurrentAgents, else `default_limit` (the instance's per-peer default),
    bounds its unfinished runs; a spawn with options.queue may go past it by at most
    `queue_cap` more (queue_full past that), so queueing cannot let one peer hold every slot.
    A spawn of an agentId that already exists is a retry and passes, if it came over this very
    connection: a new connection that reuses a disconnected peer's id inherits nothing.
    Call it inside the transaction that inserts the run: the lock serialises concurrent spawns
    of one peer.
    """
    peer = connection["remote_instance_id"]
    try:
        agent_id = uuid.UUID(str(payload.get("agentId")))
    except (ValueError, AttributeError):
        return  # the payload check refuses it
    known = await repos.get_executed_agent(db, peer, agent_id)
    if known is not None:
        if known["connection_id"] != connection["connection_id"]:
            raise AgentIdConflict("this agentId belongs to a run of an earlier connection")
        return
    grant_limit = grants_of(connection).maxConcurrentAgents
    limit = grant_limit if grant_limit is not None else default_limit
    if limit is None:
        return
    await db.execute("SELECT pg_advisory_xact_lock(hashtext('fedagent:peer:' || $1))", peer)
    running = await repos.count_running_for_peer(db, peer)
    options = payload.get("options") if isinstance(payload.get("options"), dict) else {}
    if running < limit:
        return
    if options.get("queue") is True and running < limit + queue_cap:
        return
    if options.get("queue") is True:
        raise QueueFull(
            f"this peer has {running} runs here; {limit} may run and {queue_cap} wait",
            running=running,
            limit=limit,
            queueCap=queue_cap,
        )
    raise GrantConcurrency(
        f"this peer runs {running} agents here; it may run {limit}",
        grant="maxConcurrentAgents",
        running=running,
        limit=limit,
    )


def _normalised(repository: str) -> str:
    try:
        return normalise_repository_url(repository)
    except ValueError:
        return "\0"  # matches no glob: refused as outside the grants
