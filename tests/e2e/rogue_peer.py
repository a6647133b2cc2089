"""A misbehaving peer for tests: it connects properly (real keys, real signatures), then answers
commands slowly, with garbage, or with a RESPONSE signed by a key it never published."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from federation.envelope import MessageType, generate_signing_key, sign_envelope
from federation.identity import CAPABILITIES


class RoguePeer:
    def __init__(self, port: int) -> None:
        self.port = port
        self.instance_id = str(uuid.uuid4())
        self.key = generate_signing_key()
        self.mode = "slow"  # slow | garbage | badsig
        self.received: list[dict[str, Any]] = []
        self.app = self._build()
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def card(self) -> dict[str, Any]:
        pub = self.key.public()
        return {
            "instanceId": self.instance_id,
            "name": "rogue",
            "url": self.url,
            "protocol": "fedagent/1",
            "keys": [
                {"keyId": pub.key_id, "algorithm": pub.algorithm.value, "publicKey": pub.public_pem}
            ],
            "capabilities": CAPABILITIES,
        }

    def _reply(self, request: dict[str, Any], payload: dict[str, Any], key: Any = None) -> Any:
        return sign_envelope(
            key or self.key,
            type=MessageType.RESPONSE,
            sender_id=self.instance_id,
            recipient_id=request["senderId"],
            payload=payload,
            command_type=request.get("commandType"),
            correlation_id=request["messageId"],
        ).to_wire()

    def _build(self) -> FastAPI:
        app = FastAPI()

        @app.get("/api/v1/federation/instance")
        async def instance() -> dict[str, Any]:
            return self.card()

        @app.post("/api/v1/federation/incoming/connect")
        async def connect(request: Request) -> Any:
            body = await request.json()
            return self._reply(body, {"connectionId": body["payload"]["connectionId"]})

        @app.post("/api/v1/federation/incoming/command")
        async def command(request: Request) -> Response:
            body = await request.json()
            self.received.append(body)
            if self.mode == "slow":
                # Hang until the peer is stopped: longer than any deadline of the requester.
                await self._stopping.wait()
                return PlainTextResponse("shutting down", status_code=503)
            if self.mode == "garbage":
                return PlainTextResponse("<html>definitely not a RESPONSE</html>")
            impostor = generate_signing_key()
            forged = type(impostor)(self.key.key_id, impostor.algorithm, impostor.private_pem)
            return JSONResponse(self._reply(body, {"state": "running", "seq": 1}, key=forged))

        return app

    async def accept(self, requester_url: str, requester_card: dict[str, Any], cid: str) -> None:
        """Answer a connection request the way a real peer's admin would: accept it."""
        envelope = sign_envelope(
            self.key,
            type=MessageType.CONNECT,
            sender_id=self.instance_id,
            recipient_id=requester_card["instanceId"],
            command_type="connection.accept",
            payload={"connectionId": cid},
        )
        async with httpx.AsyncClient() as http:
            response = await http.post(
                f"{requester_url}/api/v1/federation/incoming/connect", json=envelope.to_wire()
            )
            response.raise_for_status()

    async def start(self) -> None:
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning")
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.should_exit = True
            self._server.force_exit = True
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
