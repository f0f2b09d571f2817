"""Key names: one Redis server (``SingleLayout``) or a Redis Cluster (``ClusterLayout``).

Both keep the layout stores in production use (docs/backends.md): a session is the
hash ``{prefix}s:{id}`` (``id`` the storage id the base store hands the hooks: the
id's handle with ``Config.hash_ids``, else the id), a user's index the sorted set
``{prefix}u:{len(site)}:{site}:{user}``, the expiry set ``{prefix}expiry``. On a
cluster every key carries a hash tag so a session, its user's index and its expiry
set share one slot: the id's first 4 characters (the user tag; a handle keeps them),
and one expiry set per slot.
"""

from __future__ import annotations

import binascii

from redis.crc import key_slot

from ...session import generate_session_id, is_handle, is_valid_session_id, user_tag

SLOTS = 16384
TAG_LENGTH = 4
"""A session id's first characters, the hash tag that places it (``session.user_tag``)."""

_slot_tags: list[bytes] = []


def id_slot(session_id: str) -> int:
    """The hash slot of a session: CRC16 of the id's first ``TAG_LENGTH`` characters."""
    return binascii.crc_hqx(session_id[:TAG_LENGTH].encode(), 0) & (SLOTS - 1)


def slot_tag(slot: int) -> bytes:
    """The shortest decimal string whose CRC16 lands in ``slot`` (table built once)."""
    if not _slot_tags:
        table: list[bytes | None] = [None] * SLOTS
        left, n, crc = SLOTS, 0, binascii.crc_hqx
        while left:
            candidate = b"%d" % n
            s = crc(candidate, 0) & (SLOTS - 1)
            if table[s] is None:
                table[s] = candidate
                left -= 1
            n += 1
        _slot_tags.extend(t for t in table if t is not None)
    return _slot_tags[slot]


def _storage_id(value: str) -> bool:
    """A handle (``session_handle``) or a session id (the layout before hashing)."""
    return is_handle(value) or is_valid_session_id(value)


def escape_user(user_id: str) -> bytes:
    """The user id as key bytes: no brace (hash tags stay ours), still injective."""
    raw = user_id.encode("utf-8", "surrogatepass")
    if b"%" in raw or b"{" in raw or b"}" in raw:
        raw = raw.replace(b"%", b"%25").replace(b"{", b"%7B").replace(b"}", b"%7D")
    return raw


def _unescape_user(raw: bytes) -> str:
    if b"%" in raw:
        raw = raw.replace(b"%7B", b"{").replace(b"%7D", b"}").replace(b"%25", b"%")
    return raw.decode("utf-8", "surrogatepass")


class SingleLayout:
    """Keys on one server: ``{prefix}s:{id}``, ``{prefix}u:...``, ``{prefix}expiry``."""

    cluster = False

    def __init__(self, key_prefix: str) -> None:
        prefix = key_prefix.encode()
        self.sprefix = prefix + b"s:"
        """Session keys start with it (the scripts build keys from it: ``key_of``)."""
        self.iprefix = prefix + b"u:"
        self.xkey = prefix + b"expiry"
        self.rprefix = prefix + b"r:"

    def session_key(self, session_id: str) -> bytes:
        return self.sprefix + session_id.encode()

    def rotation_key(self, session_id: str) -> bytes:
        """The short-lived record that ``session_id`` was rotated (``rotation.py``)."""
        return self.rprefix + session_id.encode()

    def index_key(self, site_id: str, user_id: str) -> bytes:
        site = site_id.encode()
        return b"%s%d:%s:%s" % (self.iprefix, len(site), site, escape_user(user_id))

    def expiry_key_for(self, session_id: str) -> bytes:
        return self.xkey

    def user_expiry_key(self, user_id: str) -> bytes:
        """The expiry set the sessions of ``user_id`` are scheduled in."""
        return self.xkey

    def same_slot(self, key: bytes, other: bytes) -> bool:
        """Whether one script may touch both keys (always, on one server)."""
        return True

    def id_of(self, session_key: bytes) -> str | None:
        """The storage id a key under the session prefix names: a handle, or a plain
        id (stored before ids were hashed); None for anything else."""
        rest = session_key[len(self.sprefix) :].decode("utf-8", "replace")
        return rest if _storage_id(rest) else None

    def user_of(self, index_key: bytes) -> str | None:
        """The user id an ``index_key`` was made from (None for '' = anonymous)."""
        if not index_key.startswith(self.iprefix):
            return None
        length, _, rest = index_key[len(self.iprefix) :].partition(b":")
        return _unescape_user(rest[int(length) + 1 :])

    def rotated_id(self, session_id: str) -> str:
        return generate_session_id()


class ClusterLayout(SingleLayout):
    """Keys on a cluster: ``{prefix}s:{{tag}}rest``, ``{prefix}u:{{user tag}}:...``,
    ``{prefix}x:{{slot tag}}`` (one expiry set per slot)."""

    cluster = True

    def __init__(self, key_prefix: str) -> None:  # (Config refuses braces in key_prefix)
        prefix = key_prefix.encode()
        self.sprefix = prefix + b"s:{"
        self.iprefix = prefix + b"u:{"
        self.xprefix = prefix + b"x:{"
        self.rprefix = prefix + b"r:{"

    def session_key(self, session_id: str) -> bytes:
        raw = session_id.encode()
        return self.sprefix + raw[:TAG_LENGTH] + b"}" + raw[TAG_LENGTH:]

    def rotation_key(self, session_id: str) -> bytes:
        raw = session_id.encode()  # in the session's slot
        return self.rprefix + raw[:TAG_LENGTH] + b"}" + raw[TAG_LENGTH:]

    def index_key(self, site_id: str, user_id: str) -> bytes:
        site = site_id.encode()
        tag = user_tag(user_id).encode()
        return b"%s%s}:%d:%s:%s" % (self.iprefix, tag, len(site), site, escape_user(user_id))

    def expiry_key_for(self, session_id: str) -> bytes:
        return self.xprefix + slot_tag(id_slot(session_id)) + b"}"

    def same_slot(self, key: bytes, other: bytes) -> bool:
        return bool(key_slot(key) == key_slot(other))

    def user_expiry_key(self, user_id: str) -> bytes:
        return self.expiry_key_for(user_tag(user_id))

    def id_of(self, session_key: bytes) -> str | None:
        rest = session_key[len(self.sprefix) :].decode("utf-8", "replace")
        tag, brace, tail = rest.partition("}")
        if not brace or len(tag) != TAG_LENGTH:
            return None
        rest = tag + tail
        return rest if _storage_id(rest) else None

    def user_of(self, index_key: bytes) -> str | None:
        if not index_key.startswith(self.iprefix):
            return None
        length, _, rest = index_key[len(self.iprefix) + TAG_LENGTH + 2 :].partition(b":")
        return _unescape_user(rest[int(length) + 1 :])

    def rotated_id(self, session_id: str) -> str:
        """The new id keeps the hash tag (the slot of the session and of its user's
        index) and gets 43 fresh random characters."""
        return session_id[:TAG_LENGTH] + generate_session_id()
