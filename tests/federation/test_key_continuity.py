"""Key continuity as a pure rule: what a connected peer's card may add to the keys this
instance trusts (no database, no network)."""

from __future__ import annotations

from typing import Any

import pytest

from federation.envelope import PublicKey, SigningKey, endorse, generate_signing_key
from federation.trust import continued_keys

PEER = "peer-with-a-long-card"


def entry(key: SigningKey, endorsed_by: SigningKey | None = None) -> dict[str, Any]:
    public = key.public()
    card: dict[str, Any] = {
        "keyId": public.key_id,
        "algorithm": public.algorithm.value,
        "publicKey": public.public_pem,
    }
    if endorsed_by is not None:
        card["endorsement"] = endorse(endorsed_by, PEER, public)
    return card


def test_a_long_card_costs_at_most_one_verification_per_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A hostile peer's card (anyone can make this instance re-read it by naming that peer and a
    # key it does not know): a chain of rotations listed newest first, so that each pass over
    # the card accepts one more key, and many keys whose endorsements name the trusted key but
    # do not verify. Checked again on every pass, they cost chain x forged verifications.
    trusted = generate_signing_key()
    chain = [trusted]
    for _ in range(30):
        chain.append(generate_signing_key())
    rotations = [entry(new, endorsed_by=old) for old, new in zip(chain, chain[1:], strict=False)]
    forged = []
    for _ in range(30):
        usurper = generate_signing_key()
        claim = entry(usurper, endorsed_by=usurper)
        claim["endorsement"]["keyId"] = trusted.key_id
        forged.append(claim)
    card = [entry(trusted), *reversed(rotations), *forged]

    verified = 0
    real_verify = PublicKey.verify

    def counted(self: PublicKey, signature: bytes, data: bytes) -> bool:
        nonlocal verified
        verified += 1
        return real_verify(self, signature, data)

    monkeypatch.setattr(PublicKey, "verify", counted)
    accepted, refused = continued_keys([entry(trusted)], card, PEER)

    assert [k["keyId"] for k in accepted] == [c["keyId"] for c in card[: 1 + len(rotations)]]
    assert set(refused) == {c["keyId"] for c in forged}
    assert verified <= len(card)
