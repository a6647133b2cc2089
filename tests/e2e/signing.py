"""Signing as an instance would, from the test process: its private key is sealed at rest, so
open it with the instance's master key (the key file its API created in the stack's data dir)."""

from __future__ import annotations

from typing import Any

from federation.envelope import SigningKey
from federation.identity import load_identity
from federation.keystore import KeyCipher, load_cipher
from federation.settings import Settings
from federation.store.db import create_pool


def instance_cipher(inst: Any) -> KeyCipher:
    settings = Settings(instance_name=inst.name, data_dir=inst.info["dataDir"])
    return load_cipher(settings)


async def instance_key(inst: Any) -> SigningKey:
    """The key `inst` (a tests.conftest.Instance) signs with now."""
    pool = await create_pool(inst.info["databaseUrl"], max_size=1)
    try:
        return (await load_identity(pool, instance_cipher(inst))).signing_key
    finally:
        await pool.close()
