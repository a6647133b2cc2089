"""The A2A conformance mode's own answers (the TCK's messageId prefixes), without a stack;
tests/e2e/test_a2a_server.py checks that the mode is off by default."""

from __future__ import annotations

from a2a.types import a2a_pb2 as pb
from google.protobuf.json_format import MessageToDict

from api.a2a_server import conformance
from api.a2a_server.tasks import spawn_of
from federation.settings import Settings
from federation.users import User


def message(message_id: str, text: str = "TCK") -> pb.Message:
    return pb.Message(message_id=message_id, role=pb.ROLE_USER, parts=[pb.Part(text=text)])


def test_the_mode_is_off_unless_asked_for() -> None:
    assert Settings().a2a_conformance is False


def test_the_tck_prefixes_get_the_answers_the_tck_expects_and_others_none() -> None:
    reply = conformance.answer(message("tck-message-response-1"))
    assert isinstance(reply, pb.Message) and reply.parts[0].text == "Direct message response"
    text = conformance.answer(message("tck-artifact-text-1"))
    assert isinstance(text, pb.Task) and text.status.state == pb.TASK_STATE_COMPLETED
    assert text.artifacts[0].parts[0].text == "Generated text content"
    file = conformance.answer(message("tck-artifact-file-1"))
    assert isinstance(file, pb.Task)
    assert (file.artifacts[0].parts[0].filename, file.artifacts[0].parts[0].media_type) == (
        "output.txt",
        "text/plain",
    )
    url = conformance.answer(message("tck-artifact-file-url-1"))
    assert isinstance(url, pb.Task) and url.artifacts[0].parts[0].url.endswith("/output.txt")
    data = conformance.answer(message("tck-artifact-data-1"))
    assert isinstance(data, pb.Task)
    assert MessageToDict(data.artifacts[0].parts[0].data) == {"key": "value", "count": 42}
    assert conformance.answer(message("tck-complete-task-1")) is None
    assert conformance.answer(message("my-own-id")) is None


def test_a_tck_message_is_named_by_its_content_too() -> None:
    user = User("tck", "admin", "default")
    one, same, other = (
        spawn_of(
            message("tck-complete-task-s", text),
            user,
            conformance.content_key(message("tck-complete-task-s", text)),
        )
        for text in ("a", "a", "b")
    )
    assert one.agentId == same.agentId != other.agentId
    assert spawn_of(message("x"), user).agentId == spawn_of(message("x", "other"), user).agentId


def test_a_tck_message_with_a_part_not_taken_gets_a_rejected_task_in_the_mode_only() -> None:
    """CORE-SEND-003 counts any error as a failure: the mode answers REJECTED; without the
    mode (e2e test_a2a_server) the same message gets ContentTypeNotSupportedError."""
    raw = pb.Message(
        message_id="tck-send-003-1",
        role=pb.ROLE_USER,
        parts=[pb.Part(raw=b"tck", media_type="application/x-unsupported-tck-type")],
    )
    task = conformance.answer(raw)
    assert isinstance(task, pb.Task) and task.status.state == pb.TASK_STATE_REJECTED
    assert task.status.message.parts[0].text == "content_type_not_supported: a raw part"
    assert not task.artifacts


def test_a_tck_complete_task_message_is_a_run_the_scripted_provider_completes() -> None:
    assert conformance.runnable("tck-complete-task-1", "Hello") == "Hello\n$ true"
    assert conformance.runnable("tck-input-required-1", "Hello") == "Hello"
