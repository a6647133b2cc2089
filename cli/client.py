"""What the `fedagent` commands use to talk to an instance: which one (`--instance NAME` from a
data dir's instances.json, or `--url`/`--token`), and a small REST client that turns
problem+json answers and unreachable servers into messages a person can act on."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import httpx
from httpx_sse import connect_sse

API = "/api/v1/federation"
DEFAULT_DATA_DIR = Path(".fedagent/dev")


class CliError(Exception):
    """A failure the command reports in one line (plus a hint) and exits 1 on."""

    def __init__(self, message: str, *, hint: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.code = code


@dataclass(frozen=True)
class Target:
    """One instance's API as a command reaches it."""

    url: str
    token: str | None
    name: str | None = None
    info: dict[str, Any] | None = None  # its entry in instances.json, if it came from there

    @property
    def label(self) -> str:
        return self.name or self.url


def load_instances(data_dir: Path) -> dict[str, Any]:
    """The `instances.json` a dev stack wrote into `data_dir`."""
    path = data_dir / "instances.json"
    try:
        doc: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise CliError(
            f"no {path}",
            hint="start a local stack with `fedagent dev` (or pass --data-dir DIR), "
            "or name the instance by --url and --token (FEDAGENT_URL, FEDAGENT_TOKEN)",
        ) from None
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot read {path}: {exc}") from None
    return doc


def instance_info(data_dir: Path, name: str) -> dict[str, Any]:
    doc = load_instances(data_dir)
    instances: dict[str, Any] = doc.get("instances", {})
    if name not in instances:
        known = ", ".join(instances) or "none"
        raise CliError(
            f"no instance {name!r} in {data_dir / 'instances.json'} (known: {known})",
            hint="use one of the names above, or --data-dir of the stack that has it",
        )
    info: dict[str, Any] = instances[name]
    return info


def resolve_target(
    instance: str | None, data_dir: Path, url: str | None, token: str | None
) -> Target:
    """--instance wins; else --url/--token (or FEDAGENT_URL/FEDAGENT_TOKEN)."""
    if instance:
        info = instance_info(data_dir, instance)
        return Target(
            str(info["apiUrl"]).rstrip("/"), token or info.get("adminToken"), instance, info
        )
    if url:
        return Target(url.rstrip("/"), token)
    path = data_dir / "instances.json"
    names: list[str] = []
    if path.exists():
        names = list(load_instances(data_dir).get("instances", {}))
    if len(names) == 1:
        return resolve_target(names[0], data_dir, None, token)
    raise CliError(
        "which instance? pass --instance NAME or --url URL --token TOKEN",
        hint=(
            f"instances in {path}: {', '.join(names)}"
            if names
            else f"there is no {path}: `fedagent dev` starts a local stack and writes it; "
            "for another instance set FEDAGENT_URL and FEDAGENT_TOKEN"
        ),
    )


def resolve_peer_url(peer: str, data_dir: Path) -> tuple[str, dict[str, Any] | None]:
    """A peer given as a URL, or as the name of an instance in the same instances.json."""
    if peer.startswith(("http://", "https://")):
        return peer.rstrip("/"), None
    info = instance_info(data_dir, peer)
    return str(info.get("publicUrl") or info["apiUrl"]).rstrip("/"), info


def write_diff(api: Api, agent_id: str, out: BinaryIO) -> None:
    """Write an agent's whole diff to `out`, checked against its result's diffSha256/diffBytes."""
    agent = api.call("GET", f"/agents/{agent_id}")
    result = agent.get("result") or {}
    sha256, size = api.download(f"/agents/{agent_id}/diff", out)
    if (sha256, size) != (result.get("diffSha256"), result.get("diffBytes")):
        raise CliError(
            f"the diff received ({size} bytes, sha256 {sha256}) is not the one the result names"
            f" ({result.get('diffBytes')} bytes, sha256 {result.get('diffSha256')})",
            code="artifact_mismatch",
        )


def describe_problem(response: httpx.Response) -> CliError:
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and "code" in body:
        code = str(body["code"])
        detail = str(body.get("detail") or body.get("title") or "")
        errors = body.get("errors")
        if isinstance(errors, list) and errors:
            # The API names fields by where they travel (path.agent_id, query.limit, body...);
            # the user typed neither: say the field alone, once, with its message.
            detail = "; ".join(f"{_field(str(e.get('field')))}: {e.get('message')}" for e in errors)
        hint = HINTS.get(code)
        return CliError(f"{response.status_code} {code}: {detail}", hint=hint, code=code)
    text = response.text.strip()[:300] or response.reason_phrase
    return CliError(
        f"{response.request.url} answered {response.status_code}: {text}",
        hint="is this a fedagent API? `fedagent doctor -i NAME` checks an instance",
    )


def _field(field: str) -> str:
    for prefix in ("path.", "query.", "body."):
        if field.startswith(prefix):
            return field[len(prefix) :]
    return field


GRANT_HINT = "the peer does not allow it; `fedagent peers` shows what each peer allows"
HINTS = {
    "grant_agent_type": GRANT_HINT,
    "grant_timeout": GRANT_HINT + " (pass a smaller --timeout)",
    "grant_repository": GRANT_HINT,
    "grant_command_type": GRANT_HINT,
    "unauthenticated": "check the token: --token, FEDAGENT_TOKEN, or the adminToken in "
    "instances.json (`fedagent token create` makes one)",
    "forbidden": "this needs an admin token (`fedagent token create --role admin`); "
    "members spawn with --peer NAME or --connection ID (`fedagent peers` lists them)",
    "connection_not_active": "the peer must accept first: `fedagent accept CONNECTION_ID` "
    "on the peer; `fedagent connections` shows the state",
    "connection_not_found": "`fedagent connections` lists the connections",
    "agent_not_found": "`fedagent agents` lists the agents this instance spawned",
    "capacity_exceeded": "the peer runs as many agents as it may; retry later or spawn "
    "with --queue",
    "peer_unreachable": "the peer's API is not reachable from this instance; is it running?",
}


class Api:
    """A synchronous REST client of one instance's /api/v1/federation."""

    def __init__(self, target: Target, *, timeout: float = 90.0) -> None:
        self.target = target
        headers = {"Authorization": f"Bearer {target.token}"} if target.token else {}
        self.http = httpx.Client(base_url=target.url, headers=headers, timeout=timeout)

    def __enter__(self) -> Api:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, f"{API}{path}", **kwargs)
        except httpx.TransportError as exc:
            raise self.unreachable(exc) from None
        if response.status_code >= 400:
            raise describe_problem(response)
        if not response.content:
            return None
        return response.json()

    def unreachable(self, exc: Exception) -> CliError:
        where = (
            self.target.url
            if self.target.label == self.target.url
            else f"{self.target.label} at {self.target.url}"
        )
        reason = str(exc).strip() or exc.__class__.__name__
        return CliError(
            f"cannot reach {where}: {reason}",
            hint="is the instance running? `fedagent dev` starts a local stack; "
            "`fedagent doctor` checks the pieces",
        )

    def download(self, path: str, out: BinaryIO) -> tuple[str, int]:
        """Stream a GET's body into `out`; returns its sha256 and length."""
        digest = hashlib.sha256()
        size = 0
        try:
            with self.http.stream("GET", f"{API}{path}") as response:
                if response.status_code >= 400:
                    response.read()
                    raise describe_problem(response)
                for block in response.iter_bytes():
                    digest.update(block)
                    size += len(block)
                    out.write(block)
        except httpx.TransportError as exc:
            raise self.unreachable(exc) from None
        out.flush()
        return digest.hexdigest(), size

    def stream_events(self, agent_id: str, last_event_id: str | None) -> Iterator[dict[str, Any]]:
        """Server-Sent Events of one agent (parsed by httpx-sse): dicts with id, event and the
        decoded data."""
        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        timeout = httpx.Timeout(10.0, read=60.0)  # the server sends a keep-alive every 15 s
        url = f"{API}/agents/{agent_id}/events"
        with connect_sse(self.http, "GET", url, headers=headers, timeout=timeout) as source:
            if source.response.status_code >= 400:
                source.response.read()
                raise describe_problem(source.response)
            for sse in source.iter_sse():
                try:
                    data = json.loads(sse.data)
                except ValueError:
                    data = {"raw": sse.data}
                yield {"id": sse.id or None, "event": sse.event, "data": data}
