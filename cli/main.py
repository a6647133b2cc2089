"""`fedagent`: run an instance (serve, worker), a local stack (dev, demo), and drive instances
from the terminal (connect, connections, accept, spawn, agents, status, kill, token, keys,
doctor)."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
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
    DEFAULT_DATA_DIR,
    Api,
    CliError,
    instance_info,
    resolve_peer_url,
    resolve_target,
    write_diff,
)
from federation.settings import Settings

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

# --- shared options ---------------------------------------------------------------------------

Instance = Annotated[
    str | None,
    typer.Option(
        "--instance",
        "-i",
        help="Instance name in DATA_DIR/instances.json (written by `fedagent dev`).",
        rich_help_panel="Instance",
    ),
]
DataDir = Annotated[
    Path,
    typer.Option("--data-dir", help="Where instances.json lives.", rich_help_panel="Instance"),
]
Url = Annotated[
    str | None,
    typer.Option(
        "--url", envvar="FEDAGENT_URL", help="The instance's API URL.", rich_help_panel="Instance"
    ),
]
Token = Annotated[
    str | None,
    typer.Option(
        "--token",
        envvar="FEDAGENT_TOKEN",
        help="API token (bearer).",
        rich_help_panel="Instance",
        show_default=False,
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _api(instance: str | None, data_dir: Path, url: str | None, token: str | None) -> Api:
    return Api(resolve_target(instance, data_dir, url, token))


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


async def _until_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


Instances = Annotated[str, typer.Option("--instances", help="Comma-separated instance names.")]
BasePort = Annotated[int, typer.Option("--base-port", help="API of instance n: base+n.")]
TemporalPort = Annotated[int, typer.Option("--temporal-port")]
UiPort = Annotated[
    int | None, typer.Option("--ui-port", help="Default: temporal port + 1000.", show_default=False)
]
Workers = Annotated[int, typer.Option("--workers", help="Worker processes per instance.")]


@app.command(rich_help_panel="Run")
def dev(
    instances: Instances = "hub,spoke",
    data_dir: DataDir = DEFAULT_DATA_DIR,
    base_port: BasePort = 8100,
    temporal_port: TemporalPort = 7233,
    ui_port: UiPort = None,
    workers: Workers = 1,
) -> None:
    """Run the embedded stack (Temporal dev server, PostgreSQL, instances) until Ctrl-C."""
    from cli.devstack import DevStack

    async def run() -> None:
        stack = DevStack(
            [n.strip() for n in instances.split(",") if n.strip()],
            data_dir,
            base_port=base_port,
            temporal_port=temporal_port,
            ui_port=ui_port,
            workers_per_instance=workers,
        )
        try:
            doc = await stack.start()
            print(f"Temporal UI: {stack.ui_url}", flush=True)
            for name, info in doc["instances"].items():
                print(f"{name}: {info['apiUrl']} (namespace {info['namespace']})", flush=True)
            print(f"wrote {stack.data_dir / 'instances.json'}; Ctrl-C stops", flush=True)
            await _until_signal()
        finally:
            stack.stop()

    asyncio.run(run())


@app.command(rich_help_panel="Run")
def demo(
    instances: Instances = "hub,spoke",
    data_dir: DataDir = Path(".fedagent/demo"),
    base_port: BasePort = 8100,
    temporal_port: TemporalPort = 7233,
    ui_port: UiPort = None,
    workers: Workers = 1,
    exit_at_end: Annotated[
        bool, typer.Option("--exit", help="Stop everything at the end.")
    ] = False,
) -> None:
    """Start the stack, connect hub to spoke, spawn one agent and follow it."""
    from cli.demo import run_demo

    args = argparse.Namespace(
        instances=instances,
        data_dir=str(data_dir),
        base_port=base_port,
        temporal_port=temporal_port,
        ui_port=ui_port,
        workers=workers,
        exit=exit_at_end,
    )
    raise typer.Exit(asyncio.run(run_demo(args)))


@app.command(rich_help_panel="Run")
def serve() -> None:
    """Run this instance's API (FEDAGENT_* settings)."""
    import uvicorn

    from api.main import create_app

    settings = Settings()
    _configure_logging(settings)
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
    from worker.main import main as worker_main

    settings = Settings()
    _configure_logging(settings)
    worker_main(settings)


class Role(StrEnum):
    admin = "admin"
    member = "member"


@token_app.command("create")
def token_create(
    name: Annotated[str, typer.Option("--name", help="Who the token is for.")] = "cli",
    role: Annotated[Role, typer.Option("--role")] = Role.member,
    workspace: Annotated[str, typer.Option("--workspace")] = "default",
    instance: Instance = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Print a new API token (stored hashed, shown once). Writes to the instance's database:
    FEDAGENT_DATABASE_URL, or the one of --instance NAME in instances.json."""
    from federation.store import repos
    from federation.store.db import create_pool, migrate

    database_url = (
        str(instance_info(data_dir, instance)["databaseUrl"]) if instance else None
    ) or Settings().database_url

    async def run() -> str:
        pool = await create_pool(database_url, max_size=1)
        try:
            await migrate(pool)
            return await repos.create_token(pool, name=name, role=role.value, workspace=workspace)
        finally:
            await pool.close()

    print(asyncio.run(run()))


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


STATUS_STYLE = {
    "ACTIVE": "green",
    "PENDING": "yellow",
    "SUSPENDED": "magenta",
    "DISCONNECTED": "dim",
}


def _connections_table(rows: list[dict[str, Any]], title: str | None = None) -> Table:
    wide = console.width >= 120
    table = Table(title=title, header_style="bold")
    columns = ["connection", "peer", "direction", "status", "grants"]
    if wide:
        columns[2:2] = ["url"]
        columns.append("updated")
    for column in columns:
        table.add_column(column, no_wrap=column in ("connection", "status"))
    for row in rows:
        cells: dict[str, Any] = {
            "connection": str(row["connectionId"]),
            "peer": str(row["remoteName"]),
            "url": str(row["remoteUrl"]),
            "direction": str(row["direction"]),
            "status": Text(str(row["status"]), style=STATUS_STYLE.get(str(row["status"]), "")),
            "grants": _grants_summary(row.get("grants") or {}),
            "updated": _ago(row.get("updatedAt")),
        }
        table.add_row(*(cells[c] for c in columns))
    return table


@app.command(rich_help_panel="Connections")
def connect(
    peer: Annotated[
        str, typer.Argument(help="The peer's URL, or its name in the same instances.json.")
    ],
    accept: Annotated[
        bool,
        typer.Option(
            "--accept",
            help="Also accept on the peer (needs its admin token: a peer in instances.json).",
        ),
    ] = False,
    instance: Instance = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    url: Url = None,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Ask a peer for a connection; it stays PENDING until the peer accepts."""
    remote_url, peer_info = resolve_peer_url(peer, data_dir)
    with _api(instance, data_dir, url, token) as api:
        connection = api.call("POST", "/connections", json={"remoteUrl": remote_url})
    if accept:
        if peer_info is None:
            raise CliError(
                "--accept needs the peer's admin token: name the peer as it appears in "
                "instances.json, or accept on the peer with `fedagent accept`"
            )
        with Api(resolve_target(str(peer_info["name"]), data_dir, None, None)) as peer_api:
            connection = peer_api.call("POST", f"/connections/{connection['connectionId']}/accept")
    if as_json:
        _print_json(connection)
        return
    console.print(_connections_table([connection]))
    if connection["status"] == "PENDING":
        console.print(
            f"[dim]the peer accepts with:[/] fedagent accept {connection['connectionId']}"
            + (f" --instance {peer}" if peer_info else "")
        )


@app.command(rich_help_panel="Connections")
def connections(
    instance: Instance = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    url: Url = None,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """List this instance's connections with peers."""
    with _api(instance, data_dir, url, token) as api:
        rows = api.call("GET", "/connections")
    if as_json:
        _print_json(rows)
    elif not rows:
        console.print("no connections yet: [bold]fedagent connect PEER_URL[/]")
    else:
        console.print(_connections_table(rows))


def _csv(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value is not None else None


@app.command(rich_help_panel="Connections")
def accept(
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
    instance: Instance = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    url: Url = None,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Accept a peer's connection request (optionally with grants): ACTIVE on both sides."""
    grants: dict[str, Any] = {
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
    body = {"grants": grants} if grants else None
    with _api(instance, data_dir, url, token) as api:
        connection = api.call("POST", f"/connections/{connection_id}/accept", json=body)
    if as_json:
        _print_json(connection)
    else:
        console.print(_connections_table([connection]))


# --- agents -----------------------------------------------------------------------------------


class AgentTypeChoice(StrEnum):
    worker = "worker"
    reviewer = "reviewer"
    tester = "tester"


class StateChoice(StrEnum):
    spawning = "spawning"
    running = "running"
    completed = "completed"
    failed = "failed"
    killed = "killed"
    timed_out = "timed_out"


def _pick_connection(api: Api, peer: str | None) -> dict[str, Any]:
    rows: list[dict[str, Any]] = api.call("GET", "/connections")
    active = [r for r in rows if r["status"] == "ACTIVE"]
    if peer:
        matches = [
            r
            for r in active
            if peer in (r["remoteName"], r["remoteInstanceId"], str(r["connectionId"]))
        ]
    else:
        matches = active
    if len(matches) == 1:
        return matches[0]
    names = ", ".join(sorted({r["remoteName"] for r in active})) or "none"
    if not matches:
        raise CliError(
            f"no ACTIVE connection{' to ' + repr(peer) if peer else ''} (active peers: {names})",
            hint="`fedagent connect PEER` then `fedagent accept ID` on the peer",
        )
    raise CliError(f"several ACTIVE connections ({names}): say which with --peer NAME")


@app.command(rich_help_panel="Agents")
def spawn(
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
    instance: Instance = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    url: Url = None,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Spawn an agent on a peer; with --follow, watch it to the end and print its result."""
    from cli.follow import follow_agent, print_agent

    text = "\n".join(instructions or [])
    if instructions_file is not None:
        file_text = (
            sys.stdin.read() if str(instructions_file) == "-" else instructions_file.read_text()
        )
        text = f"{text}\n{file_text}" if text else file_text
    with _api(instance, data_dir, url, token) as api:
        connection = (
            api.call("GET", f"/connections/{connection_id}")
            if connection_id
            else _pick_connection(api, peer)
        )
        body = {
            "agentId": agent_id or str(uuid.uuid4()),
            "connectionId": str(connection["connectionId"]),
            "taskId": task_id or f"cli-{uuid.uuid4().hex[:8]}",
            "agentType": agent_type.value,
            "context": {
                "repository": repository,
                "branch": branch,
                "workItems": work_items or [],
                "instructions": text,
            },
            "options": {"timeout": timeout, "maxRetries": max_retries, "queue": queue},
        }
        started = time.perf_counter()
        accepted = api.call("POST", "/agents/spawn", json=body)
        ack_ms = (time.perf_counter() - started) * 1000
        if not follow:
            if as_json:
                _print_json(accepted)
            else:
                console.print(
                    f"spawned agent [bold]{accepted['agentId']}[/] on "
                    f"[bold]{connection['remoteName']}[/]: {accepted['state']} "
                    f"[dim]({ack_ms:.0f} ms)[/]"
                )
                console.print(
                    f"[dim]follow it:[/] fedagent status {accepted['agentId']} --follow"
                    + (f" -i {instance}" if instance else "")
                )
            return
        if not as_json:
            console.print(
                f"spawned agent [bold]{accepted['agentId']}[/] on "
                f"[bold]{connection['remoteName']}[/] [dim]({ack_ms:.0f} ms)[/]"
            )
        try:
            agent = follow_agent(
                api,
                str(accepted["agentId"]),
                err_console if as_json else console,
                peer=str(connection["remoteName"]),
                quiet=quiet,
            )
        except KeyboardInterrupt:
            err_console.print(
                f"stopped following; the agent keeps running: fedagent status "
                f"{accepted['agentId']}   (fedagent kill {accepted['agentId']} stops it)"
            )
            raise typer.Exit(130) from None
    if as_json:
        _print_json(agent)
    else:
        print_agent(agent, console)
    raise typer.Exit(0 if agent["state"] == "completed" else 1)


@app.command(rich_help_panel="Agents")
def agents(
    state: Annotated[StateChoice | None, typer.Option("--state")] = None,
    connection_id: Annotated[str | None, typer.Option("--connection", "-c")] = None,
    agent_type: Annotated[AgentTypeChoice | None, typer.Option("--type")] = None,
    task_id: Annotated[str | None, typer.Option("--task-id", "-t")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n")] = 50,
    instance: Instance = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    url: Url = None,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Agents this instance spawned on peers, newest first."""
    from cli.follow import describe_progress, state_text

    params: dict[str, Any] = {"limit": limit}
    if state:
        params["state"] = state.value
    if connection_id:
        params["connectionId"] = connection_id
    if agent_type:
        params["agentType"] = agent_type.value
    if task_id:
        params["taskId"] = task_id
    with _api(instance, data_dir, url, token) as api:
        rows = api.call("GET", "/agents", params=params)
        peers: dict[str, str] = {}
        if rows and not as_json:
            try:
                peers = {
                    c["remoteInstanceId"]: c["remoteName"] for c in api.call("GET", "/connections")
                }
            except CliError:
                pass  # a member token cannot list connections: show ids
    if as_json:
        _print_json(rows)
        return
    if not rows:
        console.print("no agents" + (" match" if len(params) > 1 else " yet"))
        return
    wide = console.width >= 120
    columns = ["agent", "state", "task", "progress / error"]
    if wide:
        columns[2:2] = ["type"]
        columns[4:4] = ["peer"]
        columns.append("created")
    table = Table(header_style="bold")
    for column in columns:
        table.add_column(column, no_wrap=column in ("agent", "state"))
    for row in rows:
        detail = (
            Text(str(row["error"]), style="red")
            if row.get("error")
            else Text(describe_progress(row.get("progress")))
        )
        cells: dict[str, Any] = {
            "agent": str(row["agentId"]),
            "state": state_text(str(row["state"])),
            "type": str(row["agentType"]),
            "task": str(row["taskId"]),
            "peer": peers.get(row["peerInstanceId"], str(row["peerInstanceId"])[:12]),
            "progress / error": detail,
            "created": _ago(row.get("createdAt")),
        }
        table.add_row(*(cells[c] for c in columns))
    console.print(table)


@app.command(rich_help_panel="Agents")
def status(
    agent_id: Annotated[str, typer.Argument(help="The agent's id.")],
    follow: Annotated[bool, typer.Option("--follow", "-F", help="Watch it to the end.")] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="With --follow: one line per progress step.")
    ] = False,
    instance: Instance = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    url: Url = None,
    token: Token = None,
    as_json: AsJson = False,
    diff: Annotated[
        bool, typer.Option("--diff", help="Write the agent's whole diff to stdout instead.")
    ] = False,
) -> None:
    """One agent: state, progress, result."""
    from cli.follow import follow_agent, print_agent

    if diff:
        with _api(instance, data_dir, url, token) as api:
            write_diff(api, agent_id, sys.stdout.buffer)
        return
    with _api(instance, data_dir, url, token) as api:
        agent = api.call("GET", f"/agents/{agent_id}")
        if follow:
            try:
                agent = follow_agent(
                    api, agent_id, err_console if as_json else console, quiet=quiet
                )
            except KeyboardInterrupt:
                raise typer.Exit(130) from None
    if as_json:
        _print_json(agent)
    else:
        print_agent(agent, console)


@app.command(name="diff", rich_help_panel="Agents")
def diff_command(
    agent_id: Annotated[str, typer.Argument(help="The agent's id.")],
    instance: Instance = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    url: Url = None,
    token: Token = None,
) -> None:
    """Write the agent's whole diff to stdout (`> x.patch`; `git apply x.patch` takes it),
    checked against the result's diffSha256 and diffBytes."""
    with _api(instance, data_dir, url, token) as api:
        write_diff(api, agent_id, sys.stdout.buffer)


@app.command(rich_help_panel="Agents")
def kill(
    agent_id: Annotated[str, typer.Argument(help="The agent to stop.")],
    instance: Instance = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    url: Url = None,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Stop an agent; answers once its sandbox on the peer is gone."""
    from cli.follow import state_text

    with _api(instance, data_dir, url, token) as api:
        started = time.perf_counter()
        answer = api.call("POST", f"/agents/{agent_id}/kill")
        elapsed = (time.perf_counter() - started) * 1000
    if as_json:
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
def keys_rotate(
    algorithm: Annotated[Algorithm, typer.Option("--algorithm")] = Algorithm.ed25519,
    grace: Annotated[
        int | None,
        typer.Option(
            "--grace", help="Seconds the current key still verifies (default: the setting)."
        ),
    ] = None,
    instance: Instance = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    url: Url = None,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Sign with a new key from now on; peers are told; the old key verifies for a grace period."""
    body: dict[str, Any] = {"algorithm": algorithm.value}
    if grace is not None:
        body["graceSeconds"] = grace
    with _api(instance, data_dir, url, token) as api:
        rotated = api.call("POST", "/instance/keys/rotate", json=body)
    if as_json:
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
def doctor(
    instance: Instance = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    as_json: AsJson = False,
) -> None:
    """Check Temporal, PostgreSQL, the sandbox and secret files; say how to fix what fails.

    Uses the FEDAGENT_* settings, or those of --instance NAME in a dev stack's instances.json.
    """
    from cli.doctor import run_checks

    info = instance_info(data_dir, instance) if instance else None
    _, checks = asyncio.run(run_checks(info, data_dir if instance else None))
    failed = any(c.status == "fail" for c in checks)
    if as_json:
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
