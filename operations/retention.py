"""What an instance keeps, and for how long: one pass of garbage collection.

`collect_garbage` is the one behaviour behind the worker's periodic job and `fedagent gc`
(`--dry-run`: the same rules, counted instead of applied). Kinds, in the order they go:

- `workspaces` (the worker's disk): a run's workspace, baseline repository, diff file and /tmp,
  once the run ended (`workspace_retention` after it; its diff and log are in the store by
  then), or when the store has no such run.
- `messages`, `events`, `transcripts`, `checkpoints` (`run_data_retention`), `artifacts` (which
  artifact is whose, `artifact_retention`) and `runs` (the run's own record, `run_retention`)
  of runs that ended that long ago; `artifact_content` once no run refers to it.

A run that has not ended keeps everything, whatever its age.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from agents.workspace import remove_run_files, run_files
from federation.settings import Settings
from federation.store import retention
from federation.store.jobs import instance_job
from federation.store.retention import Amount

log = logging.getLogger(__name__)

WORKSPACES = "workspaces"
KINDS = (WORKSPACES, *retention.KINDS)
STORE_JOB = "retention"
WORKSPACE_SWEEP_INTERVAL = 10.0


@dataclass(frozen=True, kw_only=True)
class GcReport:
    """What a pass deleted (or, dry, would delete), per kind."""

    dry_run: bool
    kinds: dict[str, Amount] = field(default_factory=dict)

    def lines(self) -> list[str]:
        verb = "would delete" if self.dry_run else "deleted"
        return [
            f"{kind}: {verb} {amount.rows} ({amount.bytes} bytes)"
            for kind, amount in self.kinds.items()
        ]


def policy(settings: Settings) -> retention.Retention:
    return retention.Retention(
        run_data=settings.run_data_retention,
        artifacts=settings.artifact_retention,
        runs=settings.run_retention,
    )


async def collect_garbage(
    pool: asyncpg.Pool, settings: Settings, *, dry_run: bool = False, store: bool = True
) -> GcReport:
    """One pass over this host's workspaces and (`store`) the instance's store."""
    kinds = {WORKSPACES: await sweep_workspaces(pool, settings, dry_run=dry_run)}
    if store:
        kinds.update(await collect_store(pool, retention_policy=policy(settings), dry_run=dry_run))
    return GcReport(dry_run=dry_run, kinds=kinds)


async def collect_store(
    pool: asyncpg.Pool, *, retention_policy: retention.Retention, dry_run: bool = False
) -> dict[str, Amount]:
    """Delete (or count) the expired rows of each kind of the store."""
    found: dict[str, Amount] = {}
    act = retention.expired if dry_run else retention.delete_expired
    for kind in retention.KINDS:
        found[kind] = await act(pool, kind, retention_policy)
    return found


async def sweep_workspaces(
    pool: asyncpg.Pool, settings: Settings, *, dry_run: bool = False
) -> Amount:
    """Remove the files of the runs in this host's workspaces directory that ended at least
    `workspace_retention` seconds ago or that the store no longer knows; never a run that
    has not ended."""
    root = settings.workspaces_dir
    removed = used = 0
    for peer_dir in sorted(_directories(root)):
        runs = await asyncio.to_thread(run_files, peer_dir)
        if not runs:
            continue
        states = await retention.run_states(pool, peer_dir.name, list(runs))
        for agent_id, paths in runs.items():
            state = states.get(agent_id)
            if state is not None and (state[1] is None or state[1] < settings.workspace_retention):
                continue  # open, or ended too recently
            if dry_run:
                used += await asyncio.to_thread(_usage, paths)
            else:
                used += await asyncio.to_thread(remove_run_files, paths)
            removed += 1
    return Amount(rows=removed, bytes=used)


def _directories(root: Path) -> list[Path]:
    try:
        return [path for path in root.iterdir() if path.is_dir() and not path.is_symlink()]
    except OSError:
        return []


def _usage(paths: list[Path]) -> int:
    from agents.sandbox import files

    return files.disk_usage(paths)


async def run_periodically(pool: asyncpg.Pool, settings: Settings, stop: asyncio.Event) -> None:
    """The worker's retention job: this host's workspaces every few seconds (once per
    workspaces directory), the store every `retention_interval` (once per instance)."""
    sweep_every = min(WORKSPACE_SWEEP_INTERVAL, settings.retention_interval)
    host_job = f"{STORE_JOB}:{WORKSPACES}:{settings.workspaces_dir.resolve()}"
    since_store = settings.retention_interval  # the store's first pass comes at once
    while not stop.is_set():
        try:
            async with instance_job(pool, host_job) as mine:
                if mine:
                    await sweep_workspaces(pool, settings)
            if since_store >= settings.retention_interval:
                since_store = 0.0
                async with instance_job(pool, STORE_JOB) as mine:
                    if mine:
                        report = await collect_store(pool, retention_policy=policy(settings))
                        if any(amount.rows for amount in report.values()):
                            log.info("retention: %s", GcReport(kinds=report, dry_run=False).lines())
        except Exception as exc:  # noqa: BLE001 - the database is away: the next pass tries
            log.warning("retention pass failed: %r", exc)
        try:
            await asyncio.wait_for(stop.wait(), sweep_every)
        except TimeoutError:
            since_store += sweep_every
