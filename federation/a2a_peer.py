"""Any A2A 1.0 agent as a peer: its card, its JSON-RPC answers, and what they mean here.

A connection of kind `a2a` is added by an admin with the agent's card URL (and credentials);
this module holds the wire side of it, without Temporal or the store:

- `fetch_agent_card`: the card read through the outbound address policy, size-capped and
  deadlined, checked (a JSON-RPC interface of A2A 1.0 whose URL passes the policy too);
- `call`: one JSON-RPC call, its answer read with a cap and a total deadline; errors say what
  failed (`A2AAnswerInvalid` for an answer that is not JSON-RPC, `A2ARefused` for a JSON-RPC
  error, `PeerUnreachable` for what a retry may fix);
- `parse_task` and `observed`: an A2A task as a fedagent state (the mapping below), with the
  reason a state that takes no further input ends the run;
- `seal_credentials` / `open_credentials`: the credentials sealed under the master key, bound
  to their connection.

Everything an A2A agent answers is hostile until checked: it is parsed into the a2a-sdk's
protobuf types with bounded sizes, and a task that names another id is refused.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
from a2a.types import a2a_pb2 as pb
from google.protobuf.json_format import MessageToDict, ParseDict, ParseError

from federation.errors import (
    A2AAnswerInvalid,
    A2ACardInvalid,
    A2ARefused,
    PeerUnreachable,
)
from federation.keystore import KeyCipher
from federation.netpolicy import CARD_MAX_BYTES, AddressPolicy, request_bounded
from federation.settings import Settings
from federation.states import AgentState

WELL_KNOWN_CARD = "/.well-known/agent-card.json"
PROTOCOL_VERSION = "1.0"
# JSON-RPC errors of A2A 1.0 this side acts on.
TASK_NOT_FOUND = -32001
TASK_NOT_CANCELABLE = -32002
# Statuses a retry may fix (as for fedagent peers), and any 5xx.
TRANSIENT_STATUSES = {408, 425, 429}
NAME_MAX_CHARS = 200
# A task id is kept with the run (its row, its result) and sent back in every later call.
TASK_ID_MAX_CHARS = 256
REASON_MAX_CHARS = 2000

# A2A's state -> fedagent's, and the reason when the A2A state ends a run that it would not
# end there (a run takes no further input: asking for some ends it).
STATES: dict[int, AgentState] = {
    pb.TASK_STATE_SUBMITTED: AgentState.SPAWNING,
    pb.TASK_STATE_WORKING: AgentState.RUNNING,
    pb.TASK_STATE_COMPLETED: AgentState.COMPLETED,
    pb.TASK_STATE_FAILED: AgentState.FAILED,
    pb.TASK_STATE_CANCELED: AgentState.KILLED,
    pb.TASK_STATE_REJECTED: AgentState.FAILED,
    pb.TASK_STATE_INPUT_REQUIRED: AgentState.FAILED,
    pb.TASK_STATE_AUTH_REQUIRED: AgentState.FAILED,
}
WHY: dict[int, str] = {
    pb.TASK_STATE_REJECTED: "the A2A agent rejected the task",
    pb.TASK_STATE_INPUT_REQUIRED: "the A2A agent asks for more input; runs take no further input",
    pb.TASK_STATE_AUTH_REQUIRED: "the A2A agent asks for authorization; runs take no further input",
    pb.TASK_STATE_FAILED: "the A2A agent says the task failed",
    pb.TASK_STATE_CANCELED: "the A2A agent canceled the task",
}
# A2A states that are final there (an interrupted one is not, but it ends the run here).
A2A_TERMINAL = {
    pb.TASK_STATE_COMPLETED,
    pb.TASK_STATE_FAILED,
    pb.TASK_STATE_CANCELED,
    pb.TASK_STATE_REJECTED,
}


@dataclass(frozen=True)
class AgentCard:
    """What a connection keeps of an A2A agent's card."""

    card_url: str
    name: str
    endpoint: str  # the JSON-RPC interface's URL

    @property
    def peer_id(self) -> str:
        """The connection's peer id: stable for a card URL, a safe instance-id token."""
        return "a2a-" + hashlib.sha256(self.card_url.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Observed:
    """An A2A task as this side reads it."""

    task_id: str
    a2a_state: int
    state: AgentState
    reason: str | None
    task: pb.Task


def card_url_of(url: str) -> str:
    """The card's URL: the URL given if it names a .json file, else the well-known path."""
    url = url.strip()
    if urlsplit(url).path.endswith(".json"):
        return url
    return url.rstrip("/") + WELL_KNOWN_CARD


def _line(text: str, limit: int) -> str:
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())[:limit]


async def check_url(url: str, settings: Settings) -> None:
    """A URL an A2A agent named (its interface, an artifact) passes the address policy."""
    policy = AddressPolicy.from_settings(settings)
    host, port = policy.check_url(url)
    await policy.resolve(host, port)


async def fetch_agent_card(http: httpx.AsyncClient, url: str, settings: Settings) -> AgentCard:
    """Read and check an A2A agent's card (through the policy of `http`, capped, deadlined)."""
    card_url = card_url_of(url)
    status, raw = await request_bounded(
        http,
        "GET",
        card_url,
        max_bytes=CARD_MAX_BYTES,
        deadline=settings.peer_request_timeout,
        headers={"Accept": "application/json"},
    )
    if status != 200:
        raise PeerUnreachable(f"no agent card could be read at {card_url} (status {status})")
    try:
        card = ParseDict(json.loads(raw), pb.AgentCard(), ignore_unknown_fields=True)
    except (ValueError, ParseError, RecursionError, TypeError) as exc:
        raise A2ACardInvalid(f"{card_url} did not answer with an A2A agent card") from exc
    endpoint = next(
        (
            i.url
            for i in card.supported_interfaces
            if i.protocol_binding.upper() == "JSONRPC"
            and i.protocol_version.split(".")[0] == PROTOCOL_VERSION.split(".")[0]
        ),
        None,
    )
    if not endpoint:
        raise A2ACardInvalid(
            "the agent card names no JSON-RPC interface of A2A 1.0 (supportedInterfaces)"
        )
    await check_url(endpoint, settings)
    name = _line(card.name, NAME_MAX_CHARS) or urlsplit(card_url).netloc
    return AgentCard(card_url=card_url, name=name, endpoint=endpoint)


# --- credentials -----------------------------------------------------------------------


def _aad(connection_id: uuid.UUID) -> str:
    return f"a2a-credentials:{connection_id}"


def seal_credentials(cipher: KeyCipher, connection_id: uuid.UUID, token: str) -> str:
    """The credentials sealed under the master key, bound to the connection."""
    plain = json.dumps({"type": "bearer", "token": token}).encode()
    return cipher.seal(plain, key_id=_aad(connection_id))


def auth_headers(cipher: KeyCipher, connection: dict[str, Any]) -> dict[str, str]:
    """The headers the connection's credentials give (none if it has none)."""
    sealed = connection.get("credentials_sealed")
    if not sealed:
        return {}
    credentials = json.loads(cipher.open(sealed, key_id=_aad(connection["connection_id"])))
    return {"Authorization": f"Bearer {credentials['token']}"}


# --- JSON-RPC --------------------------------------------------------------------------


def _answer_of(status: int, raw: bytes, request_id: str) -> dict[str, Any]:
    """The JSON-RPC `result` of an answer; what is not one raises, saying why."""
    if status >= 500 or status in TRANSIENT_STATUSES:
        raise PeerUnreachable(f"the A2A agent answered HTTP {status}")
    if status in (401, 403):
        raise A2ARefused(
            f"the A2A agent refused the connection's credentials (HTTP {status})",
            peer_code=f"http_{status}",
            peer_status=status,
        )
    try:
        answer = json.loads(raw)
    except (ValueError, RecursionError):
        raise A2AAnswerInvalid(f"the A2A agent's answer (HTTP {status}) is not JSON") from None
    if not isinstance(answer, dict) or answer.get("jsonrpc") != "2.0":
        raise A2AAnswerInvalid(f"the A2A agent's answer (HTTP {status}) is not JSON-RPC 2.0")
    if answer.get("id") != request_id:
        raise A2AAnswerInvalid("the A2A agent's answer is for another JSON-RPC request id")
    error = answer.get("error")
    if isinstance(error, dict) and isinstance(error.get("code"), int):
        message = _line(str(error.get("message") or ""), REASON_MAX_CHARS)
        raise A2ARefused(
            f"the A2A agent answered error {error['code']}: {message}",
            peer_code=str(error["code"]),
            peer_status=status,
        )
    result = answer.get("result")
    if status != 200 or not isinstance(result, dict):
        raise A2AAnswerInvalid(f"the A2A agent's answer (HTTP {status}) has no result object")
    return result


async def call(
    http: httpx.AsyncClient,
    endpoint: str,
    method: str,
    params: dict[str, Any],
    *,
    headers: dict[str, str],
    max_bytes: int,
    deadline: float,
) -> dict[str, Any]:
    """One JSON-RPC call of A2A 1.0; its `result` object."""
    request_id = str(uuid.uuid4())
    status, raw = await request_bounded(
        http,
        "POST",
        endpoint,
        max_bytes=max_bytes,
        deadline=deadline,
        json={"jsonrpc": "2.0", "id": request_id, "method": method, "params": params},
        headers={"A2A-Version": PROTOCOL_VERSION, "Accept": "application/json", **headers},
    )
    return _answer_of(status, raw, request_id)


def parse_task(result: dict[str, Any], expected_id: str | None) -> pb.Task:
    """A task of an answer, checked: it has an id, and the one asked about when one was."""
    try:
        task = ParseDict(result, pb.Task(), ignore_unknown_fields=True)
    except (ParseError, RecursionError, TypeError, ValueError) as exc:
        raise A2AAnswerInvalid(f"the A2A agent's task is malformed: {exc}"[:300]) from None
    if not task.id:
        raise A2AAnswerInvalid("the A2A agent answered a task without an id")
    if len(task.id) > TASK_ID_MAX_CHARS or not task.id.isprintable():
        raise A2AAnswerInvalid(
            f"the A2A agent answered a task id of {len(task.id)} characters"
            f" ({TASK_ID_MAX_CHARS} at most, printable): {_line(task.id, 80)!r}"
        )
    if expected_id is not None and task.id != expected_id:
        raise A2AAnswerInvalid(
            f"the A2A agent answered about task {_line(task.id, 80)!r}, not {expected_id!r}"
        )
    return task


def observed(task: pb.Task) -> Observed:
    """The task's state as a fedagent state, with the reason when it ends the run otherwise
    than completed."""
    a2a_state = task.status.state
    state = STATES.get(a2a_state)
    if state is None:
        raise A2AAnswerInvalid(f"the A2A agent answered task state {a2a_state}, not one of A2A 1.0")
    reason = WHY.get(a2a_state)
    said = status_text(task)
    if reason is not None and said:
        reason = f"{reason}: {said}"
    return Observed(task_id=task.id, a2a_state=a2a_state, state=state, reason=reason, task=task)


def status_text(task: pb.Task) -> str:
    """The text of the task's status message, bounded."""
    text = " ".join(p.text for p in task.status.message.parts if p.text)
    return _line(text, REASON_MAX_CHARS)


def message_params(
    *,
    agent_id: str,
    task_id: str,
    agent_type: str,
    context: dict[str, Any],
    options: dict[str, Any],
) -> dict[str, Any]:
    """SendMessage's params: the instructions as text, the spawn as a data part, the agentId as
    messageId (an agent that keeps messages once makes no second task on a retry), and
    non-blocking (`returnImmediately`)."""
    fields: dict[str, Any] = {"agentType": agent_type}
    for key in ("repository", "branch", "model"):
        if context.get(key):
            fields[key] = context[key]
    if context.get("workItems"):
        fields["workItems"] = list(context["workItems"])
    for key in ("timeout", "maxRetries"):
        if options.get(key) is not None:
            fields[key] = options[key]
    message = pb.Message(
        message_id=agent_id,
        context_id=task_id,
        role=pb.ROLE_USER,
        parts=[pb.Part(text=str(context.get("instructions") or ""))],
    )
    ParseDict(fields, message.parts.add().data)
    request = pb.SendMessageRequest(
        message=message,
        configuration=pb.SendMessageConfiguration(return_immediately=True),
    )
    return MessageToDict(request)
