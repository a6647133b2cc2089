"""`fedagent doctor` on a machine where things are wrong: it names each problem and its fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import free_port_block

ROOT = Path(__file__).resolve().parents[2]


def doctor(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FEDAGENT_")}
    return subprocess.run(
        [sys.executable, "-m", "cli.main", "doctor", *args],
        cwd=ROOT,
        env={**clean, "COLUMNS": "200", "NO_COLOR": "1", **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_doctor_names_what_is_unreachable_or_unsafe_and_how_to_fix_it(tmp_path: Path) -> None:
    closed = free_port_block(2)
    key = tmp_path / "secrets" / "local.key"
    key.parent.mkdir()
    key.write_text("QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWY=\n")
    key.chmod(0o644)
    run = doctor(
        {
            "FEDAGENT_TEMPORAL_ADDRESS": f"127.0.0.1:{closed}",
            "FEDAGENT_DATABASE_URL": f"postgresql://nobody@127.0.0.1:{closed + 1}/none",
            "FEDAGENT_DATA_DIR": str(tmp_path),
        }
    )
    assert run.returncode == 1, run.stdout + run.stderr
    lines = run.stdout.splitlines()

    def finding(name: str) -> str:
        return next(line for line in lines if f" {name} " in line)

    assert "✗" in finding("temporal") and "cannot reach" in finding("temporal")
    assert "✗" in finding("postgresql") and "cannot connect" in finding("postgresql")
    assert "✗" in finding("master key") and "readable by others" in finding("master key")
    fixes = run.stdout.split("└", 1)[1]
    assert "FEDAGENT_TEMPORAL_ADDRESS" in fixes
    assert "FEDAGENT_DATABASE_URL" in fixes
    assert f"chmod 600 {key}" in fixes
    assert "some checks failed" in run.stdout


def test_doctor_refuses_half_a_tls_configuration(tmp_path: Path) -> None:
    cert = tmp_path / "client.pem"
    cert.write_text("not a certificate")
    run = doctor({"FEDAGENT_TEMPORAL_TLS_CERT": str(cert), "FEDAGENT_DATA_DIR": str(tmp_path)})
    assert run.returncode == 1
    assert "FEDAGENT_TEMPORAL_TLS_KEY" in run.stdout


def test_doctor_lists_the_tools_an_agent_finds_in_its_sandbox(tmp_path: Path) -> None:
    closed = free_port_block(2)
    run = doctor(
        {
            "FEDAGENT_TEMPORAL_ADDRESS": f"127.0.0.1:{closed}",
            "FEDAGENT_DATABASE_URL": f"postgresql://nobody@127.0.0.1:{closed + 1}/none",
            "FEDAGENT_DATA_DIR": str(tmp_path),
            "FEDAGENT_SANDBOX": "bwrap",
        },
        "--json",
    )
    checks = {c["name"]: c for c in json.loads(run.stdout)}
    toolchain = checks["sandbox toolchain"]
    assert "python3: /usr/bin/python3 (Python 3" in toolchain["detail"], toolchain
    assert "git: /usr/bin/git (git version" in toolchain["detail"]
    assert "pytest" in toolchain["detail"]
    if "pytest: not found" in toolchain["detail"]:
        assert toolchain["status"] == "warn"
        assert "FEDAGENT_SANDBOX_RO_PATHS" in toolchain["fix"]


def test_doctor_says_which_run_limits_the_sandbox_cannot_hold_and_how_to_fix_it(
    tmp_path: Path,
) -> None:
    closed = free_port_block(2)
    base = {
        "FEDAGENT_TEMPORAL_ADDRESS": f"127.0.0.1:{closed}",
        "FEDAGENT_DATABASE_URL": f"postgresql://nobody@127.0.0.1:{closed + 1}/none",
        "FEDAGENT_DATA_DIR": str(tmp_path),
    }
    # No writable cgroup (as for a worker that is not root): per process only, a warning.
    run = doctor(
        {**base, "FEDAGENT_SANDBOX": "bwrap", "FEDAGENT_SANDBOX_CGROUPS": "false"}, "--json"
    )
    limits = {c["name"]: c for c in json.loads(run.stdout)}["sandbox limits"]
    assert limits["status"] == "warn", limits
    assert "memory limit" in limits["detail"] and "per process only" in limits["detail"]
    assert "not enforced" not in limits["detail"]  # processes are capped all the same
    assert "pids_limit" in limits["fix"] and "cgroup" in limits["fix"]
    # A sandbox that enforces none of them fails the check.
    run = doctor({**base, "FEDAGENT_SANDBOX": "process"}, "--json")
    limits = {c["name"]: c for c in json.loads(run.stdout)}["sandbox limits"]
    assert limits["status"] == "fail", limits
    assert "processes limit (256) is not enforced" in limits["detail"]
