"""Agent states travel as one vocabulary: what a peer reports outside it never reaches a
workflow or the store."""

from __future__ import annotations

import pytest

from activities.federation import event_from_payload
from federation.errors import PeerResponseInvalid
from federation.states import AgentState


def test_an_executor_reporting_an_unknown_state_is_refused() -> None:
    with pytest.raises(PeerResponseInvalid, match="unknown agent state 'exploded'"):
        event_from_payload({"seq": 3, "state": "exploded"})


def test_an_executor_report_keeps_its_state_as_the_wire_string() -> None:
    event = event_from_payload({"seq": 3, "state": "timed_out", "error": "too slow"})
    assert event.state is AgentState.TIMED_OUT and event.state == "timed_out"
    assert (event.seq, event.error) == (3, "too slow")
