"""Retention and secure disposal (issue #7; CoP 43d, 43f, 48-50; ``safehaven.dispose.disposal``).

The haven used here is built with the core functions (``tests.unit.populate``) from two drops:

* an *old* drop, received in 2015 (landed with the landing clock set back,
  ``safehaven.intake.landings.clock``, so the audit trail records it received then):
  gp_events, hospital_episodes and social_care of people who appear nowhere else, plus one
  hospital episode of a person ("the mover") who is also in the new drop but with another
  postcode and date of birth, plus a malformed GP file quarantined in 2015, plus a resent copy
  of the old GP file still waiting in ``incoming/``;
* a *new* drop, received now, that is kept.

A record-level agreement (``gp-study``) releases gp_events after both drops landed. The
*seeded values* of a disposal are the NHS numbers and full postcodes that occur only in the
disposed (old) records, and the mover's old postcode.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import duckdb
import pytest

from safehaven.context import Haven
from safehaven.core import audit, pins
from safehaven.core import registers as reg
from safehaven.core import schema as core_schema
from safehaven.core.days import haven_today
from safehaven.core.home import Home
from safehaven.core.keys import VAULT, KeyRing, KeyRingError, agreement_key
from safehaven.core.store import Store, httpfs_extension_path, table_exists
from safehaven.dispose import disposal
from safehaven.dispose import model as disposal_model
from safehaven.dispose import run as disposal_run
from safehaven.dispose import steps as disposal_steps
from safehaven.intake import landings
from safehaven.intake.contracts import ContractRegistry
from safehaven.intake.ingest import ingest_collection
from safehaven.protect import key_record, vault
from safehaven.protect.pseudonymise import pseudonym, release_pseudonym
from safehaven.publish.aggregate import count
from safehaven.publish.outputs import load_outputs
from safehaven.share import review
from safehaven.share.agreements import suspend
from safehaven.share.releases import PERSON_ID, prepare
from safehaven.tools import synthetic
from tests.conftest import custodian_ring, leaked_nhs_numbers, scan_for
from tests.governance_helpers import (
    REVIEWERS,
    adopt,
    agreement_data,
    approve_as,
    contracts_root,
    delivery_stopped,
    prepare_and_release,
    write_agreement,
)
from tests.unit.populate import process, write_csv
from tests.unit.test_vault import seen_matches_vault

OLD_END = date(2015, 3, 31)
RECEIVED_2015 = datetime(2015, 4, 2, 9, tzinfo=UTC)
BEFORE = date(2016, 1, 1)
CONTENT = ("gp_events", "hospital_episodes", "social_care")
MOVER_POSTCODE = "ZZ9 9ZZ"
MOVER_DOB = "1931-02-03"
STUDY = "gp-study"


@dataclass
class World:
    home: Home
    registry: ContractRegistry
    keyring: KeyRing
    old_nhs: set[str]  # disposed-only NHS numbers (canonical)
    old_postcodes: set[str]  # disposed-only full postcodes
    kept_nhs: set[str]
    mover: str  # NHS number of the person in both drops

    def needles(self) -> list[bytes]:
        values = self.old_postcodes | {MOVER_POSTCODE}
        return sorted({v.encode() for v in values} | {v.replace(" ", "").encode() for v in values})

    def leaks(self) -> dict[str, object]:
        """Plain bytes of seeded values in any file under the home (NHS numbers in any formatting)."""
        hits: dict[str, object] = dict(leaked_nhs_numbers([self.home.root], self.old_nhs))
        for path, found in scan_for(self.home.root, self.needles()).items():
            hits[path] = found
        return hits

    def context(self, today: date | None = None) -> Haven:
        """The context of a disposal in this world: its home, contracts and key ring."""
        return Haven.open(self.home, contracts=self.registry, keyring=self.keyring, today=today)

    def dispose(self, target: disposal.Target, **kw) -> disposal.DisposalResult:
        return disposal.dispose(self.context(), target, **kw)


def _read(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    return rows[0], rows[1:]


def _canon(nhs: str) -> str:
    return re.sub(r"[^0-9]", "", nhs)


def _values(folder: Path, column: str) -> set[str]:
    out: set[str] = set()
    for path in folder.rglob("*.csv"):
        header, rows = _read(path)
        if column in header:
            i = header.index(column)
            out |= {_canon(r[i]) if column == "nhs_number" else r[i].upper() for r in rows if r[i]}
    return out


def _build(root: Path) -> None:
    """The template haven (see the module docstring), built once per module and copied per test."""
    home = Home(root / "haven").ensure()
    custodian_ring(home).create_keypair(VAULT)  # the custodian sets the haven up
    croot = contracts_root(root)
    write_agreement(
        croot,
        agreement_data(
            id=STUDY,
            collections=["gp_events"],
            linkages=[],
            fields=[
                {
                    "collection": "gp_events",
                    "field": "event_date",
                    "justification": "Weekly counts of events need the date each was recorded.",
                },
                {
                    "collection": "gp_events",
                    "field": "diagnosis_code",
                    "justification": "The study is about which conditions are recorded.",
                },
            ],
        ),
    )
    registry = ContractRegistry(croot)
    old, new = root / "old", root / "new"
    synthetic.generate(old, patients=60, seed=11, defect_rate=0.0, period_end=OLD_END)
    synthetic.generate(new, patients=150, seed=7, defect_rate=0.0)
    shutil.rmtree(old / "objections")
    # the mover: one old hospital episode re-assigned to a kept person, with an old postcode and date of birth
    _, objection_rows = _read(next((new / "objections").glob("*.csv")))
    objectors = {_canon(r[0]) for r in objection_rows}
    header, new_gp = _read(next((new / "gp_events").glob("*.csv")))
    mover = next(
        _canon(r[header.index("nhs_number")]) for r in new_gp if _canon(r[header.index("nhs_number")]) not in objectors
    )
    old_hes = next((old / "hospital_episodes").glob("*.csv"))
    header, rows = _read(old_hes)
    row = rows[0]
    row[header.index("nhs_number")], row[header.index("postcode")] = mover, MOVER_POSTCODE
    row[header.index("date_of_birth")] = MOVER_DOB
    write_csv(old_hes, header, rows)
    # a malformed copy of old GP data (an extra column): quarantined whole at ingest
    old_gp = next((old / "gp_events").glob("*.csv"))
    header, rows = _read(old_gp)
    write_csv(old / "gp_events" / "gp_events_20150331_resent.csv", [*header, "note"], [[*r, "x"] for r in rows[:20]])
    received = {old: lambda _: RECEIVED_2015, new: landings.clock}  # the old drop is received in 2015
    for sub in (old, new):  # received separately: each drop gets its own vault data keys
        for path in sub.rglob("*.csv"):
            dest = home.incoming_for(path.parent.name) / path.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, dest)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(landings, "clock", received[sub])
            process(home, registry)
    keyring = KeyRing(home.keys)
    with Store(home).connect() as con:
        assert con.execute("SELECT count(*) FROM governance.batches WHERE landed_at < '2016-01-01'").fetchone()[0] == 3
        adopt(con, registry, STUDY)  # the governance lead adopts the study's approval
        result = prepare_and_release(con, STUDY, haven=Haven.open(home, contracts=registry, keyring=keyring))
        assert result.status == "released", result.reason
    for reason in home.quarantine_for("gp_events").glob("*.reason.json"):
        data = json.loads(reason.read_text())
        data["quarantined_at"] = "2015-04-02T09:00:00+00:00"
        reason.write_text(json.dumps(data))
    shutil.copy(old_gp, home.incoming_for("gp_events") / old_gp.name)  # sent again, not yet ingested
    old_nhs, new_nhs = _values(old, "nhs_number"), _values(new, "nhs_number")
    old_pc, new_pc = _values(old, "postcode"), _values(new, "postcode")
    (root / "world.json").write_text(
        json.dumps(
            {
                "old_nhs": sorted(old_nhs - new_nhs),
                "old_postcodes": sorted(old_pc - new_pc - {MOVER_POSTCODE}),
                "kept_nhs": sorted(new_nhs),
                "mover": mover,
            }
        )
    )


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("disposal-template")
    _build(root)
    return root


@pytest.fixture
def world(template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> World:
    root = tmp_path / "world"
    shutil.copytree(template, root, symlinks=True)
    home = Home(root / "haven")
    monkeypatch.setenv("SAFEHAVEN_HOME", str(home.root))
    monkeypatch.setenv("SAFEHAVEN_CONTRACTS", str(root / "data_contracts"))
    facts = json.loads((root / "world.json").read_text())
    return World(
        home,
        ContractRegistry(root / "data_contracts"),
        custodian_ring(home),
        set(facts["old_nhs"]),
        set(facts["old_postcodes"]),
        set(facts["kept_nhs"]),
        facts["mover"],
    )


def _store_hits(con: duckdb.DuckDBPyConnection, needles: set[str]) -> dict[str, int]:
    """Rows of every table of the store whose text (spaces and hyphens removed) holds a needle."""
    pattern = "|".join(sorted(re.escape(n.replace(" ", "")) for n in needles))
    hits = {}
    for schema, table in con.execute(
        "SELECT table_schema, table_name FROM information_schema.tables WHERE table_catalog = current_database() "
        "AND table_type = 'BASE TABLE'"
    ).fetchall():
        n = con.execute(
            f'SELECT count(*) FROM {schema}."{table}" t WHERE regexp_matches('
            f"replace(replace(upper(CAST(t AS VARCHAR)), ' ', ''), '-', ''), ?)",
            [pattern],
        ).fetchone()[0]
        if n:
            hits[f"{schema}.{table}"] = n
    return hits


def _vault_entries(world: World) -> set[tuple[str, str, str]]:
    """Every identity-vault entry, decrypted: (pid, field, value)."""
    with Store(world.home).connect() as con:  # vault.decrypt_rows creates its tables if missing
        return {(p, f, v) for p, f, v, _ in vault.decrypt_rows(con, vault.private_key(world.keyring))}


def _vault_values(world: World) -> set[tuple[str, str]]:
    return {(f, v) for _, f, v in _vault_entries(world)}


def _counts(home: Home, batches: str) -> dict[str, int]:
    """Rows of the kept batches in every landing and haven table."""
    with Store(home).connect(read_only=True) as con:
        tables = con.execute(
            "SELECT table_schema || '.' || table_name FROM information_schema.columns WHERE table_catalog = 'store' "
            "AND column_name = '_batch' AND table_schema IN ('landing', 'haven') ORDER BY 1"
        ).fetchall()
        return {
            t: con.execute(f"SELECT count(*) FROM {t} WHERE _batch IN ({batches})").fetchone()[0] for (t,) in tables
        }


KEPT = "SELECT batch_id FROM governance.batches WHERE landed_at >= '2016-01-01'"


def _dispose_old(world: World, **kw) -> list[disposal.DisposalResult]:
    return [world.dispose(disposal.Target.for_collection(c, BEFORE), **kw) for c in CONTENT]


# --- the required properties ----------------------------------------------------------------


def test_the_haven_key_is_checked_before_the_disposal_transaction_opens(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checking the haven key may record it on the audit trail (a key made before the trail recorded
    haven keys is adopted at its first use), which needs a transaction of its own: disposal checks
    it before opening its own (found by review: inside it, disposal failed on an upgraded haven)."""
    from safehaven.core.store import in_transaction

    real, seen = disposal_steps.haven_key, []

    def checked(con, *args, **kwargs):
        seen.append(in_transaction(con))
        return real(con, *args, **kwargs)

    monkeypatch.setattr(disposal_steps, "haven_key", checked)
    world.dispose(disposal.Target.for_collection("gp_events", BEFORE))
    assert seen and not any(seen)


def test_after_disposal_no_file_under_the_home_holds_a_disposed_value(world: World) -> None:
    """Byte scan of every file under $SAFEHAVEN_HOME, before and after.

    Before: the seeded values stand in plain files (the quarantined file, the resent copy in
    incoming/) and in the store's tables (read under its key). After: no file under the home
    holds any of them in plain bytes, and no table of the current store, read under the
    current key, holds any either. The store file itself is encrypted, so its bytes prove
    nothing either way; the control for it is the next test.
    """
    assert world.old_nhs and world.old_postcodes
    before = world.leaks()
    assert any("/quarantine/" in p for p in before) and any("/incoming/" in p for p in before), before
    needles = world.old_nhs | world.old_postcodes | {MOVER_POSTCODE}
    with Store(world.home).connect(read_only=True) as con:
        assert _store_hits(con, needles)
    assert {(f, v) for f, v in _vault_values(world) if f == "postcode"} & {("postcode", MOVER_POSTCODE)}

    haven = world.keyring.get("haven").material
    old_pids = sorted(pseudonym(haven, n) for n in world.old_nhs)
    with Store(world.home).connect(read_only=True) as con:  # data keys protecting disposed people only
        old_deks = {
            r[0]
            for r in con.execute(
                "SELECT dek_id FROM vault.identity GROUP BY dek_id HAVING bool_and(list_contains(?, pid))", [old_pids]
            ).fetchall()
        }

    results = _dispose_old(world)

    assert [r.status for r in results] == ["disposed"] * 3
    destroyed = {k["key_id"] for r in results for k in r.certificate["keys_destroyed"] if k["kind"] == "vault_data_key"}
    assert old_deks and old_deks <= destroyed, "data keys left with no entry are destroyed"
    with Store(world.home).connect(read_only=True) as con:
        assert not con.execute(
            "SELECT count(*) FROM vault.data_keys WHERE list_contains(?, dek_id)", [sorted(destroyed)]
        ).fetchone()[0]
    assert world.leaks() == {}
    with Store(world.home).connect(read_only=True) as con:
        assert _store_hits(con, needles) == {}
    vaulted = _vault_values(world)
    assert not {v for _, v in vaulted} & (world.old_nhs | world.old_postcodes | {MOVER_POSTCODE, MOVER_DOB})
    assert ("nhs_number", world.mover) in vaulted  # the mover is still held, with the kept values only
    store_dir = sorted(p.name for p in world.home.store_dir.rglob("*") if p.is_file())
    assert store_dir == ["haven.duckdb", "store.lock"], "no WAL, temporary or next file is left"
    assert (world.home.store_dir / "store.lock").stat().st_size == 0, "the lock file holds no data"


def test_control_delete_and_checkpoint_leave_the_values_a_rebuild_removes(world: World, tmp_path: Path) -> None:
    """The control, designed honestly: the store is encrypted, so scanning its bytes finds nothing
    whether or not DELETE left residue. So the same deletion is run on a *plain* (unencrypted,
    uncompressed) DuckDB copy of the store taken before disposal, where residue would be visible:

    1. the plain copy holds the seeded values in its bytes (the scan works on DuckDB files);
    2. disposal's own row step (``_Run._delete``: the same SQL, same transaction) and a
       CHECKPOINT leave them in the bytes of that file: DELETE alone must not be relied on;
    3. disposal's physical step (a copy into a fresh file, as ``Store.rebuild`` does) leaves none.

    The real disposal then runs on the encrypted store; the previous test shows its result holds
    none of the values under the current key, and here the old store key, which could open a
    pre-disposal copy of the file, is shown to be destroyed (not in keys/, its bytes nowhere
    under the home).
    """
    plain = tmp_path / "plain.duckdb"
    old_key = world.keyring.get("store")
    with Store(world.home).connect(read_only=True) as con:
        con.execute("SET force_compression = 'uncompressed'")
        con.execute(f"ATTACH '{plain}' AS plain")
        con.execute("COPY FROM DATABASE store TO plain")
        con.execute("DETACH plain")
    needles = [n.encode() for n in sorted(world.old_nhs)] + world.needles()
    assert scan_for(tmp_path, needles), "the plain copy must hold the values, or the control proves nothing"

    plans = [disposal.make_plan(world.context(), disposal.Target.for_collection(c, BEFORE)) for c in CONTENT]
    con = duckdb.connect()
    con.execute(f"ATTACH '{plain}' AS store")
    con.execute("USE store")
    con.execute("SET force_compression = 'uncompressed'")
    for plan in plans:
        journal = {
            "disposal_id": plan.disposal_id,
            "target": plan.target.as_dict(),
            "plan": plan.as_dict(),
            "steps": {},
        }
        disposal.ensure_tables(con)
        disposal.Run(world.home, journal, world.registry, world.keyring).delete(con)
    assert (
        con.execute(
            "SELECT count(*) FROM landing.gp_events WHERE _batch IN (SELECT batch_id FROM "
            "governance.batches WHERE status = 'disposed')"
        ).fetchone()[0]
        == 0
    )
    con.execute("CHECKPOINT")
    con.execute("VACUUM")
    con.execute("CHECKPOINT")
    rebuilt = tmp_path / "rebuilt" / "plain-rebuilt.duckdb"
    rebuilt.parent.mkdir()
    con.execute(f"ATTACH '{rebuilt}' AS fresh")
    con.execute("COPY FROM DATABASE store TO fresh")
    con.execute("DETACH fresh")
    con.close()
    residue = scan_for(tmp_path, needles)
    assert str(plain) in residue, "DELETE + CHECKPOINT left the disposed values in the file"
    assert str(rebuilt) not in residue, "a copy into a fresh file holds none of them"

    _dispose_old(world)
    assert not world.keyring.get("store").key_id == old_key.key_id
    assert scan_for(world.home.root, [old_key.hex.encode(), old_key.material]) == {}
    link = [p for p in world.home.keys.iterdir() if p.name.startswith(".store-retired")]
    assert link == []
    check = duckdb.connect()
    check.execute(f"LOAD '{httpfs_extension_path()}'")
    with pytest.raises(duckdb.Error):
        check.execute(f"ATTACH '{world.home.store_file}' AS s (ENCRYPTION_KEY '{old_key.hex}', READ_ONLY)")


def test_the_destroyed_agreement_key_cannot_recompute_pseudonyms(world: World) -> None:
    """Logical disposal of an agreement: its salt is destroyed, so the person_ids released under it
    can no longer be computed from haven pids (a new salt gives unrelated ones)."""
    home = world.home
    folder = next((home.releases / STUDY).iterdir())
    extract = folder / "gp_events.parquet"
    released = {r[0] for r in duckdb.execute(f"SELECT DISTINCT {PERSON_ID} FROM '{extract}'").fetchall()}
    with Store(home).connect(read_only=True) as con:
        pids = [
            r[0]
            for r in con.execute(
                "SELECT DISTINCT pid FROM governance.release_members WHERE agreement_id = ?", [STUDY]
            ).fetchall()
        ]
    salt = world.keyring.get(f"agreement-{STUDY}")
    key = agreement_key(world.keyring, STUDY, create=False)
    assert {release_pseudonym(key, p) for p in pids} == released  # recomputable before

    with pytest.raises(disposal.DisposalError, match="in force"):
        world.dispose(disposal.Target.for_agreement(STUDY))
    suspend(STUDY, "recipient breached the onward sharing terms", "SIRO", root=world.registry.root)
    assert [i.action for i in disposal.due(world.context()) if i.target and i.target.agreement == STUDY] == ["dispose"]
    result = world.dispose(disposal.Target.for_agreement(STUDY), authorised_by="Dr Test, Caldicott Guardian")

    assert result.status == "disposed"
    with pytest.raises(KeyRingError, match="destroyed at disposal"):
        agreement_key(world.keyring, STUDY, create=False)
    assert scan_for(home.root, [salt.hex.encode(), salt.material, key.hex.encode()]) == {}
    with pytest.raises(KeyRingError, match="destroyed at disposal"):
        agreement_key(world.keyring, STUDY, create=True)  # never silently re-created as a new domain
    assert not (home.releases / STUDY).exists()
    manifest = world.keyring.manifest()[f"agreement-{STUDY}"]["history"]
    assert any(h["key_id"] == salt.key_id and "destroyed_at" in h for h in manifest)
    cert = result.certificate
    assert cert is not None
    assert {k["key_id"] for k in cert["keys_destroyed"]} >= {salt.key_id, cert["store_key_old"]}
    assert any(k.get("derived_key_id") == key.key_id for k in cert["keys_destroyed"])
    with Store(home).connect(read_only=True) as con:
        assert not con.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'release' "
            "AND starts_with(table_name, ?)",
            [STUDY],
        ).fetchone()[0]
        # governance records stay: who was released, and the register row
        assert con.execute(
            "SELECT count(*) FROM governance.release_members WHERE agreement_id = ?", [STUDY]
        ).fetchone()[0] == len(pids)
        assert (
            con.execute("SELECT count(*) FROM governance.release_register WHERE agreement_id = ?", [STUDY]).fetchone()[
                0
            ]
            == 1
        )


def test_data_not_due_is_intact_and_the_haven_keeps_working(world: World) -> None:
    kept_before = _counts(world.home, KEPT)
    vault_before = _vault_entries(world)
    haven = world.keyring.get("haven").material
    old_pids = {pseudonym(haven, n) for n in world.old_nhs}
    mover = pseudonym(haven, world.mover)
    _dispose_old(world)
    assert _counts(world.home, KEPT) == kept_before
    # exactly the disposed people's entries and the mover's old values are gone; every other entry is intact
    expected = {
        e for e in vault_before if e[0] not in old_pids and not (e[0] == mover and e[2] in (MOVER_POSTCODE, MOVER_DOB))
    }
    assert _vault_entries(world) == expected
    assert {f for p, f, _ in expected if p == mover} == {"nhs_number", "date_of_birth", "postcode"}
    with Store(world.home).connect() as con:
        seen_matches_vault(con, custodian_ring(world.home))  # each deleted entry's digest went with it
        statuses = dict(con.execute("SELECT status, count(*) FROM governance.batches GROUP BY 1").fetchall())
        assert statuses["disposed"] == 3 and statuses["accepted"] >= 4
        empty = con.execute(
            "SELECT count(*) FROM vault.data_keys WHERE dek_id NOT IN (SELECT dek_id FROM vault.identity)"
        ).fetchone()[0]
        assert empty == 0
    # the pipeline still runs: a new drop lands, the haven grows, the agreement releases again
    synthetic.generate(world.home.incoming, patients=40, seed=99, defect_rate=0.0, period_end=date(2026, 6, 30))
    process(world.home, world.registry)
    with Store(world.home).connect() as con:
        assert (
            con.execute("SELECT count(*) FROM governance.batches WHERE status = 'accepted'").fetchone()[0]
            == statuses["accepted"] + 4
        )
        again = prepare_and_release(con, STUDY, haven=world.context())
        assert again.status == "released" and again.release_id == f"{STUDY}-r0002"
        assert audit.verify(con, world.home).ok


def test_the_same_file_sent_again_is_not_landed_again(world: World) -> None:
    _dispose_old(world)
    old_gp = next(
        p for p in (world.home.root.parent / "old" / "gp_events").glob("gp_events_2015*.csv") if "resent" not in p.name
    )
    shutil.copy(old_gp, world.home.incoming_for("gp_events") / old_gp.name)
    process(world.home, world.registry)
    assert world.leaks() == {}
    with Store(world.home).connect(read_only=True) as con:
        assert con.execute("SELECT count(*) FROM governance.batches WHERE status = 'disposed'").fetchone()[0] == 3


def test_certificate_in_register_exports_and_audit(world: World) -> None:
    result = world.dispose(disposal.Target.for_collection("gp_events", BEFORE), authorised_by="Dr Test, CG")
    cert = result.certificate
    assert cert is not None
    assert cert["rows_by_table"]["landing.gp_events"] > 0
    assert cert["rows_by_table"]["landing.gp_events_valid"] == cert["rows_by_table"]["haven.gp_events"] > 0
    # the release's record-level extract was never kept in the store (releases._extract): its files are disposed of
    assert not [t for t in cert["rows_by_table"] if t.startswith("release.")]
    kinds = {f["kind"] for f in cert["files"]}
    assert kinds == {"quarantine", "incoming", "release"}
    assert all(f["sha256"] and f["bytes"] > 0 for f in cert["files"] if f["kind"] != "release" or f["bytes"])
    assert cert["releases"] == [f"{STUDY}-r0001"]
    assert cert["authorised_by"] == "Dr Test, CG" and cert["requested_by"]
    assert cert["store_key_old"] != cert["store_key_new"]
    with open(world.home.registers / "disposal_register.csv", newline="") as fh:
        csv_rows = list(csv.DictReader(fh))
    assert [r["disposal_id"] for r in csv_rows] == [result.disposal_id]
    exported = world.home.registers / "disposal_register.parquet"
    parquet = duckdb.execute(f"SELECT disposal_id, rows_disposed FROM '{exported}'").fetchall()
    assert parquet == [(result.disposal_id, cert["rows_disposed"])]
    with Store(world.home).connect(read_only=True) as con:
        assert [c["disposal_id"] for c in disposal.certificates(con)] == [result.disposal_id]
        entries = audit.entries_for(con, object_like=f"disposal:{result.disposal_id}")
        assert [e.outcome for e in entries] == ["started", "ok"]
        assert audit.verify(con, world.home).ok
    assert leaked_nhs_numbers([world.home.registers], world.old_nhs | world.kept_nhs) == {}


def test_a_copy_named_after_a_patient_is_shredded_and_its_name_withheld_in_the_certificate(world: World) -> None:
    """A sender's copy of a disposed file waiting in incoming/ under a name holding an NHS number
    (as some extract tools name per-patient files) is shredded, and the certificate, its exports
    and the audit trail show its path as a shown name: the number is withheld (CoP 8a, 49)."""
    nhs = sorted(world.old_nhs)[0]
    old_gp = next(
        p for p in (world.home.root.parent / "old" / "gp_events").glob("gp_events_2015*.csv") if "resent" not in p.name
    )
    named = world.home.incoming_for("gp_events") / f"referral {nhs[:3]} {nhs[3:6]} {nhs[6:]}.csv"
    shutil.copy(old_gp, named)
    result = world.dispose(disposal.Target.for_collection("gp_events", BEFORE), authorised_by="Dr Test, CG")
    assert not named.exists()
    paths = [f["path"] for f in result.certificate["files"] if f["kind"] == "incoming"]
    assert f"incoming/gp_events/referral {audit.WITHHELD}.csv" in paths, paths
    assert leaked_nhs_numbers([world.home.registers], {nhs}) == {}
    with Store(world.home).connect(read_only=True) as con:
        stored = json.dumps(disposal.certificates(con), default=str) + json.dumps(
            [e.detail for e in audit.entries_for(con, object_like="disposal:%")], default=str
        )
    assert nhs not in stored and f"{nhs[:3]} {nhs[3:6]} {nhs[6:]}" not in stored


def _named_copy(world: World) -> tuple[str, Path]:
    """A copy of the old GP file waiting in incoming/ under a name holding a disposed NHS number."""
    nhs = sorted(world.old_nhs)[0]
    old_gp = next(
        p for p in (world.home.root.parent / "old" / "gp_events").glob("gp_events_2015*.csv") if "resent" not in p.name
    )
    named = world.home.incoming_for("gp_events") / f"referral {nhs[:3]} {nhs[3:6]} {nhs[6:]}.csv"
    shutil.copy(old_gp, named)
    return nhs, named


def _refused_on(named: Path, real):
    """``real``, except on ``named``, where it fails as the OS does: an OSError naming the raw path."""

    def call(path: Path, *args):
        if Path(path).name == named.name:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args)

    return call


def test_a_copy_the_haven_cannot_read_refuses_the_disposal_naming_it_by_its_shown_name(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file in incoming/ the haven's user cannot read may be a copy the disposal must destroy:
    the disposal is refused before anything changes, and says which file by its shown name, never
    the raw name the OS error carries (CoP 8a, 49: fail closed)."""
    from safehaven.dispose import found

    nhs, named = _named_copy(world)
    monkeypatch.setattr(found, "sha256_file", _refused_on(named, found.sha256_file))
    with pytest.raises(disposal.DisposalError) as refused:
        world.dispose(disposal.Target.for_collection("gp_events", BEFORE), authorised_by="Dr Test, CG")
    message = str(refused.value)
    assert f"incoming/gp_events/referral {audit.WITHHELD}.csv" in message and "PermissionError" in message
    assert nhs[6:] not in message and nhs[:3] + " " not in message
    assert disposal.pending(world.home) is None
    with Store(world.home).connect(read_only=True) as con:
        assert con.execute("SELECT count(*) FROM governance.batches WHERE status = 'disposed'").fetchone()[0] == 0


def test_a_copy_the_haven_cannot_overwrite_holds_the_disposal_by_its_shown_name_until_resumed(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Overwriting a planned copy fails (another account's read-only upload): the disposal stops
    with the file's shown name and stays pending (every other disposal waits for it); once access
    is given, ``resume`` completes it and the copy is gone."""
    from safehaven.dispose import steps

    nhs, named = _named_copy(world)
    real = steps.shred_file
    monkeypatch.setattr(steps, "shred_file", _refused_on(named, real))
    target = disposal.Target.for_collection("gp_events", BEFORE)
    with pytest.raises(disposal.DisposalError) as stopped:
        world.dispose(target, authorised_by="Dr Test, CG")
    assert f"overwrite incoming/gp_events/referral {audit.WITHHELD}.csv" in str(stopped.value)
    assert nhs[6:] not in str(stopped.value)
    assert disposal.pending(world.home) is not None
    monkeypatch.setattr(steps, "shred_file", real)  # access given
    result = disposal.resume(world.context())
    assert result is not None and result.certificate is not None
    assert not named.exists() and disposal.pending(world.home) is None


def test_a_copy_the_haven_could_not_overwrite_and_a_person_removed_is_not_certified_destroyed(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refusal says "or remove it": a copy a person then removes (unlinked, not overwritten) is
    listed as not found at the resume, never certified destroyed; only a file this disposal was
    shredding when it was stopped (killed) counts as its own (CoP 49: the certificate is true)."""
    from safehaven.dispose import steps

    _, named = _named_copy(world)
    monkeypatch.setattr(steps, "shred_file", _refused_on(named, steps.shred_file))
    with pytest.raises(disposal.DisposalError):
        world.dispose(disposal.Target.for_collection("gp_events", BEFORE), authorised_by="Dr Test, CG")
    named.unlink()
    result = disposal.resume(world.context())
    assert result is not None and result.certificate is not None
    assert result.certificate["files_not_found"] == [f"incoming/gp_events/referral {audit.WITHHELD}.csv"]


@pytest.mark.parametrize("point", ["plan", "files"])
def test_an_interrupted_disposal_journals_a_copy_by_its_shown_name_and_hash_and_resume_finds_it(
    world: World, point: str
) -> None:
    """The journal is a plain file that outlives a crash: a copy waiting in incoming/ is planned
    by its shown path and SHA-256 (never its sender's name, which may hold an NHS number), and
    the files step finds it again by its hash (CoP 8a, 49)."""
    nhs, named = _named_copy(world)
    target = disposal.Target.for_collection("gp_events", BEFORE)
    with pytest.raises(disposal.SimulatedCrash):
        world.dispose(target, authorised_by="Dr Test, CG", _crash_after=point)
    journal = disposal.journal_path(world.home).read_text()
    # the number's tail is nowhere but by chance inside a random digest (a SHA-256, a MAC)
    assert nhs[6:] not in re.sub(r"[0-9a-f]{12,}", "", journal)
    assert f"referral {audit.WITHHELD}.csv" in journal
    assert disposal.resume(world.context()).certificate is not None
    assert not named.exists() and leaked_nhs_numbers([world.home.root], {nhs}) == {}


def test_a_copy_changed_after_the_plan_is_listed_as_not_found_not_certified_destroyed(world: World) -> None:
    """A copy waiting in incoming/ is found again by its hash at the files step: one its sender
    changed in between is no longer that copy. It is left (intake judges it as any new file) and
    the certificate lists it as not found, never as destroyed (CoP 49: the certificate is true)."""
    _, named = _named_copy(world)
    target = disposal.Target.for_collection("gp_events", BEFORE)
    with pytest.raises(disposal.SimulatedCrash):
        world.dispose(target, authorised_by="Dr Test, CG", _crash_after="plan")
    named.write_bytes(named.read_bytes() + b"\n")
    cert = disposal.resume(world.context()).certificate
    shown = f"incoming/gp_events/referral {audit.WITHHELD}.csv"
    assert cert["files_not_found"] == [shown]
    assert shown not in {f["path"] for f in cert["files"]} and named.exists()


def test_a_pipe_quarantined_long_ago_is_removed_without_being_read(world: World) -> None:
    """A named pipe sent where a file should be is quarantined as it is; a disposal that reaches
    it removes it without opening it (a read would wait for ever)."""
    import signal

    pipe = world.home.quarantine_for("gp_events") / "gp_pipe.csv"
    os.mkfifo(pipe)
    old = datetime(2015, 4, 2, tzinfo=UTC).timestamp()
    os.utime(pipe, (old, old), follow_symlinks=False)
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("the disposal waited on the pipe"))
    signal.alarm(60)
    try:
        result = world.dispose(disposal.Target.for_collection("gp_events", BEFORE), authorised_by="Dr Test, CG")
    finally:
        signal.alarm(0)
    assert not os.path.lexists(pipe)
    assert {
        "path": "quarantine/gp_events/gp_pipe.csv",
        "kind": "quarantine",
        "bytes": 0,
        "sha256": None,
    } in result.certificate["files"]


def test_a_folder_quarantined_whole_is_disposed_of_whole(world: World) -> None:
    """A folder sent where a file should be is quarantined whole, with the names and records
    inside it; once received before the disposal's date it goes whole: every file in it
    shredded, the folder removed, its inner names shown in the certificate (CoP 49, 8a)."""
    nhs, _ = _named_copy(world)
    (world.home.incoming_for("gp_events") / f"referral {nhs[:3]} {nhs[3:6]} {nhs[6:]}.csv").unlink()
    sent = world.home.incoming_for("gp_events") / "batch 7"
    sent.mkdir()
    old_gp = next(
        p for p in (world.home.root.parent / "old" / "gp_events").glob("gp_events_2015*.csv") if "resent" not in p.name
    )
    shutil.copy(old_gp, sent / f"referral {nhs}.csv")
    process(world.home, world.registry)
    held = world.home.quarantine_for("gp_events") / "batch 7"
    assert (held / f"referral {nhs}.csv").exists()
    reason = held.with_name("batch 7.reason.json")
    data = json.loads(reason.read_text())
    reason.write_text(json.dumps({**data, "quarantined_at": "2015-04-02T09:00:00+00:00"}))
    result = world.dispose(disposal.Target.for_collection("gp_events", BEFORE), authorised_by="Dr Test, CG")
    assert not held.exists() and not reason.exists()
    paths = {f["path"] for f in result.certificate["files"]}
    assert f"quarantine/gp_events/batch 7/referral {audit.WITHHELD}.csv" in paths
    assert leaked_nhs_numbers([world.home.root], {nhs}) == {}


def test_disposal_is_idempotent(world: World) -> None:
    first = _dispose_old(world)
    again = _dispose_old(world)
    assert [r.status for r in again] == ["nothing_to_dispose"] * 3
    with Store(world.home).connect(read_only=True) as con:
        assert len(disposal.certificates(con)) == len(first) == 3


CRASH_POINTS = ["plan", "keys", "rows", "files", "rebuild:build", "rebuild:journal", "rebuild", "record"]


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_a_crash_between_steps_leaves_a_state_the_next_run_completes(world: World, point: str) -> None:
    """Each crash stops after a step's action and before its journal entry (the harshest moment)."""
    target = disposal.Target.for_collection("gp_events", BEFORE)
    old_store = world.keyring.get("store").key_id
    planned = disposal.make_plan(world.context(), target)
    with pytest.raises(disposal.SimulatedCrash):
        world.dispose(target, _crash_after=point)
    assert disposal.pending(world.home) is not None
    with Store(world.home).connect(read_only=True) as con:  # the store always opens: never half-rebuilt
        assert con.execute("SELECT count(*) FROM haven.gp_events WHERE _batch IN (" + KEPT + ")").fetchone()[0] > 0
    with pytest.raises(disposal.DisposalPending):
        world.dispose(disposal.Target.for_collection("social_care", BEFORE))
    result = world.dispose(target)  # the same request again resumes it
    assert result.status == "disposed" and result.resumed
    assert disposal.pending(world.home) is None
    assert world.keyring.get("store").key_id != old_store
    assert not [p for p in world.home.keys.iterdir() if p.name.startswith(".store-retired")]
    assert not list(world.home.quarantine_for("gp_events").iterdir())
    assert not (world.home.releases / STUDY).exists() or not any((world.home.releases / STUDY).iterdir())
    cert = result.certificate
    assert cert is not None and cert["rows_by_table"]["landing.gp_events"] > 0
    assert cert["files_destroyed"] == len(planned.files) == 5  # quarantined file + reason, resent copy, release x2
    assert cert["batches"] == planned.batches
    with Store(world.home).connect(read_only=True) as con:
        assert len(disposal.certificates(con)) == 1
        assert (
            con.execute("SELECT count(*) FROM landing.gp_events WHERE _batch NOT IN (" + KEPT + ")").fetchone()[0] == 0
        )
        assert audit.verify(con, world.home).ok
    assert world.dispose(target).status == "nothing_to_dispose"


def test_crash_after_the_agreement_key_is_destroyed_is_completed_by_resume(world: World) -> None:
    suspend(STUDY, "breach of the data sharing agreement", "SIRO", root=world.registry.root)
    with pytest.raises(disposal.SimulatedCrash):
        world.dispose(disposal.Target.for_agreement(STUDY), _crash_after="keys")
    assert not world.keyring.exists(f"agreement-{STUDY}")
    result = disposal.resume(world.context())
    assert result is not None and result.status == "disposed"
    assert any(k["kind"] == "agreement_pseudonym_salt" for k in result.certificate["keys_destroyed"])
    assert not (world.home.releases / STUDY).exists()


# --- what is due --------------------------------------------------------------------------------


def test_due_finds_retention_expiry_and_suspension_for_breach(world: World) -> None:
    items = disposal.due(world.context())
    collections = {i.target.collection for i in items if i.action == "dispose" and i.target.kind == "collection"}
    assert collections == set(CONTENT), "2015 receipts are past the contracts' seven years"
    assert all(i.target.before == haven_today() - timedelta(days=2557) for i in items if i.target.kind == "collection")
    assert not [i for i in items if i.target.kind == "agreement"]  # in force, release is new
    later = haven_today() + timedelta(days=400)
    releases = [i for i in disposal.due(world.context(later)) if i.target.kind == "agreement"]
    assert [(i.action, i.target.releases) for i in releases] == [("dispose", (f"{STUDY}-r0001",))]
    suspend(STUDY, "pending an audit of the recipient", "SIRO", root=world.registry.root)
    review = [i for i in disposal.due(world.context()) if i.target.kind == "agreement"]
    assert [i.action for i in review] == ["review"]
    path = world.registry.root / "agreements" / f"{STUDY}.yaml"
    path.write_text(
        path.read_text()
        .replace("end_date: '2099-12-31'", "end_date: '2025-06-30'")
        .replace("status: suspended", "status: approved")
    )
    expired = [i for i in disposal.due(world.context()) if i.target.kind == "agreement"]
    assert [i.action for i in expired] == ["dispose"] and "expired" in expired[0].reason


def test_a_breach_only_in_the_breach_register_lists_a_suspended_agreement_for_review_not_disposal(
    world: World,
) -> None:
    """The breach register is in the store, not on the audit trail: a row naming the agreement
    (added with the store key alone) never destroys its data, but the review item names it."""
    from safehaven.core import registers

    suspend(STUDY, "pending an audit of the recipient", "SIRO", root=world.registry.root)
    with Store(world.home).connect() as con:
        breach = registers.record_breach(
            con, kind="onward_sharing", severity=2, what="recipient shared the extract",
            remedial_action="suspend", detail={"agreement": STUDY},
        )  # fmt: skip
    [item] = [i for i in disposal.due(world.context()) if i.target.kind == "agreement"]
    assert item.action == "review"
    assert f"breach {breach} (onward_sharing) in the breach register names it" in item.reason
    assert "record the suspension again with a reason naming the breach" in item.reason


def test_sweep_disposes_of_what_is_due_and_leaves_reviews(world: World) -> None:
    report = disposal.sweep(world.context())
    assert sorted(r.target.collection for r in report.results) == sorted(CONTENT)
    assert report.failed == [] and world.leaks() == {}
    assert disposal.due(world.context()) == []


def test_release_past_retention_goes_but_the_agreement_key_stays(world: World) -> None:
    rid = f"{STUDY}-r0001"
    result = world.dispose(disposal.Target.for_agreement(STUDY, [rid]))
    assert result.status == "disposed"
    assert not (world.home.releases / STUDY / rid).exists()
    assert world.keyring.exists(f"agreement-{STUDY}")
    assert [k["kind"] for k in result.certificate["keys_destroyed"]] == ["store"]


def test_objections_are_not_disposed_of_by_date(world: World) -> None:
    with pytest.raises(disposal.DisposalError, match="objections"):
        world.dispose(disposal.Target.for_collection("objections", BEFORE))


def test_needs_the_vault_key_when_a_kept_person_has_another_disposed_value(world: World) -> None:
    """The mover's old postcode and date of birth can only be told from the kept ones by decrypting;
    the pipeline host (no vault private key) is refused before anything changes. A disposal with no
    such value (the GP records) needs no vault key."""
    world.keyring.path("vault").rename(world.home.root.parent / "vault.key.elsewhere")
    with pytest.raises(disposal.DisposalError, match="governance lead"):
        world.dispose(disposal.Target.for_collection("hospital_episodes", BEFORE))
    assert disposal.pending(world.home) is None  # refused before anything changed
    with Store(world.home).connect(read_only=True) as con:
        assert not disposal.certificates(con)
    assert world.dispose(disposal.Target.for_collection("gp_events", BEFORE)).status == "disposed"


# --- release requests still staged -------------------------------------------------------------


def _stage(world: World, approvals: int = 0) -> review.Request:
    """A new request under the study, staged and not delivered (the kept GP data changed since r0001),
    approved by ``approvals`` of the two reviewers it needs."""
    with Store(world.home).connect() as con:
        con.execute(
            "DELETE FROM haven.gp_events WHERE rowid IN "
            f"(SELECT rowid FROM haven.gp_events WHERE _batch IN ({KEPT}) ORDER BY rowid LIMIT 30)"
        )
        result = prepare(con, STUDY, haven=world.context())
        assert result.status == "prepared", result.reason
        for by in REVIEWERS[:approvals]:
            approve_as(con, result.release_id, by, home=world.home, registry=world.context().contracts)
        req = review.get(con, result.release_id)
    assert any(req.staging_dir.iterdir())
    return req


def _withdrawn_by(world: World, release_id: str) -> tuple[review.Request, list[audit.Entry], int]:
    """The request as stored, its ``review.withdraw`` audit entries and the members still kept for it."""
    with Store(world.home).connect() as con:
        req = review.get(con, release_id)
        trail = audit.entries_for(con, object_like=f"release-request:{release_id}")
        members = con.execute(f"SELECT count(*) FROM {review.REQUEST_MEMBERS} WHERE release_id = ?",
                              [release_id]).fetchone()[0]  # fmt: skip
    return req, [e for e in trail if e.action == "review.withdraw"], members


def test_disposing_of_a_collection_shreds_and_withdraws_the_requests_still_staged_with_it(world: World) -> None:
    """A request prepared from the disposed records, approved by one reviewer, is still staged: its
    files are shredded (overwritten, not only unlinked), it is withdrawn, audited and certified."""
    req = _stage(world, approvals=1)
    assert req.state == review.APPROVED_BY_ONE
    staged = sorted(p for p in req.staging_dir.iterdir() if p.suffix == ".parquet")
    alias = world.home.root.parent / "alias.parquet"  # outside the home: a view of the same bytes
    alias.hardlink_to(staged[0])
    before = alias.read_bytes()
    target = disposal.Target.for_collection("gp_events", BEFORE)
    plan = disposal.make_plan(world.context(), target)
    assert plan.summary()["staged_requests"] == [req.release_id]
    assert {f["path"] for f in plan.files if f["kind"] == "staged"} == {
        str(p.relative_to(world.home.root)) for p in req.staging_dir.iterdir()
    }

    result = world.dispose(target)

    assert not req.staging_dir.exists() and alias.read_bytes() != before
    cert = result.certificate
    assert cert["staged_requests"] == cert["staged_requests_withdrawn"] == [req.release_id]
    assert result.as_metadata()["staged_requests_withdrawn"] == 1
    staged_files = [f for f in cert["files"] if f["kind"] == "staged"]
    assert len(staged_files) == len(staged) + 1 and cert["files_destroyed"] == len(cert["files"])  # + manifest
    stored, withdrawals, members = _withdrawn_by(world, req.release_id)
    assert stored.state == review.WITHDRAWN and stored.comment == f"disposed: {result.disposal_id}"
    assert [(e.actor, e.detail_value["disposal_id"]) for e in withdrawals] == [
        (cert["requested_by"], result.disposal_id)
    ]
    assert members == 0


def test_disposing_of_a_collection_shreds_the_files_a_stopped_delivery_of_a_staged_request_left_in_releases(
    world: World,
) -> None:
    """A delivery killed after its files moved into ``releases/`` and before its register row
    leaves them there, neither registered nor delivered. Withdrawn by a person, the request's
    withdrawal shreds them; withdrawn by a disposal of the collection, they were left in
    ``releases/`` for the recipient, unrecorded (found by review). The disposal now plans,
    shreds and certifies them with the request's staged files."""
    req = _stage(world, approvals=1)
    with Store(world.home).connect() as con:
        registry = world.context().contracts
        delivery_stopped(lambda: approve_as(con, req.release_id, REVIEWERS[1], home=world.home, registry=registry))
        assert review.get(con, req.release_id).state == review.APPROVED
    moved = world.home.releases / STUDY / req.release_id
    left = sorted(p for p in moved.iterdir() if p.is_file())
    assert left and not req.staging_dir.exists()

    target = disposal.Target.for_collection("gp_events", BEFORE)
    plan = disposal.make_plan(world.context(), target)
    assert plan.summary()["staged_requests"] == [req.release_id]
    result = world.dispose(target)

    assert not moved.exists()
    cert = result.certificate
    assert cert["staged_requests_withdrawn"] == [req.release_id]
    certified = {f["path"] for f in cert["files"] if f["kind"] == "staged"}
    assert {str(p.relative_to(world.home.root)) for p in left} <= certified
    assert _withdrawn_by(world, req.release_id)[0].state == review.WITHDRAWN


def test_disposing_of_an_agreement_shreds_and_withdraws_its_staged_requests_and_a_dry_run_lists_them(
    world: World,
) -> None:
    from click.testing import CliRunner

    from safehaven.cli.main import main

    req = _stage(world)
    suspend(STUDY, "recipient breached the onward sharing terms", "SIRO", root=world.registry.root)
    dry = CliRunner().invoke(main, ["dispose", "--agreement", STUDY, "--dry-run", "--json"])
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.output)["staged_requests"] == [req.release_id] and any(req.staging_dir.iterdir())

    result = world.dispose(disposal.Target.for_agreement(STUDY), authorised_by="Dr Test, Caldicott Guardian")

    assert result.certificate["staged_requests_withdrawn"] == [req.release_id]
    assert not req.staging_dir.exists() and not (world.home.releases / STUDY).exists()
    stored, withdrawals, _ = _withdrawn_by(world, req.release_id)
    assert stored.state == review.WITHDRAWN and len(withdrawals) == 1
    assert world.dispose(disposal.Target.for_agreement(STUDY)).status == "nothing_to_dispose"


def test_a_crash_after_staged_requests_are_withdrawn_still_certifies_them(world: World) -> None:
    req = _stage(world)
    target = disposal.Target.for_collection("gp_events", BEFORE)
    with pytest.raises(disposal.SimulatedCrash):
        world.dispose(target, _crash_after="rows")
    result = world.dispose(target)
    assert result.resumed and result.certificate["staged_requests_withdrawn"] == [req.release_id]
    assert not req.staging_dir.exists()
    assert len(_withdrawn_by(world, req.release_id)[1]) == 1  # withdrawn once, however often the step ran


def test_a_staged_request_an_interrupted_disposal_withdraws_is_not_delivered_meanwhile(world: World) -> None:
    """A disposal interrupted before its rows step plans to withdraw a staged request: approved and
    delivered meanwhile, the disposed records stayed in releases/ and the resume certified nothing
    for it (found by review). Delivery is refused while the plan names it; the resume withdraws it
    and shreds its files."""
    req = _stage(world, approvals=1)
    target = disposal.Target.for_collection("gp_events", BEFORE)
    with pytest.raises(disposal.SimulatedCrash):
        world.dispose(target, _crash_after="keys")
    with Store(world.home).connect() as con:
        with pytest.raises(review.ReviewError, match="withdraws .* its data is being disposed of"):
            approve_as(con, req.release_id, REVIEWERS[1], home=world.home, registry=world.context().contracts)
    assert not (world.home.releases / STUDY / req.release_id).exists()
    result = world.dispose(target)
    assert result.resumed and result.certificate["staged_requests_withdrawn"] == [req.release_id]
    assert not req.staging_dir.exists()


# --- a link, or a file, in place of a folder the haven wrote (CoP 49: fail closed) -------------


RELEASE = f"{STUDY}-r0001"
STAND_INS = ("symbolic link", "dangling link", "file")


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _moved_out(world: World, folder: Path, stand_in: str) -> Path:
    """An insider's move: ``folder``'s files taken out of the home, ``stand_in`` left in its place."""
    outside = world.home.root.parent / "insider" / folder.name
    outside.parent.mkdir(exist_ok=True)
    shutil.move(folder, outside)
    if stand_in == "file":
        folder.write_text("nothing to see\n")
    else:
        folder.symlink_to(outside if stand_in == "symbolic link" else outside.with_name("gone"))
    return outside


def _put_back(folder: Path, outside: Path) -> None:
    folder.unlink()
    shutil.move(outside, folder)


def _refused(world: World, target: disposal.Target, shown: str, what: str) -> str:
    with pytest.raises(disposal.DisposalError) as refused:
        world.dispose(target, authorised_by="Dr Test, CG")
    message = str(refused.value)
    assert f"{shown} is {what}, not what the haven wrote there" in message and "run the disposal again" in message
    assert disposal.pending(world.home) is None
    with Store(world.home).connect(read_only=True) as con:
        assert not disposal.certificates(con)
    return message


@pytest.mark.parametrize("stand_in", STAND_INS)
def test_a_release_folder_replaced_by_a_link_or_a_file_refuses_its_disposal_until_put_back(
    world: World, stand_in: str
) -> None:
    """A release's files moved out of the home and a link (or a file) left in place of its folder:
    the disposal planned nothing there and certified the release destroyed while its files
    survived. It is refused, naming the folder, at every run; the link is never followed; once a
    person puts the folder back, the disposal destroys and certifies its files."""
    folder = world.home.releases / STUDY / RELEASE
    held = _files(folder)
    outside = _moved_out(world, folder, stand_in)
    target = disposal.Target.for_agreement(STUDY, [RELEASE])
    what = "a file" if stand_in == "file" else "a symbolic link"
    for _ in range(2):  # and again at the next run
        _refused(world, target, f"releases/{STUDY}/{RELEASE}", what)
        assert _files(outside) == held, "the files the link points to are not touched"
    _put_back(folder, outside)
    result = world.dispose(target)
    assert result.status == "disposed" and not folder.exists()
    certified = {f["path"] for f in result.certificate["files"]}
    assert {f"releases/{STUDY}/{RELEASE}/{name}" for name in held} <= certified


def test_a_link_in_place_of_a_release_folder_is_refused_on_the_command_line_and_by_each_sweep(
    world: World,
) -> None:
    """The command line says why, without a traceback; the daily sweep reports the disposal of the
    collection the release was made from as failed, with the reason, and disposes of the rest."""
    from click.testing import CliRunner

    from safehaven.cli.main import main

    folder = world.home.releases / STUDY / RELEASE
    outside = _moved_out(world, folder, "symbolic link")
    cli = CliRunner().invoke(main, ["dispose", "--agreement", STUDY, "--release", RELEASE, "--yes"])
    assert cli.exit_code == 1 and f"releases/{STUDY}/{RELEASE} is a symbolic link" in cli.output
    assert "Traceback" not in cli.output
    for run in range(2):
        report = disposal.sweep(world.context())
        assert [f["target"].split(":")[0] for f in report.failed] == ["collection gp_events"]
        assert f"releases/{STUDY}/{RELEASE} is a symbolic link" in report.failed[0]["error"]
        if run == 0:
            assert sorted(r.target.collection for r in report.results) == ["hospital_episodes", "social_care"]
    assert folder.is_symlink() and _files(outside)
    _put_back(folder, outside)
    report = disposal.sweep(world.context())
    assert report.failed == [] and [r.target.collection for r in report.results] == ["gp_events"]
    assert not folder.exists()


def test_a_link_inside_a_release_folder_or_in_place_of_one_under_its_agreement_is_refused(world: World) -> None:
    """A file of a release moved out and linked back is refused as its folder is; so is a release
    folder linked back when the whole agreement is disposed of (its folder walked, never followed)."""
    folder = world.home.releases / STUDY / RELEASE
    data = next(p for p in sorted(folder.iterdir()) if p.suffix == ".parquet")
    outside = world.home.root.parent / data.name
    shutil.move(data, outside)
    data.symlink_to(outside)
    _refused(world, disposal.Target.for_agreement(STUDY, [RELEASE]), f"releases/{STUDY}/{RELEASE}/{data.name}",
             "a symbolic link")  # fmt: skip
    data.unlink()
    shutil.move(outside, data)
    suspend(STUDY, "recipient breached the onward sharing terms", "SIRO", root=world.registry.root)
    outside = _moved_out(world, folder, "symbolic link")
    _refused(world, disposal.Target.for_agreement(STUDY), f"releases/{STUDY}/{RELEASE}", "a symbolic link")
    assert _files(outside) and world.keyring.exists(f"agreement-{STUDY}")


def test_a_link_in_place_of_the_folder_a_stopped_delivery_left_refuses_the_disposal(world: World) -> None:
    """A delivery killed after its files moved into ``releases/`` left them there, neither
    registered nor delivered; the disposal of the collection shreds them with the request's staged
    files. Moved out and linked back, they are refused as a release's are."""
    req = _stage(world, approvals=1)
    with Store(world.home).connect() as con:
        registry = world.context().contracts
        delivery_stopped(lambda: approve_as(con, req.release_id, REVIEWERS[1], home=world.home, registry=registry))
    folder = world.home.releases / STUDY / req.release_id
    held = _files(folder)
    outside = _moved_out(world, folder, "symbolic link")
    target = disposal.Target.for_collection("gp_events", BEFORE)
    for _ in range(2):
        _refused(world, target, f"releases/{STUDY}/{req.release_id}", "a symbolic link")
    assert _files(outside) == held
    _put_back(folder, outside)
    result = world.dispose(target)
    assert not folder.exists() and result.certificate["staged_requests_withdrawn"] == [req.release_id]
    assert {f"releases/{STUDY}/{req.release_id}/{n}" for n in held} <= {f["path"] for f in result.certificate["files"]}


@pytest.mark.parametrize("stand_in", STAND_INS)
def test_a_link_or_a_file_in_place_of_the_agreement_folder_refuses_the_disposal_of_one_of_its_releases(
    world: World, stand_in: str
) -> None:
    """The agreement's folder moved out and linked back: disposing of one of its releases walked
    through the link and shredded the files where it pointed; with a dangling link or a file there,
    the release's folder was "not there" and certified destroyed while its files survived. Each is
    refused, naming the agreement's folder, and nothing outside is touched (found by review)."""
    folder = world.home.releases / STUDY
    held = _files(folder)
    outside = _moved_out(world, folder, stand_in)
    what = "a file" if stand_in == "file" else "a symbolic link"
    for target in (
        disposal.Target.for_agreement(STUDY, [RELEASE]),
        disposal.Target.for_collection("gp_events", BEFORE),
    ):
        _refused(world, target, f"releases/{STUDY}", what)
        assert _files(outside) == held
    _put_back(folder, outside)
    assert world.dispose(disposal.Target.for_agreement(STUDY, [RELEASE])).status == "disposed"
    assert not (folder / RELEASE).exists()


def test_a_release_past_its_retention_whose_folder_is_a_dangling_link_is_due_and_refused_by_the_sweep(
    world: World,
) -> None:
    """Only the agreement's retention reaches the release (its collections' are longer). A dangling
    link in place of its folder made it "not held", so the sweep skipped it in silence; it is due,
    and the sweep reports its disposal refused (found by review)."""
    for contract in world.registry.contracts.values():
        if contract.retention_days:
            object.__setattr__(contract, "retention_days", 100_000)
    later = world.context().today + timedelta(days=800)
    due = [i.target.describe() for i in disposal.due(world.context(today=later)) if i.action == "dispose"]
    assert any(RELEASE in d for d in due)
    _moved_out(world, world.home.releases / STUDY / RELEASE, "dangling link")
    report = disposal.sweep(world.context(today=later))
    assert [f for f in report.failed if f"releases/{STUDY}/{RELEASE} is a symbolic link" in f["error"]]


def test_a_release_subfolder_that_cannot_be_listed_refuses_the_disposal(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder inside a release that cannot be listed (its permissions changed) may hold copies:
    ``os.walk`` alone skipped it and the disposal certified the release without them. Refused,
    saying what to do (tests run as root, whom permissions do not stop: the listing is made to fail)."""
    folder = world.home.releases / STUDY / RELEASE
    hidden = folder / "extra"
    hidden.mkdir()
    (hidden / "copy.csv").write_text("9990000000\n")
    listing = os.scandir

    def scandir(path: object = ".") -> object:
        if Path(os.fsdecode(path)) == hidden:
            raise PermissionError(13, "Permission denied", os.fsdecode(path))
        return listing(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(disposal.DisposalError, match=f"cannot list releases/{STUDY}/{RELEASE}/extra"):
        world.dispose(disposal.Target.for_agreement(STUDY, [RELEASE]), authorised_by="Dr Test, CG")
    assert (hidden / "copy.csv").exists() and disposal.pending(world.home) is None


def _refused_at_files_step(world: World, run: object, shown: str, what: str) -> None:
    """``run`` (a disposal carrying out its plan) refuses at the files step, naming ``shown``; the
    journal is kept, so a resume carries on once the files are back; the refusal is audited, with
    the steps done and the reason (the governance lead sees on the trail why it waits)."""
    with pytest.raises(disposal.DisposalError, match=f"{re.escape(shown)} {what}") as refused:
        run()  # type: ignore[operator]
    assert disposal.pending(world.home) is not None
    with Store(world.home).connect(read_only=True) as con:
        assert not disposal.certificates(con)
        entry = audit.entries_for(con, object_like="disposal:%")[-1]
    assert (entry.action, entry.outcome) == (disposal_model.ACTION, disposal_model.REFUSED)
    assert entry.detail_value["reason"] == str(refused.value) and "rows" in entry.detail_value["steps_done"]


@pytest.mark.parametrize("stand_in", STAND_INS)
def test_a_release_folder_replaced_after_the_plan_was_confirmed_is_refused_at_every_resume_until_put_back(
    world: World, stand_in: str
) -> None:
    """The command line plans, shows the plan, asks, then carries out that plan: a release folder
    moved out and a link (or a file) left in its place in between was certified destroyed (a live
    link walked through: the files where it pointed shredded). The files step refuses, naming it,
    at every resume, touching nothing outside; once put back, the resume destroys and certifies
    the files (CoP 49; found by review)."""
    target = disposal.Target.for_agreement(STUDY, [RELEASE])
    plan = disposal.make_plan(world.context(), target, authorised_by="Dr Test, CG")
    folder = world.home.releases / STUDY / RELEASE
    held = _files(folder)
    outside = _moved_out(world, folder, stand_in)
    what = "is a file" if stand_in == "file" else "is a symbolic link"
    shown = f"releases/{STUDY}/{RELEASE}"
    _refused_at_files_step(world, lambda: world.dispose(target, authorised_by="Dr Test, CG", plan=plan), shown, what)
    for _ in range(2):
        _refused_at_files_step(world, lambda: disposal.resume(world.context()), shown, what)
        assert _files(outside) == held and (folder.is_symlink() or folder.is_file())
    _put_back(folder, outside)
    result = disposal.resume(world.context())
    assert result is not None and result.status == "disposed" and not folder.exists()
    assert {f"{shown}/{name}" for name in held} <= {f["path"] for f in result.certificate["files"]}


def test_a_file_of_a_release_replaced_by_a_link_after_the_plan_is_refused_not_unlinked(world: World) -> None:
    """A planned file moved out and linked back after the plan was unlinked and certified with its
    old hash while it survived outside: refused, naming it, the link and the file left as they are."""
    target = disposal.Target.for_agreement(STUDY, [RELEASE])
    plan = disposal.make_plan(world.context(), target, authorised_by="Dr Test, CG")
    data = next(p for p in sorted((world.home.releases / STUDY / RELEASE).iterdir()) if p.suffix == ".parquet")
    outside = world.home.root.parent / data.name
    shutil.move(data, outside)
    data.symlink_to(outside)
    shown = f"releases/{STUDY}/{RELEASE}/{data.name}"
    run = lambda: world.dispose(target, authorised_by="Dr Test, CG", plan=plan)  # noqa: E731
    _refused_at_files_step(world, run, shown, "is a symbolic link")
    assert data.is_symlink() and outside.is_file()


def test_a_release_folder_gone_before_a_resume_is_listed_not_found_and_recorded_as_a_breach(world: World) -> None:
    """A planned release file gone before the files step (its folder moved out, no link left) was
    certified destroyed; refusing it wedged the disposal for ever, every later one waiting behind
    it (found by review). The disposal completes, its certificate lists the files as not found,
    never as destroyed (CoP 49: the certificate is true), and, as nothing in the haven but a
    disposal shreds a release's files, their loss is a breach, recorded once with the files'
    names (however often the step is resumed) and audited."""
    target = disposal.Target.for_agreement(STUDY, [RELEASE])
    with pytest.raises(disposal.SimulatedCrash):
        world.dispose(target, authorised_by="Dr Test, CG", _crash_after="rows")
    folder = world.home.releases / STUDY / RELEASE
    outside = world.home.root.parent / "insider"
    shutil.move(folder, outside)
    gone = {f"releases/{STUDY}/{RELEASE}/{name}" for name in _files(outside)}
    with pytest.raises(disposal.SimulatedCrash):
        disposal.resume(world.context(), _crash_after="files")
    result = disposal.resume(world.context())
    assert result is not None and result.status == "disposed"
    assert gone <= set(result.certificate["files_not_found"])
    assert not gone & {f["path"] for f in result.certificate["files"]}
    with Store(world.home).connect(read_only=True) as con:
        [breach] = [b for b in reg.breaches(con) if b["kind"] == reg.DISPOSAL_FILE_UNACCOUNTED]
        [entry] = [e for e in audit.entries_for(con) if e.action == disposal_steps.UNACCOUNTED_ACTION]
    assert result.certificate["files_unaccounted_breach_id"] == breach["breach_id"] == entry.detail_value["breach_id"]
    assert set(json.loads(breach["detail"])["files"]) == gone and result.disposal_id in breach["what"]


def test_staged_files_a_rejection_shredded_after_the_plan_are_not_found_and_no_breach(world: World) -> None:
    """A staged request rejected by a reviewer between the plan and the files step: the rejection
    shredded its files (CoP 27b), so the disposal lists them as not found and records no breach;
    the request stays rejected, not withdrawn by the disposal."""
    req = _stage(world)
    suspend(STUDY, "recipient breached the onward sharing terms", "SIRO", root=world.registry.root)
    target = disposal.Target.for_agreement(STUDY)
    plan = disposal.make_plan(world.context(), target, authorised_by="Dr Test, CG")
    staged = {str(p.relative_to(world.home.root)) for p in req.staging_dir.rglob("*") if p.is_file()}
    assert staged and staged <= {f["path"] for f in plan.files}
    with Store(world.home).connect() as con:
        review.reject(con, req.release_id, "Rita Reviewer, Output checker", "the cohort is too small")
    result = world.dispose(target, authorised_by="Dr Test, CG", plan=plan)
    assert staged <= set(result.certificate["files_not_found"])
    assert result.certificate["files_unaccounted_breach_id"] is None
    with Store(world.home).connect(read_only=True) as con:
        assert not [b for b in reg.breaches(con) if b["kind"] == reg.DISPOSAL_FILE_UNACCOUNTED]
        assert review.get(con, req.release_id).state == review.REJECTED


def test_a_crash_after_a_files_unlink_and_before_its_journal_resumes_to_the_end(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after a planned file's unlink and before the journal recorded it, then again later in
    the same files step: every resume completes (a planned file gone is listed, not refused; with
    the refusal two ordinary crashes wedged the disposal for ever: found by review)."""
    target = disposal.Target.for_agreement(STUDY, [RELEASE])
    real = disposal_steps.shred_file

    def crash_after_unlink(path: Path) -> int:
        real(path)
        monkeypatch.setattr(disposal_steps, "shred_file", real)
        raise disposal.SimulatedCrash("crash after the unlink, before the journal")

    monkeypatch.setattr(disposal_steps, "shred_file", crash_after_unlink)
    with pytest.raises(disposal.SimulatedCrash):
        world.dispose(target, authorised_by="Dr Test, CG")
    with pytest.raises(disposal.SimulatedCrash):
        disposal.resume(world.context(), _crash_after="files")
    result = disposal.resume(world.context())
    assert result is not None and result.status == "disposed"
    assert not (world.home.releases / STUDY / RELEASE).exists()
    # the journal names the file it was shredding before the unlink: destroyed, not "not found"
    assert result.certificate["files_not_found"] == [] and result.certificate["files_unaccounted_breach_id"] is None


def test_a_quarantined_folder_linked_out_after_the_plan_refuses_the_disposal(world: World) -> None:
    """A quarantined folder planned by its path, moved out and linked back after the plan, was
    skipped in silence and the disposal completed (found by review): refused, nothing outside
    touched."""
    quarantine = world.home.quarantine_for("gp_events")
    folder = quarantine / "batch 7"  # a folder received and set aside whole, long ago
    folder.mkdir(parents=True)
    (folder / "inner.csv").write_text("nhs_number\n9990000018\n")
    os.utime(folder, (1428000000, 1428000000))
    (quarantine / "batch 7.reason.json").write_text(json.dumps({"quarantined_at": "2015-04-02T09:00:00+00:00"}))
    target = disposal.Target.for_collection("gp_events", BEFORE)
    plan = disposal.make_plan(world.context(), target, authorised_by="Dr Test, CG")
    assert "quarantine/gp_events/batch 7" in plan.dirs
    outside = _moved_out(world, folder, "symbolic link")
    with pytest.raises(disposal.DisposalError, match="is a symbolic link"):
        world.dispose(target, authorised_by="Dr Test, CG", plan=plan)
    assert _files(outside)


@pytest.mark.parametrize("area", ["quarantine", "incoming"])
@pytest.mark.parametrize("when", ["before the plan", "after the plan"])
def test_a_link_in_place_of_a_collections_quarantine_or_incoming_folder_refuses_its_disposal(
    world: World, area: str, when: str
) -> None:
    """``quarantine/<collection>`` (or ``incoming/<collection>``) moved out and linked back: the
    disposal walked through the link and shredded the files where it pointed, outside the home.
    Refused, naming it, before or after the plan; nothing outside touched (CoP 49; found by review)."""
    folder = getattr(world.home, f"{area}_for")("gp_events")
    folder.mkdir(parents=True, exist_ok=True)
    target = disposal.Target.for_collection("gp_events", BEFORE)
    plan = disposal.make_plan(world.context(), target, authorised_by="Dr Test, CG")
    held = _files(folder)
    outside = _moved_out(world, folder, "symbolic link")
    if when == "before the plan":
        _refused(world, target, f"{area}/gp_events", "a symbolic link")
    else:
        run = lambda: world.dispose(target, authorised_by="Dr Test, CG", plan=plan)  # noqa: E731
        _refused_at_files_step(world, run, f"{area}/gp_events", "is a symbolic link")
    assert _files(outside) == held
    assert held or area == "incoming", "the world quarantines some of gp_events"


def test_a_pipe_left_in_a_release_after_the_plan_is_removed_and_certified(world: World) -> None:
    """A pipe (or other special file) put in a release folder after the plan stopped the removal
    of the folder and the disposal was refused as if the folder could not be written: it is
    removed, never opened, and listed in the certificate as found after the plan (found by review)."""
    target = disposal.Target.for_agreement(STUDY, [RELEASE])
    plan = disposal.make_plan(world.context(), target, authorised_by="Dr Test, CG")
    folder = world.home.releases / STUDY / RELEASE
    os.mkfifo(folder / "pipe")
    result = world.dispose(target, authorised_by="Dr Test, CG", plan=plan)
    assert result.status == "disposed" and not folder.exists()
    assert f"releases/{STUDY}/{RELEASE}/pipe" in {f["path"] for f in result.certificate["files"]}


def test_shred_overwrites_before_unlinking(tmp_path: Path) -> None:
    path = tmp_path / "f.csv"
    path.write_bytes(b"9990000000,ZZ9 9ZZ\n" * 100)
    alias = tmp_path / "hardlink"
    alias.hardlink_to(path)
    assert disposal.shred_file(path) == 1900
    assert not path.exists() and b"ZZ9" not in alias.read_bytes()
    target = tmp_path / "outside.txt"
    target.write_text("keep me")
    link = tmp_path / "link"
    link.symlink_to(target)
    disposal.shred_file(link)
    assert target.read_text() == "keep me"


def test_command_line(world: World) -> None:
    from click.testing import CliRunner

    from safehaven.cli.main import main

    runner = CliRunner()
    due = runner.invoke(main, ["dispose", "--due", "--json"])
    assert due.exit_code == 0 and len(json.loads(due.output)) == 3
    dry = runner.invoke(main, ["dispose", "--collection", "gp_events", "--before", "2016-01-01", "--dry-run"])
    assert dry.exit_code == 0 and "batches" in dry.output
    assert world.leaks(), "a dry run changes nothing"
    assert runner.invoke(main, ["dispose", "--collection", "gp_events"]).exit_code == 2
    no = runner.invoke(main, ["dispose", "--collection", "gp_events", "--before", "2016-01-01"], input="n\n")
    assert no.exit_code == 1
    done = runner.invoke(
        main,
        [
            "dispose",
            "--collection",
            "gp_events",
            "--before",
            "2016-01-01",
            "--yes",
            "--by",
            "Dr Test, Caldicott Guardian",
            "--json",
        ],
    )
    assert done.exit_code == 0, done.output
    assert json.loads(done.output)["status"] == "disposed"
    assert not re.search(r"999\d{7}", done.output + dry.output + due.output)
    assert runner.invoke(main, ["dispose", "--resume"]).output.strip() == "no interrupted disposal"
    refused = runner.invoke(main, ["dispose", "--agreement", STUDY, "--yes"])
    assert refused.exit_code == 1 and "in force" in refused.output


def test_a_registration_still_shown_by_another_gp_collection_survives_a_disposal() -> None:
    """The objection monitor's list sizes after disposing of one GP collection's batch: a person
    whose (practice, pid) pair another collection with a practice field still shows keeps it,
    one shown only by the disposed records loses it (equal to a full recount)."""
    from safehaven.dispose.steps import _registrations
    from safehaven.protect.objections import REGISTRATIONS, register_practices
    from safehaven.protect.objections import ensure_tables as ensure_objection_tables

    gp = ContractRegistry().contracts["gp_events"]
    gp2 = gp.model_copy(update={"collection": "gp_events2"})
    con = duckdb.connect()
    for zone in ("governance", "landing"):
        con.execute(f"CREATE SCHEMA {zone}")
    ensure_objection_tables(con)
    rows = {
        "gp_events": [("A", "n1", "b1"), ("A", "n2", "b1"), ("A", "n3", "b1"), ("A", "n1", "b2")],
        "gp_events2": [("A", "n3", "c1")],
    }
    for c, records in rows.items():
        con.execute(f"CREATE TABLE landing.{c}_valid (practice_code VARCHAR, nhs_number VARCHAR, _batch VARCHAR)")
        con.executemany(f"INSERT INTO landing.{c}_valid VALUES (?, ?, ?)", [list(r) for r in records])
        source = f"(SELECT practice_code, 'pid_' || nhs_number AS pid FROM landing.{c}_valid)"
        register_practices(con, source, "practice_code", c)
    con.execute("CREATE TEMP TABLE _disp_batches AS SELECT 'b1' AS batch_id")
    con.execute(
        "CREATE TEMP TABLE _disp_ids AS SELECT DISTINCT nhs_number AS nhs, 'pid_' || nhs_number AS pid "
        "FROM landing.gp_events_valid WHERE _batch = 'b1'"
    )
    assert _registrations(con, gp, [gp, gp2]) == {"governance.practice_registrations": 1}
    left = sorted(r[0] for r in con.execute(f"SELECT pid FROM {REGISTRATIONS}").fetchall())
    assert left == ["pid_n1", "pid_n3"]  # n1 kept in batch b2, n3 in gp_events2; n2 was only in b1


def test_disposal_drops_the_true_counts_the_disposed_rows_may_be_in(world: World) -> None:
    """True counts (``safehaven.publish.counting``) are derived from haven rows: disposing of rows drops
    every output's counts and fingerprints in the same transaction, so none outlives the rows."""
    output = load_outputs(ContractRegistry())["gp_activity"]  # the project's output over this haven
    with Store(world.home).connect() as con:
        report, _ = count(con, output, world.registry)
        assert report.cells > 0 and table_exists(con, "counts", "gp_activity")
    result = world.dispose(disposal.Target.for_collection("gp_events", BEFORE), authorised_by="Dr Test, CG")
    assert result.certificate is not None
    assert result.certificate["rows_by_table"]["counts.gp_activity"] == report.cells
    with Store(world.home).connect(read_only=True) as con:
        assert not table_exists(con, "counts", "gp_activity")
        assert con.execute("SELECT count(*) FROM governance.output_counts").fetchone() == (0,)


# --- a journal is carried out only as the audit trail records it starting -------------------------


def test_a_journal_written_outside_the_haven_is_not_carried_out(world: World) -> None:
    """``store/disposal.json`` is a file beside the store, and the daily sweep resumes it first:
    a journal the audit trail does not record starting destroys nothing and says why."""
    target = disposal.Target.for_collection("gp_events", BEFORE)
    plan = disposal.make_plan(world.context(), target)
    journal = {"disposal_id": "forged", "target": target.as_dict(), "plan": plan.as_dict(), "steps": {}}
    disposal.journal_path(world.home).write_text(json.dumps(journal, default=str))
    with Store(world.home).connect(read_only=True) as con:
        before = con.execute("SELECT count(*) FROM landing.gp_events").fetchone()[0]
    with pytest.raises(disposal.DisposalError, match="not a disposal the audit trail records starting"):
        disposal.resume(world.context())
    with Store(world.home).connect(read_only=True) as con:
        assert con.execute("SELECT count(*) FROM landing.gp_events").fetchone()[0] == before


def test_a_journal_whose_plan_was_changed_after_it_started_is_not_carried_out(world: World) -> None:
    """An interrupted disposal's plan widened in the file (another collection's batches added) is refused."""
    target = disposal.Target.for_collection("gp_events", BEFORE)
    with pytest.raises(disposal.SimulatedCrash):
        world.dispose(target, _crash_after="plan")
    path = disposal.journal_path(world.home)
    journal = json.loads(path.read_text())
    journal["plan"]["reason"] = journal["plan"]["reason"] + " and more"
    path.write_text(json.dumps(journal))
    with pytest.raises(disposal.DisposalError, match="not a disposal the audit trail records starting"):
        disposal.resume(world.context())


def test_a_journal_whose_steps_were_marked_done_outside_the_haven_is_not_carried_out(world: World) -> None:
    """Steps marked done in the file would be skipped while the certificate claimed them (found by
    review): the journal's MAC covers all of it, so nothing is certified and nothing skipped."""
    target = disposal.Target.for_collection("gp_events", BEFORE)
    with pytest.raises(disposal.SimulatedCrash):
        world.dispose(target, _crash_after="plan")
    path = disposal.journal_path(world.home)
    journal = json.loads(path.read_text())
    journal["steps"] = {step: {"done_at": "2026-01-01T00:00:00+00:00"} for step in ("keys", "rows", "files", "rebuild")}
    path.write_text(json.dumps(journal))
    with pytest.raises(disposal.DisposalError, match="not as the haven wrote it"):
        disposal.resume(world.context())
    with Store(world.home).connect(read_only=True) as con:
        assert not disposal.certificates(con)


def test_a_journal_without_its_mac_is_not_carried_out(world: World) -> None:
    """A journal as an earlier version wrote it, or as anyone writes it by hand, has no MAC: a
    person plans that disposal again (the legacy path accepted any plan: found by review)."""
    target = disposal.Target.for_collection("gp_events", BEFORE)
    with pytest.raises(disposal.SimulatedCrash):
        world.dispose(target, _crash_after="plan")
    path = disposal.journal_path(world.home)
    journal = json.loads(path.read_text())
    del journal["mac"]
    path.write_text(json.dumps(journal))
    with pytest.raises(disposal.DisposalError, match="plan the disposal again"):
        disposal.resume(world.context())


@pytest.mark.parametrize("text", ['{"disposal_id": "d1", "plan": {', "[]", '{"disposal_id": "d1"}'],
                         ids=["cut short", "not an object", "fields missing"])  # fmt: skip
def test_a_journal_that_cannot_be_read_stops_every_disposal_saying_why(world: World, text: str) -> None:
    """A journal cut short or of another shape is refused by name, not a crash, and by every way in:
    what is due, resuming, and a new disposal."""
    disposal.journal_path(world.home).write_text(text)
    target = disposal.Target.for_collection("gp_events", BEFORE)
    for attempt in (lambda: disposal.due(world.context()), lambda: disposal.resume(world.context()),
                    lambda: world.dispose(target)):  # fmt: skip
        with pytest.raises(disposal.DisposalError, match="cannot be read as a journal"):
            attempt()


def test_the_journal_of_a_certified_disposal_put_back_is_not_carried_out_again(world: World) -> None:
    """An authentic journal copied aside mid-disposal and put back after the certificate (or left
    by a crash after it) would run the steps again on whatever bears the planned names now: the
    store rebuilt under yet another key, files of those names shredded. It is removed instead,
    the certificate on record returned, and the resumption audited as already certified."""
    target = disposal.Target.for_collection("gp_events", BEFORE)
    with pytest.raises(disposal.SimulatedCrash):
        world.dispose(target, _crash_after="rows")
    path = disposal.journal_path(world.home)
    copied = path.read_bytes()
    finished = disposal.resume(world.context())
    assert finished is not None and disposal.pending(world.home) is None
    store_key = world.keyring.get("store").key_id

    path.write_bytes(copied)
    again = disposal.resume(world.context())
    assert again is not None and again.certificate == finished.certificate
    assert disposal.pending(world.home) is None
    assert world.keyring.get("store").key_id == store_key  # no step ran again
    with Store(world.home).connect(read_only=True) as con:
        assert len(disposal.certificates(con)) == 1
        resumed = [e.fields for e in audit.entries_for(con, object_like="disposal:%") if e.outcome == "resumed"]
    assert resumed[-1].get("already_certified") is True


# --- retention counts from the receipt the audit trail records (safehaven.intake.landings) ----------


def _held(world: World, collection: str) -> int:
    with Store(world.home).connect(read_only=True) as con:
        return con.execute(f"SELECT count(*) FROM landing.{collection}").fetchone()[0]


def test_a_receipt_moved_back_in_the_batch_register_destroys_nothing_and_is_named_for_review(world: World) -> None:
    """Whoever holds the store key could date the new drop's batches to 2000 so that the daily
    sweep destroyed them unasked: the sweep counts retention from the receipt the audit trail
    records, disposes of the old drop alone, and names the batches whose register time differs."""
    with Store(world.home).connect() as con:
        con.execute("UPDATE governance.batches SET landed_at = '2000-01-01' WHERE landed_at >= '2016-01-01'")
    kept = _held(world, "social_care") - _held_old(world, "social_care")
    items = [i for i in disposal.due(world.context()) if i.target.collection == "social_care"]
    assert [i.action for i in items] == ["dispose", "review"]
    assert items[0].detail["batches"] == 1 and "differs from the one the audit trail records" in items[1].reason
    disposal.sweep(world.context())
    assert _held(world, "social_care") == kept > 0


def _held_old(world: World, collection: str) -> int:
    with Store(world.home).connect(read_only=True) as con:
        return con.execute(
            f"SELECT count(*) FROM landing.{collection} WHERE _batch IN (SELECT batch_id FROM governance.batches "
            "WHERE file_name LIKE '%20150331%')"
        ).fetchone()[0]


def test_a_receipt_moved_forward_in_the_batch_register_does_not_stop_retention(world: World) -> None:
    """Dating the old drop's batches to today in the register would let retention lapse: the
    audit trail's receipt (2015) still makes them due."""
    with Store(world.home).connect() as con:
        con.execute("UPDATE governance.batches SET landed_at = now()")
    [due, review] = [i for i in disposal.due(world.context()) if i.target.collection == "gp_events"]
    assert due.action == "dispose" and due.detail["batches"] == 1
    assert review.action == "review" and review.detail["register_differs"]
    result = world.dispose(due.target)
    assert result.status == "disposed" and _held_old(world, "gp_events") == 0


def test_a_receipt_not_on_the_audit_trail_is_recorded_by_the_sweep_and_counted_from_then(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A landing with no entry (a run stopped between its commit and the entry, or a trail kept from
    verifying for one landing) whose register time was then set back: what is due and a plan leave
    it out and say why; the sweep puts it on record counting from then, so it is kept, and names the
    register's differing time for review (before, the sweep destroyed the fresh drop: found by review)."""
    synthetic.generate(tmp_path / "drop", patients=20, seed=99, defect_rate=0.0, period_end=OLD_END)
    folder = world.home.incoming_for("social_care")
    shutil.copy(next((tmp_path / "drop" / "social_care").glob("*.csv")), folder / "late.csv")
    with monkeypatch.context() as mp, Store(world.home).connect() as con:
        mp.setattr(landings, "record", lambda *_: False)  # stopped between the landing's commit and its entry
        report = ingest_collection(con, world.registry.contracts["social_care"], folder, world.home.quarantine)
        assert report.landings_unaudited == 1
        con.execute("UPDATE governance.batches SET landed_at = '2015-01-01' WHERE batch_id = ?", report.batches)
    target = disposal.Target.for_collection("social_care", BEFORE)
    assert report.batches[0] not in [b["batch_id"] for b in disposal.make_plan(world.context(), target).batches]
    review = [i for i in disposal.due(world.context()) if i.target.collection == "social_care" and i.action == "review"]
    assert "1 batch(es) whose receipt is not on the audit trail" in review[0].reason

    disposal.sweep(world.context())
    with Store(world.home).connect(read_only=True) as con:
        status = con.execute("SELECT status FROM governance.batches WHERE batch_id = ?", report.batches).fetchone()
        assert status == ("landed",) and audit.verify(con, world.home).ok
    [item] = [i for i in disposal.due(world.context()) if i.target.collection == "social_care"]
    assert item.action == "review" and item.detail["register_differs"] == report.batches


@pytest.mark.parametrize("odd", ["infinity", "294000-01-01"])
def test_a_register_time_that_is_not_a_date_stops_no_disposal(world: World, odd: str) -> None:
    """One batch's ``landed_at`` set to infinity or past year 9999 stopped every disposal with a bare
    Python error (found by review): compared in SQL, the haven is disposed of as due (the batch's
    receipt on the audit trail decides it)."""
    with Store(world.home).connect() as con:
        con.execute(
            f"UPDATE governance.batches SET landed_at = '{odd}' WHERE batch_id = (SELECT min(batch_id) FROM "
            "governance.batches WHERE collection = 'hospital_episodes' AND landed_at >= '2016-01-01')"
        )
    report = disposal.sweep(world.context())
    assert sorted(r.target.collection for r in report.results) == sorted(CONTENT) and report.failed == []
    assert _held_old(world, "gp_events") == 0


# --- a release's retention counts from its delivery on the audit trail (review.deliveries) ---------

RELEASE = f"{STUDY}-r0001"


def _date_release(world: World, when: str) -> None:
    with Store(world.home).connect() as con:
        con.execute("UPDATE governance.release_register SET released_at = ? WHERE release_id = ?", [when, RELEASE])


def _agreement_items(world: World, today: date | None = None) -> list[disposal.DueItem]:
    return [i for i in disposal.due(world.context(today)) if i.target.kind == "agreement"]


def test_a_release_dated_back_in_the_release_register_is_kept_and_named_for_review(world: World) -> None:
    """Whoever holds the store key could date a fresh release to 2000 so that the daily sweep
    destroyed the haven's copy of what it released: retention counts from the delivery the audit
    trail records, so nothing is due and the release is named for review."""
    _date_release(world, "2000-01-01")
    [item] = _agreement_items(world)
    assert item.action == "review" and item.detail["register_differs"] == [RELEASE]
    assert "differs from the delivery the audit trail records" in item.reason
    disposal.sweep(world.context())
    assert (world.home.releases / STUDY / RELEASE).is_dir()


def test_a_release_dated_forward_in_the_release_register_still_goes_at_its_retention(world: World) -> None:
    """Dating the release to 2099 in the register would keep the haven's copy past its retention:
    the delivery on record still makes it due, and the register's time is named for review."""
    _date_release(world, "2099-01-01")
    due, review_item = _agreement_items(world, haven_today() + timedelta(days=400))
    assert (due.action, due.target.releases) == ("dispose", (RELEASE,))
    assert review_item.action == "review" and review_item.detail["register_differs"] == [RELEASE]


def test_a_release_in_the_register_with_no_delivery_on_record_is_not_disposed_of_by_date(world: World) -> None:
    """A register row (and folder) with no authentic delivery entry, dated past retention, is never
    disposed of by its register date: a person is asked to look."""
    added = f"{STUDY}-r0099"
    shutil.copytree(world.home.releases / STUDY / RELEASE, world.home.releases / STUDY / added)
    with Store(world.home).connect() as con:
        con.execute(
            "INSERT INTO governance.release_register SELECT * REPLACE (? AS release_id, TIMESTAMPTZ "
            "'2000-01-01 00:00:00+00' AS released_at) FROM governance.release_register WHERE release_id = ?",
            [added, RELEASE],
        )
    [item] = _agreement_items(world)
    assert item.action == "review" and item.detail["unrecorded"] == [added]
    assert "no delivery on the audit trail" in item.reason


def _disposed_and_unregistered(world: World) -> tuple[bytes, int]:
    """The study's agreement disposed of (its salt's bytes kept first, as a backup holds them), then
    the disposal register's row deleted with the store key; returns the salt's bytes and the seq of
    the disposal's start entry."""
    backup = (world.home.keys / f"agreement-{STUDY}.key").read_bytes()
    suspend(STUDY, "recipient breached the onward sharing terms", "SIRO", root=world.registry.root)
    assert world.dispose(disposal.Target.for_agreement(STUDY), authorised_by="Dr Test, CG").status == "disposed"
    with Store(world.home).connect() as con:
        con.execute(f"DELETE FROM {core_schema.DISPOSAL_REGISTER}")
        [start] = [
            e.seq for e in audit.entries_for(con) if e.action == disposal_model.ACTION and e.outcome == "started"
        ]
    return backup, start


def _lose_record_and_restore(world: World, backup: bytes) -> KeyRing:
    """The key record lost, and a backup of the study's salt put back beside the other key files."""
    path = world.home.keys / f"agreement-{STUDY}.key"
    (world.home.keys / "keyring.json").unlink()
    path.write_bytes(backup)
    path.chmod(0o600)
    return KeyRing(world.home.keys)


def test_a_salt_an_interrupted_disposal_destroyed_is_not_recorded_again_from_a_backup(world: World) -> None:
    """A disposal killed after its key step has no certificate yet, so the disposal register does
    not name the salt; its resume skips the key step journalled done. Recovering a lost key record
    with a backup of the salt put back would have undone the crypto-shredding for good. The trail's
    start entry of the disposal names the keys it destroys, so the copy is refused; once the file is
    removed the other keys are recorded and the disposal finishes."""
    backup = (world.home.keys / f"agreement-{STUDY}.key").read_bytes()
    suspend(STUDY, "breach of the data sharing agreement", "SIRO", root=world.registry.root)
    with pytest.raises(disposal.SimulatedCrash):
        world.dispose(disposal.Target.for_agreement(STUDY), _crash_after="keys")
    ring = _lose_record_and_restore(world, backup)
    with pytest.raises(KeyRingError, match=f"agreement-{STUDY}.key holds key .*, which disposal D.* destroyed"):
        key_record.recover_record(world.home, custodian_ring(world.home), actor="custodian")
    assert not ring.manifest(), "nothing recorded"
    (world.home.keys / f"agreement-{STUDY}.key").unlink()
    assert key_record.recover_record(world.home, custodian_ring(world.home), actor="custodian")
    result = disposal.resume(world.context())
    assert result is not None and result.status == "disposed"
    assert not ring.exists(f"agreement-{STUDY}")


def test_a_destroyed_salt_is_not_recorded_again_when_the_register_row_is_removed_with_the_store_key(
    world: World,
) -> None:
    """The disposal register is inside the store: whoever holds the store key can delete its row.
    The trail's entry of the disposal's start, keyed under the audit key, still names the salt."""
    backup, _ = _disposed_and_unregistered(world)
    _lose_record_and_restore(world, backup)
    with pytest.raises(KeyRingError, match=f"agreement-{STUDY}.key holds key .*, which disposal D.* destroyed"):
        key_record.recover_record(world.home, custodian_ring(world.home), actor="custodian")


def test_a_salt_an_agreements_disposal_destroyed_before_its_entries_named_keys_is_not_recorded_again(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disposal started before its start entry listed the keys it destroys (the entry has no such
    field): with its register row deleted, the entry still names the agreement, so that agreement's
    salt is refused whatever its id (found by review)."""
    monkeypatch.setattr(disposal_run, "DESTROYS", "not_named_then")  # the entry as an older haven wrote it
    backup, _ = _disposed_and_unregistered(world)
    monkeypatch.undo()
    _lose_record_and_restore(world, backup)
    with pytest.raises(KeyRingError, match=f"agreement-{STUDY}.key holds key .*, which disposal D.* was to destroy"):
        key_record.recover_record(world.home, custodian_ring(world.home), actor="custodian")


def test_a_destroyed_salt_is_not_recorded_again_when_its_disposal_entries_are_cut_and_written_off(
    world: World,
) -> None:
    """The insider deletes the register row and the trail's entries from the disposal's start on
    (store key), and the trail is resumed by a breach decision, as a broken trail is: the entries
    that named the salt are written off, so the trail cannot vouch that no disposal destroyed it,
    and the salt is not recorded (found by review)."""
    backup, start = _disposed_and_unregistered(world)
    with Store(world.home).connect() as con:
        con.execute(f"DELETE FROM {audit.TABLE} WHERE seq >= ?", [start])
        audit.resolve(con, world.home, actor="ig-lead", decision="entries lost; resume")
    ring = _lose_record_and_restore(world, backup)
    with pytest.raises(KeyRingError, match=f"agreement-{STUDY}.key: whether a disposal destroyed .* breach decision"):
        key_record.recover_record(world.home, custodian_ring(world.home), actor="custodian")
    assert not ring.manifest(), "nothing recorded"


def test_a_destroyed_salt_is_not_recorded_again_when_only_its_note_is_lost_and_its_entry_altered(
    world: World,
) -> None:
    """Only the salt's note is lost (the audit key is still recorded, so the recovery does not check
    the trail under a recovered audit key): the disposal's start entry altered with the store key no
    longer verifies, and the trail as a whole does not either, so the salt is not recorded (found by review)."""
    path = world.home.keys / f"agreement-{STUDY}.key"
    backup, start = _disposed_and_unregistered(world)
    with Store(world.home).connect() as con:
        con.execute(f"UPDATE {audit.TABLE} SET detail = '{{}}' WHERE seq = ?", [start])
    manifest = json.loads((world.home.keys / "keyring.json").read_text())
    manifest.pop(f"agreement-{STUDY}", None)
    (world.home.keys / "keyring.json").write_text(json.dumps(manifest))
    path.write_bytes(backup)
    path.chmod(0o600)
    ring = KeyRing(world.home.keys)
    assert list(ring.unnoted()) == [f"agreement-{STUDY}"]
    with pytest.raises(KeyRingError, match=f"agreement-{STUDY}.key: whether a disposal destroyed .* does not verify"):
        key_record.recover_record(world.home, custodian_ring(world.home), actor="custodian")
    assert f"agreement-{STUDY}" not in ring.manifest()


def test_a_salt_a_disposal_destroyed_stays_destroyed_after_the_key_record_is_lost(world: World) -> None:
    """Lose ``keyring.json`` after a disposal and put a backup of the agreement's salt back: the
    store's disposal register says it was destroyed, so the missing salt is never "restore it from
    backup", and the key custodian's recovery refuses the copy (it undid the crypto-shredding:
    found by review)."""
    home = world.home
    path = home.keys / f"agreement-{STUDY}.key"
    backup = path.read_bytes()
    suspend(STUDY, "recipient breached the onward sharing terms", "SIRO", root=world.registry.root)
    assert world.dispose(disposal.Target.for_agreement(STUDY), authorised_by="Dr Test, Caldicott Guardian").status == (
        "disposed"
    )
    (home.keys / "keyring.json").unlink()
    ring = KeyRing(home.keys)
    key_record.recover_record(home, custodian_ring(home), actor="custodian")  # the other keys, checked
    with Store(home).connect() as con, pytest.raises(KeyRingError, match="destroyed by disposal .*never restored"):
        pins.agreement_salt(con, ring, STUDY, create=False)
    path.write_bytes(backup)
    path.chmod(0o600)
    with pytest.raises(KeyRingError, match=f"agreement-{STUDY}.key holds key .*, which disposal .* destroyed"):
        key_record.recover_record(home, custodian_ring(home), actor="custodian")
    assert f"agreement-{STUDY}" not in ring.manifest()
