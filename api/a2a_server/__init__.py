"""The A2A 1.0 server face of an instance (JSON-RPC binding), with the official a2a-sdk.

- `GET /.well-known/agent-card.json`: the agent card (public, cacheable);
- `POST /a2a`: JSON-RPC (SendMessage, SendStreamingMessage, GetTask, ListTasks, CancelTask,
  SubscribeToTask), authenticated by the instance's API tokens (bearer).

The a2a-sdk's dispatcher parses, routes and answers (its errors are the spec's, with
`google.rpc.ErrorInfo`); `FedagentRequestHandler` calls `operations`. Before it, this module
refuses what the REST API refuses too: unknown fields in the params (-32602), no valid token
(401). See docs/a2a.md.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import Any

from a2a.auth.user import UnauthenticatedUser
from a2a.server.context import ServerCallContext
from a2a.server.request_handlers.response_helpers import (
    agent_card_to_dict,
    build_error_response,
)
from a2a.server.routes.common import ServerCallContextBuilder, create_event_source_response
from a2a.server.routes.jsonrpc_dispatcher import JsonRpcDispatcher
from a2a.utils import constants, json_utils
from a2a.utils.errors import (
    A2AError,
    ContentTypeNotSupportedError,
    InvalidParamsError,
    VersionNotSupportedError,
)
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from google.protobuf.json_format import ParseDict, ParseError
from starlette.requests import Request as StarletteRequest

from api.a2a_server.card import agent_card
from api.a2a_server.handler import FedagentRequestHandler
from api.deps import _current_user, services_for

router = APIRouter(tags=["a2a"])
RPC_PATH = "/a2a"
VERSION = "1.0"


class _Context(ServerCallContextBuilder):
    """The call's context: the user the route authenticated, the services, the headers."""

    def build(self, request: StarletteRequest) -> ServerCallContext:
        return ServerCallContext(
            user=UnauthenticatedUser(),
            state={
                "headers": dict(request.headers),
                "fedagent_user": request.state.fedagent_user,
                "fedagent_services": services_for(request),
            },
        )


class _Dispatcher(JsonRpcDispatcher):
    """The sdk's dispatcher, with an SSE `id` on each event (for Last-Event-ID)."""

    def _create_response(self, context: ServerCallContext, handler_result: Any) -> Response:
        if not isinstance(handler_result, AsyncGenerator):
            return super()._create_response(context, handler_result)

        async def events(stream: AsyncGenerator[dict[str, Any]]) -> AsyncGenerator[dict[str, str]]:
            async for item in stream:
                event = {"data": json_utils.dumps(item)}
                if "error" in item:
                    event["event"] = "error"
                elif (sse_id := context.state.pop("sse_id", None)) is not None:
                    event["id"] = str(sse_id)
                yield event

        return create_event_source_response(events(handler_result))


_dispatcher = _Dispatcher(request_handler=FedagentRequestHandler(), context_builder=_Context())


def _unsupported_version(request: Request) -> VersionNotSupportedError | None:
    """The version the request speaks (its A2A-Version; none: 0.3), if not A2A 1.x. Asked
    before the params are read: a 0.3 client's params are not 1.0's, and it is told so."""
    asked = request.headers.get(constants.VERSION_HEADER) or constants.PROTOCOL_VERSION_0_3
    if asked.strip().split(".")[0] == VERSION.split(".")[0]:  # the major version (1.x)
        return None
    return VersionNotSupportedError(
        message=f"A2A version {asked[:20]!r} is not supported: send A2A-Version: {VERSION}"
    )


def _strict(body: Any) -> InvalidParamsError | None:
    """Unknown fields in the params of a known method: refused, as REST refuses them."""
    if not isinstance(body, dict) or not isinstance(body.get("params", {}), dict):
        return None
    model = _Dispatcher.METHOD_TO_MODEL.get(str(body.get("method")))
    if model is None:
        return None
    try:
        ParseDict(body.get("params", {}), model(), ignore_unknown_fields=False)
    except ParseError as exc:
        return InvalidParamsError(message=f"invalid params: {exc}"[:500])
    return None


@router.get("/.well-known/agent-card.json", include_in_schema=True)
async def get_agent_card(request: Request) -> JSONResponse:
    """The instance's A2A agent card (public)."""
    card = await agent_card(services_for(request), RPC_PATH)
    return JSONResponse(agent_card_to_dict(card), headers={"Cache-Control": "public, max-age=300"})


@router.post(RPC_PATH + "/", include_in_schema=False)  # the interface URL with a "/": no 307
@router.post(RPC_PATH)
async def a2a_rpc(request: Request) -> Response:
    """A2A JSON-RPC 1.0 (send `Authorization: Bearer <API token>` and `A2A-Version: 1.0`)."""
    request.state.fedagent_user = await _current_user(request)
    media = request.headers.get("content-type", "application/json").split(";")[0].strip()
    if media.lower() != "application/json":
        refused = ContentTypeNotSupportedError(
            message=f"the body must be application/json, not {media[:100]!r}"
        )
        refusal = JSONResponse(build_error_response(None, refused))
        refusal.headers["A2A-Version"] = VERSION
        return refusal
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        body = None  # the dispatcher answers the parse error
    invalid: A2AError | None = None
    if isinstance(body, dict) and str(body.get("method")) in _Dispatcher.METHOD_TO_MODEL:
        # A request of a known method (else the dispatcher answers): its version, its params.
        invalid = _unsupported_version(request) or _strict(body)
    if invalid is not None:
        request_id = body.get("id") if isinstance(body, dict) else None
        answer: Response = JSONResponse(build_error_response(request_id, invalid))
    else:
        answer = await _dispatcher.handle_requests(request)
    answer.headers["A2A-Version"] = VERSION
    return answer
