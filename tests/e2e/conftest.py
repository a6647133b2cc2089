"""Fixtures of the end-to-end tests that need a connection of their own."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.conftest import Instance


@pytest.fixture
async def edge_spoke_request(edge: Instance, spoke: Instance) -> AsyncIterator[str]:
    """edge asks spoke for a connection (PENDING); whatever the test does, it ends disconnected."""
    response = await edge.call("POST", "/connections", json={"remoteUrl": spoke.url})
    assert response.status_code == 201, response.text
    connection_id: str = response.json()["connectionId"]
    try:
        yield connection_id
    finally:
        await edge.call("POST", f"/connections/{connection_id}/disconnect")
        await spoke.call("POST", f"/connections/{connection_id}/disconnect")
