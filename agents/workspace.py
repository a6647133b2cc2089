"""The run's workspace: cloned (or created empty) before the sandbox starts, diffed after it ends.

The executor clones the task's repository at its branch into the workspace. The clone runs
like an agent's command, inside a bwrap sandbox as the sandbox's uid (seccomp, limits, no
capability), with a minimal environment (no user or system git config, no credential helper,
no ssh agent, HOME in the clone's own /tmp) and nothing of the worker's files but the
repository (a local one is mounted read-only). It shares the host's network only for an http(s)
or git:// URL, whose host the address policy (`agents.addresses`) allowed and to whose checked
addresses git is pinned (no redirects). The clone has the run's time (`clone_timeout`) and
disk (`Limits.disk_bytes`, `file_bytes`) caps. What git said when it failed stays in the
executor's log; the peer gets a reason that says nothing about the executor's network.

A repository that is neither a git URL nor a local path (empty, or e.g. "owner/name") gives an
empty git-initialised workspace, so the result still has a diff. Local paths are cloned only
from below the directories the executor allows (`repo_roots`), so a peer cannot read arbitrary
repositories of the executor's machine. ssh URLs are refused: a clone gets no credentials.

The starting commit is copied to a baseline repository next to the workspace, outside the
sandbox: the diff is taken with that repository's git directory and index and the workspace as
its work tree, so nothing the agent wrote in the workspace's own `.git` (hooks, config,
objects) is trusted or run by the executor.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import hashlib
import logging
import os
import posixpath
import re
import shlex
import shutil
import stat
import tempfile
import urllib.parse
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from agents.addresses import resolve_allowed
from agents.errors import AgentSetupError
from agents.sandbox import fence, files
from agents.sandbox.base import (
    PEER_DISK_BUDGET,
    CommandResult,
    DiskOveruse,
    Limits,
    Sandbox,
    SandboxUnavailable,
    run_within_quota,
)
from agents.text import text_of

log = logging.getLogger(__name__)
URL_SCHEMES = ("https://", "http://", "ssh://", "git://", "file://")
SCP_LIKE = re.compile(r"^[\w.+-]+@[\w.-]+:(?!//)")
CLONE_SCHEMES = ("https", "http", "git")
DEFAULT_PORTS = {"https": 443, "http": 80, "git": 9418, "ssh": 22}
UNRESERVED = re.compile(r"%(2[dDeE]|5[fF]|7[eE]|[46][1-9a-fA-F]|[57][0-9aA]|3[0-9])")
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


@dataclass(frozen=True)
class CloneSettings:
    """How the executor clones: its sandbox (bwrap), caps and address policy."""

    bwrap: str = "bwrap"
    sandbox_uid: int = 61000
    use_cgroups: bool = True
    limits: Limits = field(default_factory=Limits)
    timeout: float = 600.0
    outbound_allowlist: tuple[str, ...] = ()
    allow_private_hosts: bool = False
    # Clone as the executor's uid (same environment and address policy) where bwrap cannot
    # start; only for the docker and process sandboxes (bwrap must work for the bwrap one).
    host_fallback: bool = False


def normalise_repository_url(repository: str) -> str:
    """The form of a repository that grants' globs are matched against and that is cloned.

    URLs: scheme and host lowercased, default port, user info, duplicate slashes and the dot
    segments of the path removed (percent-encoded unreserved characters decoded first, so
    `%2e%2e` is `..`); `user@host:path` becomes `ssh://host/path`. Local paths are normalised
    the same way (without touching the file system); anything else (`owner/name`) is returned
    stripped. Raises ValueError for what cannot name a repository (control characters or
    spaces, a query or fragment, an URL without a host).
    """
    text = repository.strip()
    if not text or any(ord(c) < 0x21 or ord(c) == 0x7F for c in text) or "\\" in text:
        raise ValueError("a repository is one word without control characters or backslashes")
    if SCP_LIKE.match(text) and not text.startswith(URL_SCHEMES):
        user_host, _, path = text.partition(":")
        text = f"ssh://{user_host}/{path}"
    if text.lower().startswith(URL_SCHEMES):
        parts = urllib.parse.urlsplit(text)
        scheme = parts.scheme.lower()
        if parts.query or parts.fragment or "?" in text or "#" in text:
            raise ValueError("a repository URL has no query or fragment")
        path = _dot_segments(UNRESERVED.sub(lambda m: chr(int(m.group(1), 16)), parts.path))
        if scheme == "file":
            return "file://" + path
        host = (parts.hostname or "").rstrip(".")
        if not host:
            raise ValueError("a repository URL needs a host")
        try:
            port = parts.port
        except ValueError:
            raise ValueError("the port of the repository URL is not a number") from None
        netloc = f"[{host}]" if ":" in host else host
        if port is not None and port != DEFAULT_PORTS.get(scheme):
            netloc += f":{port}"
        return f"{scheme}://{netloc}{path if path != '/' else ''}"
    if text.startswith(("/", "./", "../")):
        return _dot_segments(text) if text.startswith("/") else posixpath.normpath(text)
    return text


def _dot_segments(path: str) -> str:
    """An absolute path with `.`, `..` and empty segments resolved (never above the root)."""
    kept: list[str] = []
    for segment in path.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if kept:
                kept.pop()
            continue
        kept.append(segment)
    return "/" + "/".join(kept)


# Agent ids name workspaces (a uuid, as the workspace path check in activities/agents.py keeps).
RUN_NAME = re.compile(r"[0-9a-fA-F-]{36}")


def baseline_dir(workspace: Path) -> Path:
    return workspace.parent / f".{workspace.name}.baseline.git"


def diff_file(workspace: Path) -> Path:
    """Where the run's diff is written: next to the workspace, outside the sandbox."""
    return workspace.parent / f".{workspace.name}.diff"


def run_files(workspaces: Path) -> dict[str, list[Path]]:
    """What each run holds in one requester's directory of workspaces, by agent id: its
    workspace and everything named `.{agentId}.*` beside it (baseline repository, diff file,
    /tmp, diff scratch, fence). Names that are no run's are left out."""
    runs: dict[str, list[Path]] = {}
    try:
        entries = list(os.scandir(workspaces))
    except OSError:
        return runs
    for entry in entries:
        name = files.run_of(entry.name)
        if RUN_NAME.fullmatch(name):
            runs.setdefault(name, []).append(Path(entry.path))
    return runs


def remove_run_files(paths: Sequence[Path]) -> int:
    """Remove a run's files (`run_files`); returns the bytes they took on disk."""
    used = files.disk_usage(list(paths))
    for path in sorted(paths, key=lambda p: p.name.endswith(".fence.lock")):
        remove_tree(path)
    return used


def classify(repository: str | None, roots: Sequence[Path]) -> tuple[str, str]:
    """("url", url) | ("local", path) | ("none", why). Refuses local paths outside `roots`."""
    repo = (repository or "").strip()
    if not repo:
        return "none", "no repository was given"
    if repo.startswith(URL_SCHEMES) or SCP_LIKE.match(repo):
        try:
            repo = normalise_repository_url(repo)
        except ValueError as exc:
            raise AgentSetupError(
                f"the repository {repository!r} is refused: {exc}", invalid=True
            ) from None
    if repo.startswith("file://"):
        repo = repo[len("file://") :]
    elif repo.startswith(URL_SCHEMES):
        scheme = repo.partition(":")[0]
        if scheme not in CLONE_SCHEMES:
            raise AgentSetupError(
                f"cloning over {scheme} is not offered: a clone gets no credentials; use an "
                "https:// URL",
                invalid=True,
            )
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


# The whole environment of a clone (with the sandbox's PATH, LANG, TMPDIR): git reads no user
# or system config, asks nobody for credentials, and knows no transport that runs commands.
CLONE_ENV = {
    "HOME": "/tmp/home",
    "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_ASKPASS": "/bin/false",
    "SSH_ASKPASS": "/bin/false",
    "GIT_ALLOW_PROTOCOL": "http:https:git:file",
    "GIT_LFS_SKIP_SMUDGE": "1",
}


def _local_env() -> dict[str, str]:
    """git of the executor over a workspace it just made: no user or system config."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.devnull,
        "LANG": "C.UTF-8",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_ALLOW_PROTOCOL": "file",
    }


# The clone ran as the sandbox uid: the executor's git reads that repository without running
# anything from it (no hooks, no fsmonitor), whoever owns it.
LOCAL_UPLOAD_PACK = (
    "git -c safe.directory=/repository -c safe.directory=/repository/.git upload-pack"
)
SAFE_LOCAL = [
    "-c",
    "safe.directory=*",
    "-c",
    "core.hooksPath=/dev/null",
    "-c",
    "core.fsmonitor=false",
]


def remove_tree(path: Path) -> None:
    """Remove what an agent wrote, at any depth, whatever modes it left
    (`agents.sandbox.fence.remove_tree`)."""
    fence.remove_tree(path)


async def prepare_workspace(
    workspace: Path,
    repository: str | None,
    branch: str | None,
    *,
    roots: Sequence[Path] = (),
    reuse: bool = False,
    timeout: float = 600.0,
    clone: CloneSettings | None = None,
) -> PreparedWorkspace:
    """Clone (or create) the workspace and record its starting commit outside it.

    With `reuse`, a workspace prepared before (a retry of the same try) is kept as it is.
    """
    clone = clone or CloneSettings(timeout=timeout)
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
        await asyncio.to_thread(remove_tree, old)
    workspace.parent.mkdir(parents=True, exist_ok=True)
    what = f"{repository}" + (f" at branch {branch}" if branch else "")
    try:
        workspace.mkdir()
        if kind == "none":
            start = await _lay_empty(workspace, baseline, branch)
            note = f"an empty git repository ({where})"
        else:
            await clone_in_sandbox(workspace, kind, where, branch, clone, what)
            note = f"a clone of {repository}" + (f" at {branch}" if branch else "")
            start = await _record_baseline(workspace, baseline)
    except GitError as exc:
        log.warning("preparing the workspace from %s failed: %s", what, exc)
        await asyncio.shield(_remove_both(workspace, baseline))
        raise AgentSetupError(f"could not prepare the workspace from {what}") from None
    except BaseException:
        await asyncio.shield(_remove_both(workspace, baseline))
        raise
    return PreparedWorkspace(
        workspace, baseline, start, "empty" if kind == "none" else "clone", repository, branch, note
    )


# Empty workspaces (with their baselines) made once per branch by this process, then copied:
# a copy of a few small files instead of a dozen git processes per run. The templates live in
# a private directory of this process; the last TEMPLATES_KEPT branches are kept.
TEMPLATES_KEPT = 16
_templates: dict[str, tuple[Path, str]] = {}
_templates_root: list[Path] = []


def _template_dir() -> Path:
    if not _templates_root or not _templates_root[0].is_dir():
        _templates_root[:] = [Path(tempfile.mkdtemp(prefix="fedagent-empty-"))]
        atexit.register(shutil.rmtree, _templates_root[0], True)
    return Path(tempfile.mkdtemp(dir=_templates_root[0]))


async def _empty_template(branch: str) -> tuple[Path, str]:
    """The template of an empty workspace on `branch` (`work/.git`, `baseline`) and its
    commit, made by git the first time (a branch name git refuses fails here as before)."""
    known = _templates.pop(branch, None)
    if known is not None and (known[0] / "baseline" / "HEAD").exists():
        _templates[branch] = known  # the most recently used last
        return known
    made = await asyncio.to_thread(_template_dir)
    try:
        (made / "work").mkdir()
        await _init_empty(made / "work", branch)
        start = await _record_baseline(made / "work", made / "baseline")
    except BaseException:
        await asyncio.to_thread(shutil.rmtree, made, True)
        raise
    known = _templates.setdefault(branch, (made, start))
    if known[0] != made:  # another run made it meanwhile
        await asyncio.to_thread(shutil.rmtree, made, True)
    while len(_templates) > TEMPLATES_KEPT:
        oldest = next(iter(_templates))
        await asyncio.to_thread(shutil.rmtree, _templates.pop(oldest)[0], True)
    return known


async def _lay_empty(workspace: Path, baseline: Path, branch: str | None) -> str:
    """An empty repository with one empty commit on `branch` (default: main) in the (empty)
    workspace, and its baseline beside it; the starting commit."""
    template, start = await _empty_template(branch or "main")

    def lay() -> None:
        shutil.copytree(template / "work" / ".git", workspace / ".git", symlinks=True)
        shutil.copytree(template / "baseline", baseline, symlinks=True)

    await asyncio.to_thread(lay)
    return start


async def _init_empty(workspace: Path, branch: str | None) -> None:
    """An empty repository with one empty commit, on `branch` (default: main)."""
    env = _local_env()
    # Without git's sample hooks (files copied to every workspace for nothing), but with the
    # directories an agent expects to write in.
    await _git(
        "init", "-q", "--template=", "--initial-branch", branch or "main", cwd=workspace, env=env
    )
    for directory in ("hooks", "info"):
        (workspace / ".git" / directory).mkdir(exist_ok=True)
    await _git(
        *IDENTITY,
        "commit",
        "-q",
        "--allow-empty",
        "-m",
        "fedagent: empty workspace",
        cwd=workspace,
        env=env,
    )


async def _record_baseline(workspace: Path, baseline: Path) -> str:
    """Keep the workspace's starting commit in a bare repository beside it; return the commit."""
    start = (
        (await _git(*SAFE_LOCAL, "rev-parse", "HEAD", cwd=workspace, env=_local_env()))
        .decode()
        .strip()
    )
    # Readable by the diff's sandbox uid whatever the worker's umask (0644 files, 0755
    # directories); the sandbox mounts it read-only, so it cannot write it either way.
    # No template: no sample hooks or info files to write (and copy) for nothing.
    await _git(
        "init", "-q", "--bare", "--template=", "--shared=0644", str(baseline), env=_local_env()
    )
    await _git(
        *SAFE_LOCAL,
        "--git-dir",
        str(baseline),
        "fetch",
        "-q",
        "--depth=1",
        "--no-tags",
        "--upload-pack",
        "git -c safe.directory=* -c core.hooksPath=/dev/null upload-pack",
        str(workspace),
        f"HEAD:{START_REF}",
        env=_local_env(),
    )
    return start


async def _remove_both(workspace: Path, baseline: Path) -> None:
    for path in (workspace, baseline):
        await asyncio.to_thread(remove_tree, path)


async def clone_in_sandbox(
    workspace: Path, kind: str, where: str, branch: str | None, clone: CloneSettings, what: str
) -> None:
    """`git clone` of `where` into the (empty) workspace, inside a bwrap sandbox."""
    from agents.sandbox.bwrap import BwrapSandbox  # the sandbox imports nothing from here

    network = kind == "url"
    source, options = await _pinned_source(where, clone) if network else ("/repository", [])
    argv = ["git", "-c", "http.followRedirects=false", "-c", "transfer.fsckObjects=true"]
    argv += [*options, "clone", "-q"]
    if branch:
        argv += ["--branch", branch]
    if kind == "local":
        # The repository belongs to someone else than the sandbox's uid; upload-pack gets
        # none of the clone's -c options, so it is told itself.
        argv += ["--no-local", "--no-hardlinks", "--upload-pack", LOCAL_UPLOAD_PACK]
    argv += ["--", source, "/workspace"]
    sandbox = BwrapSandbox(
        workspace,
        replace(clone.limits, command_timeout=clone.timeout),
        bwrap=clone.bwrap,
        run_as_uid=clone.sandbox_uid,
        use_cgroups=clone.use_cgroups,
        network=network,
        ro_binds=((where, "/repository"),) if kind == "local" else (),
        environment=CLONE_ENV,
    )
    over: DiskOveruse | None = None
    try:
        try:
            await sandbox.start()
        except SandboxUnavailable as exc:
            if not clone.host_fallback:
                raise AgentSetupError(f"the clone's sandbox did not start: {exc}") from exc
            log.warning("cloning %s without a sandbox (bwrap cannot start: %s)", what, exc)
            result = await _clone_on_host(argv, kind, where, workspace, clone.timeout)
        else:
            result, over = await run_within_quota(sandbox, shlex.join(argv), clone.timeout)
        if over is None:
            _, over = await sandbox.check_disk()  # a clone faster than the checks while it ran
    finally:
        await sandbox.kill()
    _check_clone(result, over, what, clone)


async def _pinned_source(where: str, clone: CloneSettings) -> tuple[str, list[str]]:
    """A URL's clone source and git options, pinned to the addresses the policy allowed."""
    parts = urllib.parse.urlsplit(where)
    host = parts.hostname or ""
    port = parts.port or DEFAULT_PORTS[parts.scheme]
    addresses = await resolve_allowed(
        host,
        port,
        allowlist=clone.outbound_allowlist,
        allow_private=clone.allow_private_hosts,
        scheme=parts.scheme,
    )
    if parts.scheme == "git":  # no name to keep for TLS: connect to the address checked
        address = f"[{addresses[0]}]" if ":" in addresses[0] else addresses[0]
        return urllib.parse.urlunsplit(parts._replace(netloc=f"{address}:{port}")), []
    # The checked addresses, for curl: no second DNS answer is asked for.
    pinned = ",".join(f"[{a}]" if ":" in a else a for a in addresses)
    return where, ["-c", f"http.curloptResolve={host}:{port}:{pinned}"]


def _check_clone(
    result: CommandResult, over: DiskOveruse | None, what: str, clone: CloneSettings
) -> None:
    """AgentSetupError for a clone stopped over a disk budget, timed out or failed."""
    if over is not None and over.code == PEER_DISK_BUDGET:
        raise AgentSetupError(f"cloning {what} was stopped: {over.reason()}")
    if over is not None:
        raise AgentSetupError(
            f"cloning {what} was stopped: the repository needs more than this executor's "
            f"disk quota of {clone.limits.disk_bytes} bytes",
            invalid=True,
        )
    if result.timed_out:
        raise AgentSetupError(f"cloning {what} took longer than {clone.timeout:g} s")
    if result.exit_code != 0:
        log.warning(
            "clone of %s failed (exit %d): %s", what, result.exit_code, result.output[-4000:]
        )
        raise AgentSetupError(
            f"could not prepare the workspace from {what}: the repository or the branch "
            "could not be fetched "
            "(the executor's log has git's own words)"
        )


async def _clone_on_host(
    argv: list[str], kind: str, where: str, workspace: Path, timeout: float
) -> CommandResult:
    """The same clone as the executor's uid, where no bwrap can run (the docker or process
    sandbox on such a machine): the same minimal environment, options and address pinning."""
    argv = list(argv)
    argv[-1] = str(workspace)
    if kind == "local":
        argv[-2] = where
        upload = f"git -c safe.directory={where} -c safe.directory={where}/.git upload-pack"
        argv[argv.index(LOCAL_UPLOAD_PACK)] = upload
    with tempfile.TemporaryDirectory(prefix="fedagent-clone-") as home:
        env = {
            **CLONE_ENV,
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "HOME": home,
        }
        try:
            await _git(*argv[1:], env=env, timeout=timeout)
        except TimeoutError:
            return CommandResult(shlex.join(argv), -9, "", timed_out=True)
        except GitError as exc:
            return CommandResult(shlex.join(argv), 128, str(exc))
    return CommandResult(shlex.join(argv), 0, "")


# --- the diff: taken inside a sandbox, never by a host process in what the agent wrote -------

BASELINE_MOUNT = "/fedagent/baseline"
INPUT_MOUNT = "/fedagent/in"
SCRATCH_MOUNT = "/tmp"
# What git inside the diff sandbox runs with: our baseline as its git dir (read-only), the
# agent's files as its work tree (read-only), index and new objects in the sandbox's scratch,
# no user or system config. Whatever the agent planted (a submodule's .git with filters or
# fsmonitor, attributes, includes, alternates) may run there: inside the sandbox, with no
# network, no secret and nothing writable but the scratch directory.
DIFF_PROLOGUE = """set -u
export GIT_DIR={baseline} GIT_WORK_TREE={workspace} HOME={scratch}
export GIT_INDEX_FILE={scratch}/git/index GIT_OBJECT_DIRECTORY={scratch}/git/objects
export GIT_ALTERNATE_OBJECT_DIRECTORIES={baseline}/objects
export GIT_CONFIG_NOSYSTEM=1 GIT_CONFIG_GLOBAL=/dev/null GIT_TERMINAL_PROMPT=0 LANG=C.UTF-8
g() {{ git -c safe.directory='*' -c core.hooksPath=/dev/null -c core.fsmonitor=false "$@"; }}
"""
# The submodules of the starting commit, in a sandbox of their own: git runs `git status` in
# each, which is where planted code can run, so what this step leaves (index, objects, files)
# is never used again; the executor takes from its listing only well-formed gitlinks.
DIFF_SUBMODULES = """mkdir -p {scratch}/git/objects || exit 10
g read-tree {start} || exit 11
export GIT_LITERAL_PATHSPECS=1
xargs -0 -r -n1 git -c safe.directory='*' -c core.hooksPath=/dev/null -c core.fsmonitor=false \\
  add -A --ignore-errors -- <{inputs}/gitlinks >/dev/null 2>&1
xargs -0 -r git -c safe.directory='*' ls-files -s -z -- <{inputs}/gitlinks \\
  >{scratch}/gitlinks-staged || exit 12
"""
# Stage everything else (`--ignore-errors`: a path git cannot add keeps its starting version
# and the rest is still staged); a submodule path that holds no repository any more (removed,
# or made plain files) is staged here too, as no submodule code can run there; the checked
# gitlinks of the submodule step go in last. Then list what changed and the sizes of its blobs.
DIFF_STAGE = """mkdir -p {scratch}/git/objects || exit 10
g read-tree {start} || exit 11
g add -A --ignore-errors --pathspec-from-file={inputs}/paths --pathspec-file-nul \\
  2>{scratch}/add-errors; [ $? -le 1 ] || {{ tail -c 2000 {scratch}/add-errors; exit 12; }}
GIT_LITERAL_PATHSPECS=1 xargs -0 -r -n1 sh -c '[ -e "$1/.git" ] || [ -L "$1/.git" ] || \\
  git -c safe.directory="*" -c core.hooksPath=/dev/null -c core.fsmonitor=false \\
  add -A --ignore-errors -- "$1" 2>/dev/null; true' - <{inputs}/gitlinks
g update-index -z --index-info <{inputs}/gitlink-updates || exit 13
g diff --cached --raw -z --no-renames --no-abbrev {start} >{scratch}/changed || exit 13
g diff --cached --raw --no-renames --no-abbrev {start} | cut -d' ' -f3,4 | tr ' ' '\\n' \\
  | grep -v '^0*$' | sort -u \\
  | g cat-file --batch-check='%(objectname) %(objectsize)' >{scratch}/sizes || exit 14
"""
# Files over the per-file cap back to their starting version, then the patch, cut one byte
# past the cap so that the executor knows it was cut.
DIFF_PATCH = """if [ -s {inputs}/omit ]; then
  GIT_LITERAL_PATHSPECS=1 g reset -q --pathspec-from-file={inputs}/omit \\
    --pathspec-file-nul {start} || exit 20
fi
{{ g diff --cached --binary --no-renames --no-color --no-ext-diff --no-textconv {start}; \\
  echo $? >{scratch}/patch-status; }} | head -c {cut} >{scratch}/patch
"""
LIST_MAX_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class DiffSandbox:
    """Where the diff is taken: a started sandbox whose commands see the workspace read-only
    at `sandbox.workspace_mount`, the baseline repository read-only at `baseline`, the
    directory `inputs_host` read-only at `inputs`, and write `scratch` (`scratch_host` on the
    executor's side, a directory the executor made and nothing else uses)."""

    sandbox: Sandbox
    baseline: str
    inputs: str
    inputs_host: Path
    scratch: str
    scratch_host: Path


# Opens a fresh diff sandbox for one step ("submodules", "diff") and takes it down after.
DiffSandboxes = Callable[[str], AbstractAsyncContextManager[DiffSandbox]]


def diff_dirs(workspace: Path, step: str) -> tuple[Path, Path]:
    """(scratch, inputs) of one step's diff sandbox on the executor's side."""
    return (
        workspace.parent / f".{workspace.name}.{step}-scratch",
        workspace.parent / f".{workspace.name}.{step}-in",
    )


def read_untrusted(path: Path, limit: int) -> bytes:
    """At most `limit` bytes of a regular file a sandbox wrote: never through a symlink,
    never blocking on a FIFO or a device."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise GitError(f"{path.name} is not a regular file")
        return handle.read(limit)


def _copy_untrusted(source: Path, target: Path, max_bytes: int) -> tuple[str, int, bool]:
    """Copy up to `max_bytes` of `source` (a sandbox's file) to `target`: (sha256, size,
    truncated)."""
    digest = hashlib.sha256()
    size = 0
    fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as handle, open(target, "wb") as out:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise GitError("the patch is not a regular file")
        while size < max_bytes and (block := handle.read(min(1024 * 1024, max_bytes - size))):
            out.write(block)
            digest.update(block)
            size += len(block)
        truncated = bool(handle.read(1))
    return digest.hexdigest(), size, truncated


def _read_changed(scratch: Path) -> list[tuple[bytes, int]]:
    """(path, size) of every changed path from `git diff --raw -z` and `cat-file
    --batch-check`, the size being the larger of its old and new blob (0 for a gitlink)."""
    raw = read_untrusted(scratch / "changed", LIST_MAX_BYTES)
    sizes = read_untrusted(scratch / "sizes", LIST_MAX_BYTES)
    known: dict[str, int] = {}
    for line in sizes.decode("ascii", errors="replace").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            known[parts[0]] = int(parts[1])
    tokens = raw.split(b"\0")
    changed: list[tuple[bytes, int]] = []
    for meta, name in zip(tokens[0::2], tokens[1::2], strict=False):
        fields = meta.decode("ascii", errors="replace").lstrip(":").split()
        if len(fields) < 4 or not name:
            continue
        changed.append((name, max((known.get(sha, 0) for sha in fields[2:4]), default=0)))
    return changed


def display_path(name: bytes) -> str:
    """A file name as the result shows it (file names are bytes, not always UTF-8), by
    `agents.text`'s rule."""
    return text_of(name)


async def _gitlinks(prepared: PreparedWorkspace, timeout: float) -> list[bytes]:
    """The submodules of the starting commit, from the executor's own baseline (no work
    tree)."""
    tree = await _git(
        "--git-dir",
        str(prepared.baseline),
        "ls-tree",
        "-r",
        "-z",
        "--full-tree",
        prepared.start_commit,
        env=_local_env(),
        timeout=timeout,
    )
    return [
        entry.partition(b"\t")[2] for entry in tree.split(b"\0") if entry.startswith(b"160000 ")
    ]


def _write_pathspecs(inputs: Path, gitlinks: list[bytes], updates: bytes = b"") -> None:
    """A step's inputs: `paths`, everything but the submodules; `gitlinks`, the submodules;
    `gitlink-updates`, their checked new entries (`update-index -z --index-info`)."""
    paths = [b":/", *(b":(exclude,literal,top)" + path for path in gitlinks)]
    write_input(inputs / "paths", b"\0".join(paths))
    write_input(inputs / "gitlinks", b"".join(path + b"\0" for path in gitlinks))
    write_input(inputs / "gitlink-updates", updates)


GITLINK_ENTRY = re.compile(rb"^160000 ([0-9a-f]{40}) 0\t(.+)$", re.DOTALL)


def checked_gitlinks(listing: bytes, gitlinks: list[bytes]) -> bytes:
    """From the submodule step's `ls-files -s -z` (untrusted: planted code may have written
    it), the entries that are a gitlink at one of the starting commit's submodule paths, as
    `update-index -z --index-info` input; anything else is ignored."""
    known = set(gitlinks)
    kept: dict[bytes, bytes] = {}
    for entry in listing.split(b"\0"):
        match = GITLINK_ENTRY.match(entry)
        if match and match.group(2) in known:
            kept[match.group(2)] = b"160000 " + match.group(1) + b"\t" + match.group(2) + b"\0"
    return b"".join(kept[path] for path in sorted(kept))


def write_input(path: Path, data: bytes) -> None:
    """A file of the diff sandbox's inputs, readable by its uid whatever the worker's umask."""
    path.write_bytes(data)
    path.chmod(0o644)


async def _in_sandbox(where: DiffSandbox, script: str, timeout: float, what: str) -> None:
    result, over = await run_within_quota(where.sandbox, script, timeout)
    if over is not None:
        raise GitError(f"{what}: the run's disk quota was passed")
    if result.timed_out:
        raise GitError(f"{what} took longer than {timeout:g} s")
    if result.exit_code != 0:
        raise GitError(f"{what} failed (exit {result.exit_code}): {result.output[-2000:]}")


def _script_names(where: DiffSandbox, prepared: PreparedWorkspace, cut: int) -> dict[str, str]:
    return {
        "baseline": shlex.quote(where.baseline),
        "workspace": shlex.quote(where.sandbox.workspace_mount),
        "scratch": shlex.quote(where.scratch),
        "inputs": shlex.quote(where.inputs),
        "start": shlex.quote(prepared.start_commit),
        "cut": str(cut),
    }


async def _submodule_updates(
    prepared: PreparedWorkspace, sandboxes: DiffSandboxes, gitlinks: list[bytes], timeout: float
) -> bytes:
    """The new gitlinks of the starting commit's submodules, checked (see DIFF_SUBMODULES)."""
    if not gitlinks:
        return b""
    async with sandboxes("submodules") as where:
        names = _script_names(where, prepared, 0)
        await asyncio.to_thread(_write_pathspecs, where.inputs_host, gitlinks)
        script = DIFF_PROLOGUE.format(**names) + DIFF_SUBMODULES.format(**names)
        await _in_sandbox(where, script, timeout, "staging the submodules")
        listing = await asyncio.to_thread(
            read_untrusted, where.scratch_host / "gitlinks-staged", LIST_MAX_BYTES
        )
    return checked_gitlinks(listing, gitlinks)


def _preview(path: Path, limit: int) -> str:
    """The diff's head as text by `agents.text`'s rule: git shows a file with a NUL after its
    first 8,000 bytes as text, NUL included; never half a character at the cut."""
    with open(path, "rb") as handle:
        head = handle.read(limit)
    return text_of(head, cut_end=len(head) == limit)


async def collect_diff(
    prepared: PreparedWorkspace,
    sandboxes: DiffSandboxes,
    *,
    max_bytes: int,
    file_max_bytes: int,
    preview_bytes: int = 16 * 1024,
    out: Path | None = None,
    timeout: float = 300.0,
) -> Diff:
    """The workspace against its starting commit: changes, new files (untracked included,
    .gitignore honoured) and deletions, as a binary-safe patch `git apply` takes.

    git runs inside sandboxes `sandboxes` opens (the submodules' step in one of its own); the
    executor only reads the bytes they wrote. The patch is cut at `max_bytes`; a changed file
    larger than `file_max_bytes` is left out of the patch and listed in `omitted_files`.
    """
    # An empty workspace's starting tree is empty: it has no submodules to ask git for.
    gitlinks = [] if prepared.source == "empty" else await _gitlinks(prepared, timeout)
    updates = await _submodule_updates(prepared, sandboxes, gitlinks, timeout)
    async with sandboxes("diff") as where:
        names = _script_names(where, prepared, max_bytes + 1)
        prologue = DIFF_PROLOGUE.format(**names)
        await asyncio.to_thread(_write_pathspecs, where.inputs_host, gitlinks, updates)
        await asyncio.to_thread(write_input, where.inputs_host / "omit", b"")
        # One command stages and takes the patch; only when a file is over the per-file cap
        # is the patch taken again, without it.
        script = prologue + DIFF_STAGE.format(**names) + DIFF_PATCH.format(**names)
        await _in_sandbox(where, script, timeout, "taking the diff")
        changed = await asyncio.to_thread(_read_changed, where.scratch_host)
        over = [(name, size) for name, size in changed if size > file_max_bytes]
        if over:
            await asyncio.to_thread(
                write_input, where.inputs_host / "omit", b"\0".join(name for name, _ in over)
            )
            script = prologue + DIFF_PATCH.format(**names)
            await _in_sandbox(where, script, timeout, "taking the diff without large files")
        status = read_untrusted(where.scratch_host / "patch-status", 16).strip()
        target = out or diff_file(prepared.path)
        sha256, size, truncated = await asyncio.to_thread(
            _copy_untrusted, where.scratch_host / "patch", target, max_bytes
        )
    if status != b"0" and not truncated:
        raise GitError(f"git diff failed (exit {status.decode('ascii', errors='replace')})")
    return Diff(
        path=target,
        sha256=sha256,
        size=size,
        truncated=truncated,
        changed_files=sorted(display_path(name) for name, _ in changed),
        omitted_files=[{"path": display_path(name), "bytes": size} for name, size in sorted(over)],
        preview=_preview(target, preview_bytes),
    )
