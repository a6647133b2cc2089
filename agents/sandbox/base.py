"""The contract every sandbox backend keeps: start, run a command, stop, limits, kill.

Commands run inside the sandbox; the file tools (read, write, list) work on the workspace from
the executor's side through `agents.sandbox.files`, which never lets a path leave the workspace.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agents.sandbox import files
from agents.text import text_of

OUTPUT_LIMIT = 16 * 1024  # bytes of a command's output kept (head and tail)


class SandboxError(Exception):
    """The sandbox could not be set up or used."""


class SandboxUnavailable(SandboxError):
    """This machine cannot run the chosen sandbox; the message says how to fix it."""


@dataclass(frozen=True)
class CommandResult:
    command: str
    exit_code: int
    output: str
    timed_out: bool = False
    killed: bool = False


@dataclass(frozen=True)
class Limits:
    """What a run may use. Which of them a backend really enforces is `Sandbox.enforced`."""

    memory_bytes: int | None = 2 * 1024**3
    pids: int | None = 256
    cpus: float | None = 2.0
    command_timeout: float = 600.0
    # Largest file a command may write (RLIMIT_FSIZE): filling the disk stops there per file.
    file_bytes: int | None = 1024**3
    # What the workspace and the run's /tmp may hold together; past it the run ends
    # `disk_quota` (checked while commands run and after each tool call).
    disk_bytes: int | None = 4 * 1024**3
    # What all the runs of one peer may hold together: every workspace of a peer (with its
    # baseline, diff and /tmp) lives in one directory, the parent of each run's workspace.
    # Past it the run whose step added to it ends `peer_disk_budget`.
    peer_disk_bytes: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "memoryBytes": self.memory_bytes,
            "pids": self.pids,
            "cpus": self.cpus,
            "commandTimeout": self.command_timeout,
            "fileBytes": self.file_bytes,
            "diskBytes": self.disk_bytes,
            "peerDiskBytes": self.peer_disk_bytes,
        }


DISK_QUOTA = "disk_quota"
PEER_DISK_BUDGET = "peer_disk_budget"


@dataclass(frozen=True, kw_only=True)
class DiskOveruse:
    """A disk limit a run passed: its own quota (`disk_quota`, `used` is the run's) or its
    peer's budget (`peer_disk_budget`, `used` is what all of the peer's runs hold)."""

    code: str
    used: int
    limit: int

    def reason(self) -> str:
        if self.code == PEER_DISK_BUDGET:
            return (
                f"{PEER_DISK_BUDGET}: this peer's runs hold {self.used} bytes here together, "
                f"above this executor's budget of {self.limit} bytes per peer; the run was stopped"
            )
        return (
            f"{DISK_QUOTA}: the workspace and /tmp hold {self.used} bytes, above this "
            f"executor's quota of {self.limit} bytes; the run was stopped"
        )


# How old what this process saw of a peer's *other* runs' disk usage may be when a try checks,
# before it starts, that the peer's runs do not hold the whole budget already: each run's files
# are walked for it at most once per this many seconds (the try's own at every check), so N
# tries starting cost O(N) walks per interval, not O(N) each (with hundreds of runs, a whole
# walk per start took most of a worker's CPU). A run whose usage was the same at two walks in
# a row (an ended run, an idle one) is trusted twice as long each time, up to
# PEER_USAGE_STABLE_MAX_AGE. The check of a run that grew walks them all.
PEER_USAGE_MAX_AGE = 5.0
PEER_USAGE_STABLE_MAX_AGE = 60.0
# peer directory -> run -> (walked at, bytes, trusted for this many seconds after)
_seen_usage: dict[Path, dict[str, tuple[float, int, float]]] = {}


def peer_disk_usage(workspace: Path, max_age: float = 0.0) -> int:
    """Bytes all the runs of the peer whose workspace this is hold on disk: this run's files
    now, the others' as this process saw them at most `max_age` seconds ago (0: now), or
    longer for a run whose usage did not change lately.
    Everything in the peer's directory counts (a file hard-linked into two runs, in each)."""
    peer = workspace.parent
    try:
        entries = list(os.scandir(peer))
    except OSError:
        return 0
    runs: dict[str, list[Path]] = {}
    for entry in entries:
        runs.setdefault(files.run_of(entry.name), []).append(Path(entry.path))
    now = time.monotonic()
    seen = _seen_usage.get(peer, {})
    current: dict[str, tuple[float, int, float]] = {}
    total = 0
    for run, paths in runs.items():
        at, used, trusted = seen.get(run, (float("-inf"), -1, 0.0))
        fresh = bool(max_age) and run != workspace.name and now - at < max(max_age, trusted)
        if not fresh:
            walked = files.disk_usage(paths)
            steady = walked == used
            trusted = min(2 * max(trusted, PEER_USAGE_MAX_AGE), PEER_USAGE_STABLE_MAX_AGE)
            at, used, trusted = now, walked, trusted if steady else 0.0
        current[run] = (at, used, trusted)
        total += used
    _seen_usage[peer] = current  # runs gone from the directory are forgotten
    return total


class Sandbox(ABC):
    """An isolated place where an agent's commands run, inside its workspace."""

    kind: str = "abstract"
    # Where commands see the workspace (the process sandbox sees the host path itself).
    workspace_mount: str = "/workspace"

    def __init__(
        self, workspace: Path, limits: Limits | None = None, *, read_only: bool = False
    ) -> None:
        self.workspace = workspace
        self.limits = limits or Limits()
        # A reviewer's sandbox: commands see the workspace read-only, the file tools refuse.
        self.read_only = read_only
        # limit name -> how it is enforced ("cgroup v1", "rlimit (per process)", ...)
        self.enforced: dict[str, str] = {}
        # (uid, gid) that files written by the file tools must belong to, so that the sandbox
        # can still change them; None keeps the executor's own.
        self.file_owner: tuple[int, int] | None = None

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def run(self, command: str, *, timeout: float | None = None) -> CommandResult: ...

    @abstractmethod
    async def kill(self) -> None:
        """Take down everything running in the sandbox and wait until it is gone."""

    @abstractmethod
    def alive_pids(self) -> list[int]:
        """Processes of this sandbox still on the machine (empty once it is killed)."""

    async def stop(self) -> None:
        await self.kill()

    def describe(self) -> dict[str, Any]:
        """What the result says about the sandbox: its kind, its limits, what is enforced."""
        return {"kind": self.kind, "limits": self.limits.as_dict(), "enforced": self.enforced}

    # --- file tools: confined to the workspace --------------------------------------------

    async def read_file(self, path: str, max_bytes: int = 256 * 1024) -> tuple[bytes, bool]:
        return await asyncio.to_thread(
            files.read_file,
            self.workspace,
            self._relative(path),
            max_bytes,
            self.workspace_mount,
        )

    async def write_file(self, path: str, data: bytes) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, "the workspace is read-only in this sandbox")
        await asyncio.to_thread(
            files.write_file,
            self.workspace,
            self._relative(path),
            data,
            self.file_owner,
            self.workspace_mount,
        )

    async def list_files(
        self, path: str = ".", *, recursive: bool = False, limit: int = 1000
    ) -> tuple[list[str], bool]:
        return await asyncio.to_thread(
            files.list_files,
            self.workspace,
            self._relative(path),
            recursive,
            limit,
            self.workspace_mount,
        )

    async def disk_usage(self) -> int:
        """Bytes the workspace and the run's /tmp take on disk now."""
        return await asyncio.to_thread(files.disk_usage, [self.workspace, *self.scratch_dirs()])

    def scratch_dirs(self) -> list[Path]:
        """Host directories of the run besides the workspace (its /tmp), for the quota."""
        return []

    async def check_disk(self, grown_since: int | None = None) -> tuple[int, DiskOveruse | None]:
        """The run's disk usage now, and the limit it passed if any: its own quota, or the
        budget of its peer's runs together, which is looked at only when this run grew past
        `grown_since` bytes (the run that adds to it is the one stopped, not one that waits)."""
        used = await self.disk_usage()
        quota = self.limits.disk_bytes
        if quota and used > quota:
            return used, DiskOveruse(code=DISK_QUOTA, used=used, limit=quota)
        budget = self.limits.peer_disk_bytes
        if budget and (grown_since is None or used > grown_since):
            together = await asyncio.to_thread(peer_disk_usage, self.workspace)
            if together > budget:
                return used, DiskOveruse(code=PEER_DISK_BUDGET, used=together, limit=budget)
        return used, None

    def _relative(self, path: str) -> str:
        """A tool's path relative to the workspace; absolute paths must be inside its mount."""
        return files.relative_to_mount(path, self.workspace_mount)


async def run_within_quota(
    sandbox: Sandbox, command: str, timeout: float, poll: float = 1.0
) -> tuple[CommandResult, DiskOveruse | None]:
    """Run a command with the disk limits checked while it runs: a command that fills the
    workspace and /tmp past `limits.disk_bytes`, or that adds to its peer's runs past
    `limits.peer_disk_bytes`, takes the sandbox down with it. Returns the result and, when a
    limit was passed, which (`Sandbox.check_disk`)."""
    watched = bool(sandbox.limits.disk_bytes or sandbox.limits.peer_disk_bytes)
    before = await sandbox.disk_usage() if sandbox.limits.peer_disk_bytes else None
    running = asyncio.ensure_future(sandbox.run(command, timeout=timeout))
    over: DiskOveruse | None = None
    try:
        while watched:
            done, _ = await asyncio.wait({running}, timeout=poll)
            if done:
                break
            _, over = await sandbox.check_disk(grown_since=before)
            if over is not None:
                await sandbox.kill()
                break
        return await running, over
    finally:
        if not running.done():
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running


def bound_output(data: bytes, limit: int = OUTPUT_LIMIT) -> str:
    """A command's output as text (by `agents.text`'s rule), its head and tail when long."""
    if len(data) <= limit:
        return text_of(data)
    half = limit // 2
    skipped = len(data) - 2 * half
    return (
        text_of(data[:half], cut_end=True)
        + f"\n... [{skipped} bytes skipped] ...\n"
        + text_of(data[-half:], cut_start=True)
    )


class BoundedBuffer:
    """Keeps the head and the tail of a stream of bytes, so huge output costs bounded memory."""

    def __init__(self, limit: int = OUTPUT_LIMIT) -> None:
        self.half = limit // 2
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def feed(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self.half - len(self.head)
        if room > 0:
            self.head += chunk[:room]
            chunk = chunk[room:]
        if chunk:
            self.tail += chunk
            if len(self.tail) > self.half:
                del self.tail[: len(self.tail) - self.half]

    def text(self) -> str:
        skipped = self.total - len(self.head) - len(self.tail)
        if skipped <= 0:
            return text_of(bytes(self.head) + bytes(self.tail))
        return (
            text_of(bytes(self.head), cut_end=True)
            + f"\n... [{skipped} bytes skipped] ...\n"
            + text_of(bytes(self.tail), cut_start=True)
        )


async def read_bounded(stream: asyncio.StreamReader, limit: int = OUTPUT_LIMIT) -> str:
    buffer = BoundedBuffer(limit)
    while chunk := await stream.read(65536):
        buffer.feed(chunk)
    return buffer.text()
