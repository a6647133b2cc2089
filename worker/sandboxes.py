"""What a worker does about its sandboxes besides running them: at start, find which limits
its sandboxes cannot hold and say so loudly (the log, and a row /readyz reads); at start and
every reconcile interval, remove the docker containers dead workers of this host left, and the
bwrap sandboxes they died starting."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import tempfile
import uuid
from pathlib import Path

import asyncpg

from agents.sandbox import fence
from agents.sandbox.report import FIX, LimitGap, limit_gaps
from federation.settings import Settings
from federation.store import workers

log = logging.getLogger(__name__)
PROBE_TIMEOUT = 60.0


def worker_name() -> str:
    """This worker process among all of its instance's (host, pid and a random part)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


async def probe_limits(settings: Settings) -> tuple[str, list[LimitGap]]:
    """Start the configured sandbox once, in a scratch directory, and read which of the
    configured limits it cannot hold for a run as a whole."""
    from activities.agents import runtime_config
    from agents.runtime import make_sandbox

    if settings.sandbox == "docker":
        return "docker", []  # Docker's cgroups hold memory, pids and CPU per container
    scratch = Path(tempfile.mkdtemp(prefix="fedagent-limits-"))
    sandbox = make_sandbox(runtime_config(settings), scratch / "ws")
    try:
        await asyncio.wait_for(sandbox.start(), PROBE_TIMEOUT)
        return sandbox.kind, limit_gaps(sandbox)
    finally:
        await sandbox.kill()
        await asyncio.to_thread(shutil.rmtree, scratch, True)


async def report_sandbox_limits(
    settings: Settings, pool: asyncpg.Pool, worker: str
) -> list[LimitGap]:
    """Log what the sandboxes cannot enforce (ERROR: not at all, WARNING: per process only),
    with the fix, and record it for /readyz."""
    try:
        kind, gaps = await probe_limits(settings)
    except Exception as exc:  # noqa: BLE001 - every run would fail the same way: say so
        kind = settings.sandbox
        gaps = [LimitGap("sandbox", "error", f"the {kind} sandbox does not start: {exc}")]
    for gap in gaps:
        level = logging.ERROR if gap.severity == "error" else logging.WARNING
        log.log(level, "%s sandbox: %s. To fix: %s", kind, gap.detail, FIX)
    await workers.record_sandbox(
        pool,
        worker=worker,
        host=socket.gethostname(),
        sandbox=kind,
        gaps=[gap.as_dict() for gap in gaps],
    )
    return gaps


async def sweep_sandboxes(settings: Settings) -> list[str]:
    """Remove this instance's docker sandbox containers whose worker (on this host) is gone,
    or the bwrap sandboxes a dead worker of this host was starting; returns their names (pids
    for bwrap). A bwrap sandbox that has started dies with its worker; one its worker died
    while starting waits for ever (see `fence.orphaned_sandboxes`)."""
    if settings.sandbox != "docker":
        return await _sweep_bwrap(settings)
    from agents.sandbox import docker_sandbox

    def sweep() -> list[str]:
        client = docker_sandbox.connect(settings.docker_host)
        try:
            return docker_sandbox.sweep_orphans(client, settings.instance_name)
        finally:
            client.close()

    try:
        removed = await asyncio.to_thread(sweep)
    except Exception as exc:  # noqa: BLE001 - Docker away: the next sweep tries again
        log.warning("could not look for sandbox containers dead workers left: %r", exc)
        return []
    if removed:
        log.warning(
            "removed %d sandbox container(s) that dead workers of this host left: %s",
            len(removed),
            ", ".join(removed),
        )
    return removed


async def _sweep_bwrap(settings: Settings) -> list[str]:
    ended = await asyncio.to_thread(fence.end_orphaned_sandboxes, settings.workspaces_dir)
    if ended:
        log.warning(
            "ended %d sandbox(es) that dead workers of this host left while starting them: pids %s",
            len(ended),
            ", ".join(map(str, ended)),
        )
    return [str(pid) for pid in ended]
