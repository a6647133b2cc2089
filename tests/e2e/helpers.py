"""Small builders shared by the end-to-end tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import httpx
from temporalio.client import WorkflowExecutionStatus

from cli.devstack import DevStack

if TYPE_CHECKING:
    from tests.conftest import Instance

# Debian's package (scripts/install-system-deps.sh installs it); /usr/sbin may not be on PATH.
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
HAPROXY_CONFIG = """\
global
    maxconn 2000
defaults
    mode http
    timeout connect 2s
    timeout client 120s
    # an event stream sends a keep-alive every 15 s: the server timeout is longer
    timeout server 120s
    # a refused connection is tried again, on the other replica
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response
frontend api
    bind 127.0.0.1:{port}
    default_backend replicas
backend replicas
    balance roundrobin
    option httpchk GET /healthz
    http-check expect status 200
    # A replica is out after three failed checks, and one slow answer on a loaded machine does
    # not take the last replica out (a check of 300 ms did: "no server available", 503); a
    # dead replica refuses connections, which are tried again on the other meanwhile.
    timeout check 2s
    default-server inter 300ms fall 3 rise 1
    http-response set-header X-Served-By %s
{servers}
"""


def spawn_body(
    connection_id: str,
    instructions: str,
    *,
    agent_id: str | None = None,
    task_id: str = "t-1",
    agent_type: str = "worker",
    timeout: int = 60,
    max_retries: int = 0,
) -> dict[str, Any]:
    return {
        "agentId": agent_id or str(uuid.uuid4()),
        "connectionId": connection_id,
        "taskId": task_id,
        "agentType": agent_type,
        "context": {
            "repository": "example/repo",
            "branch": "main",
            "workItems": ["item"],
            "instructions": instructions,
        },
        "options": {"timeout": timeout, "maxRetries": max_retries},
    }


def processes_in(directory: Path) -> list[int]:
    """PIDs of the live processes of the sandbox working in `directory`.

    That is processes whose working directory is inside it (the process sandbox), processes
    whose arguments name it (bubblewrap: its argv mounts it and sets FEDAGENT_HOST_WORKSPACE),
    and every descendant of those: inside a bwrap sandbox /proc/PID/cwd shows the in-sandbox
    path (/workspace), and the agent can change its own cwd and environment, but it cannot
    leave bwrap's process tree (an orphan is reparented to the sandbox's pid 1).
    """
    target = str(directory.resolve())

    def inside(path: str) -> bool:
        return path == target or path.startswith(target + "/")

    parents: dict[int, int] = {}
    roots: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[-1].split()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if fields[0] in ("Z", "X"):
            continue
        parents[pid] = int(fields[1])
        try:
            cwd = os.readlink(entry / "cwd")
        except OSError:
            cwd = ""
        if inside(cwd) or any(inside(arg.decode(errors="replace")) for arg in argv):
            roots.add(pid)
    found = set(roots)
    grew = True
    while grew:
        children = {pid for pid, parent in parents.items() if parent in found} - found
        found |= children
        grew = bool(children)
    return sorted(found)


async def hosted(executor: Instance, agent_id: str) -> dict[str, Any]:
    response = await executor.call("GET", f"/hosted/{agent_id}")
    assert response.status_code == 200, response.text
    return dict(response.json())


async def hosted_state(executor: Instance, agent_id: str, states: set[str], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        state = str((await hosted(executor, agent_id))["state"])
        if state in states or time.monotonic() > deadline:
            return state
        await asyncio.sleep(0.2)


async def workflow_state(instance: Instance, workflow_id: str, timeout: float = 30.0) -> str:
    """The state a closed workflow reports itself (its `status` query), once it is closed."""
    client = await instance.temporal()
    handle = client.get_workflow_handle(workflow_id)
    deadline = time.monotonic() + timeout
    while (await handle.describe()).status == WorkflowExecutionStatus.RUNNING:
        assert time.monotonic() < deadline, f"{workflow_id} is still running"
        await asyncio.sleep(0.2)
    status = await handle.query("status")
    return str(status["state"] if isinstance(status, dict) else status.state)


async def run_cli(data_dir: Path, *args: str) -> str:
    """`fedagent ARGS --data-dir DATA_DIR` as an operator runs it; its standard output."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cli.main",
        *args,
        "--data-dir",
        str(data_dir),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "COLUMNS": "200"},
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    return out.decode()


@contextlib.asynccontextmanager
async def scratch_database(database_url: str, prefix: str) -> AsyncIterator[str]:
    """The URL of a new database in the PostgreSQL that serves `database_url`, dropped at
    the end."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url, _, query = database_url.partition("?")
    base, _, _ = url.rpartition("/")
    try:
        yield f"{base}/{name}" + (f"?{query}" if query else "")
    finally:
        admin = await asyncpg.connect(database_url)
        try:
            await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        finally:
            await admin.close()


def start_process(role: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """`fedagent serve` or `fedagent worker` with these settings, its output appended to `log`."""
    with open(log, "ab") as out:  # the child keeps its own copy of the file
        return subprocess.Popen(
            [sys.executable, "-m", "cli.main", role],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def start_api_replica(stack: DevStack, name: str, port: int, label: str) -> subprocess.Popen[bytes]:
    """Another API process of instance `name` (the same settings) on `port`."""
    env = {**os.environ, **stack.instances[name].env, "FEDAGENT_API_PORT": str(port)}
    return start_process("serve", env, stack.log_path(name, label))


def start_worker_on_host(
    stack: DevStack, name: str, data_dir: Path, log: Path, **settings: str
) -> subprocess.Popen[bytes]:
    """A worker of instance `name` on "another host": its own data dir, the instance's master
    key (its `FEDAGENT_SECRET_KEY`, or the key file an earlier process of the stack made), the
    same database and Temporal namespace."""
    inst = stack.instances[name]
    master = inst.env.get("FEDAGENT_SECRET_KEY") or (
        (stack.data_dir / "secrets" / f"{name}.key").read_text().strip()
    )
    env = {**os.environ, **inst.env, "FEDAGENT_DATA_DIR": str(data_dir)}
    env.update({"FEDAGENT_SECRET_KEY": master, **settings})
    return start_process("worker", env, log)


def start_haproxy(
    directory: Path, log: Path, port: int, servers: dict[str, int]
) -> subprocess.Popen[bytes]:
    """HAProxy on `port`, round robin over the API replicas `servers` (name: port); each
    answer says which one served it (`X-Served-By`)."""
    lines = "\n".join(
        f"    server {name} 127.0.0.1:{server_port} check" for name, server_port in servers.items()
    )
    config = directory / "haproxy.cfg"
    config.write_text(HAPROXY_CONFIG.format(port=port, servers=lines))
    with open(log, "ab") as out:
        return subprocess.Popen(
            [HAPROXY, "-db", "-f", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


async def wait_ready(http: httpx.AsyncClient, url: str, timeout: float = 120.0) -> None:
    """Until the API at `url` answers /readyz with 200."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if (await http.get(f"{url}/readyz")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} did not become ready")
        await asyncio.sleep(0.2)


async def balancer_reaches(http: httpx.AsyncClient, url: str, servers: set[str]) -> None:
    """Until the balancer at `url` has sent requests to each of `servers`."""
    deadline = time.monotonic() + 60
    seen: set[str] = set()
    while servers - seen:
        answer = await http.get(f"{url}/healthz")
        seen.add(answer.headers.get("x-served-by", ""))
        if time.monotonic() > deadline:
            raise AssertionError(f"the balancer only reaches {seen}")
        await asyncio.sleep(0.1)
