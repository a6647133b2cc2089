"""The console adds an A2A agent as a peer, and shows each connection's kind (and the
kind of the peer each agent runs on)."""

from __future__ import annotations

import pytest
from playwright.async_api import BrowserContext, expect

from tests.conftest import Instance
from tests.console.conftest import shot, sign_in
from tests.e2e.a2a_agent import HonestAgent
from tests.e2e.helpers import spawn_body

pytestmark = pytest.mark.e2e


async def test_an_admin_adds_an_a2a_agent_in_the_console_and_sees_it_active(
    context: BrowserContext, hub: Instance
) -> None:
    agent = HonestAgent()
    async with agent.serve():
        page = await sign_in(context, hub)
        await page.goto(f"{hub.url}/console/connections")
        form = page.locator("form#add-a2a")
        await form.get_by_label("Agent card URL").fill(agent.url)
        await form.get_by_label("Bearer token").fill("console-secret")
        await form.get_by_role("button", name="Add agent").click()
        await expect(page.get_by_role("status")).to_contain_text("The A2A agent is added")
        added = page.locator("article.conn[data-status=ACTIVE]", has_text="sdk-agent")
        await expect(added).to_contain_text("A2A agent")
        await expect(added).to_contain_text(f"A2A 1.0 at {agent.url}/a2a")
        await expect(added).to_contain_text("bearer token kept sealed")
        await expect(added).not_to_contain_text("console-secret")
        await shot(page, "connections-a2a")
        connection = next(
            c
            for c in (await hub.call("GET", "/connections")).json()
            if c["remoteName"] == "sdk-agent" and c["status"] == "ACTIVE"
        )
        assert connection["kind"] == "a2a" and connection["hasCredentials"]
        # An agent spawned on it shows the peer's kind in the agents list and on its page.
        body = spawn_body(str(connection["connectionId"]), "complete in the console")
        assert (await hub.call("POST", "/agents/spawn", json=body)).status_code == 202
        await hub.wait_agent(body["agentId"])
        await page.goto(f"{hub.url}/console/agents")
        row = page.locator(f"tr[data-agent='{body['agentId']}']")
        await expect(row.locator(".kind[data-kind=a2a]")).to_have_text("A2A agent")
        await page.goto(f"{hub.url}/console/agents/{body['agentId']}")
        await expect(page.locator("dl.facts .kind[data-kind=a2a]")).to_have_text("A2A agent")
        await hub.call("POST", f"/connections/{connection['connectionId']}/disconnect")
