"""Tests for ``safehaven.core.audit``: the hash-chained, anchored audit trail (CoP 12, 23d).

Each kind of tampering (edit, delete, reorder, truncate, altered anchor) must be caught at
the exact first bad ``seq``; the ``audit`` key must be needed to forge a chain; identifier
values must never get in. Every test uses its own encrypted store (``docs/design.md`` "One
writer, short-lived connections").
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from safehaven.core import audit
from safehaven.core.audit import GENESIS, TABLE, VerifyResult
from safehaven.core.home import Home
from safehaven.core.keys import Key, KeyRing
from safehaven.core.store import Store

N = 6


def _entry(i: int) -> dict[str, Any]:
    return {
        "actor": f"analyst-{i % 3}",
        "role": "analyst" if i % 2 else "data-manager",
        "action": ["ingest", "pseudonymise", "release", "query"][i % 4],
        "object": f"haven.gp_events/batch-{i}",
        "purpose": None if i % 3 == 0 else "direct care audit",
        "legal_basis": None if i % 3 == 0 else "s251 CAG 1-23(b)/2024",
        "agreement": None if i % 2 else f"DSA-{i:03d}",
        "outcome": "ok" if i % 5 else "refused",
        "detail": None if i % 4 == 0 else {"rows": 1000 * i, "key_id": "ab12cd34ef56ab78"},
    }


def _fill(con: duckdb.DuckDBPyConnection, n: int = N) -> list[int]:
    return [audit.append(con, **_entry(i)) for i in range(1, n + 1)]


@pytest.fixture
def home(tmp_path: Path) -> Home:
    return Home(tmp_path)


@pytest.fixture
def con(home: Home) -> Iterator[duckdb.DuckDBPyConnection]:
    with Store(home).connect() as connection:
        yield connection


def _head(home: Home) -> dict[str, Any]:
    return json.loads((home.registers / "audit_head.json").read_text())


def _set_head(home: Home, head: dict[str, Any]) -> None:
    (home.registers / "audit_head.json").write_text(json.dumps(head))


def _bad(result: VerifyResult, seq: int | None, words: str) -> None:
    assert not result.ok, result
    assert result.first_bad_seq == seq, result
    assert words in result.reason, result


# --- the happy path ---------------------------------------------------------------------


def test_append_and_verify_ok(con: duckdb.DuckDBPyConnection, home: Home) -> None:
    assert audit.verify(con, home).ok  # empty log, no anchor, no key yet
    assert _fill(con) == list(range(1, N + 1))
    result = audit.verify(con, home)
    assert result == VerifyResult(True, None, result.reason)
    assert f"{N} entries" in result.reason

    rows = con.execute(f"SELECT seq, prev_hash, entry_hash FROM {TABLE} ORDER BY seq").fetchall()
    assert rows[0][1] == GENESIS
    assert all(rows[i][1] == rows[i - 1][2] for i in range(1, N))
    head = _head(home)
    assert (head["seq"], head["entry_hash"]) == (N, rows[-1][2])
    key = KeyRing(home.keys).get("audit")
    assert head["key_id"] == key.key_id
    assert key.hex not in (home.registers / "audit_head.json").read_text()


def test_append_many_one_insert_per_batch(con: duckdb.DuckDBPyConnection, home: Home) -> None:
    _fill(con, 2)
    releases = [
        {
            "actor": "release-job",
            "role": "system",
            "action": "release",
            "object": f"release/DSA-00{i}",
            "agreement": f"DSA-00{i}",
            "detail": {"rows": i},
        }
        for i in range(3)
    ]
    assert audit.append_many(con, releases) == [3, 4, 5]
    assert audit.append_many(con, []) == []
    assert _head(home)["seq"] == 5
    stamps = con.execute(f'SELECT DISTINCT "at" FROM {TABLE} WHERE seq >= 3').fetchall()
    assert len(stamps) == 1
    assert audit.verify(con, home).ok


def test_verify_on_read_only_connection(home: Home) -> None:
    with Store(home).connect() as con:
        _fill(con)
    with Store(home).connect(read_only=True) as con:
        assert audit.verify(con, home).ok
        assert audit.verify(con).ok  # home found from the attached store


def test_entries_for(con: duckdb.DuckDBPyConnection) -> None:
    _fill(con)
    assert [e.seq for e in audit.entries_for(con)] == list(range(1, N + 1))
    assert [e.seq for e in audit.entries_for(con, object_like="%batch-3")] == [3]
    assert [e.seq for e in audit.entries_for(con, agreement="DSA-004")] == [4]
    assert audit.entries_for(con, since=datetime.now(UTC) + timedelta(hours=1)) == []
    assert len(audit.entries_for(con, since=datetime.now(UTC) - timedelta(hours=1))) == N
    entry = audit.entries_for(con, object_like="%batch-2")[0]
    assert entry.detail_value == _entry(2)["detail"]
    assert entry.at.tzinfo is not None
    with pytest.raises(ValueError, match="time-zone aware"):
        audit.entries_for(con, since=datetime(2025, 1, 1))


# --- tampering with the log -------------------------------------------------------------


def test_edited_entry_is_caught(con: duckdb.DuckDBPyConnection, home: Home) -> None:
    _fill(con)
    con.execute(f"UPDATE {TABLE} SET purpose = 'marketing' WHERE seq = 4")
    _bad(audit.verify(con, home), 4, "entry 4 has been altered")


def test_detail_whitespace_edit_is_caught(con: duckdb.DuckDBPyConnection, home: Home) -> None:
    _fill(con)
    con.execute(
        f"UPDATE {TABLE} SET detail = CAST(? AS JSON) WHERE seq = 2",
        [json.dumps(_entry(2)["detail"], indent=1)],
    )
    _bad(audit.verify(con, home), 2, "altered")


def test_deleted_middle_entry_is_caught(con: duckdb.DuckDBPyConnection, home: Home) -> None:
    _fill(con)
    con.execute(f"DELETE FROM {TABLE} WHERE seq = 3")
    _bad(audit.verify(con, home), 3, "entry 3 is missing")


def test_reordered_entries_are_caught(con: duckdb.DuckDBPyConnection, home: Home) -> None:
    _fill(con)
    con.execute(f"UPDATE {TABLE} SET seq = CASE seq WHEN 2 THEN 5 ELSE 2 END WHERE seq IN (2, 5)")
    _bad(audit.verify(con, home), 2, "does not follow entry 1")


def test_truncation_is_caught(con: duckdb.DuckDBPyConnection, home: Home) -> None:
    _fill(con)
    con.execute(f"DELETE FROM {TABLE} WHERE seq > 3")
    _bad(audit.verify(con, home), 4, "truncation")


def test_dropped_log_is_caught(con: duckdb.DuckDBPyConnection, home: Home) -> None:
    _fill(con)
    con.execute(f"DROP TABLE {TABLE}")
    _bad(audit.verify(con, home), 1, "truncation")


# --- tampering with the anchor ----------------------------------------------------------


def test_edited_anchor_hash_is_caught(con: duckdb.DuckDBPyConnection, home: Home) -> None:
    _fill(con)
    head = _head(home)
    _set_head(home, {**head, "entry_hash": "f" * 64})
    _bad(audit.verify(con, home), N, "MAC does not verify")


def test_edited_anchor_seq_is_caught(con: duckdb.DuckDBPyConnection, home: Home) -> None:
    _fill(con)
    head = _head(home)
    _set_head(home, {**head, "seq": N + 2})
    _bad(audit.verify(con, home), N + 1, "MAC does not verify")
    _set_head(home, {**head, "seq": N - 1})
    _bad(audit.verify(con, home), N - 1, "does not match the hash")


def test_edited_anchor_metadata_is_caught(con: duckdb.DuckDBPyConnection, home: Home) -> None:
    """The log and the anchored head agree, but the anchor file itself was edited."""
    _fill(con)
    _set_head(home, {**_head(home), "key_id": "0" * 16})
    _bad(audit.verify(con, home), None, "MAC does not verify")


def test_anchor_moved_to_hide_truncation_is_caught(con: duckdb.DuckDBPyConnection, home: Home) -> None:
    """Truncate, then point the anchor at the new last entry: the anchor's MAC gives it away."""
    _fill(con)
    con.execute(f"DELETE FROM {TABLE} WHERE seq > 3")
    (h3,) = con.execute(f"SELECT entry_hash FROM {TABLE} WHERE seq = 3").fetchone()
    _set_head(home, {**_head(home), "seq": 3, "entry_hash": h3})
    _bad(audit.verify(con, home), None, "MAC does not verify")


def test_missing_or_garbled_anchor_is_caught(con: duckdb.DuckDBPyConnection, home: Home) -> None:
    _fill(con)
    path = home.registers / "audit_head.json"
    path.write_text("{not json")
    _bad(audit.verify(con, home), None, "unreadable")
    path.unlink()
    _bad(audit.verify(con, home), None, "anchor")


def test_stale_anchor_then_reanchor(con: duckdb.DuckDBPyConnection, home: Home) -> None:
    """An authentic but old head (an append interrupted before anchoring, or a rollback)."""
    _fill(con, 3)
    path = home.registers / "audit_head.json"
    shutil.copy(path, home.root / "old_head.json")
    _fill(con, 2)
    shutil.copy(home.root / "old_head.json", path)
    _bad(audit.verify(con, home), 4, "written after the last anchored head")
    assert audit.anchor(con, home) == 5
    assert audit.verify(con, home).ok


def test_anchor_refuses_a_broken_chain(con: duckdb.DuckDBPyConnection, home: Home) -> None:
    _fill(con)
    con.execute(f"DELETE FROM {TABLE} WHERE seq = 2")
    with pytest.raises(ValueError, match="fails verification"):
        audit.anchor(con, home)


# --- the key ----------------------------------------------------------------------------


def _forge(con: duckdb.DuckDBPyConnection, home: Home, key: Key, start: int) -> None:
    """Recompute the chain from ``start`` on, and the anchor, with ``key``."""
    prev = GENESIS
    if start > 1:
        prev = con.execute(f"SELECT entry_hash FROM {TABLE} WHERE seq = ?", [start - 1]).fetchone()[0]
    for entry in audit.entries_for(con)[start - 1 :]:
        fields = {**vars(entry), "prev_hash": prev}
        prev = audit.entry_hash(key, fields)
        con.execute(
            f"UPDATE {TABLE} SET prev_hash = ?, entry_hash = ? WHERE seq = ?",
            [fields["prev_hash"], prev, entry.seq],
        )
    head = {"seq": N, "entry_hash": prev, "key_id": key.key_id, "anchored_at": "x"}
    _set_head(home, {**head, "mac": audit._head_mac(key, head)})


@pytest.mark.parametrize("start", [1, 3])
def test_chain_forged_with_another_key_fails(con: duckdb.DuckDBPyConnection, home: Home, start: int) -> None:
    """Someone with the store but not keys/audit.key edits entry 3 and recomputes the chain."""
    _fill(con)
    forger = Key("audit", b"\x01" * 32)
    con.execute(f"UPDATE {TABLE} SET actor = 'someone-else' WHERE seq = 3")
    _forge(con, home, forger, start)
    if start == 1:  # a complete forgery of log and head under the forger's key is still given
        other = KeyRing(home.root / "other-keys")  # away by the anchor history, which it cannot MAC ...
        other.write("audit", forger.material)
        _bad(audit.verify(con, home, keyring=other), None, "line 1 of the anchor history")
    # ... and fails at the first recomputed entry under the haven's key
    _bad(audit.verify(con, home), start, f"entry {start} has been altered")


def test_wrong_or_missing_key_fails(con: duckdb.DuckDBPyConnection, home: Home) -> None:
    _fill(con)
    other = KeyRing(home.root / "other-keys")
    other.get_or_create("audit")
    swapped = audit.verify(con, home, keyring=other)  # reported as the wrong key, not as altered entries
    _bad(swapped, None, "is not the key the audit trail was written with")
    assert swapped.kind == "key"
    with pytest.raises(audit.AuditTrailBroken, match="missing"):
        audit.append(con, **_entry(9), keyring=KeyRing(home.root / "empty-keys"))
    _bad(
        audit.verify(con, home, keyring=KeyRing(home.root / "empty-keys")),
        None,
        "missing",
    )


# --- no identifiers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        {"detail": {"nhs_number": "9434765919"}},
        {"detail": {"nhs_number": "943 476 5919"}},
        {"detail": {"patients": ["943-476-5919"]}},
        {"detail": {"n": 9434765919}},
        {"detail": {"9434765919": 1}},
        {"detail": {"deep": [{"note": "patient 999.123.4567 objected"}]}},
        {"object": "patient/9991234567"},
        {"purpose": "follow up 999 123 4567"},
    ],
)
def test_identifier_looking_values_are_refused(
    con: duckdb.DuckDBPyConnection, home: Home, change: dict[str, Any]
) -> None:
    with pytest.raises(ValueError, match="looks like an NHS number"):
        audit.append(con, **{**_entry(1), **change})
    assert audit.entries_for(con) == []
    assert audit.verify(con, home).ok


@pytest.mark.parametrize(
    "detail",
    [
        {"rows": 123456789, "date": "2025-01-02", "agreement": "DSA-2024-0012345"},
        {"sha256": "ab1234567890cdef" * 4, "key_id": "0123456789abcdef"},
        {"counts": [1, 2, 3], "share": 0.25, "dry_run": False, "note": None},
    ],
)
def test_ordinary_detail_is_accepted(con: duckdb.DuckDBPyConnection, detail: Any) -> None:
    audit.append(con, **{**_entry(1), "detail": detail})
    assert audit.entries_for(con)[0].detail_value == detail


def test_a_pseudonym_in_an_object_is_not_mistaken_for_an_nhs_number(con: duckdb.DuckDBPyConnection) -> None:
    audit.append(con, **{**_entry(1), "object": "person:0a9434765919bb01c2d3e4f5a6b7c8d9"})
    assert audit.entries_for(con)[0].object == "person:0a9434765919bb01c2d3e4f5a6b7c8d9"
    with pytest.raises(ValueError, match="looks like an NHS number"):
        audit.append(con, **{**_entry(2), "object": "person:9434765919"})


@pytest.mark.parametrize(
    "change",
    [
        {"detail": {"when": datetime.now(UTC)}},
        {"detail": {"x": float("nan")}},
        {"actor": ""},
        {"purpose": 3},
        {"patient": "p-1"},
    ],
)
def test_malformed_entries_are_refused(con: duckdb.DuckDBPyConnection, change: dict) -> None:
    with pytest.raises((ValueError, TypeError)):
        audit.append_many(con, [{**_entry(1), **change}])
    assert audit.entries_for(con) == []


# --- properties -------------------------------------------------------------------------


Log = tuple[duckdb.DuckDBPyConnection, Home]


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Log]:
    """A log of N entries, shared by the examples; each edit is rolled back."""
    home = Home(tmp_path_factory.mktemp("audit-edits"))
    with Store(home).connect() as connection:
        _fill(connection)
        yield connection, home


@pytest.fixture(scope="module")
def growing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Log]:
    """A log that the round-trip examples append to."""
    home = Home(tmp_path_factory.mktemp("audit-round-trip"))
    with Store(home).connect() as connection:
        yield connection, home


_TEXT = st.text(min_size=1, max_size=20).filter(lambda s: "\x00" not in s)
_HEX = st.text(alphabet="0123456789abcdef", min_size=1, max_size=64)
_EDITS: dict[str, st.SearchStrategy[Any]] = {
    "actor": _TEXT,
    "role": _TEXT,
    "action": _TEXT,
    "object": _TEXT,
    "purpose": st.none() | _TEXT,
    "legal_basis": st.none() | _TEXT,
    "agreement": st.none() | _TEXT,
    "outcome": _TEXT,
    "detail": st.none() | st.dictionaries(_TEXT, st.integers() | _TEXT, max_size=3).map(json.dumps),
    "prev_hash": _HEX,
    "entry_hash": _HEX,
    "seq": st.integers(N + 1, 10**6),
    "at": st.integers(-(10**12), 10**12).filter(bool),
}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seq=st.integers(1, N),
    column_and_value=st.sampled_from(sorted(_EDITS)).flatmap(lambda c: st.tuples(st.just(c), _EDITS[c])),
)
def test_any_single_edit_is_caught_at_its_position(filled: Log, seq: int, column_and_value: tuple[str, Any]) -> None:
    con, home = filled
    column, value = column_and_value
    con.execute("BEGIN TRANSACTION")
    try:
        if column == "at":
            con.execute(
                f"""UPDATE {TABLE} SET "at" = "at" + to_microseconds(?) WHERE seq = ?""",
                [value, seq],
            )
        else:
            old = con.execute(f"SELECT {column} FROM {TABLE} WHERE seq = ?", [seq]).fetchone()[0]
            assume(value != old)
            con.execute(f"UPDATE {TABLE} SET {column} = ? WHERE seq = ?", [value, seq])
        result = audit.verify(con, home)
    finally:
        con.execute("ROLLBACK")
    assert not result.ok
    assert result.first_bad_seq == seq, (column, value, result)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    fields=st.fixed_dictionaries(
        {
            "actor": _TEXT,
            "role": _TEXT,
            "action": _TEXT,
            "object": _TEXT,
            "outcome": _TEXT,
        },
        optional={
            "purpose": st.none() | _TEXT,
            "agreement": st.none() | _TEXT,
            "detail": st.recursive(
                st.none()
                | st.booleans()
                | st.integers(-(10**6), 10**6)
                | _TEXT
                | st.floats(allow_nan=False, allow_infinity=False),
                lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
                max_leaves=8,
            ),
        },
    )
)
def test_any_accepted_entry_round_trips_and_verifies(growing: Log, fields: dict[str, Any]) -> None:
    con, home = growing
    try:
        seq = audit.append(con, **fields)
    except ValueError as exc:
        assume("NHS number" not in str(exc))
        raise
    entry = audit.entries_for(con)[seq - 1]
    assert entry.seq == seq
    assert entry.actor == fields["actor"] and entry.object == fields["object"]
    assert entry.detail_value == fields.get("detail")
    assert audit.verify(con, home).ok


def test_scrub_withholds_number_runs_but_keeps_hex_tokens_and_other_text() -> None:
    """Text the haven composes (file names, hash prefixes) is recorded with NHS-like runs withheld."""
    token = "6672895249f1c0de"  # a 16-character hash prefix: ten digits in a row, and no identifier
    text = f"file export_943 476 5919.csv and 9434765919 (sha256 {token}): 3 rows; year 2026"
    assert audit.scrub(text) == (
        f"file export_{audit.WITHHELD}.csv and {audit.WITHHELD} (sha256 {token}): 3 rows; year 2026"
    )
    assert audit.scrub("nothing to withhold 12345") == "nothing to withhold 12345"


# --- checking several decisions with one walk (audit.one_walk) -----------------------------


def _walks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The start of every walk of the chain from here on."""
    starts: list[int] = []
    walk = audit._check_chain

    def counted(con, key, breaks=(), start=1):  # noqa: ANN001, ANN202
        starts.append(start)
        return walk(con, key, breaks, start)

    monkeypatch.setattr(audit, "_check_chain", counted)
    return starts


def test_inside_one_walk_entries_after_the_start_of_a_sound_walk_are_not_walked_again(
    con: duckdb.DuckDBPyConnection, home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fill(con)
    starts = _walks(monkeypatch)
    with audit.one_walk():
        assert all(audit.authentic_from(con, seq, home) for seq in (2, 3, 5, 4))
        assert audit.authentic_from(con, 1, home)  # before the walk's start: walked again
    assert starts == [2, 1]
    assert [audit.authentic_from(con, seq, home) for seq in (2, 3)] == [True, True]
    assert starts == [2, 1, 2, 3], "outside a block every call walks"


def test_one_walk_walks_again_once_the_tail_moved(
    con: duckdb.DuckDBPyConnection, home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fill(con)
    starts = _walks(monkeypatch)
    with audit.one_walk():
        assert audit.authentic_from(con, 2, home)
        audit.append(con, **_entry(N + 1))
        assert audit.authentic_from(con, 3, home)
    assert starts == [2, 3]


def test_one_walk_never_vouches_for_an_entry_a_walk_did_not_find_sound(
    con: duckdb.DuckDBPyConnection, home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fill(con)
    con.execute(f"UPDATE {TABLE} SET actor = 'someone else' WHERE seq = 3")
    starts = _walks(monkeypatch)
    with audit.one_walk():
        assert [audit.authentic_from(con, seq, home) for seq in (2, 4, 5)] == [False, True, True]
    assert starts == [2, 4]


def test_an_entry_hash_no_hash_could_be_is_reported_as_an_altered_entry_not_a_crash(
    con: duckdb.DuckDBPyConnection, home: Home
) -> None:
    """A non-ASCII ``entry_hash`` made the comparison raise (found by review): now it is an edit."""
    _fill(con)
    con.execute(f"UPDATE {TABLE} SET entry_hash = 'é' WHERE seq = 3")
    _bad(audit.verify(con, home), 3, "altered")
    assert not audit.authentic_from(con, 2, home)


def test_one_walk_walks_again_from_a_breach_decision(
    con: duckdb.DuckDBPyConnection, home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A walk that starts at a breach decision checks it as a start (as outside a block), so the
    memo of an earlier walk does not answer for one (found by review)."""
    _fill(con)
    con.execute(f"DELETE FROM {TABLE} WHERE seq = {N}")
    decision = audit.resolve(con, home, actor="Dr G", decision="the last entry was lost; carry on").seq
    expected = audit.authentic_from(con, decision, home)
    with audit.one_walk():
        assert audit.authentic_from(con, 1, home) is audit.authentic_from(con, 1, home)
        assert audit.authentic_from(con, decision, home) is expected
