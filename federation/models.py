"""Pydantic models of the REST contract (XCreate in, XPublic out) and the wire payloads."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl

AgentType = Literal["worker", "reviewer", "tester"]
AgentState = Literal["spawning", "running", "completed", "failed", "killed", "timed_out"]
ConnectionStatus = Literal["PENDING", "ACTIVE", "SUSPENDED", "DISCONNECTED"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- connections ----------------------------------------------------------------------------


class ConnectionCreate(Strict):
    remoteUrl: HttpUrl


class ConnectionPublic(BaseModel):
    connectionId: uuid.UUID
    remoteInstanceId: str
    remoteName: str
    remoteUrl: str
    direction: Literal["outbound", "inbound"]
    status: ConnectionStatus
    grants: dict[str, Any]
    createdAt: datetime
    updatedAt: datetime
    peerNotified: bool | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any], **extra: Any) -> ConnectionPublic:
        return cls(
            connectionId=row["connection_id"],
            remoteInstanceId=row["remote_instance_id"],
            remoteName=row["remote_name"],
            remoteUrl=row["remote_url"],
            direction=row["direction"],
            status=row["status"],
            grants=row["grants"],
            createdAt=row["created_at"],
            updatedAt=row["updated_at"],
            **extra,
        )


# --- agents -------------------------------------------------------------------------------------


class AgentContext(Strict):
    repository: str | None = Field(default=None, max_length=2000)
    branch: str | None = Field(default=None, max_length=255)
    workItems: list[str] = Field(default_factory=list, max_length=200)
    instructions: str = Field(default="", max_length=100_000)


class AgentOptions(Strict):
    timeout: int = Field(default=3600, ge=1, le=7 * 24 * 3600, description="seconds")
    maxRetries: int = Field(default=0, ge=0, le=20)


class AgentSpawnCreate(Strict):
    agentId: uuid.UUID | None = None
    connectionId: uuid.UUID
    taskId: str = Field(min_length=1, max_length=200)
    agentType: AgentType
    context: AgentContext = Field(default_factory=AgentContext)
    options: AgentOptions = Field(default_factory=AgentOptions)


class AgentSpawnAccepted(BaseModel):
    agentId: uuid.UUID
    state: AgentState
    workflowId: str


class AgentPublic(BaseModel):
    agentId: uuid.UUID
    connectionId: uuid.UUID
    peerInstanceId: str
    taskId: str
    agentType: AgentType
    state: AgentState
    workflowId: str
    attempt: int
    progress: dict[str, Any] | None
    result: dict[str, Any] | None
    error: str | None
    context: dict[str, Any]
    options: dict[str, Any]
    createdAt: datetime
    updatedAt: datetime
    startedAt: datetime | None
    finishedAt: datetime | None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> AgentPublic:
        return cls(
            agentId=row["agent_id"],
            connectionId=row["connection_id"],
            peerInstanceId=row["peer_instance_id"],
            taskId=row["task_id"],
            agentType=row["agent_type"],
            state=row["state"],
            workflowId=row["workflow_id"],
            attempt=row["attempt"],
            progress=row["progress"],
            result=row["result"],
            error=row["error"],
            context=row["context"],
            options=row["options"],
            createdAt=row["created_at"],
            updatedAt=row["updated_at"],
            startedAt=row["started_at"],
            finishedAt=row["finished_at"],
        )


class AgentKillPublic(BaseModel):
    agentId: uuid.UUID
    state: AgentState


# --- wire payloads (inside signed envelopes) ----------------------------------------------------


class ConnectRequestPayload(Strict):
    connectionId: uuid.UUID
    url: HttpUrl
    name: str = Field(min_length=1, max_length=200)


class ConnectChangePayload(Strict):
    connectionId: uuid.UUID


class SpawnPayload(Strict):
    agentId: uuid.UUID
    taskId: str = Field(min_length=1, max_length=200)
    agentType: AgentType
    context: AgentContext
    options: AgentOptions


class AgentRefPayload(Strict):
    agentId: uuid.UUID


class AgentEventPayload(Strict):
    agentId: uuid.UUID
    seq: int = Field(ge=1)
    state: AgentState
    progress: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    attempt: int | None = None
