"""The artifact store: a run's whole diff, whole log (later its transcript), by sha256.

Artifacts are immutable and content-addressed: the sha256 of the bytes is the key, so storing
the same bytes twice keeps one copy, and a reader checks what it got against the key. The
bytes live in PostgreSQL in chunks of `chunk_bytes` (bytea rows), written in one transaction,
so an artifact is either whole or absent. `agent_artifacts` says which artifact is which kind
(`diff`, `log`, `transcript`) of which run, on the executor (role `executor`, peer = the
requester) and on the requester (role `requester`, peer = the executor).

Nothing here holds a transaction while it waits for anything but PostgreSQL, and no file is
read or hashed on the event loop (an artifact may be 128 MiB: hashing it there would stall
the worker's heartbeats past their timeout and have Temporal start a second attempt).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import asyncpg

from federation.errors import ArtifactTooLarge

KINDS = ("diff", "log", "transcript")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
DEFAULT_CHUNK = 256 * 1024
READ_BLOCK = 1024 * 1024


@dataclass(frozen=True)
class Artifact:
    sha256: str
    bytes: int
    chunk_bytes: int

    def reference(self) -> dict[str, Any]:
        """What workflows, events and results carry instead of the bytes."""
        return {"sha256": self.sha256, "bytes": self.bytes}


def _check_sha(sha256: str) -> str:
    if not SHA256.match(sha256):
        raise ValueError(f"not a sha256: {sha256!r}")
    return sha256


def _hash_file(handle: BinaryIO) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    handle.seek(0)
    while block := handle.read(READ_BLOCK):
        digest.update(block)
        size += len(block)
    return digest.hexdigest(), size


def _read_into(handle: BinaryIO, size: int, digest: Any) -> bytes:
    """The next block of the file, added to the running digest (in a worker thread)."""
    block = handle.read(size)
    digest.update(block)
    return block


async def get(db: Any, sha256: str) -> Artifact | None:
    row = await db.fetchrow(
        "SELECT sha256, bytes, chunk_bytes FROM artifacts WHERE sha256 = $1", _check_sha(sha256)
    )
    return Artifact(row["sha256"], row["bytes"], row["chunk_bytes"]) if row else None


async def _stored_again(db: Any, sha256: str) -> Artifact | None:
    """The content if it is stored, its `created_at` made now: retention deletes content no run
    refers to only after a grace period, and this content is about to be linked to a run."""
    row = await db.fetchrow(
        "UPDATE artifacts SET created_at = now() WHERE sha256 = $1"
        " RETURNING sha256, bytes, chunk_bytes",
        _check_sha(sha256),
    )
    return Artifact(row["sha256"], row["bytes"], row["chunk_bytes"]) if row else None


async def put_file(
    pool: asyncpg.Pool,
    handle: BinaryIO,
    *,
    max_bytes: int,
    chunk_bytes: int = DEFAULT_CHUNK,
) -> Artifact:
    """Store the bytes of an open binary file (read from its start); returns its reference.

    The file is hashed first, so bytes already stored are not written again.
    """
    sha256, size = await asyncio.to_thread(_hash_file, handle)
    if size > max_bytes:
        raise ArtifactTooLarge(
            f"artifact of {size} bytes is above the {max_bytes} bytes kept here",
            bytes=size,
            limit=max_bytes,
        )
    known = await _stored_again(pool, sha256)
    if known is not None:
        return known
    async with pool.acquire() as conn, conn.transaction():
        inserted = await conn.fetchval(
            "INSERT INTO artifacts (sha256, bytes, chunk_bytes) VALUES ($1, $2, $3)"
            " ON CONFLICT DO NOTHING RETURNING sha256",
            sha256,
            size,
            chunk_bytes,
        )
        if inserted is None:  # another writer stored the same bytes meanwhile
            stored = await _stored_again(conn, sha256)
            assert stored is not None
            return stored
        handle.seek(0)
        digest = hashlib.sha256()
        index = 0
        while block := await asyncio.to_thread(_read_into, handle, chunk_bytes, digest):
            await conn.execute(
                "INSERT INTO artifact_chunks (sha256, idx, data) VALUES ($1, $2, $3)",
                sha256,
                index,
                block,
            )
            index += 1
        if digest.hexdigest() != sha256:  # the file changed under us: keep nothing
            raise RuntimeError("the artifact's file changed while it was stored")
    return Artifact(sha256, size, chunk_bytes)


async def put_path(
    pool: asyncpg.Pool, path: Path, *, max_bytes: int, chunk_bytes: int = DEFAULT_CHUNK
) -> Artifact:
    with open(path, "rb") as handle:
        return await put_file(pool, handle, max_bytes=max_bytes, chunk_bytes=chunk_bytes)


async def put_bytes(
    pool: asyncpg.Pool, data: bytes, *, max_bytes: int, chunk_bytes: int = DEFAULT_CHUNK
) -> Artifact:
    return await put_file(pool, io.BytesIO(data), max_bytes=max_bytes, chunk_bytes=chunk_bytes)


async def read_range(db: Any, artifact: Artifact, offset: int, length: int) -> bytes:
    """Bytes [offset, offset + length) of a stored artifact (shorter at its end)."""
    if offset < 0 or length < 0:
        raise ValueError("offset and length must not be negative")
    end = min(artifact.bytes, offset + length)
    if offset >= end:
        return b""
    first = offset // artifact.chunk_bytes
    last = (end - 1) // artifact.chunk_bytes
    rows = await db.fetch(
        "SELECT idx, data FROM artifact_chunks WHERE sha256 = $1 AND idx BETWEEN $2 AND $3"
        " ORDER BY idx",
        artifact.sha256,
        first,
        last,
    )
    data = b"".join(bytes(r["data"]) for r in rows)
    start = offset - first * artifact.chunk_bytes
    return data[start : start + (end - offset)]


async def iter_chunks(pool: asyncpg.Pool, artifact: Artifact) -> AsyncIterator[bytes]:
    """The artifact's bytes chunk by chunk, one short query each (no transaction held)."""
    count = -(-artifact.bytes // artifact.chunk_bytes)
    for index in range(count):
        data = await pool.fetchval(
            "SELECT data FROM artifact_chunks WHERE sha256 = $1 AND idx = $2",
            artifact.sha256,
            index,
        )
        if data is None:
            raise RuntimeError(f"chunk {index} of artifact {artifact.sha256} is missing")
        yield bytes(data)


async def read_all(pool: asyncpg.Pool, artifact: Artifact) -> bytes:
    return b"".join([chunk async for chunk in iter_chunks(pool, artifact)])


# --- which artifact belongs to which run ----------------------------------------------------


async def link(
    db: Any,
    *,
    role: str,
    peer_instance_id: str,
    agent_id: uuid.UUID,
    kind: str,
    artifact: Artifact,
) -> None:
    await db.execute(
        "INSERT INTO agent_artifacts (role, peer_instance_id, agent_id, kind, sha256, bytes)"
        " VALUES ($1, $2, $3, $4, $5, $6)"
        " ON CONFLICT (role, peer_instance_id, agent_id, kind)"
        " DO UPDATE SET sha256 = EXCLUDED.sha256, bytes = EXCLUDED.bytes, created_at = now()",
        role,
        peer_instance_id,
        agent_id,
        kind,
        artifact.sha256,
        artifact.bytes,
    )


async def of_agent(
    db: Any,
    *,
    role: str,
    peer_instance_id: str,
    agent_id: uuid.UUID,
    kind: str | None = None,
    sha256: str | None = None,
) -> Artifact | None:
    """The run's artifact of that kind (or with that sha256), if this instance holds it."""
    if sha256 is not None:
        _check_sha(sha256)
    row = await db.fetchrow(
        "SELECT a.sha256, a.bytes, a.chunk_bytes FROM agent_artifacts l"
        " JOIN artifacts a ON a.sha256 = l.sha256"
        " WHERE l.role = $1 AND l.peer_instance_id = $2 AND l.agent_id = $3"
        " AND ($4::text IS NULL OR l.kind = $4) AND ($5::text IS NULL OR l.sha256 = $5)"
        " ORDER BY l.created_at DESC LIMIT 1",
        role,
        peer_instance_id,
        agent_id,
        kind,
        sha256,
    )
    return Artifact(row["sha256"], row["bytes"], row["chunk_bytes"]) if row else None
