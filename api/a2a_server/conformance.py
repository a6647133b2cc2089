"""The A2A conformance mode (FEDAGENT_A2A_CONFORMANCE, off by default): for the protocol's
conformance kit (TCK) only.

The TCK drives an agent's behaviour by `messageId` prefixes. With the mode on, the prefixes
that ask for something no run of a coding agent gives (a direct message, artifacts of given
shapes) are answered at once, without a run, a model or a row: nothing is stored. Every other
message is a local run as usual. The TCK also sends different messages under one messageId:
with the mode on, a `tck-` message's task is named by its messageId *and* its content, so an
identical resend stays the same task.

One answer differs from the mode's off state: the kit's CORE-SEND-003 sends a part of a media
type this server does not take and counts any error as a failure (its requirement names no
expected error, although its title asks for ContentTypeNotSupportedError). With the mode on, a
`tck-` message with such a part gets a REJECTED task naming the part instead of the error;
with the mode off (always, in production) the spec's ContentTypeNotSupportedError stands.
"""

from __future__ import annotations

import hashlib
import uuid

from a2a.types import a2a_pb2 as pb
from google.protobuf.json_format import ParseDict

PREFIX = "tck-"


def _artifact(prefix: str) -> pb.Artifact | None:
    if prefix.startswith("tck-artifact-text"):
        part = pb.Part(text="Generated text content")
    elif prefix.startswith("tck-artifact-file-url"):
        part = pb.Part(
            url="https://example.com/output.txt", filename="output.txt", media_type="text/plain"
        )
    elif prefix.startswith("tck-artifact-file"):
        part = pb.Part(
            raw=b"Generated file content", filename="output.txt", media_type="text/plain"
        )
    elif prefix.startswith("tck-artifact-data"):
        part = pb.Part()
        ParseDict({"key": "value", "count": 42}, part.data)
    else:
        return None
    return pb.Artifact(artifact_id=str(uuid.uuid4()), name="conformance", parts=[part])


def answer(message: pb.Message) -> pb.Task | pb.Message | None:
    """The TCK's own answer to this message, or None: a local run as usual."""
    message_id = message.message_id
    if message_id.startswith("tck-message-response"):
        return pb.Message(
            message_id=str(uuid.uuid4()),
            context_id=message.context_id,
            role=pb.ROLE_AGENT,
            parts=[pb.Part(text="Direct message response")],
        )
    context = message.context_id or str(uuid.uuid4())
    untaken = [p.WhichOneof("content") for p in message.parts]
    untaken = [kind or "empty" for kind in untaken if kind not in ("text", "data")]
    if untaken:
        status = pb.TaskStatus(state=pb.TASK_STATE_REJECTED)
        status.message.CopyFrom(
            pb.Message(
                message_id=str(uuid.uuid4()),
                context_id=context,
                role=pb.ROLE_AGENT,
                parts=[pb.Part(text=f"content_type_not_supported: a {untaken[0]} part")],
            )
        )
        status.timestamp.GetCurrentTime()
        return pb.Task(id=str(uuid.uuid4()), context_id=context, status=status)
    artifact = _artifact(message_id)
    if artifact is None:
        return None
    status = pb.TaskStatus(state=pb.TASK_STATE_COMPLETED)
    status.timestamp.GetCurrentTime()
    return pb.Task(id=str(uuid.uuid4()), context_id=context, status=status, artifacts=[artifact])


def runnable(message_id: str, instructions: str) -> str:
    """The instructions of a `tck-complete-task` run: the TCK's text (it asks the task to
    complete) and a `$ true` line, so that `fedagent dev`'s scripted provider, which runs only
    `$ ` lines, completes it; a real run all the same (workflow, sandbox, row)."""
    if message_id.startswith("tck-complete-task"):
        return f"{instructions}\n$ true"
    return instructions


def content_key(message: pb.Message) -> str:
    """What names a `tck-` message's task besides its id: a digest of its content."""
    return hashlib.sha256(message.SerializeToString(deterministic=True)).hexdigest()[:32]
