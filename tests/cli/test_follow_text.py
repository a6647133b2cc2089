"""What an agent (or a hostile executor) wrote reaches the terminal as text, never as the
terminal's own control sequences."""

from __future__ import annotations

import io
from typing import Any

import pytest
from rich.console import Console

from cli.follow import transcript_lines

# Clipboard write (OSC 52), clear screen and cursor home, a window title, a carriage return
# that would let the next text overwrite what was shown.
HOSTILE = "ls \x1b]52;c;cm0gLXJmIH4=\x07\x1b[2J\x1b[H\x1b]0;owned\x1b\\\rhidden\x9b31m"

ENTRIES: list[dict[str, Any]] = [
    {"seq": 1, "kind": "assistant", "text": HOSTILE},
    {"seq": 2, "kind": "tool_call", "name": "run_command", "input": {"command": HOSTILE}},
    {"seq": 3, "kind": "tool_call", "name": HOSTILE, "input": {"path": HOSTILE}},
    {"seq": 4, "kind": "tool_result", "name": "run_command", "output": HOSTILE, "exitCode": 0},
    {"seq": 5, "kind": "tool_result", "name": "read_file", "isError": True, "output": HOSTILE},
    {"seq": 6, "kind": "truncated", "text": HOSTILE},
]


@pytest.mark.parametrize("entry", ENTRIES, ids=[str(e["seq"]) for e in ENTRIES])
def test_follow_shows_an_entrys_terminal_escapes_instead_of_obeying_them(
    entry: dict[str, Any],
) -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=400)
    for line in transcript_lines(entry):
        console.print(line)
    shown = out.getvalue()
    assert "\\x1b]52" in shown  # the agent's text is still there to read
    for obeyed in ("\x1b]", "\x1b[2J", "\x1b[H", "\x07", "\r", "\x9b"):
        assert obeyed not in shown, repr(shown)
