"""The limits of local runs: what this instance lets its own users run here (issue 23).

Grants-like, from the settings: agent types, repository patterns and longest timeout are
checked by the same rule as a peer's grants (`check_grants`), when the spawn is admitted and
again before each try; the per-workspace count of unfinished runs when it is admitted.
"""

from __future__ import annotations

from typing import Any, get_args

from federation.models import AgentType
from federation.settings import Settings
from federation.trust import check_grants


def local_grants(settings: Settings, offered_agent_types: list[str] | None) -> dict[str, Any]:
    """The settings as a connection's grants: what a local user may spawn here."""
    agent_types = settings.local_agent_types or list(offered_agent_types or get_args(AgentType))
    agent_types = [t for t in agent_types if t in get_args(AgentType)]
    return {
        "commandTypes": ["agent.spawn"],
        "agentTypes": agent_types,
        "maxTimeout": settings.local_max_timeout,
        "repositories": settings.local_repositories,
    }


def check_local_spawn(
    settings: Settings, payload: dict[str, Any], offered_agent_types: list[str] | None
) -> None:
    """Refuse (403 grant_*, 422 payload_invalid) a local spawn past this instance's limits."""
    check_grants(
        {"grants": local_grants(settings, offered_agent_types)},
        "agent.spawn",
        payload,
        max_timeout=settings.max_agent_timeout,
        offered_agent_types=offered_agent_types,
    )
