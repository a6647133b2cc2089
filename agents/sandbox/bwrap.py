"""The default sandbox: each command in a fresh bubblewrap container over the run's workspace.

Every namespace is unshared (user, pid, network, ipc, uts, cgroup; no network at all), the
command runs as an unprivileged uid with every capability dropped and no way to make further
user namespaces, under a seccomp filter that denies what Docker's default profile denies
(`agents.sandbox.seccomp`); system directories and the root are mounted read-only, and only the
workspace (at /workspace; read-only too for a reviewer) and the run's private /tmp (a directory
next to the workspace, kept from one command to the next and removed with the sandbox) are
writable. Nothing else of the host is mounted: not the data directory, not the worker's home,
and `--clearenv` leaves none of the worker's environment (secrets) to the command. When the executor
runs as root, bubblewrap itself is started as a dedicated unprivileged uid (`run_as_uid`,
default 61000) that owns the workspace, so nothing in the sandbox ever holds a privileged uid,
even outside its user namespace.

Limits: memory, pids and CPU through a cgroup per run (v2, or the v1 controllers), falling
back to rlimits for whatever cgroup cannot be written; `enforced` says which apply and how.

Kill: SIGKILL to the pid namespace's init takes every process of the command with it at once;
the cgroup is swept as well. A command's background processes end with it, as the namespace
ends when its first process does. `--die-with-parent` and PR_SET_PDEATHSIG make the sandbox die
with the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import resource
import shutil
import signal
import sys
import uuid
from pathlib import Path
from typing import Any

from agents.sandbox.base import (
    CommandResult,
    Limits,
    Sandbox,
    SandboxUnavailable,
    read_bounded,
)
from agents.sandbox.cgroups import CgroupSet, create_cgroups
from agents.sandbox.fence import (
    HOST_WORKSPACE_VAR,
    Superseded,
    holding,
    make_scratch,
    remove_scratch,
    scratch_dir,
)
from agents.sandbox.seccomp import SeccompUnavailable, filter_program, program_fd

PR_SET_PDEATHSIG = 1
CLONE_NEWNS = 0x00020000
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
SANDBOX_UID = 1000  # the uid commands see inside
DEFAULT_RUN_AS = 61000  # host uid bubblewrap runs as when the executor is root
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
# Where the workspace is bind-mounted, in a mount namespace of the bwrap process only, so the
# unprivileged uid can reach it whatever the permissions of the directories above it.
STAGE_CANDIDATES = ("/mnt", "/media", "/srv")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_libc = ctypes.CDLL(None, use_errno=True)

# (bwrap path, uid it runs as, cgroups) with which a sandbox's probe command ran in this
# process: later sandboxes with the same settings start without one.
_PROVEN: set[tuple[str | None, tuple[int, int] | None, bool]] = set()

BWRAP_MISSING = (
    "bubblewrap (bwrap) is not installed or not at {path!r}: install it with "
    "`apt-get install bubblewrap` (scripts/install-system-deps.sh does it), set "
    "FEDAGENT_BWRAP_PATH, or choose another sandbox with FEDAGENT_SANDBOX=docker"
)
USERNS_BLOCKED = (
    "bubblewrap cannot create its namespaces here ({detail}). Unprivileged user namespaces "
    "must be allowed: `sysctl -w kernel.unprivileged_userns_clone=1` (Debian kernels), "
    "`sysctl -w user.max_user_namespaces=15000`, on Ubuntu 24.04+ "
    "`sysctl -w kernel.apparmor_restrict_unprivileged_userns=0` (or an AppArmor profile for "
    "bwrap); in a container, run it with a seccomp profile that allows unshare/clone. "
    "Or choose FEDAGENT_SANDBOX=docker."
)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


# What the new process does before it becomes bwrap, as a fresh single-threaded Python (no
# `preexec_fn`: Python code run between fork and exec in the multi-threaded worker can wait
# for ever on a lock another thread held at the fork, and the worker's event loop waits with
# it). Order matters: the cgroup and the mounts need the executor's privileges, PDEATHSIG
# comes after the uid change. `stage` is [directory, [[host path, name], ...]]: in a mount
# namespace of this process only, a tmpfs on the directory with each host path bind-mounted at
# directory/name, where the unprivileged uid can reach them whatever the permissions above.
LAUNCHER = """
import ctypes, os, resource, sys
args = sys.argv[1:]
def take(count):
    global args
    taken, args = args[:count], args[count:]
    return taken
libc = ctypes.CDLL(None, use_errno=True)
def check(result, what):
    if result != 0:
        errno = ctypes.get_errno()
        sys.stderr.write(f"bwrap launcher: {what}: {os.strerror(errno)}\\n")
        os._exit(125)
pid = str(os.getpid())
for procs in take(int(take(1)[0])):
    with open(procs, "w") as handle:
        handle.write(pid)
try:
    with open("/proc/self/oom_score_adj", "w") as handle:
        handle.write("1000")
except OSError:
    pass
for _ in range(int(take(1)[0])):
    which, value = map(int, take(2))
    resource.setrlimit(which, (value, value))
directory, count = take(2)
if directory:
    check(libc.unshare(0x00020000), "unshare(CLONE_NEWNS)")
    check(libc.mount(None, b"/", None, 16384 | (1 << 18), None), "make / private")
    check(libc.mount(b"fedagent", directory.encode(), b"tmpfs", 0, b"mode=0755,size=64k"),
          f"tmpfs on {directory}")
    for _ in range(int(count)):
        source, name = take(2)
        target = os.path.join(directory, name)
        os.mkdir(target)
        check(libc.mount(source.encode(), target.encode(), None, 4096, None),
              f"bind {source} on {target}")
uid, gid = take(2)
if uid:
    os.setgroups([])
    os.setgid(int(gid))
    os.setuid(int(uid))
libc.prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGKILL
os.execv(args[0], args)
"""


def _launcher(
    procs_files: list[str],
    rlimits: list[tuple[int, int]],
    stage: tuple[str, list[tuple[str, str]]] | None,
    run_as: tuple[int, int] | None,
) -> list[str]:
    """The argv prefix that sets the new process up (LAUNCHER) before it execs the rest of
    its argv (bwrap). Its setup is given as counted argv items, so that the launcher imports
    no parser (a Python that starts with json costs about half again as much CPU)."""
    setup = [str(len(procs_files)), *procs_files, str(len(rlimits))]
    setup += [str(number) for pair in rlimits for number in pair]
    directory, binds = stage or ("", [])
    setup += [directory, str(len(binds)), *(item for pair in binds for item in pair)]
    setup += [str(run_as[0]), str(run_as[1])] if run_as is not None else ["", ""]
    return [_python(), "-I", "-S", "-c", LAUNCHER, *setup]


def _python() -> str:
    """A Python this process may run (the launcher needs only the standard library): its
    own, or the system's where its own is not reachable by this uid."""
    if os.access(sys.executable, os.X_OK):
        return sys.executable
    return shutil.which("python3") or sys.executable


def _read_info(fd: int) -> dict[str, Any]:
    """bwrap's --info-fd JSON (child-pid, namespaces); {} if it never came."""
    data = b""
    try:
        while not data.rstrip().endswith(b"}"):
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    try:
        info = json.loads(data)
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def _pid_namespace(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/pid").st_ino
    except OSError:
        return None


def _live(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


class _Running:
    """One command's bwrap: the outer process and, once known, its pid namespace init."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.info: dict[str, Any] = {}

    @property
    def init_pid(self) -> int | None:
        pid = self.info.get("child-pid")
        return pid if isinstance(pid, int) else None

    def kill(self) -> None:
        for pid in (self.init_pid, self.proc.pid):
            if pid is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)


class BwrapSandbox(Sandbox):
    kind = "bwrap"

    def __init__(
        self,
        workspace: Path,
        limits: Limits | None = None,
        *,
        bwrap: str = "bwrap",
        run_as_uid: int = DEFAULT_RUN_AS,
        use_cgroups: bool = True,
        ro_paths: tuple[str, ...] = (),
        read_only: bool = False,
        network: bool = False,
        ro_binds: tuple[tuple[str, str], ...] = (),
        environment: dict[str, str] | None = None,
        chown_workspace: bool = True,
        generation: str | None = None,
        tmp_dir: Path | None = None,
        probe: bool = True,
    ) -> None:
        """`network` shares the host's network (only for the clone of the workspace, whose
        address the caller has checked); `ro_binds` are (host path, path inside) pairs mounted
        read-only; `environment` is added to the minimal one commands get. Without
        `chown_workspace` (the diff's sandbox, after the agent's) the executor does not walk
        the workspace to hand it to the sandbox's uid, which already owns what it wrote."""
        super().__init__(workspace, limits, read_only=read_only)
        self.bwrap = bwrap
        self.use_cgroups = use_cgroups
        self.ro_paths = ro_paths
        self.network = network
        self.ro_binds = ro_binds
        self.environment = dict(environment or {})
        self.chown_workspace = chown_workspace
        # The attempt's claim on the workspace (`agents.sandbox.fence`): once a newer attempt
        # has claimed it, this sandbox starts no command.
        self.generation = generation
        # Start with a command that shows bwrap works here (not needed where another sandbox
        # of the same run just showed it).
        self.probe = probe
        # The worker's pid in the name lets a later sandbox remove what a killed worker left.
        self.name = f"sbx-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._run_as: tuple[int, int] | None = None
        if os.geteuid() == 0:
            self._run_as = (run_as_uid, run_as_uid)
            self.file_owner = self._run_as
        # /tmp of the sandbox: its own, on disk next to the workspace (`agents.sandbox.fence`),
        # kept from command to command
        self.tmp_dir = tmp_dir or scratch_dir(workspace) / self.name
        self._bwrap_path: str | None = None
        self._stage: str | None = None
        self._cgroup: CgroupSet | None = None
        self._rlimits: list[tuple[int, int]] = []
        self._nproc_headroom: int | None = None
        self._running: set[_Running] = set()
        self._namespaces: set[int] = set()
        self._killed = False
        self._started = False

    # --- lifecycle ------------------------------------------------------------------------

    def scratch_dirs(self) -> list[Path]:
        return [self.tmp_dir]

    async def start(self) -> None:
        self._bwrap_path = shutil.which(self.bwrap)
        if self._bwrap_path is None:
            raise SandboxUnavailable(BWRAP_MISSING.format(path=self.bwrap))
        try:
            filter_program()
        except SeccompUnavailable as exc:
            raise SandboxUnavailable(str(exc)) from exc
        self.workspace.mkdir(parents=True, exist_ok=True)
        make_scratch(self.tmp_dir)
        if self._run_as is not None:
            if self.chown_workspace:
                await asyncio.to_thread(_chown_tree, self.workspace, self._run_as)
            os.chown(self.tmp_dir, *self._run_as)
            self._stage = _stage_dir()
        self._setup_limits()
        self._started = True
        if not self.probe:
            return
        proven = (self._bwrap_path, self._run_as, self.use_cgroups)
        if proven in _PROVEN:
            # bwrap started in this process with these settings: what a probe would still
            # tell is whether a newer attempt has claimed the workspace, and the fence tells
            # that without starting a process.
            try:
                async with holding(self.workspace, self.generation):
                    return
            except Superseded:
                await self.kill()
                raise
        probe = await self.run("true", timeout=30)
        if probe.killed and not self._killed:
            await self.kill()
            raise Superseded(probe.output.strip())
        if probe.exit_code != 0:
            await self.kill()
            detail = probe.output.strip() or f"exit {probe.exit_code}"
            if "namespace" in detail or "Operation not permitted" in detail:
                raise SandboxUnavailable(USERNS_BLOCKED.format(detail=detail))
            raise SandboxUnavailable(f"bubblewrap does not start here: {detail}")
        _PROVEN.add(proven)

    def _setup_limits(self) -> None:
        limits = self.limits
        if self.use_cgroups:
            self._cgroup = create_cgroups(self.name, limits)
        self.enforced = dict(self._cgroup.enforced) if self._cgroup else {}
        # rlimits for what no cgroup enforces. They count per process (memory, CPU seconds)
        # or per uid (processes), so the latter only where the sandbox has a uid of its own.
        if limits.memory_bytes and "memory" not in self.enforced:
            self._rlimits.append((resource.RLIMIT_AS, limits.memory_bytes))
            self.enforced["memory"] = "rlimit (address space per process)"
        if limits.pids and "pids" not in self.enforced and self._run_as is not None:
            self._rlimits.append((resource.RLIMIT_NPROC, limits.pids))
            self.enforced["pids"] = f"rlimit (processes of uid {self._run_as[0]})"
        elif limits.pids and "pids" not in self.enforced:
            # The sandbox shares the worker's uid: see _command_rlimits.
            self._nproc_headroom = limits.pids
            self.enforced["pids"] = (
                f"rlimit (the worker's uid {os.getuid()}: the processes it has when a command "
                f"starts + {limits.pids})"
            )
        if limits.cpus and "cpu" not in self.enforced:
            seconds = max(1, int(limits.command_timeout * limits.cpus))
            self._rlimits.append((resource.RLIMIT_CPU, seconds))
            self.enforced["cpu"] = f"rlimit ({seconds} CPU seconds per process)"
        if limits.file_bytes:
            self._rlimits.append((resource.RLIMIT_FSIZE, limits.file_bytes))
            self.enforced["fileSize"] = f"rlimit ({limits.file_bytes} bytes per file written)"
        self.enforced["network"] = (
            "the host's (clone only)" if self.network else "none (own network namespace)"
        )
        self.enforced["seccomp"] = "Docker's default denials (mount, unshare, ptrace, bpf, ...)"
        if self.read_only:
            self.enforced["workspace"] = "read-only"
        self.enforced["commandTimeout"] = "killed after the timeout"

    async def kill(self) -> None:
        self._killed = True
        for running in list(self._running):
            running.kill()
        if self._cgroup is not None:
            await asyncio.to_thread(self._cgroup.kill)
        for running in list(self._running):
            with contextlib.suppress(ProcessLookupError):
                await running.proc.wait()
        for _ in range(200):
            if not self.alive_pids():
                break
            await asyncio.sleep(0.005)
        if self._cgroup is not None:
            await asyncio.to_thread(self._cgroup.remove)
            self._cgroup = None
        await asyncio.to_thread(remove_scratch, self.tmp_dir)

    def alive_pids(self) -> list[int]:
        pids = {r.proc.pid for r in self._running if r.proc.returncode is None}
        if self._cgroup is not None:
            pids.update(self._cgroup.pids())
        if self._namespaces:
            for entry in os.listdir("/proc"):
                if entry.isdigit() and _pid_namespace(int(entry)) in self._namespaces:
                    pids.add(int(entry))
        return sorted(pid for pid in pids if _live(pid))

    # --- commands -------------------------------------------------------------------------

    def _argv(self, command: str, info_fd: int, seccomp_fd: int) -> list[str]:
        assert self._bwrap_path is not None
        argv = [self._bwrap_path, *self._isolation_args(), *self._mount_args()]
        for key, value in self._environment().items():
            argv += ["--setenv", key, value]
        argv += ["--seccomp", str(seccomp_fd)]
        argv += ["--info-fd", str(info_fd), "--", "/bin/sh", "-c", command]
        return argv

    def _isolation_args(self) -> list[str]:
        """New namespaces of every kind (the network's unless the run may use it), no
        capabilities, the sandbox's own uid, and no way to nest user namespaces."""
        return [
            "--unshare-user",
            "--unshare-pid",
            *([] if self.network else ["--unshare-net"]),
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--disable-userns",
            "--die-with-parent",
            "--new-session",
            "--cap-drop",
            "ALL",
            "--uid",
            str(SANDBOX_UID),
            "--gid",
            str(SANDBOX_UID),
            "--hostname",
            "sandbox",
        ]

    def _mount_args(self) -> list[str]:
        """The system read-only, the workspace and /tmp writable (the workspace read-only for a
        read-only sandbox), everything else bwrap's read-only tmpfs."""
        argv: list[str] = []
        for directory in SYSTEM_DIRS:
            if os.path.islink(directory):
                argv += ["--symlink", os.readlink(directory), directory]
            elif os.path.isdir(directory):
                argv += ["--ro-bind", directory, directory]
        for path in self.ro_paths:
            argv += ["--ro-bind-try", path, path]
        if self._stage:
            workspace, tmp = f"{self._stage}/workspace", f"{self._stage}/tmp"
            binds = [
                (f"{self._stage}/bind{i}", inside) for i, (_, inside) in enumerate(self.ro_binds)
            ]
        else:
            workspace, tmp = str(self.workspace.resolve()), str(self.tmp_dir.resolve())
            binds = list(self.ro_binds)
        for source, inside in binds:
            argv += ["--ro-bind", source, inside]
        return argv + [
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "--bind",
            tmp,
            "/tmp",
            "--dir",
            "/tmp/home",
            "--ro-bind" if self.read_only else "--bind",
            workspace,
            self.workspace_mount,
            # the root itself (bwrap's tmpfs) read-only too: only /workspace and /tmp take writes
            "--remount-ro",
            "/",
            # /proc too: a command could otherwise set its oom_score_adj back from 1000 to 0
            # (an unprivileged writer sets no floor), and where only the worker's container
            # bounds memory, many small processes would leave the worker the OOM victim
            "--remount-ro",
            "/proc",
            "--chdir",
            self.workspace_mount,
            "--clearenv",
        ]

    def _environment(self) -> dict[str, str]:
        # a toolchain mounted with FEDAGENT_SANDBOX_RO_PATHS is found by name (its bin first)
        tools = [f"{p.rstrip('/')}/bin" for p in self.ro_paths if os.path.isdir(f"{p}/bin")]
        return {
            "PATH": ":".join([*tools, PATH]),
            "HOME": "/tmp/home",
            "TMPDIR": "/tmp",
            "LANG": "C.UTF-8",
            "TERM": "dumb",
            "GIT_AUTHOR_NAME": "fedagent agent",
            "GIT_AUTHOR_EMAIL": "agent@fedagent.invalid",
            "GIT_COMMITTER_NAME": "fedagent agent",
            "GIT_COMMITTER_EMAIL": "agent@fedagent.invalid",
            # Also what lets an operator find this sandbox's processes (in bwrap's argv).
            HOST_WORKSPACE_VAR: str(self.workspace.resolve()),
            **self.environment,
        }

    async def run(self, command: str, *, timeout: float | None = None) -> CommandResult:
        if self._killed:
            return CommandResult(command, -9, "", killed=True)
        if not self._started:
            raise RuntimeError("the sandbox is not started")
        oom_before = self._cgroup.oom_kills() if self._cgroup else 0
        launched = await self._launch(command)
        if isinstance(launched, CommandResult):
            return launched
        proc, info_read = launched
        running = _Running(proc)
        self._running.add(running)
        if self._killed:  # kill() ran while this command was being spawned
            running.kill()
        self._learn_namespace(running, info_read)
        assert proc.stdout is not None
        reader = asyncio.ensure_future(read_bounded(proc.stdout))
        timed_out = await self._wait(running, reader, timeout or self.limits.command_timeout)
        output = reader.result() if reader.done() and not reader.cancelled() else ""
        if self._cgroup is not None and self._cgroup.oom_kills() > oom_before:
            output += "\n[a process was killed: the sandbox's memory limit was reached]\n"
        code = proc.returncode if proc.returncode is not None else -9
        return CommandResult(command, code, output, timed_out, self._killed)

    async def _launch(self, command: str) -> tuple[asyncio.subprocess.Process, int] | CommandResult:
        """Start `command` under bwrap, holding the workspace's fence while it is spawned; the
        process and the pipe bwrap writes its info to, or the result of a superseded run."""
        seccomp_fd = program_fd()
        info_read, info_write = os.pipe()
        stage = None
        if self._stage:
            binds = [(str(self.workspace.resolve()), "workspace"), (str(self.tmp_dir), "tmp")]
            binds += [(host, f"bind{i}") for i, (host, _) in enumerate(self.ro_binds)]
            stage = (self._stage, binds)
        try:
            async with holding(self.workspace, self.generation):
                launcher = _launcher(
                    self._cgroup.procs_files if self._cgroup else [],
                    await asyncio.to_thread(self._command_rlimits),
                    stage,
                    self._run_as,
                )
                proc = await asyncio.create_subprocess_exec(
                    *launcher,
                    *self._argv(command, info_write, seccomp_fd),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.STDOUT,
                    pass_fds=(info_write, seccomp_fd),
                )
        except Superseded as exc:
            os.close(info_read)
            return CommandResult(command, -9, f"[{exc}]\n", killed=True)
        except BaseException:
            os.close(info_read)
            raise
        finally:
            os.close(info_write)
            os.close(seccomp_fd)
        return proc, info_read

    def _learn_namespace(self, running: _Running, info_read: int) -> None:
        """Read bwrap's info in the background: the command's pid namespace, for kill()."""
        info_task = asyncio.ensure_future(asyncio.to_thread(_read_info, info_read))

        def remember(task: asyncio.Future[dict[str, Any]]) -> None:
            if not task.cancelled() and task.exception() is None:
                running.info = task.result()
                namespace = running.info.get("pid-namespace")
                if isinstance(namespace, int):
                    self._namespaces.add(namespace)
                if self._killed:  # killed before we knew the namespace init
                    running.kill()

        info_task.add_done_callback(remember)

    async def _wait(self, running: _Running, reader: asyncio.Future[str], timeout: float) -> bool:
        """Wait for the command to end (True: it timed out); whatever it left running ends
        with it, and its output is read for at most 2 s more."""
        timed_out = False
        try:
            await asyncio.wait_for(running.proc.wait(), timeout)
        except TimeoutError:
            timed_out = True
            await self._kill_command(running)
        except asyncio.CancelledError:
            await self._kill_command(running)
            raise
        finally:
            await self._kill_command(running)  # what the command left running ends with it
            self._running.discard(running)
            namespace = running.info.get("pid-namespace")
            if isinstance(namespace, int):
                self._namespaces.discard(namespace)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(reader), 2.0)
            reader.cancel()
        return timed_out

    def _command_rlimits(self) -> list[tuple[int, int]]:
        """The rlimits of the next command. A worker that is not root runs its sandboxes as
        its own uid, and RLIMIT_NPROC counts every task (thread) of the uid on the host, the
        worker's and other runs' included: the cap is what the uid has now plus the run's
        pids. The sandbox's forks fail there; the worker's own threads and forks are held to
        the worker's rlimit, not this one, so a fork bomb cannot starve the worker, and each
        sandbox adds at most `pids` tasks (bound the total with the worker's container
        pids limit, above max_concurrent_agents x pids)."""
        if self._nproc_headroom is None:
            return self._rlimits
        used = _tasks_of_uid(os.getuid())
        return [*self._rlimits, (resource.RLIMIT_NPROC, used + self._nproc_headroom)]

    async def _kill_command(self, running: _Running) -> None:
        if running.proc.returncode is None or (
            running.init_pid is not None and _live(running.init_pid)
        ):
            running.kill()
        with contextlib.suppress(ProcessLookupError):
            await running.proc.wait()


def _tasks_of_uid(uid: int) -> int:
    """Tasks (threads) whose real uid is `uid`: what RLIMIT_NPROC counts."""
    count = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if int(fields.get("Uid", "-1 ").split()[0]) == uid:
            count += int(fields.get("Threads", "1").strip() or 1)
    return count


def _stage_dir() -> str:
    for candidate in STAGE_CANDIDATES:
        if os.path.isdir(candidate) and not os.path.islink(candidate):
            return candidate
    raise SandboxUnavailable(
        "the bwrap sandbox needs one of " + ", ".join(STAGE_CANDIDATES) + " to exist "
        "(an empty directory where each sandbox's workspace is mounted privately)"
    )


def _chown_tree(root: Path, owner: tuple[int, int]) -> None:
    """Hand a workspace the executor just made to the sandbox's uid (without following any
    symlink; iterative, so no depth of tree can make it raise)."""
    uid, gid = owner
    os.chown(root, uid, gid)
    pending = [str(root)]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                info = entry.stat(follow_symlinks=False)
                if (info.st_uid, info.st_gid) != owner:
                    os.chown(entry.path, uid, gid, follow_symlinks=False)
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
