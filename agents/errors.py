"""Errors of the agent runtime that end a run before the agent starts."""

from __future__ import annotations


class AgentSetupError(Exception):
    """The run could not be set up (workspace, sandbox, model choice).

    `invalid` means the task itself is at fault (a model or a repository this executor does
    not allow) and retrying cannot help; otherwise it may be the machine or the network.
    """

    def __init__(self, message: str, *, invalid: bool = False) -> None:
        super().__init__(message)
        self.invalid = invalid
