"""Runs held for a long time cost the requester no activity slot: a new spawn still goes out.

The requester's worker here has fewer activity slots than runs held; each held run has passed
its quiet spell and asked the executor for its status. A run that held a slot for its life
(a long-poll) would leave the new spawn's `send_spawn` scheduled and never started.
"""

from __future__ import annotations

import asyncio
import uuid

from temporalio.client import Client
from temporalio.worker import Worker

import workflows.models as m
from tests.workflows.peer import ScriptedPeer
from tests.workflows.test_paths import final_status, start_requester
from tests.workflows.test_races import wait_for
from workflows.agent_run import AgentRunWorkflow
from workflows.remote_agent import RemoteAgentWorkflow

SLOTS = 2
HELD = 5


async def test_runs_held_past_the_activity_slots_do_not_block_a_new_spawn(
    client: Client, peer: ScriptedPeer
) -> None:
    queue = f"wf-held-{uuid.uuid4()}"
    async with Worker(
        client,
        task_queue=queue,
        workflows=[RemoteAgentWorkflow, AgentRunWorkflow],
        activities=peer.activities(),
        max_concurrent_activities=SLOTS,
    ):
        held = [await start_requester(client, queue) for _ in range(HELD)]
        await wait_for(lambda: peer.calls.count(m.SEND_SPAWN) == HELD)
        # Every held run is past its quiet spell and has asked the executor (the status answers
        # `running`): what a held run costs from now on is what is measured.
        await wait_for(lambda: peer.status_checks >= HELD, timeout=30)
        peer.spawn_answer = m.AgentEvent(seq=1, state=m.AgentState.COMPLETED, result={"ok": 1})
        short = await start_requester(client, queue)
        status = await asyncio.wait_for(final_status(short), 60)
        assert (status.state, status.result) == ("completed", {"ok": 1})
        for handle in held:
            assert (await handle.query(RemoteAgentWorkflow.status)).state == "running"
            await handle.terminate("test over")
