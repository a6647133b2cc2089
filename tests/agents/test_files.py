"""The executor's walks over a workspace while the sandbox's commands may still change it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agents.sandbox import files


@pytest.mark.parametrize("swapped", ["a", "a/b"])
def test_the_quota_walk_never_follows_a_directory_swapped_for_a_link_while_it_runs(
    swapped: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A command that swaps a directory (or one above it) for a symlink between the walk's
    listing and its descent must not make the executor walk, and count, what lies outside."""
    workspace = tmp_path / "workspace"
    (workspace / "a" / "b").mkdir(parents=True)
    (workspace / "a" / "b" / "small").write_bytes(b"x" * 4096)
    outside = tmp_path / "outside"
    (outside / "b").mkdir(parents=True)
    (outside / "b" / "big").write_bytes(os.urandom(8 * 1024 * 1024))
    honest = files.disk_usage([workspace])
    real_open = os.open
    target = str(workspace / "a" / "b")

    def open_after_the_swap(path: str | os.PathLike[str], *args: object, **kwargs: object) -> int:
        if str(path) == target and not (workspace / swapped).is_symlink():
            (workspace / swapped).rename(tmp_path / "moved")
            link_to = outside if swapped == "a" else outside / "b"
            (workspace / swapped).symlink_to(link_to)
        return real_open(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", open_after_the_swap)
    counted = files.disk_usage([workspace])
    assert (workspace / swapped).is_symlink()  # the swap happened during the walk
    assert counted < 1024 * 1024, f"counted {counted} bytes, {honest} honestly"
