"""Session data encrypted at rest: AES-256-GCM under a ring of keys.

Only the session data is sealed; the metadata (user, site, timestamps, version)
stays readable because indexes, expiry and per-user limits need it. Sealed data
is itself a JSON object with one key, ``{"\\u0000enc": "<token>"}``, so every
backend stores and decodes it like any data dict; the token is the lowercase hex
of ``key id (4 bytes) | nonce (12 bytes) | ciphertext and tag``. (Hex, not base64:
CPython 3.11 decodes base64 at about 2.3 ns a character, more than the AES-GCM
itself costs, and hex at about 0.5; base64 would store 2/3 of the size but made an
encrypted read request about 1.5x as costly as a plain one, hex about 1.25x.) The key id is the
first 4 bytes of the SHA-256 of the key, so a record names the key that opens it
without revealing it.

The first key of the ring seals; every key opens. To rotate: put the new key
first, keep the old ones until ``Store.reencrypt()`` has resealed every record
under the new key, then drop them.

``cryptography`` is needed only when keys are configured (extra ``crypto``);
``generate_key`` needs nothing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from .codec import CorruptRecord

__all__ = [
    "KEY_SIZE",
    "SEALED_KEY",
    "KeyRing",
    "SealBroken",
    "generate_key",
    "is_sealed",
    "key_id",
]

KEY_SIZE = 32
"""Bytes of an AES-256 key."""
SEALED_KEY = "\x00enc"
"""The one key of a sealed data object (a NUL-prefixed name, never a natural one)."""
_NONCE = 12
_KEY_ID = 4
_TAG = 16
_DATA = _KEY_ID + _NONCE  # where the ciphertext starts in a token
_AAD = b"asyncsession data v1"
_PREFIX = b'{"\\u0000enc":"'  # what orjson writes for {SEALED_KEY: ...}
_SUFFIX = b'"}'
_b64encode = base64.urlsafe_b64encode
_loads = orjson.loads
_urandom = os.urandom


class SealBroken(CorruptRecord):
    """Sealed data that does not open: tampered, truncated, or under a key not in the
    ring. The message says which, never what the data or the key is. A
    ``codec.CorruptRecord``, so whatever skips undecodable records skips these too."""


class KeyNotConfigured(SealBroken):
    """Sealed under a key id this ring does not have: during a rolling key rotation,
    a record another instance wrote under the new key; or a key dropped too early."""

    @classmethod
    def no_keys(cls) -> KeyNotConfigured:
        """Sealed data met by a store that has no keys at all."""
        return cls("the data is encrypted and Config.encryption_keys is empty")


def generate_key() -> str:
    """A fresh random 32-byte key as urlsafe base64 text (44 characters), the form
    ``Config.encryption_keys`` and ``ASYNCSESSION_ENCRYPTION_KEYS`` take."""
    return _b64encode(_urandom(KEY_SIZE)).decode("ascii")


def key_id(key: bytes) -> bytes:
    """The 4 bytes that name ``key`` in a token: the start of its SHA-256."""
    return hashlib.sha256(key).digest()[:_KEY_ID]


def is_sealed(data: dict[str, Any]) -> bool:
    """Whether a decoded data dict is sealed data (rather than plaintext)."""
    return len(data) == 1 and SEALED_KEY in data


def parse_key(key: object, position: int) -> bytes:
    """``key`` as 32 raw bytes: raw bytes, or urlsafe (or standard) base64 text of 32
    bytes, as text or ASCII bytes. A ``ValueError`` names the position, never the key."""
    where = f"Config.encryption_keys[{position}]"
    if isinstance(key, bytes | bytearray | memoryview):
        raw = bytes(key)
        if len(raw) == KEY_SIZE:
            return raw
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            raise ValueError(
                f"{where} is {len(raw)} raw bytes; a key is {KEY_SIZE} random bytes"
                " or their urlsafe base64 text (`asyncsession keygen` prints one)"
            ) from None
    elif isinstance(key, str):
        text = key
    else:
        raise ValueError(
            f"{where} must be bytes or str, not {type(key).__name__}"
            " (`asyncsession keygen` prints a key)"
        )
    text = text.strip()
    try:
        decoded = base64.b64decode(
            text.replace("-", "+").replace("_", "/") + "=" * (-len(text) % 4), validate=True
        )
    except (binascii.Error, ValueError):
        raise ValueError(
            f"{where} is not base64 text; a key is {KEY_SIZE} random bytes or their"
            " urlsafe base64 text (`asyncsession keygen` prints one)"
        ) from None
    if len(decoded) != KEY_SIZE:
        raise ValueError(
            f"{where} decodes to {len(decoded)} bytes; a key is {KEY_SIZE} bytes"
            " (`asyncsession keygen` prints one)"
        )
    return decoded


def parse_keys(keys: object) -> tuple[bytes, ...]:
    """``Config.encryption_keys`` as a tuple of 32-byte keys (see ``parse_key``)."""
    if isinstance(keys, str | bytes | bytearray | memoryview):
        raise ValueError(
            "Config.encryption_keys must be a sequence of keys (the first one encrypts),"
            f" not a single {type(keys).__name__}: wrap it in a tuple"
        )
    if not isinstance(keys, Sequence):
        raise ValueError(
            "Config.encryption_keys must be a sequence of keys (the first one encrypts),"
            f" not {type(keys).__name__}"
        )
    return tuple(parse_key(key, i) for i, key in enumerate(keys))


class KeyRing:
    """AES-256-GCM with the first key sealing and every key opening.

    Built once per ``Config`` (``Config.keyring``). Never prints its keys."""

    __slots__ = ("_ciphers", "_key_id", "_seal", "key_ids")
    _ciphers: dict[bytes, Any]
    _key_id: bytes
    _seal: Callable[[bytes, bytes, bytes], bytes]

    def __init__(self, keys: Sequence[bytes]) -> None:
        try:
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        except ImportError:
            raise ValueError(
                "Config.encryption_keys needs the cryptography package:"
                " pip install 'asyncsession[crypto]'"
            ) from None
        if not keys:
            raise ValueError("a KeyRing needs at least one key")
        ciphers: dict[bytes, Any] = {}  # key id -> AESGCM
        for position, key in enumerate(keys):
            if type(key) is not bytes or len(key) != KEY_SIZE:
                raise ValueError(f"Config.encryption_keys[{position}] is not a {KEY_SIZE}-byte key")
            kid = key_id(key)
            if kid in ciphers:
                if keys.index(key) < position:
                    continue  # the same key twice: harmless
                raise ValueError(  # pragma: no cover - 2**-32 per pair of random keys
                    f"Config.encryption_keys[{position}] has the same key id as an earlier"
                    " key; generate another one"
                )
            ciphers[kid] = AESGCM(key)
        self._ciphers = ciphers
        self._key_id = key_id(keys[0])
        self._seal = ciphers[self._key_id].encrypt
        self.key_ids: tuple[bytes, ...] = tuple(ciphers)
        """The key ids in ring order: the first seals."""

    def __repr__(self) -> str:
        return f"KeyRing({len(self._ciphers)} keys, sealing with {self._key_id.hex()})"

    @property
    def sealing_key_id(self) -> bytes:
        """The id of the key that seals (the first)."""
        return self._key_id

    def seal(self, data: bytes) -> bytes:
        """Encrypt encoded session data (a JSON object) into the JSON of sealed data."""
        nonce = _urandom(_NONCE)
        token = (self._key_id + nonce + self._seal(nonce, data, _AAD)).hex().encode("ascii")
        return _PREFIX + token + _SUFFIX

    def token_key_id(self, data: dict[str, Any]) -> bytes | None:
        """The key id sealed data names; None for plaintext data or a malformed token."""
        if not is_sealed(data):
            return None
        raw = _token_bytes(data[SEALED_KEY])
        return None if raw is None else raw[:_KEY_ID]

    def open_bytes(self, data: dict[str, Any]) -> bytes:
        """The encoded plaintext JSON of sealed ``data``; ``SealBroken`` if it does not
        open. (Only call this for data ``is_sealed`` says is sealed.)"""
        raw = _token_bytes(data[SEALED_KEY])
        if raw is None or len(raw) < _KEY_ID + _NONCE + _TAG:
            raise SealBroken("sealed data is malformed")
        cipher = self._ciphers.get(raw[:_KEY_ID])
        if cipher is None:
            raise KeyNotConfigured(
                f"sealed under key id {raw[:_KEY_ID].hex()}, which is not configured"
            )
        try:
            plain: bytes = cipher.decrypt(raw[_KEY_ID:_DATA], raw[_DATA:], _AAD)
        except Exception:  # cryptography's InvalidTag
            raise SealBroken("sealed data failed authentication (altered or truncated)") from None
        return plain

    def open(self, data: dict[str, Any]) -> dict[str, Any]:
        """Plaintext session data: ``data`` itself if it is not sealed, else what it
        seals. ``SealBroken`` if sealed data does not open."""
        if len(data) != 1 or SEALED_KEY not in data:  # ``is_sealed``, inline: every read
            return data
        plain = _loads(self.open_bytes(data))
        if type(plain) is not dict:  # pragma: no cover - only we seal, and only dicts
            raise SealBroken("sealed data is not a JSON object")
        return plain


def _token_bytes(token: object) -> bytes | None:
    """The bytes of a token (hex text); None if it is not one."""
    if type(token) is not str:
        return None
    try:
        return bytes.fromhex(token)
    except ValueError:
        return None
