"""The signed message of wire protocol `fedagent/1`: canonical JSON, sign, verify.

The signature covers the RFC 8785 (JCS) canonical form of every field but `signature`.
The algorithm is bound to the verifying key, never read from the message.
"""

from __future__ import annotations

import base64
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from functools import lru_cache
from typing import Any, Literal

import rfc8785
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from federation import tracing
from federation.errors import (
    KeyUnacceptable,
    MalformedEnvelope,
    SignatureInvalid,
    TimestampOutOfWindow,
    UnsupportedProtocol,
    WrongRecipient,
)

PROTOCOL: Literal["fedagent/1"] = "fedagent/1"
# Identifiers a peer sends end up in paths, workflow ids and logs: safe tokens only.
INSTANCE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class MessageType(StrEnum):
    CONNECT = "CONNECT"
    COMMAND = "COMMAND"
    EVENT = "EVENT"
    RESPONSE = "RESPONSE"


class Algorithm(StrEnum):
    ED25519 = "Ed25519"
    RSA_PSS_SHA256 = "RSA-PSS-SHA256"


class Envelope(BaseModel):
    """One message between instances, exactly as it travels (unknown fields refused)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    protocol: Literal["fedagent/1"]
    messageId: str = Field(min_length=1, max_length=128)
    type: MessageType
    senderId: str = Field(pattern=INSTANCE_ID_PATTERN)
    recipientId: str = Field(pattern=INSTANCE_ID_PATTERN)
    keyId: str = Field(min_length=1, max_length=128)
    timestamp: str = Field(min_length=1, max_length=64)
    commandType: str | None = Field(default=None, max_length=64)
    payload: dict[str, Any] = Field(default_factory=dict)
    correlationId: str | None = Field(default=None, max_length=128)
    # W3C trace context of the run this message belongs to; signed like every other field.
    traceparent: str | None = Field(
        default=None, pattern=r"^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"
    )
    signature: str = Field(default="", max_length=1024)

    def signed_fields(self) -> dict[str, Any]:
        return self._without_empty_trace(self.model_dump(mode="json", exclude={"signature"}))

    def to_wire(self) -> dict[str, Any]:
        return self._without_empty_trace(self.model_dump(mode="json"))

    @staticmethod
    def _without_empty_trace(fields: dict[str, Any]) -> dict[str, Any]:
        # An absent and a null traceparent are the same message, with the same signature.
        if fields.get("traceparent") is None:
            fields.pop("traceparent", None)
        return fields


def canonical_bytes(obj: Any) -> bytes:
    """RFC 8785 canonical JSON of `obj`."""
    return rfc8785.dumps(obj)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def format_timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_timestamp(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise MalformedEnvelope(f"timestamp {text!r} is not RFC 3339") from exc
    if moment.tzinfo is None:
        raise MalformedEnvelope("timestamp must carry a UTC offset")
    return moment


@dataclass(frozen=True)
class PublicKey:
    """A verifying key with the algorithm it is bound to."""

    key_id: str
    algorithm: Algorithm
    public_pem: str

    def verify(self, signature: bytes, data: bytes) -> bool:
        try:
            key = _load_public(self.public_pem)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            return False  # a published key we cannot read verifies nothing
        try:
            if self.algorithm is Algorithm.ED25519 and isinstance(key, ed25519.Ed25519PublicKey):
                key.verify(signature, data)
                return True
            if self.algorithm is Algorithm.RSA_PSS_SHA256 and isinstance(key, rsa.RSAPublicKey):
                key.verify(signature, data, _pss(), hashes.SHA256())
                return True
        except InvalidSignature:
            return False
        return False  # the key material does not match the algorithm it claims


@dataclass(frozen=True)
class SigningKey:
    """A private key of this instance, with its id and algorithm."""

    key_id: str
    algorithm: Algorithm
    private_pem: str

    def sign(self, data: bytes) -> bytes:
        key = serialization.load_pem_private_key(self.private_pem.encode(), password=None)
        if isinstance(key, ed25519.Ed25519PrivateKey):
            return key.sign(data)
        if isinstance(key, rsa.RSAPrivateKey):
            return key.sign(data, _pss(), hashes.SHA256())
        raise TypeError(f"unsupported private key type {type(key).__name__}")

    def public(self) -> PublicKey:
        key = serialization.load_pem_private_key(self.private_pem.encode(), password=None)
        pem = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return PublicKey(self.key_id, self.algorithm, pem.decode())

    def __repr__(self) -> str:  # never print private material
        return f"SigningKey(key_id={self.key_id!r}, algorithm={self.algorithm.value!r})"


# RSA keys a peer may use: a verification costs about as much as the exponent has bits, so a
# key with a huge exponent or modulus makes every message expensive to check.
RSA_EXPONENT = 65537
RSA_BITS = (2048, 4096)


def key_problem(algorithm: str, public_pem: str) -> str | None:
    """Why a published key is not one this instance verifies with (None: it is)."""
    try:
        bound = Algorithm(algorithm)
        key = _load_any_public(public_pem)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return f"{algorithm} key {public_pem[:16]!r}... cannot be read"
    if bound is Algorithm.ED25519:
        return None if isinstance(key, ed25519.Ed25519PublicKey) else "not an Ed25519 key"
    if not isinstance(key, rsa.RSAPublicKey):
        return "not an RSA key"
    numbers = key.public_numbers()
    if numbers.e != RSA_EXPONENT:
        return f"RSA keys must have the public exponent {RSA_EXPONENT}"
    if not RSA_BITS[0] <= key.key_size <= RSA_BITS[1]:
        return f"RSA keys must have {RSA_BITS[0]} to {RSA_BITS[1]} bit moduli, not {key.key_size}"
    return None


def require_acceptable(key_id: str, algorithm: str, public_pem: str) -> None:
    """KeyUnacceptable unless `key_problem` finds nothing."""
    problem = key_problem(algorithm, public_pem)
    if problem is not None:
        raise KeyUnacceptable(f"key {key_id[:128]!r} is refused: {problem}", keyId=key_id[:128])


@lru_cache(maxsize=512)
def _load_any_public(pem: str) -> Any:
    # Parsing a PEM (RSA above all) costs far more than a verification: keep the few we meet.
    return serialization.load_pem_public_key(pem.encode())


@lru_cache(maxsize=512)
def _load_public(pem: str) -> Any:
    """A key to verify with; never an RSA key outside RSA_EXPONENT and RSA_BITS."""
    key = _load_any_public(pem)
    if isinstance(key, rsa.RSAPublicKey) and (
        key.public_numbers().e != RSA_EXPONENT or not RSA_BITS[0] <= key.key_size <= RSA_BITS[1]
    ):
        raise ValueError("RSA key outside the accepted exponent and sizes")
    return key


def _pss() -> padding.PSS:
    return padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)


def generate_signing_key(algorithm: Algorithm = Algorithm.ED25519) -> SigningKey:
    private: ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
    if algorithm is Algorithm.ED25519:
        private = ed25519.Ed25519PrivateKey.generate()
    else:
        private = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return SigningKey(
        key_id=f"k-{uuid.uuid4().hex[:16]}", algorithm=algorithm, private_pem=pem.decode()
    )


ENDORSEMENT_PURPOSE = "fedagent/1 key endorsement"


def endorsement_bytes(instance_id: str, key_id: str, algorithm: str, public_pem: str) -> bytes:
    """What an endorsement signs: the RFC 8785 form of the new key as its card entry publishes
    it (keyId, algorithm, publicKey exactly), the instance's id and ENDORSEMENT_PURPOSE."""
    return canonical_bytes(
        {
            "purpose": ENDORSEMENT_PURPOSE,
            "instanceId": instance_id,
            "keyId": key_id,
            "algorithm": algorithm,
            "publicKey": public_pem,
        }
    )


def endorse(signer: SigningKey, instance_id: str, new_key: PublicKey) -> dict[str, str]:
    """The card entry's `endorsement` of `new_key` by the key it replaces."""
    data = endorsement_bytes(
        instance_id, new_key.key_id, new_key.algorithm.value, new_key.public_pem
    )
    return {"keyId": signer.key_id, "signature": b64url(signer.sign(data))}


def sign_envelope(
    key: SigningKey,
    *,
    type: MessageType,
    sender_id: str,
    recipient_id: str,
    payload: dict[str, Any],
    command_type: str | None = None,
    correlation_id: str | None = None,
    message_id: str | None = None,
    now: datetime | None = None,
    traceparent: str | None = None,
) -> Envelope:
    """Sign a new message; it joins the current trace (federation.tracing) unless told which."""
    unsigned = Envelope(
        protocol=PROTOCOL,
        messageId=message_id or str(uuid.uuid4()),
        type=type,
        senderId=sender_id,
        recipientId=recipient_id,
        keyId=key.key_id,
        timestamp=format_timestamp(now or datetime.now(UTC)),
        commandType=command_type,
        payload=payload,
        correlationId=correlation_id,
        traceparent=traceparent or tracing.outgoing(),
    )
    signature = key.sign(canonical_bytes(unsigned.signed_fields()))
    return unsigned.model_copy(update={"signature": b64url(signature)})


def parse_envelope(raw: Any) -> Envelope:
    """Validate the shape of a wire message; unknown fields and wrong types are refused."""
    if isinstance(raw, dict) and raw.get("protocol") not in (None, PROTOCOL):
        raise UnsupportedProtocol(f"protocol {raw.get('protocol')!r} is not {PROTOCOL}")
    try:
        envelope = Envelope.model_validate(raw)
    except ValidationError as exc:
        fields = sorted({".".join(str(p) for p in e["loc"]) for e in exc.errors()})
        raise MalformedEnvelope(
            f"signed message does not match fedagent/1: {', '.join(fields) or 'body'}",
            fields=fields,
        ) from exc
    if _has_nul(raw):
        # No store can keep it (PostgreSQL text and jsonb refuse NUL), so no peer may send it.
        raise MalformedEnvelope("signed message contains a NUL character")
    try:
        canonical_bytes(envelope.signed_fields())
    except (rfc8785.CanonicalizationError, UnicodeError, ValueError) as exc:
        # e.g. integers beyond 2^53 or NaN: they have no canonical JSON form to sign.
        raise MalformedEnvelope(f"message has no canonical JSON form: {exc}") from exc
    return envelope


def _has_nul(value: Any) -> bool:
    # A walk, not a recursion: a message nested deeper than Python recurses is refused by the
    # canonical form's depth limit (MalformedEnvelope), not by a RecursionError here.
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def check_recipient(envelope: Envelope, instance_id: str) -> None:
    if envelope.recipientId != instance_id:
        raise WrongRecipient(
            f"message is addressed to {envelope.recipientId!r}, not to this instance"
        )


def check_timestamp(envelope: Envelope, window_seconds: int, now: datetime | None = None) -> None:
    moment = parse_timestamp(envelope.timestamp)
    current = now or datetime.now(UTC)
    skew = abs((current - moment).total_seconds())
    if skew > window_seconds:
        where = "in the past" if moment < current else "in the future"
        raise TimestampOutOfWindow(
            f"timestamp is {int(skew)} s {where}; the window is ±{window_seconds} s"
        )


def check_signature(envelope: Envelope, key: PublicKey) -> None:
    try:
        signature = b64url_decode(envelope.signature)
    except (ValueError, TypeError) as exc:
        raise SignatureInvalid("signature is not base64url") from exc
    if not key.verify(signature, canonical_bytes(envelope.signed_fields())):
        raise SignatureInvalid("signature does not verify against the sender's key")


def expiry(
    window_seconds: int, now: datetime | None = None, stamped: datetime | None = None
) -> datetime:
    """Until when a seen messageId must be remembered: twice the window past the later of now
    and the message's own timestamp (`stamped`). A message stamped ahead of this process's
    clock stays acceptable, to a replica whose clock is behind, up to a window past its
    timestamp: counting from now alone would forget it while a replay could still pass."""
    current = now or datetime.now(UTC)
    later = max(current, stamped) if stamped is not None else current
    return later + timedelta(seconds=2 * window_seconds)
