"""The activity that runs an agent in its sandbox, heartbeating progress, killed on cancel."""

from __future__ import annotations

import asyncio
import logging
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.federation import PeerMessenger
from agents.errors import AgentSetupError
from agents.loop import AgentRunReport
from agents.models import ScriptedProvider
from agents.runtime import RuntimeConfig, run_agent_task
from federation import tracing
from federation.errors import FederationError, GrantAgentType, GrantCommandType
from federation.settings import Settings
from federation.store import artifacts, repos
from federation.trust import SAFE_INSTANCE_ID, grants_of, require_active
from workflows.models import (
    AGENT_FAILED,
    AGENT_TIMED_OUT,
    RUN_AGENT,
    TASK_INVALID,
    AgentOutcome,
    RunTask,
)

log = logging.getLogger(__name__)
EVENT_MIN_INTERVAL = 1.0  # seconds between progress events sent to the requester


class AgentActivities:
    def __init__(self, pool: asyncpg.Pool, http: httpx.AsyncClient, settings: Settings) -> None:
        self.pool = pool
        self.settings = settings
        self.messenger = PeerMessenger(pool, http, settings)
        self._background: set[asyncio.Task[None]] = set()

    def workspace(self, task: RunTask) -> Path:
        # Ids come from a peer: the path must stay two levels below the workspaces directory.
        root = self.settings.workspaces_dir.resolve()
        path = (root / task.requester_id / task.agent_id).resolve()
        if path.parent.parent != root or not SAFE_INSTANCE_ID.fullmatch(task.requester_id):
            raise ApplicationError(
                "the run's workspace would leave the workspaces directory",
                type=TASK_INVALID,
                non_retryable=True,
            )
        for directory in (root, path.parent):  # no other local user may look inside
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            directory.chmod(0o700)
        return path

    async def _check_still_granted(self, task: RunTask) -> None:
        """Each try starts only if the run's connection is ACTIVE and still grants it."""
        row = await repos.get_executed_agent(self.pool, task.requester_id, uuid.UUID(task.agent_id))
        connection = await repos.get_connection(self.pool, row["connection_id"]) if row else None
        try:
            connection = require_active(connection)
            grants = grants_of(connection)
            if "agent.spawn" not in grants.commandTypes:
                raise GrantCommandType("agent.spawn is no longer granted to this peer")
            if task.agent_type not in grants.agentTypes:
                raise GrantAgentType(f"agent type {task.agent_type!r} is no longer granted")
        except FederationError as err:
            raise ApplicationError(err.detail, type=err.code, non_retryable=True) from None

    @activity.defn(name=RUN_AGENT)
    async def run_agent(self, task: RunTask) -> AgentOutcome:
        # Progress events sent from here join the run's trace (and its log lines carry it).
        with tracing.trace(task.traceparent):
            return await self._run_agent(task)

    async def _run_agent(self, task: RunTask) -> AgentOutcome:
        info = activity.info()
        log.info(
            "running %s agent for task %s (try %d, activity attempt %d)",
            task.agent_type,
            task.task_id,
            task.attempt,
            info.attempt,
        )
        agent_id = uuid.UUID(task.agent_id)
        await self._check_still_granted(task)
        # A retry of the same try (the worker was lost) resumes after the commands it finished.
        resume_after = completed_commands(info.heartbeat_details) if info.attempt > 1 else 0
        row = await repos.update_executed_agent(
            self.pool, task.requester_id, agent_id, state="running", attempt=task.attempt
        )
        if row is not None:
            self._notify_soon(row)

        state: dict[str, Any] = {
            "progress": {"turn": 0, "attempt": task.attempt, "completedCommands": resume_after},
            "row": None,
        }
        dirty = asyncio.Event()

        async def on_progress(progress: dict[str, Any]) -> None:
            done = resume_after + (progress["turn"] - 1 if progress.get("lastTool") else 0)
            progress = {**progress, "attempt": task.attempt, "completedCommands": done}
            state["progress"] = progress
            activity.heartbeat(progress)
            try:
                updated = await repos.update_executed_agent(
                    self.pool, task.requester_id, agent_id, progress=progress
                )
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                # Progress is best effort; the heartbeat above already carries it.
                log.warning("progress of agent %s not stored: %r", agent_id, exc)
                return
            if updated is not None:
                state["row"] = updated
                dirty.set()

        async def pump_events() -> None:
            # At most one progress event a second, and always the latest one.
            while True:
                await dirty.wait()
                dirty.clear()
                await self._notify(state["row"])
                await asyncio.sleep(EVENT_MIN_INTERVAL)

        async def keep_heartbeating() -> None:
            # Cancellation (kill) reaches an activity only through heartbeats.
            while True:
                activity.heartbeat(state["progress"])
                await asyncio.sleep(task.heartbeat_interval)

        instructions = skip_commands(str(task.context.get("instructions") or ""), resume_after)
        config = RuntimeConfig.from_settings(self.settings)
        # The scripted provider resumes after the commands a lost worker already finished.
        provider = ScriptedProvider(instructions) if config.provider == "scripted" else None
        helpers = [asyncio.create_task(keep_heartbeating()), asyncio.create_task(pump_events())]
        try:
            async with asyncio.timeout(task.timeout_seconds):
                # Kills its sandbox on any way out (cancelled by a kill, timed out, failed).
                report = await run_agent_task(
                    workspace=self.workspace(task),
                    agent_type=task.agent_type,
                    context=task.context,
                    config=config,
                    on_progress=on_progress,
                    # later tries and retries of a try keep the workspace as it was left
                    resume=info.attempt > 1 or task.attempt > 1,
                    provider=provider,
                )
        except TimeoutError:
            raise ApplicationError(
                f"the run exceeded its timeout of {task.timeout_seconds} s",
                type=AGENT_TIMED_OUT,
                non_retryable=True,
            ) from None
        except AgentSetupError as exc:
            raise ApplicationError(
                str(exc), type=TASK_INVALID if exc.invalid else AGENT_FAILED, non_retryable=True
            ) from None
        finally:
            for helper in helpers:
                helper.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
        activity.heartbeat(state["progress"])
        result = {**report.as_result(), **await self._store_artifacts(task, report)}
        if not report.success:
            raise ApplicationError(report.summary, result, type=AGENT_FAILED)
        return AgentOutcome(summary=report.summary, result=result)

    async def _store_artifacts(self, task: RunTask, report: AgentRunReport) -> dict[str, Any]:
        """Keep the whole diff and the whole log in the store; the result names them by hash.

        What goes back into the workflow (and from there into events) is only their sha256,
        size and the bounded previews already in the result (diffPreview, logTail).
        """
        agent_id = uuid.UUID(task.agent_id)
        limit = self.settings.artifact_max_bytes
        chunk = self.settings.artifact_chunk_bytes
        stored: dict[str, artifacts.Artifact] = {}
        if report.diff_path and Path(report.diff_path).is_file():
            stored["diff"] = await artifacts.put_path(
                self.pool, Path(report.diff_path), max_bytes=limit, chunk_bytes=chunk
            )
        log_bytes = report.log.encode()
        if len(log_bytes) > limit:  # the end of a log says most about how the run ended
            log_bytes = log_bytes[-limit:]
        stored["log"] = await artifacts.put_bytes(
            self.pool, log_bytes, max_bytes=limit, chunk_bytes=chunk
        )
        for kind, artifact in stored.items():
            await artifacts.link(
                self.pool,
                role="executor",
                peer_instance_id=task.requester_id,
                agent_id=agent_id,
                kind=kind,
                artifact=artifact,
            )
        fields: dict[str, Any] = {
            "artifacts": {kind: artifact.reference() for kind, artifact in stored.items()},
            "logSha256": stored["log"].sha256,
            "logBytes": stored["log"].bytes,
        }
        if "diff" in stored:
            fields["diffSha256"] = stored["diff"].sha256
            fields["diffBytes"] = stored["diff"].bytes
        return fields

    async def _notify(self, row: dict[str, Any]) -> None:
        """Best-effort event to the requester; it polls when an event is lost."""
        try:
            await self.messenger.notify_requester(row, timeout=5.0)
        except Exception as exc:  # noqa: BLE001 - an event is allowed to be lost
            log.info("event for agent %s not delivered: %s", row["agent_id"], exc)

    def _notify_soon(self, row: dict[str, Any]) -> None:
        task = asyncio.create_task(self._notify(row))
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def completed_commands(details: Any) -> int:
    """How many scripted commands the previous run of this try finished, from its heartbeat."""
    try:
        last = details[-1] if details else None
        return max(0, int(last.get("completedCommands", 0))) if isinstance(last, dict) else 0
    except (TypeError, ValueError, AttributeError):
        return 0


def skip_commands(instructions: str, count: int) -> str:
    """The instructions without their first `count` `$ ` command lines."""
    if count <= 0:
        return instructions
    kept: list[str] = []
    for line in instructions.splitlines():
        if line.startswith("$ ") and count > 0:
            count -= 1
            continue
        kept.append(line)
    return "\n".join(kept)
