"""A run's workspace as of a checkpoint, so that a retry on another host finds it again.

`take` reads a workspace (and its baseline repository) into a manifest and the bytes of its
files, by sha256: directories, regular files (with their executable bit) and symlinks (their
target as text, never followed). The walk goes from directory descriptor to directory
descriptor with `O_NOFOLLOW`, so nothing an agent planted (a symlink, a FIFO, a device, a
directory swapped for a link during the walk) makes the executor read outside the workspace,
block, or run anything: the bytes are read, never interpreted. What is neither a directory, a
regular file nor a symlink is left out (counted in `skipped`). Past `max_bytes` of file bytes
or `max_entries` entries the walk stops with `SnapshotTooLarge`: the caller records the
workspace as not saved (a retry elsewhere is then told it was lost).

`restore` lays a manifest down into empty directories. Every name is checked (relative, no
`.` or `..` component, no NUL, no empty component) and every parent directory is opened
component by component with `O_NOFOLLOW` below the root's descriptor, files are created with
`O_EXCL`: a hostile manifest cannot write outside the root, through a symlink it made first,
or over a file it made first (`UnsafeSnapshot`). Before that, what the store holds is checked
as if a stranger had written it: the manifest must be the bytes its sha256 names and of the
shape `take` writes (`load_manifest`), and within the bounds a snapshot is taken with, counted
from the blobs' stored lengths, not from what the manifest says (`check_bounds`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT = 1
SHA256 = re.compile(r"[0-9a-f]{64}")
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class SnapshotTooLarge(Exception):
    """The workspace is over the snapshot's bound: it is not saved."""


class UnsafeSnapshot(Exception):
    """A manifest names something outside its root, or goes through a symlink."""


@dataclass
class Taken:
    """A manifest (JSON bytes) and the bytes of the files it names that were read this time."""

    manifest: bytes
    sha256: str
    blobs: dict[str, bytes]
    bytes: int
    entries: int
    skipped: int


@dataclass
class SnapshotCache:
    """What an earlier walk read: a file whose inode, size and times are the same is not read
    again (its sha256 is known, and its bytes are stored already)."""

    known: dict[tuple[int, ...], str] = field(default_factory=dict)

    @staticmethod
    def key(info: os.stat_result) -> tuple[int, ...]:
        return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


def _b64(name: bytes) -> str:
    return base64.b64encode(name).decode("ascii")


class _Walk:
    def __init__(self, max_bytes: int, max_entries: int, cache: SnapshotCache) -> None:
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.cache = cache
        self.seen: dict[tuple[int, ...], str] = {}
        self.total = 0
        self.count = 0
        self.skipped = 0
        self.blobs: dict[str, bytes] = {}

    def _count(self) -> None:
        self.count += 1
        if self.count > self.max_entries:
            raise SnapshotTooLarge(f"the workspace has more than {self.max_entries} entries")

    def _file(self, dir_fd: int, name: str, info: os.stat_result) -> dict[str, Any] | None:
        self.total += info.st_size
        if self.total > self.max_bytes:
            raise SnapshotTooLarge(f"the workspace holds more than {self.max_bytes} bytes")
        key = SnapshotCache.key(info)
        sha = self.cache.known.get(key)
        if sha is None:
            fd = os.open(name, READ_FLAGS, dir_fd=dir_fd)
            with os.fdopen(fd, "rb") as handle:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    return None  # swapped for something else since the lstat
                data = handle.read(info.st_size + 1)
            if len(data) != info.st_size:  # it is being written: its bytes as read now
                self.total += len(data) - info.st_size
                if self.total > self.max_bytes:
                    raise SnapshotTooLarge(f"the workspace holds more than {self.max_bytes} bytes")
            sha = hashlib.sha256(data).hexdigest()
            self.blobs[sha] = data
            if len(data) == info.st_size:
                self.seen[key] = sha
        else:
            self.seen[key] = sha
        executable = bool(info.st_mode & 0o100)
        return {"t": "f", "s": sha, "x": executable}

    def directory(self, dir_fd: int, prefix: bytes, out: list[dict[str, Any]]) -> None:
        pending = [(dir_fd, prefix, False)]
        while pending:
            fd, base, owned = pending.pop()
            try:
                for name in sorted(os.listdir(fd)):
                    self._count()
                    path = base + os.fsencode(name)
                    info = os.stat(name, dir_fd=fd, follow_symlinks=False)
                    entry: dict[str, Any] | None
                    if stat.S_ISDIR(info.st_mode):
                        entry = {"t": "d"}
                        child = os.open(name, DIR_FLAGS, dir_fd=fd)
                        pending.append((child, path + b"/", True))
                    elif stat.S_ISLNK(info.st_mode):
                        target = os.readlink(name, dir_fd=fd)
                        entry = {"t": "l", "l": _b64(os.fsencode(target))}
                    elif stat.S_ISREG(info.st_mode):
                        entry = self._file(fd, name, info)
                    else:
                        entry = None
                    if entry is None:
                        self.skipped += 1
                        continue
                    out.append({"p": _b64(path), **entry})
            finally:
                if owned:
                    os.close(fd)


def take(
    roots: Mapping[str, Path], *, max_bytes: int, max_entries: int, cache: SnapshotCache
) -> Taken:
    """The manifest of `roots` (name -> directory) and the bytes not in `cache` (blocking: run
    it in a thread). Raises SnapshotTooLarge past the bounds, OSError if a root is missing."""
    walk = _Walk(max_bytes, max_entries, cache)
    manifest: dict[str, Any] = {"format": FORMAT, "roots": {}}
    for root_name, root in roots.items():
        entries: list[dict[str, Any]] = []
        fd = os.open(root, DIR_FLAGS)
        try:
            walk.directory(fd, b"", entries)
        finally:
            os.close(fd)
        manifest["roots"][root_name] = entries
    manifest["bytes"], manifest["entries"], manifest["skipped"] = (
        walk.total,
        walk.count,
        walk.skipped,
    )
    cache.known = walk.seen  # only what this walk still saw
    data = json.dumps(manifest, separators=(",", ":"), sort_keys=True).encode()
    return Taken(
        manifest=data,
        sha256=hashlib.sha256(data).hexdigest(),
        blobs=walk.blobs,
        bytes=walk.total,
        entries=walk.count,
        skipped=walk.skipped,
    )


def parse_manifest(data: bytes) -> dict[str, Any]:
    """A manifest's JSON, every entry of the shape `take` writes (UnsafeSnapshot otherwise)."""
    try:
        manifest = json.loads(data)
    except (ValueError, RecursionError):
        raise UnsafeSnapshot("the manifest is not JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UnsafeSnapshot("not a workspace manifest of a known format")
    roots = manifest.get("roots")
    if not isinstance(roots, dict) or not all(
        isinstance(name, str) and isinstance(entries, list) for name, entries in roots.items()
    ):
        raise UnsafeSnapshot("the manifest's roots are malformed")
    for entries in roots.values():
        for entry in entries:
            _check_entry(entry)
    return manifest


def _check_entry(entry: Any) -> None:
    if not isinstance(entry, dict) or not isinstance(entry.get("p"), str):
        raise UnsafeSnapshot("a manifest entry is malformed")
    kind = entry.get("t")
    if kind == "f":
        if not (isinstance(entry.get("s"), str) and SHA256.fullmatch(entry["s"])):
            raise UnsafeSnapshot("a manifest entry names no sha256 of its bytes")
        if not isinstance(entry.get("x", False), bool):
            raise UnsafeSnapshot("a manifest entry is malformed")
    elif kind == "l":
        if not isinstance(entry.get("l"), str):
            raise UnsafeSnapshot("a manifest entry is malformed")
    elif kind != "d":
        raise UnsafeSnapshot(f"a manifest entry of unknown type {str(kind)[:20]!r}")


def load_manifest(data: bytes, sha256: str) -> dict[str, Any]:
    """The manifest stored under `sha256`: its bytes must be what that name says (content
    addressing is checked, never assumed), and well formed (`parse_manifest`)."""
    if hashlib.sha256(data).hexdigest() != sha256:
        raise UnsafeSnapshot("the snapshot's manifest does not hold what its sha256 says")
    return parse_manifest(data)


def check_bounds(
    manifest: Mapping[str, Any], sizes: Mapping[str, int], *, max_bytes: int, max_entries: int
) -> None:
    """Refuse (UnsafeSnapshot) a manifest that would lay down more than `take` saves: more
    than `max_entries` entries, or more than `max_bytes` of file bytes counted as they would
    be written (`sizes`: each blob's length as stored, one file per entry naming it). Checked
    before any byte is read or written, whatever the manifest says of itself."""
    entries = [entry for listed in manifest["roots"].values() for entry in listed]
    if len(entries) > max_entries:
        raise UnsafeSnapshot(f"the snapshot has more than {max_entries} entries")
    total = 0
    for entry in entries:
        if entry.get("t") == "f":
            if entry["s"] not in sizes:
                raise UnsafeSnapshot("a manifest entry names bytes the store does not hold")
            total += sizes[entry["s"]]
    if total > max_bytes:
        raise UnsafeSnapshot(f"the snapshot holds more than {max_bytes} bytes")


def blobs_of(manifest: Mapping[str, Any]) -> set[str]:
    return {
        entry["s"]
        for entries in manifest["roots"].values()
        for entry in entries
        if entry.get("t") == "f"
    }


def components(path: bytes) -> list[bytes]:
    """The parts of a manifest's relative path; UnsafeSnapshot for anything that could name
    a place outside the root (absolute, `.`, `..`, empty parts) or holds a NUL."""
    parts = path.split(b"/")
    for part in parts:
        if part in (b"", b".", b"..") or b"\0" in part:
            raise UnsafeSnapshot(f"refused the name {path!r}: it would leave the workspace")
    return parts


def _open_parent(root_fd: int, parts: list[bytes]) -> int:
    """A descriptor of the directory that holds the last part, reached without following
    any symlink (a symlink in the way is refused)."""
    fd = os.dup(root_fd)
    try:
        for part in parts[:-1]:
            try:
                child = os.open(part, DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                raise UnsafeSnapshot(
                    f"refused the name {b'/'.join(parts)!r}: {part!r} is not a directory "
                    f"made by the snapshot ({exc.strerror})"
                ) from None
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _decode(entry: Mapping[str, Any], key: str) -> bytes:
    try:
        return base64.b64decode(str(entry[key]), validate=True)
    except (KeyError, ValueError):
        raise UnsafeSnapshot("a manifest entry is malformed") from None


def _lay_down(root_fd: int, entry: Mapping[str, Any], blobs: Mapping[str, bytes]) -> None:
    parts = components(_decode(entry, "p"))
    parent = _open_parent(root_fd, parts)
    name = parts[-1]
    try:
        kind = entry.get("t")
        if kind == "d":
            os.mkdir(name, 0o755, dir_fd=parent)
        elif kind == "l":
            os.symlink(_decode(entry, "l"), name, dir_fd=parent)
        elif kind == "f":
            data = blobs.get(str(entry.get("s")))
            if data is None:
                raise UnsafeSnapshot("a manifest entry names bytes the snapshot does not hold")
            mode = 0o755 if entry.get("x") else 0o644
            fd = os.open(name, CREATE_FLAGS, mode, dir_fd=parent)
            with os.fdopen(fd, "wb") as out:
                os.fchmod(fd, mode)
                out.write(data)
        else:
            raise UnsafeSnapshot(f"a manifest entry of unknown type {kind!r}")
    except FileExistsError:
        raise UnsafeSnapshot(f"refused the name {b'/'.join(parts)!r}: named twice") from None
    finally:
        os.close(parent)


def restore(
    manifest: Mapping[str, Any], blobs: Mapping[str, bytes], roots: Mapping[str, Path]
) -> None:
    """Lay the manifest's roots down into the directories `roots` names, which must be empty
    (blocking: run it in a thread). Each blob's sha256 must match its name."""
    for sha, data in blobs.items():
        if hashlib.sha256(data).hexdigest() != sha:
            raise UnsafeSnapshot(f"blob {sha} does not hold what its sha256 says")
    for root_name, root in roots.items():
        root_fd = os.open(root, DIR_FLAGS)
        try:
            if os.listdir(root_fd):
                raise UnsafeSnapshot(f"{root} is not empty")
            for entry in manifest["roots"].get(root_name, []):
                _lay_down(root_fd, entry, blobs)
        finally:
            os.close(root_fd)
