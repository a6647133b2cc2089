"""`fedagent doctor`: can this machine run an instance? Checks Temporal, PostgreSQL, the sandbox
(bubblewrap or Docker) and the secret files, and says how to fix what is wrong."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from federation.settings import Settings

if TYPE_CHECKING:
    from temporalio.client import Client

Status = Literal["ok", "warn", "fail"]
TIMEOUT = 10.0  # a busy host (or CI running tests side by side) may take seconds to answer


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str | None = None


def settings_for(instance_info: dict[str, Any] | None, data_dir: Path | None) -> Settings:
    """The instance's settings: FEDAGENT_* variables, or what a dev stack's instances.json says."""
    if instance_info is None:
        return Settings()
    overrides: dict[str, Any] = {
        "instance_name": instance_info["name"],
        "database_url": instance_info["databaseUrl"],
        "temporal_address": instance_info["temporalAddress"],
        "temporal_namespace": instance_info["namespace"],
        "task_queue": instance_info["taskQueue"],
    }
    if data_dir is not None:
        overrides["data_dir"] = data_dir.resolve()
    return Settings(**overrides)


async def check_temporal(settings: Settings) -> list[Check]:
    """Temporal answers, the namespace exists, and the search attributes are registered."""
    client, reached = await _reach_temporal(settings)
    if client is None:
        return [reached]
    checks = [reached, await _check_namespace(client, settings)]
    if checks[-1].status == "ok":
        checks.append(await _check_search_attributes(client, settings))
    return checks


async def _reach_temporal(settings: Settings) -> tuple[Client | None, Check]:
    from temporalio.api.workflowservice.v1 import GetSystemInfoRequest

    from federation.temporal import TemporalSettingsError, connect_temporal

    where = f"{settings.temporal_address} (namespace {settings.temporal_namespace})"
    try:
        client = await asyncio.wait_for(connect_temporal(settings), timeout=TIMEOUT)
        await client.workflow_service.get_system_info(
            GetSystemInfoRequest(), timeout=timedelta(seconds=TIMEOUT)
        )
    except TemporalSettingsError as exc:
        return None, Check("temporal", "fail", str(exc), "fix the FEDAGENT_TEMPORAL_TLS_* settings")
    except Exception as exc:  # noqa: BLE001 - every failure is a finding
        return None, Check(
            "temporal",
            "fail",
            f"cannot reach {where}: {exc.__class__.__name__} {exc}".strip(),
            "start it (`fedagent dev` runs a dev server) or set FEDAGENT_TEMPORAL_ADDRESS; "
            "for TLS set FEDAGENT_TEMPORAL_TLS_CERT/_KEY/_SERVER_CA, for Temporal Cloud "
            "FEDAGENT_TEMPORAL_API_KEY",
        )
    return client, Check("temporal", "ok", f"reachable at {settings.temporal_address}")


async def _check_namespace(client: Client, settings: Settings) -> Check:
    from temporalio.api.workflowservice.v1 import DescribeNamespaceRequest
    from temporalio.service import RPCError, RPCStatusCode

    namespace = settings.temporal_namespace
    try:
        await client.workflow_service.describe_namespace(
            DescribeNamespaceRequest(namespace=namespace), timeout=timedelta(seconds=TIMEOUT)
        )
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:
            return Check(
                "temporal namespace",
                "fail",
                f"namespace {namespace!r} does not exist",
                f"temporal operator namespace create --namespace {namespace} "
                f"--address {settings.temporal_address}",
            )
        return Check("temporal namespace", "warn", f"cannot describe it: {exc}")
    return Check("temporal namespace", "ok", namespace)


async def _check_search_attributes(client: Client, settings: Settings) -> Check:
    from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
    from temporalio.service import RPCError

    from workflows.models import SEARCH_ATTRIBUTES

    namespace = settings.temporal_namespace
    try:
        listed = await client.operator_service.list_search_attributes(
            ListSearchAttributesRequest(namespace=namespace), timeout=timedelta(seconds=TIMEOUT)
        )
        missing = sorted(set(SEARCH_ATTRIBUTES) - set(listed.custom_attributes))
    except RPCError as exc:  # Temporal Cloud: the operator API may be off limits
        return Check("search attributes", "warn", f"cannot list them: {exc}")
    if not missing:
        return Check("search attributes", "ok", ", ".join(sorted(SEARCH_ATTRIBUTES)))
    commands = "; ".join(
        f"temporal operator search-attribute create --namespace {namespace} "
        f"--name {name} --type Keyword"
        for name in missing
    )
    return Check(
        "search attributes",
        "warn",
        f"missing {', '.join(missing)} (a worker registers them when it may)",
        commands,
    )


async def check_postgres(settings: Settings) -> Check:
    import asyncpg

    try:
        conn = await asyncpg.connect(settings.database_url, timeout=TIMEOUT)
    except Exception as exc:  # noqa: BLE001
        return Check(
            "postgresql",
            "fail",
            f"cannot connect to {_redact(settings.database_url)}: "
            f"{exc.__class__.__name__} {exc}".strip(),
            "start PostgreSQL or set FEDAGENT_DATABASE_URL "
            "(postgresql://USER:PASSWORD@HOST:5432/DB); the dev stack's is in instances.json",
        )
    try:
        version = await conn.fetchval("SHOW server_version")
    finally:
        await conn.close()
    return Check("postgresql", "ok", f"PostgreSQL {version} at {_redact(settings.database_url)}")


def _redact(url: str) -> str:
    """A database URL without its password."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in creds else url


async def check_bwrap(settings: Settings) -> Check:
    from agents.sandbox.base import SandboxUnavailable
    from agents.sandbox.bwrap import BwrapSandbox

    path = shutil.which(getattr(settings, "bwrap_path", "bwrap"))
    if path is None:
        return Check(
            "bubblewrap",
            "fail",
            "bwrap not found",
            "apt-get install bubblewrap (scripts/install-system-deps.sh), "
            "or FEDAGENT_SANDBOX=docker",
        )
    workspace = Path(tempfile.mkdtemp(prefix="fedagent-doctor-"))
    sandbox = BwrapSandbox(workspace / "ws", bwrap=path)
    try:
        await asyncio.wait_for(sandbox.start(), timeout=30)
        probe = await sandbox.run("echo sandboxed", timeout=30)
        if probe.exit_code != 0:
            return Check("bubblewrap", "fail", f"a command failed: {probe.output.strip()}")
        return Check("bubblewrap", "ok", f"{path} runs commands ({_enforced(sandbox.enforced)})")
    except SandboxUnavailable as exc:
        return Check("bubblewrap", "fail", "bwrap cannot start a sandbox here", str(exc))
    except Exception as exc:  # noqa: BLE001
        return Check("bubblewrap", "fail", f"{exc.__class__.__name__}: {exc}")
    finally:
        await sandbox.kill()
        shutil.rmtree(workspace, ignore_errors=True)


def _enforced(enforced: dict[str, str]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in enforced.items() if k in ("memory", "pids", "cpu"))


async def check_docker(settings: Settings) -> Check:
    def ping() -> str:
        import docker

        host = getattr(settings, "docker_host", None)
        client = (
            docker.DockerClient(base_url=host, timeout=int(TIMEOUT))
            if host
            else docker.from_env(timeout=int(TIMEOUT))
        )
        try:
            client.ping()
            return str(client.version().get("Version", "?"))
        finally:
            client.close()

    try:
        version = await asyncio.to_thread(ping)
    except Exception as exc:  # noqa: BLE001
        return Check(
            "docker",
            "fail",
            f"no Docker daemon answers: {exc.__class__.__name__}",
            "start dockerd (apt-get install docker.io; systemctl start docker) or set "
            "FEDAGENT_DOCKER_HOST, or use FEDAGENT_SANDBOX=bwrap",
        )
    return Check("docker", "ok", f"Docker {version} answers")


def check_sandboxes(settings: Settings, bwrap: Check, docker: Check) -> list[Check]:
    """The configured sandbox must work; the other one is reported for information."""
    chosen = getattr(settings, "sandbox", "bwrap")
    results = []
    for check, kind in ((bwrap, "bwrap"), (docker, "docker")):
        if kind == chosen or check.status == "ok":
            results.append(check)
        else:
            results.append(
                Check(check.name, "warn", f"{check.detail} (not the configured sandbox)")
            )
    if chosen == "process":
        results.append(
            Check(
                "sandbox",
                "warn",
                "FEDAGENT_SANDBOX=process runs agents without isolation",
                "use bwrap or docker outside tests",
            )
        )
    return results


async def check_toolchain(settings: Settings) -> Check:
    """What an agent's commands find in the configured sandbox (python3, git, pytest)."""
    from activities.agents import runtime_config
    from agents.runtime import make_sandbox
    from agents.sandbox.toolchain import sandbox_toolchain

    workspace = Path(tempfile.mkdtemp(prefix="fedagent-doctor-"))
    try:
        sandbox = make_sandbox(runtime_config(settings), workspace / "ws")
        try:
            await asyncio.wait_for(sandbox.start(), timeout=60)
            tools = await sandbox_toolchain(sandbox)
        finally:
            await sandbox.kill()
    except Exception as exc:  # noqa: BLE001 - the sandbox check above says why
        return Check("sandbox toolchain", "warn", f"not probed: {exc.__class__.__name__}: {exc}")
    finally:
        shutil.rmtree(workspace, ignore_errors=True)
    detail = "; ".join(tool.describe() for tool in tools)
    if all(tool.path for tool in tools):
        return Check("sandbox toolchain", "ok", detail)
    return Check(
        "sandbox toolchain",
        "warn",
        detail,
        "agents see only the sandbox's tools: mount a toolchain with FEDAGENT_SANDBOX_RO_PATHS "
        "(bwrap) or use an image that has it (FEDAGENT_DOCKER_IMAGE)",
    )


async def check_sandbox_limits(settings: Settings) -> Check:
    """Which run limits (memory, processes, CPU) the configured sandbox holds on this machine,
    as the user the command runs as: run it as the worker's user (in compose:
    `docker compose exec hub-worker fedagent doctor`)."""
    from agents.sandbox.report import FIX, describe_gaps
    from worker.sandboxes import probe_limits

    try:
        kind, gaps = await probe_limits(settings)
    except Exception as exc:  # noqa: BLE001 - the sandbox check above says why
        return Check("sandbox limits", "warn", f"not probed: {exc.__class__.__name__}: {exc}")
    if not gaps:
        return Check("sandbox limits", "ok", f"the {kind} sandbox holds memory, processes, CPU")
    status: Status = "fail" if any(gap.severity == "error" for gap in gaps) else "warn"
    return Check("sandbox limits", status, f"{kind}: {describe_gaps(gaps)}", FIX)


def check_secret_files(settings: Settings, extra: list[Path]) -> list[Check]:
    from federation import keystore

    checks: list[Check] = []
    if settings.secret_key is not None:
        checks.append(Check("master key", "ok", "from FEDAGENT_SECRET_KEY"))
    else:
        path = keystore.key_file_path(settings)
        checks.append(_secret_file("master key", path, created_on_start=True))
        parent = path.parent
        if parent.exists() and os.stat(parent).st_mode & 0o077:
            checks.append(
                Check(
                    "secrets directory",
                    "warn",
                    f"{parent} is open to others (mode {os.stat(parent).st_mode & 0o777:o})",
                    f"chmod 700 {parent}",
                )
            )
    if settings.temporal_tls_key is not None:
        checks.append(_secret_file("temporal TLS key", settings.temporal_tls_key))
    if settings.temporal_tls_cert is not None and not settings.temporal_tls_cert.exists():
        checks.append(
            Check(
                "temporal TLS cert",
                "fail",
                f"{settings.temporal_tls_cert} does not exist",
                "point FEDAGENT_TEMPORAL_TLS_CERT at the client certificate (PEM)",
            )
        )
    for path in extra:
        checks.append(_secret_file(path.name, path))
    return checks


def _secret_file(name: str, path: Path, *, created_on_start: bool = False) -> Check:
    if not path.exists():
        if created_on_start:
            return Check(name, "warn", f"{path} does not exist yet (created on the first start)")
        return Check(name, "fail", f"{path} does not exist", "create it or fix the setting")
    info = path.stat()
    mode = info.st_mode & 0o777
    if mode & 0o077:
        return Check(
            name, "fail", f"{path} is readable by others (mode {mode:o})", f"chmod 600 {path}"
        )
    if info.st_uid != os.geteuid():
        return Check(
            name,
            "warn",
            f"{path} belongs to uid {info.st_uid}, not this user ({os.geteuid()})",
            f"chown {os.geteuid()} {path}",
        )
    return Check(name, "ok", f"{path} (mode {mode:o})")


async def check_live(
    settings: Settings, instance_info: dict[str, Any] | None, temporal_ok: bool
) -> list[Check]:
    """The running instance itself: its API answers /readyz, workers poll both task queues.
    For a dev stack's instance (-i NAME) these must hold; for FEDAGENT_* settings alone the
    instance may simply not be started yet, so they only warn."""
    must: Status = "fail" if instance_info is not None else "warn"
    checks = await _check_api(str(instance_info["apiUrl"])) if instance_info is not None else []
    if not temporal_ok:
        checks.append(Check("workers", must, "not checked: Temporal does not answer (above)"))
        return checks
    checks.append(await _check_workers(settings, must))
    return checks


async def _check_api(api_url: str) -> list[Check]:
    """The instance's /readyz, and the warning of workers whose sandboxes fall short."""
    import httpx

    url = api_url.rstrip("/")
    try:
        async with httpx.AsyncClient(timeout=TIMEOUT) as http:
            response = await http.get(f"{url}/readyz")
        if response.status_code != 200:
            detail = response.json().get("detail") if response.content else ""
            return [Check("api", "fail", f"{url}/readyz answered {response.status_code}: {detail}")]
        checks = [Check("api", "ok", f"{url} is ready")]
        warning = response.json().get("checks", {}).get("sandboxes", "ok")
        if warning != "ok":  # a worker's sandboxes do not hold every run limit
            checks.append(Check("worker sandboxes", "warn", warning))
        return checks
    except (httpx.HTTPError, ValueError) as exc:
        return [
            Check(
                "api",
                "fail",
                f"{url} does not answer: {exc.__class__.__name__}",
                "start the stack (`fedagent dev`); its logs are in DATA_DIR/logs",
            )
        ]


async def _check_workers(settings: Settings, must: Status) -> Check:
    from api.liveness import queue_pollers, unpolled
    from federation.temporal import connect_temporal

    try:
        client = await asyncio.wait_for(connect_temporal(settings), timeout=TIMEOUT)
        found = await queue_pollers(
            client, settings.temporal_namespace, settings.task_queue, timeout=TIMEOUT
        )
    except Exception as exc:  # noqa: BLE001
        return Check("workers", must, f"cannot ask Temporal: {exc.__class__.__name__}")
    missing = unpolled(found)
    if missing:
        return Check(
            "workers",
            must,
            f"no worker polls {', '.join(missing)}",
            "start one: `fedagent worker` with this instance's FEDAGENT_* settings "
            "(`fedagent dev` restarts its own)",
        )
    polled = ", ".join(f"{q.task_queue}: {q.pollers}" for q in found)
    return Check("workers", "ok", f"pollers {polled}")


async def run_checks(
    instance_info: dict[str, Any] | None, data_dir: Path | None
) -> tuple[Settings | None, list[Check]]:
    try:
        settings = settings_for(instance_info, data_dir)
    except Exception as exc:  # noqa: BLE001 - pydantic explains which variable is wrong
        return None, [
            Check("settings", "fail", str(exc).splitlines()[0], "fix the FEDAGENT_* variables")
        ]
    checks = [Check("settings", "ok", f"instance {settings.instance_name!r}")]
    temporal, postgres, bwrap, docker, toolchain, limits = await asyncio.gather(
        check_temporal(settings),
        check_postgres(settings),
        check_bwrap(settings),
        check_docker(settings),
        check_toolchain(settings),
        check_sandbox_limits(settings),
    )
    checks += temporal
    checks.append(postgres)
    temporal_ok = all(c.status != "fail" for c in temporal)
    checks += await check_live(settings, instance_info, temporal_ok)
    checks += check_sandboxes(settings, bwrap, docker)
    checks.append(toolchain)
    checks.append(limits)
    extra = [data_dir / "instances.json"] if instance_info is not None and data_dir else []
    checks += check_secret_files(settings, extra)
    return settings, checks
