"""Adapter credentials sealed with AES-256-GCM under DRIPD_ENCRYPTION_KEY."""

from __future__ import annotations

import base64
import hashlib
import os
import pickle

import msgspec
import pytest

from dripd.channels.credentials import ENV_VAR, Vault, generate_key
from dripd.errors import CredentialsError

SECRET = {"username": "mailer", "password": "correct horse battery staple"}
AAD = b"adapter:5b0c6a8e"


@pytest.fixture
def key_text() -> str:
    return generate_key()


@pytest.fixture
def vault(key_text: str) -> Vault:
    return Vault.from_env({"DRIPD_ENCRYPTION_KEY": key_text})


def test_round_trip(vault: Vault) -> None:
    blob = vault.encrypt(SECRET, aad=AAD)
    assert vault.decrypt(blob, aad=AAD) == SECRET


def test_blob_layout_and_no_plaintext(vault: Vault, key_text: str) -> None:
    first = vault.encrypt(SECRET, aad=AAD)
    second = vault.encrypt(SECRET, aad=AAD)
    key = base64.urlsafe_b64decode(key_text)
    assert first[0] == 1
    assert first[1:5] == hashlib.sha256(key).digest()[:4]
    assert first[1:5].hex() == vault.key_id
    assert first[5:17] != second[5:17], "every blob needs its own nonce"
    assert len(first) == 1 + 4 + 12 + len(msgspec.json.encode(SECRET)) + 16
    for secret in (b"correct horse", b"mailer", b"password"):
        assert secret not in first


def test_generated_key_is_urlsafe_base64_of_32_bytes() -> None:
    text = generate_key()
    assert len(text) == 44
    assert "+" not in text
    assert "/" not in text
    assert len(base64.urlsafe_b64decode(text)) == 32
    assert generate_key() != text


def test_standard_and_unpadded_base64_load_the_same_key() -> None:
    key = os.urandom(32)
    # A key whose two encodings differ, so both alphabets are really exercised.
    while base64.b64encode(key) == base64.urlsafe_b64encode(key):
        key = os.urandom(32)
    urlsafe = base64.urlsafe_b64encode(key).decode()
    standard = base64.b64encode(key).decode()
    ids = {
        Vault.from_env({"DRIPD_ENCRYPTION_KEY": text}).key_id
        for text in (urlsafe, standard, standard.rstrip("="), f"  {urlsafe}\n")
    }
    assert len(ids) == 1


@pytest.mark.parametrize("position", [0, 5, 17, -1])
def test_tampered_blob_fails(vault: Vault, position: int) -> None:
    blob = bytearray(vault.encrypt(SECRET, aad=AAD))
    blob[position] ^= 0x01
    with pytest.raises(CredentialsError, match="cannot decrypt"):
        vault.decrypt(bytes(blob), aad=AAD)


def test_wrong_aad_fails(vault: Vault) -> None:
    blob = vault.encrypt(SECRET, aad=AAD)
    with pytest.raises(CredentialsError, match="cannot decrypt the credentials"):
        vault.decrypt(blob, aad=b"adapter:another")


def test_truncated_blob_fails(vault: Vault) -> None:
    with pytest.raises(CredentialsError, match="too short"):
        vault.decrypt(vault.encrypt(SECRET, aad=AAD)[:20], aad=AAD)


def test_wrong_key_names_both_key_ids(vault: Vault) -> None:
    other = Vault.from_env({"DRIPD_ENCRYPTION_KEY": generate_key()})
    blob = vault.encrypt(SECRET, aad=AAD)
    with pytest.raises(CredentialsError, match="encrypted with a different key") as caught:
        other.decrypt(blob, aad=AAD)
    assert vault.key_id in str(caught.value)
    assert other.key_id in str(caught.value)


def test_missing_key() -> None:
    with pytest.raises(CredentialsError, match=r"DRIPD_ENCRYPTION_KEY is not set.*dripd keygen"):
        Vault.from_env({})


def test_from_env_reads_the_process_environment(
    monkeypatch: pytest.MonkeyPatch, key_text: str
) -> None:
    monkeypatch.setenv("DRIPD_ENCRYPTION_KEY", key_text)
    assert Vault.from_env().key_id == Vault.from_env({"DRIPD_ENCRYPTION_KEY": key_text}).key_id
    monkeypatch.delenv("DRIPD_ENCRYPTION_KEY")
    with pytest.raises(CredentialsError, match="not set"):
        Vault.from_env()


def test_invalid_base64_key() -> None:
    bad = "not*base64!" * 4
    with pytest.raises(CredentialsError, match="not valid base64") as caught:
        Vault.from_env({"DRIPD_ENCRYPTION_KEY": bad})
    assert bad not in str(caught.value)


def test_wrong_length_key_says_how_many_bytes() -> None:
    short = base64.b64encode(os.urandom(16)).decode()
    with pytest.raises(CredentialsError, match="decodes to 16 bytes") as caught:
        Vault.from_env({"DRIPD_ENCRYPTION_KEY": short})
    assert short not in str(caught.value)


def test_the_key_never_shows(vault: Vault, key_text: str) -> None:
    key = base64.urlsafe_b64decode(key_text)
    assert key_text not in repr(vault)
    assert vault.key_id in repr(vault)
    assert not hasattr(vault, "__dict__")
    with pytest.raises(TypeError):
        pickle.dumps(vault)
    assert key.hex() not in repr(vault)


def test_retired_keys_still_decrypt_and_new_blobs_use_the_current_key() -> None:
    from dripd.channels.credentials import RETIRED_ENV_VAR

    old, new, stranger = generate_key(), generate_key(), generate_key()
    old_blob = Vault.from_text(old).encrypt({"token": "t"}, aad=b"row")
    ring = Vault.from_env({ENV_VAR: new, RETIRED_ENV_VAR: f"{stranger}, {old}"})
    assert ring.decrypt(old_blob, aad=b"row") == {"token": "t"}
    assert not ring.is_current(old_blob)
    fresh = ring.encrypt({"token": "t"}, aad=b"row")
    assert ring.is_current(fresh)
    assert Vault.from_text(new).decrypt(fresh, aad=b"row") == {"token": "t"}
    with pytest.raises(CredentialsError, match=r"DRIPD_ENCRYPTION_KEYS_RETIRED \(key #1\)"):
        Vault.from_env({ENV_VAR: new, RETIRED_ENV_VAR: "not-a-key"})
    alone = Vault.from_text(new)
    with pytest.raises(CredentialsError, match="different key") as info:
        alone.decrypt(old_blob, aad=b"row")
    assert old not in str(info.value)
