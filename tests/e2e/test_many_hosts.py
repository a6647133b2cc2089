"""One instance on many hosts: a run whose worker dies resumes on a worker of another host
(its own data dir) with its workspace as of the last checkpoint, or is told it was lost; a
process that cannot open the instance's keys, or whose settings contradict the stored
identity, refuses to start (real `fedagent serve` and `fedagent worker` processes)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cli.devstack import DevStack
from federation.identity import ensure_identity
from federation.keystore import KeyCipher
from federation.states import TERMINAL_STATES
from federation.store import workspaces
from federation.store.db import create_pool, migrate
from tests.conftest import Instance
from tests.e2e.helpers import scratch_database, spawn_body, start_process, start_worker_on_host

pytestmark = pytest.mark.e2e
EXIT_REFUSED = 78
NAME = "multi"
URL = "https://multi.example.test"


@pytest.fixture
async def scratch_db(hub: Instance) -> AsyncIterator[str]:
    """A database of its own in the stack's PostgreSQL, dropped afterwards."""
    async with scratch_database(hub.info["databaseUrl"], "hosts") as url:
        yield url


@pytest.fixture
async def instance_db(scratch_db: str) -> AsyncIterator[tuple[str, str]]:
    """(database URL, master key) of an instance whose first API start made its signing key."""
    master = base64.b64encode(secrets.token_bytes(32)).decode()
    pool = await create_pool(scratch_db, max_size=2)
    try:
        await migrate(pool)
        cipher = KeyCipher(base64.b64decode(master))
        await ensure_identity(pool, name=NAME, public_url=URL, cipher=cipher)
    finally:
        await pool.close()
    yield scratch_db, master


def _env(stack: DevStack, database_url: str, data_dir: Path, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDAGENT_")}
    env.update(
        {
            "FEDAGENT_DATABASE_URL": database_url,
            "FEDAGENT_INSTANCE_NAME": NAME,
            "FEDAGENT_PUBLIC_URL": URL,
            "FEDAGENT_DATA_DIR": str(data_dir),
            "FEDAGENT_TEMPORAL_ADDRESS": stack.temporal_address,
            "FEDAGENT_TEMPORAL_NAMESPACE": "default",
            "FEDAGENT_TASK_QUEUE": f"hosts-{uuid.uuid4().hex[:8]}",
            "FEDAGENT_ENVIRONMENT": "dev",
            "FEDAGENT_API_HOST": "127.0.0.1",
            "FEDAGENT_API_PORT": "1",
        }
    )
    env.update(settings)
    return env


async def _refused(role: str, env: dict[str, str], out: Path) -> str:
    """Run the process; it must exit with EX_CONFIG; returns what it printed."""
    proc = start_process(role, env, out)
    deadline = time.monotonic() + 60
    while proc.poll() is None:
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise AssertionError(f"{role} kept running: {out.read_text(errors='replace')}")
        await asyncio.sleep(0.2)
    text = " ".join(out.read_text(errors="replace").split())  # rich wraps long lines
    assert proc.returncode == EXIT_REFUSED, (proc.returncode, text)
    assert "Traceback" not in text, text
    return text


async def _worker_starts(env: dict[str, str], out: Path) -> None:
    """The worker gets past its start checks and polls (then stops on SIGTERM)."""
    proc = start_process("worker", env, out)
    try:
        deadline = time.monotonic() + 60
        while "polling" not in out.read_text(errors="replace"):
            assert proc.poll() is None, out.read_text(errors="replace")
            assert time.monotonic() < deadline, out.read_text(errors="replace")
            await asyncio.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def test_a_process_without_the_instance_master_key_refuses_to_start(
    instance_db: tuple[str, str], stack: DevStack, tmp_path: Path
) -> None:
    database_url, master = instance_db
    for role in ("worker", "serve"):
        # A new host: an empty data dir and no FEDAGENT_SECRET_KEY.
        fresh = tmp_path / f"new-host-{role}"
        text = await _refused(role, _env(stack, database_url, fresh), tmp_path / f"{role}.out")
        assert "cannot open the instance's keys" in text, text
        assert "FEDAGENT_SECRET_KEY" in text, text
        # A master key, but another one.
        other = base64.b64encode(secrets.token_bytes(32)).decode()
        env = _env(stack, database_url, fresh, FEDAGENT_SECRET_KEY=other)
        text = await _refused(role, env, tmp_path / f"{role}-other.out")
        assert "cannot open the instance's keys" in text, text
    # The same data dir with the instance's master key: the worker starts.
    env = _env(stack, database_url, tmp_path / "new-host-worker", FEDAGENT_SECRET_KEY=master)
    await _worker_starts(env, tmp_path / "worker-ok.out")


async def test_a_process_whose_settings_contradict_the_identity_refuses_to_start(
    instance_db: tuple[str, str], stack: DevStack, tmp_path: Path
) -> None:
    database_url, master = instance_db
    wrong_url = "https://elsewhere.example.test"
    env = _env(
        stack, database_url, tmp_path, FEDAGENT_SECRET_KEY=master, FEDAGENT_PUBLIC_URL=wrong_url
    )
    for role in ("worker", "serve"):
        text = await _refused(role, env, tmp_path / f"{role}.out")
        assert wrong_url in text and URL in text and "FEDAGENT_PUBLIC_URL" in text, text
    env_name = _env(
        stack, database_url, tmp_path, FEDAGENT_SECRET_KEY=master, FEDAGENT_INSTANCE_NAME="other"
    )
    text = await _refused("worker", env_name, tmp_path / "name.out")
    assert "'other'" in text and f"'{NAME}'" in text and "FEDAGENT_INSTANCE_NAME" in text, text
    # Nothing was rewritten by the processes that refused.
    pool = await create_pool(database_url, max_size=1)
    try:
        row = await pool.fetchrow("SELECT name, configured_name, public_url FROM instance")
        assert tuple(row) == (NAME, NAME, URL)
        # The admin changes the identity on purpose; then processes with the new URL start.
        done = subprocess.run(
            [sys.executable, "-m", "cli.main", "set-identity"],
            env=env,
            capture_output=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        row = await pool.fetchrow("SELECT name, configured_name, public_url FROM instance")
        assert tuple(row) == (NAME, NAME, wrong_url)
    finally:
        await pool.close()
    await _worker_starts(env, tmp_path / "worker-ok.out")
    await _refused("worker", {**env, "FEDAGENT_PUBLIC_URL": URL}, tmp_path / "old-url.out")


# --- a run moves to another host --------------------------------------------------------------


async def _sleeping(hub: Instance, agent_id: str, command: str) -> None:
    deadline = time.monotonic() + 90
    while True:
        agent = (await hub.call("GET", f"/agents/{agent_id}")).json()
        if (agent.get("progress") or {}).get("command") == command:
            return
        assert time.monotonic() < deadline, agent
        await asyncio.sleep(0.2)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _move_run(
    hub: Instance, hub_spoke: str, stack: DevStack, tmp_path: Path, first_settings: dict[str, str]
) -> dict:
    """`echo one`, a sleep, `echo two`: the sleep's worker (host A) is killed -9 and the retry
    runs on host B. Returns the run as the requester sees it at its end."""
    stack.stop_workers("spoke")  # the run starts on host A, a worker of this test
    host_a = start_worker_on_host(
        stack, "spoke", tmp_path / "host-a", tmp_path / "a.out", **first_settings
    )
    host_b: subprocess.Popen | None = None
    try:
        body = spawn_body(
            hub_spoke,
            "$ echo one > a.txt\n$ sleep 15\n$ echo two > b.txt",
            task_id=f"move-{uuid.uuid4().hex[:6]}",
            timeout=300,
        )
        assert (await hub.call("POST", "/agents/spawn", json=body)).status_code == 202
        await _sleeping(hub, body["agentId"], "sleep 15")
        host_b = start_worker_on_host(stack, "spoke", tmp_path / "host-b", tmp_path / "b.out")
        await asyncio.sleep(3)  # host B polls
        host_a.send_signal(signal.SIGKILL)
        host_a.wait()
        agent = await hub.wait_agent(body["agentId"], timeout=240)
        # The retry ran on host B's disk.
        assert list((tmp_path / "host-b" / "workspaces").glob(f"*/*/{body['agentId']}"))
        return agent
    finally:
        host_a.kill()
        host_a.wait()
        if host_b is not None:
            _stop(host_b)
        stack.start_worker("spoke")


async def test_a_run_resumed_on_another_host_keeps_the_edits_of_its_first_host(
    hub: Instance, spoke: Instance, hub_spoke: str, stack: DevStack, tmp_path: Path
) -> None:
    agent = await _move_run(hub, hub_spoke, stack, tmp_path, {})
    assert agent["state"] == "completed", agent
    result = agent["result"]
    assert sorted(result["changedFiles"]) == ["a.txt", "b.txt"], result
    assert "restored" in result["workspace"]["note"], result["workspace"]
    # The run has ended: its snapshots' files go, once no other run holds them.
    agent_id = uuid.UUID(agent["agentId"])
    pool = await create_pool(spoke.info["databaseUrl"], max_size=1)
    try:
        [ref] = await pool.fetch(
            "SELECT workspace::text FROM agent_conversations WHERE agent_id = $1", agent_id
        )
        manifest = json.loads(ref["workspace"])["sha256"]
        held = "SELECT count(*) FROM workspace_run_blobs WHERE agent_id = $1"
        assert await pool.fetchval(held, agent_id) > 1
        await workspaces.forget_ended(pool, TERMINAL_STATES)
        assert await pool.fetchval(held, agent_id) == 0
        assert not await pool.fetchval(
            "SELECT count(*) FROM workspace_blobs WHERE sha256 = $1", manifest
        )
    finally:
        await pool.close()


async def test_a_run_whose_workspace_was_not_saved_is_told_it_was_lost(
    hub: Instance, spoke: Instance, hub_spoke: str, stack: DevStack, tmp_path: Path
) -> None:
    # Host A saves no snapshot (0 MiB): the retry on host B cannot have the first edit.
    agent = await _move_run(
        hub, hub_spoke, stack, tmp_path, {"FEDAGENT_WORKSPACE_SNAPSHOT_MB": "0"}
    )
    assert agent["state"] == "completed", agent
    result = agent["result"]
    assert result["changedFiles"] == ["b.txt"], result
    assert "LOST" in result["workspace"]["note"], result["workspace"]
    rows = await spoke.fetch(
        "SELECT entry::text FROM agent_transcript WHERE agent_id = $1 ORDER BY seq",
        uuid.UUID(agent["agentId"]),
    )
    entries = [json.loads(r["entry"]) for r in rows]
    told = [e["text"] for e in entries if e.get("kind") == "workspace"]
    assert told and "LOST" in told[0], entries
