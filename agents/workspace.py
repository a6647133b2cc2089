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
from dataclasses import dataclass
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
    text: str
    sha256: str
    size: int
    truncated: bool
    changed_files: list[str]


def baseline_dir(workspace: Path) -> Path:
    return workspace.parent / f".{workspace.name}.baseline.git"


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
) -> bytes:
    proc = await asyncio.create_subprocess_exec(
        "git",
        *args,
        cwd=cwd,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
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


async def collect_diff(prepared: PreparedWorkspace, limit: int, timeout: float = 300.0) -> Diff:
    """The workspace against its starting commit: changes, new files (untracked included,
    .gitignore honoured) and deletions, as a binary-safe patch `git apply` takes."""
    env = _trusted_env(prepared.baseline, prepared.path)
    safe = ["-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false"]
    start = prepared.start_commit
    await _git(*safe, "read-tree", start, env=env, timeout=timeout)
    await _git(*safe, "add", "-A", env=env, timeout=timeout)
    patch = await _git(
        *safe,
        "diff",
        "--cached",
        "--binary",
        "--no-renames",
        "--no-color",
        "--no-ext-diff",
        start,
        env=env,
        timeout=timeout,
    )
    names = await _git(
        *safe, "diff", "--cached", "--name-only", "-z", "--no-renames", start, env=env
    )
    text = patch[:limit].decode(errors="replace")
    return Diff(
        text=text,
        sha256=hashlib.sha256(patch).hexdigest(),
        size=len(patch),
        truncated=len(patch) > limit,
        changed_files=sorted(n.decode(errors="replace") for n in names.split(b"\0") if n),
    )
