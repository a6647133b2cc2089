"""The bubblewrap sandbox on this machine: the contract, plus what only bwrap has to show."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from agents.sandbox.base import Limits, Sandbox, SandboxUnavailable
from agents.sandbox.bwrap import BwrapSandbox
from agents.sandbox.fence import (
    HOST_WORKSPACE_VAR,
    end_orphaned_sandboxes,
    end_workspace_processes,
)
from agents.sandbox.process import ProcessSandbox
from tests.agents.conftest import Listener, pid_alive
from tests.agents.contract import (
    FORK_BOMB,
    MEMORY_HOG,
    SMALL,
    MakeSandbox,
    SandboxContract,
    fetch,
    wait_until,
)

SMALL_PIDS = 48  # the non-root worker's sandbox pids limit

pytestmark = pytest.mark.skipif(
    shutil.which("bwrap") is None,
    reason="bubblewrap is not installed (scripts/install-system-deps.sh installs it)",
)


@pytest.fixture
async def make_sandbox() -> AsyncIterator[MakeSandbox]:
    made: list[Sandbox] = []

    async def make(workspace: Path, limits: Limits, **options: object) -> Sandbox:
        sandbox = BwrapSandbox(workspace, limits, **options)  # type: ignore[arg-type]
        made.append(sandbox)
        await sandbox.start()
        return sandbox

    yield make
    for sandbox in made:
        await sandbox.kill()


class TestBwrapContract(SandboxContract):
    pass


async def test_the_same_fetch_reaches_the_listener_without_the_sandbox(
    tmp_path: Path, host_listener: Listener
) -> None:
    # The control for the network test: the command itself works when nothing isolates it.
    sandbox = ProcessSandbox(tmp_path / "ws")
    await sandbox.start()
    result = await sandbox.run(fetch(host_listener.port))
    assert result.exit_code == 0 and result.output == "ok"
    assert host_listener.accepted == ["127.0.0.1"]


async def test_limits_are_enforced_by_a_cgroup_and_said_so(
    make_sandbox: MakeSandbox, tmp_path: Path
) -> None:
    sandbox = await make_sandbox(tmp_path / "ws", SMALL)
    if not sandbox.enforced["memory"].startswith("cgroup"):
        pytest.skip(f"no writable cgroups here: {sandbox.enforced}")
    assert sandbox.enforced["pids"] == sandbox.enforced["memory"]
    assert sandbox.describe()["limits"]["pids"] == SMALL.pids
    hog = await sandbox.run(MEMORY_HOG, timeout=20)
    assert hog.exit_code == 128 + 9  # SIGKILL from the memory limit
    assert "memory limit was reached" in hog.output


async def test_the_sandbox_runs_as_an_unprivileged_host_uid_when_the_worker_is_root(
    make_sandbox: MakeSandbox, tmp_path: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("the worker is not root: bwrap runs as the worker's own uid")
    sandbox = await make_sandbox(tmp_path / "ws", SMALL, run_as_uid=61000)
    task = asyncio.create_task(sandbox.run("sleep 30"))
    assert await wait_until(lambda: len(sandbox.alive_pids()) >= 3)
    uids = set()
    for pid in sandbox.alive_pids():
        status = Path(f"/proc/{pid}/status").read_text()
        line = next(x for x in status.splitlines() if x.startswith("Uid:"))
        uids.update(int(v) for v in line.split()[1:])
    assert uids == {61000}
    await sandbox.kill()
    await task
    assert os.stat(tmp_path / "ws").st_uid == 61000


async def test_without_cgroups_rlimits_hold_the_limits(
    make_sandbox: MakeSandbox, tmp_path: Path
) -> None:
    # RLIMIT_NPROC counts every task of the uid on the host: a uid no other sandbox runs as,
    # or the runs of a parallel test worker (uid 61000) eat this one's headroom.
    sandbox = await make_sandbox(tmp_path / "ws", SMALL, use_cgroups=False, run_as_uid=61017)
    assert sandbox.enforced["memory"].startswith("rlimit")
    assert sandbox.enforced["cpu"].startswith("rlimit")
    hog = await sandbox.run(MEMORY_HOG, timeout=20)
    assert hog.exit_code != 0 and not hog.timed_out
    if os.geteuid() == 0:  # a uid of its own: the process count holds too
        assert sandbox.enforced["pids"].startswith("rlimit")
        bomb = await sandbox.run(FORK_BOMB, timeout=3)
        assert "fork" in bomb.output.lower()
    assert sandbox.alive_pids() == []


async def test_background_processes_end_with_their_command(
    make_sandbox: MakeSandbox, tmp_path: Path
) -> None:
    sandbox = await make_sandbox(tmp_path / "ws", SMALL)
    result = await sandbox.run("sleep 300 & echo started")
    assert result.output.strip() == "started"
    assert await wait_until(lambda: sandbox.alive_pids() == [])


def _sandbox_left_starting(workspace: Path) -> int:
    """A bwrap whose outer process died before it told its child to go on, as when the worker
    starting it is killed: the outer waits on a pipe nobody writes (--userns-block-fd) and is
    killed there. Returns the pid of the child it leaves behind (its sandbox's pid 1)."""
    block_r, block_w = os.pipe()
    info_r, info_w = os.pipe()
    outer = subprocess.Popen(
        ["bwrap", "--unshare-user", "--unshare-pid", "--die-with-parent", "--ro-bind", "/", "/"]
        + ["--setenv", HOST_WORKSPACE_VAR, str(workspace.resolve())]
        + ["--info-fd", str(info_w), "--userns-block-fd", str(block_r), "--", "sleep", "300"],
        pass_fds=(block_r, info_w),
    )
    os.close(info_w)
    with os.fdopen(info_r) as info:
        child = json.loads(info.read())["child-pid"]  # written just before it blocks
    outer.send_signal(signal.SIGKILL)
    outer.wait()
    os.close(block_r)
    os.close(block_w)
    [pid] = [int(p) for p in os.listdir("/proc") if p.isdigit() and _ns_pid(int(p)) == child]
    return pid


def _ns_pid(pid: int) -> int | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    line = next((x for x in status.splitlines() if x.startswith("NSpid:")), "")
    ids = line.split()[1:]
    return int(ids[0]) if len(ids) > 1 else None


async def test_a_sandbox_its_worker_died_starting_is_ended_by_the_sweep_and_no_other(
    make_sandbox: MakeSandbox, tmp_path: Path
) -> None:
    root = tmp_path / "workspaces"
    left = _sandbox_left_starting(root / "dead-worker-run")
    time.sleep(0.5)
    assert pid_alive(left)  # nothing else ends it: it waits for ever
    live = await make_sandbox(root / "live-run", SMALL)
    running = asyncio.create_task(live.run("sleep 300"))
    assert await wait_until(lambda: len(live.alive_pids()) >= 4)  # bwrap, its init, sh, sleep
    live_pids = live.alive_pids()
    assert end_orphaned_sandboxes(root) == [left]
    assert not pid_alive(left)
    assert all(pid_alive(pid) for pid in live_pids)  # a running sandbox goes on
    await live.kill()
    await running


async def test_a_new_attempt_ends_the_sandboxes_of_its_workspace_and_no_other(
    make_sandbox: MakeSandbox, tmp_path: Path
) -> None:
    workspace = tmp_path / "runs" / "target"
    earlier = await make_sandbox(workspace, SMALL)
    running = asyncio.create_task(earlier.run("sleep 300 & sleep 301"))
    # Another run's command that names this workspace in its argv, as bwrap's argv does.
    other = await make_sandbox(tmp_path / "runs" / "other", SMALL)
    forged = f"sh -c 'sleep 302; true' --setenv {HOST_WORKSPACE_VAR} {workspace.resolve()}"
    bystander = asyncio.create_task(other.run(forged))
    assert await wait_until(lambda: len(earlier.alive_pids()) >= 4 and len(other.alive_pids()) >= 4)
    earlier_pids, other_pids = earlier.alive_pids(), other.alive_pids()
    ended = await end_workspace_processes(workspace)
    assert set(earlier_pids) <= set(ended)
    assert [pid for pid in earlier_pids if pid_alive(pid)] == []
    assert (await running).exit_code != 0
    assert all(pid_alive(pid) for pid in other_pids)  # the other run goes on
    await other.kill()
    await bystander


async def test_a_missing_bwrap_says_how_to_install_it(tmp_path: Path) -> None:
    sandbox = BwrapSandbox(tmp_path / "ws", bwrap="/nonexistent/bwrap")
    with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap"):
        await sandbox.start()


async def test_a_command_cannot_write_a_file_past_the_size_limit(
    make_sandbox: MakeSandbox, tmp_path: Path
) -> None:
    limits = Limits(memory_bytes=SMALL.memory_bytes, pids=SMALL.pids, file_bytes=1024 * 1024)
    sandbox = await make_sandbox(tmp_path / "ws", limits)
    assert sandbox.enforced["fileSize"].startswith("rlimit")
    fill = await sandbox.run("dd if=/dev/zero of=big bs=64k count=64", timeout=20)
    assert fill.exit_code != 0
    assert "too large" in fill.output.lower() or fill.exit_code == 128 + 25  # SIGXFSZ
    assert (tmp_path / "ws" / "big").stat().st_size <= 1024 * 1024
    # dd, killed by SIGXFSZ, may still be on its way out when the command is reported
    assert await wait_until(lambda: sandbox.alive_pids() == [])


# What a sandboxed command tries against the kernel, and the errno it gets ("ok" when it works).
SYSCALL_PROBE = r"""
import ctypes, errno, json, os, platform
libc = ctypes.CDLL(None, use_errno=True)
numbers = {
    "x86_64": {"keyctl": 250, "add_key": 248, "bpf": 321, "perf_event_open": 298,
               "userfaultfd": 323, "io_uring_setup": 425, "unshare": 272, "setns": 308},
    "aarch64": {"keyctl": 219, "add_key": 217, "bpf": 280, "perf_event_open": 241,
                "userfaultfd": 282, "io_uring_setup": 425, "unshare": 97, "setns": 268},
}[platform.machine()]
def name(result):
    return "ok" if result >= 0 else errno.errorcode[ctypes.get_errno()]
attr = (ctypes.c_char * 128)()
found = {
    "keyctl": name(libc.syscall(numbers["keyctl"], 1, None)),  # join a new session keyring
    "add_key": name(libc.syscall(numbers["add_key"], b"user", b"k", b"v", 1, -3)),
    "bpf": name(libc.syscall(numbers["bpf"], 0, attr, 128)),
    "perf_event_open": name(libc.syscall(numbers["perf_event_open"], attr, 0, -1, -1, 0)),
    "userfaultfd": name(libc.syscall(numbers["userfaultfd"], 0)),
    "io_uring_setup": name(libc.syscall(numbers["io_uring_setup"], 1, attr)),
    "unshare(user)": name(libc.syscall(numbers["unshare"], 0x10000000)),
    "unshare(mount)": name(libc.syscall(numbers["unshare"], 0x00020000)),
    "setns": name(libc.syscall(numbers["setns"], os.open("/proc/self/ns/uts", os.O_RDONLY), 0)),
    "ptrace(traceme)": name(libc.ptrace(0, 0, None, None)),
    "mount": name(libc.mount(b"none", b"/tmp", b"tmpfs", 0, None)),
    "umount2": name(libc.umount2(b"/tmp", 2)),
    "pivot_root": name(libc.syscall(155 if platform.machine() == "x86_64" else 41, b"/", b"/")),
}
print(json.dumps(found))
"""


async def test_kernel_interfaces_docker_denies_are_denied_in_the_sandbox(
    make_sandbox: MakeSandbox, tmp_path: Path
) -> None:
    import json
    import platform

    if platform.machine() not in ("x86_64", "aarch64") or not Path("/usr/bin/python3").exists():
        pytest.skip("the probe knows the system call numbers of x86_64 and aarch64")
    sandbox = await make_sandbox(tmp_path / "ws", SMALL)
    (tmp_path / "ws" / "probe.py").write_text(SYSCALL_PROBE)
    probe = await sandbox.run("/usr/bin/python3 probe.py")
    assert probe.exit_code == 0, probe.output
    found = json.loads(probe.output)
    assert found == dict.fromkeys(found, "EPERM")
    # the tools an agent runs with still work: user namespaces by unshare(1) do not
    new_userns = await sandbox.run("unshare -U true")
    assert new_userns.exit_code != 0
    assert "Operation not permitted" in new_userns.output
    work = await sandbox.run(
        "git init -q r && cd r && echo x > f && git add f && git commit -qm m && "
        "git log --oneline | wc -l && sh -c 'sleep 0.1 & wait' && "
        "/usr/bin/python3 -c 'import threading, subprocess; "
        't = threading.Thread(target=print, args=("thread",)); t.start(); t.join(); '
        'print(subprocess.run(["echo", "child"], capture_output=True, text=True).stdout)\''
    )
    assert work.exit_code == 0, work.output
    assert work.output.split() == ["1", "thread", "child"]
    assert sandbox.enforced["seccomp"].startswith("Docker's default")


async def test_the_toolchain_lists_what_commands_in_the_sandbox_see(
    make_sandbox: MakeSandbox, tmp_path: Path
) -> None:
    from agents.sandbox.toolchain import sandbox_toolchain

    # A toolchain directory an operator mounts with FEDAGENT_SANDBOX_RO_PATHS (reachable by the
    # sandbox's uid: not below pytest's private tmp directory).
    tools = Path(tempfile.mkdtemp(prefix="fedagent-tools-", dir="/var/tmp"))
    try:
        tools.chmod(0o755)
        (tools / "bin").mkdir(mode=0o755)
        script = tools / "bin" / "pytest"
        script.write_text("#!/bin/sh\necho 'pytest 9.9.9'\n")
        script.chmod(0o755)
        plain = await make_sandbox(tmp_path / "plain", SMALL)
        found = {tool.name: tool for tool in await sandbox_toolchain(plain)}
        assert found["git"].path is not None and found["git"].version.startswith("git version")
        assert found["python3"].path is not None
        assert found["python3"].version.startswith("Python 3")
        if shutil.which("pytest", path="/usr/local/bin:/usr/bin:/bin") is None:
            assert found["pytest"].path is None
            assert found["pytest"].describe() == "pytest: not found"
        mounted = await make_sandbox(tmp_path / "mounted", SMALL, ro_paths=(str(tools),))
        found = {tool.name: tool for tool in await sandbox_toolchain(mounted)}
        assert found["pytest"].path == str(script)
        assert found["pytest"].version == "pytest 9.9.9"
    finally:
        shutil.rmtree(tools, ignore_errors=True)


# --- a worker that is not root, with no cgroup it may write (the compose stack's shape) ------

WORKER_UID = 47001  # a uid nothing else on the machine runs as
BACKSTOP_PIDS = 600  # the worker's container pids limit, as compose sets one
NON_ROOT_WORKER = r"""
import asyncio, asyncio.subprocess, concurrent.futures.thread, json, os, subprocess, sys
from pathlib import Path
from agents.sandbox.base import Limits
from agents.sandbox.bwrap import BwrapSandbox
from agents.sandbox.report import limit_gaps
from agents.sandbox.seccomp import filter_program

# Started as root (the interpreter lives below /root, closed to others) and then, with what
# it needs loaded, the worker's own uid for good, as a worker in the compose stack is.
filter_program()
uid = int(sys.argv[4])
os.setgroups([])
os.setgid(uid)
os.setuid(uid)
import ctypes
ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE, as in a process started as this uid

def tasks():
    # what RLIMIT_NPROC counts: every thread whose real uid is ours, on the whole host
    count = 0
    for entry in os.listdir("/proc"):
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields.get("Uid", "-1").split()[0] == str(os.getuid()):
            count += int(fields["Threads"])
    return count

async def main():
    workspace, bomb_command, hog_command = sys.argv[1:4]
    limits = Limits(memory_bytes=96 * 1024 * 1024, pids=48, cpus=1.0, command_timeout=30)
    sandbox = BwrapSandbox(Path(workspace), limits)  # asks for cgroups; none is writable
    await sandbox.start()
    before = tasks()
    bomb = asyncio.create_task(sandbox.run(bomb_command, timeout=4))
    peak, worker_forks_failed = 0, 0
    while not bomb.done():
        peak = max(peak, tasks())
        try:
            subprocess.run(["true"], check=True)  # the worker itself can still start things
        except OSError:
            worker_forks_failed += 1
        await asyncio.sleep(0.05)
    hog = await sandbox.run(hog_command, timeout=20)
    oom = await sandbox.run("cat /proc/self/oom_score_adj")
    after = tasks()
    await sandbox.kill()
    print(json.dumps({
        "enforced": sandbox.enforced,
        "gaps": [gap.as_dict() for gap in limit_gaps(sandbox)],
        "before": before, "peak": peak, "after": after,
        "workerForksFailed": worker_forks_failed,
        "bomb": bomb.result().output[-300:], "hogExit": hog.exit_code,
        "oomScoreAdj": oom.output.strip(),
    }))

asyncio.run(main())
"""


@contextlib.contextmanager
def pids_backstop(limit: int) -> Iterator[Path]:
    """A pids cgroup that holds the test's worker and whatever it starts: were the sandbox's
    own cap missing, the fork bomb stops here instead of on the shared machine."""
    if os.geteuid() != 0:
        pytest.skip("only root can drop to another uid and make the backstop cgroup")
    if Path("/sys/fs/cgroup/pids/cgroup.procs").exists():
        parent = Path("/sys/fs/cgroup/pids")
    elif "pids" in Path("/sys/fs/cgroup/cgroup.subtree_control").read_text():
        parent = Path("/sys/fs/cgroup")
    else:
        pytest.skip("no pids cgroup to hold the test's fork bomb in")
    group = parent / f"fedagent-test-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    (group / "pids.max").write_text(str(limit))
    try:
        yield group
    finally:
        for _ in range(100):
            pids = (group / "cgroup.procs").read_text().split()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            time.sleep(0.02)
        for _ in range(100):
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.02)


def _into(group: Path) -> Callable[[], None]:
    def join() -> None:
        (group / "cgroup.procs").write_text(str(os.getpid()))

    return join


def test_a_worker_that_is_not_root_caps_its_sandboxes_processes_and_memory() -> None:
    with pids_backstop(BACKSTOP_PIDS) as group:
        workspace = Path(tempfile.mkdtemp(prefix="fa-nonroot-"))
        os.chown(workspace, WORKER_UID, WORKER_UID)
        try:
            env = {k: v for k, v in os.environ.items() if not k.startswith("FEDAGENT_")}
            run = subprocess.run(
                [sys.executable, "-c", NON_ROOT_WORKER, str(workspace / "ws"), FORK_BOMB,
                 MEMORY_HOG, str(WORKER_UID)],
                env={**env, "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
                     "HOME": str(workspace)},
                preexec_fn=_into(group), capture_output=True, text=True, timeout=120,
                check=False,
            )  # fmt: skip
        finally:
            shutil.rmtree(workspace, ignore_errors=True)
    assert run.returncode == 0, run.stderr[-2000:]
    found = json.loads(run.stdout.splitlines()[-1])
    # The fork bomb ran into the sandbox's own cap, far below the container's ...
    assert found["enforced"]["pids"].startswith("rlimit"), found["enforced"]
    assert "fork" in found["bomb"].lower(), found
    assert found["peak"] <= found["before"] + SMALL_PIDS + 16, found
    # ... so the worker could start processes all along, and nothing of the bomb is left.
    assert found["workerForksFailed"] == 0, found
    assert found["after"] <= found["before"] + 8, found
    # Memory: each process is held to the limit; the OOM killer takes sandboxes first.
    assert found["hogExit"] != 0
    assert found["oomScoreAdj"] == "1000"
    # What does not hold per run is said, not hidden.
    assert {gap["limit"]: gap["severity"] for gap in found["gaps"]} == {
        "memory": "warning",
        "cpu": "warning",
    }


# --- review: what a command may do to the worker's host process table and disk --------------


async def test_a_command_cannot_undo_being_the_oom_killers_first_choice(
    make_sandbox: MakeSandbox, tmp_path: Path
) -> None:
    """Where only the worker's container bounds memory, many small sandbox processes that set
    their oom_score_adj back to 0 would leave the worker (the largest process) the victim."""
    sandbox = await make_sandbox(tmp_path / "ws", SMALL)
    result = await sandbox.run(
        "echo 0 > /proc/self/oom_score_adj; sh -c 'cat /proc/self/oom_score_adj'"
    )
    assert result.output.strip().splitlines()[-1] == "1000", result.output


async def test_a_deep_tree_in_the_sandboxs_tmp_neither_fails_its_kill_nor_the_next_attempt(
    make_sandbox: MakeSandbox, tmp_path: Path
) -> None:
    """Python 3.11's shutil.rmtree recurses per level: 1500 levels in /tmp made the sandbox's
    kill raise RecursionError, and every later attempt's fence too (the run lost)."""
    from agents.runtime import RuntimeConfig, fence_workspace

    workspace = tmp_path / "ws"
    sandbox = await make_sandbox(workspace, SMALL)
    deep = await sandbox.run(
        "cd /tmp && i=0; while [ $i -lt 1500 ]; do mkdir a && cd a || break; i=$((i+1)); done;"
        " chmod 500 /tmp/a/a; echo $i"
    )
    assert deep.output.strip() == "1500", deep.output
    await sandbox.kill()
    await fence_workspace(RuntimeConfig(), workspace)
    assert not sandbox.tmp_dir.exists()
    assert not (tmp_path / ".ws.tmp").exists()


async def test_a_sandbox_of_an_earlier_attempt_starts_no_command_once_a_new_one_claimed(
    tmp_path: Path,
) -> None:
    """The fence's window: an earlier attempt past its last checkpoint save starts a command
    after the new attempt's scan. Once the workspace is claimed anew, it cannot."""
    from agents.sandbox.fence import claim_workspace, end_workspace_processes

    if not shutil.which("bwrap"):
        pytest.skip("needs bubblewrap")
    workspace = tmp_path / "runs" / "claimed"
    old = BwrapSandbox(workspace, Limits(command_timeout=30), generation=None)
    old.generation = await claim_workspace(workspace)
    await old.start()
    try:
        assert (await old.run("echo before > before.txt")).exit_code == 0
        await claim_workspace(workspace)  # the new attempt claims, then scans
        assert await end_workspace_processes(workspace) == []
        late = await old.run("echo late > late.txt")
        assert late.killed and late.exit_code != 0
        assert "newer attempt" in late.output
        assert (workspace / "before.txt").exists()
        assert not (workspace / "late.txt").exists()
    finally:
        await old.kill()


async def test_a_sandbox_of_a_superseded_attempt_does_not_start_though_bwrap_is_proven(
    tmp_path: Path,
) -> None:
    """After one sandbox of this process showed bwrap works, later ones start without a probe
    command; a sandbox whose attempt a newer one has claimed still refuses to start."""
    from agents.sandbox.fence import Superseded, claim_workspace

    workspace = tmp_path / "runs" / "claimed-before-start"
    first = BwrapSandbox(workspace, Limits(command_timeout=30))
    first.generation = await claim_workspace(workspace)
    await first.start()  # proves bwrap with these settings (or they were proven before)
    await first.kill()
    await claim_workspace(workspace)  # a newer attempt
    late = BwrapSandbox(workspace, Limits(command_timeout=30), generation=first.generation)
    with pytest.raises(Superseded):
        await late.start()
    assert (await late.run("echo late > late.txt")).killed
    assert not (workspace / "late.txt").exists()


async def test_a_bwrap_that_cannot_start_is_refused_at_start_after_another_could(
    tmp_path: Path,
) -> None:
    """The probe is skipped only for the settings it proved: another bwrap that fails (as one
    does where user namespaces are blocked) is found at start, with a clear reason."""
    proven = BwrapSandbox(tmp_path / "ok", Limits(command_timeout=30))
    await proven.start()
    await proven.kill()
    with tempfile.TemporaryDirectory() as where:  # a path the sandbox's uid can run
        os.chmod(where, 0o755)
        broken = Path(where) / "bwrap"
        broken.write_text(
            "#!/bin/sh\necho 'bwrap: No permissions to create new namespace'\nexit 9\n"
        )
        broken.chmod(0o755)
        sandbox = BwrapSandbox(tmp_path / "ws", Limits(command_timeout=30), bwrap=str(broken))
        with pytest.raises(SandboxUnavailable, match="user namespaces"):
            await sandbox.start()
