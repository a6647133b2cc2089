"""The agent's transcript as the console shows it (the conversation, once the runtime keeps it)."""

from __future__ import annotations

import uuid
from typing import Any

from federation.users import User
from operations import Services


async def agent_transcript(
    services: Services, user: User, agent_id: uuid.UUID
) -> list[dict[str, Any]]:
    """Transcript entries of the run, oldest first; none yet: the runtime does not keep one.

    The agent page shows its transcript section only when this returns entries, and the live
    page appends `event: transcript` entries of the event stream to it.
    """
    return []
