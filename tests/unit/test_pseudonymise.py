"""Keyed pseudonyms in DuckDB, haven tables without direct identifiers, agreement domains."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path

import duckdb
import pytest

from safehaven.core.home import Home
from safehaven.core.identifiers import MODULUS, WEIGHTS
from safehaven.core.keys import KeyRing, KeyRingError, agreement_key, destroy_agreement_key
from safehaven.core.store import Store
from safehaven.intake.contracts import ContractRegistry
from safehaven.protect.pseudonymise import (
    PSEUDONYM_HEX,
    haven_column,
    haven_select_sql,
    hmac_sql,
    install_agreement_domain,
    install_key,
    pseudonym,
    release_pseudonym,
    release_pseudonym_sql,
)
from tests.conftest import copy_haven

COLLECTIONS = ("gp_events", "hospital_episodes", "social_care")


def test_sql_hmac_matches_python_hmac() -> None:
    key = secrets.token_bytes(32)
    con = duckdb.connect()
    install_key(con, "k", key)
    values = ["9990001236", "943 476 5919", "", "x" * 200]
    got = [r[0] for r in con.execute(f"SELECT {hmac_sql('v', 'k')} FROM unnest(?) t(v)", [values]).fetchall()]
    assert got == [hmac.new(key, v.encode(), hashlib.sha256).hexdigest()[:32] for v in values]
    assert all(len(g) == PSEUDONYM_HEX == 32 for g in got), "at least 128 bits"


def test_key_material_never_appears_in_sql_text() -> None:
    key = secrets.token_bytes(32)
    con = duckdb.connect()
    install_key(con, "k", key)
    assert key.hex() not in hmac_sql("v", "k")
    with pytest.raises(ValueError):
        install_key(con, "k; DROP TABLE x", key)


@pytest.fixture
def haven_home(home: Home, populated_haven: Path) -> Home:
    """``home`` as ``populated(home)`` leaves it: a copy of the session's populated haven."""
    return copy_haven(populated_haven, home)


def test_plain_hashes_of_the_whole_test_range_match_no_pseudonym(haven_home: Home) -> None:
    """An unkeyed hash would be reversed by enumeration: the 999 range is about 0.9M numbers.

    Every valid number of the range (so every seeded one, and all around them) is hashed with
    plain SHA-256 (canonical and spaced) and MD5; no stored pseudonym equals the leading or
    trailing 128 bits of any of them.
    """
    with Store(haven_home).connect() as con:
        pids = " UNION ".join(f"SELECT pid FROM haven.{c}" for c in COLLECTIONS)
        con.execute(
            f"CREATE TEMP TABLE _pids AS SELECT DISTINCT pid FROM ({pids}) UNION SELECT pid FROM "
            "governance.objection_events"
        )
        seeded = con.execute("SELECT count(DISTINCT nhs_number) FROM landing.gp_events_valid").fetchone()[0]
        weights = " + ".join(f"{w} * CAST(substr(n, {i + 1}, 1) AS INTEGER)" for i, w in enumerate(WEIGHTS))
        con.execute(
            "CREATE TEMP TABLE _space AS SELECT n || CAST(c AS VARCHAR) AS nhs FROM "
            f"(SELECT n, ({MODULUS} - (({weights}) % {MODULUS})) % {MODULUS} AS c "
            "FROM (SELECT '999' || lpad(CAST(i AS VARCHAR), 6, '0') AS n "
            "FROM range(1000000) r(i))) WHERE c <> 10"
        )
        space = con.execute("SELECT count(*) FROM _space").fetchone()[0]
        covered = con.execute(
            "SELECT count(*) FROM (SELECT DISTINCT nhs_number FROM landing.gp_events_valid) s "
            "WHERE s.nhs_number IN (SELECT nhs FROM _space)"
        ).fetchone()[0]
        spaced = "substr(nhs, 1, 3) || ' ' || substr(nhs, 4, 3) || ' ' || substr(nhs, 7, 4)"
        con.execute(
            "CREATE TEMP TABLE _hashes AS "
            "SELECT left(sha256(nhs), 32) AS h FROM _space UNION ALL "
            "SELECT right(sha256(nhs), 32) FROM _space UNION ALL "
            f"SELECT left(sha256({spaced}), 32) FROM _space UNION ALL "
            "SELECT md5(nhs) FROM _space"
        )
        matches = con.execute("SELECT count(*) FROM _hashes JOIN _pids ON _hashes.h = _pids.pid").fetchone()[0]
        n_pids = con.execute("SELECT count(*) FROM _pids").fetchone()[0]
    assert space == 909_091 and covered == seeded > 100 and n_pids > 100
    assert matches == 0


def test_haven_tables_hold_no_direct_identifier(haven_home: Home) -> None:
    with Store(haven_home).connect() as con:
        for c in COLLECTIONS:
            cols = [r[0] for r in con.execute(f"DESCRIBE haven.{c}").fetchall()]
            assert not {"nhs_number", "date_of_birth", "postcode"} & set(cols), c
            assert "pid" in cols
            text_cols = [r[0] for r in con.execute(f"DESCRIBE haven.{c}").fetchall() if r[1] == "VARCHAR"]
            hits = con.execute(
                f"SELECT count(*) FROM haven.{c} h WHERE EXISTS (SELECT 1 FROM landing.{c}_valid v WHERE "
                + " OR ".join(f"h.{q} = v.nhs_number OR h.{q} = v.postcode" for q in text_cols)
                + ")"
            ).fetchone()[0]
            assert hits == 0, c


def test_haven_column_names_the_columns_haven_select_sql_makes() -> None:
    """``haven_column`` is the one rule releases, agreements and publication read the haven by."""
    con = duckdb.connect()
    install_key(con, "haven", secrets.token_bytes(32))
    for contract in ContractRegistry().content():
        fields = ", ".join(f'NULL::{f.type} AS "{f.name}"' for f in contract.fields)
        con.execute(f"CREATE OR REPLACE TABLE src AS SELECT {fields}, NULL::VARCHAR AS _batch, 0 AS _row")
        made = [d[0] for d in con.execute(f"SELECT * FROM ({haven_select_sql(contract, 'src')}) LIMIT 0").description]
        kept = [
            haven_column(f)
            for f in contract.fields
            if f.name != contract.patient_key and f.identifiability != "direct_identifier"
        ]
        assert made == ["pid", *kept, "_batch", "_row"], contract.collection
        assert {"birth_week", "postcode_district"} <= set(made), contract.collection


def test_one_pid_per_person_across_collections(haven_home: Home) -> None:
    key = KeyRing(haven_home.keys).get("haven")
    with Store(haven_home).connect() as con:
        nhs = con.execute("SELECT nhs_number FROM landing.hospital_episodes_valid LIMIT 1").fetchone()[0]
        pid = pseudonym(key.material, nhs)
        in_hospital = con.execute("SELECT count(*) FROM haven.hospital_episodes WHERE pid = ?", [pid]).fetchone()[0]
        expected = con.execute(
            "SELECT count(*) FROM landing.hospital_episodes_valid WHERE nhs_number = ?", [nhs]
        ).fetchone()[0]
    assert in_hospital == expected > 0


def test_the_same_patient_has_different_pseudonyms_under_two_agreements(home: Home) -> None:
    keyring = KeyRing(home.keys)
    haven = keyring.get_or_create("haven")
    pid = pseudonym(haven.material, "9990001236")
    con = duckdb.connect()
    a = con.execute(f"SELECT {release_pseudonym_sql(con, repr(pid), 'study-a', keyring)}").fetchone()[0]
    b = con.execute(f"SELECT {release_pseudonym_sql(con, repr(pid), 'study-b', keyring)}").fetchone()[0]
    a_again = con.execute(f"SELECT {release_pseudonym_sql(con, repr(pid), 'study-a', keyring)}").fetchone()[0]
    assert a != b and a == a_again and pid not in (a, b)
    assert a == release_pseudonym(agreement_key(keyring, "study-a"), pid)
    assert len(a) == len(b) == 32
    assert agreement_key(keyring, "study-a").material != agreement_key(keyring, "study-b").material


def test_installing_an_agreement_domain_gives_its_key_id(home: Home) -> None:
    keyring = KeyRing(home.keys)
    keyring.get_or_create("haven")
    con = duckdb.connect()
    name, key_id = install_agreement_domain(con, keyring, "study-a")
    assert key_id == agreement_key(keyring, "study-a").key_id
    pid = "0" * 32
    assert con.execute(f"SELECT {hmac_sql(repr(pid), name)}").fetchone()[0] == release_pseudonym(
        agreement_key(keyring, "study-a"), pid
    )


def test_destroying_an_agreement_salt_shreds_its_pseudonym_domain(home: Home) -> None:
    keyring = KeyRing(home.keys)
    keyring.get_or_create("haven")
    before = agreement_key(keyring, "study-a")
    destroyed = destroy_agreement_key(keyring, "study-a")
    assert destroyed is not None and not keyring.path("agreement-study-a").exists()
    with pytest.raises(KeyRingError, match="destroyed"):
        agreement_key(keyring, "study-a", create=False)
    with pytest.raises(KeyRingError, match="destroyed at disposal"):
        agreement_key(keyring, "study-a")  # never silently re-created: that would be a new domain
    assert before.key_id
    assert keyring.manifest()["agreement-study-a"]["history"][0].get("destroyed_at")


def test_agreement_ids_are_checked(home: Home) -> None:
    keyring = KeyRing(home.keys)
    keyring.get_or_create("haven")
    for bad in ("../x", "a b", "", "x" * 80):
        with pytest.raises(KeyRingError):
            agreement_key(keyring, bad)
