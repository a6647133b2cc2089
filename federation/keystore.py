"""The master key that seals this instance's private keys at rest (AES-256-GCM).

The master key comes from `FEDAGENT_SECRET_KEY` (32 bytes in base64, or a passphrase stretched
with HKDF-SHA256) or from a key file created on the first start with mode 0600. A sealed private
key is bound to its key id (the AEAD's associated data), so a sealed blob moved to another row
does not open. Nothing here ever logs or raises with key material in it.
"""

from __future__ import annotations

import base64
import logging
import os
import secrets
import stat
import threading
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from federation.settings import Settings, decode_master_key, get_settings, is_placeholder_secret

log = logging.getLogger(__name__)

SEALED_PREFIX = "aesgcm1:"


class KeystoreError(RuntimeError):
    """The master key is missing, unusable, or not the one the private keys were sealed with."""


class KeyCipher:
    """Seals and opens private keys with one 32-byte master key."""

    def __init__(self, master_key: bytes) -> None:
        if len(master_key) != 32:
            raise KeystoreError("the master key must be 32 bytes")
        self._aead = AESGCM(master_key)

    def seal(self, plaintext: bytes, *, key_id: str) -> str:
        nonce = secrets.token_bytes(12)
        sealed = self._aead.encrypt(nonce, plaintext, key_id.encode())
        return SEALED_PREFIX + base64.urlsafe_b64encode(nonce + sealed).decode("ascii")

    def open(self, sealed: str, *, key_id: str) -> bytes:
        if not sealed.startswith(SEALED_PREFIX):
            raise KeystoreError(f"private key {key_id} is not in a known sealed form")
        try:
            blob = base64.urlsafe_b64decode(sealed[len(SEALED_PREFIX) :])
            return self._aead.decrypt(blob[:12], blob[12:], key_id.encode())
        except (InvalidTag, ValueError):
            raise KeystoreError(
                f"private key {key_id} does not open with this master key "
                "(was FEDAGENT_SECRET_KEY or the key file changed?)"
            ) from None

    def __repr__(self) -> str:
        return "KeyCipher(<hidden>)"


def key_file_path(settings: Settings) -> Path:
    if settings.secret_key_file is not None:
        return settings.secret_key_file
    return settings.data_dir / "secrets" / f"{settings.instance_name}.key"


def _from_passphrase(text: str) -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"fedagent master key v1")
    return hkdf.derive(text.encode())


def _read_key_file(path: Path, *, strict: bool) -> bytes:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        message = f"master key file {path} is readable by others (mode {mode:o}); chmod 600 it"
        if strict:
            raise KeystoreError(message)
        log.warning(message)
    raw = decode_master_key(path.read_text())
    if raw is None:
        raise KeystoreError(f"master key file {path} does not hold 32 bytes in base64")
    return raw


def _create_key_file(path: Path) -> None:
    """Write a fresh key atomically: concurrent first starts all end up with the same key."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(base64.b64encode(secrets.token_bytes(32)).decode("ascii") + "\n")
        try:
            os.link(temp, path)  # fails if another process won the race: its key stands
            log.info("created master key file %s", path)
        except FileExistsError:
            pass
    finally:
        temp.unlink(missing_ok=True)


def load_cipher(settings: Settings) -> KeyCipher:
    """The cipher of this instance's master key, creating the key file on the first start."""
    strict = settings.environment != "dev"
    if settings.secret_key is not None:
        value = settings.secret_key.get_secret_value()
        if is_placeholder_secret(value):
            if strict:  # Settings refuses this already; keep the rule where the key is used
                raise KeystoreError("FEDAGENT_SECRET_KEY is a placeholder")
            log.warning("FEDAGENT_SECRET_KEY is a placeholder: acceptable in dev only")
        raw = decode_master_key(value)
        return KeyCipher(raw if raw is not None else _from_passphrase(value))
    path = key_file_path(settings)
    if not path.exists():
        _create_key_file(path)
    return KeyCipher(_read_key_file(path, strict=strict))


_default: KeyCipher | None = None
_default_lock = threading.Lock()


def configure(cipher: KeyCipher) -> None:
    """Make `cipher` the one this process uses when a caller does not pass one."""
    global _default
    with _default_lock:
        _default = cipher


def default_cipher() -> KeyCipher:
    """The configured cipher, or the one of this process's FEDAGENT_* settings."""
    global _default
    with _default_lock:
        if _default is None:
            _default = load_cipher(get_settings())
        return _default
