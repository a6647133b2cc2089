"""Workspace snapshots on a real file system: what an agent left (symlinks, FIFOs, hostile
names and bytes) is read without following anything, and a hostile manifest cannot write
outside the directory it is restored into."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import pytest

from agents import snapshot


def _b64(name: bytes) -> str:
    return base64.b64encode(name).decode()


def _take(root: Path, **bounds: int) -> snapshot.Taken:
    limits = {"max_bytes": 1 << 20, "max_entries": 1000, **bounds}
    return snapshot.take({"workspace": root}, cache=snapshot.SnapshotCache(), **limits)


def test_a_workspace_comes_back_as_it_was_without_following_its_links(tmp_path: Path) -> None:
    source = tmp_path / "source"
    (source / "dir" / "deep").mkdir(parents=True)
    (source / "a.txt").write_bytes(b"one\n")
    (source / "dir" / "deep" / "run.sh").write_bytes(b"#!/bin/sh\n")
    (source / "dir" / "deep" / "run.sh").chmod(0o755)
    hostile = os.fsencode("caf\u00e9") + b"\xff\n name"
    with open(os.path.join(os.fsencode(source), hostile), "wb") as out:
        out.write(bytes(range(256)))
    secret = tmp_path / "secret"
    secret.write_text("host secret")
    (source / "link").symlink_to(secret)  # never followed: stored as a link
    (source / "up").symlink_to("..")
    os.mkfifo(source / "fifo")  # left out, never opened (no blocking read)

    taken = _take(source)
    assert b"host secret" not in b"".join(taken.blobs.values())
    assert taken.skipped == 1

    target = tmp_path / "target"
    target.mkdir()
    manifest = snapshot.parse_manifest(taken.manifest)
    snapshot.restore(manifest, taken.blobs, {"workspace": target})
    assert (target / "a.txt").read_bytes() == b"one\n"
    assert os.access(target / "dir" / "deep" / "run.sh", os.X_OK)
    assert (target / "link").is_symlink() and os.readlink(target / "link") == str(secret)
    assert os.readlink(target / "up") == ".."
    with open(os.path.join(os.fsencode(target), hostile), "rb") as restored:
        assert restored.read() == bytes(range(256))
    assert not (target / "fifo").exists()


def test_a_workspace_over_the_bound_is_not_saved(tmp_path: Path) -> None:
    (tmp_path / "big").write_bytes(b"x" * 5000)
    with pytest.raises(snapshot.SnapshotTooLarge):
        _take(tmp_path, max_bytes=4096)
    for number in range(5):
        (tmp_path / f"f{number}").write_bytes(b"")
    with pytest.raises(snapshot.SnapshotTooLarge):
        _take(tmp_path, max_entries=3)


def test_unchanged_files_are_not_read_again(tmp_path: Path) -> None:
    (tmp_path / "kept").write_bytes(b"kept")
    cache = snapshot.SnapshotCache()
    first = snapshot.take({"w": tmp_path}, max_bytes=1 << 20, max_entries=100, cache=cache)
    (tmp_path / "new").write_bytes(b"new")
    second = snapshot.take({"w": tmp_path}, max_bytes=1 << 20, max_entries=100, cache=cache)
    assert len(first.blobs) == 1 and list(second.blobs.values()) == [b"new"]


def _manifest(*entries: dict[str, Any]) -> dict[str, Any]:
    return snapshot.parse_manifest(
        json.dumps({"format": 1, "roots": {"workspace": list(entries)}}).encode()
    )


BLOB = b"planted"
SHA = __import__("hashlib").sha256(BLOB).hexdigest()


def _file(path: bytes) -> dict[str, Any]:
    return {"p": _b64(path), "t": "f", "s": SHA, "x": False}


@pytest.mark.parametrize(
    "entries",
    [
        [_file(b"../escaped")],
        [{"p": _b64(b"sub"), "t": "d"}, _file(b"sub/../../escaped")],
        [_file(b"/tmp/escaped")],
        [_file(b"./escaped/../x")],
        # A symlink the manifest made first, then a file through it.
        [{"p": _b64(b"link"), "t": "l", "l": _b64(b"..")}, _file(b"link/escaped")],
        # A file named twice: the second must not write through what the first made.
        [{"p": _b64(b"twice"), "t": "l", "l": _b64(b"../escaped")}, _file(b"twice")],
    ],
    ids=["dotdot", "dotdot-deep", "absolute", "dot", "symlink-parent", "over-a-symlink"],
)
def test_a_hostile_manifest_cannot_write_outside_the_workspace(
    tmp_path: Path, entries: list[dict[str, Any]]
) -> None:
    root = tmp_path / "box" / "workspace"
    root.mkdir(parents=True)
    with pytest.raises(snapshot.UnsafeSnapshot):
        snapshot.restore(_manifest(*entries), {SHA: BLOB}, {"workspace": root})
    outside = [p for p in tmp_path.rglob("*") if p.name == "escaped" and not p.is_symlink()]
    assert outside == []
    assert not (Path("/tmp/escaped")).exists()


def test_a_blob_that_is_not_what_its_name_says_is_refused(tmp_path: Path) -> None:
    with pytest.raises(snapshot.UnsafeSnapshot):
        snapshot.restore(_manifest(_file(b"a")), {SHA: b"other bytes"}, {"workspace": tmp_path})
    assert not (tmp_path / "a").exists()
