"""The A2A request handler: each A2A method is a call of `operations` (spawn, get, list, kill,
the event log, artifacts), its answer mapped by `tasks`. The a2a-sdk's JSON-RPC dispatcher
calls it (`api.a2a_server.router`)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator
from datetime import UTC
from typing import Any

from a2a.server.context import ServerCallContext
from a2a.server.events.event_queue import Event
from a2a.server.request_handlers.request_handler import RequestHandler, validate_request_params
from a2a.types import a2a_pb2 as pb
from a2a.utils.errors import (
    ExtendedAgentCardNotConfiguredError,
    InternalError,
    InvalidParamsError,
    InvalidRequestError,
    PushNotificationNotSupportedError,
    TaskNotCancelableError,
    TaskNotFoundError,
    UnsupportedOperationError,
)

from api.a2a_server import conformance, tasks
from api.event_stream import Lease
from federation.errors import (
    AgentIdConflict,
    AgentNotFound,
    CapacityExceeded,
    FederationError,
    GrantDenied,
    QueueFull,
    TooManyStreams,
)
from federation.states import TERMINAL_STATES
from federation.users import User
from operations import Services, agents
from operations import artifacts as artifact_ops

PAGE_SIZE = 50
PAGE_SIZE_MAX = 100
OFFSET_MAX = 1_000_000  # as the REST lists' `offset`
WAIT_STEP = 20.0  # a blocking SendMessage re-reads the run at least this often
FINAL = 15  # the low bits of a stream's final status event id (see `_stream`)


def _who(context: ServerCallContext) -> tuple[Services, User]:
    return context.state["fedagent_services"], context.state["fedagent_user"]


def _agent_id(task_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(task_id)
    except ValueError:
        raise TaskNotFoundError(message=f"no task {task_id[:100]!r}") from None


async def _row(services: Services, user: User, task_id: str) -> dict[str, Any]:
    try:
        return await agents.get(services, user, _agent_id(task_id))
    except AgentNotFound:
        raise TaskNotFoundError(message=f"no task {task_id[:100]!r}") from None


async def _lease(services: Services, user: User, agent_id: uuid.UUID) -> Lease:
    """A place among the token's open streams (the REST event streams' rules: bounded per
    token, ended by its revocation), for an answer held open: a stream, a blocking send."""
    try:
        return await Lease.take(services, user, agent_id)
    except TooManyStreams as err:
        raise InvalidRequestError(message=err.detail, data={"reason": err.code}) from None


def _sse_id(context: ServerCallContext, value: int) -> None:
    """The SSE id of the event about to be yielded (the dispatcher puts it on the event)."""
    context.state["sse_id"] = value


class FedagentRequestHandler(RequestHandler):
    async def _task(self, services: Services, user: User, row: dict[str, Any]) -> pb.Task:
        return tasks.task_of(row, await self._artifacts(services, user, row))

    async def _artifacts(
        self, services: Services, user: User, row: dict[str, Any]
    ) -> list[pb.Artifact]:
        if row["state"] not in TERMINAL_STATES or not row.get("result"):
            return []
        diff = None
        if (row["result"] or {}).get("diffSha256"):
            diff = await artifact_ops.small(
                services, user, row["agent_id"], "diff", tasks.INLINE_DIFF_BYTES
            )
        url = f"{services.settings.public_url.rstrip('/')}/api/v1/federation/agents"
        return tasks.result_artifacts(row, diff_url=f"{url}/{row['agent_id']}/diff", diff=diff)

    async def _send(
        self, params: pb.SendMessageRequest, context: ServerCallContext, *, hold: bool
    ) -> tuple[dict[str, Any] | pb.Task | pb.Message, Lease | None]:
        """Spawn what the message asks (its row), or the REJECTED task of a refused spawn
        (or, in the conformance mode only, the TCK's own answer). `hold`: the answer is held
        open (a stream, a blocking send): its lease among the token's streams is taken first,
        so that a send past the bound is refused with nothing stored or started."""
        services, user = _who(context)
        if params.configuration.HasField("task_push_notification_config"):
            raise PushNotificationNotSupportedError(
                message="this agent sends no push notifications (capabilities.pushNotifications"
                " is false): send the message without taskPushNotificationConfig"
            )
        salt = ""
        if services.settings.a2a_conformance and params.message.message_id.startswith(
            conformance.PREFIX
        ):
            if (answer := conformance.answer(params.message)) is not None:
                return answer, None
            salt = conformance.content_key(params.message)
        if params.message.task_id:
            row = await _row(services, user, params.message.task_id)
            raise UnsupportedOperationError(
                message=f"task {row['agent_id']} is {row['state']}: a run takes no further input"
            )
        body = tasks.spawn_of(params.message, user, salt)
        if salt:  # the conformance mode's tck- message
            body.context.instructions = conformance.runnable(
                params.message.message_id, body.context.instructions
            )
        traceparent = context.state.get("headers", {}).get("traceparent", "")
        assert body.agentId is not None  # derived from the messageId
        lease = await _lease(services, user, body.agentId) if hold else None
        held = False
        try:
            accepted = await agents.spawn(services, user, body, traceparent=traceparent)
            row = await agents.get(services, user, accepted.agentId)
            held = True
            return row, lease
        except (GrantDenied, CapacityExceeded, QueueFull) as err:
            return tasks.rejected_task(body, err.detail, err.code), None
        except AgentIdConflict:
            raise InvalidParamsError(
                message="this messageId already names another task of this user",
                data={"reason": "agent_id_conflict"},
            ) from None
        except FederationError as err:
            if err.status >= 500:  # this instance's fault (Temporal away): not the params'
                raise InternalError(message=err.detail, data={"reason": err.code}) from None
            raise InvalidParamsError(message=err.detail, data={"reason": err.code}) from None
        finally:
            if lease is not None and not held:
                await lease.release()

    @validate_request_params
    async def on_message_send(
        self, params: pb.SendMessageRequest, context: ServerCallContext
    ) -> pb.Task | pb.Message:
        services, user = _who(context)
        blocking = not params.configuration.return_immediately
        row, lease = await self._send(params, context, hold=blocking)
        if isinstance(row, pb.Task | pb.Message):
            return row
        if lease is None:
            return await self._task(services, user, row)
        try:  # held open like a stream: bounded per token, ended by its revocation
            loop = asyncio.get_running_loop()
            while row["state"] not in TERMINAL_STATES:
                if lease.due(loop.time()) and not await lease.still_valid():
                    raise InvalidRequestError(
                        message="the API token was revoked or has expired while waiting",
                        data={"reason": "unauthenticated"},
                    )
                step = min(WAIT_STEP, lease.interval)
                row = await agents.wait_for_change(services, user, row["agent_id"], row, step)
            return await self._task(services, user, row)
        finally:
            await lease.release()

    @validate_request_params
    async def on_message_send_stream(
        self, params: pb.SendMessageRequest, context: ServerCallContext
    ) -> AsyncGenerator[Event]:
        row, lease = await self._send(params, context, hold=True)
        if isinstance(row, pb.Task | pb.Message):
            _sse_id(context, 0)
            yield row
            return
        assert lease is not None
        async for event in self._stream(context, row, resume=None, lease=lease):
            yield event

    @validate_request_params
    async def on_subscribe_to_task(
        self, params: pb.SubscribeToTaskRequest, context: ServerCallContext
    ) -> AsyncGenerator[Event]:
        services, user = _who(context)
        row = await _row(services, user, params.id)
        resume = _last_event_id(context)
        if resume is not None and not await _of_this_stream(services, user, row, resume):
            raise InvalidParamsError(message="Last-Event-ID is not an id of this task's stream")
        if resume is None and row["state"] in TERMINAL_STATES:
            raise UnsupportedOperationError(
                message=f"task {params.id} is {row['state']}: nothing more will happen"
            )
        if resume is not None and resume & 0xF == FINAL:
            return  # resumed after the final status: the stream had ended
        async for event in self._stream(context, row, resume=resume):
            yield event

    async def _stream(
        self,
        context: ServerCallContext,
        row: dict[str, Any],
        *,
        resume: int | None,
        lease: Lease | None = None,
    ) -> AsyncGenerator[Event]:
        """The task's snapshot, then each change of state, then (at its end) the artifacts
        and the final status; each event's SSE id is `log id << 4 | n` (n: 0 for a state,
        1.. for the final's artifacts, FINAL for the final), so that Last-Event-ID resumes.
        `lease`: the stream's, if taken already (else taken here)."""
        services, user = _who(context)
        if lease is None:
            lease = await _lease(services, user, row["agent_id"])
        try:
            async for event in self._events(context, row, resume, lease):
                yield event
        finally:
            await lease.release()

    async def _events(
        self, context: ServerCallContext, row: dict[str, Any], resume: int | None, lease: Lease
    ) -> AsyncGenerator[Event]:
        services, user = _who(context)
        agent_id = row["agent_id"]
        skip = 0
        if resume is None:
            log = await agents.events_after(services, user, agent_id, 0, 100_000)
            cursor = log[-1]["id"] if log else 0
            row = await agents.get(services, user, agent_id)
            _sse_id(context, cursor << 4)
            yield await self._task(services, user, row)
            if row["state"] in TERMINAL_STATES:
                return
        else:
            cursor, skip = resume >> 4, resume & 0xF
            if skip:
                cursor -= 1  # within the final's events: read the final again
        last_state = row["state"] if resume is None else None
        while True:
            for event in await agents.events_after(services, user, agent_id, cursor):
                cursor = event["id"]
                if event["state"] in TERMINAL_STATES:
                    async for out in self._final(context, agent_id, cursor, skip):
                        yield out
                    return
                if event["state"] != last_state:
                    last_state = event["state"]
                    _sse_id(context, cursor << 4)
                    yield pb.TaskStatusUpdateEvent(
                        task_id=str(agent_id),
                        context_id=row["task_id"],
                        status=pb.TaskStatus(state=tasks.STATES[event["state"]]),  # type: ignore[arg-type]
                    )
            if lease.due(asyncio.get_running_loop().time()) and not await lease.still_valid():
                return  # the token was revoked or has expired
            row = await agents.wait_for_change(services, user, agent_id, row, 1.0)

    async def _final(
        self, context: ServerCallContext, agent_id: uuid.UUID, cursor: int, skip: int
    ) -> AsyncGenerator[Event]:
        """The artifacts (those after `skip`), then the final status: the stream's end."""
        services, user = _who(context)
        row = await agents.get(services, user, agent_id)
        found = await self._artifacts(services, user, row)
        for number, artifact in enumerate(found, start=1):
            if number <= skip:
                continue
            _sse_id(context, cursor << 4 | number)
            yield pb.TaskArtifactUpdateEvent(
                task_id=str(agent_id),
                context_id=row["task_id"],
                artifact=artifact,
                last_chunk=True,
            )
        _sse_id(context, cursor << 4 | FINAL)
        yield pb.TaskStatusUpdateEvent(
            task_id=str(agent_id), context_id=row["task_id"], status=tasks.task_of(row).status
        )

    @validate_request_params
    async def on_get_task(self, params: pb.GetTaskRequest, context: ServerCallContext) -> pb.Task:
        services, user = _who(context)
        return await self._task(services, user, await _row(services, user, params.id))

    @validate_request_params
    async def on_list_tasks(
        self, params: pb.ListTasksRequest, context: ServerCallContext
    ) -> pb.ListTasksResponse:
        services, user = _who(context)
        size = params.page_size or PAGE_SIZE
        if not 1 <= size <= PAGE_SIZE_MAX:
            raise InvalidParamsError(message=f"pageSize must be 1 to {PAGE_SIZE_MAX}")
        try:
            offset = int(params.page_token or "0")
            if not 0 <= offset <= OFFSET_MAX:
                raise ValueError
        except ValueError:
            raise InvalidParamsError(message="pageToken is not one this server gave") from None
        states = None
        if params.status != pb.TASK_STATE_UNSPECIFIED:
            states = tasks.STATES_OF.get(params.status, [])
        after = None
        if params.HasField("status_timestamp_after"):
            after = params.status_timestamp_after.ToDatetime(tzinfo=UTC)
        rows = await agents.list_(
            services,
            user,
            state=states,
            task_id=params.context_id or None,
            updated_after=after,
            limit=size,
            offset=offset,
            count=True,
        )
        total = int(rows[0]["total_count"]) if rows else 0
        more = offset + len(rows) < total
        # Artifacts (a diff read from the store each) only when asked: the spec's default.
        if params.include_artifacts:
            found = [await self._task(services, user, r) for r in rows]
        else:
            found = [tasks.task_of(r) for r in rows]
        return pb.ListTasksResponse(
            tasks=found,
            next_page_token=str(offset + len(rows)) if more else "",
            page_size=size,
            total_size=total,
        )

    @validate_request_params
    async def on_cancel_task(
        self, params: pb.CancelTaskRequest, context: ServerCallContext
    ) -> pb.Task:
        services, user = _who(context)
        row = await _row(services, user, params.id)
        if row["state"] in TERMINAL_STATES:
            raise TaskNotCancelableError(
                message=f"task {params.id} is {row['state']}: it cannot be canceled"
            )
        try:
            await agents.kill(services, user, row["agent_id"])
        except FederationError as err:
            raise InternalError(message=err.detail, data={"reason": err.code}) from None
        return await self._task(services, user, await agents.get(services, user, row["agent_id"]))

    async def on_create_task_push_notification_config(
        self, params: pb.TaskPushNotificationConfig, context: ServerCallContext
    ) -> pb.TaskPushNotificationConfig:
        raise PushNotificationNotSupportedError

    async def on_get_task_push_notification_config(
        self, params: pb.GetTaskPushNotificationConfigRequest, context: ServerCallContext
    ) -> pb.TaskPushNotificationConfig:
        raise PushNotificationNotSupportedError

    async def on_list_task_push_notification_configs(
        self, params: pb.ListTaskPushNotificationConfigsRequest, context: ServerCallContext
    ) -> pb.ListTaskPushNotificationConfigsResponse:
        raise PushNotificationNotSupportedError

    async def on_delete_task_push_notification_config(
        self, params: pb.DeleteTaskPushNotificationConfigRequest, context: ServerCallContext
    ) -> None:
        raise PushNotificationNotSupportedError

    async def on_get_extended_agent_card(
        self, params: pb.GetExtendedAgentCardRequest, context: ServerCallContext
    ) -> pb.AgentCard:
        raise ExtendedAgentCardNotConfiguredError


async def _of_this_stream(
    services: Services, user: User, row: dict[str, Any], event_id: int
) -> bool:
    """Whether an SSE id names an event of this task's log (see `_stream`): another task's,
    or one past the log's end, would resume a stream that never ends."""
    cursor = event_id >> 4
    if cursor == 0:  # the snapshot of a task with no log yet
        return True
    found = await agents.events_after(services, user, row["agent_id"], cursor - 1, 1)
    return bool(found) and found[0]["id"] == cursor


def _last_event_id(context: ServerCallContext) -> int | None:
    value = context.state.get("headers", {}).get("last-event-id")
    if value is None:
        return None
    try:
        cursor = int(value)
        if not 0 <= cursor < 1 << 62:  # a log id (bigint) << 4, and its low bits
            raise ValueError
    except ValueError:
        raise InvalidParamsError(message="Last-Event-ID is not an id of this stream") from None
    return cursor
