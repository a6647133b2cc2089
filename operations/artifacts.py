"""A run's whole artifacts on the requester (the diff, the log, later the transcript).

Results and events carry only an artifact's sha256, size and a bounded preview. The first read
fetches the artifact from the executor by signed `agent.artifact` commands, piece by piece
(each answer is bounded), checks the whole against the sha256 and size the result named, and
keeps it in this instance's artifact store; later reads come from there. Members get the
artifacts of their own workspace's agents only.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import tempfile
import uuid
from typing import Any

from federation.envelope import MessageType
from federation.errors import (
    ArtifactMismatch,
    ArtifactNotReady,
    ArtifactTooLarge,
    ArtifactUnavailable,
    LocalConnectionNotActive,
    PeerRefused,
)
from federation.peer import PeerLink
from federation.states import ConnectionStatus
from federation.store import artifacts, repos
from federation.users import User
from operations import Services
from operations import agents as agent_ops

# One fetch of an artifact at a time in this process; the others wait and read the store.
_fetching: dict[tuple[uuid.UUID, str], asyncio.Lock] = {}


def artifact_reference(result: dict[str, Any] | None, kind: str) -> tuple[str, int] | None:
    """(sha256, bytes) of the run's artifact of this kind, as its result names it."""
    result = result or {}
    ref = (result.get("artifacts") or {}).get(kind)
    if isinstance(ref, dict) and ref.get("sha256"):
        return str(ref["sha256"]), int(ref.get("bytes") or 0)
    if kind == "diff" and result.get("diffSha256"):
        return str(result["diffSha256"]), int(result.get("diffBytes") or 0)
    return None


async def ensure_artifact(
    services: Services,
    row: dict[str, Any],
    kind: str,
) -> artifacts.Artifact:
    """The run's artifact from this instance's store, fetched once from the executor."""
    ref = artifact_reference(row.get("result"), kind)
    if ref is None or not artifacts.SHA256.match(ref[0]):
        raise ArtifactNotReady(
            f"agent {row['agent_id']} ({row['state']}) has no {kind} yet",
            kind=kind,
            state=row["state"],
        )
    sha256, size = ref
    key = (row["agent_id"], kind)
    lock = _fetching.setdefault(key, asyncio.Lock())
    try:
        async with lock:
            return await _local_or_fetched(services, row, kind, sha256, size)
    finally:
        if not lock.locked():
            _fetching.pop(key, None)


async def _local_or_fetched(
    services: Services,
    row: dict[str, Any],
    kind: str,
    sha256: str,
    size: int,
) -> artifacts.Artifact:
    pool = services.pool
    local = await artifacts.of_agent(
        pool,
        role=row["role"],  # a local run's (role executor) are the ones its run stored
        peer_instance_id=row["peer_instance_id"],
        agent_id=row["agent_id"],
        kind=kind,
        sha256=sha256,
    )
    if local is not None:
        return local
    if row["role"] == "executor":
        raise ArtifactNotReady(
            f"agent {row['agent_id']} ({row['state']}) has no {kind} stored",
            kind=kind,
            state=row["state"],
        )
    # Fetched even when the same bytes are stored for another run: the executor must prove it
    # has them (a hash alone must not let one run's user read another run's artifact).
    stored = await _fetch(services, row, kind, sha256, size)
    await artifacts.link(
        pool,
        role="requester",
        peer_instance_id=row["peer_instance_id"],
        agent_id=row["agent_id"],
        kind=kind,
        artifact=stored,
    )
    return stored


async def _fetch(
    services: Services,
    row: dict[str, Any],
    kind: str,
    sha256: str,
    size: int,
) -> artifacts.Artifact:
    pool, http, settings = services.pool, services.http, services.settings
    identity = await services.identity()
    if size > settings.artifact_max_bytes:
        raise ArtifactTooLarge(
            f"the {kind} has {size} bytes; this instance keeps at most"
            f" {settings.artifact_max_bytes}",
            bytes=size,
            limit=settings.artifact_max_bytes,
        )
    connection = await _active_connection(pool, row, kind)
    if connection["kind"] == "a2a":
        raise ArtifactUnavailable(
            f"the {kind} of a run on an A2A agent is kept as read at the run's end; none is"
            " kept here",
            peerCode="peer_speaks_a2a",
            peerStatus=0,
        )
    link = PeerLink.of(connection, http=http, identity=identity, settings=settings)
    digest = hashlib.sha256()
    offset = 0
    with tempfile.SpooledTemporaryFile(max_size=8 * 1024 * 1024) as spool:
        while offset < size:
            try:
                envelope, reply = await link.send(
                    MessageType.COMMAND,
                    "agent.artifact",
                    {
                        "agentId": str(row["agent_id"]),
                        "kind": kind,
                        "sha256": sha256,
                        "offset": offset,
                        "length": settings.artifact_chunk_bytes,
                    },
                )
            except PeerRefused as err:
                raise ArtifactUnavailable(
                    f"the executor did not give the {kind}: {err.peer_code}",
                    peerCode=err.peer_code,
                    peerStatus=err.peer_status,
                ) from err
            await repos.record_message(
                pool, envelope.to_wire(), direction="out", agent_id=row["agent_id"]
            )
            data = _piece(reply, kind, sha256, size, offset)
            digest.update(data)
            spool.write(data)
            offset += len(data)
        if digest.hexdigest() != sha256:
            raise ArtifactMismatch(f"the {kind} fetched does not hash to {sha256}")
        return await artifacts.put_file(
            pool,
            spool,  # type: ignore[arg-type]
            max_bytes=settings.artifact_max_bytes,
            chunk_bytes=settings.artifact_chunk_bytes,
        )


async def _active_connection(pool: Any, row: dict[str, Any], kind: str) -> dict[str, Any]:
    connection = await repos.get_connection(pool, row["connection_id"])
    if connection is None or connection["status"] != ConnectionStatus.ACTIVE:
        status = connection["status"] if connection else "gone"
        raise LocalConnectionNotActive(
            f"the connection with the executor is {status}; fetching the {kind} needs ACTIVE"
        )
    return connection


def _piece(reply: dict[str, Any], kind: str, sha256: str, size: int, offset: int) -> bytes:
    """The bytes of one piece the executor sent, if it is of this very artifact and in order."""
    if reply.get("sha256") != sha256 or reply.get("bytes") != size:
        raise ArtifactMismatch(
            f"the executor's {kind} is not the one the result names"
            f" ({reply.get('sha256')!r}, {reply.get('bytes')!r} bytes)"
        )
    try:
        data = base64.b64decode(str(reply.get("data") or ""), validate=True)
    except ValueError as exc:
        raise ArtifactMismatch(f"the executor's {kind} piece is not base64") from exc
    if reply.get("offset") != offset or not data or offset + len(data) > size:
        raise ArtifactMismatch(f"the executor's {kind} piece at {offset} is not in order")
    return data


async def of_agent(
    services: Services, user: User, agent_id: uuid.UUID, kind: str
) -> artifacts.Artifact:
    """The artifact of this kind of an agent the user may see, fetched once from the executor."""
    row = await agent_ops.get(services, user, agent_id)
    return await ensure_artifact(services, row, kind)


async def small(
    services: Services, user: User, agent_id: uuid.UUID, kind: str, max_bytes: int
) -> bytes | None:
    """The whole artifact when it has at most `max_bytes` (None: larger, read it by URI)."""
    row = await agent_ops.get(services, user, agent_id)
    ref = artifact_reference(row.get("result"), kind)
    if ref is None or ref[1] > max_bytes:
        return None
    artifact = await ensure_artifact(services, row, kind)
    return await artifacts.read_range(services.pool, artifact, 0, artifact.bytes)
