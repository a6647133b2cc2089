"""`fedagent` command line: dev stack, demo, serve, worker, token."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path

from federation.settings import Settings


def _logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


async def _until_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def cmd_dev(args: argparse.Namespace) -> int:
    from cli.devstack import DevStack

    async def run() -> None:
        stack = DevStack(
            [n.strip() for n in args.instances.split(",") if n.strip()],
            Path(args.data_dir),
            base_port=args.base_port,
            temporal_port=args.temporal_port,
            ui_port=args.ui_port,
            workers_per_instance=args.workers,
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
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from cli.demo import run_demo

    return asyncio.run(run_demo(args))


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from api.main import create_app

    settings = Settings()
    _logging(settings.log_level)
    uvicorn.run(
        create_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        log_level=settings.log_level,
        access_log=False,
    )
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from worker.main import main as worker_main

    settings = Settings()
    _logging(settings.log_level)
    worker_main(settings)
    return 0


def cmd_token_create(args: argparse.Namespace) -> int:
    from federation.store import repos
    from federation.store.db import create_pool, migrate

    async def run() -> str:
        settings = Settings()
        pool = await create_pool(settings.database_url, max_size=1)
        try:
            await migrate(pool)
            return await repos.create_token(
                pool, name=args.name, role=args.role, workspace=args.workspace
            )
        finally:
            await pool.close()

    print(asyncio.run(run()))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedagent", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def stack_options(sp: argparse.ArgumentParser, data_dir: str) -> None:
        sp.add_argument("--instances", default="hub,spoke", help="comma-separated names")
        sp.add_argument("--data-dir", default=data_dir)
        sp.add_argument("--base-port", type=int, default=8100, help="API of instance n: base+n")
        sp.add_argument("--temporal-port", type=int, default=7233)
        sp.add_argument("--ui-port", type=int, default=None, help="default: temporal port + 1000")
        sp.add_argument("--workers", type=int, default=1, help="worker processes per instance")

    dev = sub.add_parser("dev", help="run the embedded stack until Ctrl-C")
    stack_options(dev, ".fedagent/dev")
    dev.set_defaults(func=cmd_dev)

    demo = sub.add_parser("demo", help="start the stack, connect hub to spoke, spawn one agent")
    stack_options(demo, ".fedagent/demo")
    demo.add_argument("--exit", action="store_true", help="stop everything at the end")
    demo.set_defaults(func=cmd_demo)

    sub.add_parser("serve", help="run this instance's API (FEDAGENT_* settings)").set_defaults(
        func=cmd_serve
    )
    sub.add_parser("worker", help="run a worker of this instance").set_defaults(func=cmd_worker)

    token = sub.add_parser("token", help="API tokens")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    create = token_sub.add_parser("create", help="print a new API token (shown once)")
    create.add_argument("--name", default="cli")
    create.add_argument("--role", choices=["admin", "member"], default="member")
    create.add_argument("--workspace", default="default")
    create.set_defaults(func=cmd_token_create)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        return int(args.func(args))
    return 130


if __name__ == "__main__":
    sys.exit(main())
