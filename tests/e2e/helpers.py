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
    """PIDs of live processes whose working directory is inside `directory`."""
    found: list[int] = []
    target = str(directory.resolve())
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
            state = (entry / "stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            continue
        if state != "Z" and (cwd == target or cwd.startswith(target + "/")):
            found.append(int(entry.name))
    return found
