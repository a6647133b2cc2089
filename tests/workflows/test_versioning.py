"""Workers declare a Worker Deployment version; with versioning on, a run is routed to the
version made current and records it (the rollout steps of docs/durability.md, against the real
server)."""

from __future__ import annotations

import asyncio
import uuid

from temporalio.api.workflowservice.v1 import SetWorkerDeploymentCurrentVersionRequest
from temporalio.client import Client
from temporalio.service import RPCError
from temporalio.worker import Worker

from federation.settings import Settings
from tests.workflows.peer import ScriptedPeer, run_input
from tests.workflows.test_paths import final_status
from worker.main import build_id, deployment_config
from workflows.agent_run import AgentRunWorkflow
from workflows.models import agent_run_workflow_id
from workflows.remote_agent import RemoteAgentWorkflow


def test_build_id_comes_from_the_setting_or_the_package_and_workflow_code() -> None:
    assert build_id(Settings(worker_build_id="2026.12.1")) == "2026.12.1"
    default = build_id(Settings())
    assert default.startswith("0.1.0+") and len(default) == len("0.1.0+") + 12


async def test_a_run_goes_to_the_current_worker_version_and_records_it(
    client: Client, peer: ScriptedPeer
) -> None:
    deployment = f"fedagent-{uuid.uuid4().hex[:8]}"
    settings = Settings(worker_deployment=deployment, worker_build_id="v1", worker_versioning=True)
    queue = f"wf-{uuid.uuid4()}"
    peer.release_run.set()
    async with Worker(
        client,
        task_queue=queue,
        workflows=[RemoteAgentWorkflow, AgentRunWorkflow],
        activities=peer.activities(),
        deployment_config=deployment_config(settings),
    ):
        # `temporal worker deployment set-current-version`: the server must have seen a
        # poller of this version first.
        for _ in range(100):
            try:
                await client.workflow_service.set_worker_deployment_current_version(
                    SetWorkerDeploymentCurrentVersionRequest(
                        namespace=client.namespace, deployment_name=deployment, build_id="v1"
                    )
                )
                break
            except RPCError:
                await asyncio.sleep(0.2)
        agent_id = str(uuid.uuid4())
        handle = await client.start_workflow(
            AgentRunWorkflow.run,
            run_input(agent_id),
            id=agent_run_workflow_id("hub", agent_id),
            task_queue=queue,
        )
        assert (await final_status(handle)).state == "completed"
        described = await handle.describe()
        info = described.raw_description.workflow_execution_info.versioning_info
        assert info.deployment_version.build_id == "v1"
        assert info.deployment_version.deployment_name == deployment
