"""What an operator reads on the console: an agent's page in words (each state once, progress
with labels, a model turn without text) and, on an executor, the runs peers started there."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from playwright.async_api import Browser, BrowserContext, Route, expect

from cli.devstack import DevStack
from federation.store import tokens
from tests.conftest import Instance, ensure_connection
from tests.console.conftest import shot, sign_in
from tests.e2e.helpers import processes_in, spawn_body

pytestmark = pytest.mark.e2e


async def test_agent_page_shows_each_state_once_progress_in_words_and_silent_turns_readably(
    context: BrowserContext, hub: Instance, spoke: Instance
) -> None:
    connection_id = await ensure_connection(hub, spoke)
    body = spawn_body(connection_id, "$ echo first\n$ sleep 5\n$ echo done", task_id="words")
    assert (await hub.call("POST", "/agents/spawn", json=body)).status_code == 202
    page = await sign_in(context, hub)
    await page.goto(f"{hub.url}/console/agents/{body['agentId']}")
    progress, events = page.locator("#progress"), page.locator("#events")
    running = events.locator("li", has=page.locator("[data-state=running]"))

    # live, while it runs: several progress reports, one `running`
    await expect(progress).to_contain_text("sleep 5")
    await expect(progress).to_contain_text("Last tool")
    await expect(progress).to_contain_text("Transcript entries")
    await expect(progress).not_to_contain_text("lastTool")
    await expect(running).to_have_count(1)
    await shot(page, "agent-running")

    await expect(page.locator("h1 .state")).to_have_text("completed", timeout=90_000)
    await expect(running).to_have_count(1)
    await expect(events.locator("li", has=page.locator("[data-state=completed]"))).to_have_count(1)
    await expect(progress).to_contain_text("Last tool")
    await expect(progress).not_to_contain_text("transcriptEntries")
    transcript = page.locator("#transcript")
    await expect(transcript).to_contain_text("(no text; it called run_command)")
    await expect(transcript).to_contain_text("(no text; it called finish)")
    await expect(transcript).not_to_contain_text("'kind'")
    await shot(page, "agent-in-words")


def _worker_state(stack: DevStack) -> str:
    """The spoke's workers' stacks (py-spy, when installed) and log tails."""
    out = []
    for number, proc in enumerate(stack.instances["spoke"].workers, start=1):
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if Path(spy).exists():
            dump = subprocess.run(
                [spy, "dump", "--pid", str(proc.pid)], capture_output=True, text=True, timeout=60
            )
            out.append(f"--- worker{number} stacks ---\n{dump.stdout}{dump.stderr}")
        log = stack.log_path("spoke", f"worker{number}")
        if log.exists():
            out.append(f"--- {log.name} ---\n" + "\n".join(log.read_text().splitlines()[-80:]))
    return "\n".join(out)


async def _member_token(instance: Instance) -> str:
    conn = await instance.db()
    try:
        _, token = await tokens.create_token(conn, name="mo", role="member", workspace="team-b")
        return token
    finally:
        await conn.close()


async def test_an_executor_sees_the_runs_peers_started_on_it_and_kills_one_after_confirming(
    context: BrowserContext,
    browser: Browser,
    hub: Instance,
    spoke: Instance,
    console_stack: DevStack,
) -> None:
    connection_id = await ensure_connection(hub, spoke)
    task_id = f"hosted-{uuid.uuid4().hex[:6]}"
    body = spawn_body(connection_id, "$ sleep 60", task_id=task_id)
    assert (await hub.call("POST", "/agents/spawn", json=body)).status_code == 202
    agent_id = body["agentId"]
    workspace = console_stack.data_dir / "workspaces" / "spoke" / hub.id / agent_id
    await hub.wait_agent(agent_id, {"running"}, timeout=120)
    for _ in range(1200):  # 2 min: CI's 2 cores run the main stack's instances beside these
        if processes_in(workspace):
            break
        await asyncio.sleep(0.1)
    if not processes_in(workspace):
        # Say what was seen: a flake here once in CI (the run `running`, no sandbox process).
        agent = (await hub.call("GET", f"/agents/{agent_id}")).json()
        listing = (
            sorted(p.name for p in workspace.parent.glob("*"))
            if workspace.parent.exists()
            else None
        )
        raise AssertionError(
            f"the agent's sleep never started: {agent}; {workspace.parent}: {listing}\n"
            + _worker_state(console_stack)
        )

    page = await sign_in(context, spoke)
    await page.goto(f"{spoke.url}/console/agents")
    run = page.locator(f"#hosted-rows tr[data-agent='{agent_id}']")
    await expect(run).to_contain_text(task_id)
    await expect(run).to_contain_text("hub")
    await expect(run.locator(".state")).to_have_text("running")
    await shot(page, "agents-hosted")

    # A member sees no one else's runs here, and may not stop them.
    member_context = await browser.new_context()
    try:
        member = await sign_in(member_context, spoke, await _member_token(spoke))
        await member.goto(f"{spoke.url}/console/agents")
        await expect(member.locator("#hosted")).to_have_count(0)
        csrf = await member.locator("input[name=csrf]").first.input_value()
        refused = await member_context.request.post(
            f"{spoke.url}/console/hosted/{agent_id}/kill", form={"csrf": csrf, "peer": hub.id}
        )
        assert refused.status == 403 and "forbidden" in await refused.text()
    finally:
        await member_context.close()
    assert processes_in(workspace), "a member's kill stopped the run"

    await run.get_by_role("button", name="Kill…").click()
    dialog = page.locator(f"dialog#kill-hosted-{agent_id}")
    await expect(dialog).to_be_visible()
    await expect(dialog).to_contain_text("hub hears it was killed")
    await shot(page, "agents-hosted-kill-dialog")
    await dialog.get_by_role("button", name="Kill the run").click()
    await expect(page.get_by_role("status")).to_contain_text("The run is stopped")
    await expect(run.locator(".state")).to_have_text("killed")
    assert processes_in(workspace) == []
    assert (await hub.wait_agent(agent_id))["state"] == "killed"  # the requester hears it


async def test_a_confirmation_opened_while_the_list_refreshes_stays_open(
    context: BrowserContext, hub: Instance, spoke: Instance
) -> None:
    """The list of unfinished runs fetches itself again every 2 s and swaps its rows in; a
    kill confirmation opened while such a fetch was in flight vanished with its row when the
    answer came (the operator's click then met a closed dialog: a CI flake of the test above).
    Rows holding an open confirmation are left as they are until it closes."""
    connection_id = await ensure_connection(hub, spoke)
    task_id = f"refresh-{uuid.uuid4().hex[:6]}"
    body = spawn_body(connection_id, "$ sleep 60", task_id=task_id)
    assert (await hub.call("POST", "/agents/spawn", json=body)).status_code == 202
    agent_id = body["agentId"]
    await hub.wait_agent(agent_id, {"running"}, timeout=120)

    page = await sign_in(context, spoke)
    in_flight, answer = asyncio.Event(), asyncio.Event()

    async def hold_refreshes(route: Route) -> None:
        if route.request.resource_type == "fetch" and not answer.is_set():
            in_flight.set()
            await answer.wait()
        await route.continue_()

    await page.route(f"{spoke.url}/console/agents*", hold_refreshes)
    await page.goto(f"{spoke.url}/console/agents")
    run = page.locator(f"#hosted-rows tr[data-agent='{agent_id}']")
    await expect(run.locator(".state")).to_have_text("running")
    await asyncio.wait_for(in_flight.wait(), 30)  # a refresh asked, its answer held
    await run.get_by_role("button", name="Kill…").click()
    dialog = page.locator(f"dialog#kill-hosted-{agent_id}")
    await expect(dialog).to_be_visible()
    async with page.expect_response(lambda r: r.request.resource_type == "fetch"):
        answer.set()
    await page.wait_for_timeout(500)  # the answer is read and swapped in (or not)
    await expect(dialog).to_be_visible()
    await dialog.get_by_role("button", name="Kill the run").click()
    await expect(run.locator(".state")).to_have_text("killed")
    assert (await hub.wait_agent(agent_id))["state"] == "killed"
