"""Fence a workspace: a new attempt of a run first ends whatever an earlier attempt still runs
in the same workspace, before it touches the workspace.

Temporal starts attempt N+1 when attempt N stops heartbeating (a stalled event loop, a network
cut from Temporal) even though N may still run on this host. The checkpoint claim stops N at
its next save (it saves before every tool call and after every model answer), but not a
command N has already started: that command would go on writing the workspace under N+1.

bwrap: every process of a sandbox descends from a bwrap process whose argv sets
FEDAGENT_HOST_WORKSPACE to the host path of the workspace (/proc/PID/cmdline is readable by
any uid). SIGKILL to it and to everything below it ends each sandbox's pid namespace (its
init dies with the outer bwrap, and every process inside with the init) at once: a fork
bomb cannot outrun it. Only this host's processes can be seen: a workspace
is on one host's disk, so an attempt elsewhere works in a workspace of its own.

A scan alone leaves a window: an earlier attempt that passed its last checkpoint save could
start its command just after the scan. So each attempt first claims the workspace (a new
generation in a file next to it, written under an exclusive lock), and a sandbox starts each
command holding that lock and only while its generation is still the workspace's: a command
either started before the claim (and the scan finds it) or is refused (`Superseded`).

The earlier attempts' private /tmp directories (next to the workspace) are removed too; each
sandbox has one of its own there, so an earlier attempt cleaning up late removes only its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import stat
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

HOST_WORKSPACE_VAR = "FEDAGENT_HOST_WORKSPACE"  # the same name bwrap.py sets
SETTLE = 0.2  # seconds before looking again after a kill: a command being spawned shows up


def _stat_fields(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except OSError:
        return None


def _alive(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def _user_namespace(pid: int | str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/user").st_ino
    except OSError:
        return None


def sandbox_leaders(workspace: Path) -> list[int]:
    """The outer bwrap processes of sandboxes over this workspace. Only processes in the
    worker's own user namespace count: a command inside any sandbox (its own user namespace)
    can put the same words in its argv, and must not make the fence chase it."""
    wanted = [b"--setenv", HOST_WORKSPACE_VAR.encode(), str(workspace.resolve()).encode()]
    ours = _user_namespace("self")
    found: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not any(argv[i : i + 3] == wanted for i in range(len(argv) - 2)):
            continue
        if _user_namespace(entry) == ours and _alive(int(entry)):
            found.append(int(entry))
    return found


def descendants(roots: list[int]) -> set[int]:
    """The roots and every live process below them."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat_fields(int(entry))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = set(roots), list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _kill_all(pids: set[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


async def end_workspace_processes(workspace: Path, *, timeout: float = 10.0) -> list[int]:
    """SIGKILL every sandbox process over this workspace and wait until they are gone;
    returns the pids that were ended. After a kill it looks again (SETTLE later) until a scan
    finds nothing, so a command the earlier attempt was starting meanwhile is caught too.
    (That attempt saves its checkpoint before each tool call, which fails once this attempt
    has claimed the checkpoint, so it starts no command after that.)"""
    ended: set[int] = set()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while leaders := await asyncio.to_thread(sandbox_leaders, workspace):
        tree = await asyncio.to_thread(descendants, leaders)
        _kill_all(tree)
        ended |= tree
        while any(_alive(pid) for pid in tree) and loop.time() < deadline:
            await asyncio.sleep(0.01)
        if loop.time() >= deadline:
            break
        await asyncio.sleep(SETTLE)
    left = [pid for pid in ended if _alive(pid)]
    if left:
        raise RuntimeError(f"processes of an earlier attempt in {workspace} did not end: {left}")
    return sorted(ended)


def _pid_namespace_init(pid: int) -> bool:
    """Whether the process is pid 1 of a pid namespace of its own (a sandbox's init)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith("NSpid:"):
            ids = line.split()[1:]
            return len(ids) > 1 and ids[-1] == "1"
    return False


def orphaned_sandboxes(root: Path) -> list[int]:
    """Sandbox inits over workspaces below `root` whose outer bwrap is gone. bwrap's child
    (the sandbox's pid 1) waits for its parent's word before it sets itself up, and only then
    asks to die with its parent: when the worker dies in that moment (kill -9), the outer bwrap
    dies with it and the child waits for ever, outside any fence (its own user namespace).
    Such a process is a bwrap naming the workspace, pid 1 of its own pid namespace, whose
    parent is not the outer bwrap of the same command line."""
    prefix = str(root.resolve()) + "/"
    found: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        argv = raw.split(b"\0")
        if not argv or os.path.basename(argv[0]) != b"bwrap":
            continue
        named = [
            argv[i + 2].decode(errors="replace")
            for i in range(len(argv) - 2)
            if argv[i : i + 2] == [b"--setenv", HOST_WORKSPACE_VAR.encode()]
        ]
        if not any(path.startswith(prefix) for path in named):
            continue
        fields = _stat_fields(int(entry))
        if fields is None or fields[0] in ("Z", "X") or not _pid_namespace_init(int(entry)):
            continue
        try:
            parent = Path(f"/proc/{fields[1]}/cmdline").read_bytes()
        except OSError:
            parent = b""
        if parent != raw:
            found.append(int(entry))
    return found


def end_orphaned_sandboxes(root: Path, *, timeout: float = 10.0) -> list[int]:
    """SIGKILL the `orphaned_sandboxes` below `root` (their pid namespaces end with them);
    returns their pids once they are gone."""
    orphans = orphaned_sandboxes(root)
    _kill_all(set(orphans))
    deadline = time.monotonic() + timeout
    while any(_alive(pid) for pid in orphans) and time.monotonic() < deadline:
        time.sleep(0.01)
    return orphans


def scratch_dir(workspace: Path) -> Path:
    """Where the run's private /tmp directories live on the host: next to the workspace, one
    per sandbox below it, so that an earlier attempt cleaning up late removes only its own."""
    return workspace.parent / f".{workspace.name}.tmp"


def make_scratch(path: Path) -> Path:
    """A sandbox's new /tmp at `path` (mode 0700, like the directory holding it)."""
    path.parent.mkdir(mode=0o700, exist_ok=True)
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def remove_scratch(path: Path) -> None:
    """Remove a sandbox's /tmp, and the directory holding it once no other sandbox has one."""
    remove_tree(path)
    with contextlib.suppress(OSError):
        path.parent.rmdir()


def _own_directory(path: str) -> None:
    """Make a directory (never a link) readable, writable and searchable by its owner: what
    an agent left unwritable is still removed by a worker that is not root."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            os.fchmod(fd, stat.S_IRWXU)
        finally:
            os.close(fd)


def _empty_of_files(directory: str) -> list[str]:
    """Unlink what is not a directory in `directory`; the names of its subdirectories."""
    subdirectories = []
    with contextlib.suppress(OSError), os.scandir(directory) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                subdirectories.append(entry.name)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
    return subdirectories


def remove_tree(path: Path) -> None:
    """Remove `path` and what is below it, whatever an agent made of it: never following a
    link, at any depth, errors ignored (what cannot go stays). Python 3.11's shutil.rmtree
    recurses once per level (a tree 1000 levels deep makes it raise RecursionError) and
    holds a descriptor per level; here each subdirectory of a directory below `path` is
    first moved up into `path`, so no path is longer than two names below it and nothing
    recurses."""
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            os.unlink(path)
            return
    except OSError:
        return
    top, prefix, moved = str(path), f".rm-{uuid.uuid4().hex[:8]}-", 0
    pending, given_up = [top], set()
    while pending:
        directory = pending[-1]
        _own_directory(directory)
        progress = False
        for name in _empty_of_files(directory):
            source = os.path.join(directory, name)
            if source in given_up:
                continue
            target = source
            if directory != top:
                moved += 1
                target = os.path.join(top, f"{prefix}{moved}")
                _own_directory(source)  # moving a directory rewrites its ".."
                try:
                    os.rename(source, target)
                except OSError:
                    given_up.add(source)
                    continue
            pending.append(target)
            progress = True
        if not progress:
            pending.pop()
            try:
                os.rmdir(directory)
            except OSError:
                given_up.add(directory)


class Superseded(Exception):
    """A newer attempt of the run has claimed the workspace: this one starts nothing more."""


def _fence_file(workspace: Path) -> Path:
    return workspace.parent / f".{workspace.name}.fence"


def _locked(workspace: Path) -> int:
    """An open, exclusively locked descriptor of the workspace's fence lock (blocking)."""
    workspace.parent.mkdir(parents=True, exist_ok=True)
    lock = workspace.parent / f".{workspace.name}.fence.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _claim(workspace: Path) -> str:
    generation = uuid.uuid4().hex
    fd = _locked(workspace)
    try:
        path = _fence_file(workspace)
        path.write_text(generation)
    finally:
        os.close(fd)  # closing releases the lock
    return generation


async def claim_workspace(workspace: Path) -> str:
    """A new generation for this attempt: from now on, sandboxes of earlier attempts start no
    command over the workspace. Call before ending their processes."""
    return await asyncio.to_thread(_claim, workspace)


def _current(workspace: Path) -> str:
    try:
        return _fence_file(workspace).read_text()
    except FileNotFoundError:
        return ""


@contextlib.asynccontextmanager
async def holding(workspace: Path, generation: str | None) -> AsyncIterator[None]:
    """Hold the workspace's fence while a command starts; raises Superseded when a newer
    attempt has claimed the workspace. Without a generation (a sandbox used on its own, not
    by a run's attempt) there is nothing to hold."""
    if generation is None:
        yield
        return
    fd = await asyncio.to_thread(_locked, workspace)
    try:
        if await asyncio.to_thread(_current, workspace) != generation:
            raise Superseded(f"a newer attempt of this run owns {workspace}")
        yield
    finally:
        os.close(fd)
