"""The agent's tools: their definitions for the model and how each runs against the sandbox.

Commands run inside the sandbox; file tools go through the sandbox's workspace-confined file
operations, so no path given by the model reaches outside the workspace.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from agents.models import ToolCall, ToolOutcome
from agents.sandbox.base import CommandResult, DiskOveruse, Sandbox, run_within_quota
from agents.sandbox.files import PathRefused
from agents.text import clean, text_of

READ_LIMIT = 256 * 1024  # bytes read from a file
SHOW_LIMIT = 64 * 1024  # characters of it shown to the model
EDIT_LIMIT = 8 * 1024 * 1024  # largest file edit_file rewrites
LIST_LIMIT = 1000
QUOTA_POLL = 1.0  # seconds between disk usage checks while a command runs
WRITE_TOOLS = ("write_file", "edit_file")

TOOL_SPECS: dict[str, dict[str, Any]] = {
    "run_command": {
        "name": "run_command",
        "description": (
            "Run a shell command (/bin/sh -c) in the workspace, inside the sandbox: no network, "
            "limited memory and processes. Returns its combined stdout and stderr (long output "
            "keeps its head and tail) and its exit code. Background processes end with the "
            "command."
        ),
        "input_schema": {
            "type": "object",
            "properties": {
                "command": {"type": "string", "description": "the shell command"},
                "timeout": {
                    "type": "integer",
                    "description": "seconds before the command is killed (capped by the run)",
                },
            },
            "required": ["command"],
        },
    },
    "read_file": {
        "name": "read_file",
        "description": (
            "Read a text file of the workspace. Paths are relative to the workspace root. "
            "Use offset/limit (lines) for long files."
        ),
        "input_schema": {
            "type": "object",
            "properties": {
                "path": {"type": "string"},
                "offset": {"type": "integer", "description": "first line (1-based)"},
                "limit": {"type": "integer", "description": "number of lines"},
            },
            "required": ["path"],
        },
    },
    "write_file": {
        "name": "write_file",
        "description": "Create or overwrite a file of the workspace (directories are created).",
        "input_schema": {
            "type": "object",
            "properties": {"path": {"type": "string"}, "content": {"type": "string"}},
            "required": ["path", "content"],
        },
    },
    "edit_file": {
        "name": "edit_file",
        "description": (
            "Replace an exact string in a file of the workspace. old_string must occur exactly "
            "once unless replace_all is true; include enough context to make it unique."
        ),
        "input_schema": {
            "type": "object",
            "properties": {
                "path": {"type": "string"},
                "old_string": {"type": "string"},
                "new_string": {"type": "string"},
                "replace_all": {"type": "boolean"},
            },
            "required": ["path", "old_string", "new_string"],
        },
    },
    "list_files": {
        "name": "list_files",
        "description": (
            "List a directory of the workspace (directories end in '/'); recursive lists the "
            "whole tree below it, without .git."
        ),
        "input_schema": {
            "type": "object",
            "properties": {"path": {"type": "string"}, "recursive": {"type": "boolean"}},
        },
    },
    "finish": {
        "name": "finish",
        "description": (
            "End the run. summary is what the requester reads: what was done and the outcome. "
            "Set success to false if the task could not be completed."
        ),
        "input_schema": {
            "type": "object",
            "properties": {"summary": {"type": "string"}, "success": {"type": "boolean"}},
            "required": ["summary"],
        },
    },
}


def tools_for(agent_type: str) -> list[str]:
    """A reviewer changes nothing, so it gets no tool that writes files."""
    names = list(TOOL_SPECS)
    if agent_type == "reviewer":
        names = [n for n in names if n not in WRITE_TOOLS]
    return names


@dataclass
class CommandRecord:
    command: str
    exit_code: int
    timed_out: bool
    output: str


class ToolRunner:
    def __init__(self, sandbox: Sandbox, allowed: list[str]) -> None:
        self.sandbox = sandbox
        self.allowed = allowed
        # The disk limit found passed (the run must end), and the run's usage last seen.
        self.over_quota: DiskOveruse | None = None
        self._last_used: int | None = None

    async def check_disk(self) -> DiskOveruse | None:
        """The disk limit passed (the run's quota, or its peer's budget by a step of this run),
        if any: the run must end."""
        limits = self.sandbox.limits
        if (limits.disk_bytes or limits.peer_disk_bytes) and self.over_quota is None:
            used, self.over_quota = await self.sandbox.check_disk(grown_since=self._last_used)
            self._last_used = used
        return self.over_quota

    async def run(self, call: ToolCall) -> tuple[ToolOutcome, CommandRecord | None]:
        """Run one call. What it answers is text by `agents.text`'s rule (file names that are
        not UTF-8, paths and arguments with NUL from the model show escaped)."""
        if self._last_used is None and self.sandbox.limits.peer_disk_bytes:
            # The run's own usage before its first call: the check after a call that wrote
            # nothing then has no reason to walk the peer's other runs.
            self._last_used = await self.sandbox.disk_usage()
        outcome, record = await self._run(call)
        return dataclasses.replace(outcome, content=clean(outcome.content)), record

    async def _run(self, call: ToolCall) -> tuple[ToolOutcome, CommandRecord | None]:
        if call.name not in self.allowed:
            return ToolOutcome(call.id, f"tool {call.name!r} is not available", True), None
        try:
            if call.name == "run_command":
                return await self._run_command(call)
            handler = {
                "read_file": self._read_file,
                "write_file": self._write_file,
                "edit_file": self._edit_file,
                "list_files": self._list_files,
            }[call.name]
            return ToolOutcome(call.id, await handler(call.input)), None
        except (PathRefused, OSError, ValueError, KeyError, TypeError, OverflowError) as exc:
            where = call.input.get("path")
            what = f"{call.name} {where}" if where else call.name
            return ToolOutcome(call.id, f"{what} failed: {_reason(exc)}", True), None

    async def _run_command(self, call: ToolCall) -> tuple[ToolOutcome, CommandRecord]:
        command = str(call.input.get("command", ""))
        limit = self.sandbox.limits.command_timeout
        asked = call.input.get("timeout")
        timeout = (
            min(float(asked), limit) if isinstance(asked, int | float) and asked > 0 else limit
        )
        result = await self._run_watched(command, timeout)
        text = result.output
        if result.timed_out:
            text += f"\n[timed out after {timeout:g} s; every process of the command was killed]"
        text += f"\n[exit code {result.exit_code}]"
        record = CommandRecord(command, result.exit_code, result.timed_out, result.output)
        return (
            ToolOutcome(call.id, text, result.exit_code != 0, exit_code=result.exit_code),
            record,
        )

    async def _run_watched(self, command: str, timeout: float) -> CommandResult:
        result, over = await run_within_quota(self.sandbox, command, timeout, QUOTA_POLL)
        if over is not None and self.over_quota is None:
            self.over_quota = over
        return result

    async def _read_file(self, args: dict[str, Any]) -> str:
        path = str(args["path"])
        data, more = await self.sandbox.read_file(path, READ_LIMIT)
        if b"\0" in data[:8192]:
            return f"{path} is a binary file; not shown"
        lines = text_of(data, cut_end=more).splitlines(keepends=True)
        offset = max(1, int(args.get("offset") or 1))
        count = int(args.get("limit") or len(lines))
        shown = "".join(lines[offset - 1 : offset - 1 + count])
        notes = []
        if len(shown) > SHOW_LIMIT:
            shown = shown[:SHOW_LIMIT]
            notes.append(f"[shown up to {SHOW_LIMIT} characters; use offset/limit]")
        if more:
            notes.append(f"[the file is longer than {READ_LIMIT} bytes; only its start is read]")
        elif offset - 1 + count < len(lines):
            notes.append(f"[lines {offset}-{offset - 1 + count} of {len(lines)}]")
        return shown + ("\n" + "\n".join(notes) if notes else "")

    async def _write_file(self, args: dict[str, Any]) -> str:
        path, content = str(args["path"]), str(args["content"])
        data = content.encode()
        await self.sandbox.write_file(path, data)
        return f"wrote {len(data)} bytes to {path}"

    async def _edit_file(self, args: dict[str, Any]) -> str:
        path = str(args["path"])
        old, new = str(args["old_string"]), str(args["new_string"])
        if not old:
            raise ValueError("old_string is empty; use write_file to create a file")
        data, more = await self.sandbox.read_file(path, EDIT_LIMIT)
        if more:
            raise ValueError(f"{path} is larger than {EDIT_LIMIT} bytes")
        text = data.decode()
        found = text.count(old)
        if found == 0:
            raise ValueError(f"old_string not found in {path}")
        if found > 1 and not args.get("replace_all"):
            raise ValueError(
                f"old_string occurs {found} times in {path}; add context or set replace_all"
            )
        count = found if args.get("replace_all") else 1
        # The size of the result, known before it is built (a short old_string replaced
        # everywhere by a long new_string multiplies the file).
        size = len(data) + count * (len(new.encode()) - len(old.encode()))
        if size > EDIT_LIMIT:
            raise ValueError(
                f"the edited {path} would be {size} bytes, above edit_file's limit of "
                f"{EDIT_LIMIT} bytes; nothing was changed"
            )
        await self.sandbox.write_file(path, text.replace(old, new, count).encode())
        return f"edited {path}: replaced {found if args.get('replace_all') else 1} occurrence(s)"

    async def _list_files(self, args: dict[str, Any]) -> str:
        path = str(args.get("path") or ".")
        entries, cut = await self.sandbox.list_files(
            path, recursive=bool(args.get("recursive")), limit=LIST_LIMIT
        )
        text = "\n".join(entries) if entries else "(empty)"
        return text + (f"\n[first {LIST_LIMIT} entries]" if cut else "")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, KeyError):
        return f"missing argument {exc}"
    if isinstance(exc, UnicodeDecodeError):
        return "the file is not UTF-8 text"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)
