"""The instance's A2A agent card: who it is, where its JSON-RPC endpoint is, what it offers."""

from __future__ import annotations

from a2a.types import a2a_pb2 as pb

from federation.local_runs import local_grants
from operations import Services

PROTOCOL_VERSION = "1.0"
SKILLS = {
    "worker": "Makes the change the instructions ask for in the repository and returns its diff.",
    "reviewer": "Reviews the repository (or a branch) and reports what it found.",
    "tester": "Runs and writes tests in the repository and reports the outcome.",
}


async def agent_card(services: Services, rpc_path: str) -> pb.AgentCard:
    identity = await services.identity()
    offered = identity.capabilities.get("agentTypes")
    types = local_grants(services.settings, offered)["agentTypes"]
    url = services.settings.public_url.rstrip("/") + rpc_path
    card = pb.AgentCard(
        name=identity.name,
        description=(
            "A fedagent instance: runs coding agents (worker, reviewer, tester) in sandboxes,"
            " durably; each A2A task is one run (its summary, diff and changed files are its"
            " artifacts). Streams resume with Last-Event-ID (beyond the spec); the same"
            " messageId from the same user is the same task."
        ),
        version="0.1.0",
        supported_interfaces=[
            pb.AgentInterface(
                url=url, protocol_binding="JSONRPC", protocol_version=PROTOCOL_VERSION
            )
        ],
        capabilities=pb.AgentCapabilities(streaming=True, push_notifications=False),
        default_input_modes=["text/plain", "application/json"],
        default_output_modes=["text/plain", "text/x-diff", "application/json"],
        skills=[
            pb.AgentSkill(
                id=t,
                name=f"{t} agent",
                description=SKILLS.get(t, t),
                tags=["coding", t],
                examples=[f'{{"agentType": "{t}", "repository": "https://host/repo.git"}}'],
            )
            for t in types
        ],
    )
    card.security_schemes["bearer"].http_auth_security_scheme.CopyFrom(
        pb.HTTPAuthSecurityScheme(
            scheme="Bearer",
            description="An API token of this instance (fedagent token create); a member"
            " token sees and cancels its workspace's tasks only.",
        )
    )
    card.security_requirements.add().schemes["bearer"].CopyFrom(pb.StringList())
    return card
