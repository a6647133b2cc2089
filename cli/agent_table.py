"""The table `fedagent agents` prints: one line per agent at any terminal width.

Ids stay whole (they are what `fedagent status` and `fedagent kill` take); the other cells are
cut with an ellipsis rather than wrapped, and the type, peer and age columns come only where
the terminal has room for them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich import box
from rich.table import Table
from rich.text import Text

from cli.follow import describe_progress, state_text

WIDE = 120  # from this width on, every column fits
TASK_WIDTH = 24
FIXED = ("agent", "state")
PEER_KINDS = ("fedagent", "a2a")


def _line(value: str | Text) -> Text:
    text = value if isinstance(value, Text) else Text(value)
    text.no_wrap, text.overflow = True, "ellipsis"
    return text


def agents_table(
    rows: list[dict[str, Any]],
    peers: dict[str, str],
    *,
    hosted: bool,
    width: int,
    ago: Callable[[str | None], str] = str,
) -> Table:
    """`rows` as the REST lists answer them; `peers` names peer instance ids; `ago` turns a
    creation time into "5m ago"."""
    who = "requester" if hosted else "peer"
    columns = ["agent", "state", "task", "progress / error"]
    if width >= WIDE:
        columns[2:2] = ["type"]
        columns[4:4] = [who]
        columns.append("created")
    elif hosted:
        columns[2:2] = [who]
    table = Table(header_style="bold", box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1, 0, 0))
    for column in columns:
        # Agent and state keep their width; the others give way, each cell cut to one line.
        table.add_column(
            _line(column),
            no_wrap=column in FIXED,
            max_width=TASK_WIDTH if column in ("task", who) else None,
        )
    for row in rows:
        peer = peers.get(row["peerInstanceId"], str(row["peerInstanceId"])[:12])
        if not hosted and row.get("peerKind") in PEER_KINDS:  # an A2A agent or an instance
            peer = f"{peer} ({row['peerKind']})"  # (a run hosted here: always an instance's)
        cells: dict[str, Any] = {
            "agent": str(row["agentId"]),
            "state": state_text(str(row["state"])),
            "type": str(row["agentType"]),
            "task": str(row["taskId"]),
            who: peer,
            "progress / error": (
                Text(str(row["error"]), style="red")
                if row.get("error")
                else Text(describe_progress(row.get("progress")))
            ),
            "created": ago(row.get("createdAt")),
        }
        table.add_row(*(cells[c] if c in FIXED else _line(cells[c]) for c in columns))
    return table
