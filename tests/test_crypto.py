"""The key ring: AES-256-GCM sealing of session data, key rotation, bad keys, tampering."""

from __future__ import annotations

import base64
import dataclasses
from typing import Any

import orjson
import pytest
from hypothesis import given, settings

from asyncsession import Config
from asyncsession.crypto import (
    KEY_SIZE,
    SEALED_KEY,
    KeyRing,
    SealBroken,
    generate_key,
    is_sealed,
    key_id,
    parse_key,
)

from .test_model import json_data

KEY_A = bytes(range(32))
KEY_B = bytes(range(100, 132))


def ring(*keys: bytes) -> KeyRing:
    return KeyRing(keys)


def token(sealed: bytes) -> bytes:
    data = orjson.loads(sealed)
    assert list(data) == [SEALED_KEY]
    return bytes.fromhex(data[SEALED_KEY])


def test_seal_then_open_round_trip_hides_the_plaintext() -> None:
    keys = ring(KEY_A)
    plain = orjson.dumps({"cart": ["apple", "pear"], "n": 3})
    sealed = keys.seal(plain)
    assert b"apple" not in sealed and b"cart" not in sealed
    data = orjson.loads(sealed)
    assert is_sealed(data)
    assert keys.open(data) == {"cart": ["apple", "pear"], "n": 3}
    assert keys.open_bytes(data) == plain


def test_token_layout_names_the_sealing_key_and_uses_fresh_nonces() -> None:
    keys = ring(KEY_A, KEY_B)
    plain = b'{"a":1}'
    one, two = token(keys.seal(plain)), token(keys.seal(plain))
    assert one[:4] == two[:4] == key_id(KEY_A) == keys.sealing_key_id
    assert one[4:16] != two[4:16]  # a random 12-byte nonce each time
    assert len(one) == 4 + 12 + len(plain) + 16
    assert len(keys.seal(plain)) == 2 * len(plain) + 80  # what docs/security.md says
    assert keys.token_key_id(orjson.loads(keys.seal(plain))) == key_id(KEY_A)
    assert keys.token_key_id({"a": 1}) is None


def test_plaintext_passes_through() -> None:
    data: dict[str, Any] = {"a": 1, SEALED_KEY: "x"}  # two keys: not sealed data
    assert ring(KEY_A).open(data) is data
    assert ring(KEY_A).open({}) == {}


def test_rotation_old_key_opens_new_key_seals() -> None:
    old = ring(KEY_A)
    sealed_by_old = orjson.loads(old.seal(b'{"v":"old"}'))
    rotated = ring(KEY_B, KEY_A)
    assert rotated.open(sealed_by_old) == {"v": "old"}
    sealed_by_new = orjson.loads(rotated.seal(b'{"v":"new"}'))
    assert rotated.token_key_id(sealed_by_new) == key_id(KEY_B)
    assert ring(KEY_B).open(sealed_by_new) == {"v": "new"}
    with pytest.raises(SealBroken, match="not configured"):
        old.open(sealed_by_new)  # the old ring lacks the new key
    with pytest.raises(SealBroken, match=key_id(KEY_A).hex()):
        ring(KEY_B).open(sealed_by_old)  # the old key dropped too early


@pytest.mark.parametrize("where", ["key_id", "nonce", "ciphertext", "tag"])
def test_tampered_token_fails_authentication(where: str) -> None:
    keys = ring(KEY_A, KEY_B)
    raw = bytearray(token(keys.seal(b'{"admin":false}')))
    index = {"key_id": 0, "nonce": 5, "ciphertext": 17, "tag": len(raw) - 1}[where]
    raw[index] ^= 0x01
    tampered = {SEALED_KEY: bytes(raw).hex()}
    with pytest.raises(SealBroken) as info:
        keys.open(tampered)
    assert "admin" not in str(info.value)


@pytest.mark.parametrize(
    "value", ["", "!!!!", "AAAA", "ab" * 31, "0g" * 40, "abc", 7, None, ["ab" * 40]]
)
def test_malformed_tokens_fail(value: object) -> None:
    with pytest.raises(SealBroken):
        ring(KEY_A).open({SEALED_KEY: value})


def test_truncated_and_extended_tokens_fail() -> None:
    keys = ring(KEY_A)
    raw = token(keys.seal(b'{"a":"b"}'))
    for bad in (raw[:-1], raw + b"\x00"):
        with pytest.raises(SealBroken):
            keys.open({SEALED_KEY: bad.hex()})


def test_a_token_from_another_ring_with_a_forged_key_id_fails() -> None:
    stranger = bytes(32)
    raw = bytearray(token(ring(stranger).seal(b'{"a":1}')))
    raw[:4] = key_id(KEY_A)  # claims to be under KEY_A
    with pytest.raises(SealBroken, match="authentication"):
        ring(KEY_A).open({SEALED_KEY: bytes(raw).hex()})


@settings(max_examples=200, deadline=None)
@given(json_data)
def test_hypothesis_round_trip(data: dict[str, Any]) -> None:
    keys = KeyRing((KEY_A,))
    sealed = orjson.loads(keys.seal(orjson.dumps(data)))
    assert is_sealed(sealed)
    back = keys.open(sealed)
    assert back == data
    assert repr(back) == repr(data)  # same types too


# ------------------------------------------------------------------ keys and Config


def test_generate_key_is_44_chars_of_32_random_bytes() -> None:
    one, two = generate_key(), generate_key()
    assert one != two
    assert len(one) == 44
    assert len(base64.urlsafe_b64decode(one)) == KEY_SIZE
    assert parse_key(one, 0) == base64.urlsafe_b64decode(one)


def test_key_forms() -> None:
    text = base64.urlsafe_b64encode(KEY_A).decode()
    assert parse_key(KEY_A, 0) == KEY_A
    assert parse_key(bytearray(KEY_A), 0) == KEY_A
    assert parse_key(text, 0) == KEY_A
    assert parse_key(text.rstrip("="), 0) == KEY_A  # padding optional
    assert parse_key(f" {text}\n", 0) == KEY_A  # as read from a file
    assert parse_key(text.encode(), 0) == KEY_A  # ASCII bytes of the text
    assert parse_key(base64.b64encode(KEY_A).decode(), 0) == KEY_A  # standard alphabet


@pytest.mark.parametrize(
    ("key", "message"),
    [
        (b"\xff" * 16, r"\[1\] is 16 raw bytes"),
        (b"\xff" * 33, r"\[1\] is 33 raw bytes"),
        (base64.urlsafe_b64encode(b"k" * 16).decode(), r"\[1\] decodes to 16 bytes"),
        (base64.urlsafe_b64encode(b"k" * 64).decode(), r"\[1\] decodes to 64 bytes"),
        ("not base64 at all!", r"\[1\] is not base64"),
        ("", r"\[1\] decodes to 0 bytes"),
        (12345, r"\[1\] must be bytes or str, not int"),
        (None, r"\[1\] must be bytes or str, not NoneType"),
    ],
)
def test_bad_keys_name_their_position_never_their_value(key: object, message: str) -> None:
    good = generate_key()
    with pytest.raises(ValueError, match=message) as info:
        Config(encryption_keys=(good, key))  # type: ignore[arg-type]
    text = str(info.value)
    assert good not in text
    if isinstance(key, str) and key:
        assert key not in text
    if isinstance(key, bytes):
        assert repr(key) not in text and key.hex() not in text


@pytest.mark.parametrize("keys", [generate_key(), KEY_A, 5])
def test_encryption_keys_must_be_a_sequence(keys: object) -> None:
    with pytest.raises(ValueError, match="sequence of keys"):
        Config(encryption_keys=keys)  # type: ignore[arg-type]


def test_config_normalizes_hides_and_builds_the_ring_once() -> None:
    text = generate_key()
    config = Config(encryption_keys=[text, KEY_A])
    assert config.encryption_keys == (base64.urlsafe_b64decode(text), KEY_A)
    assert isinstance(config.keyring, KeyRing)
    assert config.keyring is config.keyring
    assert config.keyring.key_ids == (key_id(base64.urlsafe_b64decode(text)), key_id(KEY_A))
    for shown in (repr(config), str(config), repr(config.keyring)):
        assert text not in shown and KEY_A.hex() not in shown and repr(KEY_A) not in shown
        assert "encryption_keys" not in shown
    # equal keys, equal configs (the ring is not compared); replace() rebuilds it
    assert config == Config(encryption_keys=config.encryption_keys)
    moved = dataclasses.replace(config, site_id="b")
    assert moved.keyring is not None and moved.keyring.key_ids == config.keyring.key_ids
    assert dataclasses.replace(config, encryption_keys=()).keyring is None
    assert Config().keyring is None and Config().encryption_keys == ()


def test_keys_without_cryptography_installed_say_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "cryptography.hazmat.primitives.ciphers.aead", None)
    with pytest.raises(ValueError, match=r"pip install 'asyncsession\[crypto\]'"):
        Config(encryption_keys=[KEY_A])
    assert Config().keyring is None  # without keys, nothing is needed


def test_the_same_key_twice_is_harmless() -> None:
    keys = KeyRing((KEY_A, KEY_B, KEY_A))
    assert keys.key_ids == (key_id(KEY_A), key_id(KEY_B))
