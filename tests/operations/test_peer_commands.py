"""The table of what a peer may ask: every command a connection can grant has its handler."""

from __future__ import annotations

from typing import get_args

from federation.models import CommandType
from operations.peer_commands import HANDLERS


def test_every_grantable_command_has_a_handler_and_no_handler_is_ungrantable() -> None:
    # agent.transcript is granted with agent.status (federation/trust.py check_grants).
    grantable = set(get_args(CommandType)) | {"agent.transcript"}
    assert set(HANDLERS) == grantable
