"""A run's workspace follows its checkpoints: taken with each checkpoint into the instance's
PostgreSQL (`agents.snapshot`, `federation.store.workspaces`), and restored by whichever
worker takes a retry when its own disk does not hold that workspace as of the last checkpoint.

Next to the workspace (outside the sandbox) a marker file names the last snapshot this host
saved or restored; a retry whose run's latest checkpoint names another one (it was saved on
another host, or this host's copy is older) restores it, or, where the checkpoint says the
workspace could not be saved (over the bound, unreadable), starts from a fresh workspace and
tells the agent so.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from agents import snapshot
from agents.workspace import baseline_dir, remove_tree
from federation.store import workspaces

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recovery:
    """What a resumed attempt found: "local" (this host's copy is the latest), "restored",
    "lost" (with why), or "none" (no checkpoint took a snapshot: nothing to compare)."""

    state: str
    note: str = ""


@dataclass(kw_only=True, eq=False)
class WorkspaceSnapshots:
    """The snapshots of one run's workspace (`requester_id`, `agent_id`) in the store, each at
    most `max_bytes` and `max_entries` files."""

    pool: asyncpg.Pool
    workspace: Path
    requester_id: str
    agent_id: uuid.UUID
    max_bytes: int
    max_entries: int
    cache: snapshot.SnapshotCache = field(default_factory=snapshot.SnapshotCache, init=False)
    stored: set[str] = field(default_factory=set, init=False)  # content hashes known stored

    @property
    def marker(self) -> Path:
        return self.workspace.parent / f".{self.workspace.name}.snapshot"

    def roots(self) -> dict[str, Path]:
        return {"workspace": self.workspace, "baseline": baseline_dir(self.workspace)}

    async def take(self) -> dict[str, Any]:
        """The reference the checkpoint stores: the snapshot's manifest, or why there is none."""
        ref: dict[str, Any] = {"id": uuid.uuid4().hex}
        if self.max_bytes <= 0:
            return {**ref, "lost": "workspace snapshots are off (FEDAGENT_WORKSPACE_SNAPSHOT_MB=0)"}
        try:
            taken = await asyncio.to_thread(
                snapshot.take,
                self.roots(),
                max_bytes=self.max_bytes,
                max_entries=self.max_entries,
                cache=self.cache,
            )
        except snapshot.SnapshotTooLarge as exc:
            return {**ref, "lost": f"not saved: {exc} (FEDAGENT_WORKSPACE_SNAPSHOT_MB)"}
        except OSError as exc:
            return {**ref, "lost": f"not saved: the workspace could not be read ({exc.strerror})"}
        new = {sha: data for sha, data in taken.blobs.items() if sha not in self.stored}
        new[taken.sha256] = taken.manifest
        # Files read from the cache were linked to this run when they were first stored.
        files = snapshot.blobs_of(snapshot.parse_manifest(taken.manifest))
        await workspaces.put_blobs(
            self.pool,
            new,
            requester_id=self.requester_id,
            agent_id=self.agent_id,
            link=files - self.stored,
        )
        self.stored.update(new.keys() | files)
        return {
            **ref,
            "sha256": taken.sha256,
            "bytes": taken.bytes,
            "entries": taken.entries,
            "skipped": taken.skipped,
        }

    def saved(self, ref: dict[str, Any]) -> None:
        """The checkpoint holding `ref` is saved: this host's workspace is that one."""
        temp = self.marker.with_name(self.marker.name + ".new")
        temp.write_text(str(ref["id"]))
        temp.replace(self.marker)

    def _marker(self) -> str | None:
        try:
            return self.marker.read_text().strip()
        except OSError:
            return None

    async def recover(self) -> Recovery:
        """Make the workspace on this host the one of the run's latest checkpoint."""
        latest = await workspaces.latest(self.pool, self.requester_id, self.agent_id)
        roots = self.roots()
        local = self.workspace.is_dir() and (roots["baseline"] / "HEAD").exists()
        if latest is None:
            return Recovery("local" if local else "none")
        if local and self._marker() == latest.get("id"):
            return Recovery("local")
        for path in roots.values():
            await asyncio.to_thread(remove_tree, path)
        if "sha256" not in latest:
            return Recovery("lost", str(latest.get("lost") or "no snapshot was saved"))
        try:
            await self._restore(str(latest["sha256"]), roots)
        except (snapshot.UnsafeSnapshot, OSError, ValueError) as exc:
            log.warning("workspace of agent %s not restored: %s", self.agent_id, exc)
            for path in roots.values():
                await asyncio.to_thread(remove_tree, path)
            return Recovery("lost", f"its snapshot could not be restored ({exc})")
        self.saved(latest)
        return Recovery("restored")

    async def _restore(self, manifest_sha: str, roots: dict[str, Path]) -> None:
        found = await workspaces.get_blobs(self.pool, [manifest_sha])
        if manifest_sha not in found:
            raise snapshot.UnsafeSnapshot("the snapshot's manifest is not stored")
        manifest = snapshot.load_manifest(found[manifest_sha], manifest_sha)
        wanted = snapshot.blobs_of(manifest)
        # Bounded before a byte is read: by the blobs' stored lengths, as `take` bounds it.
        sizes = await workspaces.blob_sizes(self.pool, wanted)
        if wanted - sizes.keys():
            raise snapshot.UnsafeSnapshot(f"{len(wanted - sizes.keys())} file(s) are not stored")
        snapshot.check_bounds(
            manifest, sizes, max_bytes=self.max_bytes, max_entries=self.max_entries
        )
        blobs = await workspaces.get_blobs(self.pool, wanted)
        if wanted - blobs.keys():
            raise snapshot.UnsafeSnapshot(f"{len(wanted - blobs.keys())} file(s) are not stored")
        self.workspace.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        for path in roots.values():
            path.mkdir()
        await asyncio.to_thread(snapshot.restore, manifest, blobs, roots)
        self.stored.update(blobs.keys() | {manifest_sha})
