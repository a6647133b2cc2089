"""AgentRunWorkflow: the executor's side of one spawn (id `agent-run/{requester}/{agentId}`)."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import timedelta
from typing import TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, CancelledError, TimeoutType
from temporalio.exceptions import TimeoutError as ActivityTimeout

with workflow.unsafe.imports_passed_through():
    from activities.federation import FederationActivities
    from workflows.models import (
        AGENT_FAILED,
        AGENT_KILLED,
        AGENT_TIMED_OUT,
        LOCAL_REQUESTER,
        RUN_AGENT,
        SA_AGENT_STATE,
        STORE_REFUSED,
        TASK_INVALID,
        TERMINAL_STATES,
        AgentOutcome,
        AgentRunInput,
        AgentState,
        AgentStatus,
        FinishRun,
        KillRequest,
        KillResult,
        RecordedFinal,
        RunTask,
    )

T = TypeVar("T")

# How long after the agent's own deadline Temporal steps in if the worker could not.
TIMEOUT_GRACE = timedelta(seconds=30)
# Retries of one try after a lost worker or a crash; agent failures are counted separately.
INFRA_ATTEMPTS = 5
# How long the admission of a spawn waits for a database that is away (FEDAGENT_STORE_OUTAGE_WAIT
# is 300 s by default).
ADMIT_PATIENCE = timedelta(minutes=10)
# A try is lost once this many heartbeats in a row are missing.
MISSED_HEARTBEATS = 4
# A store that is away is waited for; a store that refuses the record (STORE_REFUSED: a value
# it can never take) is not asked again, so the run closes instead of staying open for ever.
STORE_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=200),
    maximum_interval=timedelta(seconds=5),
    non_retryable_error_types=[STORE_REFUSED],
)


def _cause_text(err: BaseException) -> str:
    cause = err.cause if isinstance(err, ActivityError) and err.cause else err
    return str(cause)


async def past_cancel(handle: asyncio.Future[T]) -> T:
    """Await `handle` to its end even if the workflow is cancelled meanwhile (the cancel of a
    run that has already ended changes nothing)."""
    while True:
        try:
            return await asyncio.shield(handle)
        except asyncio.CancelledError:
            if handle.cancelled():
                raise
            workflow.logger.info("cancel after the run ended: its final state is kept")


def _is_heartbeat_timeout(err: BaseException | None) -> bool:
    """A try whose workers stopped heartbeating (crashed, killed, cut off), however wrapped."""
    while err is not None:
        if isinstance(err, ActivityTimeout) and err.type == TimeoutType.HEARTBEAT:
            return True
        err = err.__cause__
    return False


@workflow.defn
class AgentRunWorkflow:
    def __init__(self) -> None:
        self._agent_id = ""
        self._state = AgentState.SPAWNING
        self._result: dict | None = None  # type: ignore[type-arg]
        self._error: str | None = None
        self._attempt = 0
        self._kill_requested = False
        self._kill_reason = "killed on request"
        self._kill_answered = False
        self._run: workflow.ActivityHandle[AgentOutcome] | None = None
        self._seq = 0
        self._recorded = False

    @workflow.run
    async def run(self, inp: AgentRunInput) -> AgentStatus:
        local = inp.local is not None  # a run for this instance's own user: no peer to tell
        spawn = inp.local if inp.local is not None else inp.envelope.get("payload", {})
        self._agent_id = str(spawn.get("agentId", ""))
        requester_id = LOCAL_REQUESTER if local else str(inp.envelope.get("senderId", ""))
        task, cancelled = await self._admit(inp)
        if task is not None:
            try:
                await self._tries(task)
            except asyncio.CancelledError:
                # Cancelling the workflow (UI, CLI) is a kill; the activity was cancelled with
                # it and confirmed (WAIT_CANCELLATION_COMPLETED), so the sandbox is gone.
                cancelled = True
                self._end(AgentState.KILLED, error="killed: workflow cancelled")

        traceparent = task.traceparent if task else str(inp.envelope.get("traceparent") or "")
        if self._agent_id and requester_id:
            final = await self._record_final(requester_id, traceparent)
            if cancelled and self._state != AgentState.KILLED:
                cancelled = False  # the run had ended otherwise before the cancel: it closes so
        self._recorded = True
        if self._agent_id and requester_id and not local and not self._told_by_kill_answer():
            await self._notify_requester(final, inp.notify_deadline_seconds)
        await workflow.wait_condition(workflow.all_handlers_finished)
        if cancelled:
            raise asyncio.CancelledError("killed: workflow cancelled")
        if self._state in (AgentState.FAILED, AgentState.TIMED_OUT):
            # Recorded and told; the Temporal UI shows it Failed with the agent's reason.
            raise ApplicationError(
                self._error or self._state,
                type=AGENT_TIMED_OUT if self._state == AgentState.TIMED_OUT else AGENT_FAILED,
                non_retryable=True,
            )
        return self.status()

    async def _admit(self, inp: AgentRunInput) -> tuple[RunTask | None, bool]:
        """The run's task, if its signed spawn is verified and granted (else the run ends
        failed), and whether the workflow was cancelled meanwhile."""
        try:
            task = await workflow.execute_local_activity_method(
                FederationActivities.admit_run,
                inp,
                start_to_close_timeout=timedelta(seconds=30),
                # Refusals fail at once (non-retryable); a database away is waited out for as
                # long as a running agent's writes wait for it, and longer.
                schedule_to_close_timeout=ADMIT_PATIENCE,
                retry_policy=RetryPolicy(maximum_interval=timedelta(seconds=5)),
                summary="verify signed agent.spawn and check grants",
            )
        except asyncio.CancelledError:
            self._end(AgentState.KILLED, error="workflow cancelled before the run started")
            return None, True
        except (ActivityError, ApplicationError) as err:
            self._end(AgentState.FAILED, error=f"refused: {_cause_text(err)}")
            return None, False
        return task, False

    async def _record_final(self, requester_id: str, traceparent: str) -> FinishRun:
        """Record the run's final state: the store keeps the first it is given, which this
        workflow then takes as its own."""
        final = FinishRun(
            agent_id=self._agent_id,
            requester_id=requester_id,
            state=self._state,
            result=self._result,
            error=self._error,
            attempt=self._attempt or None,
            traceparent=traceparent,
        )
        # Record first: the run's outcome is kept whatever happens to the notification.
        # The run has ended: a cancel arriving now has nothing left to kill and must not
        # stop the record (the result would be lost) nor the notification.
        kept = await past_cancel(
            workflow.start_local_activity_method(
                FederationActivities.record_run_final,
                final,
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=STORE_RETRY,
                summary=f"record {self._state}",
            )
        )
        # The store keeps the first final it was given (a record run again after this
        # task failed, a worker crash): this workflow takes it as its own.
        self._adopt(kept)
        return dataclasses.replace(final, state=self._state, result=self._result, error=self._error)

    async def _notify_requester(self, final: FinishRun, deadline_seconds: float) -> None:
        try:  # best effort: the requester long-polls agent.status when this is lost
            await past_cancel(
                workflow.start_activity_method(
                    FederationActivities.notify_requester,
                    final,
                    start_to_close_timeout=timedelta(seconds=30),
                    schedule_to_close_timeout=timedelta(seconds=deadline_seconds),
                    retry_policy=RetryPolicy(
                        initial_interval=timedelta(seconds=1),
                        maximum_interval=timedelta(seconds=30),
                    ),
                    summary=f"tell the requester it is {self._state}",
                )
            )
        except ActivityError as err:
            workflow.logger.warning("requester not told (it will ask): %s", _cause_text(err))

    def _told_by_kill_answer(self) -> bool:
        """The requester's own kill ended the run: the kill's answer tells it the final state
        (an event as well would race that answer)."""
        return self._state == AgentState.KILLED and self._kill_answered

    async def _tries(self, task: RunTask) -> None:
        """1 + options.maxRetries tries; each try's timeout is absolute across the
        infrastructure retries of that try (lost workers), and a kill ends waits at once."""
        heartbeat_timeout = timedelta(seconds=max(2.0, task.heartbeat_interval * MISSED_HEARTBEATS))
        for attempt in range(1, task.max_retries + 2):
            if self._kill_requested:
                self._end(AgentState.KILLED, error=self._kill_reason)
                return
            self._attempt = attempt
            self._set_state(AgentState.RUNNING)
            self._run = self._start_try(task, attempt, heartbeat_timeout)
            try:
                outcome = await self._run
                self._end(AgentState.COMPLETED, result=outcome.result)
                return
            except ActivityError as err:
                if isinstance(err.cause, CancelledError) and not self._kill_requested:
                    raise asyncio.CancelledError() from err  # the workflow itself was cancelled
                state, result, error = self._classify(err, attempt)
                retry = (
                    state == AgentState.FAILED
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
                try:
                    await workflow.wait_condition(
                        lambda: self._kill_requested, timeout=timedelta(seconds=min(2**attempt, 30))
                    )
                except TimeoutError:
                    pass

    def _start_try(
        self, task: RunTask, attempt: int, heartbeat_timeout: timedelta
    ) -> workflow.ActivityHandle[AgentOutcome]:
        """Start try `attempt` of the agent activity, its timeout absolute across the
        infrastructure retries of that try (lost workers)."""
        budget = timedelta(seconds=task.timeout_seconds)
        deadline = workflow.now() + budget
        # By name: the agent activity's module brings the agent runtime and the model SDK
        # with it, which every importer of this workflow (the API) would then load.
        return workflow.start_activity(
            RUN_AGENT,
            dataclasses.replace(task, attempt=attempt, deadline=deadline.isoformat()),
            result_type=AgentOutcome,
            task_queue=task.agent_task_queue or None,
            start_to_close_timeout=budget + TIMEOUT_GRACE,
            schedule_to_close_timeout=budget + TIMEOUT_GRACE,
            heartbeat_timeout=heartbeat_timeout,
            retry_policy=RetryPolicy(
                initial_interval=timedelta(seconds=1),
                maximum_attempts=INFRA_ATTEMPTS,
                non_retryable_error_types=[
                    AGENT_FAILED,
                    AGENT_TIMED_OUT,
                    TASK_INVALID,
                    AGENT_KILLED,
                ],
            ),
            cancellation_type=workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
            summary=f"run {task.agent_type} agent for task {task.task_id} (try {attempt})",
        )

    def _classify(
        self, err: ActivityError, attempt: int
    ) -> tuple[AgentState, dict | None, str | None]:  # type: ignore[type-arg]
        cause = err.cause
        # A kill asked of a try whose worker is gone ends by the heartbeat timeout: the
        # sandbox died with its worker (--die-with-parent), so the kill is done all the same.
        if self._kill_requested and (
            isinstance(cause, CancelledError)
            or (isinstance(cause, ApplicationError) and cause.type == AGENT_KILLED)
            or _is_heartbeat_timeout(cause)
        ):
            return AgentState.KILLED, None, self._kill_reason
        if isinstance(cause, ApplicationError) and cause.type == AGENT_KILLED:
            return AgentState.KILLED, None, cause.message
        if _is_heartbeat_timeout(cause):
            return (
                AgentState.FAILED,
                None,
                f"lost workers: try {attempt} stopped heartbeating on every worker that ran it",
            )
        if isinstance(cause, ActivityTimeout):
            return AgentState.TIMED_OUT, None, "the run exceeded its timeout"
        if isinstance(cause, ApplicationError):
            details = cause.details[0] if cause.details else None
            result = details if isinstance(details, dict) else None
            if cause.type == AGENT_TIMED_OUT:
                return AgentState.TIMED_OUT, result, cause.message
            return AgentState.FAILED, result, cause.message
        return AgentState.FAILED, None, str(cause or err)

    @workflow.update
    async def kill(self, request: KillRequest) -> KillResult:
        if self._state not in TERMINAL_STATES:
            self._kill_requested = True
            self._kill_reason = request.reason or "killed on request"
            self._kill_answered = request.answered
            if self._run is not None and not self._run.done():
                self._run.cancel()
        # The answer waits for the final state to be recorded (sandbox gone).
        await workflow.wait_condition(lambda: self._recorded)
        return KillResult(
            agent_id=self._agent_id,
            state=self._state,
            seq=self._seq,
            result=self._result,
            error=self._error,
        )

    @workflow.query
    def status(self) -> AgentStatus:
        return AgentStatus(
            agent_id=self._agent_id,
            state=self._state,
            seq=self._seq,
            result=self._result,
            error=self._error,
            attempt=self._attempt or None,
        )

    def _set_state(self, state: AgentState) -> None:
        self._state = state
        workflow.upsert_search_attributes([SA_AGENT_STATE.value_set(state)])
        details = f"agent **{self._agent_id}** is `{state}`"
        if self._attempt:
            details += f" (try {self._attempt})"
        workflow.set_current_details(details)

    def _adopt(self, kept: RecordedFinal) -> None:
        """Take the final the store keeps as this workflow's."""
        self._seq = kept.seq
        self._error = kept.error
        self._result = kept.result if kept.result is not None else self._result
        if kept.state != self._state:
            self._set_state(kept.state)

    def _end(self, state: AgentState, result: dict | None = None, error: str | None = None) -> None:  # type: ignore[type-arg]
        if self._state in TERMINAL_STATES:
            return
        self._result = result
        self._error = error
        self._set_state(state)
