"""Is anyone working for this instance? Workers poll two task queues (workflows and federation
activities on `TASK_QUEUE`, agent runs on `TASK_QUEUE-agents`); Temporal's DescribeTaskQueue
lists who polled each lately. Used by /readyz, `fedagent doctor` and the dev stack."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client

# A live worker polls again at least every minute (the server holds a long poll up to 60 s);
# Temporal remembers a poller for minutes after it is gone, so older ones count as gone.
POLLER_FRESH = timedelta(seconds=90)


@dataclass(frozen=True)
class QueuePollers:
    task_queue: str
    kind: str  # "workflow" or "activity"
    pollers: int  # pollers seen within POLLER_FRESH


def polled_queues(task_queue: str) -> list[tuple[str, TaskQueueType.ValueType, str]]:
    return [
        (task_queue, TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW, "workflow"),
        (f"{task_queue}-agents", TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY, "activity"),
    ]


async def queue_pollers(
    client: Client, namespace: str, task_queue: str, *, timeout: float = 5.0
) -> list[QueuePollers]:
    """Fresh pollers of each of the instance's task queues."""
    now = datetime.now(UTC)
    found = []
    for queue, kind, label in polled_queues(task_queue):
        response = await client.workflow_service.describe_task_queue(
            DescribeTaskQueueRequest(
                namespace=namespace, task_queue=TaskQueue(name=queue), task_queue_type=kind
            ),
            timeout=timedelta(seconds=timeout),
        )
        fresh = [
            p
            for p in response.pollers
            if not p.HasField("last_access_time")
            or now - p.last_access_time.ToDatetime(tzinfo=UTC) <= POLLER_FRESH
        ]
        found.append(QueuePollers(queue, label, len(fresh)))
    return found


def unpolled(found: list[QueuePollers]) -> list[str]:
    """The task queues no worker polls, as `name (kind)`."""
    return [f"{q.task_queue} ({q.kind})" for q in found if q.pollers == 0]
