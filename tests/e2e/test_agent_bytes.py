"""Whatever bytes an agent produces (NUL, bytes that are not UTF-8, in outputs, files and file
names), its run ends as it would otherwise and the requester shows them readably; the diff
stays byte-exact."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from tests.conftest import Instance
from tests.e2e.helpers import spawn_body
from tests.e2e.test_conversation import read_sse

pytestmark = pytest.mark.e2e

# `\x00` is how a text field shows a NUL byte, `\xff` a byte that is not UTF-8 (agents/text.py).
NUL_SHOWN = "a\\x00b"
LATE_NUL_FILE = (
    "$ head -c 9000 /dev/zero | tr '\\000' x > late.txt && printf '\\000\\377end\\n' >> late.txt"
)
BAD_NAME_FILE = "$ printf 'odd\\n' > \"$(printf 'bad\\377name')\""


async def transcript(instance: Instance, agent_id: str) -> list[dict[str, Any]]:
    response = await instance.call("GET", f"/agents/{agent_id}/transcript")
    assert response.status_code == 200, response.text
    entries: list[dict[str, Any]] = response.json()["entries"]
    return entries


async def test_a_nul_in_a_commands_output_completes_the_run_and_shows_as_an_escape(
    hub: Instance, hub_spoke: str
) -> None:
    body = spawn_body(hub_spoke, "$ printf 'a\\000b'\n$ printf 'c\\377d'", task_id="bytes-nul")
    assert (await hub.call("POST", "/agents/spawn", json=body)).status_code == 202
    agent = await hub.wait_agent(body["agentId"], timeout=90)
    assert agent["state"] == "completed", agent
    assert NUL_SHOWN in agent["result"]["logTail"]
    assert "c\\xffd" in agent["result"]["logTail"]
    outputs = [e["output"] for e in await transcript(hub, body["agentId"]) if "output" in e]
    assert any(NUL_SHOWN in output for output in outputs), outputs
    log = await hub.call("GET", f"/agents/{body['agentId']}/log")
    assert log.status_code == 200 and NUL_SHOWN in log.text
    streamed = await read_sse(hub, body["agentId"], None)
    shown = [e[2]["output"] for e in streamed if e[1] == "transcript" and "output" in e[2]]
    assert any(NUL_SHOWN in output for output in shown), streamed


async def test_a_late_nul_in_a_text_file_and_a_non_utf8_name_keep_the_diff_byte_exact(
    hub: Instance, spoke: Instance, hub_spoke: str
) -> None:
    body = spawn_body(hub_spoke, f"{LATE_NUL_FILE}\n{BAD_NAME_FILE}", task_id="bytes-diff")
    assert (await hub.call("POST", "/agents/spawn", json=body)).status_code == 202
    agent = await hub.wait_agent(body["agentId"], timeout=90)
    assert agent["state"] == "completed", agent
    result = agent["result"]
    # The preview is text: the NUL git left in this "text" file shows as an escape.
    assert "x\\x00\\xffend" in result["diffPreview"] and "\x00" not in result["diffPreview"]
    names = result["changedFiles"]
    assert "late.txt" in names
    assert any(n.startswith("bad") and n.endswith("name") and n != "badname" for n in names)
    diff = await hub.call("GET", f"/agents/{body['agentId']}/diff")
    assert diff.status_code == 200
    assert hashlib.sha256(diff.content).hexdigest() == result["diffSha256"]
    assert b"x\x00\xffend\n" in diff.content  # the artifact keeps the real bytes
    assert b"bad\\377name" in diff.content  # git's own quoting of the name
    rows = await spoke.fetch(
        "SELECT state FROM agents WHERE role = 'executor' AND agent_id = $1::uuid",
        body["agentId"],
    )
    assert [r["state"] for r in rows] == ["completed"]


async def test_a_run_changing_thousands_of_long_named_files_completes_with_a_bounded_result(
    hub: Instance, spoke: Instance, hub_spoke: str
) -> None:
    # 12,000 names of 200 characters: 2.4 MB of changed files, past what Temporal takes in
    # one activity result (2 MiB) and what a requester takes in one event (1 MiB).
    many = "$ seq -f '%0200.0f' 1 12000 | xargs touch"
    body = spawn_body(hub_spoke, many, task_id="bytes-many-files", timeout=180)
    assert (await hub.call("POST", "/agents/spawn", json=body)).status_code == 202
    agent = await hub.wait_agent(body["agentId"], timeout=180)
    assert agent["state"] == "completed", agent
    result = agent["result"]
    assert result["changedFilesTotal"] == 12_000
    assert 0 < len(result["changedFiles"]) < 12_000
    assert result["changedFiles"][0] == "1".zfill(200)
    diff = await hub.call("GET", f"/agents/{body['agentId']}/diff")
    assert diff.status_code == 200 and diff.content.count(b"\nnew file mode ") == 12_000
