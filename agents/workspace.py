"""The run's workspace: cloned (or created empty) before the sandbox starts, diffed after it ends.

The executor clones the task's repository at its branch into the workspace; the sandbox has no
network. A repository that is neither a git URL nor a local path (empty, or e.g. "owner/name")
gives an empty git-initialised workspace, so the result still has a diff. Local paths are
cloned only from below the directories the executor allows (`repo_roots`), so a peer cannot
read arbitrary repositories of the executor's machine.

The starting commit is copied to a baseline repository next to the workspace, outside the
sandbox: the diff is taken with that repository's git directory and index and the workspace as
its work tree, so nothing the agent wrote in the workspace's own `.git` (hooks, config,
objects) is trusted or run by the executor.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shutil
import stat
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agents.errors import AgentSetupError

URL_SCHEMES = ("https://", "http://", "ssh://", "git://", "file://")
SCP_LIKE = re.compile(r"^[\w.+-]+@[\w.-]+:(?!//)")
START_REF = "refs/fedagent/start"
IDENTITY = ["-c", "user.name=fedagent", "-c", "user.email=fedagent@localhost"]


@dataclass
class PreparedWorkspace:
    path: Path
    baseline: Path
    start_commit: str
    source: str  # clone | empty | resumed
    repository: str | None = None
    branch: str | None = None
    note: str = ""

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "repository": self.repository,
            "branch": self.branch,
            "startCommit": self.start_commit,
            "note": self.note,
        }


@dataclass
class Diff:
    """The diff as written to `path`: whole, or its first `max_bytes` bytes when `truncated`.

    `sha256` and `size` are those of the file, so what is stored and served is what they say.
    """

    path: Path
    sha256: str
    size: int
    truncated: bool
    changed_files: list[str]
    # Changed files over the per-file cap: listed ({"path", "bytes"}), not inlined.
    omitted_files: list[dict[str, Any]] = field(default_factory=list)
    preview: str = ""

    @property
    def text(self) -> str:
        return self.path.read_bytes().decode(errors="replace")


def baseline_dir(workspace: Path) -> Path:
    return workspace.parent / f".{workspace.name}.baseline.git"


def diff_file(workspace: Path) -> Path:
    """Where the run's diff is written: next to the workspace, outside the sandbox."""
    return workspace.parent / f".{workspace.name}.diff"


def classify(repository: str | None, roots: Sequence[Path]) -> tuple[str, str]:
    """("url", url) | ("local", path) | ("none", why). Refuses local paths outside `roots`."""
    repo = (repository or "").strip()
    if not repo:
        return "none", "no repository was given"
    if repo.startswith("file://"):
        repo = repo[len("file://") :]
    elif repo.startswith(URL_SCHEMES) or SCP_LIKE.match(repo):
        return "url", repo
    if not repo.startswith(("/", "./", "../", "~")):
        return "none", f"{repo!r} is neither a git URL nor a local path"
    path = Path(repo).expanduser().resolve()
    if not any(path.is_relative_to(root.expanduser().resolve()) for root in roots):
        raise AgentSetupError(
            f"cloning the local path {repo} is not allowed on this executor; local "
            "repositories must be below a directory listed in FEDAGENT_AGENT_REPO_ROOTS",
            invalid=True,
        )
    if not path.exists():
        raise AgentSetupError(f"the local repository {repo} does not exist", invalid=True)
    return "local", str(path)


async def _git(
    *args: str,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120.0,
    input: bytes | None = None,
) -> bytes:
    proc = await asyncio.create_subprocess_exec(
        "git",
        *args,
        cwd=cwd,
        env=env,
        stdin=asyncio.subprocess.DEVNULL if input is None else asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(input), timeout)
    except (TimeoutError, asyncio.CancelledError):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        await proc.wait()
        raise
    if proc.returncode != 0:
        message = err.decode(errors="replace").strip()[-2000:]
        raise GitError(f"git {args[0]} failed (exit {proc.returncode}): {message}")
    return out


class GitError(Exception):
    pass


def _clone_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        GIT_TERMINAL_PROMPT="0",
        GIT_ASKPASS="/bin/true",
        # never ext:: or other transports that run commands
        GIT_ALLOW_PROTOCOL="http:https:ssh:git:file",
    )
    return env


def _trusted_env(baseline: Path, workspace: Path) -> dict[str, str]:
    """git over the agent's work tree: our git dir and index, no user or system config."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(baseline),
        "LANG": "C.UTF-8",
        "GIT_DIR": str(baseline),
        "GIT_WORK_TREE": str(workspace),
        "GIT_INDEX_FILE": str(baseline / "fedagent-index"),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_TERMINAL_PROMPT": "0",
    }


def _remove(path: Path) -> None:
    def retry(function: Any, failed: str, *_: Any) -> None:
        # a directory the agent made unwritable: make it writable and try again
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(failed), stat.S_IRWXU)
            function(failed)

    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        if sys.version_info >= (3, 12):
            shutil.rmtree(path, onexc=retry)
        else:
            shutil.rmtree(path, onerror=retry)


async def prepare_workspace(
    workspace: Path,
    repository: str | None,
    branch: str | None,
    *,
    roots: Sequence[Path] = (),
    reuse: bool = False,
    timeout: float = 600.0,
) -> PreparedWorkspace:
    """Clone (or create) the workspace and record its starting commit outside it.

    With `reuse`, a workspace prepared before (a retry of the same try) is kept as it is.
    """
    baseline = baseline_dir(workspace)
    if reuse and workspace.is_dir() and (baseline / "HEAD").exists():
        with contextlib.suppress(GitError):
            start = (await _git("--git-dir", str(baseline), "rev-parse", START_REF)).decode()
            return PreparedWorkspace(
                workspace,
                baseline,
                start.strip(),
                "resumed",
                repository,
                branch,
                "the workspace of the interrupted attempt, as it was left",
            )
    kind, where = classify(repository, roots)
    for old in (workspace, baseline):
        await asyncio.to_thread(_remove, old)
    workspace.parent.mkdir(parents=True, exist_ok=True)
    try:
        if kind == "none":
            workspace.mkdir()
            await _git("init", "-q", "--initial-branch", branch or "main", cwd=workspace)
            await _git(
                *IDENTITY,
                "commit",
                "-q",
                "--allow-empty",
                "-m",
                "fedagent: empty workspace",
                cwd=workspace,
            )
            note = f"an empty git repository ({where})"
        else:
            args = ["clone", "-q"]
            if branch:
                args += ["--branch", branch]
            if kind == "local":
                args += ["--no-local", "--no-hardlinks"]
            try:
                await _git(*args, "--", where, str(workspace), env=_clone_env(), timeout=timeout)
            except TimeoutError:
                raise AgentSetupError(
                    f"cloning {repository} took longer than {timeout:g} s"
                ) from None
            note = f"a clone of {repository}" + (f" at {branch}" if branch else "")
        start = (await _git("rev-parse", "HEAD", cwd=workspace)).decode().strip()
        await _git("init", "-q", "--bare", str(baseline))
        await _git(
            "--git-dir",
            str(baseline),
            "fetch",
            "-q",
            "--depth=1",
            "--no-tags",
            str(workspace),
            f"HEAD:{START_REF}",
            env={**_clone_env(), "GIT_CONFIG_NOSYSTEM": "1"},
        )
    except GitError as exc:
        what = f"{repository}" + (f" at branch {branch}" if branch else "")
        raise AgentSetupError(f"could not prepare the workspace from {what}: {exc}") from exc
    return PreparedWorkspace(
        workspace, baseline, start, "empty" if kind == "none" else "clone", repository, branch, note
    )


async def _changed(
    safe: list[str], start: str, env: dict[str, str], timeout: float
) -> list[tuple[str, int]]:
    """(path, size) of every changed path, the size being the larger of its old and new blob."""
    raw = await _git(
        *safe,
        "diff",
        "--cached",
        "--raw",
        "-z",
        "--no-renames",
        "--no-abbrev",
        start,
        env=env,
        timeout=timeout,
    )
    tokens = raw.split(b"\0")
    entries: list[tuple[str, list[str]]] = []
    for meta, name in zip(tokens[0::2], tokens[1::2], strict=False):
        fields = meta.decode(errors="replace").lstrip(":").split()
        if len(fields) < 4 or not name:
            continue
        blobs = [sha for sha in fields[2:4] if sha.strip("0")]
        entries.append((name.decode(errors="replace"), blobs))
    wanted = sorted({sha for _, blobs in entries for sha in blobs})
    sizes: dict[str, int] = {}
    if wanted:
        out = await _git(
            "cat-file",
            "--batch-check=%(objectname) %(objectsize)",
            env=env,
            timeout=timeout,
            input="".join(f"{sha}\n" for sha in wanted).encode(),
        )
        for line in out.decode(errors="replace").splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1].isdigit():
                sizes[parts[0]] = int(parts[1])  # "<sha> missing" (a submodule) stays 0
    return [(name, max([sizes.get(sha, 0) for sha in blobs], default=0)) for name, blobs in entries]


async def _stream_to_file(
    args: list[str], env: dict[str, str], out: Path, max_bytes: int, timeout: float
) -> tuple[str, int, bool]:
    """Run git, writing its stdout to `out` up to `max_bytes`: (sha256, size, truncated)."""
    digest = hashlib.sha256()
    size = 0
    truncated = False
    proc = await asyncio.create_subprocess_exec(
        "git",
        *args,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    errors = asyncio.create_task(proc.stderr.read(64 * 1024))
    try:
        async with asyncio.timeout(timeout):
            with open(out, "wb") as handle:
                while block := await proc.stdout.read(256 * 1024):
                    keep = block[: max_bytes - size]
                    handle.write(keep)
                    digest.update(keep)
                    size += len(keep)
                    if len(keep) < len(block):
                        truncated = True
                        break
            if truncated:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 9)
            code = await proc.wait()
            err = await errors
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        await proc.wait()
        errors.cancel()
        raise
    if code != 0 and not truncated:
        message = err.decode(errors="replace").strip()[-2000:]
        raise GitError(f"git diff failed (exit {code}): {message}")
    return digest.hexdigest(), size, truncated


def _preview(path: Path, limit: int) -> str:
    with open(path, "rb") as handle:
        head = handle.read(limit)
    # never half a character at the cut
    return head.decode("utf-8", errors="ignore" if len(head) == limit else "replace")


async def collect_diff(
    prepared: PreparedWorkspace,
    *,
    max_bytes: int,
    file_max_bytes: int,
    preview_bytes: int = 16 * 1024,
    out: Path | None = None,
    timeout: float = 300.0,
) -> Diff:
    """The workspace against its starting commit: changes, new files (untracked included,
    .gitignore honoured) and deletions, as a binary-safe patch `git apply` takes.

    The patch is streamed to a file (never held in memory) and cut at `max_bytes`; a changed
    file larger than `file_max_bytes` is left out of the patch and listed in `omitted_files`.
    """
    env = _trusted_env(prepared.baseline, prepared.path)
    safe = ["-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false"]
    start = prepared.start_commit
    await _git(*safe, "read-tree", start, env=env, timeout=timeout)
    await _git(*safe, "add", "-A", env=env, timeout=timeout)
    changed = await _changed(safe, start, env, timeout)
    omitted: list[dict[str, Any]] = [
        {"path": name, "bytes": size} for name, size in changed if size > file_max_bytes
    ]
    if omitted:
        # Back to the starting version in our index: the patch leaves them out.
        await _git(
            *safe,
            "reset",
            "-q",
            "--pathspec-from-file=-",
            "--pathspec-file-nul",
            start,
            env={**env, "GIT_LITERAL_PATHSPECS": "1"},
            timeout=timeout,
            input=b"\0".join(entry["path"].encode() for entry in omitted),
        )
    target = out or diff_file(prepared.path)
    sha256, size, truncated = await _stream_to_file(
        [
            *safe,
            "diff",
            "--cached",
            "--binary",
            "--no-renames",
            "--no-color",
            "--no-ext-diff",
            start,
        ],
        env,
        target,
        max_bytes,
        timeout,
    )
    return Diff(
        path=target,
        sha256=sha256,
        size=size,
        truncated=truncated,
        changed_files=sorted(name for name, _ in changed),
        omitted_files=sorted(omitted, key=lambda entry: str(entry["path"])),
        preview=_preview(target, preview_bytes),
    )
