"""The one place the console reads an agent's diff, and how it shows it (files, +/- lines)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from federation.users import User
from operations import Services, agents

MAX_SHOWN_LINES = 4000


async def agent_diff(services: Services, user: User, agent_id: uuid.UUID) -> str:
    """The whole diff of the agent's run as the user may see it ('' when there is none).

    Today it is the result's inline `diff` field; reading it from the diff artifact instead
    changes this function only.
    """
    row = await agents.get(services, user, agent_id)
    return str((row.get("result") or {}).get("diff") or "")


@dataclass
class DiffLine:
    kind: str  # "add", "del", "hunk", "ctx", "meta"
    text: str


@dataclass
class DiffFile:
    path: str
    added: int = 0
    removed: int = 0
    lines: list[DiffLine] = field(default_factory=list)


def parse_diff(text: str) -> tuple[list[DiffFile], bool]:
    """Files of a unified (git) diff with their added and removed line counts; the second value
    says whether lines were left out of `lines` to keep the page small."""
    files: list[DiffFile] = []
    shown = 0
    cut = False
    current: DiffFile | None = None
    in_hunk = False  # file headers (---/+++) come before a file's first hunk only
    for line in text.splitlines():
        if line.startswith("diff --git "):
            parts = line.split(" b/", 1)
            current = DiffFile(path=parts[1] if len(parts) == 2 else line[11:])
            files.append(current)
            in_hunk = False
            continue
        if current is None:
            current = DiffFile(path="(diff)")
            files.append(current)
        if line.startswith("@@"):
            in_hunk = True
        if not in_hunk and line.startswith(("+++ ", "--- ")):
            kind = "meta"
        elif line.startswith("+"):
            kind = "add"
            current.added += 1
        elif line.startswith("-"):
            kind = "del"
            current.removed += 1
        elif line.startswith("@@"):
            kind = "hunk"
        elif line.startswith(" "):
            kind = "ctx"
        else:
            kind = "meta"
        if shown < MAX_SHOWN_LINES:
            current.lines.append(DiffLine(kind, line))
            shown += 1
        else:
            cut = True
    return files, cut
