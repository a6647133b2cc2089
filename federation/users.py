"""Who is asking: a local user (an API token's name, role and workspace) and what it may see."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class User:
    name: str
    role: str
    workspace: str
    # The API token asking (None: not a token, e.g. a test's own user); what event streams
    # are counted against and re-checked by.
    token_id: uuid.UUID | None = field(default=None, compare=False)

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def actor(self) -> str:
        """How the audit log names this user."""
        return f"user:{self.name}"

    def visible(self, row: dict[str, Any] | None) -> dict[str, Any] | None:
        """The row if this user may see it: admins see all, members their workspace's."""
        if row is None or (not self.is_admin and row["workspace"] != self.workspace):
            return None
        return row
