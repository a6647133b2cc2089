"""Activities of a run on an A2A agent (a connection of kind `a2a`): the A2A transport of
`RemoteAgentWorkflow`.

- `send_message`: SendMessage, non-blocking, with the agentId as messageId; the task id the
  agent answers is kept with the run (a retry of the activity that finds one asks GetTask
  instead of sending again);
- `get_task`: GetTask, one short call (the workflow waits between checks on a durable timer,
  doubling the wait while nothing changes);
- `cancel_task`: CancelTask; confirmed when the task ends CANCELED, or as the task says when
  it had ended before (TaskNotCancelable).

Each answer is applied to the requester's projection like a fedagent peer's report. A2A has
no sequence numbers: a report's number is the run's own plus one when the state moves
forward, and a state that goes backwards (WORKING after COMPLETED, SUBMITTED after WORKING)
is ignored, never applied. An answer that is not A2A (malformed JSON-RPC, a task with another
id, an unknown state, an answer past the size cap) ends the run `failed` with the reason; the
agent is asked once to cancel the task. At the end, the task's artifacts are kept like a
fedagent peer's: its text is the summary, its `text/x-diff` file part the diff (inline, or by
URL through the outbound address policy, size-capped) in the artifact store, its data parts
the changed files.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
from a2a.types import a2a_pb2 as pb
from google.protobuf.json_format import MessageToDict
from temporalio import activity
from temporalio.exceptions import ApplicationError

from federation import a2a_peer, tracing
from federation.errors import (
    A2AAnswerInvalid,
    A2ARefused,
    FederationError,
    PeerResponseInvalid,
    PeerUnreachable,
)
from federation.keystore import KeyCipher, default_cipher
from federation.netpolicy import request_bounded
from federation.settings import Settings
from federation.states import TERMINAL_STATES, AgentState
from federation.store import artifacts, repos
from federation.trust import require_active, require_active_or_ending
from workflows.models import (
    A2A_CANCEL_TASK,
    A2A_GET_TASK,
    A2A_SEND_MESSAGE,
    AgentEvent,
    KillResult,
    PeerCall,
    SpawnAgentInput,
)

SUMMARY_MAX_CHARS = 4000
CHANGED_FILES_MAX = 200
DIFF_MEDIA_TYPES = {"text/x-diff", "text/x-patch", "text/diff"}
DIFF_FILE = re.compile(rb"^\+\+\+ b/(.+)$", re.MULTILINE)
# How the run moves: an A2A report that ranks lower than the run's state is ignored.
RANK = {AgentState.SPAWNING: 0, AgentState.RUNNING: 1}
TERMINAL_RANK = 2
# A cancel whose answer is not final yet: GetTask this often, this many times, in one try.
CANCEL_CHECKS = 10
CANCEL_CHECK_EVERY = 0.3


def _rank(state: AgentState) -> int:
    return TERMINAL_RANK if state in TERMINAL_STATES else RANK[state]


def next_seq(row: dict[str, Any], state: AgentState) -> int | None:
    """The report's sequence number, or None when it changes nothing: the same state, a run
    that has ended, or a state that goes backwards (a lying or confused agent)."""
    current = AgentState(row["state"])
    if current in TERMINAL_STATES or _rank(state) <= _rank(current):
        return None
    return int(row["seq"]) + 1


def _as_activity_error(err: FederationError, *, retry: bool = False) -> ApplicationError:
    """Retried: what may pass (the agent is away, answers 5xx); not: what it decided."""
    transient = isinstance(err, PeerUnreachable) or retry
    code = f"{err.code}: {err.peer_code}" if isinstance(err, A2ARefused) else err.code
    return ApplicationError(err.detail, type=code, non_retryable=not transient)


@dataclass
class _Kept:
    """What the run's result says of the task's artifacts."""

    texts: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    diff: pb.Part | None = None
    refused: list[str] = field(default_factory=list)


def _collect(task: pb.Task) -> _Kept:
    kept = _Kept()
    for artifact in task.artifacts:
        for part in artifact.parts:
            content = part.WhichOneof("content")
            is_diff = part.media_type.split(";")[0].strip() in DIFF_MEDIA_TYPES
            if content in ("raw", "url") and is_diff and kept.diff is None:
                kept.diff = part
            elif content == "text":
                kept.texts.append(part.text)
            elif content == "data":
                kept.files += _files_of(MessageToDict(part.data))
    return kept


def _files_of(data: Any) -> list[str]:
    """Changed files from a data part: a list of paths, or an object with `changedFiles`
    (or `files`) holding one; anything else is not taken as files."""
    if isinstance(data, dict):
        data = data.get("changedFiles", data.get("files"))
    if isinstance(data, list):
        return [str(p)[:1000] for p in data if isinstance(p, str)][:CHANGED_FILES_MAX]
    return []


class A2APeerActivities:
    def __init__(
        self,
        pool: asyncpg.Pool,
        http: httpx.AsyncClient,
        settings: Settings,
        cipher: KeyCipher | None = None,
    ) -> None:
        self.pool = pool
        self.http = http
        self.settings = settings
        self._cipher = cipher

    @property
    def cipher(self) -> KeyCipher:
        return self._cipher or default_cipher()

    # --- calls ---------------------------------------------------------------------------

    async def _call(
        self, connection: dict[str, Any], method: str, params: dict[str, Any], timeout: float
    ) -> dict[str, Any]:
        return await a2a_peer.call(
            self.http,
            str(connection["a2a_endpoint"]),
            method,
            params,
            headers=a2a_peer.auth_headers(self.cipher, connection),
            max_bytes=self.settings.peer_reply_max_bytes,
            deadline=timeout,
        )

    async def _get(self, connection: dict[str, Any], task_id: str, timeout: float) -> pb.Task:
        # No message history: the state and the artifacts are what a run keeps.
        params = {"id": task_id, "historyLength": 0}
        result = await self._call(connection, "GetTask", params, timeout)
        return a2a_peer.parse_task(result, task_id)

    async def _row(self, agent_id: str) -> dict[str, Any]:
        row = await repos.get_requested_agent(self.pool, uuid.UUID(agent_id))
        if row is None:
            raise ApplicationError(
                f"no agent {agent_id}", type="agent_not_found", non_retryable=True
            )
        return row

    async def _connection(self, row: dict[str, Any], *, ending: bool) -> dict[str, Any]:
        connection = await repos.get_connection(self.pool, row["connection_id"])
        try:
            if ending:
                return require_active_or_ending(connection, ending=True)
            return require_active(connection)
        except FederationError as err:
            raise _as_activity_error(err) from None

    # --- reports -------------------------------------------------------------------------

    async def _report(
        self,
        row: dict[str, Any],
        state: AgentState,
        *,
        error: str | None = None,
        result: dict[str, Any] | None = None,
    ) -> AgentEvent:
        """Apply a report to the projection; one that changes nothing answers the run as it
        is (the workflow ignores it: its number is not newer)."""
        seq = next_seq(row, state)
        if seq is None:
            return AgentEvent(seq=int(row["seq"]), state=AgentState(row["state"]))
        await repos.apply_requester_update(
            self.pool,
            row["agent_id"],
            seq=seq,
            state=state,
            progress=None,
            result=result,
            error=error,
        )
        return AgentEvent(seq=seq, state=state, result=result, error=error)

    async def _report_task(
        self, connection: dict[str, Any], row: dict[str, Any], task: pb.Task
    ) -> AgentEvent:
        seen = a2a_peer.observed(task)
        if next_seq(row, seen.state) is None:
            return await self._report(row, seen.state)  # nothing new: artifacts not read
        result = None
        if seen.state in TERMINAL_STATES:
            result = await self._result(connection, row, seen)
        if seen.state in TERMINAL_STATES and seen.a2a_state not in a2a_peer.A2A_TERMINAL:
            await self._cancel_quietly(connection, seen.task_id)  # interrupted: ends here
        return await self._report(row, seen.state, error=seen.reason, result=result)

    async def _refuse(
        self, connection: dict[str, Any], row: dict[str, Any], err: FederationError
    ) -> AgentEvent:
        """An answer that is not A2A ends the run failed, saying why; the task (if known) is
        asked once to stop."""
        if row.get("remote_task_id"):
            await self._cancel_quietly(connection, str(row["remote_task_id"]))
        reason = f"{err.code}: {err.detail}"
        result = {"success": False, "stopReason": err.code, "summary": reason}
        return await self._report(row, AgentState.FAILED, error=reason, result=result)

    async def _cancel_quietly(self, connection: dict[str, Any], task_id: str) -> None:
        with contextlib.suppress(FederationError):
            await self._call(connection, "CancelTask", {"id": task_id}, 5.0)

    # --- artifacts -----------------------------------------------------------------------

    async def _result(
        self, connection: dict[str, Any], row: dict[str, Any], seen: a2a_peer.Observed
    ) -> dict[str, Any]:
        kept = _collect(seen.task)
        summary = "\n\n".join(t for t in kept.texts if t.strip()) or a2a_peer.status_text(seen.task)
        result: dict[str, Any] = {
            "success": seen.state == AgentState.COMPLETED,
            "summary": summary[:SUMMARY_MAX_CHARS],
            "stopReason": "a2a_" + pb.TaskState.Name(seen.a2a_state).lower(),
            "a2aTaskId": seen.task_id,
            "a2aState": pb.TaskState.Name(seen.a2a_state),
        }
        if len(summary) > SUMMARY_MAX_CHARS:
            result["summaryTruncated"], result["summaryChars"] = True, len(summary)
        diff = await self._diff_bytes(connection, kept) if kept.diff is not None else None
        if diff is not None:
            result.update(await self._keep_diff(row, diff))
            kept.files = kept.files or _diff_files(diff)
        if kept.files or diff is not None:
            result["changedFiles"] = kept.files[:CHANGED_FILES_MAX]
        if kept.refused:
            result["artifactsRefused"] = kept.refused
        return result

    async def _diff_bytes(self, connection: dict[str, Any], kept: _Kept) -> bytes | None:
        """The diff part's bytes: inline, or read from its URL (through the address policy,
        with the connection's credentials only on the agent's own origin), size-capped."""
        part, limit = kept.diff, self.settings.artifact_max_bytes
        assert part is not None
        if part.WhichOneof("content") == "raw":
            data: bytes = part.raw
        else:
            try:
                data = await self._fetch_url(connection, part.url, limit)
            except FederationError as err:
                kept.refused.append(f"diff: {err.detail}")
                return None
        if len(data) > limit:
            kept.refused.append(f"diff: larger than {limit} bytes; not kept")
            return None
        return data

    async def _fetch_url(self, connection: dict[str, Any], url: str, limit: int) -> bytes:
        await a2a_peer.check_url(url, self.settings)
        endpoint = urlsplit(str(connection["a2a_endpoint"]))
        same_origin = urlsplit(url)[:2] == endpoint[:2]
        headers = a2a_peer.auth_headers(self.cipher, connection) if same_origin else {}
        status, data = await request_bounded(
            self.http,
            "GET",
            url,
            max_bytes=limit,
            deadline=self.settings.peer_request_timeout,
            headers=headers,
        )
        if status != 200:
            raise PeerResponseInvalid(f"the diff's URL answered HTTP {status}")
        return data

    async def _keep_diff(self, row: dict[str, Any], data: bytes) -> dict[str, Any]:
        stored = await artifacts.put_bytes(
            self.pool,
            data,
            max_bytes=self.settings.artifact_max_bytes,
            chunk_bytes=self.settings.artifact_chunk_bytes,
        )
        await artifacts.link(
            self.pool,
            role="requester",
            peer_instance_id=row["peer_instance_id"],
            agent_id=row["agent_id"],
            kind="diff",
            artifact=stored,
        )
        preview = data[: self.settings.artifact_preview_bytes]
        return {
            "artifacts": {"diff": stored.reference()},
            "diffSha256": stored.sha256,
            "diffBytes": stored.bytes,
            "diffPreview": preview.decode(errors="replace"),
            "diffTruncated": len(preview) < len(data),
        }

    # --- activities ----------------------------------------------------------------------

    @activity.defn(name=A2A_SEND_MESSAGE)
    async def send_message(self, inp: SpawnAgentInput) -> AgentEvent:
        """SendMessage (messageId = agentId, non-blocking); its task is the run's."""
        with tracing.trace(inp.traceparent):
            row = await self._row(inp.agent_id)
            connection = await self._connection(row, ending=False)
            try:
                if row["remote_task_id"]:  # sent before, the answer lost: no second send
                    task = await self._get(
                        connection, row["remote_task_id"], inp.peer_timeout_seconds
                    )
                else:
                    task = await self._send(connection, row, inp)
                return await self._report_task(connection, row, task)
            except FederationError as err:  # an answer that is not A2A: the spawn fails
                raise _as_activity_error(err) from None

    async def _send(
        self, connection: dict[str, Any], row: dict[str, Any], inp: SpawnAgentInput
    ) -> pb.Task:
        params = a2a_peer.message_params(
            agent_id=inp.agent_id,
            task_id=inp.task_id,
            agent_type=inp.agent_type,
            context=inp.context,
            options=inp.options,
        )
        result = await self._call(connection, "SendMessage", params, inp.peer_timeout_seconds)
        if isinstance(result.get("message"), dict) and "task" not in result:
            raise A2AAnswerInvalid(
                "the A2A agent answered a message, not a task: a run needs a task to follow"
            )
        task = a2a_peer.parse_task(result.get("task") or {}, None)
        kept = await repos.keep_remote_task_id(self.pool, row["agent_id"], task.id)
        row["remote_task_id"] = kept
        if kept != task.id:  # a second task for the same message: the first one is the run's
            await self._cancel_quietly(connection, task.id)
            return await self._get(connection, kept, inp.peer_timeout_seconds)
        return task

    @activity.defn(name=A2A_GET_TASK)
    async def get_task(self, call: PeerCall) -> AgentEvent:
        """GetTask once, applied to the projection; an answer that is not A2A ends the run."""
        with tracing.trace(call.traceparent):
            row = await self._row(call.agent_id)
            connection = await self._connection(row, ending=True)
            if not row["remote_task_id"]:
                raise ApplicationError(
                    "no A2A task is known for this run yet", type="a2a_task_unknown"
                )
            try:
                task = await self._get(
                    connection, str(row["remote_task_id"]), call.peer_timeout_seconds
                )
                return await self._report_task(connection, row, task)
            except PeerResponseInvalid as err:  # A2AAnswerInvalid, an answer past the cap
                return await self._refuse(connection, row, err)
            except A2ARefused as err:
                if err.peer_code == str(a2a_peer.TASK_NOT_FOUND):
                    return await self._refuse(connection, row, err)
                raise _as_activity_error(err) from None
            except FederationError as err:
                raise _as_activity_error(err) from None

    @activity.defn(name=A2A_CANCEL_TASK)
    async def cancel_task(self, call: PeerCall) -> KillResult:
        """CancelTask: answered once the task is CANCELED (or had ended otherwise)."""
        with tracing.trace(call.traceparent):
            row = await self._row(call.agent_id)
            connection = await self._connection(row, ending=True)
            if not row["remote_task_id"]:
                raise ApplicationError(
                    "no A2A task is known for this run", type="agent_not_found", non_retryable=True
                )
            try:
                task = await self._cancel(
                    connection, str(row["remote_task_id"]), call.peer_timeout_seconds
                )
                event = await self._report_task(connection, row, task)
            except FederationError as err:
                raise _as_activity_error(err) from None
            if event.state in TERMINAL_STATES:
                await repos.note_kill_confirmed(self.pool, row["agent_id"])
            return KillResult(
                agent_id=call.agent_id,
                state=event.state,
                seq=event.seq,
                result=event.result,
                error=event.error,
            )

    async def _cancel(self, connection: dict[str, Any], task_id: str, timeout: float) -> pb.Task:
        """The task once final: CancelTask, then GetTask a few times while it is not."""
        try:
            result = await self._call(connection, "CancelTask", {"id": task_id}, timeout)
            task = a2a_peer.parse_task(result, task_id)
        except A2ARefused as err:
            if err.peer_code != str(a2a_peer.TASK_NOT_CANCELABLE):
                raise
            task = await self._get(connection, task_id, timeout)  # it had ended: as it says
        for _ in range(CANCEL_CHECKS):
            if task.status.state in a2a_peer.A2A_TERMINAL:
                return task
            await asyncio.sleep(CANCEL_CHECK_EVERY)
            task = await self._get(connection, task_id, timeout)
        if task.status.state in a2a_peer.A2A_TERMINAL:
            return task
        raise PeerUnreachable(
            f"the A2A agent's task is still {pb.TaskState.Name(task.status.state)} after the cancel"
        )


def _diff_files(diff: bytes) -> list[str]:
    return [m.decode(errors="replace") for m in DIFF_FILE.findall(diff)][:CHANGED_FILES_MAX]
