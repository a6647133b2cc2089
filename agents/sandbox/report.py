"""Which of a run's limits a sandbox cannot hold as asked, and how an operator fixes that.

A sandbox says in `enforced` how each limit is held. A limit held per run (a cgroup of the
sandbox's own, Docker's) is whole; one held per process (rlimits: the address space, CPU
seconds) is weaker, as a run's processes together are not bounded by it; one missing is not
enforced at all. The worker logs the gaps at start-up, records them for /readyz, and
`fedagent doctor` shows them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from agents.sandbox.base import Sandbox

Severity = Literal["error", "warning"]

FIX = (
    "give the sandboxes cgroups of their own: run the worker as root (each sandbox then runs "
    "as FEDAGENT_SANDBOX_UID in a cgroup of its own), or delegate a writable cgroup v2 subtree "
    "with the memory, pids and cpu controllers to the worker (systemd: Delegate=yes), or use "
    "FEDAGENT_SANDBOX=docker; and bound the worker's container as a whole (docker-compose.yml "
    "sets pids_limit, mem_limit and cpus on the workers)"
)
WHAT = {
    "memory": "memory",
    "pids": "processes",
    "cpu": "CPU",
}


@dataclass(frozen=True)
class LimitGap:
    limit: str  # memory | pids | cpu
    severity: Severity  # error: not enforced at all; warning: only per process
    detail: str

    def as_dict(self) -> dict[str, str]:
        return {"limit": self.limit, "severity": self.severity, "detail": self.detail}


def limit_gaps(sandbox: Sandbox) -> list[LimitGap]:
    """The limits this sandbox was asked for but does not hold for the run as a whole."""
    asked = {
        "memory": sandbox.limits.memory_bytes,
        "pids": sandbox.limits.pids,
        "cpu": sandbox.limits.cpus,
    }
    gaps: list[LimitGap] = []
    for limit, value in asked.items():
        if not value:
            continue
        how = sandbox.enforced.get(limit)
        if how is None:
            gaps.append(LimitGap(limit, "error", f"{WHAT[limit]} limit ({value}) is not enforced"))
        elif limit in ("memory", "cpu") and how.startswith("rlimit"):
            gaps.append(
                LimitGap(
                    limit,
                    "warning",
                    f"{WHAT[limit]} limit ({value}) holds per process only ({how}): a run's "
                    "processes together are not bounded by it",
                )
            )
    return gaps


def describe_gaps(gaps: list[LimitGap]) -> str:
    return "; ".join(gap.detail for gap in gaps)
