"""RemoteAgentWorkflow: the requester's side of one remote spawn (id `remote-agent/{agentId}`)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    FailureError,
    WorkflowAlreadyStartedError,
)
from temporalio.exceptions import TimeoutError as FailureTimeout

from workflows.agent_run import past_cancel

with workflow.unsafe.imports_passed_through():
    from activities.a2a_peer import A2APeerActivities
    from activities.federation import FederationActivities
    from workflows.kill_delivery import KillDeliveryWorkflow
    from workflows.models import (
        AGENT_FAILED,
        AGENT_TIMED_OUT,
        SA_AGENT_STATE,
        STORE_REFUSED,
        TERMINAL_STATES,
        TRANSPORT_A2A,
        AgentEvent,
        AgentState,
        AgentStatus,
        KillDelivery,
        KillRequest,
        KillResult,
        PeerCall,
        RecordedFinal,
        RequesterFinal,
        SpawnAgentInput,
        kill_delivery_workflow_id,
    )

PEER_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=10),
)
# A store that is away is waited for; a store that refuses the record (STORE_REFUSED: a value
# it can never take) is not asked again, so the run closes instead of staying open for ever.
STORE_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=200),
    maximum_interval=timedelta(seconds=5),
    non_retryable_error_types=[STORE_REFUSED],
)


class Phase(StrEnum):
    """Where the requester's run is; a kill may arrive in any phase."""

    SPAWNING = "spawning"  # agent.spawn not yet sent, or not yet answered
    FOLLOWING = "following"  # waiting for the executor's final state (events, long-polls)
    KILLING = "killing"  # the workflow was cancelled: the executor is told to stop the run
    CONTINUING = "continuing"  # continue-as-new is due once the handlers have finished
    RECORDING = "recording"  # the final state is being written to the store
    DONE = "done"  # the final state is in the store


def _transport(
    inp: SpawnAgentInput,
) -> tuple[
    Callable[[Any, SpawnAgentInput], Awaitable[AgentEvent]],
    Callable[[Any, PeerCall], Awaitable[AgentEvent]],
    Callable[[Any, PeerCall], Awaitable[KillResult]],
    str,
]:
    """The activities that send, check and kill, as the connection's kind says at start:
    fedagent/1 (signed commands) or A2A 1.0 (SendMessage, GetTask, CancelTask)."""
    if inp.transport == TRANSPORT_A2A:
        a2a = A2APeerActivities
        return a2a.send_message, a2a.get_task, a2a.cancel_task, "A2A "
    fed = FederationActivities
    return fed.send_spawn, fed.check_status, fed.send_kill, ""


def _changed_or_done(
    run: RemoteAgentWorkflow, poll: workflow.ActivityHandle[AgentEvent]
) -> Callable[[], bool]:
    return lambda: run._changed or poll.done()


def _budget(inp: SpawnAgentInput) -> timedelta:
    """How long the run may take in all: timeout x tries + spawn deadline + grace."""
    timeout = float(inp.options.get("timeout") or 3600)
    tries = 1 + int(inp.options.get("maxRetries") or 0)
    return timedelta(
        seconds=timeout * tries + inp.spawn_deadline_seconds + inp.deadline_grace_seconds
    )


def _reason(err: FailureError) -> str:
    """The failure chain of an activity in one line: 'timeout: last try: peer_unreachable: ...'.

    A local activity's failure may come unwrapped (its ApplicationError itself)."""
    parts: list[str] = []
    cause: BaseException | None = err.cause if isinstance(err, ActivityError) else err
    while cause is not None and len(parts) < 4:
        if isinstance(cause, ApplicationError) and cause.type:
            parts.append(f"{cause.type}: {cause.message}")
        else:
            parts.append(str(cause))
        cause = cause.__cause__
    return " <- ".join(parts) or str(err)


def _retryable(err: FailureError) -> bool:
    """False when the failure says no retry can help (an ApplicationError marked so)."""
    cause: BaseException | None = err.cause if isinstance(err, ActivityError) else err
    return not (isinstance(cause, ApplicationError) and cause.non_retryable)


@workflow.defn
class RemoteAgentWorkflow:
    def __init__(self) -> None:
        self._agent_id = ""
        self._traceparent = ""
        self._state = AgentState.SPAWNING
        self._phase = Phase.SPAWNING
        self._seq = 0
        self._result: dict | None = None  # type: ignore[type-arg]
        self._error: str | None = None
        self._attempt: int | None = None
        # Set by each report that changes something: wakes the waits of `_follow`.
        self._changed = False
        # A kill was asked for: a spawn not sent yet is never sent.
        self._kill_requested = False
        # A kill answered by a local activity held the workflow task open for its round
        # trip; the workflow closes in a later task (see _close_in_a_later_task).
        self._answered_in_task = False
        # The final this side decided without the executor's word (an unconfirmed kill, its
        # own time-out, a spawn it gave up on): if the store keeps it, the executor is told by
        # a KillDeliveryWorkflow once it is recorded.
        self._tell_executor: AgentState | None = None
        # A kill this side recorded though the executor answered a state not final (the
        # workflow was cancelled): its kill is still to be delivered (see _record_final).
        self._unconfirmed_kill = False
        self._input: SpawnAgentInput | None = None
        self._poll: workflow.ActivityHandle[AgentEvent] | None = None

    @workflow.run
    async def run(self, inp: SpawnAgentInput) -> AgentStatus:
        self._input = inp
        self._agent_id = inp.agent_id
        self._traceparent = inp.traceparent
        if inp.carried is not None:
            # Continued as new: pick up what the last run knew. Signals of this run's first
            # task ran before this line and may know more: an older report changes nothing.
            carried = inp.carried
            self._apply(
                AgentEvent(
                    seq=carried.seq,
                    state=carried.state,
                    result=carried.result,
                    error=carried.error,
                    attempt=carried.attempt,
                )
            )
        deadline = (
            datetime.fromisoformat(inp.deadline) if inp.deadline else workflow.now() + _budget(inp)
        )
        cancelled = False
        try:
            await self._follow(inp, deadline)
        except asyncio.CancelledError:
            # Cancelling the workflow (UI, CLI) is a kill: the executor is told to stop the
            # run, and the answer is recorded before the workflow closes Cancelled.
            cancelled = True
            if self._poll is not None and not self._poll.done():
                self._poll.cancel()
            elif self._poll is not None:
                # Its answer came in the same workflow task as the cancel (a task run again
                # after a failure holds both): the executor's word comes first.
                self._apply_finished_poll(self._poll)
            self._phase = Phase.KILLING
            if self._state not in TERMINAL_STATES:
                try:
                    await self._kill_peer(inp)
                except ApplicationError as err:  # the executor answered a state not final
                    # Not confirmed: the record marks the kill pending and the reconciler
                    # delivers it (no child is started here, so recorded histories replay).
                    self._unconfirmed_kill = True
                    self._finish(
                        AgentState.KILLED, error=f"killed here (workflow cancelled): {err}"
                    )
        if self._answered_in_task:
            await self._close_in_a_later_task()
        if self._phase is Phase.CONTINUING and self._state not in TERMINAL_STATES:
            workflow.continue_as_new(
                dataclasses.replace(
                    inp, deadline=deadline.isoformat(), spawned=True, carried=self.status()
                )
            )
        await self._record_final(inp)
        if self._tell_executor is not None and self._state == self._tell_executor:
            await self._start_kill_delivery(inp)
        if cancelled and self._state != AgentState.KILLED:
            cancelled = False  # the run had ended otherwise before the cancel: it closes so
        if cancelled:
            raise asyncio.CancelledError("killed: workflow cancelled")
        if self._state in (AgentState.FAILED, AgentState.TIMED_OUT):
            # Recorded; now let the Temporal UI show it as the failure it is.
            raise ApplicationError(
                self._error or self._state,
                type=AGENT_TIMED_OUT if self._state == AgentState.TIMED_OUT else AGENT_FAILED,
                non_retryable=True,
            )
        return self.status()

    async def _start_kill_delivery(self, inp: SpawnAgentInput) -> None:
        """Start the delivery of the kill to the executor; it outlives this workflow."""
        start = workflow.start_child_workflow(
            KillDeliveryWorkflow.run,
            KillDelivery(agent_id=inp.agent_id, traceparent=inp.traceparent),
            id=kill_delivery_workflow_id(inp.agent_id),
            parent_close_policy=workflow.ParentClosePolicy.ABANDON,
        )
        try:
            await past_cancel(asyncio.ensure_future(start))
        except WorkflowAlreadyStartedError:
            pass  # delivered already, or being delivered

    async def _close_in_a_later_task(self) -> None:
        """An event or a cancel that arrived while the kill's local activity ran would fail
        a workflow task that also closes the workflow (an unhandled command), and Temporal
        would drop the kill's answer with it. One short timer moves the close to the next
        task; the kill is answered in this one."""
        try:
            await workflow.sleep(timedelta(milliseconds=1))
        except asyncio.CancelledError:
            pass  # the run has ended already: a cancel now changes nothing

    async def _record_final(self, inp: SpawnAgentInput) -> None:
        """Record the final state. The store keeps the first final it was given (a record run
        again, a final the ingress wrote from an event not heard here yet, a kill's answer)
        and answers it: this workflow takes it as its own."""
        self._phase = Phase.RECORDING
        # The run has ended: a cancel arriving now must not stop its record.
        kept = await past_cancel(
            workflow.start_local_activity_method(
                FederationActivities.record_requester_final,
                RequesterFinal(
                    agent_id=inp.agent_id,
                    state=self._state,
                    result=self._result,
                    error=self._error,
                    tell_executor=(
                        self._tell_executor is not None and self._state == self._tell_executor
                    )
                    or (self._unconfirmed_kill and self._state == AgentState.KILLED),
                ),
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=STORE_RETRY,
                summary=f"record final state {self._state}",
            )
        )
        self._adopt(kept)
        self._phase = Phase.DONE
        await workflow.wait_condition(workflow.all_handlers_finished)

    def _adopt(self, kept: RecordedFinal) -> None:
        """Take the final the store keeps as this workflow's."""
        changed = kept.state != self._state
        self._state, self._error = kept.state, kept.error
        self._result = kept.result if kept.result is not None else self._result
        self._seq = max(self._seq, kept.seq)
        if changed:
            self._set_state_attribute()

    def _apply_finished_poll(self, poll: workflow.ActivityHandle[AgentEvent]) -> None:
        if poll.cancelled() or poll.exception() is not None:
            return
        self._apply(poll.result())

    async def _follow(self, inp: SpawnAgentInput, deadline: datetime) -> None:
        """Send the spawn, then follow the run to a final state (or to continuing as new)."""
        if not inp.spawned:
            await asyncio.sleep(0)  # a kill delivered with the start runs first
            if self._kill_requested:
                self._finish(AgentState.KILLED, error="killed before the spawn was sent")
            else:
                await self._send_spawn(inp)
        self._phase = Phase.FOLLOWING
        # Events (signals) bring each state change at once. Only after a quiet spell, on a
        # durable timer (no activity slot, no connection held), does one short status check
        # ask the executor, for an event that was lost; the spell doubles each time a check
        # finds nothing new, so a run held for hours costs a check every few minutes.
        first_spell = inp.poll_after_quiet_seconds or 1.0
        spell = first_spell
        while self._state not in TERMINAL_STATES:
            if self._continue_as_new_due(inp):
                self._phase = Phase.CONTINUING
                await workflow.wait_condition(workflow.all_handlers_finished)
                return  # the caller continues as new unless a handler ended the run
            remaining = (deadline - workflow.now()).total_seconds()
            if remaining <= 0:
                self._tell_executor = AgentState.TIMED_OUT
                self._finish(
                    AgentState.TIMED_OUT,
                    error=f"no final state from {inp.peer_name} within"
                    f" {_budget(inp).total_seconds():.0f} s (timeout x tries + spawn deadline"
                    " + grace)",
                )
                break
            self._changed = False
            try:
                await workflow.wait_condition(lambda: self._changed, timeout=min(spell, remaining))
                spell = first_spell  # news: look again at the state, the deadline, continue-as-new
                continue
            except TimeoutError:
                pass
            # The quiet spell may have run into the deadline: the loop ends the run then.
            remaining = (deadline - workflow.now()).total_seconds()
            if remaining > 0:
                news = await self._check_status(inp, remaining)
                spell = first_spell if news else min(spell * 2, inp.status_check_max_seconds)

    async def _check_status(self, inp: SpawnAgentInput, remaining: float) -> bool:
        """One short agent.status; True when it (or an event meanwhile) changed the state."""
        known = self._state
        self._changed = False
        check = self._poll = workflow.start_activity_method(
            _transport(inp)[1],
            PeerCall(
                agent_id=inp.agent_id,
                connection_id=inp.connection_id,
                peer_timeout_seconds=inp.peer_timeout_seconds,
                traceparent=inp.traceparent,
            ),
            start_to_close_timeout=timedelta(seconds=inp.peer_timeout_seconds + 5),
            schedule_to_close_timeout=timedelta(seconds=remaining),
            retry_policy=PEER_RETRY,
            cancellation_type=workflow.ActivityCancellationType.TRY_CANCEL,
            summary=f"ask {inp.peer_name} for the agent's state",
        )
        # An event (signal) that brings the change first wins; a peer that is away is asked
        # again by Temporal's retries, which hold no slot in between.
        await workflow.wait_condition(_changed_or_done(self, check))
        if not check.done():
            check.cancel()
            return True
        try:
            self._apply(check.result())
        except ActivityError as err:
            # The executor refused (not ACTIVE, unknown agent): asked again after a longer
            # quiet spell, unless news comes first.
            self._error = f"status unavailable: {_reason(err)}"
        return self._state != known

    async def _send_spawn(self, inp: SpawnAgentInput) -> None:
        """Deliver agent.spawn (retried until the spawn deadline); its ack is the first report."""
        try:
            send, _, _, via = _transport(inp)
            ack = await workflow.execute_activity_method(
                send,
                inp,
                schedule_to_close_timeout=timedelta(seconds=inp.spawn_deadline_seconds),
                start_to_close_timeout=timedelta(seconds=inp.peer_timeout_seconds + 5),
                retry_policy=PEER_RETRY,
                summary=f"send {via}agent.spawn to {inp.peer_name}",
            )
            self._apply(ack)
        except ActivityError as err:
            if self._seq > 0:
                return  # its answers were lost, but the executor's events say it has the run
            # Given up on a failure a retry might have fixed (no answer, a peer away): the
            # spawn may have reached the executor with only its answers lost, so it is told.
            self._tell_executor = AgentState.FAILED if _retryable(err) else None
            self._finish(AgentState.FAILED, error=f"spawn not delivered: {_reason(err)}")

    def _continue_as_new_due(self, inp: SpawnAgentInput) -> bool:
        info = workflow.info()
        forced = inp.continue_as_new_after_events
        return info.is_continue_as_new_suggested() or (
            forced > 0 and info.get_current_history_length() >= forced
        )

    @workflow.signal
    def on_event(self, event: AgentEvent) -> None:
        self._apply(event)

    @workflow.update
    async def kill(self, request: KillRequest) -> KillResult:
        self._kill_requested = True  # a spawn not sent yet is never sent
        await workflow.wait_condition(lambda: self._phase is not Phase.SPAWNING)
        confirmed = True
        if self._state not in TERMINAL_STATES:
            inp = self._input
            assert inp is not None
            confirmed = await self._kill_peer(inp)
        if not confirmed:
            # Answer once the final state is in the projection, so the caller reads it there
            # (a confirmed answer was written there by send_kill already).
            await workflow.wait_condition(lambda: self._phase in (Phase.CONTINUING, Phase.DONE))
        return KillResult(
            agent_id=self._agent_id,
            state=self._state,
            seq=self._seq,
            result=self._result,
            error=self._error,
            confirmed=confirmed,
        )

    async def _kill_peer(self, inp: SpawnAgentInput) -> bool:
        """Ask the executor to kill the run; False when it could not be asked and the run was
        ended here, unconfirmed."""
        call = PeerCall(
            agent_id=self._agent_id,
            connection_id="",
            peer_timeout_seconds=inp.peer_timeout_seconds,
            traceparent=self._traceparent,
        )
        deadline = workflow.now() + timedelta(seconds=inp.kill_deadline_seconds)
        _, _, send_kill, via = _transport(inp)
        try:
            answer: KillResult | None = None
            # One try as a local activity, answered in the workflow task that sent it: no
            # round trip through the task queue, no second task before the answer. At most
            # half the kill deadline: the rest is for the retried activity.
            first_try = max(1.0, min(inp.kill_deadline_seconds / 2, inp.peer_timeout_seconds))
            try:
                answer = await workflow.execute_local_activity_method(
                    send_kill,
                    call,
                    start_to_close_timeout=timedelta(seconds=first_try),
                    retry_policy=RetryPolicy(maximum_attempts=1),
                    summary=f"send {via}agent.kill",
                )
                self._answered_in_task = True
            except (ActivityError, ApplicationError, FailureTimeout) as err:
                if not _retryable(err) or deadline - workflow.now() < timedelta(seconds=1):
                    raise
            if answer is None:
                # Retried until the kill deadline (the peer may be restarting).
                remaining = max(1.0, (deadline - workflow.now()).total_seconds())
                answer = await workflow.execute_activity_method(
                    send_kill,
                    call,
                    start_to_close_timeout=timedelta(seconds=60),
                    schedule_to_close_timeout=timedelta(seconds=remaining),
                    retry_policy=PEER_RETRY,
                    summary=f"send {via}agent.kill",
                )
        except (ActivityError, ApplicationError, FailureTimeout) as err:
            # The peer is gone or silent: end the run here; it is told later, durably.
            self._tell_executor = AgentState.KILLED
            self._finish(
                AgentState.KILLED,
                error=f"killed here, not confirmed by {inp.peer_name}: {_reason(err)}",
            )
            return False
        self._apply(
            AgentEvent(seq=answer.seq, state=answer.state, result=answer.result, error=answer.error)
        )
        if self._state not in TERMINAL_STATES:
            raise ApplicationError(
                f"{inp.peer_name} answered the kill with state {answer.state}",
                type="kill_not_confirmed",
            )
        return True

    @workflow.query
    def status(self) -> AgentStatus:
        return AgentStatus(
            agent_id=self._agent_id,
            state=self._state,
            seq=self._seq,
            result=self._result,
            error=self._error,
            attempt=self._attempt,
        )

    def _apply(self, event: AgentEvent) -> None:
        # A terminal state is final; an older or repeated report changes nothing.
        if self._state in TERMINAL_STATES or event.seq <= self._seq:
            return
        self._seq = event.seq
        self._attempt = event.attempt if event.attempt is not None else self._attempt
        # The executor's word replaces what this side noted meanwhile ("status unavailable").
        self._error = event.error
        if event.state in TERMINAL_STATES:
            self._finish(event.state, event.result, event.error)
        elif event.state != self._state:
            self._state = event.state
            self._set_state_attribute()
        self._changed = True

    def _finish(
        self,
        state: AgentState,
        result: dict | None = None,  # type: ignore[type-arg]
        error: str | None = None,
    ) -> None:
        if self._state in TERMINAL_STATES:
            return
        self._state = state
        self._result = result if result is not None else self._result
        self._error = error if error is not None else self._error
        self._changed = True
        self._set_state_attribute()

    def _set_state_attribute(self) -> None:
        workflow.upsert_search_attributes([SA_AGENT_STATE.value_set(self._state)])
        workflow.set_current_details(f"agent **{self._agent_id}** is `{self._state}`")
