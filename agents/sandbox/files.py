"""File operations confined to a workspace, for the agent's read/write/edit/list tools.

They run on the executor's side, where nothing stops a path from leaving the workspace except
this module. So a path is walked one component at a time with directory file descriptors and
O_NOFOLLOW: `..` may not climb above the workspace, and a symlink is followed only while its
target stays inside (a relative link, or an absolute one into the sandbox's workspace mount).
A link swapped in between the check and the open makes the open fail rather than escape.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import stat
from pathlib import Path

MAX_SYMLINKS = 40
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class PathRefused(ValueError):
    """The path would leave the workspace (or is not something the tool may touch)."""


def relative_to_mount(path: str, mount: str) -> str:
    """`path` as given by the agent, made relative to the workspace; refuses what is outside."""
    path = path.strip() or "."
    if path.startswith("/"):
        normal = posixpath.normpath(path)
        mount = posixpath.normpath(mount)
        if normal == mount:
            return "."
        if not normal.startswith(mount.rstrip("/") + "/"):
            raise PathRefused(f"{path} is outside the workspace ({mount})")
        return normal[len(mount.rstrip("/")) + 1 :]
    normal = posixpath.normpath(path)
    if normal == ".." or normal.startswith("../"):
        raise PathRefused(f"{path} is outside the workspace")
    return normal


def _parts(path: str) -> list[str]:
    return [p for p in path.split("/") if p not in ("", ".")]


def _resolve(
    root: Path,
    rel: str,
    *,
    mount: str | None,
    follow_last: bool,
    create_dirs: bool = False,
    owner: tuple[int, int] | None = None,
) -> tuple[int, str]:
    """Open the real directory that holds the last component of `rel` inside `root`.

    Returns (directory fd, last name); the name is "" when `rel` is the workspace itself.
    The caller closes the fd.
    """
    stack = [os.open(root, _DIR_FLAGS)]
    pending = _parts(rel)
    links = 0
    try:
        while pending:
            name = pending.pop(0)
            if name == "..":
                if len(stack) == 1:
                    raise PathRefused(f"{rel} leads outside the workspace")
                os.close(stack.pop())
                continue
            last = not pending
            here = stack[-1]
            try:
                info = os.stat(name, dir_fd=here, follow_symlinks=False)
            except FileNotFoundError:
                if last:
                    return os.dup(here), name
                if not create_dirs:
                    raise FileNotFoundError(f"{rel}: no such file or directory") from None
                os.mkdir(name, 0o755, dir_fd=here)
                if owner is not None:
                    os.chown(name, *owner, dir_fd=here, follow_symlinks=False)
                info = os.stat(name, dir_fd=here, follow_symlinks=False)
            if stat.S_ISLNK(info.st_mode):
                if last and not follow_last:
                    return os.dup(here), name
                links += 1
                if links > MAX_SYMLINKS:
                    raise PathRefused(f"{rel}: too many levels of symbolic links")
                target = os.readlink(name, dir_fd=here)
                if target.startswith("/"):
                    inside = mount is not None and (
                        target == mount or target.startswith(mount.rstrip("/") + "/")
                    )
                    if not inside:
                        raise PathRefused(
                            f"{rel}: {name} is a symlink to {target}, outside the workspace"
                        )
                    for fd in stack[1:]:
                        os.close(fd)
                    del stack[1:]
                    target = target[len(mount or "") :]
                pending = _parts(target) + pending
                continue
            if last:
                return os.dup(here), name
            if not stat.S_ISDIR(info.st_mode):
                raise NotADirectoryError(f"{rel}: {name} is not a directory")
            stack.append(os.open(name, _DIR_FLAGS, dir_fd=here))
        return os.dup(stack[-1]), ""
    finally:
        for fd in stack:
            os.close(fd)


def read_file(root: Path, rel: str, max_bytes: int, mount: str | None = None) -> tuple[bytes, bool]:
    """The file's first `max_bytes` bytes and whether there was more."""
    dir_fd, name = _resolve(root, rel, mount=mount, follow_last=True)
    try:
        if not name:
            raise IsADirectoryError(f"{rel} is a directory")
        # O_NONBLOCK: opening a FIFO the agent left behind must not hang the executor.
        fd = os.open(
            name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd
        )
    finally:
        os.close(dir_fd)
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise PathRefused(f"{rel} is not a regular file")
        data = handle.read(max_bytes + 1)
    return data[:max_bytes], len(data) > max_bytes


def write_file(
    root: Path,
    rel: str,
    data: bytes,
    owner: tuple[int, int] | None = None,
    mount: str | None = None,
) -> None:
    """Write (create or replace) a file, creating missing directories on the way."""
    dir_fd, name = _resolve(root, rel, mount=mount, follow_last=True, create_dirs=True, owner=owner)
    try:
        if not name:
            raise IsADirectoryError(f"{rel} is a directory")
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        fd = os.open(name, flags, 0o644, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
    with os.fdopen(fd, "wb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise PathRefused(f"{rel} is not a regular file")
        if owner is not None and (info.st_uid, info.st_gid) != owner:
            os.fchown(fd, *owner)
        os.ftruncate(fd, 0)
        handle.write(data)


def list_files(
    root: Path, rel: str, recursive: bool, limit: int, mount: str | None = None
) -> tuple[list[str], bool]:
    """Entries under `rel` (directories end in "/"), relative to the workspace; `.git` is not
    entered. Returns the entries and whether the list was cut at `limit`."""
    dir_fd, name = _resolve(root, rel, mount=mount, follow_last=True)
    try:
        if name:
            fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        else:
            fd = os.dup(dir_fd)
    except NotADirectoryError:
        raise NotADirectoryError(f"{rel} is not a directory") from None
    finally:
        os.close(dir_fd)
    prefix = "" if rel in ("", ".") else rel.rstrip("/") + "/"
    entries: list[str] = []
    try:
        if not recursive:
            for entry in sorted(os.listdir(fd)):
                is_dir = stat.S_ISDIR(os.stat(entry, dir_fd=fd, follow_symlinks=False).st_mode)
                entries.append(prefix + entry + ("/" if is_dir else ""))
                if len(entries) > limit:
                    return entries[:limit], True
            return entries, False
        for top, dirs, names, _ in os.fwalk(".", dir_fd=fd, follow_symlinks=False):
            dirs[:] = sorted(d for d in dirs if d != ".git")
            base = "" if top == "." else top[2:] + "/"
            for entry in sorted([d + "/" for d in dirs] + names):
                entries.append(prefix + base + entry)
                if len(entries) > limit:
                    return entries[:limit], True
        return entries, False
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


def run_of(name: str) -> str:
    """The run an entry of a directory of workspaces belongs to: a run `X` holds its workspace
    `X` and the files `.X.*` beside it; any other name stands for itself."""
    if name.startswith(".") and "." in name[1:]:
        return name[1:].split(".", 1)[0]
    return name


def disk_usage(roots: list[Path]) -> int:
    """Bytes allocated on disk below these directories (symlinks not followed, each inode
    counted once, whatever cannot be read skipped).

    Commands may run while it walks: each directory is opened without following a symlink
    and must be the very directory (device and inode) its parent listed, so a directory
    swapped for a link meanwhile is skipped, never followed out of the workspace."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for root in roots:
        try:
            info = os.stat(root, follow_symlinks=False)
        except OSError:
            continue
        pending = [(str(root), info.st_dev, info.st_ino)]
        while pending:
            path, device, inode = pending.pop()
            try:
                fd = os.open(path, _DIR_FLAGS)
            except OSError:
                continue
            try:
                opened = os.fstat(fd)
                if (opened.st_dev, opened.st_ino) != (device, inode):
                    continue  # swapped since its parent was listed
                with os.scandir(fd) as entries:
                    for entry in entries:
                        try:
                            info = entry.stat(follow_symlinks=False)
                        except OSError:
                            continue
                        key = (info.st_dev, info.st_ino)
                        if key in seen:
                            continue
                        seen.add(key)
                        total += info.st_blocks * 512
                        if stat.S_ISDIR(info.st_mode):
                            pending.append((os.path.join(path, entry.name), *key))
            finally:
                os.close(fd)
    return total
