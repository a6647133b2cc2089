"""`fedagent spawn --follow` and `fedagent status --follow`: a live view of one agent from the SSE
stream (resumed with Last-Event-ID after a dropped connection), then its result.

By default it shows the conversation as it happens (the agent's text, each command with the
tail of its output and its exit code, file edits as paths); `--quiet` shows one line per
progress step instead."""

from __future__ import annotations

import re
import time
from typing import Any

import httpx
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from cli.client import Api, CliError
from federation.states import TERMINAL_STATES, AgentState

STATE_STYLE: dict[str, str] = {
    AgentState.SPAWNING: "yellow",
    AgentState.RUNNING: "cyan",
    AgentState.COMPLETED: "bold green",
    AgentState.FAILED: "bold red",
    AgentState.KILLED: "bold magenta",
    AgentState.TIMED_OUT: "bold red",
}


def state_text(state: str) -> Text:
    return Text(state, style=STATE_STYLE.get(state, ""))


def describe_progress(progress: dict[str, Any] | None) -> str:
    if not progress:
        return ""
    parts = []
    if progress.get("turn") is not None:
        parts.append(f"turn {progress['turn']}")
    if progress.get("lastTool"):
        parts.append(str(progress["lastTool"]))
    if progress.get("command"):
        parts.append(f"$ {progress['command']}")
    elif progress.get("message"):
        parts.append(str(progress["message"]))
    return "  ".join(parts)


class AgentView:
    """What the live panel shows, updated event by event."""

    def __init__(self, agent_id: str, peer: str | None) -> None:
        self.agent_id = agent_id
        self.peer = peer
        self.state: str = AgentState.SPAWNING  # as the API reports it
        self.progress: dict[str, Any] | None = None
        self.attempt: int | None = None
        self.error: str | None = None
        self.started = time.monotonic()
        self.events = 0

    def apply(self, data: dict[str, Any]) -> None:
        self.events += 1
        self.state = str(data.get("state") or self.state)
        self.progress = data.get("progress") or self.progress
        self.attempt = data.get("attempt") or self.attempt
        self.error = data.get("error") or self.error

    def __rich__(self) -> Panel:
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="dim")
        grid.add_column()
        grid.add_row("agent", self.agent_id)
        if self.peer:
            grid.add_row("on", self.peer)
        grid.add_row("state", state_text(self.state))
        if self.attempt:
            grid.add_row("try", str(self.attempt))
        if self.progress:
            grid.add_row("progress", describe_progress(self.progress))
        if self.error:
            grid.add_row("error", Text(self.error, style="red"))
        grid.add_row("elapsed", f"{time.monotonic() - self.started:.1f} s")
        body: Any = grid
        if self.state not in TERMINAL_STATES:
            body = Group(Spinner("dots", text=Text("following", style="dim")), grid)
        return Panel(body, title="fedagent", border_style=STATE_STYLE.get(self.state, "blue"))


OUTPUT_LINES = 8
FILE_TOOLS = {"write_file": "write", "edit_file": "edit", "read_file": "read", "list_files": "list"}


# What a terminal would obey rather than show (ESC, BEL, CR, C1 controls such as CSI): an
# entry is what an agent or an executor wrote, so it is shown as \xNN. Newlines and tabs stay.
_TERMINAL_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _visible(value: Any) -> Any:
    if isinstance(value, str):
        return _TERMINAL_CONTROLS.sub(lambda m: f"\\x{ord(m.group()):02x}", value)
    if isinstance(value, dict):  # the tool's input and usage: the one level shown
        return {
            _visible(k): v if isinstance(v, dict | list) else _visible(v) for k, v in value.items()
        }
    return value


def transcript_lines(entry: dict[str, Any]) -> list[Text]:
    """How one transcript entry reads in the terminal."""
    entry = {k: _visible(v) for k, v in entry.items()}
    kind = entry.get("kind")
    name = str(entry.get("name") or "")
    if kind == "assistant":
        lines = []
        text = str(entry.get("text") or "").strip()
        if text:
            lines.append(Text(text))
        usage = entry.get("usage") or {}
        if usage:
            tokens = ", ".join(f"{v} {k}" for k, v in usage.items())
            lines.append(Text(f"  turn {entry.get('turn')}: {tokens} tokens", style="dim"))
        return lines
    if kind == "tool_call":
        args = entry.get("input") or {}
        if name == "run_command":
            return [Text(f"$ {args.get('command', '')}", style="bold cyan")]
        if name == "finish":
            return [Text("finish", style="bold")]
        return [Text(f"{FILE_TOOLS.get(name, name)} {args.get('path', '')}", style="cyan")]
    if kind == "tool_result":
        lines = []
        if entry.get("interrupted"):
            lines.append(
                Text("  (the previous run of this call was interrupted; ran again)", style="yellow")
            )
        if name == "run_command":
            output = str(entry.get("output") or "").rstrip("\n").splitlines()
            shown = [ln for ln in output if not ln.startswith("[exit code")]
            if entry.get("interrupted") and shown:
                shown = shown[1:]
            for line in shown[-OUTPUT_LINES:]:
                lines.append(Text(f"  {line}", style="dim"))
            code = entry.get("exitCode")
            lines.append(Text(f"  [exit {code}]", style="green" if code == 0 else "red"))
        elif entry.get("isError"):
            lines.append(Text(f"  {str(entry.get('output') or '').strip()[:300]}", style="red"))
        return lines
    if kind in ("resumed", "try", "workspace", "truncated"):
        return [Text(f"({entry.get('text', kind)})", style="yellow")]
    return []


def follow_agent(
    api: Api, agent_id: str, console: Console, *, peer: str | None = None, quiet: bool = False
) -> Any:
    """Show the agent until it ends; return its final representation (GET /agents/{id})."""
    view = AgentView(agent_id, peer)
    last_event_id: str | None = None
    last_line: tuple[Any, ...] = ()
    live = Live(view, console=console, refresh_per_second=8, transient=True)
    interactive = console.is_terminal

    def log_line(data: dict[str, Any]) -> None:
        nonlocal last_line
        progress = describe_progress(data.get("progress")) if quiet else ""
        key = (data.get("state"), progress)
        if key == last_line:
            return
        last_line = key
        line = Text(time.strftime("%H:%M:%S "), style="dim")
        line.append_text(state_text(str(data.get("state"))))
        if key[1]:
            line.append("  " + key[1])
        if data.get("error"):
            line.append("  " + str(data["error"]), style="red")
        console.print(line)

    if interactive:
        live.start()
    try:
        backoff = 0.5
        while view.state not in TERMINAL_STATES:
            try:
                for event in api.stream_events(agent_id, last_event_id):
                    last_event_id = event.get("id") or last_event_id
                    data = event["data"]
                    if event.get("event") == "transcript":
                        if not quiet:
                            for line in transcript_lines(data):
                                console.print(line)
                        continue
                    view.apply(data)
                    log_line(data)
                    backoff = 0.5
                    if view.state in TERMINAL_STATES:
                        break
                else:
                    # The stream ended without a final event (resumed after it): read the row.
                    agent = api.call("GET", f"/agents/{agent_id}")
                    if agent["state"] in TERMINAL_STATES:
                        view.apply(agent)
                        log_line(agent)
            except httpx.TransportError:
                # Dropped: reconnect and resume after the last event seen.
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            except CliError:
                raise
    finally:
        if interactive:
            live.stop()
    return api.call("GET", f"/agents/{agent_id}")


def print_agent(
    agent: dict[str, Any],
    console: Console,
    *,
    full: bool = True,
    peer: str | None = None,
    links: list[str] | None = None,
) -> None:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="dim")
    grid.add_column(overflow="fold")

    def row(label: str, value: str | Text) -> None:
        # What a peer said (its name, changed files) is text, never read as markup.
        grid.add_row(label, value if isinstance(value, Text) else Text(value))

    row("agent", str(agent["agentId"]))
    row("state", state_text(agent["state"]))
    row("task", f"{agent['taskId']} ({agent['agentType']})")
    row("connection", str(agent["connectionId"]))
    row("peer", f"{peer} ({agent['peerInstanceId']})" if peer else agent["peerInstanceId"])
    if agent.get("peerKind"):  # fedagent (another instance), a2a (an A2A agent) or local
        row("peer kind", str(agent["peerKind"]))
    if agent.get("attempt"):
        row("try", str(agent["attempt"]))
    if agent.get("progress") and agent["state"] not in TERMINAL_STATES:
        row("progress", describe_progress(agent["progress"]))
    row("workflow", str(agent["workflowId"]))
    row("created", str(agent["createdAt"]))
    if agent.get("finishedAt"):
        row("finished", str(agent["finishedAt"]))
    if agent.get("error"):
        row("error", Text(str(agent["error"]), style="red"))
    result = agent.get("result") or {}
    if result.get("changedFiles") is not None:
        row("changed", ", ".join(result["changedFiles"]) or "(no files)")
    for link in links or []:
        row("temporal", link)
    console.print(grid)
    if full and result:
        if result.get("summary"):
            console.print(Panel(Text(str(result["summary"]).strip()), title="result", expand=False))
        if result.get("logTail"):
            console.print(
                Panel(
                    Text(str(result["logTail"]).strip()),
                    title="log tail",
                    border_style="dim",
                    expand=False,
                )
            )
