"""A two-instance stack (hub, spoke) of its own for the console, and a real headless Chromium.

The browser is Debian's `chromium` (scripts/install-system-deps.sh), driven by Playwright with
`executable_path`; `playwright install` is never needed.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from playwright.async_api import Browser, BrowserContext, Page, async_playwright, expect

from cli.devstack import DevStack, free_port_block
from tests.conftest import Instance

CHROMIUM = os.environ.get("FEDAGENT_TEST_CHROMIUM", "/usr/bin/chromium")
SCREENSHOTS = Path(__file__).parent / "screenshots"
NAMES = ["hub", "spoke"]


# Fixtures of their own names all the way up to hub and spoke: a console fixture named like one
# of tests/conftest.py (`stack`, `instances`) would leak into that file's session-scoped `hub`,
# which every later test module then shares.
@pytest.fixture(scope="session")
async def console_stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[DevStack]:
    base = free_port_block(len(NAMES))
    temporal = free_port_block(2)
    dev = DevStack(
        NAMES,
        tmp_path_factory.mktemp("console-stack"),
        base_port=base,
        temporal_port=temporal,
        ui_port=temporal + 1,
        extra_env={
            "FEDAGENT_STATUS_POLL_INTERVAL": "3",
            "FEDAGENT_LOG_LEVEL": "info",
            # The console tests show what agents left in their workspaces after the run.
            "FEDAGENT_WORKSPACE_RETENTION": "86400",
        },
    )
    try:
        await dev.start()
        yield dev
    finally:
        dev.stop()


@pytest.fixture(scope="session")
def console_instances(console_stack: DevStack, http: httpx.AsyncClient) -> dict[str, Instance]:
    stack = console_stack
    return {
        name: Instance({**stack.instances[name].info, "dataDir": str(stack.data_dir)}, http)
        for name in NAMES
    }


@pytest.fixture(scope="session")
def hub(console_instances: dict[str, Instance]) -> Instance:
    return console_instances["hub"]


@pytest.fixture(scope="session")
def spoke(console_instances: dict[str, Instance]) -> Instance:
    return console_instances["spoke"]


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Browser]:
    if shutil.which(CHROMIUM) is None and not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/install-system-deps.sh")
    SCREENSHOTS.mkdir(exist_ok=True)
    expect.set_options(timeout=30_000)
    async with async_playwright() as pw:
        launched = await pw.chromium.launch(executable_path=CHROMIUM)
        yield launched
        await launched.close()


@pytest.fixture
async def context(browser: Browser) -> AsyncIterator[BrowserContext]:
    ctx = await browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 900})
    ctx.set_default_timeout(30_000)
    yield ctx
    await ctx.close()


async def shot(page: Page, name: str) -> None:
    await page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


async def sign_in(context: BrowserContext, instance: Instance, token: str | None = None) -> Page:
    page = await context.new_page()
    await page.goto(f"{instance.url}/console/sign-in")
    await page.get_by_label("API token").fill(token or instance.info["adminToken"])
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_role("heading", name="Overview")).to_be_visible()
    return page
