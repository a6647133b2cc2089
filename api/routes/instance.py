"""This instance: its public identity card, its configuration and its keys (admin)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from api.deps import AdminUser, ServicesDep
from federation.models import InstanceUpdate, KeyRotate, KeyRotated
from operations import instance

router = APIRouter(prefix="/api/v1/federation", tags=["instance"])


@router.get("/instance")
async def get_instance(services: ServicesDep) -> dict[str, Any]:
    """Public, unauthenticated: id, name, URL, public keys with validity, what it offers."""
    return await instance.card(services)


@router.patch("/instance")
async def patch_instance(
    body: InstanceUpdate, user: AdminUser, services: ServicesDep
) -> dict[str, Any]:
    """Change the name, what this instance offers (capabilities) or its metadata."""
    return await instance.update(services, user, body)


@router.post("/instance/keys/rotate")
async def rotate_keys(
    user: AdminUser, services: ServicesDep, body: KeyRotate | None = None
) -> KeyRotated:
    """A new key signs from now on; the current one verifies for the grace period, then never."""
    return await instance.rotate_keys(services, user, body)
