"""Rolling the audit trail back, and recovering from it (CoP 12, 23d; Govt response rec. 1).

An insider who holds the store key deletes entries, the anchor or the whole log and lets the
haven write on. Each attack must be named by ``verify``, must stop every later append (fail
closed) until a person records the breach and the decision (``resolve``), and a trail resumed
that way must verify again and show its break. Real encrypted stores and real keys throughout.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import duckdb
import pytest
from click.testing import CliRunner

from safehaven.cli.main import main
from safehaven.core import anchors, audit, schema
from safehaven.core import registers as reg
from safehaven.core.audit import TABLE, AuditTrailBroken
from safehaven.core.home import Home
from safehaven.core.keys import VAULT, KeyRing
from safehaven.core.store import Store

N = 25


def _fill(con: duckdb.DuckDBPyConnection, home: Home, n: int) -> None:
    for i in range(n):
        audit.append(con, actor="pipeline", role="pipeline", action="read", object=f"haven.gp_events/{i}", home=home)


@pytest.fixture
def con(home: Home) -> Iterator[duckdb.DuckDBPyConnection]:
    with Store(home).connect() as connection:
        yield connection


@pytest.fixture
def filled(con: duckdb.DuckDBPyConnection, home: Home) -> duckdb.DuckDBPyConnection:
    _fill(con, home, N)
    return con


def _refused(con: duckdb.DuckDBPyConnection, home: Home, words: str) -> None:
    """The next append and the next run are refused, with a one-line message, twice over."""
    count = con.execute(f"SELECT count(*) FROM {TABLE}").fetchone()[0] if audit._table_exists(con) else 0
    for _ in range(2):
        with pytest.raises(AuditTrailBroken, match=words) as caught:
            audit.append(con, actor="pipeline", role="pipeline", action="read", object="haven.gp_events", home=home)
        assert "\n" not in str(caught.value) and "audit resolve" in str(caught.value)
        with pytest.raises(AuditTrailBroken, match=words):
            audit.begin_run(con, home, actor="pipeline", job="nightly", run_id="r")
    after = con.execute(f"SELECT count(*) FROM {TABLE}").fetchone()[0] if audit._table_exists(con) else 0
    assert after == count


def _copy(home: Home, name: str) -> Path:
    saved = home.root / f"saved-{name}"
    shutil.copy(home.registers / name, saved)
    return saved


# --- the attacks of the issue -----------------------------------------------------------


def test_deleting_the_last_entries_is_named_and_blocks_every_later_append(filled, home: Home) -> None:
    filled.execute(f"DELETE FROM {TABLE} WHERE seq > 22")
    result = audit.verify(filled, home)
    assert (result.ok, result.first_bad_seq) == (False, 23) and "truncation" in result.reason
    _refused(filled, home, "seq 23")
    assert audit.verify(filled, home).first_bad_seq == 23  # still named after the refused appends


def test_deleting_the_anchor_file_blocks_the_next_append(filled, home: Home) -> None:
    anchors.head_path(home).unlink()
    assert not audit.verify(filled, home).ok
    _refused(filled, home, "head anchor .* is missing")


def test_an_emptied_log_without_its_anchor_is_not_innocent(filled, home: Home) -> None:
    filled.execute(f"DELETE FROM {TABLE}")
    anchors.head_path(home).unlink()
    anchors.history_path(home).unlink()
    result = audit.verify(filled, home)
    assert (result.ok, result.first_bad_seq) == (False, 1)
    assert "genesis record" in result.reason
    _refused(filled, home, "seq 1")
    filled.execute(f"DROP TABLE {TABLE}")
    filled.execute(f"DROP TABLE {audit.GENESIS_TABLE}")
    assert "audit key exists" in audit.verify(filled, home).reason


def _wipe(con: duckdb.DuckDBPyConnection, home: Home, *, forget_key: bool) -> None:
    """An insider's wipe: the log, its genesis row, both anchor files and the audit key file, and
    with ``forget_key`` the key ring's record of the audit key and its epoch in the store."""
    con.execute(f"DELETE FROM {TABLE}")
    con.execute(f"DELETE FROM {audit.GENESIS_TABLE}")
    anchors.head_path(home).unlink()
    anchors.history_path(home).unlink()
    KeyRing(home.keys).path(audit.KEY_PURPOSE).unlink()
    if forget_key:
        manifest = home.keys / "keyring.json"
        manifest.write_text(
            json.dumps({k: v for k, v in json.loads(manifest.read_text()).items() if k != audit.KEY_PURPOSE})
        )
        if audit._table_exists(con, audit.KEY_EPOCHS):
            con.execute(f"DELETE FROM {audit.KEY_EPOCHS} WHERE purpose = ?", [audit.KEY_PURPOSE])


def test_a_wiped_trail_is_not_started_again_while_the_store_holds_data(filled, home: Home) -> None:
    """An emptied log is a fresh haven's only when nothing shows prior use (CoP 23d): the append's
    check asks what ``verify`` asks, so with landed data in the store, or pseudonymised (haven) or
    vault rows, no new entry 1 is written under a new key; every append and run is refused."""
    for table in ("landing.gp_events", "haven.gp_events", "vault.identities"):
        filled.execute(f"CREATE OR REPLACE TABLE {table} AS SELECT 'A81001' AS practice_code")
        filled.execute(f"DELETE FROM {table}")
    filled.execute("INSERT INTO vault.identities VALUES ('A81001')")
    _wipe(filled, home, forget_key=True)
    with pytest.raises(AuditTrailBroken, match="haven or vault rows"):
        audit.check(filled, home)
    _refused(filled, home, "seq 1")
    assert not KeyRing(home.keys).exists(audit.KEY_PURPOSE)


def test_a_wiped_trail_is_not_started_again_while_files_remain_in_published(filled, home: Home) -> None:
    """With the data, the key and its records gone too, files in ``published/`` still show the trail
    existed (found by review). (The breach register does not: a refusal on a new haven records its
    breach before its audit entry.)"""
    home.published.mkdir(parents=True, exist_ok=True)
    (home.published / "gp_activity.csv").write_text("month,people\n")
    _wipe(filled, home, forget_key=True)
    _refused(filled, home, "seq 1")


def test_a_wiped_trail_is_not_started_again_while_its_key_is_on_record(filled, home: Home) -> None:
    """With no data in the store, the key ring's record of an audit key (current, retired or
    destroyed), or the store's record of its epoch (``governance.key_epochs``), still shows that
    the trail existed (CoP 23d): the next append is refused."""
    _wipe(filled, home, forget_key=False)
    with pytest.raises(AuditTrailBroken, match="key ring records an audit key"):
        audit.check(filled, home)
    _refused(filled, home, "seq 1")
    manifest = home.keys / "keyring.json"
    manifest.write_text(
        json.dumps({k: v for k, v in json.loads(manifest.read_text()).items() if k != audit.KEY_PURPOSE})
    )
    schema.ensure(filled, audit.KEY_EPOCHS)
    filled.execute(f"INSERT INTO {audit.KEY_EPOCHS} VALUES ('audit', 'kid', now(), NULL)")
    with pytest.raises(AuditTrailBroken, match="key_epochs records an audit key"):
        audit.check(filled, home)
    _refused(filled, home, "seq 1")


def test_a_store_holding_landed_data_with_no_audit_log_fails(con, home: Home) -> None:
    assert audit.verify(con, home).ok  # a new haven: nothing landed, nothing audited
    con.execute("CREATE TABLE landing.gp_events AS SELECT 'A81001' AS practice_code")
    result = audit.verify(con, home)
    assert (result.ok, result.first_bad_seq) == (False, 1)
    assert "holds landed, released or published data" in result.reason
    with pytest.raises(AuditTrailBroken, match="seq 1"):
        audit.begin_run(con, home, actor="pipeline", job="nightly", run_id="r")


def test_a_replayed_older_anchor_is_caught_by_the_anchor_history(con, home: Home) -> None:
    _fill(con, home, 10)
    old_head = _copy(home, anchors.HEAD_FILE)
    _fill(con, home, 15)
    con.execute(f"DELETE FROM {TABLE} WHERE seq > 10")
    shutil.copy(old_head, anchors.head_path(home))  # a genuine head, MAC and all
    result = audit.verify(con, home)
    assert (result.ok, result.first_bad_seq) == (False, 11)
    assert "anchor history records entry 25" in result.reason
    _refused(con, home, "seq 11")


def test_the_anchor_history_is_hash_chained_and_monotonic(filled, home: Home) -> None:
    path = anchors.history_path(home)
    lines = path.read_text().splitlines()
    edited = json.loads(lines[4]) | {"seq": 99}
    path.write_text("\n".join([*lines[:4], json.dumps(edited), *lines[5:]]) + "\n")
    assert "line 5 of the anchor history is unreadable or was edited" in audit.verify(filled, home).reason
    path.write_text("\n".join(lines[:3] + lines[4:]) + "\n")  # a line removed from the middle
    assert "line 4 of the anchor history does not follow line 3" in audit.verify(filled, home).reason
    path.write_text("\n".join(lines) + "\n")
    assert audit.verify(filled, home).ok
    # every line follows the one before and seq never goes down
    parsed = [json.loads(line) for line in lines]
    assert [p["seq"] for p in parsed] == list(range(1, N + 1))
    assert all(parsed[i]["prev"] == parsed[i - 1]["mac"] for i in range(1, N))


def test_deleting_the_oldest_anchor_history_lines_is_seen(filled, home: Home) -> None:
    """The anchor history is evidence from its first line (CoP 23d): line 1 must be anchor 1 linked
    to the genesis, and each line numbered one more than the line before, so cutting lines off the
    front is named by ``verify`` and the nightly run refuses (the append's cheap check reads only
    the last line, as for a line edited in the middle)."""
    path = anchors.history_path(home)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[6:]) + "\n")
    result = audit.verify(filled, home)
    assert not result.ok and "line 1 of the anchor history is anchor 7, not 1" in result.reason
    with pytest.raises(AuditTrailBroken, match="anchor history is anchor 7"):
        audit.begin_run(filled, home, actor="pipeline", job="nightly", run_id="r")
    path.write_text("\n".join(lines) + "\n")
    assert audit.verify(filled, home).ok


def test_cutting_the_history_back_too_is_seen_in_the_published_head(con, home: Home) -> None:
    """Without a write-once target: head and history rolled back together; published heads show it."""
    _fill(con, home, 10)
    saved = [_copy(home, anchors.HEAD_FILE), _copy(home, anchors.HISTORY_FILE)]
    _fill(con, home, 5)
    home.published.mkdir(parents=True, exist_ok=True)
    (home.published / "release.json").write_text(json.dumps({"audit_head": audit.head(con, home)}))
    _fill(con, home, 5)
    con.execute(f"DELETE FROM {TABLE} WHERE seq > 10")
    for path, name in zip(saved, (anchors.HEAD_FILE, anchors.HISTORY_FILE), strict=True):
        shutil.copy(path, home.registers / name)
    result = audit.verify(con, home)
    assert (result.ok, result.first_bad_seq) == (False, 11)
    assert "published/release.json records entry 15" in result.reason


def test_the_write_once_target_catches_a_complete_local_rollback(home: Home, tmp_path: Path) -> None:
    worm = tmp_path / "worm"
    worm.mkdir()
    home = dataclasses.replace(home, audit_worm=worm)  # the target is configuration, passed in
    with Store(home).connect() as con:
        _fill(con, home, 10)
        saved = [_copy(home, anchors.HEAD_FILE), _copy(home, anchors.HISTORY_FILE)]
        _fill(con, home, 15)
        files = sorted(worm.iterdir())
        assert len(files) == N and all(stat.S_IMODE(f.stat().st_mode) == 0o444 for f in files)
        con.execute(f"DELETE FROM {TABLE} WHERE seq > 10")
        for path, name in zip(saved, (anchors.HEAD_FILE, anchors.HISTORY_FILE), strict=True):
            shutil.copy(path, home.registers / name)
        result = audit.verify(con, home)
        assert (result.ok, result.first_bad_seq) == (False, 11)
        assert "write-once anchor for entry 25" in result.reason
        _refused(con, home, "seq 11")
    key = KeyRing(home.keys).get("audit")
    with pytest.raises(FileExistsError, match="different anchor for entry 11"):
        anchors.write_worm(worm, key, anchors.Anchor(11, "e" * 64, 11))  # never overwritten


def test_anchors_written_through_a_system_that_writes_a_few_bytes_at_a_time_are_whole(
    home: Home, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``os.write`` may write part of what it is given: each anchor line and write-once anchor is
    written to its end (``safehaven.core.files.write_fully``), never left half a line that the next
    run would refuse as an edited trail."""
    worm = tmp_path / "worm"
    worm.mkdir()
    home = dataclasses.replace(home, audit_worm=worm)
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data[:7])))
    with Store(home).connect() as con:
        _fill(con, home, 3)
        monkeypatch.undo()
        assert audit.verify(con, home).ok
    lines = anchors.read_history(home) or []
    assert [line["seq"] for line in lines] == [1, 2, 3]
    assert [anchors.read_worm(worm, seq)["seq"] for seq in (1, 2, 3)] == [1, 2, 3]


def test_an_append_on_the_connection_alone_anchors_in_the_openers_target(home: Home, tmp_path: Path) -> None:
    """Code holding only the connection still writes to the home's write-once target."""
    worm = tmp_path / "worm"
    worm.mkdir()
    with Store(dataclasses.replace(home, audit_worm=worm)).connect() as con:
        audit.append(con, actor="pipeline", role="pipeline", action="read", object="haven.gp_events")
        assert audit.home_of(con).audit_worm == worm
    assert [p.name for p in worm.iterdir()] == ["anchor-000000000001.json"]


def test_the_write_once_target_is_configuration_of_the_edges(
    home: Home, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI reads ``$SAFEHAVEN_AUDIT_WORM``; the resource takes ``audit_worm_dir``; the core neither."""
    from resources.haven import SafeHavenResource
    from safehaven.cli.common import AUDIT_WORM_ENV, home_from_env

    monkeypatch.setenv("SAFEHAVEN_HOME", str(home.root))
    monkeypatch.delenv(AUDIT_WORM_ENV, raising=False)
    assert home_from_env().audit_worm is None and SafeHavenResource.from_environment().audit_worm_dir is None
    monkeypatch.setenv(AUDIT_WORM_ENV, str(tmp_path / "worm"))
    assert home_from_env().audit_worm == tmp_path / "worm"
    assert SafeHavenResource.from_environment().home_dir().audit_worm == tmp_path / "worm"
    resource = SafeHavenResource(home=str(home.root), audit_worm_dir=str(tmp_path / "other"))
    assert resource.home_dir() == Home(home.root.resolve(), audit_worm=tmp_path / "other")


# --- the key ----------------------------------------------------------------------------


def test_key_problems_are_one_line_and_a_swapped_key_is_the_wrong_key(filled, home: Home) -> None:
    ring = KeyRing(home.keys)
    original = ring.get("audit")
    ring.path("audit").write_text(os.urandom(32).hex())  # swapped behind the key ring's back
    result = audit.verify(filled, home)
    assert (result.ok, result.kind, result.first_bad_seq) == (False, "key", None)
    assert "is not the key the audit trail was written with" in result.reason and "altered" not in result.reason
    with pytest.raises(AuditTrailBroken, match="not the key"):
        audit.append(filled, actor="a", role="r", action="read", object="o", home=home)
    ring.path("audit").write_text(original.hex)
    ring.path("audit").chmod(0o644)
    result = audit.verify(filled, home)
    assert (result.ok, result.kind) == (False, "key") and "chmod 600" in result.reason
    ring.path("audit").chmod(0o600)
    ring.path("audit").unlink()
    assert "is missing" in audit.verify(filled, home).reason
    ring.path("audit").write_text(original.hex)
    ring.path("audit").chmod(0o600)
    assert audit.verify(filled, home).ok


# --- recording the breach and resuming --------------------------------------------------


def test_a_recorded_decision_starts_a_linked_segment_that_verifies_and_shows_the_break(filled, home: Home) -> None:
    filled.execute(f"DELETE FROM {TABLE} WHERE seq > 22")
    done = audit.resolve(filled, home, actor="dr-x", decision="SIRO informed; entries 23-25 lost")
    assert (done.seq, done.lost_from, done.lost_to) == (26, 23, 25)
    result = audit.verify(filled, home)
    assert result.ok, result
    assert result.breaks == ((23, 26),) and "chain broken at entries 23-25" in result.reason
    decision = audit.entries_for(filled, object_like="audit:breach-%")[0]
    tail = audit.entries_for(filled)[-2]
    assert (decision.seq, decision.action, decision.prev_hash) == (26, audit.SEGMENT_ACTION, tail.entry_hash)
    assert decision.detail_value["decision"] == "SIRO informed; entries 23-25 lost"
    (breach,) = reg.breaches(filled)
    assert (breach["kind"], breach["severity"], breach["breach_id"]) == ("integrity_failure", 2, done.breach_id)
    assert audit.append(filled, actor="a", role="r", action="read", object="o", home=home) == 27
    assert audit.verify(filled, home).ok
    lines = anchors.read_history(home) or []
    assert [line["seq"] for line in lines if line["segment_start"]] == [26]
    filled.execute(f"DELETE FROM {TABLE} WHERE seq = 5")  # the old segment is still checked
    assert audit.verify(filled, home).first_bad_seq == 5


def test_a_written_off_range_is_frozen_as_evidence(filled, home: Home) -> None:
    filled.execute(f"UPDATE {TABLE} SET actor = 'someone-else' WHERE seq = 4")
    done = audit.resolve(filled, home, actor="dr-x", decision="entry 4 edited; investigated")
    assert (done.lost_from, done.lost_to, done.seq) == (4, 25, 26)
    assert audit.verify(filled, home).ok
    filled.execute(f"DELETE FROM {TABLE} WHERE seq = 25")
    result = audit.verify(filled, home)
    assert (result.ok, result.first_bad_seq) == (False, 26) and "not as it was" in result.reason


def test_a_decision_after_everything_was_deleted(filled, home: Home) -> None:
    filled.execute(f"DELETE FROM {TABLE}")
    anchors.head_path(home).unlink()
    anchors.history_path(home).unlink()
    done = audit.resolve(filled, home, actor="dr-x", decision="log destroyed; reported to the ICO")
    assert (done.lost_from, done.seq) == (1, 2)  # the genesis record still knew entry 1
    assert audit.verify(filled, home).ok


def test_a_decision_after_the_tail_and_its_anchors_were_cut_says_the_loss_is_unknown(filled, home: Home) -> None:
    """Entries cut from the tail together with the head anchor and the anchor history leave nothing
    that shows where the log ended: the decision cannot say how many were lost, and says so (on
    the trail and in every later verification) rather than "none" (found by review)."""
    filled.execute(f"DELETE FROM {TABLE} WHERE seq > 22")
    anchors.head_path(home).unlink()
    anchors.history_path(home).unlink()
    done = audit.resolve(filled, home, actor="dr-x", decision="anchors and entries gone; reported")
    assert done.loss_unknown and (done.lost_from, done.seq) == (23, 23)
    decision = audit.entries_for(filled, object_like="audit:breach-%")[0]
    assert decision.detail_value[audit.LOSS_UNKNOWN] is True
    result = audit.verify(filled, home)
    assert result.ok and "how many entries were lost is unknown" in result.reason


@pytest.mark.parametrize("witness", ["a stale published head", "a head file that does not verify"])
def test_a_decision_counts_only_a_current_authentic_anchor_as_showing_the_end(
    con: duckdb.DuckDBPyConnection, home: Home, witness: str
) -> None:
    """A published head from before the cut, or a head file that is not the haven's, says nothing
    of the entries cut after it: the loss is unknown (found by review)."""
    _fill(con, home, 10)
    home.published.mkdir(parents=True, exist_ok=True)
    (home.published / "release.json").write_text(json.dumps({"audit_head": audit.head(con, home)}))
    _fill(con, home, 15)
    con.execute(f"DELETE FROM {TABLE} WHERE seq > 22")
    anchors.history_path(home).unlink()
    if witness == "a head file that does not verify":
        anchors.head_path(home).write_text(json.dumps({"seq": 25, "junk": 1}))
    else:
        anchors.head_path(home).unlink()
    done = audit.resolve(con, home, actor="dr-x", decision="anchors and entries gone; reported")
    assert done.loss_unknown, witness


def test_a_junk_file_in_the_write_once_target_does_not_show_the_end(filled, home: Home, tmp_path: Path) -> None:
    """Only a write-once anchor whose MAC verifies counts (found by review: a file named for a later
    seq made the decision record nothing lost)."""
    filled.execute(f"DELETE FROM {TABLE} WHERE seq > 22")
    anchors.head_path(home).unlink()
    anchors.history_path(home).unlink()
    worm = tmp_path / "worm"
    worm.mkdir()
    (worm / "anchor-000000000099.json").write_text(json.dumps({"seq": 99, "entry_hash": "x", "mac": "y"}))
    done = audit.resolve(filled, replace(home, audit_worm=worm), actor="dr-x", decision="gone; reported")
    assert done.loss_unknown


def test_a_decision_whose_anchors_show_the_end_knows_the_loss(filled, home: Home) -> None:
    filled.execute(f"DELETE FROM {TABLE} WHERE seq > 22")
    done = audit.resolve(filled, home, actor="dr-x", decision="entries 23-25 lost")
    assert not done.loss_unknown and "unknown" not in audit.verify(filled, home).reason


def test_resolve_refuses_a_trail_that_verifies_or_a_key_problem(filled, home: Home) -> None:
    with pytest.raises(ValueError, match="no breach to resolve"):
        audit.resolve(filled, home, actor="dr-x", decision="nothing")
    KeyRing(home.keys).path("audit").chmod(0o644)
    with pytest.raises(ValueError, match="needs the right audit key"):
        audit.resolve(filled, home, actor="dr-x", decision="x")


def test_anchor_command_refuses_to_paper_over_a_rollback(filled, home: Home) -> None:
    filled.execute(f"DELETE FROM {TABLE} WHERE seq > 22")
    with pytest.raises(ValueError, match="will not anchor over a rollback"):
        audit.anchor(filled, home)


def _cut_history(home: Home, last_seq: int) -> None:
    """Keep only the anchor history's lines up to entry ``last_seq`` (a genuine prefix)."""
    path = anchors.history_path(home)
    kept = [line for line in path.read_text().splitlines() if json.loads(line)["seq"] <= last_seq]
    path.write_text("\n".join(kept) + "\n")


def test_anchor_refuses_a_truncation_the_head_file_still_shows(filled, home: Home) -> None:
    """``audit anchor`` clears only anchors that are behind the log (CoP 23d): with the last entries
    deleted and the anchor history cut back to match, the head file still names the old end, so
    re-anchoring is refused and the truncation stays reported until a breach decision; the same
    for a history cut back behind the head file with the log intact."""
    saved = _copy(home, anchors.HISTORY_FILE)
    _cut_history(home, 22)
    with pytest.raises(ValueError, match="will not anchor over a rollback: the anchor history ends at entry 22"):
        audit.anchor(filled, home)
    shutil.copy(saved, anchors.history_path(home))
    filled.execute(f"DELETE FROM {TABLE} WHERE seq > 22")
    _cut_history(home, 22)
    with pytest.raises(ValueError, match="head anchor records entry 25: entries 23-25 were removed"):
        audit.anchor(filled, home)
    result = audit.verify(filled, home)
    assert (result.ok, result.first_bad_seq) == (False, 23)
    _refused(filled, home, "seq 23")


# --- the commands -----------------------------------------------------------------------


def _run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_commands_refuse_in_one_line_until_the_decision_is_recorded(home: Home) -> None:
    with Store(home).connect() as con:
        _fill(con, home, N)
        con.execute(f"DELETE FROM {TABLE} WHERE seq > 22")
    assert KeyRing(home.keys).exists(VAULT)  # the home's custodian created the pair (sealed)
    result = _run("audit", "verify")
    assert result.exit_code == 1 and "first bad entry: seq 23" in result.output
    assert "recorded as breach 1" in result.output
    assert "already recorded as breach 1" in _run("audit", "verify").output
    refused = _run("subject-access", "-")  # refused before it reads anything
    assert refused.exit_code == 1 and "first bad entry: seq 23" in refused.output
    assert "Traceback" not in refused.output and "audit resolve" in refused.output
    assert _run("audit", "anchor", "--yes").exit_code == 1
    resolved = _run("audit", "resolve", "--decision", "entries lost; SIRO told")
    assert resolved.exit_code == 0, resolved.output
    assert "recorded breach 1 and the decision at entry 26: entries 23-25 written off" in resolved.output
    verified = _run("audit", "verify")
    assert verified.exit_code == 0 and "chain broken at entries 23-25" in verified.output
    with Store(home).connect(read_only=True) as con:
        assert len(reg.breaches(con)) == 1


TAMPERING = [
    pytest.param(f"UPDATE {TABLE} SET purpose = 'marketing' WHERE seq = 4", 4, id="edited"),
    pytest.param(f"DELETE FROM {TABLE} WHERE seq = 3", 3, id="deleted"),
    pytest.param(f"UPDATE {TABLE} SET seq = CASE seq WHEN 2 THEN 5 ELSE 2 END WHERE seq IN (2, 5)", 2, id="reordered"),
    pytest.param(f"DELETE FROM {TABLE} WHERE seq > 3", 4, id="truncated"),
]


@pytest.mark.parametrize(("sql", "seq"), TAMPERING)
def test_every_tampering_blocks_the_next_run_until_a_decision_then_verifies(
    filled, home: Home, sql: str, seq: int
) -> None:
    """The run-start check (a full verify) refuses each edit of the log, run after run."""
    filled.execute(sql)
    for _ in range(2):
        with pytest.raises(AuditTrailBroken, match=f"first bad entry: seq {seq}"):
            audit.begin_run(filled, home, actor="pipeline", job="nightly", run_id="r")
    done = audit.resolve(filled, home, actor="dr-x", decision="investigated; resume")
    assert done.lost_from == seq
    run = audit.begin_run(filled, home, actor="pipeline", job="nightly", run_id="r")
    assert run == done.seq + 1
    result = audit.verify(filled, home)
    assert result.ok and result.breaks == ((seq, done.seq),)


def test_a_write_once_target_dropped_from_the_settings_or_unmounted_is_refused_not_ignored(
    home: Home, tmp_path: Path
) -> None:
    """With the target's setting dropped (or the target unmounted), a complete local rollback would
    pass unseen and appends fail only after they commit (found by review): the head records that a
    target was in use, so verify and every append refuse, saying what to configure or mount."""
    worm = tmp_path / "worm"
    worm.mkdir()
    anchored = dataclasses.replace(home, audit_worm=worm)
    with Store(anchored).connect() as con:
        _fill(con, anchored, 3)
    with Store(home).connect() as con:  # the setting dropped
        result = audit.verify(con, home)
        assert not result.ok and "none is configured now" in result.reason
        with pytest.raises(audit.AuditTrailBroken, match="none is configured now"):
            _fill(con, home, 1)
    worm.rename(tmp_path / "unmounted")
    with Store(anchored).connect() as con:
        with pytest.raises(audit.AuditTrailBroken, match="is configured but is not a directory"):
            _fill(con, anchored, 1)
        assert con.execute(f"SELECT max(seq) FROM {TABLE}").fetchone()[0] == 3  # refused before it committed
    (tmp_path / "unmounted").rename(worm)
    with Store(anchored).connect() as con:
        _fill(con, anchored, 1)
        assert audit.verify(con, anchored).ok


def test_an_emptied_anchor_history_is_refused_as_a_missing_one_is(home: Home, con: duckdb.DuckDBPyConnection) -> None:
    """Emptying the history (no audit key needed) passed verify and restarted it at line 1, every
    earlier anchored head lost unseen, while a deleted one was refused (found by review)."""
    _fill(con, home, 10)
    anchors.history_path(home).write_text("\n")
    result = audit.verify(con, home)
    assert not result.ok and "audit_anchors.jsonl is empty" in result.reason
    _refused(con, home, "is empty")


@pytest.mark.parametrize("edited", [None, "x", [1]], ids=["null", "text", "a list"])
def test_resolve_anchors_its_decision_after_the_last_history_line_was_edited(
    home: Home, con: duckdb.DuckDBPyConnection, edited: object
) -> None:
    """The documented remedy for an edited history line is a breach decision; with the last line's
    number edited, ``resolve`` committed its decision and then failed to anchor it, for ever (found by
    review). It anchors now, and the trail goes on."""
    _fill(con, home, 5)
    path = anchors.history_path(home)
    lines = path.read_text().splitlines()
    last = json.loads(lines[-1])
    last["n"] = edited
    path.write_text("\n".join([*lines[:-1], json.dumps(last)]) + "\n")
    assert "audit resolve" in audit.verify(con, home).reason
    audit.resolve(con, home, actor="Dr X, SIRO", decision="a history line was edited; investigated")
    assert audit.verify(con, home).ok
    _fill(con, home, 1)


def test_a_staged_audit_key_left_beside_a_long_trail_does_not_make_every_append_a_full_verify(
    home: Home, con: duckdb.DuckDBPyConnection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A genesis is completed only for a log of entry 1 alone, so a ``keys/audit-next.key`` left
    beside a longer trail (planted, or restored from a backup) does not force a full verify on
    every append (found by review)."""
    _fill(con, home, 5)
    staged = KeyRing(home.keys).path(audit.GENESIS_KEY)
    staged.write_text(os.urandom(32).hex())
    staged.chmod(0o600)
    walks: list[object] = []
    real = audit.verify
    monkeypatch.setattr(audit, "verify", lambda *a, **k: walks.append(a) or real(*a, **k))
    _fill(con, home, 3)
    assert walks == []
