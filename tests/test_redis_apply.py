"""The Redis apply script's JSON splitter, fuzzed against orjson on a real server.

The script edits the stored record without decoding values: these tests check that
what it leaves is byte for byte what orjson would write for the same data, for
strings with quotes, backslashes, brackets and unicode, nested and empty
containers, and integers past 2**53.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncsession import ABSENT, Changes, SessionConflict, codec, new_session, with_controls

from . import backend_redis
from .clock import FakeClock
from .test_conformance import cfg

pytestmark = pytest.mark.skipif(
    backend_redis.skip_reason() is not None, reason=str(backend_redis.skip_reason())
)

text = st.text(
    alphabet=st.one_of(
        st.sampled_from('"\\{}[],:\x00\x1f/\u2028'),
        st.characters(blacklist_categories=("Cs",)),
    ),
    max_size=12,
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.sampled_from([2**53 + 1, -(2**53) - 1, 0, -1]),
    st.floats(allow_nan=False, allow_infinity=False),
    text,
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(text, inner, max_size=4)),
    max_leaves=12,
)
top_keys = text.filter(lambda key: key != "\x00enc")  # reserved: it marks encrypted data
datas = st.dictionaries(top_keys, values, max_size=6)


async def _check(
    data: dict[str, Any],
    new: dict[str, Any],
    drop: list[str],
    pick: int,
    agent: str = '"d":{"x":"}"}',
    with_base: bool = False,
) -> None:
    clock = FakeClock()
    config = cfg()
    raw = await backend_redis.open_raw(config, clock, f"apply-{uuid.uuid4().hex}")
    store = with_controls(raw, replace(config, key_prefix=raw.config.key_prefix))
    try:
        s = await store.create(new_session("alice", data=data, user_agent=agent))
        base = await store.get(s.id)
        loaded = base.data
        keys = list(loaded)
        expect: dict[str, Any] = {k: loaded[k] for k in keys[: pick % (len(keys) + 1)]}
        for k in new:
            expect.setdefault(k, loaded.get(k, ABSENT))
        deletes = [k for k in drop if k not in new]
        changes = Changes(set=new, delete=deletes, expect=expect)
        # with base: the client-built record (fast path); without: the Lua merge
        await store.apply(s.id, changes, base=base if with_base else None)
        model = dict(data)
        model.update(new)
        for k in deletes:
            model.pop(k, None)
        got = await store.get(s.id)
        assert orjson.dumps(got.data) == orjson.dumps(model)
        assert got.version == 1 and got.user_agent == agent
        # the record the script wrote is exactly what codec.encode writes
        # (under its handle, the record's own id field the handle)
        key = raw.session_key(raw.handle(s.id))  # type: ignore[attr-defined]
        stored = await raw.client.hget(key, "r")  # type: ignore[attr-defined]
        assert stored == codec.encode(replace(got, id=raw.handle(s.id)))
        if keys:  # an expectation that differs in any way: nothing is written
            k = keys[pick % len(keys)]
            with pytest.raises(SessionConflict):
                await store.apply(s.id, Changes(set={"z": 1}, expect={k: [loaded[k]]}))
            assert (await store.get(s.id)).version == 1
    finally:
        await store.close()


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    data=datas,
    new=st.dictionaries(top_keys, values, max_size=3),
    drop=st.lists(text, max_size=3),
    pick=st.integers(min_value=0, max_value=10),
    with_base=st.booleans(),
    agent=st.one_of(text, st.sampled_from([',"d":{}', 'x,",', ',"n":1,"m":2', "\\", '\\",'])),
)
def test_apply_splitter_matches_orjson(
    data: dict[str, Any],
    new: dict[str, Any],
    drop: list[str],
    pick: int,
    agent: str,
    with_base: bool,
) -> None:
    asyncio.run(_check(data, new, drop, pick, agent, with_base))


def test_apply_keeps_existing_keys_of_every_shape() -> None:
    data = {
        "": "",
        '"': "\\",
        "\\": '"',
        "{": "}",
        "a": {"": {}, "b": [[], {}, [[]]]},
        "big": 2**64 - 1,
        "neg": -(2**63),
        "f": -0.0,
        "u": "\u00e9\u2603\U0001f600",
        "d": {"d": {"d": '"d":{}'}},
    }
    asyncio.run(_check(data, {"a": {}}, ["d"], 3))
