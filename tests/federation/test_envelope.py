"""The signed envelope on its own: canonical form, signing, verification of every field."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from federation.envelope import (
    Algorithm,
    Envelope,
    MessageType,
    PublicKey,
    canonical_bytes,
    check_signature,
    check_timestamp,
    generate_signing_key,
    key_problem,
    parse_envelope,
    sign_envelope,
)
from federation.errors import MalformedEnvelope, SignatureInvalid, TimestampOutOfWindow

KEY = generate_signing_key()


def signed(**payload: Any) -> Envelope:
    return sign_envelope(
        KEY,
        type=MessageType.COMMAND,
        sender_id="a",
        recipient_id="b",
        command_type="agent.spawn",
        payload=payload or {"x": 1},
    )


def test_canonical_form_ignores_key_order_and_escapes() -> None:
    assert canonical_bytes({"b": 1, "a": "é"}) == canonical_bytes({"a": "\u00e9", "b": 1})
    assert canonical_bytes({"b": 1, "a": [1, 2]}) == b'{"a":[1,2],"b":1}'


def test_signature_survives_a_json_round_trip() -> None:
    envelope = signed(items=["ü", 1.5, None])
    check_signature(parse_envelope(envelope.to_wire()), KEY.public())


def test_rsa_pss_keys_sign_and_verify() -> None:
    rsa = generate_signing_key(Algorithm.RSA_PSS_SHA256)
    envelope = sign_envelope(
        rsa, type=MessageType.EVENT, sender_id="a", recipient_id="b", payload={"k": "v"}
    )
    check_signature(envelope, rsa.public())


@pytest.mark.parametrize(
    ("material", "registered_as"),
    [
        (Algorithm.ED25519, Algorithm.RSA_PSS_SHA256),
        (Algorithm.RSA_PSS_SHA256, Algorithm.ED25519),
    ],
)
def test_a_key_verifies_only_as_the_algorithm_it_is_registered_with(
    material: Algorithm, registered_as: Algorithm
) -> None:
    # The algorithm is bound to the key: the same key material registered under the other
    # algorithm verifies nothing, not even its own valid signature.
    key = generate_signing_key(material)
    envelope = sign_envelope(
        key, type=MessageType.EVENT, sender_id="a", recipient_id="b", payload={"k": "v"}
    )
    check_signature(envelope, key.public())
    mislabelled = PublicKey(key.key_id, registered_as, key.public().public_pem)
    with pytest.raises(SignatureInvalid):
        check_signature(envelope, mislabelled)


SIGNED_FIELDS = [
    "messageId",
    "senderId",
    "recipientId",
    "keyId",
    "timestamp",
    "commandType",
    "correlationId",
    "type",
]


@settings(max_examples=60, deadline=None)
@given(field=st.sampled_from(SIGNED_FIELDS), text=st.text(min_size=1, max_size=20))
def test_any_change_to_a_signed_header_field_fails(field: str, text: str) -> None:
    wire = signed().to_wire()
    new_value: Any = "RESPONSE" if field == "type" else text
    if field in ("senderId", "recipientId"):  # instance ids are safe tokens
        new_value = "id-" + text.encode().hex()[:40]
    if wire[field] == new_value:
        new_value = new_value + "x"
    wire[field] = new_value
    with pytest.raises(SignatureInvalid):
        check_signature(Envelope.model_validate(wire), KEY.public())


@settings(max_examples=60, deadline=None)
@given(
    payload=st.dictionaries(
        st.text(max_size=8),
        st.integers(min_value=-(2**53) + 1, max_value=2**53 - 1) | st.text(max_size=8),
        min_size=1,
    )
)
def test_any_change_to_the_payload_fails(payload: dict[str, Any]) -> None:
    wire = signed(k=0).to_wire()
    if payload == wire["payload"]:
        payload = {**payload, "extra": 1}
    wire["payload"] = payload
    with pytest.raises(SignatureInvalid):
        check_signature(Envelope.model_validate(wire), KEY.public())


def test_timestamp_window() -> None:
    now = datetime.now(UTC)
    check_timestamp(signed(), 300, now + timedelta(seconds=299))
    with pytest.raises(TimestampOutOfWindow):
        check_timestamp(signed(), 300, now + timedelta(seconds=302))
    with pytest.raises(TimestampOutOfWindow):
        check_timestamp(signed(), 300, now - timedelta(seconds=302))


def test_unknown_fields_and_wrong_protocol_are_malformed() -> None:
    wire = signed().to_wire()
    with pytest.raises(MalformedEnvelope):
        parse_envelope({**wire, "alg": "none"})
    with pytest.raises(MalformedEnvelope):
        parse_envelope({k: v for k, v in wire.items() if k != "senderId"})


def test_signing_key_repr_hides_private_material() -> None:
    assert "PRIVATE" not in repr(KEY)


def test_numbers_without_a_canonical_form_are_malformed() -> None:
    wire = signed().to_wire()
    wire["payload"] = {"n": 2**60}
    with pytest.raises(MalformedEnvelope):
        parse_envelope(wire)


# NUL and lone surrogates are refused on the wire (no store can keep them, UTF-8 cannot carry
# them); everything else is fair game.
WIRE_CHARS = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
TEXT = st.text(WIRE_CHARS)
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53) + 1, max_value=2**53 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | TEXT,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(WIRE_CHARS, max_size=6), children, max_size=4)
    ),
    max_leaves=20,
)


def _reordered(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _reordered(value[k]) for k in reversed(list(value))}
    if isinstance(value, list):
        return [_reordered(v) for v in value]
    return value


@settings(max_examples=80, deadline=None)
@given(payload=st.dictionaries(st.text(WIRE_CHARS, max_size=8), JSON_VALUES, max_size=5))
def test_canonical_form_is_stable_across_key_order_and_unicode_escapes(
    payload: dict[str, Any],
) -> None:
    envelope = signed(p=payload)
    wire = envelope.to_wire()
    for text in (
        json.dumps(wire, ensure_ascii=True),
        json.dumps(_reordered(wire), ensure_ascii=False),
        json.dumps(_reordered(wire), ensure_ascii=True, indent=2),
    ):
        received = parse_envelope(json.loads(text))
        assert canonical_bytes(received.signed_fields()) == canonical_bytes(
            envelope.signed_fields()
        )
        check_signature(received, KEY.public())


RSA_KEY = generate_signing_key(Algorithm.RSA_PSS_SHA256)


@settings(max_examples=8, deadline=None)
@given(field=st.sampled_from(SIGNED_FIELDS), text=st.text(min_size=1, max_size=20))
def test_rsa_pss_signatures_break_on_any_header_change(field: str, text: str) -> None:
    wire = sign_envelope(
        RSA_KEY,
        type=MessageType.COMMAND,
        sender_id="a",
        recipient_id="b",
        command_type="agent.status",
        payload={"agentId": "x"},
    ).to_wire()
    check_signature(Envelope.model_validate(wire), RSA_KEY.public())
    new_value: Any = "EVENT" if field == "type" else text
    if field in ("senderId", "recipientId"):  # instance ids are safe tokens, or not parsed
        new_value = "x" + "".join(c for c in text if c.isascii() and c.isalnum())
    if wire[field] == new_value:
        new_value = new_value + "x"
    wire[field] = new_value
    with pytest.raises(SignatureInvalid):
        check_signature(Envelope.model_validate(wire), RSA_KEY.public())


@settings(max_examples=40, deadline=None)
@given(
    payload=st.dictionaries(st.text(WIRE_CHARS, max_size=6), JSON_VALUES, min_size=1, max_size=4)
)
def test_any_change_deep_inside_the_payload_fails(payload: dict[str, Any]) -> None:
    wire = signed(p=payload).to_wire()
    changed = {**payload, "\u00e9": ["added", 1.5, None]}
    if changed == payload:
        changed = {**payload, "\u00e9": None}
    wire["payload"] = {"p": changed}
    with pytest.raises(SignatureInvalid):
        check_signature(Envelope.model_validate(wire), KEY.public())


@pytest.mark.parametrize("where", ["messageId", "payload", "key"])
def test_nul_characters_are_malformed_anywhere(where: str) -> None:
    wire = signed().to_wire()
    if where == "messageId":
        wire["messageId"] = "a\x00b"
    elif where == "payload":
        wire["payload"] = {"x": ["ok", "a\x00"]}
    else:
        wire["payload"] = {"a\x00": 1}
    with pytest.raises(MalformedEnvelope, match="NUL"):
        parse_envelope(wire)


def test_lone_surrogates_are_malformed_not_a_crash() -> None:
    wire = signed().to_wire()
    wire["payload"] = json.loads('{"x": "\\ud800"}')
    with pytest.raises(MalformedEnvelope):
        parse_envelope(wire)


def test_an_rsa_key_with_a_huge_exponent_verifies_nothing_even_a_valid_signature() -> None:
    # Built with the RSA numbers directly: e is a 1024-bit prime, d its inverse.
    base = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_numbers()
    e = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_numbers().p
    p, q = base.p, base.q
    d = pow(e, -1, (p - 1) * (q - 1))
    private = rsa.RSAPrivateNumbers(
        p,
        q,
        d,
        rsa.rsa_crt_dmp1(d, p),
        rsa.rsa_crt_dmq1(d, q),
        rsa.rsa_crt_iqmp(p, q),
        rsa.RSAPublicNumbers(e, p * q),
    ).private_key()
    pem = (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    signature = private.sign(b"data", pss, hashes.SHA256())
    private.public_key().verify(signature, b"data", pss, hashes.SHA256())  # it is valid
    assert not PublicKey("k", Algorithm.RSA_PSS_SHA256, pem).verify(signature, b"data")
    assert key_problem("RSA-PSS-SHA256", pem) == "RSA keys must have the public exponent 65537"
