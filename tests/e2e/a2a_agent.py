"""Foreign A2A agents for the tests of A2A peers, served by uvicorn on 127.0.0.1.

`HonestAgent` is built with the official a2a-sdk server (an AgentExecutor behind the sdk's
JSON-RPC and card routes): its instructions say what it does ("complete": a summary, a diff
file part and the changed files as data; "forever": works until cancelled; "input": asks for
more input). It keeps each messageId once (A2A allows it), like an agent a retry must not
fool, and its first answer can be lost on purpose (`lose_next_answer`).

`LyingAgent` is written from the wire contract (no a2a-sdk, no fedagent code): each scenario
path (`/{scenario}/...`) serves a card and JSON-RPC answers that lie in one way.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
import uuid
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.context import ServerCallContext
from a2a.server.events import EventQueue
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes
from a2a.server.tasks import InMemoryTaskStore, TaskUpdater
from a2a.types import a2a_pb2 as pb
from google.protobuf.json_format import ParseDict
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

DIFF = b"--- a/hello.txt\n+++ b/hello.txt\n@@ -0,0 +1 @@\n+hello from a2a\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A Starlette app served by uvicorn on 127.0.0.1 for the length of a fixture."""

    def __init__(self, app: Any, port: int) -> None:
        config = uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="warning", interface="asgi3"
        )
        self.server = uvicorn.Server(config)
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Server:
        self.task = asyncio.create_task(self.server.serve())
        while not self.server.started:
            await asyncio.sleep(0.02)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        if self.task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


class ScriptedExecutor(AgentExecutor):
    def __init__(self) -> None:
        self.cancelled: list[str] = []
        self.tasks: list[str] = []

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        assert context.task_id and context.context_id
        self.tasks.append(context.task_id)
        if context.current_task is None:
            await event_queue.enqueue_event(
                pb.Task(
                    id=context.task_id,
                    context_id=context.context_id,
                    status=pb.TaskStatus(state=pb.TASK_STATE_SUBMITTED),
                )
            )
        updater = TaskUpdater(event_queue, context.task_id, context.context_id)
        await updater.start_work()
        text = context.get_user_input()
        if "forever" in text:
            await asyncio.Event().wait()  # until cancelled
        if "input" in text:
            await updater.requires_input()
            return
        await asyncio.sleep(0.2)
        await updater.add_artifact([pb.Part(text=f"done: {text}")], name="summary")
        await updater.add_artifact(
            [pb.Part(raw=DIFF, media_type="text/x-diff", filename="changes.diff")], name="diff"
        )
        files = pb.Part()
        ParseDict({"changedFiles": ["hello.txt"]}, files.data)
        await updater.add_artifact([files], name="changed-files")
        await updater.complete()

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        assert context.task_id and context.context_id
        self.cancelled.append(context.task_id)
        await TaskUpdater(event_queue, context.task_id, context.context_id).cancel()


class OnceHandler(DefaultRequestHandler):
    """Keeps each messageId once: a message seen before answers its task."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.by_message: dict[str, str] = {}
        self.message_ids: list[str] = []

    async def on_message_send(
        self, params: pb.SendMessageRequest, context: ServerCallContext
    ) -> pb.Message | pb.Task:
        message_id = params.message.message_id
        self.message_ids.append(message_id)
        if message_id in self.by_message:
            task = await self.on_get_task(
                pb.GetTaskRequest(id=self.by_message[message_id]), context
            )
            assert task is not None
            return task
        answer = await super().on_message_send(params, context)
        if isinstance(answer, pb.Task):
            self.by_message[message_id] = answer.id
        return answer


class LoseAnswers:
    """ASGI middleware: the next JSON-RPC answer is worked out, then lost (a 503 instead)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.lose_next = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not self.lose_next:
            await self.app(scope, receive, send)
            return
        self.lose_next = False

        async def swallow(message: Message) -> None:
            pass

        await self.app(scope, receive, swallow)
        await Response("lost", status_code=503)(scope, receive, send)


def card(url: str, name: str) -> pb.AgentCard:
    return pb.AgentCard(
        name=name,
        description="a foreign agent of the tests",
        version="1.0.0",
        supported_interfaces=[
            pb.AgentInterface(url=url, protocol_binding="JSONRPC", protocol_version="1.0")
        ],
        capabilities=pb.AgentCapabilities(streaming=False),
        default_input_modes=["text/plain"],
        default_output_modes=["text/plain", "text/x-diff"],
        skills=[pb.AgentSkill(id="code", name="code", description="writes code", tags=["code"])],
    )


class HonestAgent:
    """The a2a-sdk agent; `requests` holds the Authorization header of each JSON-RPC call."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.executor = ScriptedExecutor()
        agent_card = card(f"{self.url}/a2a", "sdk-agent")
        self.handler = OnceHandler(self.executor, InMemoryTaskStore(), agent_card)
        routes = create_agent_card_routes(agent_card) + create_jsonrpc_routes(self.handler, "/a2a")
        self.authorizations: list[str | None] = []
        self.lose = LoseAnswers(Starlette(routes=routes))

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/a2a":
            headers = dict(scope["headers"])
            auth = headers.get(b"authorization")
            self.authorizations.append(auth.decode() if auth else None)
        await self.lose(scope, receive, send)

    @contextlib.asynccontextmanager
    async def serve(self) -> AsyncIterator[HonestAgent]:
        async with Server(self.app, self.port):
            yield self


# --- lying agents --------------------------------------------------------------------------


def _task(
    task_id: str, state: str, artifacts: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    return {
        "id": task_id,
        "contextId": "ctx",
        "status": {"state": state},
        "artifacts": artifacts or [],
    }


class LyingAgent:
    """Scenarios by path: `/{scenario}/.well-known/agent-card.json` and `/{scenario}/a2a`.

    - backwards: SendMessage WORKING, then GetTask SUBMITTED twice, then COMPLETED;
    - other-id: GetTask answers a task with another id;
    - malformed: GetTask answers a result that is not a task;
    - not-json: GetTask answers text that is not JSON;
    - huge-artifact: GetTask answers COMPLETED with an inline file of 5 MiB;
    - huge-card: a card of 100 KiB;
    - far-interface: a card whose JSON-RPC URL is on an address the policy refuses;
    - slow-card: a card trickled byte by byte, never finished;
    - not-cancelable: WORKING until a CancelTask, answered TaskNotCancelable (-32002), after
      which the task is COMPLETED;
    - diff-url-same, diff-url-other: COMPLETED with the diff by URL, on the agent's own
      origin or on another one (`diff_auth` says which download came with credentials);
    - diff-url-redirect: COMPLETED with the diff by a URL of its own origin that redirects to
      the other origin's diff (`diff_paths`: the diffs served, by path);
    - redirect-card: the card's URL redirects to a card served on the other origin.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.calls: dict[str, list[str]] = {}
        # The Authorization header each diff download came with, by where it was served.
        self.diff_auth: dict[str, str | None] = {}
        self.diff_paths: list[str] = []
        routes = [
            Route("/{scenario}/.well-known/agent-card.json", self.card, methods=["GET"]),
            Route("/{scenario}/a2a", self.rpc, methods=["POST"]),
            Route("/{scenario}/changes.diff", self.diff, methods=["GET"]),
            Route("/{scenario}/moved.diff", self.moved, methods=["GET"]),
        ]
        self.app = Starlette(routes=routes)
        # Another origin (another port) that serves a diff as well.
        self.other_port = free_port()
        self.other_url = f"http://127.0.0.1:{self.other_port}"
        self.other_app = Starlette(
            routes=[
                Route("/{scenario}/changes.diff", self.diff, methods=["GET"]),
                Route("/{scenario}/card.json", self.card, methods=["GET"]),
            ]
        )

    async def diff(self, request: Request) -> Response:
        where = "other" if request.url.port == self.other_port else "same"
        self.diff_auth[where] = request.headers.get("authorization")
        self.diff_paths.append(request.url.path)
        return Response(DIFF, media_type="text/x-diff")

    async def moved(self, request: Request) -> Response:
        scenario = request.path_params["scenario"]
        return RedirectResponse(f"{self.other_url}/{scenario}/changes.diff", status_code=302)

    async def card(self, request: Request) -> Response:
        scenario = request.path_params["scenario"]
        endpoint = f"{self.url}/{scenario}/a2a"
        if scenario == "far-interface":
            endpoint = f"http://127.0.0.2:{self.port}/a2a"
        if scenario == "redirect-card" and request.url.port == self.port:
            return RedirectResponse(f"{self.other_url}/{scenario}/card.json", status_code=302)
        if scenario == "slow-card":

            async def trickle() -> AsyncIterator[bytes]:
                yield b"{"
                while True:
                    await asyncio.sleep(0.5)
                    yield b" "

            return StreamingResponse(trickle(), media_type="application/json")
        body: dict[str, Any] = {
            "name": f"liar {scenario}",
            "version": "1.0.0",
            "supportedInterfaces": [
                {"url": endpoint, "protocolBinding": "JSONRPC", "protocolVersion": "1.0"}
            ],
            "capabilities": {},
            "skills": [],
        }
        if scenario == "huge-card":
            body["description"] = "x" * 100_000
        return JSONResponse(body)

    async def rpc(self, request: Request) -> Response:
        scenario = request.path_params["scenario"]
        call = json.loads(await request.body())
        calls = self.calls.setdefault(scenario, [])
        calls.append(call["method"])
        result: Any
        if call["method"] == "SendMessage":
            result = {"task": _task(f"task-{scenario}", "TASK_STATE_WORKING")}
        elif call["method"] == "CancelTask" and scenario == "not-cancelable":
            error = {"code": -32002, "message": "Task cannot be canceled"}
            return JSONResponse({"jsonrpc": "2.0", "id": call["id"], "error": error})
        elif call["method"] == "CancelTask":
            result = _task(f"task-{scenario}", "TASK_STATE_CANCELED")
        else:
            result = self._get(scenario, calls.count("GetTask"))
        if scenario == "not-json" and call["method"] == "GetTask":
            return Response("<html>surprise</html>", media_type="text/html")
        return JSONResponse({"jsonrpc": "2.0", "id": call["id"], "result": result})

    def _get(self, scenario: str, nth: int) -> Any:
        task_id = f"task-{scenario}"
        if scenario == "backwards":
            return _task(task_id, "TASK_STATE_SUBMITTED" if nth <= 2 else "TASK_STATE_COMPLETED")
        if scenario == "other-id":
            return _task(f"someone-else-{uuid.uuid4()}", "TASK_STATE_COMPLETED")
        if scenario == "malformed":
            return {"id": task_id, "status": {"state": 12345678}}
        if scenario == "not-cancelable":  # it ends as the cancel arrives
            calls = self.calls[scenario]
            done = "CancelTask" in calls
            return _task(task_id, "TASK_STATE_COMPLETED" if done else "TASK_STATE_WORKING")
        if scenario in ("diff-url-same", "diff-url-other", "diff-url-redirect"):
            base = self.url if scenario == "diff-url-same" else self.other_url
            part = {"url": f"{base}/{scenario}/changes.diff", "mediaType": "text/x-diff"}
            if scenario == "diff-url-redirect":
                part["url"] = f"{self.url}/{scenario}/moved.diff"
            return _task(task_id, "TASK_STATE_COMPLETED", [{"artifactId": "d", "parts": [part]}])
        if scenario == "huge-artifact":
            raw = base64.b64encode(b"+" * (5 * 1024 * 1024)).decode()
            part = {"raw": raw, "mediaType": "text/x-diff"}
            return _task(task_id, "TASK_STATE_COMPLETED", [{"artifactId": "d", "parts": [part]}])
        return _task(task_id, "TASK_STATE_WORKING")

    @contextlib.asynccontextmanager
    async def serve(self) -> AsyncIterator[LyingAgent]:
        async with Server(self.app, self.port), Server(self.other_app, self.other_port):
            yield self
