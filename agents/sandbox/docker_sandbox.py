"""The docker sandbox: one container per run through the `docker` SDK.

The container has no network (`network_mode="none"`), memory (without swap), pids and CPU
limits, a read-only root filesystem, a private /tmp, no capabilities and no-new-privileges, and
runs as an unprivileged uid that owns the workspace, which is bind-mounted at /workspace (and
the run's /tmp, a host directory next to it); a reviewer's workspace is mounted read-only.
Commands are `docker exec`s in it. A command's timeout kills every process in the container at
once (docker kill, then start again); kill removes the container.

A container outlives a worker that dies without cleaning up (kill -9, OOM, a lost host), so
each says who owns it: labels name the instance, the host (its name) and the worker process
(boot id, pid and start time, which a restarted worker with the same pid does not share). A
worker removes, when it starts and every reconcile interval, the containers of its instance
that a dead worker of its own host left (`sweep_orphans`); a container of another host is
left to that host's workers. And a new sandbox over a workspace first removes any container
still on it (an earlier attempt of the run, wherever its worker is), so a retry never leaves
two containers writing one workspace.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from pathlib import Path
from typing import Any

import docker
import docker.errors
import docker.utils
import docker.utils.socket
from docker.models.containers import Container

from agents.sandbox.base import BoundedBuffer, CommandResult, Limits, Sandbox, SandboxUnavailable
from agents.sandbox.bwrap import DEFAULT_RUN_AS, PATH, _chown_tree, _live
from agents.sandbox.fence import Superseded, holding, make_scratch, remove_scratch, scratch_dir

API_TIMEOUT = 60  # seconds for one Docker API call (not for a command's output stream)
LABEL = "fedagent"  # label prefix: fedagent.instance, .host, .worker, .workspace, .sandbox


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[19]
    except (OSError, IndexError):
        return None


def worker_identity(pid: int | None = None) -> str:
    """This worker process, unmistakably on this host: boot id, pid, start time."""
    pid = os.getpid() if pid is None else pid
    return f"{_boot_id()}:{pid}:{_start_time(pid)}"


def worker_alive(identity: str) -> bool:
    """Whether the worker process `identity` names still runs (on this host)."""
    boot, _, rest = identity.partition(":")
    pid, _, started = rest.partition(":")
    if boot != _boot_id() or not pid.isdigit():
        return False
    return _live(int(pid)) and _start_time(int(pid)) == started


def connect(docker_host: str | None) -> docker.DockerClient:
    if docker_host:
        return docker.DockerClient(base_url=docker_host, timeout=API_TIMEOUT)
    return docker.from_env(timeout=API_TIMEOUT)


def _remove(containers: list[Container]) -> list[str]:
    removed = []
    for container in containers:
        with contextlib.suppress(docker.errors.NotFound):
            container.remove(force=True)
            removed.append(container.name)
    return removed


def remove_workspace_containers(
    client: docker.DockerClient, instance: str, workspace: Path
) -> list[str]:
    """Remove every sandbox container of this instance over this workspace (an earlier
    attempt's); returns their names."""
    labels = [f"{LABEL}.instance={instance}", f"{LABEL}.workspace={workspace.resolve()}"]
    return _remove(client.containers.list(all=True, filters={"label": labels}))


def sweep_orphans(client: docker.DockerClient, instance: str) -> list[str]:
    """Remove the sandbox containers of this instance that a worker of this host left when
    it died; returns their names. Containers of live workers and of other hosts stay."""
    labels = [f"{LABEL}.instance={instance}", f"{LABEL}.host={socket.gethostname()}"]
    found = client.containers.list(all=True, filters={"label": labels})
    return _remove([c for c in found if not worker_alive(c.labels.get(f"{LABEL}.worker", ""))])


class DockerSandbox(Sandbox):
    kind = "docker"

    def __init__(
        self,
        workspace: Path,
        limits: Limits | None = None,
        *,
        image: str,
        docker_host: str | None = None,
        run_as_uid: int = DEFAULT_RUN_AS,
        read_only: bool = False,
        ro_binds: tuple[tuple[str, str], ...] = (),
        chown_workspace: bool = True,
        instance: str = "",
        generation: str | None = None,
        tmp_dir: Path | None = None,
    ) -> None:
        """`ro_binds` are (host path, path inside) pairs mounted read-only; without
        `chown_workspace` the workspace is not walked to hand it to the sandbox's uid;
        `instance` is the name of the instance whose run this is, for the sweep."""
        super().__init__(workspace, limits, read_only=read_only)
        self.ro_binds = ro_binds
        self.chown_workspace = chown_workspace
        self.generation = generation  # the attempt's claim on the workspace (fence)
        self.image = image
        self.docker_host = docker_host
        self.instance = instance
        self.name = f"fedagent-{uuid.uuid4().hex[:12]}"
        # its own /tmp, next to the workspace (`agents.sandbox.fence`)
        self.tmp_dir = tmp_dir or scratch_dir(workspace) / self.name
        if os.geteuid() == 0:
            self._user = (run_as_uid, run_as_uid)
            self.file_owner = self._user
        else:
            self._user = (os.getuid(), os.getgid())
        self._client: docker.DockerClient | None = None
        self._stream: docker.APIClient | None = None
        self._container: Container | None = None
        self._seen: set[int] = set()
        self._base: set[int] = set()  # the container's init and its sleep
        self._killed = False

    def _connect(self) -> None:
        try:
            self._client = connect(self.docker_host)
            self._client.ping()
        except docker.errors.DockerException as exc:
            raise SandboxUnavailable(
                f"cannot reach the Docker daemon at {self.docker_host or 'DOCKER_HOST'}: {exc}. "
                "Start dockerd (apt-get install docker.io), set FEDAGENT_DOCKER_HOST, or choose "
                "FEDAGENT_SANDBOX=bwrap"
            ) from exc
        # Output of a long quiet command must not hit a read timeout: its own client, no timeout.
        if self.docker_host:
            self._stream = docker.APIClient(base_url=self.docker_host, timeout=None)
        else:
            self._stream = docker.APIClient(timeout=None, **docker.utils.kwargs_from_env())

    def _create(self) -> None:
        assert self._client is not None
        client = self._client
        self._ensure_image(client)
        workspace = str(self.workspace.resolve())
        self._container = client.containers.run(
            self.image,
            ["sleep", "2147483647"],
            name=self.name,
            detach=True,
            init=True,  # reaps what commands leave behind
            network_mode="none",
            user=f"{self._user[0]}:{self._user[1]}",
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            read_only=True,
            volumes={
                workspace: {"bind": self.workspace_mount, "mode": "ro" if self.read_only else "rw"},
                str(self.tmp_dir.resolve()): {"bind": "/tmp", "mode": "rw"},
                **{host: {"bind": inside, "mode": "ro"} for host, inside in self.ro_binds},
            },
            working_dir=self.workspace_mount,
            environment=self._environment(),
            labels={
                f"{LABEL}.instance": self.instance,
                f"{LABEL}.host": socket.gethostname(),
                f"{LABEL}.worker": worker_identity(),
                f"{LABEL}.workspace": workspace,
                f"{LABEL}.sandbox": self.name,
            },
            **self._limit_options(),
        )
        self._record_enforced()

    def _ensure_image(self, client: Any) -> None:
        try:
            client.images.get(self.image)
        except docker.errors.ImageNotFound:
            try:
                client.images.pull(self.image)
            except docker.errors.DockerException as exc:
                raise SandboxUnavailable(
                    f"the sandbox image {self.image!r} is not on the Docker host and could not "
                    f"be pulled ({exc}); pull or build it there, or set FEDAGENT_DOCKER_IMAGE"
                ) from exc

    def _limit_options(self) -> dict[str, Any]:
        """The container's cgroup limits, as docker's run() takes them."""
        limits = self.limits
        options: dict[str, Any] = {}
        if limits.memory_bytes:
            options["mem_limit"] = limits.memory_bytes
            options["memswap_limit"] = limits.memory_bytes  # no swap on top
        if limits.pids:
            options["pids_limit"] = limits.pids
        if limits.cpus:
            options["nano_cpus"] = int(limits.cpus * 1e9)
        return options

    def _record_enforced(self) -> None:
        """What the container enforces, for the run's report."""
        limits = self.limits
        self.enforced = {}
        if limits.memory_bytes:
            self.enforced["memory"] = "docker (cgroup, no swap)"
        if limits.pids:
            self.enforced["pids"] = "docker (cgroup)"
        if limits.cpus:
            self.enforced["cpu"] = "docker (cgroup)"
        self.enforced["network"] = "none (network_mode=none)"
        self.enforced["seccomp"] = "Docker's default profile"
        if self.read_only:
            self.enforced["workspace"] = "read-only"
        self.enforced["commandTimeout"] = "killed after the timeout"

    def _environment(self) -> dict[str, str]:
        return {
            "PATH": PATH,
            "HOME": "/tmp",
            "TMPDIR": "/tmp",
            "LANG": "C.UTF-8",
            "GIT_AUTHOR_NAME": "fedagent agent",
            "GIT_AUTHOR_EMAIL": "agent@fedagent.invalid",
            "GIT_COMMITTER_NAME": "fedagent agent",
            "GIT_COMMITTER_EMAIL": "agent@fedagent.invalid",
        }

    def _start_container(self) -> None:
        assert self._client is not None
        # An earlier attempt's container may still run on this workspace: one at a time.
        remove_workspace_containers(self._client, self.instance, self.workspace)
        self._create()
        self._base = self._top()

    def scratch_dirs(self) -> list[Path]:
        return [self.tmp_dir]

    async def start(self) -> None:
        self.workspace.mkdir(parents=True, exist_ok=True)
        make_scratch(self.tmp_dir)
        if self.file_owner is not None:
            if self.chown_workspace:
                await asyncio.to_thread(_chown_tree, self.workspace, self.file_owner)
            os.chown(self.tmp_dir, *self.file_owner)
        await asyncio.to_thread(self._connect)
        try:
            # The container is created while the attempt holds the workspace (a newer
            # attempt's fence then finds it by label), or not at all (Superseded).
            async with holding(self.workspace, self.generation):
                await asyncio.to_thread(self._start_container)
        except Superseded:
            await self.kill()
            raise
        except docker.errors.DockerException as exc:
            await self.kill()
            raise SandboxUnavailable(f"the sandbox container did not start: {exc}") from exc

    # --- commands -------------------------------------------------------------------------

    def _exec(self, command: str) -> tuple[int, str]:
        assert self._stream is not None and self._container is not None
        buffer = BoundedBuffer()
        try:
            exec_id = self._stream.exec_create(
                self._container.id,
                ["/bin/sh", "-c", command],
                workdir=self.workspace_mount,
                user=f"{self._user[0]}:{self._user[1]}",
            )["Id"]
            sock = self._stream.exec_start(exec_id, socket=True)
            # a SocketIO over the HTTP connection: closing it leaves the socket itself open
            raw = getattr(sock, "_sock", None)
            try:
                for _, chunk in docker.utils.socket.frames_iter(sock, tty=False):
                    buffer.feed(chunk)
            finally:
                sock.close()
                if raw is not None:
                    raw.close()
            code = self._stream.exec_inspect(exec_id).get("ExitCode")
        except docker.errors.DockerException as exc:
            if self._killed:
                return -9, buffer.text()
            return 126, buffer.text() + f"\n[docker: {exc}]\n"
        except OSError:  # the stream broke: the container went away under it
            return -9, buffer.text()
        return (code if isinstance(code, int) else -9), buffer.text()

    def _top(self) -> set[int]:
        """Host pids of the container's processes (empty when it is not running)."""
        if self._container is None or self._client is None:
            return set()
        try:
            top = self._client.api.top(self._container.id)
        except docker.errors.DockerException:
            return set()
        column = top["Titles"].index("PID")
        return {int(row[column]) for row in top.get("Processes") or []}

    def _restart(self) -> None:
        """Kill every process of the container at once (docker kill: the whole cgroup) and
        start it again; the workspace and /tmp are host directories and stay as they were."""
        assert self._container is not None
        with contextlib.suppress(docker.errors.DockerException):
            self._container.kill()
        with contextlib.suppress(docker.errors.DockerException):
            self._container.wait(timeout=30)
        if not self._killed:
            self._container.start()
            self._base = self._top()

    def _end_command(self) -> None:
        """What a command left running in the background ends with it, as in bwrap."""
        if self._top() - self._base:
            self._restart()

    async def run(self, command: str, *, timeout: float | None = None) -> CommandResult:
        if self._killed or self._container is None:
            return CommandResult(command, -9, "", killed=True)
        future = asyncio.ensure_future(asyncio.to_thread(self._exec, command))
        timed_out = False
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout or self.limits.command_timeout)
        except TimeoutError:
            timed_out = True
            await asyncio.to_thread(self._restart)
        except asyncio.CancelledError:
            await asyncio.to_thread(self._restart)
            raise
        code, output = await future
        if not timed_out and not self._killed:
            await asyncio.to_thread(self._end_command)
        return CommandResult(command, code, output, timed_out, self._killed)

    async def kill(self) -> None:
        self._killed = True
        self.alive_pids()  # remember the processes, to check they are gone
        if self._container is not None:
            container, self._container = self._container, None
            with contextlib.suppress(docker.errors.NotFound):
                await asyncio.to_thread(container.remove, force=True)
        for _ in range(200):
            if not [pid for pid in self._seen if _live(pid)]:
                break
            await asyncio.sleep(0.005)
        for client in (self._client, self._stream):
            if client is not None:
                with contextlib.suppress(Exception):
                    client.close()
        await asyncio.to_thread(remove_scratch, self.tmp_dir)

    def alive_pids(self) -> list[int]:
        self._seen.update(self._top())
        return sorted(pid for pid in self._seen if _live(pid))
