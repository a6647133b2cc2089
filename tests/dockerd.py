"""A private dockerd for a test module (Debian's docker.io): its own socket, data root and exec
root, no iptables, no bridge (containers use `network_mode="host"` or none), containers'
cgroups under a parent of their own. Skips, saying why, only where dockerd cannot start."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import docker.errors
import pytest


@dataclass
class Daemon:
    host: str
    pid: int
    root: Path
    kept: bool  # its data root outlives it (images and build cache of earlier runs)


def _remove_cgroups(name: str) -> None:
    """dockerd made its containers' cgroups below `name`; they are empty once it stopped."""
    for top, dirs, _ in os.walk("/sys/fs/cgroup", topdown=False):
        for directory in dirs:
            path = os.path.join(top, directory)
            if name in path:
                with contextlib.suppress(OSError):
                    os.rmdir(path)


def _wait_for(proc: subprocess.Popen[bytes], socket_path: Path, host: str) -> bool:
    deadline = time.monotonic() + 30
    while proc.poll() is None and time.monotonic() < deadline:
        if socket_path.exists():
            with contextlib.suppress(docker.errors.DockerException):
                client = docker.DockerClient(base_url=host, timeout=30)
                try:
                    client.ping()
                    return True
                finally:
                    client.close()
        time.sleep(0.1)
    return False


@contextlib.contextmanager
def private_dockerd(storage_driver: str = "vfs", data_root: Path | None = None) -> Iterator[Daemon]:
    """A dockerd started here, stopped (by its PID) and removed with everything it stored, or
    with `data_root` (which the caller holds alone), everything but that."""
    binary = shutil.which("dockerd")
    if binary is None:
        pytest.skip("dockerd is not installed (apt-get install docker.io)")
    root = Path(tempfile.mkdtemp(prefix="fa-dockerd-"))  # short: unix socket paths are bounded
    cgroup_parent = f"fedagent-test-{uuid.uuid4().hex[:8]}"
    socket_path = root / "docker.sock"
    host = f"unix://{socket_path}"
    log = (root / "dockerd.log").open("wb")
    proc = subprocess.Popen(
        [binary, "--host", host, "--data-root", str(data_root or root / "data"),
         "--exec-root", str(root / "exec"), "--pidfile", str(root / "docker.pid"),
         f"--storage-driver={storage_driver}", "--iptables=false", "--ip6tables=false",
         "--bridge=none", "--cgroup-parent", cgroup_parent],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        if not _wait_for(proc, socket_path, host):
            tail = (root / "dockerd.log").read_text(errors="replace")[-1500:]
            pytest.skip(f"dockerd could not start here: {tail}")
        yield Daemon(host, proc.pid, root, data_root is not None)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)  # by its PID, as started here
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5)
        log.close()
        _remove_cgroups(cgroup_parent)
        netns = root / "exec" / "netns" / "default"  # dockerd leaves its host netns mounted
        if os.path.ismount(netns):
            subprocess.run(["umount", str(netns)], check=False, capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
