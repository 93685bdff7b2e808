"""The suite's own leak scanner (``tests.conftest.scan_for``): every test that proves nothing
identifiable reached a file rests on it, so it is held to the plain definition here."""

from __future__ import annotations

from pathlib import Path

from hypothesis import example, given, settings
from hypothesis import strategies as st

from tests.conftest import TREE_DEPTH, needles_in, scan_for

#: a digit, a letter and bytes that mean something to a regular expression: few enough that
#: needles often share a prefix or lie one inside another, and would break an unescaped pattern
ALPHABET = b"0a.|(\\\xff"
needle_lists = st.lists(
    st.binary(min_size=1, max_size=5).map(lambda b: bytes(ALPHABET[x % len(ALPHABET)] for x in b)),
    min_size=1,
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@example(needles=[b"c", b"c0"], data=b"xc0", planted=[])  # one needle inside another, found together
@given(needles=needle_lists, data=st.binary(max_size=200), planted=st.lists(st.integers(0, 11), max_size=4))
def test_the_needles_found_are_exactly_those_the_bytes_hold(
    needles: list[bytes], data: bytes, planted: list[int]
) -> None:
    for i in planted:  # most cases hold some needles, often overlapping or one inside another
        if i < len(needles):
            data = data[: len(data) // 2] + needles[i] + data[len(data) // 2 :]
    assert needles_in(needles)(data) == {n for n in needles if n in data}


def test_a_file_holding_a_needle_is_named_with_every_needle_it_holds(tmp_path: Path) -> None:
    (tmp_path / "clean.csv").write_bytes(b"9990000018,LS1 4AP\r\n")
    (tmp_path / "deep").mkdir()
    (tmp_path / "deep" / "leak.parquet").write_bytes(b"\x00PAR1 9991234567 M1 1AE 9991234")
    needles = [b"9991234567", b"999123", b"M1 1AE", b"ZZ9 9ZZ"]
    assert scan_for(tmp_path, needles) == {str(tmp_path / "deep" / "leak.parquet"): ["9991234567", "999123", "M1 1AE"]}
    assert scan_for(tmp_path, [b"ZZ9 9ZZ"]) == {} and scan_for(tmp_path, []) == {}


def test_long_and_binary_needles_are_found_and_named(tmp_path: Path) -> None:
    """A needle longer than the prefix tree takes (a key file's contents), or an empty one, is
    still searched, and a needle that is not text (key material) is named escaped rather than
    failing the scan."""
    long, binary = b"k" * 3 * TREE_DEPTH, b"\x9f\x00\xfe"  # past what Python's parser nests
    assert needles_in([long, b"k"])(b"kk") == {b"k"} and needles_in([b"", b"z"])(b"a") == {b""}
    assert needles_in([])(b"a") == set()
    (tmp_path / "leak").write_bytes(b"x" + long + b"y" + binary)
    assert scan_for(tmp_path, [long, binary]) == {str(tmp_path / "leak"): [long.decode(), "\\x9f\x00\\xfe"]}
