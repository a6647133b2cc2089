"""The docker sandbox against a real dockerd that this module starts (Debian's docker.io, vfs
storage, no iptables, no bridge, a private socket, data root and exec root), with an image
imported from a busybox-static rootfs. Skipped, saying why, only where dockerd cannot start."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import tarfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import docker
import docker.errors
import pytest

from agents.sandbox.base import Limits, Sandbox
from agents.sandbox.docker_sandbox import DockerSandbox
from federation.settings import Settings
from tests.agents.conftest import GITLINK
from tests.agents.contract import SMALL, MakeSandbox, SandboxContract, wait_until
from tests.dockerd import Daemon, private_dockerd
from worker.sandboxes import sweep_sandboxes

IMAGE = "fedagent-test-busybox:1"
GIT_IMAGE = "fedagent-test-git:1"
GIT = "/usr/bin/git"
BUSYBOX = Path("/bin/busybox")


def _with_git(tar: tarfile.TarFile) -> None:
    """The executor's own git and the libraries it loads, at the same paths (git's helpers
    are found under /usr/lib/git-core)."""
    libraries = subprocess.run(["ldd", GIT], check=True, capture_output=True, text=True).stdout
    paths = {GIT, "/usr/lib/git-core/git"}
    for line in libraries.splitlines():
        for word in line.split():
            if word.startswith("/"):
                paths.add(word)
    parents = {str(parent) for path in paths for parent in Path(path).parents if str(parent) != "/"}
    for directory in sorted(parents - {"/bin"}):
        entry = tarfile.TarInfo(directory.lstrip("/"))
        entry.type, entry.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(entry)
    for path in sorted(paths):
        tar.add(os.path.realpath(path), arcname=path.lstrip("/"))


def _rootfs_tarball(git: bool = False) -> bytes:
    """A root filesystem of busybox-static and its applet links, as `docker import` takes;
    with `git`, the executor's git too."""
    applets = subprocess.run(
        [str(BUSYBOX), "--list"], check=True, capture_output=True, text=True
    ).stdout.split()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, mode in (("bin", 0o755), ("tmp", 0o1777), ("workspace", 0o755), ("etc", 0o755)):
            entry = tarfile.TarInfo(name)
            entry.type, entry.mode = tarfile.DIRTYPE, mode
            tar.addfile(entry)
        tar.add(str(BUSYBOX), arcname="bin/busybox")
        for applet in applets:
            if applet != "busybox":
                link = tarfile.TarInfo(f"bin/{applet}")
                link.type, link.linkname = tarfile.SYMTYPE, "busybox"
                tar.addfile(link)
        if git:
            _with_git(tar)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def dockerd() -> Iterator[Daemon]:
    if not BUSYBOX.exists():
        pytest.skip("busybox-static is not installed (apt-get install busybox-static)")
    with private_dockerd() as daemon:
        client = docker.DockerClient(base_url=daemon.host, timeout=30)
        try:
            client.api.import_image_from_file(
                _write(daemon.root / "rootfs.tar", _rootfs_tarball()),
                repository=IMAGE.split(":")[0],
                tag="1",
            )
            client.api.import_image_from_file(
                _write(daemon.root / "git.tar", _rootfs_tarball(git=True)),
                repository=GIT_IMAGE.split(":")[0],
                tag="1",
            )
        finally:
            client.close()
        yield daemon


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


@pytest.fixture
async def make_sandbox(dockerd: Daemon) -> AsyncIterator[MakeSandbox]:
    made: list[Sandbox] = []

    async def make(workspace: Path, limits: Limits, **options: bool) -> Sandbox:
        sandbox = DockerSandbox(workspace, limits, image=IMAGE, docker_host=dockerd.host, **options)
        made.append(sandbox)
        await sandbox.start()
        return sandbox

    yield make
    for sandbox in made:
        await sandbox.kill()


class TestDockerContract(SandboxContract):
    pass


async def test_kill_removes_the_container(
    make_sandbox: MakeSandbox, dockerd: Daemon, tmp_path: Path
) -> None:
    sandbox = await make_sandbox(tmp_path / "ws", SMALL)
    assert isinstance(sandbox, DockerSandbox)
    client = docker.DockerClient(base_url=dockerd.host)
    try:
        container = client.containers.get(sandbox.name)
        settings = container.attrs["HostConfig"]
        assert settings["NetworkMode"] == "none"
        assert settings["Memory"] == SMALL.memory_bytes
        assert settings["PidsLimit"] == SMALL.pids
        assert settings["ReadonlyRootfs"] is True
        assert settings["CapDrop"] == ["ALL"]
        await sandbox.kill()
        assert await wait_until(lambda: _gone(client, sandbox.name))
    finally:
        client.close()


def _gone(client: docker.DockerClient, name: str) -> bool:
    try:
        client.containers.get(name)
    except docker.errors.NotFound:
        return True
    return False


async def test_a_docker_run_where_bwrap_cannot_start_takes_its_diff_in_a_container(
    dockerd: Daemon, tmp_path: Path, repo_with_submodule: Path
) -> None:
    """No host git in what the agent wrote with the docker sandbox either: without bwrap the
    diff is taken in a container of the run's image, and what the agent planted runs there."""
    from agents.runtime import RuntimeConfig, run_agent_task

    outside = tmp_path / "outside"
    outside.mkdir()
    mark = outside / "ran-on-the-host"
    planted = "\n".join(
        [
            f"$ mkdir -p {GITLINK} && cd {GITLINK} && git init -q && echo x > f && git add f",
            f"$ git -C {GITLINK} config filter.x.clean \"sh -c 'touch {mark}; cat'\"",
            f"$ mkdir -p {GITLINK}/.git/info && echo '* filter=x' > {GITLINK}/.git/info/attributes",
            f"$ touch -d '2000-01-01 00:00' {GITLINK}/f",
            "$ echo changed > new.txt",
        ]
    )
    report = await run_agent_task(
        workspace=tmp_path / "runs" / "docker-diff",
        agent_type="worker",
        context={"repository": str(repo_with_submodule), "instructions": planted},
        config=RuntimeConfig(
            sandbox="docker",
            limits=Limits(memory_bytes=256 * 1024**2, pids=64, cpus=1.0, command_timeout=30),
            docker_image=GIT_IMAGE,
            docker_host=dockerd.host,
            bwrap_path="/nonexistent/bwrap",
            repo_roots=(repo_with_submodule.parent,),
        ),
    )
    assert report.success, report.log_tail
    assert "diffError" not in report.workspace, report.workspace
    assert report.changed_files == ["new.txt"]
    assert "+changed" in report.diff
    assert not mark.exists()


WORKER = """
import asyncio, sys
from pathlib import Path
from agents.sandbox.base import Limits
from agents.sandbox.docker_sandbox import DockerSandbox

async def main() -> None:
    workspace, image, host, instance = sys.argv[1:5]
    sandbox = DockerSandbox(Path(workspace), Limits(), image=image, docker_host=host,
                            instance=instance)
    await sandbox.start()
    print(sandbox.name, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def _containers(client: docker.DockerClient, *labels: str) -> list[str]:
    found = client.containers.list(all=True, filters={"label": list(labels)})
    return sorted(c.name for c in found)


async def test_a_container_left_by_a_killed_worker_is_removed_by_the_next_sweep(
    dockerd: Daemon, tmp_path: Path
) -> None:
    instance = f"sweep-{uuid.uuid4().hex[:8]}"
    worker = subprocess.Popen(
        [sys.executable, "-c", WORKER, str(tmp_path / "lost"), IMAGE, dockerd.host, instance],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert worker.stdout is not None
    left = worker.stdout.readline().strip()
    os.kill(worker.pid, signal.SIGKILL)  # the worker dies without cleaning up
    worker.wait(10)
    worker.stdout.close()
    client = docker.DockerClient(base_url=dockerd.host)
    alive = DockerSandbox(
        tmp_path / "alive", SMALL, image=IMAGE, docker_host=dockerd.host, instance=instance
    )
    other = DockerSandbox(
        tmp_path / "other", SMALL, image=IMAGE, docker_host=dockerd.host, instance="another"
    )
    try:
        await alive.start()
        await other.start()
        # Without a sweep the dead worker's container would run on for ever.
        assert client.containers.get(left).status == "running"
        settings = Settings(sandbox="docker", docker_host=dockerd.host, instance_name=instance)
        assert await sweep_sandboxes(settings) == [left]
        assert _gone(client, left)
        # a live worker's container and another instance's stay
        assert client.containers.get(alive.name).status == "running"
        assert client.containers.get(other.name).status == "running"
        assert (await alive.run("echo still")).output.strip() == "still"
    finally:
        await alive.kill()
        await other.kill()
        client.close()


async def test_a_retry_never_leaves_two_containers_on_one_workspace(
    dockerd: Daemon, tmp_path: Path
) -> None:
    workspace = tmp_path / "ws"
    client = docker.DockerClient(base_url=dockerd.host)
    attempts = [
        DockerSandbox(workspace, SMALL, image=IMAGE, docker_host=dockerd.host, instance="retry")
        for _ in range(2)
    ]
    label = f"fedagent.workspace={workspace.resolve()}"
    try:
        await attempts[0].start()
        running = asyncio.create_task(attempts[0].run("sleep 300"))
        assert await wait_until(lambda: len(attempts[0].alive_pids()) >= 3)
        await attempts[1].start()  # the next attempt of the run, on the same workspace
        assert _containers(client, label) == [attempts[1].name]
        ended = await running
        assert ended.exit_code != 0
        assert (await attempts[1].run("echo mine")).output.strip() == "mine"
    finally:
        for sandbox in attempts:
            await sandbox.kill()
        client.close()
    assert _containers(client, label) == []


async def test_a_diff_container_carries_its_instance_so_a_sweep_finds_it(
    dockerd: Daemon, tmp_path: Path
) -> None:
    """The diff's container (a docker run where bwrap cannot start) runs `sleep` for ever like
    the run's: left by a killed worker, only its instance label lets the sweep remove it."""
    from agents.runtime import RuntimeConfig, _diff_sandboxes
    from agents.workspace import PreparedWorkspace

    for name in ("ws", "baseline", "inputs", "scratch"):
        (tmp_path / name).mkdir()
    instance = f"diff-{uuid.uuid4().hex[:8]}"
    config = RuntimeConfig(
        sandbox="docker", docker_image=IMAGE, docker_host=dockerd.host, instance=instance
    )
    prepared = PreparedWorkspace(
        tmp_path / "ws", tmp_path / "baseline", "0" * 40, "empty", None, None, "empty"
    )
    sandbox = _diff_sandboxes(config, prepared, tmp_path / "inputs", None)[-1]
    sandbox.tmp_dir = tmp_path / "scratch"  # type: ignore[attr-defined]
    client = docker.DockerClient(base_url=dockerd.host)
    try:
        await sandbox.start()
        assert _containers(client, f"fedagent.instance={instance}") == [sandbox.name]  # type: ignore[attr-defined]
    finally:
        await sandbox.kill()
        client.close()
