"""The one place the console reads an agent's diff, and how it shows it (files, +/- lines)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from agents.text import text_of
from federation.errors import ArtifactNotReady
from federation.store import artifacts
from federation.users import User
from operations import Services
from operations import artifacts as artifact_ops

MAX_SHOWN_LINES = 4000
SHOWN_BYTES = 2 * 1024 * 1024  # of the diff on the page; the download has all of it


async def agent_diff(services: Services, user: User, agent_id: uuid.UUID) -> str:
    """The diff of the agent's run as the user may see it ('' while there is none), up to
    SHOWN_BYTES for the page: the whole diff artifact, fetched once from the executor and
    kept here (`operations.artifacts`, as `GET /agents/{id}/diff` does)."""
    try:
        artifact = await artifact_ops.of_agent(services, user, agent_id, "diff")
    except ArtifactNotReady:
        return ""
    head = await artifacts.read_range(services.pool, artifact, 0, SHOWN_BYTES)
    # The diff's bytes as text by the one rule (a NUL as \x00, a byte not UTF-8 as \xNN).
    return text_of(head, cut_end=len(head) == SHOWN_BYTES)


def result_diff_bytes(row: dict[str, Any]) -> int:
    """The size of the whole diff as the run's result names it."""
    return int((row.get("result") or {}).get("diffBytes") or 0)


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
