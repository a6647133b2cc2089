"""A command in a real bubblewrap sandbox sees none of the worker's environment (issue 18,
point 14): the worker holds API keys and the database URL in its environment."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from agents.sandbox.bwrap import BwrapSandbox
from tests.agents.contract import SMALL

pytestmark = pytest.mark.skipif(
    shutil.which("bwrap") is None,
    reason="bubblewrap is not installed (scripts/install-system-deps.sh installs it)",
)

SECRET = "sk-worker-secret-5b1e0c7a"


async def test_a_sandboxed_command_sees_none_of_the_workers_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDAGENT_TEST_WORKER_SECRET", SECRET)
    monkeypatch.setenv("ANTHROPIC_API_KEY", SECRET)
    monkeypatch.setenv("FEDAGENT_DATABASE_URL", f"postgresql://fedagent:{SECRET}@db/fedagent")
    sandbox = BwrapSandbox(tmp_path / "ws", SMALL)
    await sandbox.start()
    try:
        result = await sandbox.run("env")
    finally:
        await sandbox.kill()
    assert result.exit_code == 0, result.output
    names = {line.split("=", 1)[0] for line in result.output.splitlines() if "=" in line}
    assert "HOME" in names and "PATH" in names  # what the sandbox sets is there
    assert SECRET not in result.output
    for name in ("FEDAGENT_TEST_WORKER_SECRET", "ANTHROPIC_API_KEY", "FEDAGENT_DATABASE_URL"):
        assert name not in names
