"""Look-alike letters (the Kelvin sign for K, a dotless i, Cyrillic and full-width letters) in coded fields.

The single SQL pass and Great Expectations fold ASCII letters alone, the same way, so a
character outside the code system's alphabet fails the rule on both sides: a rejected row,
never a case-folded match on one side and a failure on the other (which used to make
``validate_collection`` raise, run after run).
"""

from __future__ import annotations

import itertools

import duckdb
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from safehaven.core.home import Home
from safehaven.core.store import Store
from safehaven.intake.contracts import CONTRACTS_DIR, ContractRegistry
from safehaven.intake.validation import validate_collection
from tests.unit.validation_helpers import land, nhs_numbers

REGISTRY = ContractRegistry(CONTRACTS_DIR)
HES = REGISTRY.contracts["hospital_episodes"]
ICD10 = REGISTRY.code_list("icd10").code_values

#: Letters that look like (or case-fold into) ASCII letters under Unicode rules.
LOOKALIKES: dict[str, list[str]] = {
    "K": ["\u212a", "\u041a", "\u039a"],  # Kelvin sign, Cyrillic Ka, Greek Kappa
    "I": ["\u0131", "\u0130", "\u0406", "\u0399"],  # dotless i, dotted I, Cyrillic I, Greek Iota
    "S": ["\u017f", "\u0405"],  # long s, Cyrillic Dze
    "A": ["\u0410", "\u0391"],
    "E": ["\u0415", "\u0395"],
    "C": ["\u0421", "\u03f9"],
    "O": ["\u041e", "\u039f"],
    "T": ["\u0422", "\u03a4"],
    "B": ["\u0412", "\u0392"],
    "H": ["\u041d", "\u0397"],
    "M": ["\u041c", "\u039c"],
    "N": ["\u039d"],
    "P": ["\u0420", "\u03a1"],
    "Z": ["\u0396"],
}


def full_width(c: str) -> str:
    """The full-width form of an ASCII letter or digit (U+FF21 'Ａ', U+FF10 '０')."""
    return chr(ord(c) - ord("A") + 0xFF21) if c.isalpha() else chr(ord(c) - ord("0") + 0xFF10)


@st.composite
def diagnosis_codes(draw: st.DrawFn) -> str:
    """A listed ICD-10 code, perhaps with a fourth character, each character kept, lower-cased or disguised."""
    chars = list(draw(st.sampled_from(ICD10)) + draw(st.sampled_from(["", "9", "X"])))
    for i, c in enumerate(chars):
        disguises = [c, c.lower(), full_width(c), *LOOKALIKES.get(c, [])]
        chars[i] = draw(st.sampled_from(disguises))
    return "".join(chars)


ALPHABET = "AKISZkisz0129" + "".join(c for v in LOOKALIKES.values() for c in v) + "\uff2b\uff41\uff12"
CODES = st.one_of(diagnosis_codes(), st.text(alphabet=ALPHABET, min_size=1, max_size=5))


def hes_rows(codes: list[str], start: int) -> list[dict[str, str]]:
    """Valid hospital episodes (999-range NHS numbers) with the given primary diagnoses."""
    return [
        {
            "provider_code": "RRK",
            "nhs_number": nhs,
            "date_of_birth": "1950-02-03",
            "sex": "2",
            "postcode": "B29 3RH",
            "admission_date": "2026-01-10",
            "discharge_date": "2026-01-12",
            "primary_diagnosis": code,
        }
        for nhs, code in zip(nhs_numbers(len(codes), start), codes, strict=True)
    ]


def meets_the_code_list(code: str) -> bool:
    """The rule, stated independently: ASCII only, and the first three characters (either case) are listed."""
    return code.isascii() and code[:3].upper() in ICD10


def _validate(con: duckdb.DuckDBPyConnection, home: Home, collection: str = "hospital_episodes"):
    return validate_collection(con, REGISTRY.contracts[collection], REGISTRY, home.quarantine_for(collection))


def test_look_alike_codes_never_make_validation_raise_and_gx_and_the_pass_agree(home: Home, store: Store) -> None:
    batches = itertools.count()

    @settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(codes=st.lists(CODES, min_size=1, max_size=25))
    @example(codes=["\u212a21"])  # Kelvin sign: RE2's (?i) folds it to K, DuckDB's upper() does not
    @example(codes=["\u013121"])  # dotless i: DuckDB's upper() folds it to I, RE2's (?i) does not
    @example(codes=["\u017f06", "\uff2b21", "\u041a21", "\u039a21", "k21", "I219"])
    def check(codes: list[str]) -> None:
        n = next(batches)
        with store.connect() as con:
            land(con, home, REGISTRY, "hospital_episodes", hes_rows(codes, start=1000 * n), f"apc_{n}.csv")
            report = _validate(con, home)  # raised ValidationInconsistent on the old code
        assert report.rules_disagreeing == []
        [batch] = report.batches
        for rule in batch.rules:
            if rule.kind != "unique":
                assert rule.gx_unexpected == rule.sql_failures, rule.rule_id
        expected = sum(not meets_the_code_list(c) for c in codes)
        assert batch.failures_by_rule.get("primary_diagnosis.code_list", 0) == expected

    check()


def test_a_look_alike_code_or_postcode_is_a_rejected_row_under_its_rule(con_hes) -> None:
    con, home = con_hes
    rows = hes_rows(["K21"] * 200, start=0)
    disguised = {
        3: ("primary_diagnosis", "\u212a21"),  # Kelvin sign + 21, looks like K21
        7: ("primary_diagnosis", "\u013121"),  # dotless i + 21, looks like I21
        11: ("primary_diagnosis", "\u041a219"),  # Cyrillic Ka
        15: ("postcode", "B29 3R\u041d"),  # Cyrillic En for H
        19: ("postcode", "\u017fW1A 1AA"),  # long s: DuckDB's upper() made it SW1A 1AA
    }
    for i, (field, value) in disguised.items():
        rows[i][field] = value
    batch = land(con, home, REGISTRY, "hospital_episodes", rows, "apc.csv")
    report = _validate(con, home)
    assert report.batches_accepted == [batch]  # 5 of 200 rows: within the tolerance
    rejected = con.execute("SELECT _row, failed_rules FROM landing.hospital_episodes_rejected ORDER BY _row").fetchall()
    rule = {"primary_diagnosis": "primary_diagnosis.code_list", "postcode": "postcode.format"}
    assert rejected == [(i + 1, [rule[field]]) for i, (field, _) in disguised.items()]
    assert con.execute("SELECT count(*) FROM landing.hospital_episodes_valid").fetchone() == (195,)


@pytest.fixture
def con_hes(store: Store, home: Home):
    with store.connect() as connection:
        yield connection, home
