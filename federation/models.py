"""Pydantic models of the REST contract (XCreate in, XPublic out) and the wire payloads."""

from __future__ import annotations

import json
import re
import uuid
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal, Self, TypeVar

from pydantic import (
    AfterValidator,
    AliasGenerator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    HttpUrl,
    SecretStr,
    ValidationError,
    model_validator,
)
from pydantic.alias_generators import to_snake
from pydantic_core import PydanticCustomError

from federation.errors import InvalidPayload
from federation.states import AgentState, ConnectionKind, ConnectionStatus

if TYPE_CHECKING:
    from federation.envelope import Envelope

AgentType = Literal["worker", "reviewer", "tester"]
KeyAlgorithm = Literal["Ed25519", "RSA-PSS-SHA256"]


# The problem code of text this instance refuses to keep (see `Strict` and `Line`).
TEXT_INVALID = "text_invalid"
# What a one-line field (a name, an id, a URL) never holds: C0 controls, DEL, C1 controls.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _storable(text: str) -> bool:
    """Whether PostgreSQL can keep `text`: no NUL, and UTF-8 (no unpaired surrogate)."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _refuse_unstorable(data: Any) -> Any:
    """Every string in `data` (keys too, at any depth) storable, or a `text_invalid` error."""
    stack: list[tuple[Any, str]] = [(data, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if not _storable(value):
                raise PydanticCustomError(
                    TEXT_INVALID,
                    "text at {path} holds NUL or an unpaired surrogate, which cannot be stored",
                    {"path": _CONTROL.sub("?", path)[:200] or "the top level"},
                )
        elif isinstance(value, dict):
            for key, item in value.items():
                stack.append((key, path))
                stack.append((item, f"{path}.{key}" if path else str(key)))
        elif isinstance(value, list):
            stack.extend((item, f"{path}[{i}]") for i, item in enumerate(value))
    return data


def _one_line(text: str) -> str:
    if _CONTROL.search(text):
        raise PydanticCustomError(
            TEXT_INVALID, "control characters (NUL, line breaks, escapes) are not allowed here"
        )
    return text


# A name, an id, a URL, a pattern: one line of text without control characters.
Line = Annotated[str, AfterValidator(_one_line)]


class Strict(BaseModel):
    """A request or a message: unknown fields are refused, and so is text that PostgreSQL
    cannot keep (NUL, unpaired surrogates) anywhere in it, keys included: one rule for every
    model of what users and peers send, so that no such string reaches the store."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _storable_text(cls, data: Any) -> Any:
        return _refuse_unstorable(data)


class StrictAgentOutput(BaseModel):
    """A message that carries what an agent produced (events, transcript entries): unknown
    fields refused; the bytes of the agent's text are the transcript's and the event's own
    rule, not refused here."""

    model_config = ConfigDict(extra="forbid")


class FromRow(BaseModel):
    """An output model read from a store row: each camelCase field is read from the row's
    snake_case column (`agentId` from `agent_id`); other columns are left out. Fields can also
    be given by name (`from_row(row, peerNotified=True)`). Output stays camelCase."""

    model_config = ConfigDict(
        alias_generator=AliasGenerator(validation_alias=to_snake),
        validate_by_name=True,
        validate_by_alias=True,
    )

    @classmethod
    def from_row(cls, row: dict[str, Any], **extra: Any) -> Self:
        return cls.model_validate({**row, **extra})


# --- connections ----------------------------------------------------------------------------


class ConnectionCreate(Strict):
    """A fedagent peer by its URL, or (`kind: "a2a"`) an A2A agent by its card URL."""

    remoteUrl: HttpUrl
    # What the peer may ask of this instance over it; default: nothing until granted.
    grants: GrantsUpdate | None = None
    kind: ConnectionKind = ConnectionKind.FEDAGENT
    # An A2A agent's bearer credentials (kept sealed; never shown again).
    token: SecretStr | None = Field(default=None, min_length=1, max_length=4096)

    @model_validator(mode="after")
    def _fields_of_the_kind(self) -> ConnectionCreate:
        if self.kind == ConnectionKind.A2A and self.grants is not None:
            raise ValueError("an A2A agent may ask nothing of this instance: no grants")
        if self.kind == ConnectionKind.FEDAGENT and self.token is not None:
            raise ValueError("a token is for an A2A agent (kind a2a) only")
        return self


class ConnectionPublic(FromRow):
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
    # Which side holds the connection SUSPENDED: "local" (this instance), "remote" or "both".
    suspendedBy: str | None = None
    # What the peer allows this instance, as it last told us (None: it has not said).
    peerGrants: dict[str, Any] | None = None
    # What the peer speaks: fedagent/1, or A2A 1.0 (then its JSON-RPC interface).
    kind: ConnectionKind = ConnectionKind.FEDAGENT
    a2aEndpoint: str | None = Field(default=None, validation_alias="a2a_endpoint")
    hasCredentials: bool = False

    @classmethod
    def from_row(cls, row: dict[str, Any], **extra: Any) -> Self:
        sealed = {"hasCredentials": bool(row.get("credentials_sealed"))}
        return super().from_row(row, **{**sealed, **extra})


class PeerPublic(BaseModel):
    """A connection as any local user sees it: whom a spawn can go to and what the peer allows
    this instance (`peerGrants`, as the peer last told us; None while it has not said)."""

    connectionId: uuid.UUID
    peerInstanceId: str
    peerName: str
    status: ConnectionStatus
    peerGrants: dict[str, Any] | None = None
    kind: ConnectionKind = ConnectionKind.FEDAGENT

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> PeerPublic:
        return cls(
            kind=row.get("kind") or ConnectionKind.FEDAGENT,
            connectionId=row["connection_id"],
            peerInstanceId=row["remote_instance_id"],
            peerName=row["remote_name"],
            status=row["status"],
            peerGrants=row.get("peer_grants"),
        )


# --- agents -------------------------------------------------------------------------------------


class AgentContext(Strict):
    repository: Line | None = Field(default=None, max_length=2000)
    branch: Line | None = Field(default=None, max_length=255)
    workItems: list[str] = Field(default_factory=list, max_length=200)
    instructions: str = Field(default="", max_length=100_000)
    # A model to run the agent with; the executor accepts only those it allows.
    model: Line | None = Field(default=None, max_length=200)


class AgentOptions(Strict):
    timeout: int = Field(default=3600, ge=1, le=7 * 24 * 3600, description="seconds")
    maxRetries: int = Field(default=0, ge=0, le=20)
    # Past the executor's capacity: wait for a free slot instead of a 429.
    queue: bool = False


class AgentSpawnCreate(Strict):
    agentId: uuid.UUID | None = None
    # The connection whose peer runs the agent; none: a local run, on this instance.
    connectionId: uuid.UUID | None = None
    taskId: Line = Field(min_length=1, max_length=200)
    agentType: AgentType
    context: AgentContext = Field(default_factory=AgentContext)
    options: AgentOptions = Field(default_factory=AgentOptions)


class AgentSpawnAccepted(BaseModel):
    agentId: uuid.UUID
    state: AgentState
    workflowId: str


class AgentPublic(FromRow):
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
    # Requester: a kill or an end decided here is still being delivered to the executor
    # (false), or the executor confirmed it (true); null when this side decided no end.
    killConfirmed: bool | None = None
    # The kind of peer the agent runs on: its connection's kind (`fedagent`: another
    # instance, `a2a`: an A2A agent), or `local` for a local run.
    peerKind: Literal["fedagent", "a2a", "local"] | None = None
    # What became of that kill: pending (being delivered), confirmed (the executor stopped the
    # run), too_late (the run had ended there on its own first: `state` says how), not_found
    # (the executor has no such run) or undeliverable (no retry could deliver it; see the note).
    killDelivery: str | None = None
    killDeliveryNote: str | None = None


class AgentKillPublic(BaseModel):
    agentId: uuid.UUID
    state: AgentState
    # False: the executor could not be told yet; the run ended here and the kill is delivered
    # in the background (with backoff, across restarts) until the executor confirms.
    confirmed: bool = True


# --- wire payloads (inside signed envelopes) ----------------------------------------------------


def _canonical_uuid(value: Any) -> Any:
    """A peer's agentId: the canonical lower-case hyphenated form, nothing else."""
    if not isinstance(value, str) and not isinstance(value, uuid.UUID):
        raise ValueError("must be a UUID string")
    if isinstance(value, str) and str(uuid.UUID(value)) != value:
        raise ValueError("must be a canonical UUID (lower case, hyphenated)")
    return value


CanonicalUUID = Annotated[uuid.UUID, BeforeValidator(_canonical_uuid)]


class KeyEndorsement(Strict):
    """The key a new key replaced (`keyId`) signed it: see federation.envelope.endorse."""

    keyId: str = Field(min_length=1, max_length=128)
    signature: str = Field(min_length=1, max_length=1024)


class PeerKey(Strict):
    keyId: Line = Field(min_length=1, max_length=128)
    algorithm: KeyAlgorithm
    publicKey: str = Field(min_length=1, max_length=8192)
    validFrom: str | None = Field(default=None, max_length=64)
    validUntil: str | None = Field(default=None, max_length=64)
    status: str | None = Field(default=None, max_length=32)
    endorsement: KeyEndorsement | None = None


class ConnectRequestPayload(Strict):
    connectionId: uuid.UUID
    url: HttpUrl
    name: Line = Field(min_length=1, max_length=200)
    # The sender's public keys: its signature is verified with them before its card is read.
    keys: list[PeerKey] = Field(min_length=1, max_length=8)


class ConnectChangePayload(Strict):
    connectionId: uuid.UUID
    # connection.accept and connection.grants_changed: what the sender now allows the recipient.
    grants: dict[str, Any] | None = None


class SpawnPayload(Strict):
    agentId: CanonicalUUID
    taskId: Line = Field(min_length=1, max_length=200)
    agentType: AgentType
    context: AgentContext
    options: AgentOptions


class AgentRefPayload(Strict):
    agentId: CanonicalUUID
    # agent.status as a long-poll: hold the answer until the record's seq is past afterSeq and
    # its state is not knownState, or waitSeconds pass.
    afterSeq: int | None = Field(default=None, ge=0)
    knownState: AgentState | None = None
    waitSeconds: float | None = Field(default=None, gt=0, le=60)


ArtifactKind = Literal["diff", "log", "transcript"]


class AgentArtifactPayload(Strict):
    """agent.artifact: bytes [offset, offset + length) of one artifact of the sender's run,
    named by its kind or its sha256 (the answer is bounded; a reader asks chunk by chunk)."""

    agentId: CanonicalUUID
    kind: ArtifactKind | None = None
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    offset: int = Field(default=0, ge=0)
    length: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _named(self) -> AgentArtifactPayload:
        if self.kind is None and self.sha256 is None:
            raise ValueError("agent.artifact needs kind or sha256")
        return self


class AgentEventPayload(StrictAgentOutput):
    agentId: CanonicalUUID
    seq: int = Field(ge=1)
    state: AgentState
    progress: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    attempt: int | None = None


# Largest transcript entry a requester keeps (its JSON form): an executor's entries hold
# bounded heads and tails of text (agents/conversation.py), far below this.
TRANSCRIPT_ENTRY_MAX_BYTES = 256 * 1024
TRANSCRIPT_MAX_SEQ = 10_000_000


def _entry_size(entry: dict[str, Any]) -> int:
    return len(json.dumps(entry, separators=(",", ":")).encode())


class TranscriptEntry(BaseModel):
    """One numbered entry of an agent's transcript as an executor sends it. The fields that
    readers (REST, SSE, the console) rely on have their types checked, others are kept as
    sent; the whole entry is bounded in size."""

    model_config = ConfigDict(extra="allow", strict=True)
    seq: int = Field(ge=1, le=TRANSCRIPT_MAX_SEQ)
    kind: str = Field(pattern=r"^[a-z][a-z_]{0,49}$")
    attempt: int | None = Field(default=None, ge=1, le=100_000)
    at: str | None = Field(default=None, max_length=64)
    turn: int | None = Field(default=None, ge=0, le=TRANSCRIPT_MAX_SEQ)
    text: str | None = None
    output: str | None = None
    input: dict[str, Any] | None = None
    usage: dict[str, Any] | None = None
    name: str | None = Field(default=None, max_length=1000)
    callId: str | None = Field(default=None, max_length=1000)
    model: str | None = Field(default=None, max_length=1000)
    stopReason: str | None = Field(default=None, max_length=1000)
    path: str | None = Field(default=None, max_length=4096)
    exitCode: int | None = Field(default=None, ge=-(2**31), le=2**31)
    outputChars: int | None = Field(default=None, ge=0)
    isError: bool | None = None
    interrupted: bool | None = None
    textCut: bool | None = None
    outputCut: bool | None = None

    @model_validator(mode="after")
    def _bounded(self) -> TranscriptEntry:
        if self.at is not None:
            try:
                aware = datetime.fromisoformat(self.at).tzinfo is not None
            except ValueError:
                aware = False
            if not aware:
                raise ValueError("at must be an RFC 3339 timestamp with its offset")
        if _entry_size(self.kept()) > TRANSCRIPT_ENTRY_MAX_BYTES:
            raise ValueError(f"an entry is at most {TRANSCRIPT_ENTRY_MAX_BYTES} bytes of JSON")
        return self

    def kept(self) -> dict[str, Any]:
        """The entry as it is stored: the fields the executor sent, nothing added."""
        return self.model_dump(exclude_unset=True)


def _ascending(entries: list[TranscriptEntry]) -> None:
    seqs = [e.seq for e in entries]
    if any(b <= a for a, b in zip(seqs, seqs[1:], strict=False)):
        raise ValueError("entries must be numbered in ascending order, each once")


class TranscriptEventPayload(StrictAgentOutput):
    """EVENT agent.transcript: entries that continue the run's transcript, and its length."""

    agentId: CanonicalUUID
    entries: list[TranscriptEntry] = Field(max_length=2000)
    total: int = Field(default=0, ge=0, le=TRANSCRIPT_MAX_SEQ)

    @model_validator(mode="after")
    def _numbered(self) -> TranscriptEventPayload:
        _ascending(self.entries)
        return self


class TranscriptPullPayload(Strict):
    """COMMAND agent.transcript: the entries numbered above `after` (a page of them)."""

    agentId: CanonicalUUID
    after: int = Field(default=0, ge=0)
    limit: int = Field(default=200, ge=1, le=1000)


class TranscriptPullReply(BaseModel):
    """The executor's answer to agent.transcript (unknown fields ignored: a newer executor
    may say more)."""

    agentId: CanonicalUUID
    entries: list[TranscriptEntry] = Field(default_factory=list, max_length=1000)
    total: int = Field(default=0, ge=0, le=TRANSCRIPT_MAX_SEQ)
    truncated: bool = False

    def check_answers(self, agent_id: uuid.UUID, after: int, limit: int) -> None:
        """The reply is for this agent and holds at most `limit` entries numbered above
        `after`, in order (ValueError if not)."""
        if self.agentId != agent_id:
            raise ValueError("the reply is about another agent")
        if len(self.entries) > limit:
            raise ValueError(f"the reply holds more than the {limit} entries asked for")
        if self.entries and self.entries[0].seq <= after:
            raise ValueError(f"the reply holds entries numbered {after} or below")
        _ascending(self.entries)


class TranscriptPage(BaseModel):
    """GET agents/{id}/transcript: a page of entries, in order."""

    agentId: uuid.UUID
    entries: list[dict[str, Any]]
    # The number of the last entry returned (pass it as `after` for the next page).
    next: int
    # Entries this instance holds so far, and how many the executor reported for the run.
    stored: int
    total: int | None = None
    truncated: bool = False
    complete: bool = False


# --- trust: grants, instance configuration, keys, audit -----------------------------------------

CommandType = Literal["agent.spawn", "agent.status", "agent.kill", "agent.artifact"]
GlobPattern = Annotated[str, Field(min_length=1, max_length=500)]
# What an admin sets: one line (rows stored before this rule still read as GlobPattern).
NewGlobPattern = Annotated[Line, Field(min_length=1, max_length=500)]


def _all_command_types() -> list[CommandType]:
    return ["agent.spawn", "agent.status", "agent.kill", "agent.artifact"]


def _all_agent_types() -> list[AgentType]:
    return ["worker", "reviewer", "tester"]


class Grants(BaseModel):
    """What a peer may ask of this instance over one connection (checked on every command)."""

    commandTypes: list[CommandType] = Field(default_factory=_all_command_types, max_length=10)
    agentTypes: list[AgentType] = Field(default_factory=_all_agent_types, max_length=10)
    # Agents of this peer running here at once; None: only the instance's own limit applies.
    maxConcurrentAgents: int | None = Field(default=None, ge=0, le=100_000)
    # Longest options.timeout (seconds) this peer may ask for; None: the instance's limit.
    maxTimeout: int | None = Field(default=None, ge=1, le=7 * 24 * 3600)
    # Glob patterns (fnmatch, case-sensitive) a spawn's context.repository must match.
    repositories: list[GlobPattern] = Field(default_factory=lambda: ["*"], max_length=200)


class GrantsUpdate(Strict):
    """Fields given replace the current ones; fields left out stay as they are."""

    commandTypes: list[CommandType] | None = Field(default=None, max_length=10)
    agentTypes: list[AgentType] | None = Field(default=None, max_length=10)
    maxConcurrentAgents: int | None = Field(default=None, ge=0, le=100_000)
    maxTimeout: int | None = Field(default=None, ge=1, le=7 * 24 * 3600)
    repositories: list[NewGlobPattern] | None = Field(default=None, max_length=200)

    def apply(self, current: dict[str, Any] | None) -> Grants:
        base = Grants.model_validate({**Grants().model_dump(), **(current or {})})
        changes = self.model_dump(exclude_unset=True)
        for name in ("commandTypes", "agentTypes", "repositories"):
            if name in changes and changes[name] is None:
                raise ValueError(f"{name} cannot be null; send [] to allow nothing")
        return Grants.model_validate({**base.model_dump(), **changes})


class ConnectionAccept(Strict):
    grants: GrantsUpdate | None = None


class ConnectionUpdate(Strict):
    grants: GrantsUpdate


class CapabilitiesUpdate(Strict):
    agentTypes: list[AgentType] | None = Field(default=None, max_length=10)
    commandTypes: list[CommandType] | None = Field(default=None, max_length=10)
    sandboxes: list[Annotated[Line, Field(min_length=1, max_length=50)]] | None = Field(
        default=None, max_length=20
    )
    modelProviders: list[Annotated[Line, Field(min_length=1, max_length=50)]] | None = Field(
        default=None, max_length=20
    )


class InstanceUpdate(Strict):
    name: Line | None = Field(default=None, min_length=1, max_length=200)
    capabilities: CapabilitiesUpdate | None = None
    metadata: dict[str, Any] | None = None


class KeyRotate(Strict):
    algorithm: KeyAlgorithm = "Ed25519"
    # How long the current key still verifies; default: the instance's setting (24 h).
    graceSeconds: int | None = Field(default=None, ge=0, le=30 * 24 * 3600)


class KeyPublic(BaseModel):
    keyId: str
    algorithm: KeyAlgorithm
    publicKey: str
    status: Literal["active", "retiring"]
    validFrom: str
    validUntil: str | None


class KeyRotated(BaseModel):
    keyId: str
    algorithm: KeyAlgorithm
    retired: list[dict[str, Any]]
    keys: list[KeyPublic]


class AuditEntryPublic(BaseModel):
    id: int
    at: datetime
    actor: str
    action: str
    outcome: str
    details: dict[str, Any]


class AuditPage(BaseModel):
    items: list[AuditEntryPublic]
    # Pass as `before` for the next (older) page; None when this is the last one.
    nextBefore: int | None


# --- commands: one-off signed commands sent by a local user -------------------------------------


class CommandCreate(Strict):
    connectionId: uuid.UUID
    # Only what needs no workflow: spawns and kills go through /agents.
    commandType: Literal["agent.status"]
    payload: AgentRefPayload


class CommandPublic(FromRow):
    commandId: uuid.UUID
    connectionId: uuid.UUID
    peerInstanceId: str
    commandType: str
    payload: dict[str, Any]
    messageId: str
    status: Literal["answered", "refused", "failed"]
    response: dict[str, Any] | None
    error: dict[str, Any] | None
    workspace: str
    actor: str
    createdAt: datetime


PayloadT = TypeVar("PayloadT", bound=BaseModel)


def payload_of(model: type[PayloadT], envelope: Envelope) -> PayloadT:
    """The envelope's payload as `model`; 422 `payload_invalid` naming the fields that fail."""
    try:
        return model.model_validate(envelope.payload)
    except ValidationError as exc:
        fields = sorted({".".join(str(p) for p in e["loc"]) for e in exc.errors()})
        raise InvalidPayload(
            f"payload of {envelope.commandType} is invalid: {', '.join(fields)}", fields=fields
        ) from exc
