"""What an agent writes is never interpreted by a host process: every vector a git expert would
plant in the workspace, under a submodule of the starting commit, leaves nothing outside the
sandbox when the executor takes the run's diff, and the diff is still right.

Each planted command touches a marker at a host path the sandbox does not mount, so a marker
that exists was written by a process outside the sandbox.
"""

from __future__ import annotations

import base64
import functools
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from agents.runtime import RuntimeConfig, diff_sandbox, run_agent_task
from agents.sandbox.base import Limits
from agents.workspace import PreparedWorkspace, collect_diff
from tests.agents.conftest import GITLINK, git

pytestmark = pytest.mark.skipif(not shutil.which("bwrap"), reason="needs bubblewrap")

LIMITS = Limits(memory_bytes=512 * 1024 * 1024, pids=128, cpus=1.0, command_timeout=30)


def planted_config(mark: Path) -> str:
    """git config that runs `touch <mark>` through every key that can run a command."""
    run = f"sh -c 'touch {mark}; cat'"
    return (
        f'[filter "x"]\n\tclean = {run}\n\tsmudge = {run}\n\tprocess = touch {mark}\n'
        f'[diff "x"]\n\ttextconv = touch {mark}; cat\n\tcommand = touch {mark}\n'
        f"[core]\n\tfsmonitor = touch {mark}; false\n\tpager = touch {mark}; cat\n"
        f"\tsshCommand = touch {mark}\n\thooksPath = hooks\n"
    )


def in_submodule(gitdir: str, mark: Path, *, link: str = "dir") -> str:
    """Agent commands: a repository at the gitlink's path whose git dir is `gitdir` (relative
    to the workspace), reached by a `.git` directory, a `.git` file or a `.git` symlink, with
    every command-running key set, a staged file whose stat no longer matches the index."""
    config = planted_config(mark).replace("\n", "\\n").replace("'", "'\\''")
    hook, script = "post-index-change", f"#!/bin/sh\\ntouch {mark}\\n"
    lines = [
        f"$ mkdir -p {GITLINK} {gitdir}",
        f"$ git init -q --separate-git-dir /workspace/{gitdir} {GITLINK}",
        f"$ cd {GITLINK} && echo staged > f && git add f",
        f"$ printf '{config}' >> {gitdir}/config",
        f"$ printf '* filter=x diff=x\\n' > {gitdir}/info/attributes",
        f"$ printf '* filter=x diff=x\\n' > {GITLINK}/.gitattributes",
        f"$ mkdir -p {gitdir}/hooks && cd {gitdir}/hooks && printf '{script}' > {hook}",
        f"$ chmod +x {gitdir}/hooks/{hook}",
        f"$ touch -d '2000-01-01' {GITLINK}/f",
    ]
    if link == "dir":
        lines.append(f"$ rm {GITLINK}/.git && mv {gitdir} {GITLINK}/.git")
    elif link == "file":
        lines.append(f"$ printf 'gitdir: ../../{gitdir}\\n' > {GITLINK}/.git")
    else:
        lines.append(f"$ rm {GITLINK}/.git && ln -s ../../{gitdir} {GITLINK}/.git")
    return "\n".join(lines)


def vectors(mark: Path) -> dict[str, str]:
    config = planted_config(mark).replace("\n", "\\n").replace("'", "'\\''")
    evil = "path = ../../../evil.cfg"
    includes = f'[include]\\n\\t{evil}\\n[includeIf "gitdir:**"]\\n\\t{evil}\\n'
    top = "\n".join(
        [
            "$ printf '* filter=x diff=x\\n' > .gitattributes",
            "$ mkdir -p src && printf '* filter=x diff=x\\n' > src/.gitattributes",
            "$ echo code > src/code.py",
        ]
    )
    return {
        "submodule .git directory with filter, fsmonitor, textconv, pager, hooks": in_submodule(
            ".plant/git", mark
        ),
        "submodule .git file pointing elsewhere": in_submodule(".plant/git", mark, link="file"),
        "submodule .git symlink": in_submodule(".plant/git", mark, link="symlink"),
        "submodule config include.path and includeIf": "\n".join(
            [
                f"$ mkdir -p {GITLINK} && git -C {GITLINK} init -q",
                f"$ cd {GITLINK} && echo staged > f && git add f",
                f"$ printf '{config}' > evil.cfg",
                f"$ printf '{includes}' >> {GITLINK}/.git/config",
                f"$ printf '* filter=x\\n' > {GITLINK}/.git/info/attributes",
                f"$ touch -d '2000-01-01' {GITLINK}/f",
            ]
        ),
        "submodule objects/info/alternates": "\n".join(
            [
                f"$ mkdir -p {GITLINK} && git -C {GITLINK} init -q",
                f"$ cd {GITLINK} && echo x > f && git add f",
                f"$ echo /etc > {GITLINK}/.git/objects/info/alternates",
                f"$ printf '{config}' >> {GITLINK}/.git/config",
                f"$ printf '* filter=x\\n' > {GITLINK}/.git/info/attributes",
                f"$ touch -d '2000-01-01' {GITLINK}/f",
            ]
        ),
        "workspace .git config and .gitattributes at the top and in a subdirectory": "\n".join(
            [f"$ printf '{config}' >> .git/config", top]
        ),
    }


@pytest.mark.parametrize(
    "vector",
    [
        "submodule .git directory with filter, fsmonitor, textconv, pager, hooks",
        "submodule .git file pointing elsewhere",
        "submodule .git symlink",
        "submodule config include.path and includeIf",
        "submodule objects/info/alternates",
        "workspace .git config and .gitattributes at the top and in a subdirectory",
    ],
)
async def test_nothing_an_agent_plants_runs_outside_the_sandbox_when_the_diff_is_taken(
    vector: str, repo_with_submodule: Path, tmp_path: Path
) -> None:
    marks = tmp_path / "outside"
    marks.mkdir()
    mark = marks / "ran-on-the-host"
    report = await run_agent_task(
        workspace=tmp_path / "runs" / "planted",
        agent_type="worker",
        context={
            "repository": str(repo_with_submodule),
            "instructions": vectors(mark)[vector] + "\n$ echo changed >> app.py",
        },
        config=RuntimeConfig(
            sandbox="bwrap", limits=LIMITS, repo_roots=(repo_with_submodule.parent,)
        ),
    )
    assert report.success, report.log_tail
    assert not mark.exists(), f"{vector}: a planted command ran on the host"
    assert list(marks.iterdir()) == []
    assert "diffError" not in report.workspace, report.workspace["diffError"]
    assert "app.py" in report.changed_files
    assert "+changed" in report.diff


async def test_what_runs_while_the_diff_is_taken_cannot_change_the_baseline_or_the_workspace(
    repo_with_submodule: Path, tmp_path: Path
) -> None:
    """The baseline is the executor's own repository (a later try resumes from it): a planted
    filter that runs in the diff's sandbox finds it, and the workspace, read-only."""
    workspace = tmp_path / "runs" / "writer"
    write = (
        "echo [core] >> /fedagent/baseline/config; echo planted > /workspace/planted; "
        "echo planted > /fedagent/baseline/planted; cat"
    )
    instructions = "\n".join(
        [
            f"$ mkdir -p {GITLINK} && cd {GITLINK} && git init -q && echo x > f && git add f",
            f"$ git -C {GITLINK} config filter.x.clean \"sh -c '{write}'\"",
            f"$ echo '* filter=x' > {GITLINK}/.git/info/attributes",
            f"$ touch -d 2000-01-01 {GITLINK}/f",
            "$ echo changed >> app.py",
        ]
    )
    report = await run_agent_task(
        workspace=workspace,
        agent_type="worker",
        context={"repository": str(repo_with_submodule), "instructions": instructions},
        config=RuntimeConfig(
            sandbox="bwrap", limits=LIMITS, repo_roots=(repo_with_submodule.parent,)
        ),
    )
    assert report.success, report.log_tail
    baseline = workspace.parent / f".{workspace.name}.baseline.git"
    config = (baseline / "config").read_text()
    assert not (baseline / "planted").exists()
    assert not (workspace / "planted").exists()
    assert report.changed_files == ["app.py"]
    # A worker that is not root runs its sandboxes as its own uid, the baseline's owner: the
    # read-only mounts alone must hold.
    for path in [baseline, *baseline.rglob("*")]:
        os.chown(path, 61000, 61000, follow_symlinks=False)
    prepared = PreparedWorkspace(workspace, baseline, report.workspace["startCommit"], "resumed")
    config_used = RuntimeConfig(sandbox="bwrap", limits=LIMITS)
    again = await collect_diff(
        prepared,
        functools.partial(diff_sandbox, config_used, prepared),
        max_bytes=1 << 20,
        file_max_bytes=1 << 20,
    )
    assert again.changed_files == ["app.py"]
    assert (baseline / "config").read_text() == config
    assert not (baseline / "planted").exists()
    assert not (workspace / "planted").exists()


def test_the_executor_reads_only_regular_files_from_the_diff_sandbox(tmp_path: Path) -> None:
    """What the diff's sandbox wrote is read without following a symlink or waiting on a FIFO
    (a planted one would otherwise hang the executor or show it another file)."""
    import threading

    from agents.workspace import GitError, read_untrusted

    secret = tmp_path / "secret"
    secret.write_text("master key")
    (tmp_path / "link").symlink_to(secret)
    with pytest.raises(OSError):
        read_untrusted(tmp_path / "link", 1024)
    os.mkfifo(tmp_path / "fifo")
    outcome: list[BaseException | bytes] = []

    def read() -> None:
        try:
            outcome.append(read_untrusted(tmp_path / "fifo", 1024))
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            outcome.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(10)
    if reader.is_alive():  # blocked on the FIFO: let it go before failing
        with open(tmp_path / "fifo", "wb"):
            pass
        reader.join(5)
        pytest.fail("reading a FIFO the sandbox planted blocked the executor")
    assert isinstance(outcome[0], GitError)


def _write_in_workspace(path: str, content: str) -> str:
    """An agent command that writes `content` to `path` (no shell quoting to get wrong)."""
    return f"$ echo {base64.b64encode(content.encode()).decode()} | base64 -d > {path}"


# Run by a clean filter planted in a submodule, inside the diff's sandbox: a loose object in
# the diff's scratch object directory under the id of app.py's starting blob, which git looks
# up before the baseline's own copy.
SHADOW_START = """import os, subprocess, zlib
env = {"GIT_DIR": "/fedagent/baseline", "PATH": "/usr/bin:/bin"}
oid = subprocess.run(["git", "-c", "safe.directory=*", "rev-parse", "refs/fedagent/start:app.py"],
                     env=env, capture_output=True, text=True).stdout.strip()
data = b"FORGED STARTING LINE\\n"
os.makedirs("/tmp/git/objects/" + oid[:2], exist_ok=True)
with open("/tmp/git/objects/" + oid[:2] + "/" + oid[2:], "wb") as out:
    out.write(zlib.compress(b"blob %d\\0" % len(data) + data))
"""


async def test_code_planted_in_a_submodule_cannot_rewrite_the_starting_state_the_diff_shows(
    repo_with_submodule: Path, tmp_path: Path
) -> None:
    """The diff is what the requester applies: whatever the agent plants, it applies to the
    real starting commit and shows that commit's lines as they are."""
    forge = f"{GITLINK}/.git/forge.py"
    instructions = "\n".join(
        [
            f"$ mkdir -p {GITLINK} && cd {GITLINK} && git init -q && echo x > f && git add f",
            _write_in_workspace(forge, SHADOW_START),
            f"$ git -C {GITLINK} config filter.x.clean "
            f"\"sh -c 'python3 /workspace/{forge} >/dev/null 2>&1; cat'\"",
            f"$ echo '* filter=x' > {GITLINK}/.git/info/attributes",
            f"$ touch -d 2000-01-01 {GITLINK}/f",
            "$ echo changed >> app.py",
        ]
    )
    report = await run_agent_task(
        workspace=tmp_path / "runs" / "forger",
        agent_type="worker",
        context={"repository": str(repo_with_submodule), "instructions": instructions},
        config=RuntimeConfig(
            sandbox="bwrap", limits=LIMITS, repo_roots=(repo_with_submodule.parent,)
        ),
    )
    assert report.success, report.log_tail
    assert report.changed_files == ["app.py"]
    assert "FORGED" not in report.diff
    checkout = tmp_path / "checkout"
    git("clone", "-q", str(repo_with_submodule), str(checkout), cwd=tmp_path)
    applied = subprocess.run(
        ["git", "apply", "--check", "-"],
        cwd=checkout,
        input=report.diff.encode(),
        capture_output=True,
    )
    assert applied.returncode == 0, applied.stderr.decode()


async def test_a_worker_with_a_private_umask_still_gets_the_diff(
    repo_with_submodule: Path, tmp_path: Path
) -> None:
    """A root worker started with umask 077 (a hardened service) makes the baseline and the
    diff's inputs; the sandbox's uid must still be able to read them."""
    if os.geteuid() != 0:
        pytest.skip("the sandbox runs as the worker's own uid when the worker is not root")
    old = os.umask(0o077)
    try:
        report = await run_agent_task(
            workspace=tmp_path / "runs" / "private",
            agent_type="worker",
            context={"repository": str(repo_with_submodule), "instructions": "$ echo x >> app.py"},
            config=RuntimeConfig(
                sandbox="bwrap", limits=LIMITS, repo_roots=(repo_with_submodule.parent,)
            ),
        )
    finally:
        os.umask(old)
    assert report.success, report.log_tail
    assert "diffError" not in report.workspace, report.workspace["diffError"]
    assert report.changed_files == ["app.py"]


DEEP_TREE = """import os
for _ in range(1500):
    os.mkdir("d")
    os.chdir("d")
open("f", "w").write("deep")
"""


async def test_a_very_deep_directory_tree_does_not_cost_the_run_its_diff(
    repo_with_submodule: Path, tmp_path: Path
) -> None:
    """Taking the diff walks nothing the agent wrote on the executor's side (no chown of the
    workspace, no path-based walk that a deep tree or a swapped symlink could derail)."""
    workspace = tmp_path / "runs" / "deep"
    instructions = "\n".join(
        [
            _write_in_workspace("deep.py", DEEP_TREE),
            "$ python3 deep.py && rm deep.py",
            "$ echo changed >> app.py",
        ]
    )
    try:
        report = await run_agent_task(
            workspace=workspace,
            agent_type="worker",
            context={"repository": str(repo_with_submodule), "instructions": instructions},
            config=RuntimeConfig(
                sandbox="bwrap", limits=LIMITS, repo_roots=(repo_with_submodule.parent,)
            ),
        )
        assert report.success, report.log_tail
        assert "diffError" not in report.workspace, report.workspace["diffError"]
        assert "app.py" in report.changed_files
        assert "+changed" in report.diff
    finally:  # pytest's own clean-up of tmp_path recurses once per level
        subprocess.run(["rm", "-rf", str(workspace / "d")], check=False)


def test_only_well_formed_gitlinks_at_known_submodule_paths_leave_the_submodule_step() -> None:
    """The submodule step's listing is written where planted code runs: a blob, an unknown
    path, a conflict stage or a short hash must not reach the index the diff is taken from."""
    from agents.workspace import checked_gitlinks

    sha, other = "a" * 40, "b" * 40
    listing = b"\0".join(
        [
            f"160000 {sha} 0\tvendor/lib".encode(),
            f"100644 {other} 0\tvendor/other".encode(),
            f"160000 {other} 0\tapp.py".encode(),
            f"160000 {other} 1\tvendor/conflict".encode(),
            b"160000 abc 0\tvendor/short",
            f"160000 {other} 0\tvendor/lib\nextra".encode(),
        ]
    )
    known = [b"vendor/lib", b"vendor/other", b"vendor/conflict", b"vendor/short"]
    assert checked_gitlinks(listing, known) == f"160000 {sha}\tvendor/lib\0".encode()
