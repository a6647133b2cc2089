"""The vocabulary of states: an agent's state and a connection's status, defined once.

Both are `StrEnum`s, so a member *is* its wire string: rows, REST bodies, signed envelopes and
recorded workflow histories hold the same text as before, and a plain string read from any of
them compares equal to its member. This module imports nothing of the project, so every layer
(store, workflows, API, CLI) can use it without breaking the import arrows.
"""

from __future__ import annotations

from enum import StrEnum


class AgentState(StrEnum):
    """`spawning → running → completed | failed | killed | timed_out`; terminal states are final."""

    SPAWNING = "spawning"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    KILLED = "killed"
    TIMED_OUT = "timed_out"


# The states a run never leaves (a plain string from a row or a message tests `in` it too).
TERMINAL_STATES: frozenset[AgentState] = frozenset(
    {AgentState.COMPLETED, AgentState.FAILED, AgentState.KILLED, AgentState.TIMED_OUT}
)


class ConnectionKind(StrEnum):
    """What a connection's peer speaks: fedagent/1 (another instance) or A2A 1.0 (any A2A
    agent, added by its card URL)."""

    FEDAGENT = "fedagent"
    A2A = "a2a"


class ConnectionStatus(StrEnum):
    """PENDING until the peer answers; ACTIVE or SUSPENDED (by either side) while it lasts;
    DISCONNECTED for ever after."""

    PENDING = "PENDING"
    ACTIVE = "ACTIVE"
    SUSPENDED = "SUSPENDED"
    DISCONNECTED = "DISCONNECTED"


# A local run (one this instance runs for its own users, issue 23) is an executor row whose
# requester is this marker, not a peer: an instance id never starts with "_", so no peer's runs
# can be taken for local ones. Its connection id is the nil UUID (it came over no connection).
# How long a kill the requester decided is delivered to the executor before the delivery gives
# up (KillDelivery); the run's record is kept that long, since each try reads it.
KILL_DELIVERY_SECONDS = 7 * 24 * 3600.0
LOCAL_REQUESTER = "_local"
LOCAL_CONNECTION_ID = "00000000-0000-0000-0000-000000000000"
