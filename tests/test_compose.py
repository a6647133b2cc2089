"""The production-shaped stack: docker-compose.yml follows the compose specification (its JSON
schema, and Debian's docker-compose 1.29 reads it) and names what it must, and the Temporal
init script really creates the namespaces and search attributes, against a real Temporal dev
server. tests/test_image.py builds the image and runs it."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
import yaml
from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
from temporalio.client import Client

from cli.devstack import temporal_binary
from federation.settings import Settings
from tests.conftest import free_port_block
from workflows.models import SEARCH_ATTRIBUTES

ROOT = Path(__file__).resolve().parent.parent
INSTANCES = ("hub", "spoke")
SETTINGS_EVERY_PROCESS_NEEDS = (
    "FEDAGENT_INSTANCE_NAME",
    "FEDAGENT_PUBLIC_URL",
    "FEDAGENT_DATABASE_URL",
    "FEDAGENT_TEMPORAL_ADDRESS",
    "FEDAGENT_TEMPORAL_NAMESPACE",
    "FEDAGENT_TASK_QUEUE",
    "FEDAGENT_DATA_DIR",
    "FEDAGENT_LOG_FORMAT",
)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return doc


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose["services"]
    return found


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # KEY=VALUE form
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command") or []
    return command.split() if isinstance(command, str) else [str(c) for c in command]


def _schema_errors(doc: dict[str, Any]) -> list[str]:
    # The compose specification's schema, from github.com/compose-spec/compose-spec
    # (schema/compose-spec.json at 170098ba07d9, Apache-2.0).
    schema = json.loads((ROOT / "tests/data/compose-spec.json").read_text())
    validator = jsonschema_rs.validator_for(schema)
    return [f"{e.instance_path}: {e.message}" for e in validator.iter_errors(doc)]


def test_the_compose_file_follows_the_compose_specification(compose: dict[str, Any]) -> None:
    assert _schema_errors(compose) == []
    # The schema does refuse what compose would: a misspelt option, a list given as a string.
    misspelt = copy.deepcopy(compose)
    misspelt["services"]["spoke-worker"]["pids_limt"] = 4096
    assert any("pids_limt" in error for error in _schema_errors(misspelt))
    wrong = copy.deepcopy(compose)
    wrong["services"]["hub-worker"]["security_opt"] = "seccomp=unconfined"
    assert any("security_opt" in error for error in _schema_errors(wrong))


def test_debian_docker_compose_reads_the_compose_file(tmp_path: Path) -> None:
    """docker-compose 1.29 (Debian's) resolves it, the passwords included, and refuses to
    without them. 1.29 predates the top-level `name` (the project's name): it is given with
    -p instead, which is the only difference."""
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (scripts/install-system-deps.sh)")
    text = (ROOT / "docker-compose.yml").read_text()
    assert re.findall(r"^name: .*$", text, re.M) == ["name: fedagent"]
    copy_for_1_29 = tmp_path / "docker-compose.yml"
    copy_for_1_29.write_text(text.replace("name: fedagent\n", ""))
    command = [binary, "-p", "fedagent", "--project-directory", str(ROOT), "-f",
               str(copy_for_1_29), "config"]  # fmt: skip
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    passwords = {f"{name}_DB_PASSWORD": "secret" for name in ("HUB", "SPOKE", "TEMPORAL")}
    done = subprocess.run(command, env={**env, **passwords}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)
    worker = resolved["services"]["spoke-worker"]
    assert "seccomp=unconfined" in worker["security_opt"]
    assert "postgresql://fedagent:secret@spoke-db" in worker["environment"]["FEDAGENT_DATABASE_URL"]
    refused = subprocess.run(command, env=env, capture_output=True, text=True)
    assert refused.returncode != 0 and "set TEMPORAL_DB_PASSWORD" in refused.stderr


def test_the_stack_has_temporal_its_ui_databases_and_two_instances(
    services: dict[str, dict[str, Any]],
) -> None:
    expected = {"temporal-db", "temporal", "temporal-init", "temporal-ui"}
    for name in INSTANCES:
        expected |= {f"{name}-db", f"{name}-api", f"{name}-worker"}
    assert expected <= set(services), expected - set(services)

    assert services["temporal"]["image"].startswith(
        ("temporalio/server:", "temporalio/auto-setup:")
    )
    assert services["temporal-ui"]["image"].startswith("temporalio/ui:")
    assert services["temporal-db"]["image"].startswith("postgres:")
    temporal_env = _env(services["temporal"])
    assert temporal_env["DB"].startswith("postgres")
    assert temporal_env["POSTGRES_SEEDS"] == "temporal-db"
    assert _env(services["temporal-ui"])["TEMPORAL_ADDRESS"] == "temporal:7233"
    for name in INSTANCES:
        assert services[f"{name}-db"]["image"].startswith("postgres:")
        for role in ("api", "worker"):
            service = services[f"{name}-{role}"]
            assert service.get("build") in (".", {"context": "."}), f"{name}-{role} builds fedagent"
            assert _command(service) == ["serve" if role == "api" else "worker"]


def test_every_service_has_a_healthcheck(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        check = service.get("healthcheck")
        assert check and check.get("test"), f"{name} has no healthcheck"
        assert not check.get("disable"), f"{name} disables its healthcheck"


def test_dependencies_wait_for_health(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        depends = service.get("depends_on") or {}
        assert isinstance(depends, dict), f"{name}: depends_on needs conditions, not a list"
        for target, spec in depends.items():
            assert target in services, f"{name} depends on unknown {target}"
            assert spec["condition"] in ("service_healthy", "service_completed_successfully")
    # The server waits for its schema; everything else for the namespaces and attributes.
    assert services["temporal"]["depends_on"]["temporal-schema"] == {
        "condition": "service_completed_successfully"
    }
    for name in INSTANCES:
        for role in ("api", "worker"):
            depends = services[f"{name}-{role}"]["depends_on"]
            assert depends[f"{name}-db"] == {"condition": "service_healthy"}
            assert depends["temporal-init"] == {"condition": "service_healthy"}


def test_workers_scale_without_fixed_names_or_host_ports(
    services: dict[str, dict[str, Any]],
) -> None:
    for name in INSTANCES:
        worker = services[f"{name}-worker"]
        assert "container_name" not in worker
        assert "ports" not in worker
        # Replicas share the instance's data volume (master key file, workspaces).
        assert any(str(v).endswith(":/var/lib/fedagent") for v in worker["volumes"])
        assert worker["volumes"] == services[f"{name}-api"]["volumes"]
        # bwrap needs user namespaces and a /proc of its own inside the container
        # (tests/test_image.py shows it cannot without either).
        assert "seccomp=unconfined" in worker.get("security_opt", [])
        assert "systempaths=unconfined" in worker.get("security_opt", [])


def _bytes(size: str | int) -> int:
    text = str(size).lower()
    units = {"k": 1024, "m": 1024**2, "g": 1024**3}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def test_workers_are_bounded_as_a_whole_with_room_for_every_run(
    services: dict[str, dict[str, Any]],
) -> None:
    # bwrap sandboxes of a worker that is not root get no cgroup of their own: the container's
    # limits bound them all, and a fork bomb must stop at its own sandbox's cap long before
    # the container's, which the worker shares.
    for name in INSTANCES:
        worker = services[f"{name}-worker"]
        env = _env(worker)
        settings = Settings(**{k[len("FEDAGENT_") :].lower(): v for k, v in env.items()})
        assert worker["pids_limit"] >= settings.max_concurrent_agents * settings.sandbox_pids + 512
        memory = _bytes(worker["mem_limit"])
        assert memory >= settings.sandbox_memory_mb * 1024 * 1024
        assert _bytes(worker["memswap_limit"]) == memory  # no swap on top
        assert float(worker["cpus"]) >= settings.sandbox_cpus


def test_instances_carry_the_settings_they_need(
    services: dict[str, dict[str, Any]],
) -> None:
    fields = set(Settings.model_fields)
    for name in INSTANCES:
        db_env = _env(services[f"{name}-db"])
        for role in ("api", "worker"):
            env = _env(services[f"{name}-{role}"])
            missing = [key for key in SETTINGS_EVERY_PROCESS_NEEDS if key not in env]
            assert not missing, f"{name}-{role} lacks {missing}"
            unknown = [
                key
                for key in env
                if key.startswith("FEDAGENT_") and key[len("FEDAGENT_") :].lower() not in fields
            ]
            assert not unknown, f"{name}-{role} sets variables no setting reads: {unknown}"
            assert env["FEDAGENT_INSTANCE_NAME"] == name
            assert env["FEDAGENT_TEMPORAL_NAMESPACE"] == name
            assert env["FEDAGENT_TEMPORAL_ADDRESS"] == "temporal:7233"
            assert env["FEDAGENT_LOG_FORMAT"] == "json"
            assert env["FEDAGENT_PUBLIC_URL"] == f"http://{name}-api:8000"
            # Its own database, with that database's user and name.
            url = env["FEDAGENT_DATABASE_URL"]
            assert f"@{name}-db:5432/{db_env['POSTGRES_DB']}" in url
            assert url.startswith(f"postgresql://{db_env['POSTGRES_USER']}:")
            Settings(**{k[len("FEDAGENT_") :].lower(): v for k, v in env.items()})
        worker_env = _env(services[f"{name}-worker"])
        port = worker_env["FEDAGENT_METRICS_PORT"]
        assert worker_env["FEDAGENT_METRICS_HOST"] == "0.0.0.0"
        assert f":{port}/metrics" in " ".join(services[f"{name}-worker"]["healthcheck"]["test"])
        assert "/readyz" in " ".join(services[f"{name}-api"]["healthcheck"]["test"])


def test_init_creates_every_namespace_and_search_attribute(
    services: dict[str, dict[str, Any]],
) -> None:
    init = services["temporal-init"]
    assert init["image"].startswith("temporalio/admin-tools:")
    env = _env(init)
    assert env["FEDAGENT_NAMESPACES"].split() == list(INSTANCES)
    attributes = dict(item.split("=") for item in env["FEDAGENT_SEARCH_ATTRIBUTES"].split())
    assert attributes == SEARCH_ATTRIBUTES


def test_mounted_files_exist(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = str(volume).split(":", 1)[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
    dynamic = _env(services["temporal"])["DYNAMIC_CONFIG_FILE_PATH"]
    config = ROOT / "deploy/temporal/dynamicconfig" / Path(dynamic).name
    assert yaml.safe_load(config.read_text())["frontend.enableUpdateWorkflowExecution"]


def test_dockerfile_builds_fedagent_as_a_non_root_user_with_bubblewrap() -> None:
    text = (ROOT / "Dockerfile").read_text()
    # Debian 12, whose python3 is 3.11; tests/test_image.py builds it on a base made here.
    assert re.search(r"^ARG BASE_IMAGE=debian:bookworm-slim$", text, re.M)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
    assert re.search(r"apt-get install[^&]*\bbubblewrap\b", text)  # up to the next &&
    assert re.search(r"pip install[^\n]* \.", text)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert '"fedagent"' in text.split("ENTRYPOINT", 1)[1]
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


async def test_init_script_against_a_real_temporal(tmp_path: Path) -> None:
    """deploy/temporal/init.sh makes namespaces and attributes; check.sh then says healthy."""
    port = free_port_block(2)
    address = f"127.0.0.1:{port}"
    temporal = temporal_binary()
    server = subprocess.Popen(
        [temporal, "server", "start-dev", "--ip", "127.0.0.1", "--port", str(port),
         "--ui-port", str(port + 1), "--headless", "--log-level", "error"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    env = {
        **os.environ,
        "PATH": f"{Path(temporal).parent}:{os.environ.get('PATH', '')}",
        "TEMPORAL_ADDRESS": address,
        "FEDAGENT_INIT_MARKER": str(tmp_path / "initialized"),
        "FEDAGENT_NAMESPACES": "alpha beta",
        "FEDAGENT_SEARCH_ATTRIBUTES": " ".join(f"{k}={v}" for k, v in SEARCH_ATTRIBUTES.items()),
    }
    deploy = ROOT / "deploy/temporal"
    init = subprocess.Popen(
        ["/bin/sh", str(deploy / "init.sh")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        # Before init is done the healthcheck fails; then it passes.
        deadline = time.monotonic() + 90
        while True:
            assert init.poll() is None, init.stdout.read() if init.stdout else ""
            check = subprocess.run(["/bin/sh", str(deploy / "check.sh")], env=env, check=False)
            if check.returncode == 0:
                break
            assert time.monotonic() < deadline, "temporal-init never became healthy"
            await asyncio.sleep(1)
        for namespace in ("alpha", "beta"):
            client = await Client.connect(address, namespace=namespace)
            listed = await client.operator_service.list_search_attributes(
                ListSearchAttributesRequest(namespace=namespace)
            )
            assert set(SEARCH_ATTRIBUTES) <= set(listed.custom_attributes)
        # Stopping the init container is a clean exit.
        init.send_signal(signal.SIGTERM)
        assert init.wait(timeout=10) == 0
    finally:
        for proc in (init, server):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if init.stdout:
            init.stdout.close()


def test_the_image_copies_every_package_the_distribution_installs() -> None:
    """`fedagent serve` in the image imports every package of the distribution (the image
    once left out `operations/`, which `api/` imports, and could not start)."""
    import tomllib

    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"
    ]["find"]["include"]
    copied = {
        line.split()[1].rstrip("/")
        for line in (ROOT / "Dockerfile").read_text().splitlines()
        if line.startswith("COPY ") and len(line.split()) == 3
    }
    assert {package.rstrip("*") for package in packages} <= copied
