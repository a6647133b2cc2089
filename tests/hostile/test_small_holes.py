"""The small ones (issue 12, point 11): tokens expire and are revoked, secrets files 0600,
workspaces 0700, deep JSON is a 422, Temporal's words stay inside, compose keeps to loopback."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import yaml

from cli.devstack import DevStack
from tests.conftest import Instance

ROOT = Path(__file__).resolve().parents[2]


async def test_a_revoked_token_stops_working_at_once(hub: Instance) -> None:
    made = await hub.call("POST", "/tokens", json={"name": "hostile", "role": "member"})
    assert made.status_code == 201, made.text
    token, token_id = made.json()["token"], made.json()["id"]
    as_member = {"Authorization": f"Bearer {token}"}
    assert (await hub.call("GET", "/agents", headers=as_member)).status_code == 200
    listed = (await hub.call("GET", "/tokens")).json()
    assert {t["id"]: t["state"] for t in listed}[token_id] == "active"
    assert all("token" not in t for t in listed)
    revoked = await hub.call("DELETE", f"/tokens/{token_id}")
    assert revoked.status_code == 200 and revoked.json()["state"] == "revoked"
    refused = await hub.call("GET", "/agents", headers=as_member)
    assert refused.status_code == 401
    assert refused.json()["code"] == "unauthenticated"
    missing = await hub.call("DELETE", "/tokens/00000000-0000-0000-0000-000000000000")
    assert missing.status_code == 404


async def test_an_expired_token_is_refused(hub: Instance) -> None:
    made = await hub.call("POST", "/tokens", json={"name": "brief", "expiresIn": 60})
    token, token_id = made.json()["token"], made.json()["id"]
    conn = await hub.db()
    try:  # an hour later
        await conn.execute(
            "UPDATE api_tokens SET expires_at = now() - interval '1 second' WHERE id = $1::uuid",
            token_id,
        )
    finally:
        await conn.close()
    response = await hub.call("GET", "/agents", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 401
    states = {t["id"]: t["state"] for t in (await hub.call("GET", "/tokens")).json()}
    assert states[token_id] == "expired"


def test_token_list_and_revoke_from_the_cli(hub: Instance, tmp_path: Path) -> None:
    env = {**os.environ, "FEDAGENT_DATABASE_URL": hub.info["databaseUrl"]}
    fedagent = [sys.executable, "-m", "cli.main"]
    token = subprocess.run(
        [*fedagent, "token", "create", "--name", "cli-hostile", "--expires-in-days", "1"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout.strip()
    rows = json.loads(
        subprocess.run(
            [*fedagent, "token", "list", "--json"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        ).stdout
    )
    mine = [r for r in rows if r["name"] == "cli-hostile"]
    assert mine and mine[-1]["expiresAt"] is not None
    subprocess.run(
        [*fedagent, "token", "revoke", mine[-1]["id"]],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    assert token.startswith("fa_")


async def test_revoked_token_is_refused_by_the_api_after_cli_revoke(hub: Instance) -> None:
    rows = (await hub.call("GET", "/tokens")).json()
    revoked = [r for r in rows if r["name"] == "cli-hostile"]
    assert revoked and revoked[-1]["state"] == "revoked"


def test_instances_file_is_created_private(tmp_path: Path) -> None:
    os.umask(0o022)
    stack = DevStack([], tmp_path)
    stack.write_instances_file()
    mode = stat.S_IMODE((tmp_path / "instances.json").stat().st_mode)
    assert mode == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["instances.json"]


async def test_deeply_nested_json_is_a_422(spoke: Instance) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    for path in ("/api/v1/federation/incoming/command", "/api/v1/federation/connections"):
        response = await spoke.http.post(
            f"{spoke.url}{path}",
            content=deep,
            headers={**spoke.auth, "content-type": "application/json"},
        )
        assert response.status_code == 422, (path, response.text)
        assert response.headers["content-type"] == "application/problem+json"


def test_compose_publishes_temporal_only_on_loopback_and_needs_passwords() -> None:
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for name, service in doc["services"].items():
        if "temporal" not in name:
            continue
        for port in service.get("ports") or []:
            text = str(port["published"] if isinstance(port, dict) else port)
            host_ip = port.get("host_ip") if isinstance(port, dict) else None
            assert host_ip == "127.0.0.1" or text.startswith("127.0.0.1:"), (name, port)
    text = (ROOT / "docker-compose.yml").read_text()
    assert "_PASSWORD:-" not in text
    for name in ("HUB_DB_PASSWORD", "SPOKE_DB_PASSWORD", "TEMPORAL_DB_PASSWORD"):
        assert "${" + name + ":?" in text


def test_temporal_errors_are_not_echoed_to_callers() -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from temporalio.service import RPCError, RPCStatusCode

    from api import problems

    app = FastAPI()
    problems.install(app)

    @app.get("/boom")
    async def boom() -> None:
        raise RPCError(
            "Namespace fedagent-secret-ns is not found at 10.1.2.3:7233",
            RPCStatusCode.UNAVAILABLE,
            b"",
        )

    response = TestClient(app).get("/boom")
    assert response.status_code == 503
    assert response.json()["code"] == "temporal_unavailable"
    assert "10.1.2.3" not in response.text and "secret-ns" not in response.text
