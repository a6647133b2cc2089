"""This instance's identity: id, name, URL, capabilities and keys.

Private keys live in the store sealed under the master key (see `federation.keystore`) and are
opened only when something is signed. The identity card (`GET /api/v1/federation/instance`)
publishes the public keys that verify now, each with its validity: a rotated-out key stays
listed (and valid) until its grace period ends.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from federation import keystore
from federation.envelope import (
    PROTOCOL,
    Algorithm,
    PublicKey,
    SigningKey,
    endorse,
    format_timestamp,
    generate_signing_key,
)
from federation.keystore import KeyCipher, KeystoreError

# What an instance offers unless its admin says otherwise (PATCH /instance).
DEFAULT_CAPABILITIES: dict[str, Any] = {
    "agentTypes": ["worker", "reviewer", "tester"],
    "commandTypes": ["agent.spawn", "agent.status", "agent.kill", "agent.artifact"],
    "sandboxes": ["process"],
    "modelProviders": ["scripted"],
}
# Kept for importers of the walking skeleton.
CAPABILITIES = {"protocol": PROTOCOL, **DEFAULT_CAPABILITIES}


@dataclass(frozen=True)
class KeyRecord:
    """One key of this instance as published: public half and validity."""

    key_id: str
    algorithm: Algorithm
    public_pem: str
    created_at: datetime
    retired_at: datetime | None
    valid_until: datetime | None
    # {"keyId", "signature"}: the key this one replaced signed it (federation.envelope.endorse),
    # so that peers which trust the old key accept this one. None for a first key.
    endorsement: dict[str, str] | None = None

    @property
    def signs(self) -> bool:
        return self.retired_at is None

    def public(self) -> PublicKey:
        return PublicKey(self.key_id, self.algorithm, self.public_pem)

    def card_entry(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "keyId": self.key_id,
            "algorithm": self.algorithm.value,
            "publicKey": self.public_pem,
            "status": "active" if self.signs else "retiring",
            "validFrom": format_timestamp(self.created_at),
            "validUntil": format_timestamp(self.valid_until) if self.valid_until else None,
        }
        if self.endorsement is not None:
            entry["endorsement"] = dict(self.endorsement)
        return entry


@dataclass(frozen=True)
class Identity:
    instance_id: str
    name: str
    public_url: str
    keys: tuple[KeyRecord, ...]
    capabilities: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    # The signing key's private half as stored: sealed, or (before the first API start
    # sealed it) plain. Opened only in `signing_key`.
    _private: tuple[str, str] | None = field(default=None, repr=False, compare=False)
    _cipher: KeyCipher | None = field(default=None, repr=False, compare=False)

    @property
    def signing_record(self) -> KeyRecord:
        active = [k for k in self.keys if k.signs]
        if not active:
            raise KeystoreError("instance has no signing key yet: start its API once")
        return active[-1]

    @property
    def signing_key(self) -> SigningKey:
        record = self.signing_record
        if self._private is None:
            raise KeystoreError(f"the private half of key {record.key_id} is not available")
        form, value = self._private
        if form == "plain":
            pem = value
        else:
            cipher = self._cipher or keystore.default_cipher()
            pem = cipher.open(value, key_id=record.key_id).decode()
        return SigningKey(record.key_id, record.algorithm, pem)

    def card(
        self, limits: dict[str, Any] | None = None, configured: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """`configured`: capabilities the settings fix (sandbox, model provider); they win over
        what is stored, so the card never offers what the instance does not run."""
        return {
            "instanceId": self.instance_id,
            "name": self.name,
            "url": self.public_url,
            "protocol": PROTOCOL,
            "keys": [k.card_entry() for k in self.keys],
            "capabilities": {"protocol": PROTOCOL, **self.capabilities, **(configured or {})},
            "limits": limits or {},
            "metadata": self.metadata,
        }


def effective_capabilities(stored: dict[str, Any] | None) -> dict[str, Any]:
    return {**DEFAULT_CAPABILITIES, **(stored or {})}


async def _insert_key(
    conn: asyncpg.Connection,
    cipher: KeyCipher,
    algorithm: Algorithm = Algorithm.ED25519,
    endorsed_by: SigningKey | None = None,
) -> tuple[SigningKey, dict[str, str] | None]:
    key = generate_signing_key(algorithm)
    endorsement = None
    if endorsed_by is not None:
        instance_id = await conn.fetchval("SELECT instance_id FROM instance")
        endorsement = endorse(endorsed_by, instance_id, key.public())
    await conn.execute(
        "INSERT INTO instance_keys (key_id, algorithm, public_pem, private_sealed, endorsement)"
        " VALUES ($1, $2, $3, $4, $5)",
        key.key_id,
        key.algorithm.value,
        key.public().public_pem,
        cipher.seal(key.private_pem.encode(), key_id=key.key_id),
        endorsement,
    )
    return key, endorsement


async def _current_signing_key(conn: asyncpg.Connection, cipher: KeyCipher) -> SigningKey | None:
    """The key that signs now, opened (None if there is none, or its private half is gone)."""
    row = await conn.fetchrow(
        "SELECT key_id, algorithm, private_pem, private_sealed FROM instance_keys"
        " WHERE retired_at IS NULL ORDER BY created_at DESC, key_id DESC LIMIT 1"
    )
    if row is None or (row["private_sealed"] is None and row["private_pem"] is None):
        return None
    if row["private_sealed"] is not None:
        pem = cipher.open(row["private_sealed"], key_id=row["key_id"]).decode()
    else:
        pem = row["private_pem"]
    return SigningKey(row["key_id"], Algorithm(row["algorithm"]), pem)


async def _seal_plaintext_keys(conn: asyncpg.Connection, cipher: KeyCipher) -> int:
    rows = await conn.fetch(
        "SELECT key_id, private_pem FROM instance_keys WHERE private_pem IS NOT NULL"
    )
    for row in rows:
        await conn.execute(
            "UPDATE instance_keys SET private_sealed = $2, private_pem = NULL WHERE key_id = $1",
            row["key_id"],
            cipher.seal(row["private_pem"].encode(), key_id=row["key_id"]),
        )
    return len(rows)


async def _instance_row_or_create(
    conn: asyncpg.Connection, *, name: str, public_url: str
) -> asyncpg.Record | None:
    """The instance row's configured name and URL, locked for the transaction; None when there
    was none and one was created with these."""
    await conn.execute("LOCK TABLE instance IN EXCLUSIVE MODE")
    row: asyncpg.Record | None = await conn.fetchrow(
        "SELECT configured_name, public_url FROM instance"
    )
    if row is None:
        await conn.execute(
            "INSERT INTO instance (instance_id, name, configured_name, public_url)"
            " VALUES ($1, $2, $2, $3)",
            str(uuid.uuid4()),
            name,
            public_url,
        )
    return row


class IdentityConflict(RuntimeError):
    """This process's FEDAGENT_INSTANCE_NAME or FEDAGENT_PUBLIC_URL contradicts the identity
    the instance's database holds: the process refuses to start instead of rewriting it."""


async def ensure_identity(
    pool: asyncpg.Pool, *, name: str, public_url: str, cipher: KeyCipher | None = None
) -> Identity:
    """Create the instance row on the first start; on a later one, check that this process's
    settings say the same name and URL as the row (`IdentityConflict` otherwise: one
    misconfigured process of many must not rewrite the instance's identity card; an admin
    changes it with `adopt_identity`).

    With the master key (`cipher`), also check that it opens the signing key (`KeystoreError`
    otherwise: a process on a host without the instance's master key would fail every signed
    send), seal any private key still stored in plain form (from before keys were sealed) and
    create the first signing key. A process without it (the dev stack preparing a database)
    leaves key creation to the instance's own processes.
    """
    async with pool.acquire() as conn, conn.transaction():
        row = await _instance_row_or_create(conn, name=name, public_url=public_url)
        if row is not None:
            _check_same_identity(row, name=name, public_url=public_url)
        if cipher is not None:
            await _check_keys_open(conn, cipher)
            await _seal_plaintext_keys(conn, cipher)
            signing = await conn.fetchval(
                "SELECT count(*) FROM instance_keys WHERE retired_at IS NULL"
            )
            if not signing:
                await _insert_key(conn, cipher)  # a first key: trusted as the card shows it
    return await load_identity(pool, cipher)


def _check_same_identity(row: asyncpg.Record, *, name: str, public_url: str) -> None:
    wrong = [
        f"{setting} is {mine!r} but the instance's database says {stored!r}"
        for setting, mine, stored in (
            ("FEDAGENT_INSTANCE_NAME", name, row["configured_name"]),
            ("FEDAGENT_PUBLIC_URL", public_url, row["public_url"]),
        )
        if mine != stored
    ]
    if wrong:
        raise IdentityConflict(
            "this process's settings contradict the instance's identity: "
            + "; ".join(wrong)
            + ". Give every process of the instance the same settings; to change the "
            "identity on purpose, run `fedagent set-identity` with the new settings once, "
            "then restart every process with them"
        )


async def _check_keys_open(conn: asyncpg.Connection, cipher: KeyCipher) -> None:
    """The signing key opens with this process's master key (if there is one sealed)."""
    try:
        await _current_signing_key(conn, cipher)
    except KeystoreError as exc:
        raise KeystoreError(
            f"this process cannot open the instance's keys: {exc}. Every process of an "
            "instance, on every host, needs the instance's master key: set "
            "FEDAGENT_SECRET_KEY to it (a key file in one host's data dir is not seen by "
            "another host)"
        ) from None


async def adopt_identity(pool: asyncpg.Pool, *, name: str, public_url: str) -> dict[str, str]:
    """The admin's explicit change of the instance's configured name and public URL (the
    settings given); returns the values it replaced. Peers learn the new URL from the card."""
    async with pool.acquire() as conn, conn.transaction():
        row = await _instance_row_or_create(conn, name=name, public_url=public_url)
        if row is None:
            return {}
        await conn.execute(
            "UPDATE instance SET name = CASE WHEN configured_name = $1 THEN name ELSE $1 END,"
            " configured_name = $1, public_url = $2, updated_at = now()",
            name,
            public_url,
        )
    return {"name": row["configured_name"], "publicUrl": row["public_url"]}


async def load_identity(
    db: asyncpg.Pool | asyncpg.Connection, cipher: KeyCipher | None = None
) -> Identity:
    """The identity as stored now; the private key is opened only when something is signed."""
    inst = await db.fetchrow(
        "SELECT instance_id, name, public_url, capabilities, metadata FROM instance"
    )
    if inst is None:
        raise RuntimeError("instance identity is missing: run migrations and ensure_identity first")
    rows = await db.fetch(
        "SELECT key_id, algorithm, public_pem, private_pem, private_sealed, created_at,"
        " retired_at, valid_until, endorsement FROM instance_keys"
        " WHERE valid_until IS NULL OR valid_until > now() ORDER BY created_at, key_id"
    )
    keys = tuple(
        KeyRecord(
            key_id=r["key_id"],
            algorithm=Algorithm(r["algorithm"]),
            public_pem=r["public_pem"],
            created_at=r["created_at"],
            retired_at=r["retired_at"],
            valid_until=r["valid_until"],
            endorsement=r["endorsement"],
        )
        for r in rows
    )
    private: tuple[str, str] | None = None
    signing = [r for r in rows if r["retired_at"] is None]
    if signing:
        last = signing[-1]
        if last["private_sealed"] is not None:
            private = ("sealed", last["private_sealed"])
        elif last["private_pem"] is not None:
            private = ("plain", last["private_pem"])
    return Identity(
        instance_id=inst["instance_id"],
        name=inst["name"],
        public_url=inst["public_url"],
        keys=keys,
        capabilities=effective_capabilities(inst["capabilities"]),
        metadata=dict(inst["metadata"] or {}),
        _private=private,
        _cipher=cipher,
    )


@dataclass(frozen=True)
class Rotation:
    new_key: KeyRecord
    retired: tuple[tuple[str, datetime], ...]


async def rotate_key(
    pool: asyncpg.Pool,
    cipher: KeyCipher,
    *,
    grace_seconds: int,
    algorithm: Algorithm = Algorithm.ED25519,
) -> Rotation:
    """A new key signs from now on; the old ones verify until now + grace, then never again.

    The key that signed until now endorses the new one (peers accept a key change only when a
    key they trust signed it); then the old keys' private halves are erased: a retired key
    never signs again.
    """
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("LOCK TABLE instance IN EXCLUSIVE MODE")
        previous = await _current_signing_key(conn, cipher)
        now = datetime.now(UTC)
        until = now + timedelta(seconds=grace_seconds)
        # Whole milliseconds: the card publishes validity at that precision.
        until = until.replace(microsecond=until.microsecond // 1000 * 1000)
        retired = await conn.fetch(
            "UPDATE instance_keys SET retired_at = $1, private_pem = NULL,"
            " private_sealed = NULL, valid_until = LEAST(COALESCE(valid_until, $2), $2)"
            " WHERE retired_at IS NULL RETURNING key_id, valid_until",
            now,
            until,
        )
        key, endorsement = await _insert_key(conn, cipher, algorithm, endorsed_by=previous)
        created = await conn.fetchval(
            "SELECT created_at FROM instance_keys WHERE key_id = $1", key.key_id
        )
    return Rotation(
        new_key=KeyRecord(
            key.key_id, key.algorithm, key.public().public_pem, created, None, None, endorsement
        ),
        retired=tuple((r["key_id"], r["valid_until"]) for r in retired),
    )


async def update_instance(
    pool: asyncpg.Pool,
    *,
    name: str | None = None,
    capabilities: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Change what an admin may change; returns the previous values of what changed."""
    async with pool.acquire() as conn, conn.transaction():
        before = await conn.fetchrow("SELECT name, capabilities, metadata FROM instance FOR UPDATE")
        assert before is not None
        merged_caps = {**(before["capabilities"] or {}), **(capabilities or {})}
        await conn.execute(
            "UPDATE instance SET name = COALESCE($1, name), capabilities = $2,"
            " metadata = COALESCE($3, metadata), updated_at = now()",
            name,
            merged_caps,
            metadata,
        )
    previous: dict[str, Any] = {}
    if name is not None:
        previous["name"] = before["name"]
    if capabilities is not None:
        previous["capabilities"] = effective_capabilities(before["capabilities"])
    if metadata is not None:
        previous["metadata"] = before["metadata"]
    return previous
