"""The life of a connection: PENDING -> ACTIVE <-> SUSPENDED, and DISCONNECTED at the end.

Both sides hold a copy and every change travels as a signed CONNECT message:
`connection.request` (creates PENDING), `connection.accept` (-> ACTIVE) and `connection.reject`
(-> DISCONNECTED) by the side that was asked, `connection.suspend` / `connection.resume` by
either side, `connection.disconnect` by either side. A suspension belongs to the side that made
it: each side lifts only its own, and the connection is ACTIVE again once neither holds it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from federation.errors import ConnectionStateConflict, InvalidPayload, UnsupportedCommand
from federation.models import Grants
from federation.states import ConnectionStatus
from federation.store import repos
from federation.store.first_hour import set_peer_grants

# CONNECT commands a peer sends about an existing connection: target, allowed from, and which
# of our directions the connection must have (the side that was asked answers a request).
ANSWERS: dict[str, tuple[str, tuple[str, ...], str | None]] = {
    "connection.accept": (ConnectionStatus.ACTIVE, (ConnectionStatus.PENDING,), "outbound"),
    "connection.reject": (ConnectionStatus.DISCONNECTED, (ConnectionStatus.PENDING,), "outbound"),
    "connection.disconnect": (
        ConnectionStatus.DISCONNECTED,
        (ConnectionStatus.PENDING, ConnectionStatus.ACTIVE, ConnectionStatus.SUSPENDED),
        None,
    ),
}
SUSPENSIONS = ("connection.suspend", "connection.resume")
# A signed nudge after the peer rotated its key: verifying it refreshed the peer's keys.
NOTICES = ("connection.keys_changed",)
# The peer changed what it allows us: the payload carries its grants, which we keep to show
# them and to refuse at once a spawn they would refuse.
GRANT_NOTICES = ("connection.grants_changed",)
PEER_COMMANDS = (*ANSWERS, *SUSPENSIONS, *NOTICES, *GRANT_NOTICES)


def _holders(suspended_by: str | None) -> set[str]:
    if suspended_by is None:
        return set()
    return {"local", "remote"} if suspended_by == "both" else {suspended_by}


def _encode(holders: set[str]) -> str | None:
    if not holders:
        return None
    return "both" if len(holders) == 2 else next(iter(holders))


def suspension_change(row: dict[str, Any], side: str, action: str) -> tuple[str, str | None]:
    """(status, suspended_by) after `side` ('local' or 'remote') suspends or resumes."""
    status = row["status"]
    holders = _holders(row.get("suspended_by"))
    if action == "suspend":
        if status not in (ConnectionStatus.ACTIVE, ConnectionStatus.SUSPENDED):
            raise ConnectionStateConflict(f"a {status} connection cannot be suspended")
        holders.add(side)
        return ConnectionStatus.SUSPENDED, _encode(holders)
    if action == "resume":
        if status != ConnectionStatus.SUSPENDED:
            raise ConnectionStateConflict(f"a {status} connection cannot be resumed")
        if side not in holders:
            who = "this instance" if side == "local" else "the peer"
            raise ConnectionStateConflict(
                f"{who} did not suspend this connection; only the side that did may resume it"
            )
        holders.discard(side)
        return (ConnectionStatus.ACTIVE if not holders else ConnectionStatus.SUSPENDED), _encode(
            holders
        )
    raise ValueError(action)


async def change_suspension(
    db: repos.Executor, row: dict[str, Any], side: str, action: str
) -> dict[str, Any]:
    status, suspended_by = suspension_change(row, side, action)
    updated = await repos.update_connection_state(
        db,
        row["connection_id"],
        status=status,
        suspended_by=suspended_by,
        expect_status=row["status"],
        expect_suspended_by=row.get("suspended_by"),
    )
    if updated is None:
        raise ConnectionStateConflict("the connection changed meanwhile; try again")
    return updated


# Told when the peer suspended or ended a connection (e.g. to stop its runs here).
ConnectionEnded = Callable[[dict[str, Any]], None]


async def apply_peer_change(
    db: repos.Executor,
    connection: dict[str, Any],
    command_type: str | None,
    peer_grants: dict[str, Any] | None = None,
    on_end: ConnectionEnded | None = None,
) -> dict[str, Any]:
    """Apply a verified CONNECT command from the peer to our copy; returns the new row.

    `peer_grants`: what the peer says it now allows us (connection.accept, .grants_changed).
    `on_end` gets the new row when the change suspends or disconnects the connection."""
    updated = await _apply_peer_change(db, connection, command_type, peer_grants)
    if on_end is not None and updated["status"] in (
        ConnectionStatus.SUSPENDED,
        ConnectionStatus.DISCONNECTED,
    ):
        if (
            connection["status"] == ConnectionStatus.ACTIVE
            or updated["status"] == ConnectionStatus.DISCONNECTED
        ):
            on_end(updated)
    return updated


async def _apply_peer_change(
    db: repos.Executor,
    connection: dict[str, Any],
    command_type: str | None,
    peer_grants: dict[str, Any] | None,
) -> dict[str, Any]:
    if command_type in NOTICES:
        return connection
    if command_type in GRANT_NOTICES:
        if peer_grants is None:
            raise InvalidPayload("connection.grants_changed needs grants")
        if connection["status"] == ConnectionStatus.DISCONNECTED:
            raise ConnectionStateConflict("a DISCONNECTED connection has no grants")
        return await _store_peer_grants(db, connection, peer_grants)
    if command_type in SUSPENSIONS:
        action = "suspend" if command_type == "connection.suspend" else "resume"
        if action == "resume" and connection["status"] == ConnectionStatus.ACTIVE:
            return connection  # we never heard of the suspension (the peer could not tell us)
        return await change_suspension(db, connection, "remote", action)
    if command_type not in ANSWERS:
        raise UnsupportedCommand(f"unknown CONNECT command {command_type!r}")
    target, expect, direction = ANSWERS[command_type]
    if direction is not None and connection["direction"] != direction:
        raise ConnectionStateConflict("only the side that was asked may answer")
    updated = await repos.set_connection_status(
        db, connection["connection_id"], target, expect=expect
    )
    if updated is None:
        raise ConnectionStateConflict(f"cannot {command_type} a {connection['status']} connection")
    if command_type == "connection.accept" and peer_grants is not None:
        updated = await _store_peer_grants(db, updated, peer_grants)
    return updated


async def _store_peer_grants(
    db: repos.Executor, connection: dict[str, Any], peer_grants: dict[str, Any]
) -> dict[str, Any]:
    try:
        grants = Grants.model_validate(peer_grants).model_dump()
    except ValidationError as exc:
        raise InvalidPayload("the grants in the message are invalid") from exc
    updated = await set_peer_grants(db, connection["connection_id"], grants)
    if updated is None:
        raise ConnectionStateConflict("the connection is gone")
    return updated
