"""The master key and the sealing of private keys, without a database."""

from __future__ import annotations

import base64
import os
import secrets
import threading
from pathlib import Path

import pytest
from pydantic import ValidationError

from federation.envelope import generate_signing_key
from federation.keystore import KeyCipher, KeystoreError, key_file_path, load_cipher
from federation.settings import Settings, is_placeholder_secret


def settings(tmp_path: Path, **kw: object) -> Settings:
    return Settings(instance_name="unit", data_dir=tmp_path, **kw)  # type: ignore[arg-type]


def test_sealed_key_opens_only_with_its_master_key_and_key_id() -> None:
    cipher = KeyCipher(secrets.token_bytes(32))
    pem = generate_signing_key().private_pem.encode()
    sealed = cipher.seal(pem, key_id="k-1")
    assert b"PRIVATE" not in sealed.encode() and sealed.startswith("aesgcm1:")
    assert cipher.seal(pem, key_id="k-1") != sealed  # a fresh nonce every time
    assert cipher.open(sealed, key_id="k-1") == pem
    with pytest.raises(KeystoreError) as moved:
        cipher.open(sealed, key_id="k-2")  # a blob moved to another key's row
    with pytest.raises(KeystoreError) as other:
        KeyCipher(secrets.token_bytes(32)).open(sealed, key_id="k-1")
    for err in (moved.value, other.value):
        assert "PRIVATE" not in str(err) and sealed[8:40] not in str(err)
        assert err.__cause__ is None and err.__suppress_context__
    with pytest.raises(KeystoreError):
        cipher.open("plain text", key_id="k-1")
    assert "hidden" in repr(cipher)


def test_key_file_is_created_once_with_mode_0600(tmp_path: Path) -> None:
    config = settings(tmp_path)
    path = key_file_path(config)
    assert path == tmp_path / "secrets" / "unit.key"
    first = load_cipher(config)
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    sealed = first.seal(b"x", key_id="k")
    assert load_cipher(config).open(sealed, key_id="k") == b"x"  # the same key next start


def test_concurrent_first_starts_agree_on_one_key(tmp_path: Path) -> None:
    config = settings(tmp_path)
    ciphers: list[KeyCipher] = []
    threads = [
        threading.Thread(target=lambda: ciphers.append(load_cipher(config))) for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sealed = ciphers[0].seal(b"x", key_id="k")
    assert all(c.open(sealed, key_id="k") == b"x" for c in ciphers)
    assert sorted(p.name for p in (tmp_path / "secrets").iterdir()) == ["unit.key"]


def test_a_key_file_open_to_others_is_refused_outside_dev(tmp_path: Path) -> None:
    load_cipher(settings(tmp_path))
    os.chmod(key_file_path(settings(tmp_path)), 0o644)
    with pytest.raises(KeystoreError, match="chmod 600"):
        load_cipher(settings(tmp_path))
    load_cipher(settings(tmp_path, environment="dev"))  # dev: a warning only


def test_secret_key_setting_base64_or_passphrase(tmp_path: Path) -> None:
    raw = secrets.token_bytes(32)
    from_b64 = load_cipher(settings(tmp_path, secret_key=base64.b64encode(raw).decode()))
    from_url = load_cipher(settings(tmp_path, secret_key=base64.urlsafe_b64encode(raw).decode()))
    assert from_url.open(from_b64.seal(b"x", key_id="k"), key_id="k") == b"x"
    phrase = "correct horse battery staple, but longer: 7f3a9"
    one = load_cipher(settings(tmp_path, secret_key=phrase))
    two = load_cipher(settings(tmp_path, secret_key=phrase))
    assert two.open(one.seal(b"x", key_id="k"), key_id="k") == b"x"
    assert not (tmp_path / "secrets").exists()  # no key file when the setting is given


@pytest.mark.parametrize(
    "value",
    ["change-me", "changeme-changeme-changeme-changeme", "secret", "x" * 40, "", "short-but-ok?"],
)
def test_placeholder_secret_keys_are_refused_outside_dev(tmp_path: Path, value: str) -> None:
    assert is_placeholder_secret(value)
    with pytest.raises(ValidationError, match="placeholder"):
        settings(tmp_path, secret_key=value)
    load_cipher(settings(tmp_path, secret_key=value, environment="dev"))


def test_real_secret_keys_are_not_placeholders() -> None:
    for _ in range(200):
        assert not is_placeholder_secret(base64.b64encode(secrets.token_bytes(32)).decode())
    assert not is_placeholder_secret("Qm9vdHN0cmFwIHBhc3NwaHJhc2UgZm9yIHVuaXQgdGVzdHM=!")
    assert is_placeholder_secret(base64.b64encode(bytes(32)).decode())  # 32 zero bytes


def test_a_passphrase_is_not_mistaken_for_a_base64_key() -> None:
    assert is_placeholder_secret("changemechangemechangemechangemechangemeabc")  # 43 chars
    assert is_placeholder_secret("change me change me change me change me abcd")
