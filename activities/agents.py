"""The activity that runs an agent in its sandbox, heartbeating progress, killed on cancel."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import httpx
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.conversation import StoreSink, TranscriptPump, previous_try_note
from activities.federation import PeerMessenger
from activities.snapshots import Recovery, WorkspaceSnapshots
from agents.conversation import ConversationState
from agents.errors import AgentSetupError
from agents.loop import AgentRunReport
from agents.runtime import RuntimeConfig, fence_workspace, run_agent_task
from agents.sandbox.base import Limits
from agents.text import clean
from federation import tracing
from federation.errors import FederationError
from federation.identity import load_identity
from federation.local_runs import check_local_spawn
from federation.settings import Settings
from federation.states import LOCAL_REQUESTER, TERMINAL_STATES
from federation.store import artifacts, conversations, repos
from federation.store.outage import StoreUnavailable, wait_for_store
from federation.trust import ENDED, SAFE_INSTANCE_ID, check_peer_command, require_active
from workflows.models import (
    AGENT_FAILED,
    AGENT_KILLED,
    AGENT_TIMED_OUT,
    RUN_AGENT,
    STORE_UNAVAILABLE,
    TASK_INVALID,
    AgentOutcome,
    AgentState,
    RunTask,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
EVENT_MIN_INTERVAL = 1.0  # seconds between progress events sent to the requester
# A run's first second sends no transcript event: a run that ends within it sends its whole
# transcript in one event at its end. (Progress is sent at once: it is the requester's record
# of each step.)
TRANSCRIPT_QUIET_START = 1.0
# An attempt that gave up on an away database: its next attempt comes this much later.
STORE_RETRY_DELAY = timedelta(seconds=60)


def _spawn_payload(task: RunTask) -> dict[str, Any]:
    """The run's spawn as the grants see it (what the ingress checked, from the task)."""
    return {
        "agentId": task.agent_id,
        "taskId": task.task_id,
        "agentType": task.agent_type,
        "context": task.context,
        "options": {"timeout": task.timeout_seconds, "maxRetries": task.max_retries},
    }


@dataclass(frozen=True, kw_only=True)
class _TryParts:
    """What one try works with: its configuration, workspace, snapshots and transcript sink."""

    agent_id: uuid.UUID
    config: RuntimeConfig
    workspace: Path
    snapshots: WorkspaceSnapshots
    sink: StoreSink


@dataclass(frozen=True, kw_only=True)
class _StartingPoint:
    """Where a try starts: a resumed conversation or a note of the try before, and the
    workspace as the fence and the snapshot recovery left it."""

    resuming: bool
    resume_from: ConversationState | None
    previous_try: str
    generation: str
    recovery: Recovery


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
        safe = task.requester_id == LOCAL_REQUESTER or SAFE_INSTANCE_ID.fullmatch(task.requester_id)
        if path.parent.parent != root or not safe:
            raise ApplicationError(
                "the run's workspace would leave the workspaces directory",
                type=TASK_INVALID,
                non_retryable=True,
            )
        for directory in (root, path.parent):  # no other local user may look inside
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            directory.chmod(0o700)
        return path

    async def _store(self, call: Callable[[], Awaitable[T]], what: str) -> T:
        """A store call of a running agent: waits out a database outage (the activity goes on
        heartbeating meanwhile) for up to FEDAGENT_STORE_OUTAGE_WAIT."""
        return await wait_for_store(call, what=what, patience=self.settings.store_outage_wait)

    async def _check_still_granted(self, task: RunTask) -> None:
        """Each try starts only if the run's connection is ACTIVE and still grants it (its
        command, agent type, repository and timeout, within this instance's limits)."""
        row = await repos.get_executed_agent(self.pool, task.requester_id, uuid.UUID(task.agent_id))
        if row is not None and row["state"] in TERMINAL_STATES:
            # Recorded as ended while its workflow did not exist (a kill that found none, the
            # reconciler): a workflow started after that must not run the agent after all.
            raise ApplicationError(
                f"the run already ended {row['state']} here: {row['error'] or ''}".rstrip(": "),
                type=TASK_INVALID,
                non_retryable=True,
            )
        if task.requester_id == LOCAL_REQUESTER:
            await self._check_local_limits(task)
            return
        connection = await repos.get_connection(self.pool, row["connection_id"]) if row else None
        status = str(connection["status"]) if connection is not None else ""
        if status in ENDED and self.settings.on_connection_end == "kill":
            # A try of a connection that ended does not start: the run is killed, as the end
            # of the connection kills the others (the same reason).
            raise ApplicationError(
                f"connection {status.lower()}", type=AGENT_KILLED, non_retryable=True
            )
        try:
            connection = require_active(connection)
            identity = await load_identity(self.pool)
            # The same rule as the ingress's, with the grants and limits as they are now.
            check_peer_command(
                connection,
                "agent.spawn",
                _spawn_payload(task),
                max_timeout=self.settings.max_agent_timeout,
                offered_agent_types=identity.capabilities.get("agentTypes"),
            )
        except FederationError as err:
            raise ApplicationError(err.detail, type=err.code, non_retryable=True) from None

    async def _check_local_limits(self, task: RunTask) -> None:
        """A local run's try starts only within this instance's limits of local runs."""
        identity = await load_identity(self.pool)
        try:
            check_local_spawn(
                self.settings, _spawn_payload(task), identity.capabilities.get("agentTypes")
            )
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
        state: dict[str, Any] = {"progress": {"turn": 0, "attempt": task.attempt}, "row": None}

        async def keep_heartbeating() -> None:
            # Cancellation (kill) reaches an activity only through heartbeats; they go on while
            # a store write waits for the database to come back.
            while True:
                activity.heartbeat(state["progress"])
                await asyncio.sleep(task.heartbeat_interval)

        heart = asyncio.create_task(keep_heartbeating())
        try:
            return await self._run_try(task, state)
        except StoreUnavailable as exc:
            # The database stayed away longer than the writes wait: not the agent's failure.
            raise ApplicationError(
                str(exc), type=STORE_UNAVAILABLE, next_retry_delay=STORE_RETRY_DELAY
            ) from None
        finally:
            heart.cancel()
            await asyncio.gather(heart, return_exceptions=True)

    async def _run_try(self, task: RunTask, state: dict[str, Any]) -> AgentOutcome:
        """One try: check it may still run, set up, find where it starts, run, keep the result."""
        agent_id = uuid.UUID(task.agent_id)
        await self._store(lambda: self._check_still_granted(task), "checking the run's grants")
        parts = self._try_parts(task, agent_id)
        start = await self._starting_point(task, parts)
        row = await self._store(
            lambda: repos.update_executed_agent(
                self.pool,
                task.requester_id,
                agent_id,
                state=AgentState.RUNNING,
                attempt=task.attempt,
            ),
            "recording the run running",
        )
        if row is not None:
            self._notify_soon(row)
        # Entries of an earlier worker of this try that were saved but maybe not sent: resent.
        pump = TranscriptPump(
            self.messenger,
            parts.sink,
            interval=self.settings.transcript_event_interval,
            sent=0 if activity.info().attempt > 1 else parts.sink.summary["entries"],
            first_delay=TRANSCRIPT_QUIET_START,
        )
        report = await self._execute(task, parts, start, state, pump)
        return await self._finish_try(task, parts, report, state, pump)

    def _try_parts(self, task: RunTask, agent_id: uuid.UUID) -> _TryParts:
        config = runtime_config(self.settings)
        workspace = self.workspace(task)
        snapshots = WorkspaceSnapshots(
            pool=self.pool,
            workspace=workspace,
            requester_id=task.requester_id,
            agent_id=agent_id,
            max_bytes=self.settings.workspace_snapshot_mb * 1024 * 1024,
            max_entries=self.settings.workspace_snapshot_max_entries,
        )
        sink = StoreSink(
            self.pool,
            requester_id=task.requester_id,
            agent_id=agent_id,
            attempt=task.attempt,
            transcript_limit=self.settings.transcript_limit,
            writer=activity.info().attempt,
            patience=self.settings.store_outage_wait,
            snapshots=snapshots,
        )
        return _TryParts(
            agent_id=agent_id,
            config=config,
            workspace=workspace,
            snapshots=snapshots,
            sink=sink,
        )

    async def _starting_point(self, task: RunTask, parts: _TryParts) -> _StartingPoint:
        """A retry of the same try (its worker was lost) resumes the checkpointed conversation;
        a later try starts a new one, told how the one before it ended."""
        writer, agent_id = activity.info().attempt, parts.agent_id
        resume_from: ConversationState | None = None
        if writer > 1:
            # Claimed: the attempt Temporal gave up on may still run on a cut-off worker; from
            # now on its saves are refused (and its loop stops) instead of overwriting ours.
            saved = await self._store(
                lambda: conversations.claim_checkpoint(
                    self.pool, task.requester_id, agent_id, task.attempt, writer=writer
                ),
                "claiming the checkpoint",
            )
            if saved is not None:
                resume_from = ConversationState.from_json(saved["state"])
        # Loaded once the checkpoint is claimed: an attempt given up on appends no more after.
        await parts.sink.load()
        resuming = writer > 1 or task.attempt > 1
        generation, recovery = await _fence_and_recover(
            parts.config, parts.snapshots, resuming=resuming, attempt=task.attempt
        )
        previous_try = ""
        if resume_from is None and task.attempt > 1:
            earlier = await self._store(
                lambda: conversations.load_checkpoint(
                    self.pool, task.requester_id, agent_id, task.attempt - 1
                ),
                "loading the last try's checkpoint",
            )
            previous_try = previous_try_note(task.attempt, earlier, lost=recovery.state == "lost")
        return _StartingPoint(
            resuming=resuming,
            resume_from=resume_from,
            previous_try=previous_try,
            generation=generation,
            recovery=recovery,
        )

    def _progress_reporter(
        self, task: RunTask, parts: _TryParts, state: dict[str, Any]
    ) -> tuple[
        Callable[[dict[str, Any]], Awaitable[None]], Callable[[], Coroutine[Any, Any, None]]
    ]:
        """The run's `on_progress`, and the loop that sends its latest state as an event."""
        dirty = asyncio.Event()

        async def on_progress(progress: dict[str, Any]) -> None:
            # The transcript's length lets the requester see a lost transcript event.
            progress = {
                **progress,
                "attempt": task.attempt,
                "transcriptEntries": parts.sink.summary["entries"],
            }
            # The next heartbeat carries it: heartbeats keep their own bounded pace.
            state["progress"] = progress
            try:
                updated = await self._store(
                    lambda: repos.update_executed_agent(
                        self.pool, task.requester_id, parts.agent_id, progress=progress
                    ),
                    "storing progress",
                )
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                # Progress is best effort; the next heartbeat carries it.
                log.warning("progress of agent %s not stored: %r", parts.agent_id, exc)
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

        return on_progress, pump_events

    async def _execute(
        self,
        task: RunTask,
        parts: _TryParts,
        start: _StartingPoint,
        state: dict[str, Any],
        pump: TranscriptPump,
    ) -> AgentRunReport:
        """Run the agent loop within the run's timeout, progress and transcript sent meanwhile."""
        on_progress, pump_events = self._progress_reporter(task, parts, state)
        helpers = [
            asyncio.create_task(pump_events()),
            asyncio.create_task(pump.run()),
        ]
        try:
            async with asyncio.timeout(task.timeout_seconds):
                # Kills its sandbox on any way out (cancelled by a kill, timed out, failed).
                with tracing.span(
                    "agent.run",
                    agent_id=task.agent_id,
                    connection_id=task.connection_id,
                    agent_type=task.agent_type,
                    attempt=task.attempt,
                    sandbox=parts.config.sandbox,
                ):
                    return await run_agent_task(
                        workspace=parts.workspace,
                        agent_type=task.agent_type,
                        context=task.context,
                        config=parts.config,
                        on_progress=on_progress,
                        # later tries and retries of a try keep the workspace as it was left
                        resume=start.resuming,
                        sink=parts.sink,
                        resume_from=start.resume_from,
                        previous_try=start.previous_try,
                        generation=start.generation,
                        restored=start.recovery.state == "restored",
                        workspace_news=_workspace_news(start.recovery),
                    )
        except TimeoutError:
            raise ApplicationError(
                f"the run exceeded its timeout of {task.timeout_seconds} s",
                type=AGENT_TIMED_OUT,
                non_retryable=True,
            ) from None
        except AgentSetupError as exc:
            reason = clean(str(exc))  # it may quote what the clone printed
            await self._set_outcome(
                task, {"success": False, "stopReason": "setup_error", "summary": reason}
            )
            raise ApplicationError(
                reason, type=TASK_INVALID if exc.invalid else AGENT_FAILED, non_retryable=True
            ) from None
        finally:
            for helper in helpers:
                helper.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)

    async def _set_outcome(self, task: RunTask, outcome: dict[str, Any]) -> None:
        await self._store(
            lambda: conversations.set_outcome(
                self.pool, task.requester_id, uuid.UUID(task.agent_id), task.attempt, outcome
            ),
            "recording the try's outcome",
        )

    async def _finish_try(
        self,
        task: RunTask,
        parts: _TryParts,
        report: AgentRunReport,
        state: dict[str, Any],
        pump: TranscriptPump,
    ) -> AgentOutcome:
        """Keep the try's outcome and artifacts; a run that did not succeed fails its activity."""
        # Bounded and safe text from here on: the whole summary is in the log artifact.
        summary = report.summary_preview
        await self._set_outcome(
            task,
            {
                "success": report.success,
                "stopReason": report.stop_reason,
                "summary": summary,
                "turns": report.turns,
            },
        )
        # The transcript by reference: the requester pulls whatever the events did not bring.
        report.transcript = dict(parts.sink.summary)
        try:
            await pump.flush(timeout=3.0)
        except Exception as exc:  # noqa: BLE001 - the requester pulls it at the end
            log.info("last transcript entries of agent %s not delivered: %s", parts.agent_id, exc)
        activity.heartbeat(state["progress"])
        stored = await self._store(lambda: self._store_artifacts(task, report), "storing artifacts")
        result = {**report.as_result(), **stored}
        if not report.success:
            raise ApplicationError(summary, result, type=AGENT_FAILED)
        return AgentOutcome(summary=summary, result=result)

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


async def _fence_and_recover(
    config: RuntimeConfig, snapshots: WorkspaceSnapshots, *, resuming: bool, attempt: int
) -> tuple[str, Recovery]:
    """Whatever an earlier attempt still runs in the workspace here ends first; then a
    resumed run's workspace as of its last checkpoint is found on this disk, or restored from
    its snapshot, or known lost. Returns the fence's generation and what was found."""
    activity.heartbeat({"turn": 0, "attempt": attempt})
    generation = await fence_workspace(config, snapshots.workspace)
    recovery = await snapshots.recover() if resuming else Recovery("none")
    activity.heartbeat({"turn": 0, "attempt": attempt})
    return generation, recovery


def _workspace_news(recovery: Recovery) -> str:
    """What the agent is told when its workspace came from a snapshot, or did not come."""
    if recovery.state == "restored":
        return (
            "the workspace as it was at the last checkpoint, restored on this worker after the "
            "one running the task was lost (files, executable bits and symlinks; nothing that "
            "was only in /tmp)"
        )
    if recovery.state == "lost":
        return (
            "the workspace of the interrupted attempt was LOST with the worker that ran it "
            f"({recovery.note}); this is a fresh one: changes made before are not in it and "
            "must be made again"
        )
    return ""


def runtime_config(settings: Settings) -> RuntimeConfig:
    """The agent runtime's configuration, from the instance's settings."""
    key = settings.anthropic_api_key
    return RuntimeConfig(
        sandbox=settings.sandbox,
        limits=Limits(
            memory_bytes=settings.sandbox_memory_mb * 1024 * 1024,
            pids=settings.sandbox_pids,
            cpus=settings.sandbox_cpus,
            command_timeout=settings.command_timeout,
            file_bytes=settings.sandbox_file_mb * 1024 * 1024,
            disk_bytes=settings.sandbox_disk_mb * 1024 * 1024,
            peer_disk_bytes=settings.peer_disk_budget_mb * 1024 * 1024 or None,
        ),
        provider=settings.model_provider,
        model=settings.anthropic_model,
        allowed_models=tuple(settings.allowed_models),
        api_key=key.get_secret_value() if key is not None else None,
        base_url=settings.anthropic_base_url,
        max_turns=settings.agent_max_turns,
        token_budget=settings.agent_token_budget or None,
        max_output_tokens=settings.agent_max_output_tokens,
        api_retries=settings.model_api_retries,
        api_backoff=settings.model_api_backoff,
        bwrap_path=settings.bwrap_path,
        sandbox_uid=settings.sandbox_uid,
        sandbox_cgroups=settings.sandbox_cgroups,
        sandbox_ro_paths=tuple(settings.sandbox_ro_paths),
        docker_image=settings.docker_image,
        docker_host=settings.docker_host,
        instance=settings.instance_name,
        repo_roots=tuple(settings.agent_repo_roots),
        clone_timeout=settings.clone_timeout,
        outbound_allowlist=tuple(settings.outbound_allowlist),
        allow_private_hosts=settings.environment == "dev",
        private_paths=(settings.data_dir, Path.home()),
        data_dir=settings.data_dir,
        diff_max_bytes=min(settings.diff_max_bytes, settings.artifact_max_bytes),
        diff_file_max_bytes=settings.diff_file_max_bytes,
        preview_bytes=settings.artifact_preview_bytes,
        log_tail=min(8 * 1024, settings.artifact_preview_bytes),
    )
