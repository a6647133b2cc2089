"""API tokens (admin): list them, make one that expires, revoke one at once."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from fastapi import APIRouter, status
from pydantic import Field

from api.deps import AdminUser, PoolDep
from federation.errors import NotFound
from federation.models import Line, Strict
from federation.store import repos, tokens

router = APIRouter(prefix="/api/v1/federation/tokens", tags=["tokens"])


class TokenCreate(Strict):
    name: Line = Field(min_length=1, max_length=200)
    role: Literal["admin", "member"] = "member"
    workspace: Line = Field(default="default", min_length=1, max_length=200)
    # Seconds until it stops working; none: until revoked.
    expiresIn: int | None = Field(default=None, ge=60, le=10 * 365 * 24 * 3600)


class TokenNotFound(NotFound):
    code = "token_not_found"
    title = "No such API token"


@router.get("")
async def list_tokens(user: AdminUser, pool: PoolDep) -> list[dict[str, Any]]:
    """Every token with its state (active, expired, revoked); never the token itself."""
    now = datetime.now(UTC)
    return [tokens.token_public(r, now) for r in await tokens.list_tokens(pool)]


@router.post("", status_code=status.HTTP_201_CREATED)
async def create_token(body: TokenCreate, user: AdminUser, pool: PoolDep) -> dict[str, Any]:
    """A new token, shown this once."""
    expires = timedelta(seconds=body.expiresIn) if body.expiresIn else None
    row, token = await tokens.create_token(
        pool, name=body.name, role=body.role, workspace=body.workspace, expires_in=expires
    )
    await repos.audit(pool, actor=user.actor, action="token.create", tokenId=str(row["id"]))
    return {**tokens.token_public(row, datetime.now(UTC)), "token": token}


@router.delete("/{token_id}")
async def revoke_token(token_id: uuid.UUID, user: AdminUser, pool: PoolDep) -> dict[str, Any]:
    """Revoke a token: every request with it is refused from now on."""
    row = await tokens.revoke_token(pool, token_id)
    if row is None:
        raise TokenNotFound(f"no token {token_id}")
    await repos.audit(pool, actor=user.actor, action="token.revoke", tokenId=str(token_id))
    return tokens.token_public(row, datetime.now(UTC))
