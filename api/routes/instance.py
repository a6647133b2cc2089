"""This instance's public identity card."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from api.deps import IdentityDep

router = APIRouter(prefix="/api/v1/federation", tags=["instance"])


@router.get("/instance")
async def get_instance(identity: IdentityDep) -> dict[str, Any]:
    """Public, unauthenticated: id, name, URL, public keys with validity, capabilities."""
    return identity.card()
