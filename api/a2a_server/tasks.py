"""fedagent's runs as A2A tasks, and A2A messages as spawns: the one mapping of both ways.

A task is an agent this instance's users spawned (a local run, or one on a peer): its id is
the agentId, its contextId the agent's taskId. States map one way everywhere (STATES). A
message's text parts are the instructions; the rest of the spawn comes from a data part or
from `metadata.fedagent`, both a `SpawnFields` object (unknown fields are refused).
"""

from __future__ import annotations

import uuid
from typing import Any, cast

from a2a.types import a2a_pb2 as pb
from a2a.utils.errors import ContentTypeNotSupportedError, InvalidParamsError
from google.protobuf.json_format import MessageToDict, ParseDict
from google.protobuf.struct_pb2 import Struct, Value
from pydantic import Field, ValidationError

from federation.models import AgentContext, AgentOptions, AgentSpawnCreate, AgentType, Line, Strict
from federation.states import AgentState
from federation.users import User

# fedagent's state -> A2A's (refused by limits is REJECTED: such a spawn leaves no run).
STATES: dict[str, int] = {
    AgentState.SPAWNING: pb.TASK_STATE_SUBMITTED,
    AgentState.RUNNING: pb.TASK_STATE_WORKING,
    AgentState.COMPLETED: pb.TASK_STATE_COMPLETED,
    AgentState.FAILED: pb.TASK_STATE_FAILED,
    AgentState.TIMED_OUT: pb.TASK_STATE_FAILED,
    AgentState.KILLED: pb.TASK_STATE_CANCELED,
}
# An A2A state asked for in ListTasks -> the fedagent states it covers.
STATES_OF: dict[int, list[str]] = {}
for _state, _a2a in STATES.items():
    STATES_OF.setdefault(_a2a, []).append(str(_state))
TERMINAL = {
    pb.TASK_STATE_COMPLETED,
    pb.TASK_STATE_FAILED,
    pb.TASK_STATE_CANCELED,
    pb.TASK_STATE_REJECTED,
}
# Message ids name a task per user: uuid5 of the user and the messageId is its agentId.
MESSAGE_NAMESPACE = uuid.UUID("6f1c8a52-23a2-4a2a-9d3e-0f3d5a2a2a23")
INLINE_DIFF_BYTES = 64 * 1024


class SpawnFields(Strict):
    """The spawn context of an A2A message (a data part, or `metadata.fedagent`)."""

    agentType: AgentType = "worker"
    repository: Line | None = Field(default=None, max_length=2000)
    branch: Line | None = Field(default=None, max_length=255)
    workItems: list[str] = Field(default_factory=list, max_length=200)
    model: Line | None = Field(default=None, max_length=200)
    timeout: int = Field(default=3600, ge=1, le=7 * 24 * 3600, description="seconds")
    maxRetries: int = Field(default=0, ge=0, le=20)
    queue: bool = False
    # A connection (its id) to run the agent on that peer; none: a local run.
    connectionId: uuid.UUID | None = None


def agent_id_for(user: User, message_id: str, salt: str = "") -> uuid.UUID:
    """The same messageId from the same user is the same task (the agents' unique id);
    `salt`: more that names it (the conformance mode's content digest)."""
    name = f"{user.workspace}\n{user.name}\n{message_id}" + (f"\n{salt}" if salt else "")
    return uuid.uuid5(MESSAGE_NAMESPACE, name)


def _invalid(message: str, exc: ValidationError | None = None) -> InvalidParamsError:
    fields = sorted({".".join(str(p) for p in e["loc"]) for e in exc.errors()}) if exc else []
    return InvalidParamsError(
        message=message + (f": {', '.join(fields)}" if fields else ""),
        data={"reason": "spawn_invalid", "fields": ",".join(fields)},
    )


def spawn_of(message: pb.Message, user: User, salt: str = "") -> AgentSpawnCreate:
    """The spawn a message asks for; InvalidParams (nothing stored) when it is not one."""
    if not message.message_id:
        raise InvalidParamsError(message="message.messageId is required")
    if message.role != pb.ROLE_USER:
        raise InvalidParamsError(message="message.role must be ROLE_USER")
    texts: list[str] = []
    fields: dict[str, Any] | None = None
    for part in message.parts:
        kind = part.WhichOneof("content")
        if kind == "text":
            texts.append(part.text)
        elif kind == "data" and fields is None:
            fields = _struct_dict(part.data)
        else:
            raise ContentTypeNotSupportedError(
                message=f"a {kind or 'empty'} part is not taken: send text and one data part"
            )
    meta = (
        _struct_dict_of(message.metadata).get("fedagent") if message.HasField("metadata") else None
    )
    if fields is None and meta is not None:
        fields = meta
    if fields is not None and not isinstance(fields, dict):
        raise InvalidParamsError(message="the spawn context must be an object")
    try:
        spawn = SpawnFields.model_validate(fields or {})
        agent_id = agent_id_for(user, message.message_id, salt)
        return AgentSpawnCreate(
            agentId=agent_id,
            connectionId=spawn.connectionId,
            # A message of no context starts one: named after its task (a resend, the same).
            taskId=message.context_id or str(agent_id),
            agentType=spawn.agentType,
            context=AgentContext(
                repository=spawn.repository,
                branch=spawn.branch,
                workItems=spawn.workItems,
                instructions="\n\n".join(texts),
                model=spawn.model,
            ),
            options=AgentOptions(
                timeout=spawn.timeout, maxRetries=spawn.maxRetries, queue=spawn.queue
            ),
        )
    except ValidationError as exc:
        raise _invalid("the message is not a valid spawn", exc) from None


def _struct_dict(value: Value) -> Any:
    return MessageToDict(value)


def _struct_dict_of(struct: Struct) -> dict[str, Any]:
    return MessageToDict(struct)


def _status(row: dict[str, Any]) -> pb.TaskStatus:
    status = pb.TaskStatus(state=STATES[row["state"]])  # type: ignore[arg-type]
    status.timestamp.FromDatetime(row["updated_at"])
    if row["state"] in (AgentState.FAILED, AgentState.TIMED_OUT, AgentState.KILLED):
        reason = f"{row['state']}: {row['error'] or ''}".rstrip(": ")
        status.message.CopyFrom(agent_message(row, reason))
    return status


def agent_message(row: dict[str, Any], text: str) -> pb.Message:
    return pb.Message(
        message_id=str(uuid.uuid4()),
        context_id=row["task_id"],
        task_id=str(row["agent_id"]),
        role=pb.ROLE_AGENT,
        parts=[pb.Part(text=text)],
    )


def task_of(row: dict[str, Any], artifacts: list[pb.Artifact] | None = None) -> pb.Task:
    task = pb.Task(
        id=str(row["agent_id"]),
        context_id=row["task_id"],
        status=_status(row),
        artifacts=artifacts or [],
    )
    ParseDict(
        {
            "agentId": str(row["agent_id"]),
            "state": row["state"],
            "agentType": row["agent_type"],
            "peerInstanceId": row["peer_instance_id"],
        },
        task.metadata,
    )
    return task


def rejected_task(body: AgentSpawnCreate, reason: str, code: str) -> pb.Task:
    """What a spawn refused by this instance's limits answers: REJECTED, and nothing kept."""
    agent_id = str(body.agentId)
    status = pb.TaskStatus(state=pb.TASK_STATE_REJECTED)
    status.message.CopyFrom(
        pb.Message(
            message_id=str(uuid.uuid4()),
            context_id=body.taskId,
            task_id=agent_id,
            role=pb.ROLE_AGENT,
            parts=[pb.Part(text=f"{code}: {reason}")],
        )
    )
    task = pb.Task(id=agent_id, context_id=body.taskId, status=status)
    ParseDict({"code": code}, task.metadata)
    return task


def result_artifacts(
    row: dict[str, Any], *, diff_url: str, diff: bytes | None
) -> list[pb.Artifact]:
    """The summary as text, the diff as a file part (inline when small, else by URI to the
    authenticated download), the changed files as data."""
    result = row.get("result") or {}
    out: list[pb.Artifact] = []
    if result.get("summary"):
        out.append(
            pb.Artifact(
                artifact_id="summary", name="summary", parts=[pb.Part(text=result["summary"])]
            )
        )
    if result.get("diffSha256"):
        part = pb.Part(media_type="text/x-diff", filename="changes.diff")
        if diff is not None:
            part.raw = diff
        else:
            part.url = diff_url
        out.append(pb.Artifact(artifact_id="diff", name="diff", parts=[part]))
    if result.get("changedFiles") is not None:
        files = pb.Part(media_type="application/json")
        # a JSON list into the part's google.protobuf.Value (the stubs know only dicts)
        ParseDict(cast(Any, list(result["changedFiles"])), files.data)
        out.append(pb.Artifact(artifact_id="changed-files", name="changed files", parts=[files]))
    return out
