"""Framing a QMP byte stream like QEMU's JSON streamer."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.tools.sim.json_stream import JsonStream, Parsed, ParseFailure


def values(items):
    return [i.value for i in items if isinstance(i, Parsed)]


def errors(items):
    return [i.desc for i in items if isinstance(i, ParseFailure)]


def test_objects_back_to_back_without_separators_are_split():
    s = JsonStream()
    out = s.feed(b'{"a": 1}{"b": [1, {"c": "}"}]}\n{"d": "\\"{"}')
    assert values(out) == [{"a": 1}, {"b": [1, {"c": "}"}]}, {"d": '"{'}]
    assert s.pending == 0


def test_an_unfinished_object_waits_for_more_bytes():
    s = JsonStream()
    assert s.feed(b'{"execute": "quer') == []
    assert s.feed(b'y-status"') == []
    assert values(s.feed(b"}")) == [{"execute": "query-status"}]


def test_an_escape_split_across_reads_is_kept():
    s = JsonStream()
    assert s.feed(b'{"k": "a\\') == []
    assert values(s.feed(b'"b"}')) == [{"k": 'a"b'}]


def test_a_syntax_error_costs_one_message():
    s = JsonStream()
    out = s.feed(b'{"a": }{"b": 2}')
    assert errors(out) == ["JSON parse error, expecting value"]
    assert values(out) == [{"b": 2}]


def test_bare_scalars_and_stray_closers():
    out = JsonStream().feed(b' 12 "x" true ] foo ')
    assert values(out) == [12, "x", True]
    assert errors(out) == ["JSON parse error, expecting value", "JSON parse error, invalid keyword 'foo'"]


def test_size_limit_discards_until_the_braces_balance():
    s = JsonStream(max_message=100)
    big = b'{"x": "' + b"y" * 1000 + b'", "z": {"w": 1}}'
    out = []
    for i in range(0, len(big), 7):  # in small reads, as a socket would deliver
        out += s.feed(big[i : i + 7])
    out += s.feed(b'{"ok": 1}')
    assert errors(out) == ["JSON token size limit exceeded"]
    assert values(out) == [{"ok": 1}]
    assert s.pending == 0


def test_nesting_limit():
    s = JsonStream(max_nesting=8)
    out = s.feed(b"[" * 9 + b"]" * 9 + b"[[1]]")
    assert errors(out) == ["JSON nesting depth limit exceeded"]
    assert values(out) == [[[1]]]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.dictionaries(st.text(), json_values, max_size=4), min_size=1, max_size=5), st.integers(1, 17))
def test_any_objects_in_any_chunking_come_out_whole(objs, chunk):
    data = b"".join(json.dumps(o, ensure_ascii=bool(i % 2)).encode() for i, o in enumerate(objs))
    s = JsonStream()
    out = []
    for i in range(0, len(data), chunk):
        out += s.feed(data[i : i + chunk])
    assert errors(out) == []
    assert values(out) == objs
