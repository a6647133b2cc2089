"""One instance on many hosts: a process that cannot open the instance's keys, or whose
settings contradict the stored identity, refuses to start (real `fedagent serve` and
`fedagent worker` processes against a database of their own)."""

from __future__ import annotations

import asyncio
import base64
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
from federation.store.db import create_pool, migrate
from tests.conftest import Instance

pytestmark = pytest.mark.e2e
EXIT_REFUSED = 78
NAME = "multi"
URL = "https://multi.example.test"


@pytest.fixture
async def scratch_db(hub: Instance) -> AsyncIterator[str]:
    """A database of its own in the stack's PostgreSQL, dropped afterwards."""
    name = f"hosts_{uuid.uuid4().hex[:12]}"
    admin = await hub.db()
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url, _, query = hub.info["databaseUrl"].partition("?")
    base, _, _ = url.rpartition("/")
    yield f"{base}/{name}" + (f"?{query}" if query else "")
    admin = await hub.db()
    try:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await admin.close()


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


def _run(role: str, env: dict[str, str], out: Path) -> subprocess.Popen[bytes]:
    with open(out, "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "cli.main", role],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


async def _refused(role: str, env: dict[str, str], out: Path) -> str:
    """Run the process; it must exit with EX_CONFIG; returns what it printed."""
    proc = _run(role, env, out)
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
    proc = _run("worker", env, out)
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
