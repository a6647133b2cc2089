"""This instance's identity: id, name, URL and keypair, created on first start.

The identity card (`GET /api/v1/federation/instance`) publishes only public keys.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from federation.envelope import Algorithm, PublicKey, SigningKey, generate_signing_key

CAPABILITIES: dict[str, Any] = {
    "protocol": "fedagent/1",
    "agentTypes": ["worker", "reviewer", "tester"],
    "commandTypes": ["agent.spawn", "agent.status", "agent.kill"],
    "sandboxes": ["process"],
    "modelProviders": ["scripted"],
}


@dataclass(frozen=True)
class Identity:
    instance_id: str
    name: str
    public_url: str
    signing_key: SigningKey
    verify_keys: tuple[tuple[PublicKey, datetime | None], ...]

    def card(self) -> dict[str, Any]:
        return {
            "instanceId": self.instance_id,
            "name": self.name,
            "url": self.public_url,
            "protocol": "fedagent/1",
            "keys": [
                {
                    "keyId": key.key_id,
                    "algorithm": key.algorithm.value,
                    "publicKey": key.public_pem,
                    "validUntil": valid_until.isoformat() if valid_until else None,
                }
                for key, valid_until in self.verify_keys
            ],
            "capabilities": CAPABILITIES,
        }


async def ensure_identity(pool: asyncpg.Pool, *, name: str, public_url: str) -> Identity:
    """Create the instance row and its first key if missing; keep name and URL current."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("LOCK TABLE instance IN EXCLUSIVE MODE")
        row = await conn.fetchrow("SELECT instance_id FROM instance")
        if row is None:
            await conn.execute(
                "INSERT INTO instance (instance_id, name, public_url) VALUES ($1, $2, $3)",
                str(uuid.uuid4()),
                name,
                public_url,
            )
            key = generate_signing_key(Algorithm.ED25519)
            pub = key.public()
            await conn.execute(
                "INSERT INTO instance_keys (key_id, algorithm, public_pem, private_pem)"
                " VALUES ($1, $2, $3, $4)",
                key.key_id,
                key.algorithm.value,
                pub.public_pem,
                key.private_pem,
            )
        else:
            await conn.execute("UPDATE instance SET name = $1, public_url = $2", name, public_url)
    return await load_identity(pool)


async def load_identity(pool: asyncpg.Pool | asyncpg.Connection) -> Identity:
    inst = await pool.fetchrow("SELECT instance_id, name, public_url FROM instance")
    if inst is None:
        raise RuntimeError("instance identity is missing: run migrations and ensure_identity first")
    keys = await pool.fetch(
        "SELECT key_id, algorithm, public_pem, private_pem, retired_at, valid_until"
        " FROM instance_keys WHERE valid_until IS NULL OR valid_until > now()"
        " ORDER BY created_at"
    )
    active = [k for k in keys if k["retired_at"] is None]
    if not active:
        raise RuntimeError("instance has no active signing key")
    current = active[-1]
    return Identity(
        instance_id=inst["instance_id"],
        name=inst["name"],
        public_url=inst["public_url"],
        signing_key=SigningKey(
            current["key_id"], Algorithm(current["algorithm"]), current["private_pem"]
        ),
        verify_keys=tuple(
            (PublicKey(k["key_id"], Algorithm(k["algorithm"]), k["public_pem"]), k["valid_until"])
            for k in keys
        ),
    )
