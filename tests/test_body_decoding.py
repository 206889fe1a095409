"""Webhook bodies are read as the standard library's json module reads them.

The listener parses bodies with a faster parser and hands what that parser
refuses to `json.loads`. Whatever the text, the outcome must be the one
`json.loads` alone would give: the same value, or a 400.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sidecar.events import EventError
from sidecar.webhook import decode_body

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats()
    # Surrogates included: a lone one is legal as a JSON escape.
    | st.text(st.characters() | st.characters(categories=["Cs"]), max_size=12),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=20,
)


@st.composite
def json_texts(draw: st.DrawFn) -> str:
    """Valid JSON as various writers spell it, sometimes damaged."""
    value = draw(json_values)
    text = json.dumps(
        value,
        ensure_ascii=draw(st.booleans()),
        indent=draw(st.none() | st.integers(0, 2)),
    )
    if draw(st.booleans()):
        position = draw(st.integers(0, len(text)))
        damage = draw(st.sampled_from(["", ",", "]", "}", '"', "\\", "0", " x"]))
        cut = draw(st.integers(0, 2))
        text = text[:position] + damage + text[position + cut :]
    return text


def _as_json_loads_reads(text: str) -> tuple[str, Any]:
    try:
        return "value", json.dumps(json.loads(text))
    except (ValueError, RecursionError):
        return "refused", None


def _as_listener_reads(body: bytes) -> tuple[str, Any]:
    try:
        return "value", json.dumps(decode_body(body))
    except EventError as exc:
        assert exc.status == 400
        return "refused", None


@settings(max_examples=400, deadline=None)
@given(text=json_texts())
@example(text='{"note": "\\ud83d", "a": 1}')
@example(text='"\\ud83d\\ude00"')
@example(text="[NaN, Infinity, -Infinity, 1e400, -0.0, 1E5]")
@example(text='{"a": 1, "a": 2}')
@example(text="[" * 300 + "]" * 300)
@example(text="1" * 5000)
@example(text="{} x")
def test_body_decodes_exactly_as_json_loads_reads_it(text: str) -> None:
    try:
        body = text.encode("utf-8")
    except UnicodeEncodeError:
        # Raw surrogates cannot be sent as UTF-8: refused before any parsing.
        body = text.encode("utf-8", "surrogatepass")
        assert _as_listener_reads(body) == ("refused", None)
        return

    # Compared as json.dumps text, which tells 1 from 1.0 and -0.0 from 0.0.
    assert _as_listener_reads(body) == _as_json_loads_reads(text)


@pytest.mark.parametrize(
    "body",
    [b"", b"\xef\xbb\xbf", b"\xef\xbb\xbf\xef\xbb\xbf{}", b"{}\x00", b"\xff{}"],
)
def test_body_json_loads_would_refuse_is_400(body: bytes) -> None:
    with pytest.raises(EventError) as refused:
        decode_body(body)

    assert refused.value.status == 400
