"""Frozen dataclasses passed in and out of workflows and activities, and the names they share.

New fields get defaults so that running workflows keep replaying. The dataclasses are built by
keyword (`kw_only`): a field added anywhere never shifts the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from temporalio.common import SearchAttributeKey, SearchAttributePair, TypedSearchAttributes

from federation.states import KILL_DELIVERY_SECONDS as KILL_DELIVERY_SECONDS
from federation.states import LOCAL_REQUESTER as LOCAL_REQUESTER

# Re-exported: workflow code imports only this module.
from federation.states import TERMINAL_STATES as TERMINAL_STATES
from federation.states import AgentState as AgentState

# Activities' registered names: recorded histories replay by them, so they never change.
SEND_SPAWN = "send_spawn"
SEND_KILL = "send_kill"
RECORD_REQUESTER_FINAL = "record_requester_final"
ADMIT_RUN = "admit_run"
RUN_AGENT = "run_agent"
# Errors no retry of the same try can fix.
AGENT_FAILED = "AgentFailed"
AGENT_TIMED_OUT = "AgentTimedOut"
TASK_INVALID = "TaskInvalid"
# The store refuses a final record (a value it can never take): retrying cannot help.
STORE_REFUSED = "StoreRefused"
# The store stayed away longer than a running agent's writes wait for it: the activity asks for
# its next attempt later (next_retry_delay) than the retry policy's backoff would.
STORE_UNAVAILABLE = "StoreUnavailable"
# The executor records first, then tells the requester (best effort); the requester long-polls.
RECORD_RUN_FINAL = "record_run_final"
NOTIFY_REQUESTER = "notify_requester"
CHECK_STATUS = "check_status"
# A kill the requester decided, delivered until the executor confirms (KillDeliveryWorkflow).
DELIVER_KILL = "deliver_kill"
# The runs of a connection that ended (suspended, disconnected), ended durably.
END_CONNECTION_RUNS = "end_connection_runs"
AGENT_KILLED = "AgentKilled"
# The requester's side of a run on an A2A agent (a connection of kind a2a).
A2A_SEND_MESSAGE = "a2a_send_message"
A2A_GET_TASK = "a2a_get_task"
A2A_CANCEL_TASK = "a2a_cancel_task"
# What a connection's peer speaks (federation.states.ConnectionKind): the transport of a run.
TRANSPORT_FEDAGENT = "fedagent"
TRANSPORT_A2A = "a2a"
# Custom search attributes operators filter by in the Temporal Web UI.
SA_AGENT_ID = SearchAttributeKey.for_keyword("AgentId")
SA_TASK_ID = SearchAttributeKey.for_keyword("TaskId")
SA_PEER_INSTANCE = SearchAttributeKey.for_keyword("PeerInstance")
SA_AGENT_TYPE = SearchAttributeKey.for_keyword("AgentType")
SA_AGENT_STATE = SearchAttributeKey.for_keyword("AgentState")
SEARCH_ATTRIBUTES = {
    "AgentId": "Keyword",
    "TaskId": "Keyword",
    "PeerInstance": "Keyword",
    "AgentType": "Keyword",
    "AgentState": "Keyword",
}


def agent_search_attributes(
    *,
    agent_id: str,
    task_id: str,
    peer: str,
    agent_type: str,
    state: AgentState = AgentState.SPAWNING,
) -> TypedSearchAttributes:
    return TypedSearchAttributes(
        [
            SearchAttributePair(SA_AGENT_ID, agent_id),
            SearchAttributePair(SA_TASK_ID, task_id),
            SearchAttributePair(SA_PEER_INSTANCE, peer),
            SearchAttributePair(SA_AGENT_TYPE, agent_type),
            SearchAttributePair(SA_AGENT_STATE, state),
        ]
    )


def remote_agent_workflow_id(agent_id: str) -> str:
    return f"remote-agent/{agent_id}"


def kill_delivery_workflow_id(agent_id: str) -> str:
    return f"deliver-kill/{agent_id}"


def end_runs_workflow_id(connection_id: str, change: str) -> str:
    """One per connection and change (its status and when it changed): started once."""
    return f"end-runs/{connection_id}/{change}"


def agent_run_workflow_id(requester_instance_id: str, agent_id: str) -> str:
    return f"agent-run/{requester_instance_id}/{agent_id}"


# --- requester side ----------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class SpawnAgentInput:
    agent_id: str
    connection_id: str
    peer_instance_id: str
    peer_name: str
    task_id: str
    agent_type: str
    context: dict[str, Any]
    options: dict[str, Any]
    spawn_deadline_seconds: int = 600
    status_poll_seconds: int = 15
    peer_timeout_seconds: float = 15.0
    traceparent: str = ""
    # durable-core: the grace after timeout x tries + spawn deadline before the run ends
    # timed_out, how long a kill tries to reach the peer before it ends the run here unconfirmed.
    deadline_grace_seconds: float = 120.0
    kill_deadline_seconds: float = 15.0
    # quiet-poll: how long without news (a state change) before the requester asks agent.status
    # once; events bring each change at once, the check is for the lost ones. Each check that
    # finds nothing new doubles the quiet spell, up to status_check_max_seconds.
    poll_after_quiet_seconds: float = 2.0
    status_check_max_seconds: float = 300.0
    # Set when continuing as new: the run's absolute deadline, that the spawn was sent, and
    # what the run knew.
    deadline: str = ""
    spawned: bool = False
    carried: AgentStatus | None = None
    # Tests: continue as new once the history has this many events (0: when Temporal suggests).
    continue_as_new_after_events: int = 0
    # How the peer is spoken to, from the connection's kind at start: fedagent/1 or A2A 1.0.
    transport: str = TRANSPORT_FEDAGENT


@dataclass(frozen=True, kw_only=True)
class AgentEvent:
    """What the executor reports about a run; `seq` orders reports of one agent."""

    seq: int
    state: AgentState
    progress: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    attempt: int | None = None


@dataclass(frozen=True, kw_only=True)
class PeerCall:
    agent_id: str
    connection_id: str
    peer_timeout_seconds: float = 15.0
    traceparent: str = ""


@dataclass(frozen=True, kw_only=True)
class KillRequest:
    reason: str = "killed by user"
    # The requester asked and hears the final state in the kill's answer: no event of it.
    answered: bool = False


@dataclass(frozen=True, kw_only=True)
class KillResult:
    agent_id: str
    state: AgentState
    seq: int = 0
    result: dict[str, Any] | None = None
    error: str | None = None
    # False when the run was ended here without the executor confirming the sandbox is gone.
    confirmed: bool = True


@dataclass(frozen=True, kw_only=True)
class KillDelivery:
    """Tell the executor to kill a run the requester ended without its word (an unconfirmed
    kill, its own time-out, a terminated workflow); retried with backoff until it answers."""

    agent_id: str
    traceparent: str = ""
    first_retry_seconds: float = 2.0
    max_retry_seconds: float = 300.0
    # After this long the delivery gives up (its workflow fails, for an operator to see).
    give_up_after_seconds: float = KILL_DELIVERY_SECONDS


@dataclass(frozen=True, kw_only=True)
class EndConnectionRuns:
    """Kill the runs of a connection that was suspended or disconnected (`status`)."""

    connection_id: str
    status: str


@dataclass(frozen=True, kw_only=True)
class RequesterFinal:
    agent_id: str
    state: AgentState
    result: dict[str, Any] | None = None
    error: str | None = None
    # Decided here without the executor's word: the store marks its kill pending with the
    # final (one statement), so the kill is delivered even if this workflow dies right after.
    tell_executor: bool = False


@dataclass(frozen=True, kw_only=True)
class RecordedFinal:
    """The final state the store holds once a record ran: terminal states are final there, so
    a record that came second finds the first one and answers that. `written`: it is the
    workflow's own final (recorded now, or the same one before); then the result is left out
    (None): the workflow has it."""

    state: AgentState
    result: dict[str, Any] | None = None
    error: str | None = None
    seq: int = 0
    written: bool = True


@dataclass(frozen=True, kw_only=True)
class AgentStatus:
    agent_id: str
    state: AgentState
    seq: int = 0
    progress: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    attempt: int | None = None


# --- executor side -----------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class AgentRunInput:
    """The signed agent.spawn exactly as received, so the history holds who asked for what."""

    envelope: dict[str, Any]
    received_at: str
    # durable-core: how long telling the requester the final state is retried (best effort).
    notify_deadline_seconds: float = 120.0
    # A local run (issue 23): the spawn as this instance's user asked it (agentId, taskId,
    # agentType, context, options, workspace), instead of a peer's signed envelope (then {}).
    local: dict[str, Any] | None = None


@dataclass(frozen=True, kw_only=True)
class RunTask:
    agent_id: str
    requester_id: str
    connection_id: str
    task_id: str
    agent_type: str
    context: dict[str, Any]
    timeout_seconds: int
    max_retries: int
    workflow_id: str
    heartbeat_interval: float = 5.0
    # Which try of the agent this is (1 + agent failures so far); infrastructure retries of the
    # same try (a lost worker) keep the number and resume from the last heartbeat.
    attempt: int = 1
    agent_task_queue: str = ""
    traceparent: str = ""
    # durable-core: the try's absolute end (RFC 3339), the same across infrastructure retries.
    deadline: str = ""


@dataclass(frozen=True, kw_only=True)
class AgentOutcome:
    summary: str
    result: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class FinishRun:
    agent_id: str
    requester_id: str
    state: AgentState
    result: dict[str, Any] | None = None
    error: str | None = None
    attempt: int | None = None
    traceparent: str = ""
