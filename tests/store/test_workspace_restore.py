"""A workspace restored from the store on another host trusts nothing the store holds: the
manifest must be the bytes its sha256 names, well formed, and within the bounds a snapshot is
taken with (entries, file bytes counted as they would be written); otherwise the retry starts
from a fresh workspace and is told the old one was lost, and nothing is written."""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import pytest

from activities.snapshots import WorkspaceSnapshots
from agents import snapshot
from agents.workspace import baseline_dir

if TYPE_CHECKING:
    from tests.store.conftest import NewDatabase

REQUESTER = "asker"
BLOB = b"x" * 1000
BLOB_SHA = hashlib.sha256(BLOB).hexdigest()


@pytest.fixture(scope="module")
async def pool(server: Any, new_database: NewDatabase) -> AsyncIterator[asyncpg.Pool]:
    async with new_database(server, "restore") as pool:
        yield pool


def _entry(path: bytes, **rest: Any) -> dict[str, Any]:
    return {"p": base64.b64encode(path).decode(), **rest}


def _manifest(entries: list[Any], *, roots: Any = None) -> bytes:
    body = {"format": 1, "roots": roots if roots is not None else {"workspace": entries}}
    return json.dumps(body).encode()


async def _checkpoint(pool: asyncpg.Pool, manifest: bytes, *, stored_as: str | None = None) -> str:
    """A run whose latest checkpoint holds `manifest` (stored under `stored_as`: its own
    sha256 unless told otherwise). Returns the run's agent id."""
    agent_id = uuid.uuid4()
    sha = stored_as or hashlib.sha256(manifest).hexdigest()
    await pool.execute(
        "INSERT INTO workspace_blobs (sha256, bytes, data) VALUES ($1, $2, $3), ($4, $5, $6)"
        " ON CONFLICT DO NOTHING",
        sha,
        len(manifest),
        manifest,
        BLOB_SHA,
        len(BLOB),
        BLOB,
    )
    await pool.execute(
        "INSERT INTO agent_conversations (requester_id, agent_id, attempt, state, workspace)"
        " VALUES ($1, $2, 1, '{}', $3)",
        REQUESTER,
        agent_id,
        {"id": uuid.uuid4().hex, "sha256": sha, "bytes": 0, "entries": 0},
    )
    return str(agent_id)


def _snapshots(pool: asyncpg.Pool, tmp_path: Path, agent_id: str) -> WorkspaceSnapshots:
    return WorkspaceSnapshots(
        pool=pool,
        workspace=tmp_path / "workspaces" / "w" / agent_id,
        requester_id=REQUESTER,
        agent_id=uuid.UUID(agent_id),
        max_bytes=10_000,
        max_entries=20,
    )


def _written(snapshots: WorkspaceSnapshots) -> list[Path]:
    roots = [snapshots.workspace, baseline_dir(snapshots.workspace)]
    return [p for root in roots if root.exists() for p in root.rglob("*")]


async def test_a_snapshot_within_its_bounds_comes_back(pool: asyncpg.Pool, tmp_path: Path) -> None:
    manifest = _manifest([_entry(b"a.txt", t="f", s=BLOB_SHA, x=False)])
    snapshots = _snapshots(pool, tmp_path, await _checkpoint(pool, manifest))
    assert (await snapshots.recover()).state == "restored"
    assert (snapshots.workspace / "a.txt").read_bytes() == BLOB


DEEP = b"[" * 100_000 + b"]" * 100_000
FILE = _entry(b"a.txt", t="f", s=BLOB_SHA, x=False)
CASES: dict[str, Callable[[], tuple[bytes, str | None]]] = {
    # Another manifest's bytes under this sha256: content addressing is checked, not assumed.
    "not-its-sha256": lambda: (_manifest([FILE]), hashlib.sha256(b"other").hexdigest()),
    # The same 1000 bytes written 11 times is over the 10 000 bytes a snapshot may hold.
    "over-bytes": lambda: (
        _manifest([_entry(f"f{n}".encode(), t="f", s=BLOB_SHA, x=False) for n in range(11)]),
        None,
    ),
    "over-entries": lambda: (
        _manifest([_entry(f"d{n}".encode(), t="d") for n in range(21)]),
        None,
    ),
    "roots-not-a-map": lambda: (_manifest([], roots=[["workspace", []]]), None),
    "entry-not-a-map": lambda: (_manifest(["a.txt"]), None),
    "file-without-bytes": lambda: (_manifest([_entry(b"a.txt", t="f")]), None),
    "deep-json": lambda: (
        b'{"format": 1, "roots": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        None,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_a_snapshot_the_store_should_not_hold_is_lost_not_restored(
    pool: asyncpg.Pool, tmp_path: Path, case: str
) -> None:
    manifest, stored_as = CASES[case]()
    snapshots = _snapshots(pool, tmp_path, await _checkpoint(pool, manifest, stored_as=stored_as))
    recovery = await snapshots.recover()
    assert recovery.state == "lost", recovery
    assert "could not be restored" in recovery.note
    assert _written(snapshots) == []


def test_a_taken_snapshot_is_within_the_bounds_it_was_taken_with(tmp_path: Path) -> None:
    """What `take` accepts, the restore's checks accept with the same bounds."""
    for number in range(4):
        (tmp_path / f"f{number}").write_bytes(BLOB)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "link").symlink_to("../f0")
    taken = snapshot.take(
        {"workspace": tmp_path}, max_bytes=4000, max_entries=6, cache=snapshot.SnapshotCache()
    )
    manifest = snapshot.load_manifest(taken.manifest, taken.sha256)
    sizes = {sha: len(data) for sha, data in taken.blobs.items()}
    snapshot.check_bounds(manifest, sizes, max_bytes=4000, max_entries=6)
    with pytest.raises(snapshot.UnsafeSnapshot):
        snapshot.check_bounds(manifest, sizes, max_bytes=3999, max_entries=6)
    with pytest.raises(snapshot.UnsafeSnapshot):
        snapshot.check_bounds(manifest, sizes, max_bytes=4000, max_entries=5)
