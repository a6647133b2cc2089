"""What a worker does about its sandboxes besides running them: remove the docker containers
dead workers of this host left (at start and every reconcile interval)."""

from __future__ import annotations

import asyncio
import logging

from federation.settings import Settings

log = logging.getLogger(__name__)


async def sweep_sandboxes(settings: Settings) -> list[str]:
    """Remove this instance's docker sandbox containers whose worker (on this host) is gone;
    returns their names. bwrap sandboxes need no sweep: they die with their worker."""
    if settings.sandbox != "docker":
        return []
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
