"""Grants, key validity and connection suspension as pure rules (no database, no network)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from federation.connections import suspension_change
from federation.envelope import format_timestamp, generate_signing_key
from federation.errors import (
    ConnectionStateConflict,
    FederationError,
    GrantAgentType,
    GrantCommandType,
    GrantRepository,
    GrantTimeout,
    InvalidPayload,
)
from federation.models import Grants, GrantsUpdate
from federation.trust import check_grants, lookup_key, public_keys


def spawn(**changes: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "agentId": str(uuid.uuid4()),
        "taskId": "t",
        "agentType": "worker",
        "context": {"repository": "github.com/acme/api", "instructions": ""},
        "options": {"timeout": 60, "maxRetries": 0},
    }
    for key, value in changes.items():
        if key in ("repository",):
            payload["context"][key] = value
        elif key in ("timeout",):
            payload["options"][key] = value
        else:
            payload[key] = value
    return payload


def connection(**grants: Any) -> dict[str, Any]:
    return {"grants": grants, "remote_instance_id": "peer"}


def test_an_old_grants_row_means_the_defaults() -> None:
    check_grants(connection(), "agent.spawn", spawn())
    check_grants({"grants": {"commandTypes": ["agent.spawn"]}}, "agent.spawn", spawn())
    assert Grants.model_validate({}).repositories == ["*"]


@pytest.mark.parametrize(
    ("grants", "command", "payload", "error"),
    [
        ({"commandTypes": ["agent.spawn"]}, "agent.kill", {"agentId": "x"}, GrantCommandType),
        ({"commandTypes": ["agent.status"]}, "agent.artifact", {"agentId": "x"}, GrantCommandType),
        ({"agentTypes": ["worker"]}, "agent.spawn", spawn(agentType="tester"), GrantAgentType),
        (
            {"repositories": ["github.com/acme/*"]},
            "agent.spawn",
            spawn(repository="gitlab.com/acme/api"),
            GrantRepository,
        ),
        ({"repositories": []}, "agent.spawn", spawn(), GrantRepository),
        ({"repositories": ["github.com/ACME/*"]}, "agent.spawn", spawn(), GrantRepository),
        (  # dot segments cannot lead a URL out of the allowed path
            {"repositories": ["https://github.com/acme/*"]},
            "agent.spawn",
            spawn(repository="https://github.com/acme/%2e%2e/evil/x"),
            GrantRepository,
        ),
        ({"maxTimeout": 59}, "agent.spawn", spawn(timeout=60), GrantTimeout),
        ({}, "agent.spawn", spawn(agentType="wizard"), InvalidPayload),
    ],
)
def test_each_grant_refuses_with_its_own_code(
    grants: dict[str, Any], command: str, payload: dict[str, Any], error: type[FederationError]
) -> None:
    with pytest.raises(error) as refused:
        check_grants(connection(**grants), command, payload)
    assert refused.value.status == (422 if error is InvalidPayload else 403)


def test_grants_allow_what_they_say() -> None:
    grants = connection(agentTypes=["worker"], repositories=["github.com/acme/*"], maxTimeout=60)
    check_grants(grants, "agent.spawn", spawn())
    check_grants(grants, "agent.spawn", spawn(repository=None))  # nothing to check
    check_grants(grants, "agent.status", {"agentId": "x"})
    check_grants(grants, "agent.artifact", {"agentId": "x", "kind": "diff"})


def test_the_instance_limits_apply_whatever_the_grants() -> None:
    with pytest.raises(GrantTimeout) as refused:
        check_grants(
            connection(maxTimeout=3600), "agent.spawn", spawn(timeout=600), max_timeout=300
        )
    assert refused.value.extra["limit"] == 300
    with pytest.raises(GrantAgentType):
        check_grants(connection(), "agent.spawn", spawn(), offered_agent_types=["reviewer"])


def test_grant_updates_merge_and_refuse_nulls_for_lists() -> None:
    merged = GrantsUpdate(maxTimeout=10).apply({"agentTypes": ["worker"]})
    assert merged.agentTypes == ["worker"] and merged.maxTimeout == 10
    assert (
        GrantsUpdate(maxConcurrentAgents=None).apply({"maxConcurrentAgents": 3}).maxConcurrentAgents
        is None
    )
    with pytest.raises(ValueError, match="repositories"):
        GrantsUpdate.model_validate({"repositories": None}).apply({})


def test_key_validity_is_read_from_the_card_entry() -> None:
    key = generate_signing_key().public()
    now = datetime.now(UTC)

    def entry(valid_until: datetime | None) -> dict[str, Any]:
        return {
            "keyId": key.key_id,
            "algorithm": key.algorithm.value,
            "publicKey": key.public_pem,
            "validUntil": format_timestamp(valid_until) if valid_until else None,
        }

    assert lookup_key([entry(None)], key.key_id) == (key, False)
    assert lookup_key([entry(now + timedelta(seconds=5))], key.key_id, now) == (key, False)
    assert lookup_key([entry(now - timedelta(seconds=1))], key.key_id, now) == (None, True)
    assert lookup_key([entry(None)], "other") == (None, False)
    assert public_keys([entry(now - timedelta(seconds=1))], now) == {}
    broken = {**entry(None), "algorithm": "none"}
    assert lookup_key([broken], key.key_id) == (None, False)


# --- suspension: the two sides' copies stay in step -------------------------------------


@given(st.lists(st.tuples(st.sampled_from(["a", "b"]), st.sampled_from(["suspend", "resume"]))))
def test_both_copies_agree_whatever_each_side_does(steps: list[tuple[str, str]]) -> None:
    """a and b each hold a copy; a change made by one side is applied to the other's copy as
    coming from 'remote'. Refused changes change nothing on either side."""
    copies = {
        "a": {"status": "ACTIVE", "suspended_by": None},
        "b": {"status": "ACTIVE", "suspended_by": None},
    }
    holders: set[str] = set()
    for side, action in steps:
        other = "b" if side == "a" else "a"
        try:
            mine = suspension_change(copies[side], "local", action)
        except ConnectionStateConflict:
            assert action == "resume" and side not in holders
            continue
        theirs = suspension_change(copies[other], "remote", action)
        copies[side] = {"status": mine[0], "suspended_by": mine[1]}
        copies[other] = {"status": theirs[0], "suspended_by": theirs[1]}
        (holders.add if action == "suspend" else holders.discard)(side)
        assert copies["a"]["status"] == copies["b"]["status"]
        assert (copies["a"]["status"] == "ACTIVE") == (not holders)
        flip = {"local": "remote", "remote": "local", "both": "both", None: None}
        assert flip[copies["a"]["suspended_by"]] == copies["b"]["suspended_by"]


@pytest.mark.parametrize("status", ["PENDING", "DISCONNECTED"])
def test_only_live_connections_can_be_suspended(status: str) -> None:
    with pytest.raises(ConnectionStateConflict):
        suspension_change({"status": status, "suspended_by": None}, "local", "suspend")
    with pytest.raises(ConnectionStateConflict):
        suspension_change({"status": status, "suspended_by": None}, "local", "resume")
