"""The options every `fedagent` command that talks to an instance shares (--instance, --data-dir,
--url, --token, --json), defined once: a command declares a `target: Remote` parameter and
`@uses_instance` adds the options to its signature and hands it one `Remote`."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from cli.client import DEFAULT_DATA_DIR, Api, resolve_target

PANEL = "Instance"

Instance = Annotated[
    str | None,
    typer.Option(
        "--instance",
        "-i",
        help="Instance name in DATA_DIR/instances.json (written by `fedagent dev`).",
        rich_help_panel=PANEL,
        show_default=False,
    ),
]
DataDir = Annotated[
    Path,
    typer.Option(
        "--data-dir",
        envvar="FEDAGENT_DATA_DIR",
        help="Where the dev stack keeps its data and instances.json.",
        rich_help_panel=PANEL,
    ),
]
Url = Annotated[
    str | None,
    typer.Option(
        "--url",
        envvar="FEDAGENT_URL",
        help="The instance's API URL.",
        rich_help_panel=PANEL,
        show_default=False,
    ),
]
Token = Annotated[
    str | None,
    typer.Option(
        "--token",
        envvar="FEDAGENT_TOKEN",
        help="API token (bearer).",
        rich_help_panel=PANEL,
        show_default=False,
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


@dataclass(frozen=True)
class Remote:
    """Which instance a command talks to, and how it prints."""

    instance: str | None = None
    data_dir: Path = DEFAULT_DATA_DIR
    url: str | None = None
    token: str | None = None
    as_json: bool = False

    def api(self) -> Api:
        return Api(resolve_target(self.instance, self.data_dir, self.url, self.token))

    @property
    def instance_flag(self) -> str:
        """` -i NAME` to repeat in a suggested command, or nothing."""
        return f" -i {self.instance}" if self.instance else ""


_SHARED: dict[str, tuple[Any, Any]] = {
    "instance": (Instance, None),
    "data_dir": (DataDir, DEFAULT_DATA_DIR),
    "url": (Url, None),
    "token": (Token, None),
    "as_json": (AsJson, False),
}

F = TypeVar("F", bound=Callable[..., Any])


def _shared_options(
    param: str, build: Callable[..., Any], options: dict[str, tuple[Any, Any]]
) -> Callable[[F], F]:
    """Replace a command's `param` parameter by `options` (name: (annotation, default)) in the
    signature typer reads; the command gets `build(**their values)` as `param`."""

    def decorate(fn: F) -> F:
        signature = inspect.signature(fn, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name != param]
        shared = [
            inspect.Parameter(
                name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation
            )
            for name, (annotation, default) in options.items()
        ]

        @functools.wraps(fn)
        def command(*args: Any, **kwargs: Any) -> Any:
            value = build(**{name: kwargs.pop(name) for name in options})
            return fn(*args, **{param: value}, **kwargs)

        command.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=[*(p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own), *shared]
        )
        return command  # type: ignore[return-value]

    return decorate


def uses_instance(*, remote: bool = True, as_json: bool = True) -> Callable[[F], F]:
    """Add the shared options to a command taking `target: Remote`.

    `remote=False` leaves out --url/--token (commands that read instances.json only);
    `as_json=False` leaves out --json."""
    names = ["instance", "data_dir"]
    if remote:
        names += ["url", "token"]
    if as_json:
        names.append("as_json")
    return _shared_options("target", Remote, {name: _SHARED[name] for name in names})


# --- the local stack (`fedagent dev`, `fedagent demo`) ------------------------------------------

Instances = Annotated[str, typer.Option("--instances", help="Comma-separated instance names.")]
BasePort = Annotated[int, typer.Option("--base-port", help="API of instance n: base+n.")]
TemporalPort = Annotated[int, typer.Option("--temporal-port", help="Temporal's gRPC port.")]
UiPort = Annotated[
    int | None,
    typer.Option("--ui-port", help="Temporal Web UI (default: a free port).", show_default=False),
]
Workers = Annotated[int, typer.Option("--workers", help="Worker processes per instance.")]


@dataclass(frozen=True)
class StackOptions:
    """How `fedagent dev` and `fedagent demo` lay out the local stack."""

    instances: str = "hub,spoke"
    data_dir: Path = DEFAULT_DATA_DIR
    base_port: int = 8100
    temporal_port: int = 7233
    ui_port: int | None = None
    workers: int = 1

    @property
    def names(self) -> list[str]:
        return [n.strip() for n in self.instances.split(",") if n.strip()]


def uses_stack(fn: F) -> F:
    """Add the local stack's options to a command taking `stack: StackOptions`."""
    return _shared_options(
        "stack",
        StackOptions,
        {
            "instances": (Instances, "hub,spoke"),
            "data_dir": (DataDir, DEFAULT_DATA_DIR),
            "base_port": (BasePort, 8100),
            "temporal_port": (TemporalPort, 7233),
            "ui_port": (UiPort, None),
            "workers": (Workers, 1),
        },
    )(fn)
