"""The console in a real browser against a real hub and spoke: what an operator sees and does."""

from __future__ import annotations

import asyncio
import re
import uuid
from pathlib import Path

import pytest
from playwright.async_api import Browser, BrowserContext, Page, Route, expect

from cli.devstack import DevStack
from federation.store import tokens
from tests.conftest import Instance, ensure_connection
from tests.console.conftest import shot, sign_in
from tests.e2e.helpers import processes_in, spawn_body

pytestmark = pytest.mark.e2e
AGENT_URL = re.compile(r".*/console/agents/([0-9a-f-]{36})(\?.*)?$")


async def _spawn_in_console(page: Page, hub: Instance, task_id: str, instructions: str) -> str:
    await page.goto(f"{hub.url}/console/agents")
    form = page.locator("form.spawn")
    await form.get_by_label("Task id").fill(task_id)
    await form.get_by_label("Repository").fill("example/repo")
    await form.get_by_label("Branch").fill("main")
    await form.get_by_label("Work items").fill("console check")
    await form.get_by_label("Instructions").fill(instructions)
    await form.get_by_label("Timeout, seconds").fill("120")
    await form.get_by_role("button", name="Spawn").click()
    await page.wait_for_url(AGENT_URL)
    match = AGENT_URL.match(page.url)
    assert match is not None
    return match.group(1)


async def test_sign_in_on_both_consoles_connect_and_accept_with_grants_shows_active_on_both(
    context: BrowserContext, browser: Browser, hub: Instance, spoke: Instance
) -> None:
    # Start from no live connection, whichever test ran before.
    for conn in (await hub.call("GET", "/connections")).json():
        if conn["remoteInstanceId"] == spoke.id and conn["status"] != "DISCONNECTED":
            await hub.call("POST", f"/connections/{conn['connectionId']}/disconnect")

    hub_page = await sign_in(context, hub)
    await expect(hub_page.locator("main")).to_contain_text(hub.id)
    await shot(hub_page, "overview-start")
    await hub_page.goto(f"{hub.url}/console/connections")
    await hub_page.get_by_label("Peer URL").fill(spoke.url)
    await hub_page.get_by_role("button", name="Ask to connect").click()
    await expect(hub_page.get_by_role("status")).to_contain_text("PENDING until the peer accepts")
    pending = hub_page.locator("article.conn[data-status=PENDING]", has_text="spoke")
    await expect(pending).to_be_visible()

    spoke_context = await browser.new_context()
    try:
        spoke_page = await sign_in(spoke_context, spoke)
        await spoke_page.goto(f"{spoke.url}/console/connections")
        request = spoke_page.locator("article.conn[data-status=PENDING]", has_text="hub")
        await expect(request).to_contain_text("What may this peer ask of this instance?")
        await request.get_by_label("tester").uncheck()
        await request.get_by_label("Repository patterns").fill("example/*\ndemo")
        await request.get_by_label("Longest timeout").fill("600")
        await request.get_by_label("Agents at once").fill("3")
        await shot(spoke_page, "connections-request")
        await request.get_by_role("button", name="Accept with these grants").click()
        await expect(spoke_page.get_by_role("status")).to_have_text("The connection is ACTIVE.")
        active = spoke_page.locator("article.conn[data-status=ACTIVE]", has_text="hub")
        await expect(active).to_contain_text("worker, reviewer")
        await expect(active).to_contain_text("timeout ≤ 600 s")
        await shot(spoke_page, "connections")
    finally:
        await spoke_context.close()

    await hub_page.goto(f"{hub.url}/console/connections")
    await expect(
        hub_page.locator("article.conn[data-status=ACTIVE]", has_text="spoke")
    ).to_be_visible()
    on_spoke = [
        c
        for c in (await spoke.call("GET", "/connections")).json()
        if c["remoteInstanceId"] == hub.id and c["status"] == "ACTIVE"
    ]
    assert len(on_spoke) == 1
    grants = on_spoke[0]["grants"]
    assert grants["agentTypes"] == ["worker", "reviewer"]
    assert grants["repositories"] == ["example/*", "demo"]
    assert (grants["maxTimeout"], grants["maxConcurrentAgents"]) == (600, 3)


async def test_spawn_here_in_console_runs_a_local_run_with_its_diff_and_transcript(
    context: BrowserContext, hub: Instance
) -> None:
    page = await sign_in(context, hub)
    await page.goto(f"{hub.url}/console/agents")
    form = page.locator("form.spawn")
    await form.get_by_label("Peer").select_option(label="this instance (a local run)")
    await form.get_by_label("Task id").fill("console-here")
    await form.get_by_label("Instructions").fill("$ echo 'made here' > here.txt")
    await form.get_by_label("Timeout, seconds").fill("120")
    await form.get_by_role("button", name="Spawn").click()
    await page.wait_for_url(AGENT_URL)
    match = AGENT_URL.match(page.url)
    assert match is not None
    agent_id = match.group(1)
    await expect(page.locator("h1 .state")).to_have_text("completed", timeout=90_000)
    await expect(page.locator("#diff")).to_contain_text("here.txt")
    await expect(page.locator("#transcript")).to_contain_text("$ echo 'made here'")
    await expect(page.get_by_role("link", name=f"agent-run/_local/{agent_id}")).to_be_visible()
    await page.goto(f"{hub.url}/console/agents?taskId=console-here")
    await expect(page.locator(f"tr[data-agent='{agent_id}']")).to_contain_text("this instance")


async def test_spawn_in_console_turns_completed_without_reload_and_shows_and_downloads_diff(
    context: BrowserContext, hub: Instance, spoke: Instance, tmp_path: Path
) -> None:
    await ensure_connection(hub, spoke)
    page = await sign_in(context, hub)
    agent_id = await _spawn_in_console(
        page, hub, "console-diff", "$ echo 'hello from the console' > hello.txt\n$ cat hello.txt"
    )
    await expect(page.get_by_role("status")).to_have_text("The agent is on its way.")
    # A mark on this very document: a reload would lose it.
    await page.evaluate("window.__sameDocument = true")
    badge = page.locator("h1 .state")
    await expect(badge).to_have_text("completed", timeout=90_000)
    assert await page.evaluate("window.__sameDocument === true")

    diff = page.locator("#diff")
    await expect(diff).to_contain_text("hello.txt")
    await expect(diff.locator("summary", has_text="hello.txt")).to_contain_text("+1")
    await expect(diff.locator(".d-add", has_text="+hello from the console")).to_be_visible()
    await expect(page.locator("#changed-files")).to_contain_text("hello.txt")
    # the conversation, as it happened: each command with what it printed
    transcript = page.locator("#transcript")
    await expect(transcript).to_contain_text("$ cat hello.txt")
    await expect(transcript).to_contain_text("hello from the console")
    requester_link = page.get_by_role("link", name=f"remote-agent/{agent_id}")
    assert "/namespaces/hub/workflows/" in (await requester_link.get_attribute("href") or "")
    executor_link = page.get_by_role("link", name=f"agent-run/{hub.id}/{agent_id}")
    assert "/namespaces/spoke/workflows/" in (await executor_link.get_attribute("href") or "")
    await shot(page, "agent")

    async with page.expect_download() as info:
        await page.get_by_role("link", name="Download the diff").click()
    download = await info.value
    saved = tmp_path / download.suggested_filename
    await download.save_as(saved)
    assert download.suggested_filename == f"agent-{agent_id}.diff"
    assert "+hello from the console" in saved.read_text()

    await page.goto(f"{hub.url}/console/agents?state=completed")
    await expect(page.locator(f"tr[data-agent='{agent_id}']")).to_contain_text("completed")
    await shot(page, "agents")


async def test_agents_list_shows_a_state_change_without_reloading(
    context: BrowserContext, hub: Instance, spoke: Instance
) -> None:
    connection_id = await ensure_connection(hub, spoke)
    body = spawn_body(connection_id, "$ sleep 15", task_id=f"live-{uuid.uuid4().hex[:6]}")
    assert (await hub.call("POST", "/agents/spawn", json=body)).status_code == 202
    page = await sign_in(context, hub)
    await page.goto(f"{hub.url}/console/agents?taskId={body['taskId']}")
    row = page.locator(f"tr[data-agent='{body['agentId']}'] .state")
    await expect(row).to_have_attribute("data-state", re.compile("spawning|running"))
    await page.evaluate("window.__sameDocument = true")
    await expect(row).to_have_text("completed", timeout=90_000)
    assert await page.evaluate("window.__sameDocument === true")


async def test_kill_from_the_agent_page_after_confirming_leaves_no_sandbox(
    context: BrowserContext, hub: Instance, spoke: Instance, console_stack: DevStack
) -> None:
    await ensure_connection(hub, spoke)
    page = await sign_in(context, hub)
    agent_id = await _spawn_in_console(page, hub, "console-kill", "$ sleep 60")
    workspace = console_stack.data_dir / "workspaces" / "spoke" / hub.id / agent_id
    await expect(page.locator("#progress")).to_contain_text("sleep 60", timeout=60_000)
    for _ in range(300):
        if processes_in(workspace):
            break
        await asyncio.sleep(0.1)
    assert processes_in(workspace), "the agent's sleep never started"
    overview = await context.new_page()
    await overview.goto(f"{hub.url}/console/overview")
    await expect(overview.locator("#running-rows")).to_contain_text("console-kill")
    await shot(overview, "overview")
    await overview.close()

    await page.get_by_role("button", name="Kill…").click()
    dialog = page.locator("dialog#kill-dialog")
    await expect(dialog).to_be_visible()
    await expect(dialog).to_contain_text("its sandbox is removed")
    await shot(page, "agent-kill-dialog")
    await dialog.get_by_role("button", name="Kill the agent").click()
    await expect(page.get_by_role("status")).to_have_text("The agent is stopped.")
    await expect(page.locator("h1 .state")).to_have_text("killed")
    assert processes_in(workspace) == []


async def test_rotate_key_after_confirming_lists_new_key_and_old_one_retiring(
    context: BrowserContext, hub: Instance
) -> None:
    page = await sign_in(context, hub)
    await page.goto(f"{hub.url}/console/instance")
    old = await page.locator("#keys tr[data-status=active]").get_attribute("data-key")
    await page.get_by_role("button", name="Rotate the key…").click()
    dialog = page.locator("dialog#rotate-dialog")
    await expect(dialog).to_be_visible()
    await expect(dialog).to_contain_text("grace period")
    await shot(page, "instance-rotate-dialog")
    await dialog.get_by_role("button", name="Rotate the key").click()
    await expect(page.get_by_role("status")).to_contain_text("the previous one is retiring")
    await expect(page.locator(f"#keys tr[data-key='{old}']")).to_have_attribute(
        "data-status", "retiring"
    )
    new = await page.locator("#keys tr[data-status=active]").get_attribute("data-key")
    assert new and new != old
    await shot(page, "instance")

    card = (await hub.call("GET", "/instance")).json()
    assert {k["keyId"]: k["status"] for k in card["keys"]}[new] == "active"

    await page.goto(f"{hub.url}/console/audit?action=instance.*")
    await expect(page.locator("#audit")).to_contain_text("instance.keys.rotate")
    await expect(page.locator("#audit")).not_to_contain_text("connection.")
    await shot(page, "audit")


async def test_member_sees_only_its_workspace_agents_and_no_admin_page(
    context: BrowserContext, hub: Instance, spoke: Instance
) -> None:
    connection_id = await ensure_connection(hub, spoke)
    conn = await hub.db()
    try:
        _, member = await tokens.create_token(conn, name="mia", role="member", workspace="team-a")
    finally:
        await conn.close()
    mine = spawn_body(connection_id, "$ echo mine", task_id=f"member-{uuid.uuid4().hex[:6]}")
    theirs = spawn_body(connection_id, "$ echo theirs", task_id=f"admin-{uuid.uuid4().hex[:6]}")
    response = await hub.call(
        "POST", "/agents/spawn", json=mine, headers={"Authorization": f"Bearer {member}"}
    )
    assert response.status_code == 202, response.text
    assert (await hub.call("POST", "/agents/spawn", json=theirs)).status_code == 202

    page = await sign_in(context, hub, member)
    await expect(page.locator("header")).to_contain_text("workspace team-a")
    await expect(page.get_by_role("link", name="Connections")).to_have_count(0)
    await page.goto(f"{hub.url}/console/agents")
    await expect(page.locator("#agent-rows")).to_contain_text(mine["taskId"])
    await expect(page.locator("#agent-rows")).not_to_contain_text(theirs["taskId"])
    await shot(page, "agents-member")

    for path in ("/console/connections", "/console/instance", "/console/audit"):
        response = await page.goto(f"{hub.url}{path}")
        assert response is not None and response.status == 403, path
        await expect(page.get_by_role("alert")).to_contain_text("Not allowed for this user")
        await expect(page.get_by_role("alert")).to_contain_text("forbidden")
    await shot(page, "forbidden")
    response = await page.goto(f"{hub.url}/console/agents/{theirs['agentId']}")
    assert response is not None and response.status == 404
    await expect(page.get_by_role("alert")).to_contain_text("agent_not_found")
    await expect(page.locator("body")).not_to_contain_text("Traceback")

    await page.get_by_role("button", name="Sign out").click()
    await expect(page.get_by_role("status")).to_have_text("You are signed out.")
    assert await context.cookies() == []
    await page.goto(f"{hub.url}/console/agents")
    await expect(page.get_by_role("heading", name="Sign in to hub")).to_be_visible()


async def test_wrong_token_is_refused_with_a_clear_message(
    context: BrowserContext, hub: Instance
) -> None:
    page = await context.new_page()
    response = await page.goto(f"{hub.url}/console/sign-in")
    # No other site may frame the console (its confirmation dialogs are one click away).
    assert response is not None
    assert "frame-ancestors 'none'" in (await response.all_headers())["content-security-policy"]
    await page.get_by_label("API token").fill("fa_not-a-real-token")
    await page.get_by_role("button", name="Sign in").click()
    alert = page.get_by_role("alert")
    await expect(alert).to_contain_text("That token was not accepted")
    await expect(alert).to_contain_text("unauthenticated")
    await expect(alert).to_contain_text("the API token is not valid")
    assert await context.cookies() == []
    await shot(page, "sign-in-refused")
    # Pages stay closed: they send the browser to the sign-in page.
    await page.goto(f"{hub.url}/console/agents")
    await expect(page).to_have_url(re.compile(r".*/console/sign-in\?next=%2Fconsole%2Fagents$"))


async def test_cross_site_form_post_is_refused_and_changes_nothing(
    context: BrowserContext, hub: Instance, spoke: Instance
) -> None:
    keys_before = [k["keyId"] for k in (await hub.call("GET", "/instance")).json()["keys"]]
    page = await sign_in(context, hub)

    # Another site's page that makes the signed-in browser post the rotate form.
    attack = (
        f'<form id="f" method="post" action="{hub.url}/console/instance/keys/rotate"></form>'
        '<script>document.getElementById("f").submit()</script>'
    )

    async def serve(route: Route) -> None:
        await route.fulfill(status=200, content_type="text/html", body=attack)

    await page.route("http://attacker.example/**", serve)
    await page.goto("http://attacker.example/prize")
    await page.wait_for_url(f"{hub.url}/console/instance/keys/rotate")
    alert = page.get_by_role("alert")
    await expect(alert).to_contain_text("Form refused: it did not come from this console")
    await expect(alert).to_contain_text("cross_site_refused")
    await shot(page, "cross-site-refused")

    # A sibling on the same host (same site for cookies, which ignore ports): the cookie goes
    # along, the Origin and the missing form token give it away.
    response = await context.request.post(
        f"{hub.url}/console/instance/keys/rotate", form={}, headers={"Origin": spoke.url}
    )
    assert response.status == 403
    assert "cross_site_refused" in await response.text()
    response = await context.request.post(
        f"{hub.url}/console/instance/keys/rotate", form={"csrf": "guessed"}
    )
    assert response.status == 403
    assert "cross_site_refused" in await response.text()

    keys_after = [k["keyId"] for k in (await hub.call("GET", "/instance")).json()["keys"]]
    assert keys_after == keys_before


async def test_admin_edits_metadata_and_capabilities_and_a_bad_form_says_what_is_wrong(
    context: BrowserContext, hub: Instance
) -> None:
    page = await sign_in(context, hub)
    await page.goto(f"{hub.url}/console/instance")
    form = page.locator("form[action='/console/instance']")
    await form.get_by_label("Metadata (JSON object)").fill('{"team": "platform"}')
    await form.get_by_label("reviewer").uncheck()
    # what runs agents is configuration, shown as it is
    await expect(page.locator("#configured")).to_contain_text("bwrap sandbox")
    await form.get_by_role("button", name="Save").click()
    await expect(page.get_by_role("status")).to_have_text("The instance is updated.")
    card = (await hub.call("GET", "/instance")).json()
    assert card["metadata"] == {"team": "platform"}
    assert "reviewer" not in card["capabilities"]["agentTypes"]

    await form.get_by_label("Metadata (JSON object)").fill("{not json")
    await form.get_by_role("button", name="Save").click()
    alert = page.get_by_role("alert")
    await expect(alert).to_contain_text("Invalid request")
    await expect(alert).to_contain_text("request_invalid")
    await expect(alert).to_contain_text("metadata is not valid JSON")
    await shot(page, "error")
    assert (await hub.call("GET", "/instance")).json()["metadata"] == {"team": "platform"}


async def test_suspend_resume_edit_grants_and_disconnect_after_confirming(
    context: BrowserContext, hub: Instance, spoke: Instance
) -> None:
    connection_id = await ensure_connection(hub, spoke)
    page = await sign_in(context, hub)
    await page.goto(f"{hub.url}/console/connections")
    conn = page.locator(f"article.conn[data-connection='{connection_id}']")

    await conn.get_by_role("button", name="Suspend…").click()
    await expect(page.locator(f"dialog#suspend-{connection_id}")).to_contain_text(
        "No messages pass either way"
    )
    await (
        page.locator(f"dialog#suspend-{connection_id}")
        .get_by_role("button", name="Suspend")
        .click()
    )
    await expect(conn).to_have_attribute("data-status", "SUSPENDED")
    spoke_side = (await spoke.call("GET", f"/connections/{connection_id}")).json()
    assert spoke_side["status"] == "SUSPENDED"

    await conn.get_by_role("button", name="Resume…").click()
    await (
        page.locator(f"dialog#resume-{connection_id}").get_by_role("button", name="Resume").click()
    )
    await expect(conn).to_have_attribute("data-status", "ACTIVE")

    await conn.locator("summary").click()
    await conn.get_by_label("Agents at once").fill("2")
    await conn.get_by_role("button", name="Save grants").click()
    await expect(page.get_by_role("status")).to_have_text("The grants are saved.")
    await expect(conn.locator("summary")).to_contain_text("≤ 2 at once")
    hub_side = (await hub.call("GET", f"/connections/{connection_id}")).json()
    assert hub_side["grants"]["maxConcurrentAgents"] == 2

    await conn.get_by_role("button", name="Disconnect…").click()
    dialog = page.locator(f"dialog#disconnect-{connection_id}")
    await expect(dialog).to_contain_text("needs a new request and acceptance")
    await dialog.get_by_role("button", name="Disconnect").click()
    await expect(conn).to_have_attribute("data-status", "DISCONNECTED")
    spoke_side = (await spoke.call("GET", f"/connections/{connection_id}")).json()
    assert spoke_side["status"] == "DISCONNECTED"


async def test_pages_read_without_javascript_and_the_dialog_opens_without_it(
    browser: Browser, hub: Instance, spoke: Instance
) -> None:
    connection_id = await ensure_connection(hub, spoke)
    body = spawn_body(connection_id, "$ echo plain > plain.txt", task_id="no-js")
    assert (await hub.call("POST", "/agents/spawn", json=body)).status_code == 202
    await hub.wait_agent(body["agentId"])
    context = await browser.new_context(java_script_enabled=False)
    try:
        page = await sign_in(context, hub)
        await page.goto(f"{hub.url}/console/agents?taskId=no-js")
        await page.get_by_role("link", name="no-js").first.click()
        await expect(page.locator("h1 .state")).to_have_text("completed")
        await expect(page.locator("#diff")).to_contain_text("plain.txt")
        await expect(page.get_by_role("link", name="Download the diff")).to_be_visible()
        # Confirmations are HTML invoker buttons: no script needed to open one.
        await page.goto(f"{hub.url}/console/instance")
        await page.get_by_role("button", name="Rotate the key…").click()
        await expect(page.locator("dialog#rotate-dialog")).to_be_visible()
    finally:
        await context.close()
