"""Around every agent run: a kill reaches the sandbox at once, and a try's deadline is absolute.

Temporal delivers an activity's cancellation in the answer to a heartbeat, so a kill would wait
for the next heartbeat to leave the throttle window. The executor's API also sends a NOTIFY on
`fedagent_kill` when it accepts a kill; the worker running that agent stops it at once and the
activity ends `AgentKilled` (the workflow records `killed` as for a cancellation). The try's
deadline (`RunTask.deadline`, fixed by the workflow) holds across infrastructure retries: a retry
after a lost worker gets only what is left of it.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError
from temporalio.worker import (
    ActivityInboundInterceptor,
    ExecuteActivityInput,
    Interceptor,
)

from federation.store import notifications
from workflows.models import AGENT_KILLED, AGENT_TIMED_OUT, RUN_AGENT, RunTask


class AgentRunInterceptor(Interceptor):
    def __init__(self, listener: notifications.Listener) -> None:
        self.listener = listener

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _AgentRunInbound(next, self.listener)


class _AgentRunInbound(ActivityInboundInterceptor):
    def __init__(self, next: ActivityInboundInterceptor, listener: notifications.Listener) -> None:
        super().__init__(next)
        self.listener = listener

    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        task = input.args[0] if input.args else None
        if activity.info().activity_type != RUN_AGENT or not isinstance(task, RunTask):
            return await super().execute_activity(input)
        remaining: float | None = None
        if task.deadline:
            end = datetime.fromisoformat(task.deadline)
            remaining = (end - datetime.now(UTC)).total_seconds()
            if remaining <= 0:
                raise _timed_out(task)
        key = notifications.agent_key("executor", task.requester_id, task.agent_id)
        await self.listener.start()
        killed = self.listener.watch(notifications.KILL, key)
        run = asyncio.ensure_future(super().execute_activity(input))
        kill = asyncio.ensure_future(killed.wait())
        try:
            done, _ = await asyncio.wait(
                {run, kill}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )
        except asyncio.CancelledError:  # Temporal cancelled it (a kill, the workflow cancelled)
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
            raise
        finally:
            kill.cancel()
            self.listener.unwatch(notifications.KILL, key, killed)
        if run in done:
            return run.result()
        run.cancel()  # the run stops its sandbox on the way out
        await asyncio.gather(run, return_exceptions=True)
        if killed.is_set():
            raise ApplicationError("killed on request", type=AGENT_KILLED, non_retryable=True)
        raise _timed_out(task)


def _timed_out(task: RunTask) -> ApplicationError:
    return ApplicationError(
        f"the run exceeded its timeout of {task.timeout_seconds} s",
        type=AGENT_TIMED_OUT,
        non_retryable=True,
    )
