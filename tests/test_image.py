"""The production image, built and run: the Dockerfile builds on a Debian base made here
(tests/debian_base.py: Docker Hub is not reachable), in a dockerd of this module's own; the
instance `spoke` runs as the image's API and worker containers, configured as
docker-compose.yml configures them (environment, security options, limits), against this
test's Temporal dev server and PostgreSQL; `hub` runs as processes on the host. A user on hub
spawns agents on spoke: one runs in bwrap inside the worker container to completed, another is
killed there.

The containers use the host's network (the dockerd has no bridge): they reach Temporal and
hub's API on loopback, and PostgreSQL through its unix socket, mounted into them. Slow the
first time on a machine (debootstrap, about two minutes); the base is cached after that."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import docker
import docker.errors
import httpx
import pytest
import yaml

from cli.devstack import DevStack, free_port_block
from tests.conftest import Instance
from tests.debian_base import base_tarball, cache_dir, dockerfile_packages
from tests.dockerd import Daemon, private_dockerd
from tests.e2e.helpers import spawn_body

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "fedagent:test"
PG_SOCKET_DIR = "/run/postgresql"  # where the containers see PostgreSQL's socket


@dataclass
class Built:
    client: docker.DockerClient
    base: str
    base_seconds: float
    base_cached: bool
    build_seconds: float


def _compose_service(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    service: dict[str, Any] = doc["services"][name]
    return service


def _base(client: docker.DockerClient, scratch: Path) -> tuple[str, bool, list[str]]:
    """The base image's tag, whether its tarball was cached, and the images the build may take
    its cache from: the last image built on this base, saved with the base (an import of the
    same tarball is another image to the builder, its history has another date)."""
    packages = dockerfile_packages((ROOT / "Dockerfile").read_text())
    tarball, cached = base_tarball(packages, scratch)
    base = f"fedagent-test-debian:{tarball.stem.rsplit('-', 1)[-1]}"
    with contextlib.suppress(docker.errors.ImageNotFound):
        found = client.images.get(base)  # a kept data root has it, and its own build cache
        made = datetime.fromisoformat(found.attrs["Created"][:19]).replace(tzinfo=UTC)
        if made.timestamp() >= tarball.stat().st_mtime - 60:
            # The last image: its layers match by history where no parent chain is kept.
            return base, cached, [IMAGE] if client.images.list(name=IMAGE) else []
    layers = _layer_cache(base, scratch)
    if layers.exists() and layers.stat().st_mtime >= tarball.stat().st_mtime:
        with layers.open("rb") as data:
            client.images.load(data)
        return base, cached, [IMAGE]
    repository, tag = base.split(":")
    client.api.import_image_from_file(str(tarball), repository=repository, tag=tag)
    return base, cached, []


def _layer_cache(base: str, scratch: Path) -> Path:
    """The base and the last image built on it, saved: the dependencies' layer is reused while
    pyproject.toml and the steps before it are unchanged; the code's layers are built anew."""
    return (cache_dir() or scratch) / f"fedagent-image-{base.rsplit(':', 1)[-1]}.tar"


def _save_layer_cache(client: docker.DockerClient, base: str, path: Path) -> None:
    """`docker save BASE IMAGE` (docker-py's get_image saves one name only)."""
    api = client.api
    response = api._get(api._url("/images/get"), params={"names": [base, IMAGE]}, stream=True)
    api._raise_for_status(response)
    partial = path.with_suffix(f".{os.getpid()}.partial")
    with partial.open("wb") as out:
        for chunk in response.iter_content(2 * 1024 * 1024):
            out.write(chunk)
    os.replace(partial, path)  # whole or absent


def _build_args(base: str) -> dict[str, str]:
    """The base, and what pip needs to reach its index from this machine: the local CAs
    Debian's ca-certificates adds to the system store (a TLS-intercepting proxy's), and an
    index other than PyPI if pip here is given one over http(s)."""
    local_cas = sorted(Path("/usr/local/share/ca-certificates").glob("**/*.crt"))
    args = {"BASE_IMAGE": base, "BUILD_CA_CERTS": "".join(p.read_text() for p in local_cas)}
    index = os.environ.get("PIP_INDEX_URL", "")
    if index.startswith(("http://", "https://")):
        args["PIP_INDEX_URL"] = index
    return args


def _build(client: docker.DockerClient, base: str, cache_from: list[str]) -> bool:
    """docker build of the repository's Dockerfile on `base`; fails with the build's log.
    Whether the dependencies' layer came from the cache."""
    log: list[str] = []
    for chunk in client.api.build(
        path=str(ROOT), tag=IMAGE, buildargs=_build_args(base), network_mode="host",
        rm=True, forcerm=True, decode=True, cache_from=cache_from,
    ):  # fmt: skip
        log.append(str(chunk.get("stream") or chunk.get("status") or ""))
        if "error" in chunk:
            tail = "".join(log)[-4000:]
            raise AssertionError(f"the image does not build: {chunk['error']}\n{tail}")
    text = "".join(log)
    return bool(re.search(r"pip install -r [^\n]*\n ---> Using cache", text))


@contextlib.contextmanager
def _kept_data_root() -> Iterator[Path | None]:
    """The cache's dockerd data root, held by this run alone (with its images, the build
    cache of the last run); None when there is no cache or another run holds it."""
    directory = cache_dir()
    if directory is None:
        yield None
        return
    with open(directory / "dockerd.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield None
            return
        yield directory / "dockerd-overlay2"


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    with _kept_data_root() as data_root:
        try:
            with private_dockerd("overlay2", data_root) as started:
                yield started
            return
        except pytest.skip.Exception:
            pass
    with private_dockerd("vfs") as started:  # where overlayfs cannot be used
        yield started


def _build_image(client: docker.DockerClient, scratch: Path) -> Built:
    started = time.monotonic()
    base, cached, cache_from = _base(client, scratch)
    base_seconds = time.monotonic() - started
    started = time.monotonic()
    reused = _build(client, base, cache_from)
    build_seconds = time.monotonic() - started
    if not reused:
        _save_layer_cache(client, base, _layer_cache(base, scratch))
    client.images.prune(filters={"dangling": True})  # the last run's image, in a kept root
    print(
        f"\nimage: base {'cached' if cached else 'made'} and imported in {base_seconds:.0f} s,"
        f" image built in {build_seconds:.0f} s (dependencies' layer "
        f"{'reused' if reused else 'built, then saved'})"
    )
    return Built(client, base, base_seconds, cached, build_seconds)


def _forget_earlier_runs(client: docker.DockerClient) -> None:
    """A kept data root keeps images, not an earlier run's containers or data volume."""
    for container in client.containers.list(all=True):
        container.remove(force=True)
    with contextlib.suppress(docker.errors.NotFound):
        client.volumes.get("spoke-data").remove(force=True)


async def _start_hub(dev: DevStack) -> None:
    await dev.prepare()
    dev.start_api("hub")
    dev.start_worker("hub")
    await dev.wait_ready("hub")
    await dev.wait_polling("hub")


@dataclass
class Started:
    built: Built
    dev: DevStack
    ports: int


@pytest.fixture(scope="module")
async def started(
    daemon: Daemon, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Started]:
    """The image, built while Temporal, PostgreSQL and hub's processes start (spoke's database
    and namespace are made, not used yet)."""
    ports = free_port_block(5)
    dev = DevStack(
        ["hub"],
        tmp_path_factory.mktemp("stack"),
        base_port=ports,
        temporal_port=ports + 2,
        ui_port=ports + 3,
        extra_namespaces=("spoke",),
    )
    client = docker.DockerClient(base_url=daemon.host, timeout=600)
    _forget_earlier_runs(client)
    try:
        built, hub = await asyncio.gather(
            asyncio.to_thread(_build_image, client, daemon.root),
            _start_hub(dev),
            return_exceptions=True,
        )
        for outcome in (built, hub):
            if isinstance(outcome, BaseException):
                raise outcome
        assert isinstance(built, Built)
        yield Started(built, dev, ports)
    finally:
        dev.stop()
        client.close()


def _spoke_env(dev: DevStack, database_url: str, ports: int) -> dict[str, str]:
    """The compose file's settings of spoke's worker, with this machine's addresses."""
    env = {str(k): str(v) for k, v in _compose_service("spoke-worker")["environment"].items()}
    database = urlsplit(database_url).path.lstrip("/")
    return {
        **env,
        "FEDAGENT_API_HOST": "127.0.0.1",
        "FEDAGENT_API_PORT": str(ports + 1),
        "FEDAGENT_PUBLIC_URL": f"http://127.0.0.1:{ports + 1}",
        "FEDAGENT_DATABASE_URL": f"postgresql://postgres:@/{database}?host={PG_SOCKET_DIR}",
        "FEDAGENT_TEMPORAL_ADDRESS": dev.temporal_address,
        "FEDAGENT_TEMPORAL_UI_URL": dev.ui_url,
        "FEDAGENT_OUTBOUND_ALLOWLIST": "127.0.0.1",
        "FEDAGENT_METRICS_HOST": "127.0.0.1",
        "FEDAGENT_METRICS_PORT": str(ports + 4),
    }


@dataclass
class Spoke:
    api: Any
    worker: Any
    instance: Instance


def _run(client: docker.DockerClient, role: str, env: dict[str, str], socket: str) -> Any:
    """A container of the image as compose runs spoke's `role` (its command, security options
    and limits), on the host's network, with the instance's data volume."""
    service = _compose_service(f"spoke-{role}")
    security = list(service.get("security_opt", []))
    host_config = client.api.create_host_config(
        network_mode="host", init=service.get("init", False),
        pids_limit=service.get("pids_limit"),
        security_opt=[opt for opt in security if opt != "systempaths=unconfined"] or None,
        binds={
            "spoke-data": {"bind": "/var/lib/fedagent", "mode": "rw"},
            socket: {"bind": f"{PG_SOCKET_DIR}/.s.PGSQL.5432", "mode": "rw"},
        },
    )  # fmt: skip
    if "systempaths=unconfined" in security:
        # What the docker CLI and Compose v2 send for it (the engine does not take it as is):
        # no path of /proc or /sys masked or made read-only.
        host_config["MaskedPaths"], host_config["ReadonlyPaths"] = [], []
    created = client.api.create_container(
        IMAGE, service["command"], name=f"spoke-{role}-{uuid.uuid4().hex[:6]}",
        environment=env, host_config=host_config,
    )  # fmt: skip
    client.api.start(created["Id"])
    return client.containers.get(created["Id"])


def _logs(container: Any) -> str:
    with contextlib.suppress(docker.errors.DockerException):
        return str(container.logs(tail=60).decode(errors="replace"))
    return ""


async def _ready(url: str, containers: list[Any], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    async with httpx.AsyncClient(timeout=5) as http:
        while True:
            for container in containers:
                container.reload()
                assert container.status == "running", (
                    f"{container.name} exited:\n{_logs(container)}"
                )
            with contextlib.suppress(httpx.HTTPError):
                response = await http.get(f"{url}/readyz")
                if response.status_code == 200:
                    return
                last = response.text
            assert time.monotonic() < deadline, f"spoke never ready: {last}\n" + "\n".join(
                _logs(c) for c in containers
            )
            await asyncio.sleep(0.5)


@pytest.fixture(scope="module")
async def spoke(started: Started, http: httpx.AsyncClient) -> AsyncIterator[Spoke]:
    dev, ports, built = started.dev, started.ports, started.built
    database_url = await dev.create_database("spoke")
    host = parse_qs(urlsplit(database_url).query)["host"][0]
    env = _spoke_env(dev, database_url, ports)
    containers: list[Any] = []
    try:
        containers.append(_run(built.client, "api", env, f"{host}/.s.PGSQL.5432"))
        containers.append(_run(built.client, "worker", env, f"{host}/.s.PGSQL.5432"))
        url = env["FEDAGENT_PUBLIC_URL"]
        await _ready(url, containers)
        # The image's CLI makes the admin token, as an operator would (docker exec).
        made = containers[0].exec_run(["fedagent", "token", "create", "--role", "admin"])
        assert made.exit_code == 0, made.output
        token = made.output.decode().strip().splitlines()[-1]
        info = {"name": "spoke", "instanceId": "", "apiUrl": url, "adminToken": token}
        yield Spoke(containers[0], containers[1], Instance(info, http))
    finally:
        for container in containers:
            with contextlib.suppress(docker.errors.DockerException):
                container.remove(force=True)
        with contextlib.suppress(docker.errors.DockerException):
            built.client.volumes.get("spoke-data").remove(force=True)


@pytest.fixture(scope="module")
def hub(started: Started, http: httpx.AsyncClient) -> Instance:
    return Instance(started.dev.instances["hub"].info, http)


@pytest.fixture(scope="module")
async def connection(hub: Instance, spoke: Spoke) -> str:
    response = await hub.call("POST", "/connections", json={"remoteUrl": spoke.instance.url})
    assert response.status_code == 201, response.text
    connection_id: str = response.json()["connectionId"]
    accepted = await spoke.instance.call("POST", f"/connections/{connection_id}/accept")
    assert accepted.status_code == 200, accepted.text
    return connection_id


async def test_an_agent_runs_in_bwrap_inside_the_worker_container(
    hub: Instance, spoke: Spoke, connection: str
) -> None:
    # In its sandbox the agent sees neither the instance's data dir nor fedagent's install.
    body = spawn_body(
        connection,
        "$ echo hi > out.txt\n$ cat out.txt\n"
        "$ test ! -e /var/lib/fedagent && test ! -e /opt/fedagent && echo confined",
        task_id="image-1",
    )
    response = await hub.call("POST", "/agents/spawn", json=body)
    assert response.status_code == 202, response.text
    agent = await hub.wait_agent(body["agentId"], timeout=120)
    assert agent["state"] == "completed", (agent, _logs(spoke.worker))
    assert agent["result"]["exitCodes"] == [0, 0, 0]
    assert "hi" in agent["result"]["logTail"] and "confined" in agent["result"]["logTail"]
    # It ran in bwrap, in the worker container (its workspace is in the instance's volume).
    found = spoke.worker.exec_run(
        ["cat", f"/var/lib/fedagent/workspaces/spoke/{hub.id}/{body['agentId']}/out.txt"]
    )
    assert found.exit_code == 0 and found.output == b"hi\n", found.output


def _processes(container: Any) -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of the container's processes."""
    top = container.top(ps_args="-eo pid,ppid,args")
    return {int(row[0]): (int(row[1]), " ".join(row[2:])) for row in top["Processes"]}


def _sleeping(container: Any) -> list[str]:
    """The agent's `sleep 300` and the processes it runs under, up to the worker."""
    processes = _processes(container)
    for pid, (_, args) in processes.items():
        if args == "sleep 300":
            chain = []
            while pid in processes:
                chain.append(processes[pid][1])
                pid = processes[pid][0]
            return chain
    return []


async def test_a_killed_agent_leaves_no_process_in_the_worker_container(
    hub: Instance, spoke: Spoke, connection: str
) -> None:
    body = spawn_body(connection, "$ sleep 300", task_id="image-kill", timeout=600)
    assert (await hub.call("POST", "/agents/spawn", json=body)).status_code == 202
    deadline = time.monotonic() + 90
    while not _sleeping(spoke.worker):
        assert time.monotonic() < deadline, ("the agent's sleep never started", _logs(spoke.worker))
        await asyncio.sleep(0.2)
    # It runs under bwrap, under the worker (`fedagent worker`, under tini).
    chain = _sleeping(spoke.worker)
    assert any(p.split()[0].endswith("/bwrap") for p in chain), chain
    assert any("fedagent worker" in p for p in chain), chain

    response = await hub.call("POST", f"/agents/{body['agentId']}/kill")
    assert response.status_code == 200, response.text
    assert response.json()["state"] == "killed"
    assert _sleeping(spoke.worker) == []
    agent = await hub.wait_agent(body["agentId"])
    assert agent["state"] == "killed"
