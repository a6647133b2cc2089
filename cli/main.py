"""`fedagent`: run an instance (serve, worker), a local stack (dev, demo), and drive instances
from the terminal (connect, connections, peers, accept, spawn, agents, status, diff, kill, token,
keys, doctor)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cli.client import (
    Api,
    CliError,
    instance_info,
    load_instances,
    resolve_peer_url,
    resolve_target,
    write_diff,
)
from cli.options import Remote, StackOptions, uses_instance, uses_stack
from federation.settings import Settings
from federation.states import AgentState, ConnectionStatus

app = typer.Typer(
    name="fedagent",
    help=__doc__,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,  # a traceback's locals could show tokens
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)
token_app = typer.Typer(help="API tokens of an instance.", no_args_is_help=True)
keys_app = typer.Typer(help="The instance's signing keys.", no_args_is_help=True)
app.add_typer(token_app, name="token")
app.add_typer(keys_app, name="keys")

console = Console()
err_console = Console(stderr=True)


def _print_version(asked: bool) -> None:
    if asked:
        from importlib.metadata import version

        print(f"fedagent {version('fedagent')}")
        raise typer.Exit()


@app.callback()
def _options(
    _version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_print_version,
            is_eager=True,
            help="Print the installed fedagent's version and exit.",
        ),
    ] = False,
) -> None:
    """Options before the command."""


# --- shared options ---------------------------------------------------------------------------


def _print_json(value: Any) -> None:
    console.print_json(json.dumps(value, default=str))


def _ago(stamp: str | None) -> str:
    if not stamp:
        return ""
    try:
        then = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return stamp
    seconds = (datetime.now(UTC) - then).total_seconds()
    if seconds < 60:
        return f"{seconds:.0f}s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m ago"
    if seconds < 86400:
        return f"{seconds / 3600:.1f}h ago"
    return then.strftime("%Y-%m-%d")


# --- run an instance or a local stack ---------------------------------------------------------


def _configure_logging(settings: Settings) -> None:
    from federation.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format, instance=settings.instance_name)


@app.command(rich_help_panel="Run")
@uses_stack
def dev(stack: StackOptions) -> None:
    """Run the embedded stack (Temporal dev server, PostgreSQL, instances) until Ctrl-C."""
    from cli.devstack import DevStack, StackError, until_signal

    def say(text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    async def run() -> None:
        dev_stack = DevStack(
            stack.names,
            stack.data_dir,
            base_port=stack.base_port,
            temporal_port=stack.temporal_port,
            ui_port=stack.ui_port,
            workers_per_instance=stack.workers,
        )
        try:
            doc = await dev_stack.start()
            print(f"Temporal UI: {dev_stack.ui_url}", flush=True)
            for name, info in doc["instances"].items():
                print(f"{name}: {info['apiUrl']} (namespace {info['namespace']})", flush=True)
            print(f"wrote {dev_stack.data_dir / 'instances.json'}; Ctrl-C stops", flush=True)
            # Until Ctrl-C: a process that dies is reported and started again.
            watch = asyncio.create_task(dev_stack.supervise(say))
            stop = asyncio.create_task(until_signal())
            await asyncio.wait({watch, stop}, return_when=asyncio.FIRST_COMPLETED)
            for task in (watch, stop):
                task.cancel()
            if watch.done() and not watch.cancelled() and watch.exception() is not None:
                raise watch.exception()  # type: ignore[misc]
        finally:
            say("stopping ...")
            dev_stack.stop()

    try:
        asyncio.run(run())
    except StackError as exc:
        raise _stack_failed(exc) from None


def _stack_failed(exc: Exception) -> CliError:
    from cli.devstack import StackError

    assert isinstance(exc, StackError)
    message = exc.message
    if exc.tail:
        message += f"\n--- last lines of {exc.log} ---\n{exc.tail}"
    return CliError(message, hint=exc.hint or (f"the whole log: {exc.log}" if exc.log else None))


@app.command(rich_help_panel="Run")
@uses_stack
def demo(
    stack: StackOptions,
    exit_at_end: Annotated[
        bool, typer.Option("--exit", help="Stop everything at the end.")
    ] = False,
) -> None:
    """Start the stack, connect hub to spoke, spawn one agent and follow it."""
    from cli.demo import run_demo
    from cli.devstack import StackError

    try:
        code = asyncio.run(run_demo(stack, exit_at_end=exit_at_end))
    except StackError as exc:
        raise _stack_failed(exc) from None
    raise typer.Exit(code)


# A process that must not start as configured (sysexits' EX_CONFIG): its settings contradict
# the instance's identity, it cannot open the instance's keys, or its OTEL_* settings name an
# exporter it does not have.
EXIT_REFUSED = 78


def _refuse_to_start(exc: Exception) -> typer.Exit:
    err_console.print(Text("error: ", style="bold red") + Text(str(exc)), soft_wrap=True)
    return typer.Exit(EXIT_REFUSED)


async def _check_can_start(settings: Settings) -> None:
    """What the API's start checks first (`ensure_identity`), before uvicorn takes over."""
    from federation import keystore
    from federation.identity import ensure_identity
    from federation.store.db import create_pool, migrate

    pool = await create_pool(settings.database_url, max_size=1)
    try:
        await migrate(pool)
        await ensure_identity(
            pool,
            name=settings.instance_name,
            public_url=settings.public_url,
            cipher=keystore.load_cipher(settings),
        )
    finally:
        await pool.close()


@app.command(rich_help_panel="Run")
def serve() -> None:
    """Run this instance's API (FEDAGENT_* settings)."""
    import uvicorn

    from api.main import create_app
    from federation import telemetry
    from federation.identity import IdentityConflict
    from federation.keystore import KeystoreError

    settings = _settings()
    _configure_logging(settings)
    try:
        telemetry.check_settings()
        asyncio.run(_check_can_start(settings))
    except (IdentityConflict, KeystoreError, telemetry.TelemetrySettingsError) as exc:
        raise _refuse_to_start(exc) from None
    uvicorn.run(
        create_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        log_level=settings.log_level,
        log_config=None,  # records go through the handler configured above (json or text)
        access_log=False,  # the API logs each request itself, with its ids
    )


@app.command(rich_help_panel="Run")
def worker() -> None:
    """Run a worker of this instance (FEDAGENT_* settings)."""
    from federation import telemetry
    from federation.identity import IdentityConflict
    from federation.keystore import KeystoreError
    from worker.main import main as worker_main

    settings = _settings()
    _configure_logging(settings)
    try:
        telemetry.check_settings()
        worker_main(settings)
    except (IdentityConflict, KeystoreError, telemetry.TelemetrySettingsError) as exc:
        raise _refuse_to_start(exc) from None


@app.command("set-identity", rich_help_panel="Run")
def set_identity() -> None:
    """Make this process's FEDAGENT_INSTANCE_NAME and FEDAGENT_PUBLIC_URL the instance's
    identity (processes with other values refuse to start); then restart every process."""
    from federation.identity import adopt_identity
    from federation.store.db import create_pool, migrate

    settings = _settings()

    async def run() -> dict[str, str]:
        pool = await create_pool(settings.database_url, max_size=1)
        try:
            await migrate(pool)
            return await adopt_identity(
                pool, name=settings.instance_name, public_url=settings.public_url
            )
        finally:
            await pool.close()

    before = asyncio.run(run())
    console.print(
        f"instance name {before.get('name')!r} -> {settings.instance_name!r}, public URL "
        f"{before.get('publicUrl')!r} -> {settings.public_url!r}; restart every process of "
        "the instance with these settings"
    )


def _settings() -> Settings:
    """This instance's settings, or one line per wrong FEDAGENT_* variable."""
    from pydantic import ValidationError

    try:
        return Settings()
    except ValidationError as exc:
        wrong = "; ".join(
            f"FEDAGENT_{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}"
            f" ({e['loc'][0] if e['loc'] else 'settings'})"
            for e in exc.errors()
        )
        raise CliError(
            f"invalid settings: {wrong}", hint="fix the FEDAGENT_* variables named above"
        ) from None


class Role(StrEnum):
    admin = "admin"
    member = "member"


def _database_url(target: Remote) -> str:
    return (
        str(instance_info(target.data_dir, target.instance)["databaseUrl"])
        if target.instance
        else None
    ) or Settings().database_url


def _with_database(target: Remote, work: Any) -> Any:
    """Run `work(pool)` against the instance's database (migrated first)."""
    import asyncpg

    from cli.doctor import _redact
    from federation.store.db import create_pool, migrate

    database_url = _database_url(target)

    async def run() -> Any:
        try:
            pool = await create_pool(database_url, max_size=1)
        except (OSError, asyncpg.PostgresError) as exc:
            raise CliError(
                f"cannot reach the database at {_redact(database_url)}: "
                f"{exc.__class__.__name__} {exc}".strip(),
                hint="name a dev stack's instance with -i NAME (see `fedagent dev`), or set "
                "FEDAGENT_DATABASE_URL to the instance's database",
            ) from None
        try:
            await migrate(pool)
            return await work(pool)
        finally:
            await pool.close()

    return asyncio.run(run())


@token_app.command("create")
@uses_instance(remote=False, as_json=False)
def token_create(
    target: Remote,
    name: Annotated[str, typer.Option("--name", help="Who the token is for.")] = "cli",
    role: Annotated[Role, typer.Option("--role")] = Role.member,
    workspace: Annotated[str, typer.Option("--workspace")] = "default",
    expires_in_days: Annotated[
        float | None,
        typer.Option("--expires-in-days", help="Stops working after this many days."),
    ] = None,
) -> None:
    """Print a new API token (stored hashed, shown once). Writes to the instance's database:
    FEDAGENT_DATABASE_URL, or the one of --instance NAME in instances.json."""
    from datetime import timedelta

    from federation.store import tokens

    expires = timedelta(days=expires_in_days) if expires_in_days else None

    async def run(pool: Any) -> str:
        _, token = await tokens.create_token(
            pool, name=name, role=role.value, workspace=workspace, expires_in=expires
        )
        return token

    print(_with_database(target, run))


@token_app.command("list")
@uses_instance(remote=False)
def token_list(target: Remote) -> None:
    """The instance's API tokens with their state (never the tokens themselves)."""
    from datetime import UTC, datetime

    from federation.store import tokens

    async def run(pool: Any) -> list[dict[str, Any]]:
        now = datetime.now(UTC)
        return [tokens.token_public(r, now) for r in await tokens.list_tokens(pool)]

    rows = _with_database(target, run)
    if target.as_json:
        _print_json(rows)
        return
    table = Table("id", "name", "role", "workspace", "state", "expires")
    for row in rows:
        table.add_row(
            row["id"],
            row["name"],
            row["role"],
            row["workspace"],
            row["state"],
            row["expiresAt"] or "never",
        )
    console.print(table)


@token_app.command("revoke")
@uses_instance(remote=False, as_json=False)
def token_revoke(
    target: Remote,
    token_id: Annotated[str, typer.Argument(help="The token's id (see `fedagent token list`).")],
) -> None:
    """Revoke an API token: every request with it is refused from now on."""
    import uuid as _uuid

    from federation.store import repos, tokens

    try:
        key = _uuid.UUID(token_id)
    except ValueError:
        raise CliError(f"{token_id!r} is not a token id (see `fedagent token list`)") from None

    async def run(pool: Any) -> dict[str, Any] | None:
        row = await tokens.revoke_token(pool, key)
        if row is not None:
            await repos.audit(pool, actor="cli", action="token.revoke", tokenId=str(key))
        return row

    if _with_database(target, run) is None:
        raise CliError(f"no token {token_id}")
    print(f"revoked {token_id}")


# --- connections ------------------------------------------------------------------------------


def _grants_summary(grants: dict[str, Any]) -> str:
    parts = []
    if grants.get("agentTypes") is not None:
        parts.append("types " + ",".join(grants["agentTypes"]))
    if grants.get("maxConcurrentAgents") is not None:
        parts.append(f"max {grants['maxConcurrentAgents']}")
    if grants.get("maxTimeout") is not None:
        parts.append(f"timeout ≤{grants['maxTimeout']}s")
    repos_ = grants.get("repositories")
    if repos_ and repos_ != ["*"]:
        parts.append("repos " + ",".join(repos_))
    return "; ".join(parts)


STATUS_STYLE: dict[str, str] = {
    ConnectionStatus.ACTIVE: "green",
    ConnectionStatus.PENDING: "yellow",
    ConnectionStatus.SUSPENDED: "magenta",
    ConnectionStatus.DISCONNECTED: "dim",
}


def _connections_table(rows: list[dict[str, Any]], title: str | None = None) -> Table:
    wide = console.width >= 120
    table = Table(title=title, header_style="bold")
    columns = ["connection", "peer", "kind", "direction", "status", "grants", "peer allows"]
    if wide:
        columns[2:2] = ["url"]
        columns.append("updated")
    for column in columns:
        table.add_column(column, no_wrap=column in ("connection", "status"))
    for row in rows:
        cells: dict[str, Any] = {
            "connection": str(row["connectionId"]),
            "peer": Text(str(row["remoteName"])),
            "kind": str(row.get("kind") or "fedagent"),
            "url": Text(str(row["remoteUrl"])),
            "direction": str(row["direction"]),
            "status": Text(str(row["status"]), style=STATUS_STYLE.get(str(row["status"]), "")),
            "grants": _grants_summary(row.get("grants") or {}),
            "peer allows": _grants_summary(row["peerGrants"])
            if row.get("peerGrants") is not None
            else "",
            "updated": _ago(row.get("updatedAt")),
        }
        table.add_row(*(cells[c] for c in columns))
    return table


# The grants a peer gets, as `fedagent accept` and `fedagent connect` take them.
AgentTypesOption = Annotated[
    str | None, typer.Option("--agent-types", help="Granted agent types, comma-separated.")
]
CommandTypesOption = Annotated[
    str | None,
    typer.Option("--command-types", help="Granted commands (agent.spawn,agent.status,...)."),
]
MaxConcurrentOption = Annotated[
    int | None, typer.Option("--max-concurrent", help="Agents the peer may run at once.")
]
MaxTimeoutOption = Annotated[
    int | None, typer.Option("--max-timeout", help="Longest agent timeout, seconds.")
]
RepositoriesOption = Annotated[
    str | None, typer.Option("--repositories", help="Allowed repository globs.")
]


def _grants_from_options(
    agent_types: str | None,
    command_types: str | None,
    max_concurrent: int | None,
    max_timeout: int | None,
    repositories: str | None,
) -> dict[str, Any]:
    return {
        key: value
        for key, value in {
            "agentTypes": _csv(agent_types),
            "commandTypes": _csv(command_types),
            "maxConcurrentAgents": max_concurrent,
            "maxTimeout": max_timeout,
            "repositories": _csv(repositories),
        }.items()
        if value is not None
    }


@app.command(rich_help_panel="Connections")
@uses_instance()
def connect(
    target: Remote,
    peer: Annotated[
        str | None,
        typer.Argument(help="The peer's URL, or its name in the same instances.json."),
    ] = None,
    a2a: Annotated[
        str | None,
        typer.Option(
            "--a2a",
            metavar="CARD_URL",
            help="Add an A2A agent as a peer instead, by its agent card's URL (or base URL):"
            " ACTIVE at once, spawns on it go over A2A 1.0.",
        ),
    ] = None,
    a2a_token: Annotated[
        str | None,
        typer.Option(
            "--a2a-token",
            envvar="FEDAGENT_A2A_TOKEN",
            help="With --a2a: the agent's bearer token (kept sealed on the instance; --token"
            " is this instance's own API token).",
        ),
    ] = None,
    accept: Annotated[
        bool,
        typer.Option(
            "--accept",
            help="Also accept on the peer (needs its admin token: a peer in instances.json).",
        ),
    ] = False,
    agent_types: AgentTypesOption = None,
    command_types: CommandTypesOption = None,
    max_concurrent: MaxConcurrentOption = None,
    max_timeout: MaxTimeoutOption = None,
    repositories: RepositoriesOption = None,
) -> None:
    """Ask a peer for a connection; it stays PENDING until the peer accepts.

    The peer may ask nothing of this instance over it unless the grant options say so (the
    same as `fedagent accept` takes), or until this instance's admin grants it later.
    `--a2a CARD_URL [--a2a-token T]` adds an A2A agent instead (no handshake, no grants)."""
    if a2a is not None:
        _connect_a2a(target, a2a, a2a_token, peer)
        return
    if peer is None:
        raise CliError("name the peer (its URL or name), or an A2A agent with --a2a CARD_URL")
    if a2a_token is not None:
        raise CliError("--a2a-token is for an A2A agent: use it with --a2a CARD_URL")
    remote_url, peer_info = resolve_peer_url(peer, target.data_dir)
    body: dict[str, Any] = {"remoteUrl": remote_url}
    grants = _grants_from_options(
        agent_types, command_types, max_concurrent, max_timeout, repositories
    )
    if grants:
        body["grants"] = grants
    with target.api() as api:
        connection = api.call("POST", "/connections", json=body)
    if accept:
        if peer_info is None:
            raise CliError(
                "--accept needs the peer's admin token: name the peer as it appears in "
                "instances.json, or accept on the peer with `fedagent accept`"
            )
        with Remote(str(peer_info["name"]), target.data_dir).api() as peer_api:
            connection = peer_api.call("POST", f"/connections/{connection['connectionId']}/accept")
    if target.as_json:
        _print_json(connection)
        return
    console.print(_connections_table([connection]))
    if connection["status"] == ConnectionStatus.PENDING:
        console.print(
            f"[dim]the peer accepts with:[/] fedagent accept {connection['connectionId']}"
            + (f" --instance {peer}" if peer_info else "")
        )


def _connect_a2a(target: Remote, card_url: str, token: str | None, peer: str | None) -> None:
    if peer is not None:
        raise CliError("--a2a takes the agent's card URL: name no peer besides it")
    body: dict[str, Any] = {"kind": "a2a", "remoteUrl": card_url}
    if token is not None:
        body["token"] = token
    with target.api() as api:
        connection = api.call("POST", "/connections", json=body)
    if target.as_json:
        _print_json(connection)
    else:
        console.print(_connections_table([connection]))


@app.command(rich_help_panel="Connections")
@uses_instance()
def connections(
    target: Remote,
) -> None:
    """List this instance's connections with peers."""
    with target.api() as api:
        rows = api.call("GET", "/connections")
    if target.as_json:
        _print_json(rows)
    elif not rows:
        console.print("no connections yet: [bold]fedagent connect PEER_URL[/]")
    else:
        console.print(_connections_table(rows))


@app.command(rich_help_panel="Connections")
@uses_instance()
def peers(target: Remote) -> None:
    """The peers you can spawn on (members too), and what each one allows this instance."""
    with target.api() as api:
        rows = api.call("GET", "/peers")
    if target.as_json:
        _print_json(rows)
        return
    if not rows:
        console.print("no peers to spawn on yet: an admin connects with [bold]fedagent connect[/]")
        return
    table = Table(header_style="bold")
    for column in ("peer", "kind", "connection", "status", "the peer allows"):
        table.add_column(column, no_wrap=column in ("connection", "status"))
    for row in rows:
        allows = row.get("peerGrants")
        kind = str(row.get("kind") or "fedagent")
        table.add_row(
            Text(str(row["peerName"])),
            kind,
            str(row["connectionId"]),
            Text(str(row["status"]), style=STATUS_STYLE.get(str(row["status"]), "")),
            _grants_summary(allows)
            if allows is not None
            else Text("what its card offers" if kind == "a2a" else "not told yet", style="dim"),
        )
    console.print(table)


def _csv(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value is not None else None


@app.command(rich_help_panel="Connections")
@uses_instance()
def accept(
    target: Remote,
    connection_id: Annotated[str, typer.Argument(help="The PENDING connection to accept.")],
    agent_types: Annotated[
        str | None, typer.Option("--agent-types", help="Granted agent types, comma-separated.")
    ] = None,
    command_types: Annotated[
        str | None,
        typer.Option("--command-types", help="Granted commands (agent.spawn,agent.status,...)."),
    ] = None,
    max_concurrent: Annotated[
        int | None, typer.Option("--max-concurrent", help="Agents the peer may run at once.")
    ] = None,
    max_timeout: Annotated[
        int | None, typer.Option("--max-timeout", help="Longest agent timeout, seconds.")
    ] = None,
    repositories: Annotated[
        str | None, typer.Option("--repositories", help="Allowed repository globs.")
    ] = None,
) -> None:
    """Accept a peer's connection request (optionally with grants): ACTIVE on both sides."""
    grants = _grants_from_options(
        agent_types, command_types, max_concurrent, max_timeout, repositories
    )
    body = {"grants": grants} if grants else None
    with target.api() as api:
        connection = api.call("POST", f"/connections/{connection_id}/accept", json=body)
    if target.as_json:
        _print_json(connection)
    else:
        console.print(_connections_table([connection]))


# --- agents -----------------------------------------------------------------------------------


class AgentTypeChoice(StrEnum):
    worker = "worker"
    reviewer = "reviewer"
    tester = "tester"


def _pick_connection(api: Api, peer: str | None) -> dict[str, Any]:
    """The ACTIVE connection to spawn over, from the peers any user may list (GET /peers)."""
    rows: list[dict[str, Any]] = api.call("GET", "/peers")
    active = [r for r in rows if r["status"] == ConnectionStatus.ACTIVE]
    if peer:
        matches = [
            r
            for r in active
            if peer in (r["peerName"], r["peerInstanceId"], str(r["connectionId"]))
        ]
    else:
        matches = active
    if len(matches) == 1:
        return matches[0]
    names = ", ".join(sorted({r["peerName"] for r in active})) or "none"
    if not matches:
        raise CliError(
            f"no ACTIVE connection{' to ' + repr(peer) if peer else ''} (active peers: {names})",
            hint="`fedagent connect PEER` then `fedagent accept ID` on the peer",
        )
    raise CliError(f"several ACTIVE connections ({names}): say which with --peer NAME")


def _read_instructions(path: Path) -> str:
    if str(path) == "-":
        return sys.stdin.read()
    try:
        return path.read_text()
    except FileNotFoundError:
        raise CliError(f"no file {path}", hint="-f takes a text file, or '-' for stdin") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise CliError(f"cannot read {path}: {reason}") from None


def uuid_arg(value: str, name: str) -> str:
    """An id argument as the API wants it; says which argument is wrong if it is not one."""
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise CliError(
            f"{name} {value!r} is not an id (ids look like 3f2b9c1e-7a4d-4c1b-9e2f-0a1b2c3d4e5f)",
            hint="`fedagent agents` lists agents, `fedagent peers` connections",
        ) from None


def _spawn_target(
    api: Api, *, here: bool, peer: str | None, connection_id: str | None
) -> dict[str, Any]:
    """Where to spawn: this instance (--here: no connection), or an ACTIVE connection's peer."""
    if here:
        if peer or connection_id:
            raise CliError("--here runs the agent on this instance: leave out --peer/--connection")
        return {"connectionId": None, "peerName": "this instance"}
    connection = (
        api.call("GET", f"/peers/{uuid_arg(connection_id, '--connection')}")
        if connection_id
        else _pick_connection(api, peer)
    )
    if connection["status"] != ConnectionStatus.ACTIVE:
        raise CliError(
            f"the connection to {connection['peerName']} is {connection['status']}",
            hint="`fedagent peers` shows the connections you can spawn over",
        )
    return {**connection, "connectionId": str(connection["connectionId"])}


@app.command(rich_help_panel="Agents")
@uses_instance()
def spawn(
    target: Remote,
    instructions: Annotated[
        list[str] | None,
        typer.Option(
            "--instructions",
            "-m",
            help="Task text; repeat for more lines. With the scripted provider, lines starting "
            "with '$ ' are shell commands.",
        ),
    ] = None,
    instructions_file: Annotated[
        Path | None,
        typer.Option("--file", "-f", help="Read the instructions from a file ('-': stdin)."),
    ] = None,
    peer: Annotated[
        str | None,
        typer.Option("--peer", "-p", help="Peer name or id (default: the only ACTIVE one)."),
    ] = None,
    connection_id: Annotated[
        str | None, typer.Option("--connection", "-c", help="Connection id.")
    ] = None,
    here: Annotated[
        bool,
        typer.Option("--here", help="Run the agent on this instance (a local run), not on a peer."),
    ] = False,
    task_id: Annotated[
        str | None, typer.Option("--task-id", "-t", help="Default: cli-<random>.")
    ] = None,
    agent_type: Annotated[AgentTypeChoice, typer.Option("--type")] = AgentTypeChoice.worker,
    repository: Annotated[str | None, typer.Option("--repository")] = None,
    branch: Annotated[str | None, typer.Option("--branch")] = None,
    work_items: Annotated[list[str] | None, typer.Option("--work-item", help="Repeatable.")] = None,
    timeout: Annotated[int, typer.Option("--timeout", help="Seconds the agent may run.")] = 3600,
    max_retries: Annotated[int, typer.Option("--max-retries")] = 0,
    queue: Annotated[
        bool, typer.Option("--queue", help="Wait for capacity instead of a 429.")
    ] = False,
    agent_id: Annotated[
        str | None, typer.Option("--agent-id", help="Idempotency: the same id runs once.")
    ] = None,
    follow: Annotated[
        bool,
        typer.Option("--follow", "-F", help="Show the agent's conversation live until the end."),
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="With --follow: one line per progress step.")
    ] = False,
) -> None:
    """Spawn an agent on a peer (or here, with --here); with --follow, watch it to the end and
    print its result."""
    text = _instructions_text(instructions, instructions_file)
    context = {
        "repository": repository,
        "branch": branch,
        "workItems": work_items or [],
        "instructions": text,
    }
    with target.api() as api:
        connection = _spawn_target(api, here=here, peer=peer, connection_id=connection_id)
        body = {
            "agentId": agent_id or str(uuid.uuid4()),
            "connectionId": connection["connectionId"],
            "taskId": task_id or f"cli-{uuid.uuid4().hex[:8]}",
            "agentType": agent_type.value,
            "context": context,
            "options": {"timeout": timeout, "maxRetries": max_retries, "queue": queue},
        }
        started = time.perf_counter()
        accepted = api.call("POST", "/agents/spawn", json=body)
        ack_ms = (time.perf_counter() - started) * 1000
        if not follow:
            _print_spawned(target, accepted, str(connection["peerName"]), ack_ms)
            return
        agent = _follow_spawned(api, target, accepted, str(connection["peerName"]), ack_ms, quiet)
    if target.as_json:
        _print_json(agent)
    else:
        from cli.follow import print_agent

        print_agent(agent, console)
    raise typer.Exit(0 if agent["state"] == AgentState.COMPLETED else 1)


def _instructions_text(instructions: list[str] | None, instructions_file: Path | None) -> str:
    """The task text: the -m lines, then the file's text."""
    if not instructions and instructions_file is None:
        raise CliError(
            "spawn needs the agent's instructions: -m TEXT (repeatable) or -f FILE",
            hint="e.g. fedagent spawn -m 'Count the files.' -m '$ ls | wc -l' "
            "(the scripted provider runs the lines that start with '$ ')",
        )
    text = "\n".join(instructions or [])
    if instructions_file is not None:
        file_text = _read_instructions(instructions_file)
        text = f"{text}\n{file_text}" if text else file_text
    return text


def _print_spawned(target: Remote, accepted: dict[str, Any], peer: str, ack_ms: float) -> None:
    if target.as_json:
        _print_json(accepted)
        return
    console.print(
        f"spawned agent [bold]{accepted['agentId']}[/] on "
        f"[bold]{peer}[/]: {accepted['state']} "
        f"[dim]({ack_ms:.0f} ms)[/]"
    )
    console.print(
        f"[dim]follow it:[/] fedagent status {accepted['agentId']} --follow" + target.instance_flag
    )


def _follow_spawned(
    api: Api, target: Remote, accepted: dict[str, Any], peer: str, ack_ms: float, quiet: bool
) -> dict[str, Any]:
    """Watch the spawned agent to its end; ^C stops watching, not the agent."""
    from cli.follow import follow_agent

    if not target.as_json:
        console.print(
            f"spawned agent [bold]{accepted['agentId']}[/] on "
            f"[bold]{peer}[/] [dim]({ack_ms:.0f} ms)[/]"
        )
    try:
        agent: dict[str, Any] = follow_agent(
            api,
            str(accepted["agentId"]),
            err_console if target.as_json else console,
            peer=peer,
            quiet=quiet,
        )
    except KeyboardInterrupt:
        err_console.print(
            f"stopped following; the agent keeps running: fedagent status "
            f"{accepted['agentId']}   (fedagent kill {accepted['agentId']} stops it)"
        )
        raise typer.Exit(130) from None
    return agent


def _peer_names(api: Api) -> dict[str, str]:
    """Peer instance id -> name: every connection for an admin, the live ones for a member."""
    try:
        return {c["remoteInstanceId"]: c["remoteName"] for c in api.call("GET", "/connections")}
    except CliError:
        pass
    try:
        return {p["peerInstanceId"]: p["peerName"] for p in api.call("GET", "/peers")}
    except CliError:
        return {}


Hosted = Annotated[
    bool, typer.Option("--hosted", help="A run a peer started on this instance (admin).")
]


@app.command(rich_help_panel="Agents")
@uses_instance()
def agents(
    target: Remote,
    state: Annotated[AgentState | None, typer.Option("--state")] = None,
    connection_id: Annotated[str | None, typer.Option("--connection", "-c")] = None,
    agent_type: Annotated[AgentTypeChoice | None, typer.Option("--type")] = None,
    task_id: Annotated[str | None, typer.Option("--task-id", "-t")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n")] = 50,
    hosted: Annotated[
        bool,
        typer.Option("--hosted", help="Runs peers started on this instance (admin) instead."),
    ] = False,
    peer: Annotated[
        str | None, typer.Option("--peer", "-p", help="With --hosted: the requester's name or id.")
    ] = None,
) -> None:
    """Agents this instance spawned on peers, newest first; --hosted: those peers run here."""
    from cli.agent_table import agents_table

    params: dict[str, Any] = {"limit": limit}
    if state:
        params["state"] = state.value
    if hosted:
        if connection_id or agent_type or task_id:
            raise CliError("with --hosted, filter by --peer and --state")
        if peer:
            params["peer"] = peer
    elif peer:
        raise CliError("--peer filters --hosted runs; for your own agents use --connection")
    if connection_id:
        params["connectionId"] = uuid_arg(connection_id, "--connection")
    if agent_type:
        params["agentType"] = agent_type.value
    if task_id:
        params["taskId"] = task_id
    with target.api() as api:
        rows = api.call("GET", "/hosted" if hosted else "/agents", params=params)
        peers = _peer_names(api) if rows and not target.as_json else {}
    if target.as_json:
        _print_json(rows)
        return
    if not rows:
        what = "runs hosted for peers" if hosted else "agents"
        console.print(f"no {what}" + (" match" if len(params) > 1 else " yet"))
        if not hosted and not params.get("state"):
            console.print(
                "[dim]runs that peers started here:[/] fedagent agents --hosted"
                + target.instance_flag
            )
        return
    console.print(agents_table(rows, peers, hosted=hosted, width=console.width, ago=_ago))


@app.command(rich_help_panel="Agents")
@uses_instance()
def status(
    target: Remote,
    agent_id: Annotated[str, typer.Argument(help="The agent's id.")],
    follow: Annotated[bool, typer.Option("--follow", "-F", help="Watch it to the end.")] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="With --follow: one line per progress step.")
    ] = False,
    hosted: Hosted = False,
    diff: Annotated[
        bool, typer.Option("--diff", help="Write the agent's whole diff to stdout instead.")
    ] = False,
) -> None:
    """One agent: state, progress, changed files, result, where to see it in Temporal."""
    from cli.follow import follow_agent, print_agent

    agent_id = uuid_arg(agent_id, "AGENT_ID")
    if diff:
        with target.api() as api:
            write_diff(api, agent_id, sys.stdout.buffer)
        return
    with target.api() as api:
        agent = api.call("GET", f"/{'hosted' if hosted else 'agents'}/{agent_id}")
        if follow and not hosted:
            try:
                agent = follow_agent(
                    api, agent_id, err_console if target.as_json else console, quiet=quiet
                )
            except KeyboardInterrupt:
                raise typer.Exit(130) from None
        peer_name = None if target.as_json else _peer_names(api).get(agent["peerInstanceId"])
    if target.as_json:
        _print_json(agent)
    else:
        print_agent(
            agent,
            console,
            peer=peer_name,
            links=_temporal_links(target, agent, hosted=hosted),
        )


def _temporal_links(target: Remote, agent: dict[str, Any], *, hosted: bool) -> list[str]:
    """Both sides' workflows in the Temporal Web UI, when instances.json says where it is."""
    from urllib.parse import quote

    try:
        here = resolve_target(target.instance, target.data_dir, target.url, target.token).info
        doc = load_instances(target.data_dir) if here is not None else None
    except CliError:
        return []
    if here is None or doc is None:
        return []
    other = next(
        (
            i
            for i in doc.get("instances", {}).values()
            if i["instanceId"] == agent["peerInstanceId"]
        ),
        None,
    )
    requester, executor = (other, here) if hosted else (here, other)
    links = []
    if requester is not None:
        workflow = quote(f"remote-agent/{agent['agentId']}", safe="")
        links.append(f"requester ({requester['name']}): {requester['temporalUiUrl']}/{workflow}")
    if executor is not None and requester is not None:
        workflow = quote(f"agent-run/{requester['instanceId']}/{agent['agentId']}", safe="")
        links.append(f"executor ({executor['name']}): {executor['temporalUiUrl']}/{workflow}")
    return links


@app.command(name="diff", rich_help_panel="Agents")
@uses_instance()
def diff_command(
    target: Remote,
    agent_id: Annotated[str, typer.Argument(help="The agent's id.")],
) -> None:
    """Write the agent's whole diff to stdout (`> x.patch`; `git apply x.patch` takes it),
    checked against the result's diffSha256 and diffBytes."""
    agent_id = uuid_arg(agent_id, "AGENT_ID")
    with target.api() as api:
        write_diff(api, agent_id, sys.stdout.buffer)


@app.command(rich_help_panel="Agents")
@uses_instance()
def kill(
    target: Remote,
    agent_id: Annotated[str, typer.Argument(help="The agent to stop.")],
    hosted: Hosted = False,
) -> None:
    """Stop an agent; answers once its sandbox on the peer is gone. With --hosted, an executor's
    admin stops a run a peer started here (the peer sees it killed)."""
    from cli.follow import state_text

    agent_id = uuid_arg(agent_id, "AGENT_ID")
    with target.api() as api:
        started = time.perf_counter()
        answer = api.call("POST", f"/{'hosted' if hosted else 'agents'}/{agent_id}/kill")
        elapsed = (time.perf_counter() - started) * 1000
    if target.as_json:
        _print_json(answer)
        return
    line = Text(f"agent {answer['agentId']}: ")
    line.append_text(state_text(str(answer["state"])))
    line.append(f"  ({elapsed:.0f} ms)", style="dim")
    console.print(line)


# --- keys, doctor -------------------------------------------------------------------------------


class Algorithm(StrEnum):
    ed25519 = "Ed25519"
    rsa = "RSA-PSS-SHA256"


@keys_app.command("rotate")
@uses_instance()
def keys_rotate(
    target: Remote,
    algorithm: Annotated[Algorithm, typer.Option("--algorithm")] = Algorithm.ed25519,
    grace: Annotated[
        int | None,
        typer.Option(
            "--grace", help="Seconds the current key still verifies (default: the setting)."
        ),
    ] = None,
) -> None:
    """Sign with a new key from now on; peers are told; the old key verifies for a grace period."""
    body: dict[str, Any] = {"algorithm": algorithm.value}
    if grace is not None:
        body["graceSeconds"] = grace
    with target.api() as api:
        rotated = api.call("POST", "/instance/keys/rotate", json=body)
    if target.as_json:
        _print_json(rotated)
        return
    console.print(f"new signing key [bold]{rotated['keyId']}[/] ({rotated['algorithm']})")
    table = Table(header_style="bold")
    for column in ("key", "algorithm", "status", "valid until"):
        table.add_column(column)
    for key in rotated.get("keys", []):
        table.add_row(key["keyId"], key["algorithm"], key["status"], key.get("validUntil") or "—")
    console.print(table)


@app.command(rich_help_panel="Operate")
@uses_instance(remote=False)
def gc(
    target: Remote,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Count what would be deleted; delete nothing.")
    ] = False,
) -> None:
    """Delete what the instance keeps past its retention: workspaces of ended runs on this
    host, then messages, events, transcripts, checkpoints, artifacts and run records of runs
    that ended long enough ago (FEDAGENT_*_RETENTION). Prints what it deletes per kind.

    The worker does the same on its own (FEDAGENT_RETENTION_INTERVAL); uses the FEDAGENT_*
    settings, or those of --instance NAME in a dev stack's instances.json."""
    from operations.retention import collect_garbage

    settings = _settings()
    if target.instance:
        settings = settings.model_copy(
            update={"instance_name": target.instance, "data_dir": target.data_dir}
        )

    async def run(pool: Any) -> Any:
        return await collect_garbage(pool, settings, dry_run=dry_run)

    report = _with_database(target, run)
    if target.as_json:
        _print_json(
            {
                "dryRun": report.dry_run,
                "kinds": {k: {"count": a.rows, "bytes": a.bytes} for k, a in report.kinds.items()},
            }
        )
        return
    for line in report.lines():
        print(line)


@app.command(rich_help_panel="Operate")
@uses_instance(remote=False)
def doctor(
    target: Remote,
) -> None:
    """Check Temporal, PostgreSQL, the sandbox and secret files; say how to fix what fails.

    Uses the FEDAGENT_* settings, or those of --instance NAME in a dev stack's instances.json.
    """
    from cli.doctor import run_checks

    info = instance_info(target.data_dir, target.instance) if target.instance else None
    _, checks = asyncio.run(run_checks(info, target.data_dir if target.instance else None))
    failed = any(c.status == "fail" for c in checks)
    if target.as_json:
        _print_json([c.__dict__ for c in checks])
        raise typer.Exit(1 if failed else 0)
    marks = {"ok": ("✓", "green"), "warn": ("!", "yellow"), "fail": ("✗", "bold red")}
    table = Table(header_style="bold", show_lines=False)
    table.add_column("")
    table.add_column("check")
    table.add_column("finding", overflow="fold")
    for check in checks:
        mark, style = marks[check.status]
        table.add_row(Text(mark, style=style), check.name, check.detail)
    console.print(table)
    fixes = [c for c in checks if c.fix and c.status != "ok"]
    for check in fixes:
        style = marks[check.status][1]
        console.print(Text(f"{check.name}: ", style=style) + Text(f"{check.fix}"))
    console.print(
        Text("some checks failed", style="bold red")
        if failed
        else Text("ready to run an instance", style="bold green")
    )
    raise typer.Exit(1 if failed else 0)


# --- entry point ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    try:
        app(args=argv, prog_name="fedagent")  # standalone: usage errors print and exit
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return int(exc.code or 0)
        return 1
    except CliError as exc:
        err_console.print(Text("error: ", style="bold red") + Text(exc.message))
        if exc.hint:
            err_console.print(Text("hint: ", style="yellow") + Text(exc.hint))
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback with secrets in locals
        if os.environ.get("FEDAGENT_DEBUG"):
            raise
        first = (str(exc).strip().splitlines() or [""])[0]
        err_console.print(
            Text("error: ", style="bold red") + Text(f"{exc.__class__.__name__}: {first}")
        )
        err_console.print(
            Text("hint: ", style="yellow")
            + Text("`fedagent doctor` checks the pieces; FEDAGENT_DEBUG=1 shows the traceback")
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
