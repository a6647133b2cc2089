"""API tokens that expire and can be revoked (the token itself is stored only as a hash)."""

from __future__ import annotations

import secrets
import uuid
from datetime import datetime, timedelta
from typing import Any

from federation.store.db import row_dict
from federation.store.repos import Executor, hash_token

COLUMNS = "id, name, role, workspace, created_at, expires_at, revoked_at, last_used_at"


async def create_token(
    db: Executor,
    *,
    name: str,
    role: str,
    workspace: str = "default",
    expires_in: timedelta | None = None,
) -> tuple[dict[str, Any], str]:
    """A new token (shown once) and its row; `expires_in` None: valid until revoked."""
    token = "fa_" + secrets.token_urlsafe(32)
    row = await db.fetchrow(
        "INSERT INTO api_tokens (token_hash, name, role, workspace, expires_at)"
        " VALUES ($1, $2, $3, $4, now() + $5::interval) RETURNING " + COLUMNS,
        hash_token(token),
        name,
        role,
        workspace,
        expires_in,
    )
    assert row is not None
    return dict(row), token


async def list_tokens(db: Executor) -> list[dict[str, Any]]:
    return [
        dict(r) for r in await db.fetch(f"SELECT {COLUMNS} FROM api_tokens ORDER BY created_at")
    ]


async def revoke_token(db: Executor, token_id: uuid.UUID) -> dict[str, Any] | None:
    """Revoke a token at once (a second revoke keeps the first time); None if unknown."""
    return row_dict(
        await db.fetchrow(
            "UPDATE api_tokens SET revoked_at = COALESCE(revoked_at, now()) WHERE id = $1"
            f" RETURNING {COLUMNS}",
            token_id,
        )
    )


def token_public(row: dict[str, Any], now: datetime | None = None) -> dict[str, Any]:
    expires: datetime | None = row["expires_at"]
    state = "active"
    if row["revoked_at"] is not None:
        state = "revoked"
    elif expires is not None and now is not None and expires <= now:
        state = "expired"
    return {
        "id": str(row["id"]),
        "name": row["name"],
        "role": row["role"],
        "workspace": row["workspace"],
        "state": state,
        "createdAt": row["created_at"].isoformat(),
        "expiresAt": expires.isoformat() if expires else None,
        "revokedAt": row["revoked_at"].isoformat() if row["revoked_at"] else None,
    }
