"""AgentRunWorkflow: the executor's side of one spawn (id `agent-run/{requester}/{agentId}`)."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, CancelledError
from temporalio.exceptions import TimeoutError as ActivityTimeout

with workflow.unsafe.imports_passed_through():
    from workflows.models import (
        ADMIT_RUN,
        AGENT_FAILED,
        AGENT_TIMED_OUT,
        FINISH_RUN,
        RUN_AGENT,
        SA_AGENT_STATE,
        TASK_INVALID,
        TERMINAL_STATES,
        AgentOutcome,
        AgentRunInput,
        AgentStatus,
        FinishRun,
        KillRequest,
        KillResult,
        RunTask,
    )

# How long after the agent's own deadline Temporal steps in if the worker could not.
TIMEOUT_GRACE = timedelta(seconds=30)
HEARTBEAT_TIMEOUT = timedelta(seconds=10)
# Retries of one try after a lost worker or a crash; agent failures are counted separately.
INFRA_ATTEMPTS = 5


@workflow.defn
class AgentRunWorkflow:
    def __init__(self) -> None:
        self._agent_id = ""
        self._state = "spawning"
        self._result: dict | None = None  # type: ignore[type-arg]
        self._error: str | None = None
        self._attempt = 0
        self._kill_requested = False
        self._run: workflow.ActivityHandle[AgentOutcome] | None = None

    @workflow.run
    async def run(self, inp: AgentRunInput) -> AgentStatus:
        self._agent_id = str(inp.envelope.get("payload", {}).get("agentId", ""))
        task: RunTask | None = None
        try:
            # Local: it only reads the store and checks a signature, no round trip needed.
            task = await workflow.execute_local_activity(
                ADMIT_RUN,
                inp,
                result_type=RunTask,
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=RetryPolicy(
                    maximum_interval=timedelta(seconds=5), maximum_attempts=20
                ),
                summary="verify signed agent.spawn and check grants",
            )
        except ActivityError as err:
            self._end("failed", error=f"refused: {err.cause or err}")

        if task is not None:
            await self._run_with_retries(task)

        requester_id = str(inp.envelope.get("senderId", ""))
        if self._agent_id and requester_id:
            await workflow.execute_activity(
                FINISH_RUN,
                FinishRun(
                    self._agent_id,
                    requester_id,
                    self._state,
                    self._result,
                    self._error,
                    self._attempt or None,
                    task.traceparent if task else str(inp.envelope.get("traceparent") or ""),
                ),
                start_to_close_timeout=timedelta(seconds=30),
                schedule_to_close_timeout=timedelta(hours=1),
                retry_policy=RetryPolicy(
                    initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=30)
                ),
                summary=f"record {self._state} and notify the requester",
            )
        await workflow.wait_condition(workflow.all_handlers_finished)
        return self.status()

    async def _run_with_retries(self, task: RunTask) -> None:
        """One try per agent attempt: 1 + options.maxRetries tries, a backoff between them."""
        for attempt in range(1, task.max_retries + 2):
            if self._kill_requested:
                self._end("killed", error="killed on request")
                return
            self._attempt = attempt
            self._set_state("running")
            self._run = workflow.start_activity(
                RUN_AGENT,
                dataclasses.replace(task, attempt=attempt),
                result_type=AgentOutcome,
                task_queue=task.agent_task_queue or None,
                start_to_close_timeout=timedelta(seconds=task.timeout_seconds) + TIMEOUT_GRACE,
                heartbeat_timeout=HEARTBEAT_TIMEOUT,
                retry_policy=RetryPolicy(
                    initial_interval=timedelta(seconds=1),
                    maximum_attempts=INFRA_ATTEMPTS,
                    non_retryable_error_types=[AGENT_FAILED, AGENT_TIMED_OUT, TASK_INVALID],
                ),
                cancellation_type=workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
                summary=f"run {task.agent_type} agent for task {task.task_id} (try {attempt})",
            )
            try:
                outcome = await self._run
                self._end("completed", result=outcome.result)
                return
            except ActivityError as err:
                state, result, error = self._classify(err)
                retry = (
                    state == "failed"
                    and isinstance(err.cause, ApplicationError)
                    and err.cause.type == AGENT_FAILED
                    and attempt <= task.max_retries
                    and not self._kill_requested
                )
                if not retry:
                    self._end(state, result, error)
                    return
                self._result, self._error = result, error
                workflow.set_current_details(f"try {attempt} failed: {error}; retrying")
                try:  # back off, but a kill ends the wait at once
                    await workflow.wait_condition(
                        lambda: self._kill_requested, timeout=timedelta(seconds=min(2**attempt, 30))
                    )
                except TimeoutError:
                    pass

    def _classify(self, err: ActivityError) -> tuple[str, dict | None, str | None]:  # type: ignore[type-arg]
        cause = err.cause
        if isinstance(cause, CancelledError) and self._kill_requested:
            return "killed", None, "killed on request"
        if isinstance(cause, ActivityTimeout):
            return "timed_out", None, "the run exceeded its timeout"
        if isinstance(cause, ApplicationError):
            details = cause.details[0] if cause.details else None
            result = details if isinstance(details, dict) else None
            if cause.type == AGENT_TIMED_OUT:
                return "timed_out", result, cause.message
            return "failed", result, cause.message
        return "failed", None, str(cause or err)

    @workflow.update
    async def kill(self, request: KillRequest) -> KillResult:
        if self._state not in TERMINAL_STATES:
            self._kill_requested = True
            if self._run is not None and not self._run.done():
                self._run.cancel()
            # Answer only once the sandbox is confirmed gone (the activity acknowledged).
            await workflow.wait_condition(lambda: self._state in TERMINAL_STATES)
        return KillResult(self._agent_id, self._state)

    @workflow.query
    def status(self) -> AgentStatus:
        return AgentStatus(
            self._agent_id, self._state, 0, None, self._result, self._error, self._attempt or None
        )

    def _set_state(self, state: str) -> None:
        self._state = state
        workflow.upsert_search_attributes([SA_AGENT_STATE.value_set(state)])
        details = f"agent **{self._agent_id}** is `{state}`"
        if self._attempt:
            details += f" (try {self._attempt})"
        workflow.set_current_details(details)

    def _end(self, state: str, result: dict | None = None, error: str | None = None) -> None:  # type: ignore[type-arg]
        if self._state in TERMINAL_STATES:
            return
        self._result = result
        self._error = error
        self._set_state(state)
