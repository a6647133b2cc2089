"""The docker sandbox against a real dockerd that this module starts (Debian's docker.io, vfs
storage, no iptables, no bridge, a private socket, data root and exec root), with an image
imported from a busybox-static rootfs. Skipped, saying why, only where dockerd cannot start."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import docker.errors
import pytest

from agents.sandbox.base import Limits, Sandbox
from agents.sandbox.docker_sandbox import DockerSandbox
from tests.agents.contract import SMALL, MakeSandbox, SandboxContract, wait_until

IMAGE = "fedagent-test-busybox:1"
BUSYBOX = Path("/bin/busybox")


@dataclass
class Daemon:
    host: str
    pid: int


def _rootfs_tarball() -> bytes:
    """A root filesystem of busybox-static and its applet links, as `docker import` takes."""
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
    return buffer.getvalue()


def _remove_cgroups(name: str) -> None:
    """dockerd made its containers' cgroups below `name`; they are empty once it stopped."""
    for top, dirs, _ in os.walk("/sys/fs/cgroup", topdown=False):
        for directory in dirs:
            path = os.path.join(top, directory)
            if name in path:
                with contextlib.suppress(OSError):
                    os.rmdir(path)


@pytest.fixture(scope="module")
def dockerd() -> Iterator[Daemon]:
    binary = shutil.which("dockerd")
    if binary is None:
        pytest.skip("dockerd is not installed (apt-get install docker.io)")
    if not BUSYBOX.exists():
        pytest.skip("busybox-static is not installed (apt-get install busybox-static)")
    root = Path(tempfile.mkdtemp(prefix="fa-dockerd-"))  # short: unix socket paths are bounded
    cgroup_parent = f"fedagent-test-{uuid.uuid4().hex[:8]}"
    socket_path = root / "docker.sock"
    log = (root / "dockerd.log").open("wb")
    proc = subprocess.Popen(
        [
            binary,
            "--host",
            f"unix://{socket_path}",
            "--data-root",
            str(root / "data"),
            "--exec-root",
            str(root / "exec"),
            "--pidfile",
            str(root / "docker.pid"),
            "--storage-driver=vfs",
            "--iptables=false",
            "--ip6tables=false",
            "--bridge=none",
            "--cgroup-parent",
            cgroup_parent,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    host = f"unix://{socket_path}"
    client: docker.DockerClient | None = None
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                break
            if socket_path.exists():
                with contextlib.suppress(docker.errors.DockerException):
                    client = docker.DockerClient(base_url=host, timeout=30)
                    client.ping()
                    break
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if client is None or proc.poll() is not None:
            tail = (root / "dockerd.log").read_text(errors="replace")[-1500:]
            pytest.skip(f"dockerd could not start here: {tail}")
        client.api.import_image_from_file(
            _write(root / "rootfs.tar", _rootfs_tarball()), repository=IMAGE.split(":")[0], tag="1"
        )
        yield Daemon(host, proc.pid)
    finally:
        if client is not None:
            client.close()
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)  # by its PID, as started here
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5)
        log.close()
        _remove_cgroups(cgroup_parent)
        shutil.rmtree(root, ignore_errors=True)


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
