"""A hostile instance written from the wire contract (/work/shared/DESIGN.md), not from ours.

It has its own Ed25519 key (`cryptography` directly), serves its own identity card on a loopback
address of its choosing from a bare asyncio HTTP server that records every request it gets, and
builds and signs envelopes itself (RFC 8785 via `rfc8785`). Nothing here imports `federation`,
so a bug in our signing or verifying code cannot hide itself from these tests.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import rfc8785
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

API = "/api/v1/federation"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class RogueKey:
    algorithm = "Ed25519"

    def __init__(self) -> None:
        self.private: Any = Ed25519PrivateKey.generate()
        self.key_id = f"rogue-{uuid.uuid4().hex[:12]}"

    def sign(self, data: bytes) -> bytes:
        return bytes(self.private.sign(data))

    @property
    def public_pem(self) -> str:
        return (
            self.private.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )

    def card_entry(self) -> dict[str, Any]:
        return {"keyId": self.key_id, "algorithm": self.algorithm, "publicKey": self.public_pem}


class RogueRsaKey(RogueKey):
    """An RSA-PSS-SHA256 key (MGF1-SHA256, salt of the digest's length) of any shape: `bits`
    of modulus and public exponent `e`, built from the RSA numbers directly when `e` is one
    the library would not generate."""

    algorithm = "RSA-PSS-SHA256"

    def __init__(self, bits: int = 2048, e: int = 65537) -> None:
        super().__init__()
        base = rsa.generate_private_key(
            public_exponent=e if e in (3, 65537) else 65537, key_size=bits
        )
        if e not in (3, 65537):
            numbers = base.private_numbers()
            p, q = numbers.p, numbers.q
            d = pow(e, -1, (p - 1) * (q - 1))
            base = rsa.RSAPrivateNumbers(
                p,
                q,
                d,
                rsa.rsa_crt_dmp1(d, p),
                rsa.rsa_crt_dmq1(d, q),
                rsa.rsa_crt_iqmp(p, q),
                rsa.RSAPublicNumbers(e, p * q),
            ).private_key()
        self.private = base

    def sign(self, data: bytes) -> bytes:
        pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
        return bytes(self.private.sign(data, pss, hashes.SHA256()))


def endorse(signer: RogueKey, instance_id: str, new: RogueKey) -> dict[str, str]:
    """The card entry's `endorsement` of `new` by `signer`: a signature over the RFC 8785 form
    of the new key's entry (keyId, algorithm, publicKey), the instance's id and the purpose."""
    statement = {
        "purpose": "fedagent/1 key endorsement",
        "instanceId": instance_id,
        "keyId": new.key_id,
        "algorithm": new.algorithm,
        "publicKey": new.public_pem,
    }
    return {"keyId": signer.key_id, "signature": b64url(signer.sign(rfc8785.dumps(statement)))}


def huge_exponent() -> int:
    """A public exponent of 1024 bits: a prime, so coprime to a totient it does not divide."""
    return int(rsa.generate_private_key(public_exponent=65537, key_size=2048).private_numbers().p)


class Recorded:
    def __init__(self, method: str, target: str, body: bytes) -> None:
        self.method, self.target, self.body = method, target, body

    def json(self) -> Any:
        return json.loads(self.body)


class Rogue:
    """A hostile peer; `card_overrides` change what its identity card says."""

    def __init__(self, host: str = "127.0.0.1", instance_id: str | None = None) -> None:
        self.host = host
        self.port = 0
        self.instance_id = instance_id or f"rogue-{uuid.uuid4().hex[:12]}"
        self.key = RogueKey()
        self.card_overrides: dict[str, Any] = {}
        self.requests: list[Recorded] = []
        # While set and not yet released, a request for the card waits (a slow peer).
        self.card_gate: asyncio.Event | None = None
        # The payload it answers a command of this type with, given the command's payload.
        self.command_replies: dict[str, Callable[[dict[str, Any]], Any]] = {}
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def card_fetches(self) -> int:
        return sum(1 for r in self.requests if r.method == "GET")

    def card(self) -> dict[str, Any]:
        return {
            "instanceId": self.instance_id,
            "name": "rogue",
            "url": self.url,
            "protocol": "fedagent/1",
            "keys": [self.key.card_entry()],
            "capabilities": {"protocol": "fedagent/1"},
            **self.card_overrides,
        }

    # --- envelopes ----------------------------------------------------------------------

    def envelope(
        self,
        type: str,
        recipient_id: str,
        payload: dict[str, Any],
        *,
        command_type: str | None = None,
        correlation_id: str | None = None,
        sign_with: RogueKey | None = None,
        **overrides: Any,
    ) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "protocol": "fedagent/1",
            "messageId": str(uuid.uuid4()),
            "type": type,
            "senderId": self.instance_id,
            "recipientId": recipient_id,
            "keyId": self.key.key_id,
            "timestamp": now_rfc3339(),
            "commandType": command_type,
            "payload": payload,
            "correlationId": correlation_id,
            **overrides,
        }
        signer = sign_with or self.key
        fields["signature"] = b64url(signer.sign(rfc8785.dumps(fields)))
        return fields

    def connection_request(
        self, recipient_id: str, *, url: str | None = None, **kw: Any
    ) -> dict[str, Any]:
        payload = {
            "connectionId": str(uuid.uuid4()),
            "url": url or self.url,
            "name": "rogue",
            "keys": [self.key.card_entry()],
        }
        payload.update(kw.pop("payload", {}))
        return self.envelope(
            "CONNECT", recipient_id, payload, command_type="connection.request", **kw
        )

    # --- the card server ----------------------------------------------------------------

    async def start(self) -> Rogue:
        self._server = await asyncio.start_server(self._handle, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            length = 0
            for line in lines[1:]:
                if line.lower().startswith("content-length:"):
                    length = int(line.split(":", 1)[1])
            body = await reader.readexactly(length) if length else b""
            self.requests.append(Recorded(method, target, body))
            if self.card_gate is not None and method == "GET":
                await self.card_gate.wait()
            status, answer = self._route(method, target, body)
            data = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
            writer.write(
                f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n"
                f"content-length: {len(data)}\r\nconnection: close\r\n\r\n".encode()
                + data
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    def _route(self, method: str, target: str, body: bytes) -> tuple[int, Any]:
        if method == "GET" and target == f"{API}/instance":
            return 200, self.card()
        if method == "POST" and target.startswith(f"{API}/incoming/"):
            request = json.loads(body)
            answer = self.command_replies.get(str(request.get("commandType")))
            if answer is not None:
                payload = answer(request.get("payload") or {})
            else:
                payload = {"connectionId": request.get("payload", {}).get("connectionId")}
            return 200, self.envelope(
                "RESPONSE",
                request["senderId"],
                payload,
                command_type=request.get("commandType"),
                correlation_id=request["messageId"],
            )
        return 404, {"code": "not_found"}

    # --- talking to an instance ---------------------------------------------------------

    async def post(
        self, instance_url: str, endpoint: str, envelope: Any, *, source: str | None = None
    ) -> httpx.Response:
        transport = httpx.AsyncHTTPTransport(local_address=source) if source else None
        async with httpx.AsyncClient(transport=transport, timeout=30.0) as http:
            return await http.post(f"{instance_url}{API}/incoming/{endpoint}", json=envelope)
