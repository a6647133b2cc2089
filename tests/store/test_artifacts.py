"""The artifact store on a real PostgreSQL: whole, by range, once per content, bounded."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import asyncpg
import pytest

from cli.devstack import DevStack
from federation.errors import ArtifactTooLarge
from federation.store import artifacts

if TYPE_CHECKING:
    from tests.store.conftest import NewDatabase

CHUNK = 64 * 1024


@pytest.fixture(scope="module")
async def pool(stack: DevStack, new_database: NewDatabase) -> AsyncIterator[asyncpg.Pool]:
    # The stack's real PostgreSQL; this module gets a database of its own.
    async with new_database(stack._pg, "artifacts") as pool:
        yield pool


async def test_stored_bytes_come_back_whole_and_by_range(pool: asyncpg.Pool) -> None:
    data = os.urandom(5 * CHUNK + 123)
    stored = await artifacts.put_bytes(pool, data, max_bytes=10 * CHUNK, chunk_bytes=CHUNK)
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert stored.bytes == len(data)
    assert await artifacts.get(pool, stored.sha256) == stored
    assert await artifacts.read_all(pool, stored) == data
    # ranges across chunk borders, at the end and past it
    for offset, length in [(0, 10), (CHUNK - 5, 10), (CHUNK, 3 * CHUNK), (len(data) - 7, 100)]:
        assert (
            await artifacts.read_range(pool, stored, offset, length)
            == data[offset : offset + length]
        )
    assert await artifacts.read_range(pool, stored, len(data), 10) == b""


async def test_the_same_bytes_are_kept_once(pool: asyncpg.Pool) -> None:
    data = os.urandom(3 * CHUNK)
    first = await artifacts.put_bytes(pool, data, max_bytes=10 * CHUNK, chunk_bytes=CHUNK)
    again = await artifacts.put_bytes(pool, data, max_bytes=10 * CHUNK, chunk_bytes=CHUNK)
    assert again == first
    chunks = await pool.fetchval(
        "SELECT count(*) FROM artifact_chunks WHERE sha256 = $1", first.sha256
    )
    assert chunks == 3


async def test_an_artifact_over_the_limit_is_refused_and_nothing_is_kept(
    pool: asyncpg.Pool,
) -> None:
    data = os.urandom(2 * CHUNK + 1)
    with pytest.raises(ArtifactTooLarge) as refused:
        await artifacts.put_bytes(pool, data, max_bytes=2 * CHUNK, chunk_bytes=CHUNK)
    assert refused.value.code == "artifact_too_large"
    assert await artifacts.get(pool, hashlib.sha256(data).hexdigest()) is None


async def test_a_run_names_its_artifacts_by_kind_and_other_runs_do_not_see_them(
    pool: asyncpg.Pool,
) -> None:
    agent = uuid.uuid4()
    diff = await artifacts.put_bytes(pool, b"diff --git a/x b/x\n", max_bytes=CHUNK)
    log = await artifacts.put_bytes(pool, b"$ echo hi\nhi\n", max_bytes=CHUNK)
    for kind, artifact in (("diff", diff), ("log", log)):
        await artifacts.link(
            pool,
            role="executor",
            peer_instance_id="hub",
            agent_id=agent,
            kind=kind,
            artifact=artifact,
        )
    mine = {"role": "executor", "peer_instance_id": "hub", "agent_id": agent}
    assert await artifacts.of_agent(pool, **mine, kind="diff") == diff
    assert await artifacts.of_agent(pool, **mine, kind="log") == log
    assert await artifacts.of_agent(pool, **mine, sha256=log.sha256) == log
    assert await artifacts.of_agent(pool, **mine, kind="transcript") is None
    # Another requester naming the same agentId or sha256 gets nothing.
    other = {**mine, "peer_instance_id": "edge"}
    assert await artifacts.of_agent(pool, **other, sha256=diff.sha256) is None
    assert await artifacts.of_agent(pool, **{**mine, "role": "requester"}, kind="diff") is None


class _WatchedFile(io.BytesIO):
    """A file that notes, at each read, how far a concurrent task on the loop had got."""

    def __init__(self, data: bytes, progress: list[int]) -> None:
        super().__init__(data)
        self.progress = progress
        self.seen: list[int] = []

    def read(self, size: int | None = -1, /) -> bytes:
        self.seen.append(self.progress[0])
        return super().read(size)


async def test_hashing_a_large_artifact_leaves_the_worker_free_to_heartbeat(
    pool: asyncpg.Pool,
) -> None:
    # A worker's heartbeats are tasks on the same loop: they must go on while 64 MiB are
    # hashed, or Temporal gives the run up and starts it a second time.
    progress = [0]
    stop = asyncio.Event()

    async def heartbeat() -> None:
        while not stop.is_set():
            progress[0] += 1
            await asyncio.sleep(0)

    ticking = asyncio.create_task(heartbeat())
    await asyncio.sleep(0)
    handle = _WatchedFile(b"\x5a" * (64 * 1024 * 1024), progress)
    try:
        with pytest.raises(ArtifactTooLarge):  # hashed whole, then refused: no row written
            await artifacts.put_file(pool, handle, max_bytes=1024)
    finally:
        stop.set()
        await ticking
    reads = handle.seen
    assert len(reads) >= 64
    # The loop ran between the reads of the file, not only before and after them.
    assert len(set(reads)) > 1, f"the loop stood still for all {len(reads)} reads"
