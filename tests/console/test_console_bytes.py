"""The agent page shows the bytes an agent produced readably: a NUL as `\\x00`, a byte that is
not UTF-8 as `\\xNN` (agents/text.py), in the transcript, the result and the diff."""

from __future__ import annotations

from playwright.async_api import BrowserContext, expect

from tests.conftest import Instance, ensure_connection
from tests.console.conftest import shot, sign_in
from tests.console.test_console import _spawn_in_console
from tests.e2e.test_agent_bytes import LATE_NUL_FILE

SCRIPT = f"$ printf 'a\\000b\\377c\\n'\n{LATE_NUL_FILE}"


async def test_bytes_an_agent_printed_or_wrote_show_as_escapes_on_the_agent_page(
    context: BrowserContext, hub: Instance, spoke: Instance
) -> None:
    await ensure_connection(hub, spoke)
    page = await sign_in(context, hub)
    await _spawn_in_console(page, hub, "console-bytes", SCRIPT)
    await expect(page.locator("h1 .state")).to_have_text("completed", timeout=90_000)
    await expect(page.locator("#transcript")).to_contain_text("a\\x00b\\xffc")
    diff = page.locator("#diff")
    await expect(diff.locator("summary", has_text="late.txt")).to_contain_text("+1")
    await expect(diff.locator(".d-add", has_text="\\x00\\xffend")).to_be_visible()
    await shot(page, "agent-bytes")
