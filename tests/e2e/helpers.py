"""Small builders shared by the end-to-end tests."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any


def spawn_body(
    connection_id: str,
    instructions: str,
    *,
    agent_id: str | None = None,
    task_id: str = "t-1",
    agent_type: str = "worker",
    timeout: int = 60,
    max_retries: int = 0,
) -> dict[str, Any]:
    return {
        "agentId": agent_id or str(uuid.uuid4()),
        "connectionId": connection_id,
        "taskId": task_id,
        "agentType": agent_type,
        "context": {
            "repository": "example/repo",
            "branch": "main",
            "workItems": ["item"],
            "instructions": instructions,
        },
        "options": {"timeout": timeout, "maxRetries": max_retries},
    }


def processes_in(directory: Path) -> list[int]:
    """PIDs of the live processes of the sandbox working in `directory`.

    That is processes whose working directory is inside it (the process sandbox), processes
    whose arguments name it (bubblewrap: its argv mounts it and sets FEDAGENT_HOST_WORKSPACE),
    and every descendant of those: inside a bwrap sandbox /proc/PID/cwd shows the in-sandbox
    path (/workspace), and the agent can change its own cwd and environment, but it cannot
    leave bwrap's process tree (an orphan is reparented to the sandbox's pid 1).
    """
    target = str(directory.resolve())

    def inside(path: str) -> bool:
        return path == target or path.startswith(target + "/")

    parents: dict[int, int] = {}
    roots: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[-1].split()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if fields[0] in ("Z", "X"):
            continue
        parents[pid] = int(fields[1])
        try:
            cwd = os.readlink(entry / "cwd")
        except OSError:
            cwd = ""
        if inside(cwd) or any(inside(arg.decode(errors="replace")) for arg in argv):
            roots.add(pid)
    found = set(roots)
    grew = True
    while grew:
        children = {pid for pid, parent in parents.items() if parent in found} - found
        found |= children
        grew = bool(children)
    return sorted(found)
