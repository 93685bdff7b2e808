"""The suite's own leak scanner (``tests.conftest.scan_for``): every test that proves nothing
identifiable reached a file rests on it, so it is held to the plain definition here."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import any_of, scan_for

#: bytes that mean something to a regular expression, a digit and a letter: needles made of them
#: share prefixes often and would break a pattern that did not escape them
ALPHABET = list(b"0123456789abc.*+?()[]{}|^$\\-\n\x00\xff")
needle_lists = st.lists(
    st.binary(min_size=1, max_size=6).map(lambda b: bytes(ALPHABET[x % len(ALPHABET)] for x in b)),
    min_size=1,
    max_size=25,
)


@settings(max_examples=300, deadline=None)
@given(needles=needle_lists, data=st.binary(max_size=200), planted=st.integers(min_value=-1, max_value=30))
def test_the_prefix_tree_matches_exactly_where_some_needle_occurs(
    needles: list[bytes], data: bytes, planted: int
) -> None:
    if 0 <= planted < len(needles):  # half the cases hold a needle somewhere
        data = data[: len(data) // 2] + needles[planted] + data[len(data) // 2 :]
    assert (any_of(needles).search(data) is not None) == any(n in data for n in needles)


def test_a_file_holding_a_needle_is_named_with_every_needle_it_holds(tmp_path: Path) -> None:
    (tmp_path / "clean.csv").write_bytes(b"9990000018,LS1 4AP\r\n")
    (tmp_path / "deep").mkdir()
    (tmp_path / "deep" / "leak.parquet").write_bytes(b"\x00PAR1 9991234567 M1 1AE 9991234")
    needles = [b"9991234567", b"999123", b"M1 1AE", b"ZZ9 9ZZ"]
    assert scan_for(tmp_path, needles) == {str(tmp_path / "deep" / "leak.parquet"): ["9991234567", "999123", "M1 1AE"]}
    assert scan_for(tmp_path, [b"ZZ9 9ZZ"]) == {}
