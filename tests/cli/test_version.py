"""`fedagent --version` says which fedagent is installed, as its packaging metadata has it."""

from __future__ import annotations

from importlib.metadata import version

import pytest

from cli.main import main


def test_version_prints_the_installed_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"fedagent {version('fedagent')}"
