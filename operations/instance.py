"""This instance (admin): its card, its name, capabilities and metadata, and its keys."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from federation.envelope import Algorithm, MessageType, format_timestamp
from federation.errors import FederationError
from federation.identity import Identity, load_identity, rotate_key, update_instance
from federation.models import InstanceUpdate, KeyPublic, KeyRotate, KeyRotated
from federation.peer import PeerLink
from federation.settings import Settings
from federation.states import ConnectionStatus
from federation.store import repos
from federation.users import User
from operations import Services

log = logging.getLogger(__name__)


def limits(settings: Settings) -> dict[str, Any]:
    """What any peer can ask of this instance at most, whatever its grants say."""
    return {
        "maxTimeout": settings.max_agent_timeout,
        "maxRunningAgents": getattr(settings, "max_running_agents", None),
        "maxBodyBytes": settings.max_body_bytes,
        "timestampWindow": settings.timestamp_window,
        "peerMaxRunningAgents": settings.peer_max_running_agents,
        "peerMaxQueuedAgents": settings.peer_max_queued_agents,
        # A connection this instance asked for allows the peer nothing until this instance's
        # admin grants it.
        "requesterGrants": {"commandTypes": [], "agentTypes": [], "repositories": []},
    }


def configured(settings: Settings) -> dict[str, Any]:
    """What this instance runs agents with, from its settings: the card says it as it is."""
    return {"sandboxes": [settings.sandbox], "modelProviders": [settings.model_provider]}


async def card(services: Services) -> dict[str, Any]:
    """The public identity card: id, name, URL, keys with validity, what it offers."""
    settings = services.settings
    return (await services.identity()).card(limits(settings), configured=configured(settings))


async def update(services: Services, user: User, body: InstanceUpdate) -> dict[str, Any]:
    """Change the name, what this instance offers (capabilities) or its metadata."""
    pool = services.pool
    changes = body.model_dump(exclude_unset=True, exclude_none=True)
    capabilities = (
        body.capabilities.model_dump(exclude_unset=True, exclude_none=True)
        if body.capabilities is not None
        else None
    )
    previous = await update_instance(
        pool, name=body.name, capabilities=capabilities, metadata=body.metadata
    )
    identity = await load_identity(pool)
    current = {"name": identity.name, "capabilities": identity.capabilities}
    current["metadata"] = identity.metadata
    await repos.audit(
        pool,
        actor=user.actor,
        action="instance.update",
        changes={k: {"from": previous.get(k), "to": current.get(k)} for k in changes},
    )
    return identity.card(limits(services.settings), configured=configured(services.settings))


async def _tell_peers(services: Services, identity: Identity) -> dict[str, bool]:
    """Best effort: a signed message with the new key makes each active peer read our card now
    (instead of on our next real message)."""
    connections = [
        c
        for c in await repos.list_connections(services.pool)
        if c["status"] == ConnectionStatus.ACTIVE and c["kind"] != "a2a"
    ]

    async def tell(connection: dict[str, Any]) -> bool:
        try:
            link = PeerLink.of(
                connection,
                http=services.http,
                identity=identity,
                settings=services.settings,
                timeout=5.0,
            )
            await link.send(
                MessageType.CONNECT,
                "connection.keys_changed",
                {"connectionId": str(connection["connection_id"])},
            )
            return True
        except FederationError as err:
            log.warning("peer %s did not hear of the new key: %s", connection["remote_name"], err)
            return False

    results = await asyncio.gather(*(tell(c) for c in connections))
    return {str(c["connection_id"]): ok for c, ok in zip(connections, results, strict=True)}


async def rotate_keys(
    services: Services, user: User, request: KeyRotate | None = None
) -> KeyRotated:
    """A new key signs from now on; the current one verifies for the grace period, then never."""
    request = request or KeyRotate()
    settings = services.settings
    grace = (
        request.graceSeconds if request.graceSeconds is not None else settings.key_rotation_grace
    )
    assert services.cipher is not None
    rotation = await rotate_key(
        services.pool, services.cipher, grace_seconds=grace, algorithm=Algorithm(request.algorithm)
    )
    identity = await load_identity(services.pool, services.cipher)
    notified = await _tell_peers(services, identity)
    retired = [
        {"keyId": key_id, "validUntil": format_timestamp(until)}
        for key_id, until in rotation.retired
    ]
    await repos.audit(
        services.pool,
        actor=user.actor,
        action="instance.keys.rotate",
        keyId=rotation.new_key.key_id,
        algorithm=request.algorithm,
        graceSeconds=grace,
        retired=retired,
        peersNotified=notified,
    )
    return KeyRotated(
        keyId=rotation.new_key.key_id,
        algorithm=request.algorithm,
        retired=retired,
        keys=[KeyPublic.model_validate(k.card_entry()) for k in identity.keys],
    )
