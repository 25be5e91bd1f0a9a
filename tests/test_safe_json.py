"""Hostile JSON is refused with one exception type, never RecursionError or a 500."""

from __future__ import annotations

import pytest

from server.safe_json import MAX_DEPTH, JsonRejected, depth, loads


@pytest.mark.parametrize(
    "text",
    [
        "[" * 100_000 + "]" * 100_000,
        "1" * 5000,
        '{"n": ' + "9" * 41 + "}",
        "NaN",
        '{"t": Infinity}',
        "-Infinity",
        "1e400",
        '{"a": [1, 2',
        b"\xff\xfe\x00",
        "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1),
    ],
)
def test_hostile_json_is_rejected(text: str | bytes) -> None:
    with pytest.raises(JsonRejected):
        loads(text)


def test_ordinary_json_passes() -> None:
    assert loads('{"timestamp": 1764616000.25, "n": 3, "s": "[[["}') == {
        "timestamp": 1764616000.25,
        "n": 3,
        "s": "[[[",
    }
    nested = "[" * MAX_DEPTH + "]" * MAX_DEPTH
    assert depth(loads(nested)) == MAX_DEPTH


def test_lone_surrogates_are_refused_paired_ones_kept() -> None:
    with pytest.raises(JsonRejected):
        loads('{"a": "\\ud800"}')
    with pytest.raises(JsonRejected):
        loads('{"\\udfff": 1}')
    assert loads('{"a": "\\ud83d\\ude00 é"}') == {"a": "😀 é"}
