"""The console's pages: server-rendered HTML over the same `operations` functions the REST
routes call, so a rule (who may see an agent, which transition a connection allows, what a
grant may say) holds in the browser exactly as it does over REST."""

from __future__ import annotations

import json
import logging
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, get_args
from urllib.parse import quote, urlencode

import pydantic
from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import RedirectResponse, StreamingResponse
from fastapi.routing import APIRoute
from fastapi.templating import Jinja2Templates
from temporalio.service import RPCError

from api.console.auth import (
    CSRF_FIELD,
    NotSignedIn,
    checked_form,
    clear_session,
    console_user,
    csrf_token,
    session_token,
    set_session,
)
from api.console.diff import agent_diff, parse_diff, result_diff_bytes
from api.console.progress import progress_facts, state_changes
from api.console.transcript import agent_transcript
from api.deps import app_pool, app_settings, require_admin, services_for, user_for_token
from api.event_stream import event_stream
from federation.errors import FederationError, InvalidRequest, Unauthenticated
from federation.models import (
    AgentSpawnCreate,
    CommandType,
    ConnectionCreate,
    ConnectionPublic,
    GrantsUpdate,
    InstanceUpdate,
    KeyRotate,
)
from federation.states import TERMINAL_STATES, AgentState, ConnectionStatus
from federation.store import artifacts, repos
from federation.users import User
from operations import Services, agents, audit, connections, hosted, instance
from operations import artifacts as artifact_ops

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
templates = Jinja2Templates(directory=str(HERE / "templates"))

STATES = list(AgentState)
AGENT_TYPES = ["worker", "reviewer", "tester"]
COMMAND_TYPES = list(get_args(CommandType))  # what a grant can allow, as the REST model says
PAGE_SIZE = 20
CSP = (
    "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none';"
    " form-action 'self'; frame-ancestors 'none'"
)
NOTES = {
    "signed-out": "You are signed out.",
    "updated": "The instance is updated.",
    "rotated": "A new key signs from now on; the previous one is retiring.",
    "requested": "The request is sent; the connection stays PENDING until the peer accepts.",
    "a2a-added": "The A2A agent is added: its connection is ACTIVE, spawns on it go over A2A.",
    "accepted": "The connection is ACTIVE.",
    "rejected": "The request is rejected.",
    "suspended": "The connection is suspended.",
    "resumed": "The connection is resumed.",
    "disconnected": "The connection is ended.",
    "grants": "The grants are saved.",
    "spawned": "The agent is on its way.",
    "killed": "The agent is stopped.",
    "hosted-killed": "The run is stopped and its sandbox removed; the peer that started it hears"
    " it was killed.",
    "hosted-ended": "The run had ended already: it keeps the state it ended in.",
}


def _problem_page(request: Request, err: FederationError) -> Response:
    return templates.TemplateResponse(
        request,
        "error.html",
        {
            "instance_name": app_settings(request).instance_name,
            "title": err.title,
            "code": err.code,
            "detail": err.detail,
            "status": err.status,
            "user": getattr(request.state, "console_user", None),
            "csrf": _csrf(request),
        },
        status_code=err.status,
    )


class _PageError(FederationError):
    def __init__(self, status: int, code: str, title: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.title = status, code, title


class ConsoleRoute(APIRoute):
    """Errors become a page with the problem's title and code, never a stack trace."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def page(request: Request) -> Response:
            response = await guarded(request)
            # Only our own files run or load; no other site may frame a page (clickjacking of
            # the confirmation dialogs); links to the Temporal UI leak no console path.
            response.headers.setdefault("Content-Security-Policy", CSP)
            response.headers.setdefault("X-Frame-Options", "DENY")
            response.headers.setdefault("Referrer-Policy", "same-origin")
            return response

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except NotSignedIn:
                if request.method == "GET":
                    return RedirectResponse(
                        "/console/sign-in?" + urlencode({"next": request.url.path}), 303
                    )
                return _problem_page(
                    request, _PageError(401, "unauthenticated", "Not signed in", "sign in first")
                )
            except FederationError as err:
                return _problem_page(request, err)
            except (RequestValidationError, pydantic.ValidationError) as exc:
                fields = "; ".join(
                    f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'form'}: {e['msg']}"
                    for e in exc.errors()
                )
                return _problem_page(
                    request,
                    _PageError(422, "validation_error", "The form has invalid values", fields),
                )
            except RPCError as exc:
                log.warning("temporal call failed: %s", exc)
                return _problem_page(
                    request,
                    _PageError(
                        503,
                        "temporal_unavailable",
                        "The durable engine is unavailable",
                        "try again in a moment",
                    ),
                )
            except Exception:
                log.exception("console page %s failed", request.url.path)
                return _problem_page(
                    request,
                    _PageError(
                        500,
                        "internal_error",
                        "Something went wrong on the server",
                        "the server could not show this page; its logs say why",
                    ),
                )

        return page


router = APIRouter(prefix="/console", route_class=ConsoleRoute, include_in_schema=False)


# --- helpers ----------------------------------------------------------------------------------


def _csrf(request: Request) -> str:
    token = session_token(request)
    return csrf_token(token) if token else ""


async def _signed_in(request: Request) -> tuple[Services, User]:
    user = await console_user(request)
    request.state.console_user = user
    return services_for(request), user


async def _admin(request: Request) -> tuple[Services, User]:
    services, user = await _signed_in(request)
    require_admin(user)
    return services, user


async def _render(
    request: Request, template: str, user: User | None, status: int = 200, **context: Any
) -> Response:
    services = services_for(request)
    settings = services.settings
    identity = await services.identity() if user is not None else None
    return templates.TemplateResponse(
        request,
        template,
        {
            "user": user,
            "csrf": _csrf(request),
            "csrf_field": CSRF_FIELD,
            "instance_name": identity.name if identity else settings.instance_name,
            "instance_id": identity.instance_id if identity else "",
            "note": NOTES.get(request.query_params.get("note", "")),
            "temporal_ui": _temporal_ui(services),
            **context,
        },
        status_code=status,
    )


def _back(path: str, note: str) -> RedirectResponse:
    return RedirectResponse(f"{path}?note={note}", status_code=303)


def _first(form: dict[str, list[str]], name: str, default: str = "") -> str:
    return (form.get(name) or [default])[0].strip()


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.replace(",", "\n").splitlines() if line.strip()]


def _int_or_none(form: dict[str, list[str]], name: str) -> int | None:
    value = _first(form, name)
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise InvalidRequest(f"{name} must be a whole number") from None


def _uuid(value: str, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidRequest(f"{what} must be an id like 3f2c…") from None


def _temporal_ui(services: Services) -> dict[str, str]:
    settings = services.settings
    base = settings.temporal_ui_url.rstrip("/")
    namespace = settings.temporal_namespace
    return {"namespace": namespace, "workflows": f"{base}/namespaces/{quote(namespace)}/workflows"}


def _workflow_links(
    services: Services, row: dict[str, Any], peer_name: str, requester_id: str
) -> dict[str, str | None]:
    ui = _temporal_ui(services)["workflows"]
    if row["role"] == "executor":  # a local run: one workflow, in this instance's Temporal
        own = f"{ui}/{quote(row['workflow_id'], safe='')}"
        return {"executor_id": row["workflow_id"], "executor_url": own}
    executor_id = f"agent-run/{requester_id}/{row['agent_id']}"
    template = services.settings.temporal_ui_peer_url
    executor_url = None
    if template:
        base = template.format(
            peerName=quote(peer_name, safe=""), peerInstanceId=quote(row["peer_instance_id"])
        ).rstrip("/")
        executor_url = f"{base}/workflows/{quote(executor_id, safe='')}"
    return {
        "requester_id": row["workflow_id"],
        "requester_url": f"{ui}/{quote(row['workflow_id'], safe='')}",
        "executor_id": executor_id,
        "executor_url": executor_url,
    }


def _grants_from_form(form: dict[str, list[str]]) -> GrantsUpdate:
    return GrantsUpdate(
        commandTypes=form.get("commandTypes", []),  # type: ignore[arg-type]
        agentTypes=form.get("agentTypes", []),  # type: ignore[arg-type]
        repositories=_lines(_first(form, "repositories")),
        maxTimeout=_int_or_none(form, "maxTimeout"),
        maxConcurrentAgents=_int_or_none(form, "maxConcurrentAgents"),
    )


# --- sign in and out --------------------------------------------------------------------------


@router.get("")
async def home(request: Request) -> Response:
    target = "/console/overview" if session_token(request) else "/console/sign-in"
    return RedirectResponse(target, status_code=303)


@router.get("/sign-in")
async def sign_in_page(request: Request) -> Response:
    return await _render(request, "sign_in.html", None, next=request.query_params.get("next"))


@router.post("/sign-in")
async def sign_in(request: Request) -> Response:
    form = await checked_form(request, signed_in=False)
    token = _first(form, "token")
    target = _first(form, "next")
    if not target.startswith("/console/") or target.startswith("//"):
        target = "/console/overview"
    try:
        await user_for_token(app_pool(request), token) if token else None
        if not token:
            raise Unauthenticated("enter an API token")
    except Unauthenticated as err:
        return await _render(
            request,
            "sign_in.html",
            None,
            status=401,
            error={"title": "That token was not accepted", "code": err.code, "detail": err.detail},
            next=target,
        )
    response = RedirectResponse(target, status_code=303)
    set_session(request, response, token)
    return response


@router.post("/sign-out")
async def sign_out(request: Request) -> Response:
    await checked_form(request)
    response = RedirectResponse("/console/sign-in?note=signed-out", status_code=303)
    clear_session(request, response)
    return response


# --- overview ---------------------------------------------------------------------------------


@router.get("/overview")
async def overview(request: Request) -> Response:
    services, user = await _signed_in(request)
    by_state: dict[str, int] = {}
    listed = await connections.list_(services)
    if user.is_admin:
        counts = Counter(c.status for c in listed)
        by_state = {
            s: counts.get(s, 0)
            for s in (
                ConnectionStatus.ACTIVE,
                ConnectionStatus.PENDING,
                ConnectionStatus.SUSPENDED,
                ConnectionStatus.DISCONNECTED,
            )
        }
    running = [
        *await agents.list_(services, user, state=AgentState.RUNNING, limit=PAGE_SIZE),
        *await agents.list_(services, user, state=AgentState.SPAWNING, limit=PAGE_SIZE),
    ]
    recent = [
        r for r in await agents.list_(services, user, limit=50) if r["state"] in TERMINAL_STATES
    ][:10]
    return await _render(
        request,
        "overview.html",
        user,
        connections_by_state=by_state,
        running=running,
        recent=recent,
        peer_names={str(c.connectionId): c.remoteName for c in listed},
    )


# --- instance (admin) -------------------------------------------------------------------------


@router.get("/instance")
async def instance_page(request: Request) -> Response:
    services, user = await _admin(request)
    card = await instance.card(services)
    return await _render(
        request,
        "instance.html",
        user,
        card=card,
        metadata_json=json.dumps(card.get("metadata") or {}, indent=2),
        grace_hours=round(services.settings.key_rotation_grace / 3600, 1),
        grace_seconds=services.settings.key_rotation_grace,
        agent_types=AGENT_TYPES,
        command_types=COMMAND_TYPES,
    )


@router.post("/instance")
async def instance_update(request: Request) -> Response:
    form = await checked_form(request)
    services, user = await _admin(request)
    try:
        metadata = json.loads(_first(form, "metadata") or "{}")
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"metadata is not valid JSON: {exc.msg} (line {exc.lineno})") from None
    body = InstanceUpdate.model_validate(
        {
            "name": _first(form, "name") or None,
            "capabilities": {
                "agentTypes": form.get("agentTypes", []),
                "commandTypes": form.get("commandTypes", []),
            },
            "metadata": metadata,
        }
    )
    await instance.update(services, user, body)
    return _back("/console/instance", "updated")


@router.post("/instance/keys/rotate")
async def instance_rotate(request: Request) -> Response:
    await checked_form(request)
    services, user = await _admin(request)
    await instance.rotate_keys(services, user, KeyRotate())
    return _back("/console/instance", "rotated")


# --- connections (admin) ----------------------------------------------------------------------


@router.get("/connections")
async def connections_page(request: Request) -> Response:
    services, user = await _admin(request)
    listed = await connections.list_(services)
    return await _render(
        request,
        "connections.html",
        user,
        pending=[
            c for c in listed if c.status == ConnectionStatus.PENDING and c.direction == "inbound"
        ],
        others=[
            c
            for c in listed
            if not (c.status == ConnectionStatus.PENDING and c.direction == "inbound")
        ],
        agent_types=AGENT_TYPES,
        command_types=COMMAND_TYPES,
        grace_seconds=services.settings.key_rotation_grace,
    )


@router.post("/connections")
async def connection_create(request: Request) -> Response:
    form = await checked_form(request)
    services, user = await _admin(request)
    fields: dict[str, Any] = {"remoteUrl": _first(form, "remoteUrl")}
    if _first(form, "kind") == "a2a":
        fields["kind"] = "a2a"
        if _first(form, "token"):
            fields["token"] = _first(form, "token")
    body = ConnectionCreate.model_validate(fields)
    if body.kind == "a2a":
        token = body.token.get_secret_value() if body.token else None
        await connections.connect_a2a(services, user, str(body.remoteUrl), token)
        return _back("/console/connections", "a2a-added")
    await connections.create(services, user, str(body.remoteUrl))
    return _back("/console/connections", "requested")


@router.post("/connections/{connection_id}/{action}")
async def connection_action(request: Request, connection_id: uuid.UUID, action: str) -> Response:
    form = await checked_form(request)
    services, user = await _admin(request)
    if action == "accept":
        await connections.accept(services, user, connection_id, _grants_from_form(form))
        note = "accepted"
    elif action == "grants":
        await connections.update_grants(services, user, connection_id, _grants_from_form(form))
        note = "grants"
    elif action == "reject":
        await connections.reject(services, user, connection_id)
        note = "rejected"
    elif action == "suspend":
        await connections.suspend(services, user, connection_id)
        note = "suspended"
    elif action == "resume":
        await connections.resume(services, user, connection_id)
        note = "resumed"
    elif action == "disconnect":
        await connections.disconnect(services, user, connection_id)
        note = "disconnected"
    else:
        raise _PageError(404, "not_found", "No such page", f"no action {action!r}")
    return _back("/console/connections", note)


# --- agents -----------------------------------------------------------------------------------


def _agent_filters(request: Request) -> tuple[dict[str, str], int]:
    """The Agents page's filters (as given, checked) and its page number."""
    q = request.query_params
    filters = {
        k: (q.get(k) or "").strip()
        for k in ("state", "agentType", "taskId", "connectionId")
        if (q.get(k) or "").strip()
    }
    if filters.get("state", STATES[0]) not in STATES:
        raise InvalidRequest(f"state must be one of {', '.join(STATES)}")
    if filters.get("agentType", AGENT_TYPES[0]) not in AGENT_TYPES:
        raise InvalidRequest(f"agentType must be one of {', '.join(AGENT_TYPES)}")
    if "connectionId" in filters:
        _uuid(filters["connectionId"], "connectionId")
    try:
        page = max(1, int(q.get("page") or 1))
    except ValueError:
        raise InvalidRequest("page must be a whole number") from None
    return filters, page


async def _hosted_rows(
    services: Services, filters: dict[str, str], peers: list[ConnectionPublic]
) -> list[dict[str, Any]]:
    """The newest runs peers started here that match the filters (the peer filter names our
    connection to the requester)."""
    peer = None
    if "connectionId" in filters:
        by_connection = {str(c.connectionId): c.remoteInstanceId for c in peers}
        peer = by_connection.get(filters["connectionId"], "")
        if not peer:
            return []
    return await hosted.list_(
        services,
        peer=peer,
        state=filters.get("state"),
        agent_type=filters.get("agentType"),
        task_id=filters.get("taskId"),
        limit=PAGE_SIZE,
    )


@router.get("/agents")
async def agents_page(request: Request) -> Response:
    """Agents this instance spawned on peers and, for admins, the runs peers started here."""
    services, user = await _signed_in(request)
    filters, page = _agent_filters(request)
    rows = await agents.list_(
        services,
        user,
        state=filters.get("state"),
        connection_id=uuid.UUID(filters["connectionId"]) if "connectionId" in filters else None,
        agent_type=filters.get("agentType"),
        task_id=filters.get("taskId"),
        limit=PAGE_SIZE + 1,
        offset=(page - 1) * PAGE_SIZE,
    )
    peers = [
        c for c in await connections.list_(services) if c.status != ConnectionStatus.DISCONNECTED
    ]
    return await _render(
        request,
        "agents.html",
        user,
        rows=rows[:PAGE_SIZE],
        hosted_rows=await _hosted_rows(services, filters, peers) if user.is_admin else None,
        terminal_states=TERMINAL_STATES,
        filters=filters,
        page=page,
        newer=urlencode({**filters, "page": page - 1}) if page > 1 else None,
        older=urlencode({**filters, "page": page + 1}) if len(rows) > PAGE_SIZE else None,
        states=STATES,
        agent_types=AGENT_TYPES,
        peers=peers,
        active_peers=[c for c in peers if c.status == ConnectionStatus.ACTIVE],
        peer_names={str(c.connectionId): c.remoteName for c in peers},
    )


@router.post("/agents/spawn")
async def agent_spawn(request: Request) -> Response:
    form = await checked_form(request)
    services, user = await _signed_in(request)
    body = AgentSpawnCreate.model_validate(
        {
            "connectionId": _first(form, "connectionId") or None,  # none: a local run
            "taskId": _first(form, "taskId"),
            "agentType": _first(form, "agentType"),
            "context": {
                "repository": _first(form, "repository") or None,
                "branch": _first(form, "branch") or None,
                "workItems": [
                    w.strip() for w in _first(form, "workItems").splitlines() if w.strip()
                ],
                "instructions": (form.get("instructions") or [""])[0],
            },
            "options": {
                "timeout": _int_or_none(form, "timeout") or 3600,
                "maxRetries": _int_or_none(form, "maxRetries") or 0,
            },
        }
    )
    accepted = await agents.spawn(
        services, user, body, traceparent=request.headers.get("traceparent", "")
    )
    return _back(f"/console/agents/{accepted.agentId}", "spawned")


@router.get("/agents/{agent_id}")
async def agent_page(request: Request, agent_id: uuid.UUID) -> Response:
    services, user = await _signed_in(request)
    row = await agents.get(services, user, agent_id)
    events = await repos.agent_events_after(services.pool, agent_id, 0)
    connection = await repos.get_connection(services.pool, row["connection_id"])
    peer_name = connection["remote_name"] if connection else row["peer_instance_id"]
    if row["role"] == "executor":
        peer_name = "this instance"  # a local run
    identity = await services.identity()
    diff_problem = None
    try:
        diff_text = await agent_diff(services, user, agent_id)
    except FederationError as err:  # the executor may be away: the page shows the rest
        diff_text, diff_problem = "", f"{err.title} ({err.code})"
    files, cut = parse_diff(diff_text)
    return await _render(
        request,
        "agent.html",
        user,
        agent=row,
        peer_name=peer_name,
        events=state_changes(events),
        progress=progress_facts(row.get("progress")),
        result=row.get("result") or {},
        diff_files=files,
        diff_cut=cut,
        diff_bytes=result_diff_bytes(row),
        diff_problem=diff_problem,
        transcript=await agent_transcript(services, user, agent_id),
        links=_workflow_links(services, row, peer_name, identity.instance_id),
        terminal=row["state"] in TERMINAL_STATES,
    )


@router.get("/agents/{agent_id}/diff")
async def agent_diff_download(request: Request, agent_id: uuid.UUID) -> Response:
    services, user = await _signed_in(request)
    artifact = await artifact_ops.of_agent(services, user, agent_id, "diff")
    return StreamingResponse(
        artifacts.iter_chunks(services.pool, artifact),
        media_type="text/x-diff; charset=utf-8",
        headers={
            "Content-Disposition": f'attachment; filename="agent-{agent_id}.diff"',
            "Content-Length": str(artifact.bytes),
        },
    )


@router.get("/agents/{agent_id}/events")
async def agent_events(request: Request, agent_id: uuid.UUID) -> Response:
    """The REST event stream, for pages: EventSource sends the cookie, not a bearer header."""
    services, user = await _signed_in(request)
    return await event_stream(services, user, agent_id, request.headers.get("last-event-id"))


@router.post("/agents/{agent_id}/kill")
async def agent_kill(request: Request, agent_id: uuid.UUID) -> Response:
    await checked_form(request)
    services, user = await _signed_in(request)
    await agents.kill(services, user, agent_id)
    return _back(f"/console/agents/{agent_id}", "killed")


@router.post("/hosted/{agent_id}/kill")
async def hosted_kill(request: Request, agent_id: uuid.UUID) -> Response:
    """Stop a run a peer started here, as `POST /hosted/{id}/kill` does."""
    form = await checked_form(request)
    services, user = await _admin(request)
    killed = await hosted.kill(services, user, agent_id, _first(form, "peer") or None)
    return _back("/console/agents", "hosted-killed" if killed.state == "killed" else "hosted-ended")


# --- audit (admin) ----------------------------------------------------------------------------


def _time(value: str, name: str) -> datetime | None:
    if not value:
        return None
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(f"{name} must be a date and time like 2026-01-31T12:00") from None
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


@router.get("/audit")
async def audit_page(request: Request) -> Response:
    services, user = await _admin(request)
    q = request.query_params
    filters = {
        k: (q.get(k) or "").strip()
        for k in ("action", "outcome", "actor", "since", "until")
        if (q.get(k) or "").strip()
    }
    before = q.get("before")
    page = await audit.list_(
        services,
        user,
        action=filters.get("action"),
        outcome=filters.get("outcome"),
        actor=filters.get("actor"),
        since=_time(filters.get("since", ""), "since"),
        until=_time(filters.get("until", ""), "until"),
        before=int(before) if before and before.isdigit() and int(before) > 0 else None,
        limit=50,
    )
    return await _render(
        request,
        "audit.html",
        user,
        entries=page.items,
        filters=filters,
        older=urlencode({**filters, "before": page.nextBefore}) if page.nextBefore else None,
        first=urlencode(filters) if before else None,
    )


@router.get("/{rest:path}")
async def not_found(request: Request, rest: str) -> Response:
    request.state.console_user = None
    raise _PageError(404, "not_found", "There is no such page", f"/console/{rest}")
