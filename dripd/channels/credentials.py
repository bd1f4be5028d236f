"""Adapter credentials at rest: AES-256-GCM under the key in `DRIPD_ENCRYPTION_KEY`.

Retired keys (`DRIPD_ENCRYPTION_KEYS_RETIRED`, comma-separated) still decrypt, so that
daemons keep working while `dripd rotate-key` re-encrypts every blob under the new key.

A blob is laid out as

    version (1 byte, = 1) | key id (4 bytes) | nonce (12 bytes) | ciphertext + GCM tag (16 bytes)

where the key id is the first 4 bytes of SHA-256 of the key, so a blob written under
another key is recognised as such rather than reported as corrupt. The plaintext is the
credentials map as msgspec JSON; the caller's `aad` (e.g. the adapter id) binds a blob
to its row so it cannot be copied onto another adapter.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from dripd.errors import CredentialsError

__all__ = ["ENV_VAR", "RETIRED_ENV_VAR", "Vault", "generate_key"]

ENV_VAR = "DRIPD_ENCRYPTION_KEY"
RETIRED_ENV_VAR = "DRIPD_ENCRYPTION_KEYS_RETIRED"
VERSION = 1
KEY_BYTES = 32
_KEY_ID_BYTES = 4
_NONCE_BYTES = 12
_TAG_BYTES = 16
_HEADER_BYTES = 1 + _KEY_ID_BYTES + _NONCE_BYTES


def generate_key() -> str:
    """A new random key as URL-safe base64 with padding (44 characters).

    Keys are read back in URL-safe or standard base64, padded or not.
    """
    return base64.urlsafe_b64encode(os.urandom(KEY_BYTES)).decode("ascii")


def _decode_key(text: str, name: str) -> bytes:
    compact = "".join(text.split())
    # Both alphabets are accepted: operators paste keys from other tools too.
    standard = compact.replace("-", "+").replace("_", "/")
    standard += "=" * (-len(standard) % 4)
    try:
        key = base64.b64decode(standard, validate=True)
    except (binascii.Error, ValueError):
        raise CredentialsError(
            f"{name} is not valid base64; create one with `dripd keygen`"
        ) from None
    if len(key) != KEY_BYTES:
        raise CredentialsError(
            f"{name} decodes to {len(key)} bytes but must decode to {KEY_BYTES} (AES-256); "
            "create one with `dripd keygen`"
        )
    return key


def _key_id(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()[:_KEY_ID_BYTES]


class Vault:
    """Encrypts with one key and decrypts with it or a retired one; never shows a key."""

    __slots__ = ("_aead", "_key_id", "_retired")

    def __init__(self, key: bytes, retired: Sequence[bytes] = ()) -> None:
        for k in (key, *retired):
            if len(k) != KEY_BYTES:
                raise CredentialsError(
                    f"an encryption key is {len(k)} bytes but must be {KEY_BYTES} (AES-256)"
                )
        self._aead = AESGCM(key)
        self._key_id = _key_id(key)
        self._retired = {_key_id(k): AESGCM(k) for k in retired if _key_id(k) != self._key_id}

    @classmethod
    def from_text(cls, text: str, *, name: str = ENV_VAR) -> Vault:
        """A vault for a base64 key; `name` is how error messages refer to it."""
        return cls(_decode_key(text, name))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Vault:
        """A vault for `DRIPD_ENCRYPTION_KEY` (and any `DRIPD_ENCRYPTION_KEYS_RETIRED`) in
        `env` (default: the process environment)."""
        env = os.environ if env is None else env
        text = env.get(ENV_VAR, "")
        if not text.strip():
            raise CredentialsError(f"{ENV_VAR} is not set; create one with `dripd keygen`")
        retired = [
            _decode_key(part, f"{RETIRED_ENV_VAR} (key #{n})")
            for n, part in enumerate(env.get(RETIRED_ENV_VAR, "").replace(",", " ").split(), 1)
        ]
        return cls(_decode_key(text, ENV_VAR), retired)

    def __repr__(self) -> str:
        return f"Vault(key_id={self.key_id!r})"

    def __reduce__(self) -> Any:
        # Pickling would write the key somewhere we do not control.
        raise TypeError("a Vault cannot be pickled")

    @property
    def key_id(self) -> str:
        """The key's public fingerprint in hex (8 digits); safe to print."""
        return self._key_id.hex()

    def is_current(self, blob: bytes) -> bool:
        """Whether `blob` is sealed under the current key (nothing to rotate)."""
        return blob[1 : 1 + _KEY_ID_BYTES] == self._key_id

    def encrypt(self, data: dict[str, Any], *, aad: bytes) -> bytes:
        """Seal `data` into a blob that only this key and the same `aad` can open."""
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, msgspec.json.encode(data), aad)
        return bytes([VERSION]) + self._key_id + nonce + sealed

    def decrypt(self, blob: bytes, *, aad: bytes) -> dict[str, Any]:
        """Open a blob from `encrypt`; CredentialsError says why it cannot be opened."""
        if len(blob) < _HEADER_BYTES + _TAG_BYTES:
            raise CredentialsError(
                f"cannot decrypt the credentials: the blob is {len(blob)} bytes, too short"
            )
        if blob[0] != VERSION:
            raise CredentialsError(
                f"cannot decrypt the credentials: unknown format version {blob[0]}"
            )
        key_id = blob[1 : 1 + _KEY_ID_BYTES]
        aead = self._aead if key_id == self._key_id else self._retired.get(key_id)
        if aead is None:
            known = ", ".join([self.key_id, *(k.hex() for k in self._retired)])
            raise CredentialsError(
                f"the credentials were encrypted with a different key (key id {key_id.hex()}); "
                f"the keys given have ids {known} ({ENV_VAR}, {RETIRED_ENV_VAR})"
            )
        nonce = blob[1 + _KEY_ID_BYTES : _HEADER_BYTES]
        try:
            plain = aead.decrypt(nonce, blob[_HEADER_BYTES:], aad)
        except InvalidTag:
            raise CredentialsError(
                "cannot decrypt the credentials: they were altered, or belong to another row"
            ) from None
        try:
            data = msgspec.json.decode(plain)
        except msgspec.DecodeError:
            raise CredentialsError("cannot decrypt the credentials: not a JSON object") from None
        if not isinstance(data, dict):
            raise CredentialsError("cannot decrypt the credentials: not a JSON object")
        return data
