"""Key rotation: haven (pseudonyms), store (encryption at rest) and vault (identity vault).

Rules (CoP 27b-c; ``docs/rules.md`` "Pseudonymisation and encryption"; ``safehaven.core.keys``):

* **Every rotation is staged, then committed, then swapped**, so a crash at any point leaves
  either the old state or a state ``resume`` completes: the new key is first written to
  ``keys/<purpose>-next.key`` (0600, not yet current); the data is re-keyed; only then does the
  new key replace the old one atomically, the manifest marking the old id retired. Key ids,
  never material, are recorded in ``governance.key_epochs`` and in the audit trail
  (``action="key.rotate"``).
* **Haven key** (the HMAC of pseudonyms): a map old pid -> new pid is computed in SQL from
  every canonical NHS number the haven can see: the landing zone and the identity vault
  (decrypted with the governance lead's vault key, which this rotation therefore needs).
  Every ``pid`` / ``*_pid`` column in the haven, governance, vault and release zones is
  rewritten through that one map in one transaction, so linkage is kept: the same person has
  the same new pid in every collection, in the objection register and in release members.
  A haven or objection-register pid the map does not cover stops the rotation (a history
  table's pid of a person already disposed of is left as it was, and counted). The vault entries are re-encrypted (their
  associated data binds the pid). Agreement pseudonym keys derive from the haven key, so each
  agreement's domain is re-keyed too; each recipient with released records gets a crosswalk
  ``releases/<agreement>/rekey/<date>-<key id>.csv`` (old pseudonym, new pseudonym) of only
  the people already released to it, so it can carry its own linkage across the rotation
  and learns nothing new.
* **Store key**: the store is copied into a new file encrypted under the new key (DuckDB
  ``ATTACH ... (ENCRYPTION_KEY)`` + ``COPY FROM DATABASE``) and swapped in with one atomic
  rename (``Store.rebuild``, journalled), then every table's row count is checked.
* **Vault key** (X25519 pair; the key custodian's, so it needs their passphrase): the new pair is
  staged first (``keys/vault-next.key`` sealed, ``keys/vault-next.pub``); the data keys are
  unwrapped with the old private key and re-wrapped to the new public key, and the store's
  vault epoch moves to the new key, in one transaction; then the staged pair is installed. The
  entries themselves are untouched. While a pair is staged, vault writes are refused
  (``safehaven.core.pins.vault_public``), and after the commit the old ``vault.pub`` no longer
  matches the store's epoch, so no new data key can be wrapped to a key about to be replaced:
  a crash at any step loses no entry, and ``resume`` installs or discards the staged pair.
  The audit trail names the vault key too (``safehaven.core.pins.check_vault_audited``): the
  new pair is recorded as staged (``key.rotate.stage``, new key id) before it is written, and the
  ``key.rotate`` entry is appended before the pair is installed; ``resume`` installing a committed
  pair whose rotation stopped before that entry appends it (``resumed``), but only for the pair
  the latest authentic ``key.rotate.stage`` names, so a pair staged some other way never becomes
  the key the trail records.
* ``resume`` is audited (``action="key.rotate.resume"``): it is how a person clears the refusal.
* **A rotation installed without its entry is recorded late**: a process killed after the new
  key is installed and before ``key.rotate`` is appended (or a rotation ``resume`` installs)
  leaves a rotation no entry records; the haven key is refused until then
  (``safehaven.core.pins.check_rotations_recorded``), and ``resume`` appends its ``key.rotate``
  entry with ``"late": true``, the old and new ids and when the store's epoch started, once the
  store's key epochs, the key file and the rotation's own ``key.rotate.stage`` entry (written
  before anything is re-keyed) confirm it (``safehaven.core.pins.unrecorded_rotations``; a
  ``keyring.json`` claim they do not confirm is named in the resume entry, never recorded).
  The vault key is not recorded late: its rotation records ``key.rotate.stage`` before anything
  is written and ``key.rotate`` before the install, and ``resume`` records a pair it installs only
  after its own stage entry (``safehaven.core.pins.check_vault_audited``).
* One writer at a time (DuckDB): a rotation refuses to start while a pipeline run is alive
  (``safehaven.core.runs.live_runs``), rather than rewriting the store under the run.
* **Crosswalks only for a committed key**: they are written to ``staging/rekey/`` first and
  moved into ``releases/<agreement>/rekey/`` only after the re-keying transaction commits; an
  interrupted rotation's staged crosswalks are moved in by ``resume`` if it had committed, or
  shredded if it had not, so no recipient ever sees a crosswalk for a key that never became
  current.
"""

from __future__ import annotations

import csv
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import duckdb

from safehaven.context import Haven
from safehaven.core import audit, runs
from safehaven.core.days import haven_today
from safehaven.core.files import shred_file
from safehaven.core.home import Home
from safehaven.core.keys import (
    KEY_BYTES,
    VAULT,
    Key,
    KeyRing,
    KeyRingError,
    agreement_ids,
    agreement_purpose,
    derive_agreement_key,
    key_id,
    x25519_private,
    x25519_public,
)
from safehaven.core.pins import (
    KEY_SET,
    ROTATE_ACTION,
    STAGE_ACTION,
    VAULT_OBJECT,
    Rotation,
    check_epoch,
    epoch_key_id,
    start_epoch,
    unrecorded_rotations,
    vault_public,
)
from safehaven.core.sql import lit, q
from safehaven.core.store import CATALOG, Store, StoreError, table_exists
from safehaven.intake.contracts import Contract
from safehaven.protect import register_seal, vault
from safehaven.protect.haven import haven_key
from safehaven.protect.pseudonymise import hmac_sql, install_key

PURPOSES = ("haven", "store", "vault")
#: Rotations this module stages itself; the store key's is staged and resumed by ``Store``.
STAGED = ("haven", "vault")
REMAP_SCHEMAS = ("haven", "governance", "vault", "release")
#: Tables whose every pid must map (besides the haven zone): a stale pid there would let an
#: objector through or break linkage. Elsewhere (history such as release members) a pid of a
#: person already disposed of keeps its old value and is counted as unmapped.
STRICT = {("governance", "objection_events")}


#: ``STAGE_ACTION`` (``safehaven.core.pins``) records a vault key pair staged by :func:`rotate_vault`, or a
#: haven key rotation begun by :func:`rotate_haven`, before anything is written: ``resume`` installs a
#: committed staged vault pair, or records a haven rotation late, only when such an entry names it.


class RotationError(Exception):
    """A rotation could not be done; nothing was changed unless the message says so."""


@dataclass
class RotationReport:
    purpose: str
    old_key_id: str | None
    new_key_id: str
    counts: dict[str, int] = field(default_factory=dict)
    crosswalks: list[str] = field(default_factory=list)


def _staged(purpose: str) -> str:
    return f"{purpose}-next"


def _stage_entry(con: duckdb.DuckDBPyConnection, home: Home, actor: str, report: RotationReport) -> None:
    """The ``key.rotate.stage`` entry of a haven-key rotation, before anything is re-keyed: the only
    rotation ``--resume`` records late is one staged so (``safehaven.core.pins.unrecorded_rotations``;
    found by review: a key swapped with ``keyring.json`` and the store's epochs dressed up as a
    rotation was recorded). Written here rather than by :func:`_audit` so the kill tests that stop
    at ``_audit`` still stop before ``key.rotate``."""
    audit.append(
        con,
        actor=actor,
        role="key_custodian",
        action=STAGE_ACTION,
        object=f"key:{report.purpose}",
        detail={"old_key_id": report.old_key_id, "new_key_id": report.new_key_id},
        home=home,
    )


def _audit(
    con: duckdb.DuckDBPyConnection, home: Home, actor: str, report: RotationReport, *, action: str = ROTATE_ACTION
) -> None:
    audit.append(
        con,
        actor=actor,
        role="key_custodian",
        action=action,
        object=f"key:{report.purpose}",
        detail={
            "old_key_id": report.old_key_id,
            "new_key_id": report.new_key_id,
            "counts": report.counts,
            "crosswalks": len(report.crosswalks),
        },
        home=home,
    )


def _retire_epoch(con: duckdb.DuckDBPyConnection, purpose: str, new_id: str) -> None:
    start_epoch(con, purpose, new_id)


def _discard_staged(keyring: KeyRing, purpose: str) -> None:
    keyring.discard(_staged(purpose))
    keyring.discard(_staged(purpose), public=True)


# --- haven ---------------------------------------------------------------------------------


def _pid_columns(con: duckdb.DuckDBPyConnection) -> list[tuple[str, str, str]]:
    zones = ", ".join(lit(z) for z in REMAP_SCHEMAS)
    return con.execute(
        "SELECT c.table_schema, c.table_name, c.column_name FROM information_schema.columns c "
        "JOIN information_schema.tables t USING (table_catalog, table_schema, table_name) "
        f"WHERE c.table_catalog = '{CATALOG}' AND c.table_schema IN ({zones}) AND t.table_type = 'BASE TABLE' "
        "AND (c.column_name = 'pid' OR c.column_name LIKE '%\\_pid' ESCAPE '\\') AND c.data_type = 'VARCHAR' "
        "AND NOT (c.table_schema = 'vault' AND c.table_name IN ('identity', 'seen')) ORDER BY 1, 2, 3"
    ).fetchall()


def _landing_nhs_sql(con: duckdb.DuckDBPyConnection, contracts: Iterable[Contract]) -> list[str]:
    """One ``SELECT ... AS nhs`` per collection whose landing valid table exists."""
    return [
        f"SELECT {q(c.patient_key)} AS nhs FROM landing.{q(c.collection + '_valid')}"
        for c in contracts
        if table_exists(con, "landing", f"{c.collection}_valid")
    ]


def rotate_haven(haven: Haven) -> RotationReport:
    """Rotate the haven key and re-pseudonymise every pid consistently (module docstring), over the
    landed tables of ``haven.contracts``, with ``haven.keyring`` (the key custodian's)."""
    home, actor, keyring = haven.home, haven.actor, haven.keyring
    contracts = list(haven.contracts.contracts.values())
    store = Store(home, keyring)
    private = vault.private_key(keyring)
    with store.connect() as con:
        old = haven_key(con, keyring, home)
        public = vault_public(con, keyring)  # pinned and checked against the trail before anything is staged
        sealed = register_seal.problem(con) is None  # re-keyed pids are sealed again only if it matched
        new = keyring.write(_staged("haven"), secrets.token_bytes(KEY_BYTES), replace=True, record=False)
        new = Key("haven", new.material)
        report = RotationReport("haven", old.key_id, new.key_id)
        _stage_entry(con, home, actor, report)  # what --resume may record late (pins.unrecorded_rotations)
        install_key(con, "haven_old", old)
        install_key(con, "haven_new", new)
        con.execute("CREATE OR REPLACE TEMP TABLE _rot_nhs (nhs VARCHAR)")
        for part in _landing_nhs_sql(con, contracts):
            con.execute(f"INSERT INTO _rot_nhs {part}")
        # the whole vault, decrypted once: its NHS numbers join the map, its entries are re-encrypted
        vault.decrypt_table(con, private, "true", "_rot_vault")
        patient_keys = ", ".join(lit(k) for k in sorted({c.patient_key for c in contracts})) or "NULL"
        con.execute(f"INSERT INTO _rot_nhs SELECT value FROM _rot_vault WHERE field IN ({patient_keys})")
        con.execute(
            "CREATE OR REPLACE TEMP TABLE _pid_map AS SELECT DISTINCT "
            f"{hmac_sql('nhs', 'haven_old')} AS old, {hmac_sql('nhs', 'haven_new')} AS new "
            "FROM (SELECT DISTINCT nhs FROM _rot_nhs WHERE nhs IS NOT NULL)"
        )
        con.execute("DROP TABLE _rot_nhs")
        report.counts["people"] = con.execute("SELECT count(*) FROM _pid_map").fetchone()[0]
        columns = _pid_columns(con)
        for schema, table, column in columns:
            missing = con.execute(
                f"SELECT count(DISTINCT {q(column)}) FROM {schema}.{q(table)} "
                f"WHERE {q(column)} IS NOT NULL AND {q(column)} NOT IN (SELECT old FROM _pid_map)"
            ).fetchone()[0]
            if missing and ((schema, table) in STRICT or schema == "haven"):
                _discard_staged(keyring, "haven")
                raise RotationError(
                    f"{missing} pseudonyms in {schema}.{table}.{column} have no NHS number in the landing zone or "
                    "the vault; the haven key was not rotated"
                )
            if missing:
                report.counts[f"unmapped {schema}.{table}.{column}"] = int(missing)
        staged = _crosswalks(con, home, keyring, old, new)
        con.execute("BEGIN TRANSACTION")
        try:
            for schema, table, column in columns:
                col = q(column)
                n = con.execute(
                    f"UPDATE {schema}.{q(table)} AS t SET {col} = m.new FROM _pid_map m WHERE t.{col} = m.old"
                ).fetchone()[0]
                report.counts[f"{schema}.{table}.{column}"] = int(n)
            if table_exists(con, "governance", "objection_events"):
                con.execute("UPDATE governance.objection_events SET key_id = ?", [new.key_id])
            report.counts["vault.identity"] = vault.reencrypt(con, "_rot_vault", public, "_pid_map")
            _retire_epoch(con, "haven", new.key_id)
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            _discard_staged(keyring, "haven")
            for path in staged:
                shred_file(path)
            raise
        con.execute("DROP TABLE _pid_map")
        con.execute("DROP TABLE _rot_vault")
        _finish_haven(keyring, new)
        report.crosswalks = _commit_crosswalks(home, new.key_id)
        _audit(con, home, actor, report)
        if sealed:
            register_seal.seal(con, home, actor=actor, role="key_custodian")
    return report


def _crosswalks(con: duckdb.DuckDBPyConnection, home: Home, keyring: KeyRing, old: Key, new: Key) -> list[Path]:
    """Per agreement with released people: (old pseudonym, new pseudonym) of those people only.

    Written to the staging folder; ``_commit_crosswalks`` moves them in once the key commits.
    """
    if not table_exists(con, "governance", "release_members"):
        return []
    written = []
    for agreement_id in agreement_ids(keyring):
        salt = keyring.get(agreement_purpose(agreement_id)).material
        install_key(con, "agr_old", derive_agreement_key(old.material, salt, agreement_id))
        install_key(con, "agr_new", derive_agreement_key(new.material, salt, agreement_id))
        rows = con.execute(
            f"SELECT {hmac_sql('m.old', 'agr_old')} AS old_pseudonym, {hmac_sql('m.new', 'agr_new')} AS new_pseudonym "
            "FROM (SELECT DISTINCT pid FROM governance.release_members WHERE agreement_id = ?) r "
            "JOIN _pid_map m ON m.old = r.pid ORDER BY 1",
            [agreement_id],
        ).fetchall()
        if not rows:
            continue
        folder = _crosswalk_staging(home) / agreement_id
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        folder.chmod(0o700)
        path = folder / f"{haven_today().isoformat()}-{new.key_id}.csv"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["old_pseudonym", "new_pseudonym"])
            writer.writerows(rows)
        written.append(path)
    return written


def _crosswalk_staging(home: Home) -> Path:
    """Where crosswalks wait for their key to commit (``staging/rekey/<agreement>/``)."""
    return home.staging / "rekey"


def _staged_crosswalks(home: Home, new_key_id: str | None = None) -> list[Path]:
    folder = _crosswalk_staging(home)
    pattern = f"*-{new_key_id}.csv" if new_key_id else "*.csv"
    return sorted(folder.glob(f"*/{pattern}")) if folder.is_dir() else []


def _commit_crosswalks(home: Home, new_key_id: str) -> list[str]:
    """Move the crosswalks of a committed key to their recipients' ``rekey/`` folders."""
    moved = []
    for path in _staged_crosswalks(home, new_key_id):
        folder = home.releases / path.parent.name / "rekey"
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        folder.chmod(0o700)
        os.replace(path, folder / path.name)
        moved.append(str(folder / path.name))
    return moved


def _shred_staged_crosswalks(home: Home) -> int:
    """Shred crosswalks of a rotation that never committed; returns how many."""
    paths = _staged_crosswalks(home)
    for path in paths:
        shred_file(path)
    return len(paths)


def _finish_haven(keyring: KeyRing, new: Key) -> None:
    keyring.write("haven", new.material, replace=True)
    _discard_staged(keyring, "haven")


# --- store ---------------------------------------------------------------------------------


def _tables(con: duckdb.DuckDBPyConnection, catalog: str) -> list[tuple[str, str]]:
    """(schema, table) of every persistent table of ``catalog``."""
    return con.execute(
        "SELECT schema_name, table_name FROM duckdb_tables() WHERE database_name = ? AND NOT temporary ORDER BY 1, 2",
        [catalog],
    ).fetchall()


def rotate_store(haven: Haven) -> RotationReport:
    """Re-encrypt the store under a new key and swap it in atomically (module docstring).

    Uses ``Store.rebuild`` (shared with physical disposal: its journal makes the swap
    crash-safe, and ``Store.check`` finishes or undoes an interrupted one), and checks that
    every table holds the same number of rows afterwards.
    """
    home, actor, keyring = haven.home, haven.actor, haven.keyring
    store = Store(home, keyring)
    if not store.path.exists():
        raise RotationError(f"there is no store at {store.path} to rotate")
    with store.connect(read_only=True) as con:
        before = _row_counts(con)
    ids = store.rebuild(rekey=True)
    report = RotationReport("store", ids["old_key_id"], ids["new_key_id"])
    with store.connect() as con:
        after = _row_counts(con)
        if after != before:
            raise RotationError(
                "the re-encrypted store does not hold the same rows as before; restore the "
                "backup and investigate (the old key is retired)"
            )
        report.counts = {"tables": len(after), "rows": sum(after.values())}
        _retire_epoch(con, "store", report.new_key_id)
        _audit(con, home, actor, report)
    return report


def _row_counts(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    """Rows per table of the store (checked before and after a store-key rotation)."""
    return {
        f"{s}.{t}": con.execute(f"SELECT count(*) FROM {CATALOG}.{q(s)}.{q(t)}").fetchone()[0]
        for s, t in _tables(con, CATALOG)
    }


# --- vault ---------------------------------------------------------------------------------


def rotate_vault(haven: Haven) -> RotationReport:
    """Re-wrap the vault's data keys to a new X25519 key pair, crash-safe (module docstring), with
    ``haven.keyring`` (the key custodian's)."""
    home, actor, keyring = haven.home, haven.actor, haven.keyring
    private = vault.private_key(keyring)
    old_id = key_id(x25519_public(private.material))
    with Store(home, keyring).connect() as con:
        check_epoch(con, VAULT, old_id, str(keyring.path(VAULT)))
        new_private = x25519_private()
        report = RotationReport(VAULT, old_id, key_id(x25519_public(new_private)))
        _audit(con, home, actor, report, action=STAGE_ACTION)  # what resume may install (module docstring)
        new_public = keyring.seal_keypair(VAULT, new_private, stage=True)
        vault.ensure_tables(con)
        con.execute("BEGIN TRANSACTION")
        try:
            report.counts["data_keys"] = vault.rewrap_all(con, private, new_public)
            _retire_epoch(con, VAULT, report.new_key_id)
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            _discard_staged(keyring, VAULT)
            raise
        _audit(con, home, actor, report)  # before the install: the trail names the key vault.pub will hold
        keyring.install_staged_pair(VAULT)
    return report


def _resume_vault(keyring: KeyRing, committed: str | None) -> str:
    """Install the staged vault pair if the store committed to it, else discard it."""
    staged_id = keyring.staged_public_id(VAULT)
    if staged_id is not None and staged_id == committed:
        if keyring.exists(_staged(VAULT)):
            keyring.install_staged_pair(VAULT)
        else:  # the install had finished; only the staged public half was left
            _discard_staged(keyring, VAULT)
        return f"vault: finished; key {staged_id} is current"
    _discard_staged(keyring, VAULT)
    return "vault: the rotation had not committed; the staged key pair was discarded"


# --- crash recovery ------------------------------------------------------------------------


def pending(keyring: KeyRing) -> list[str]:
    """Purposes with a staged key left by an interrupted rotation."""
    return [p for p in STAGED if keyring.exists(_staged(p)) or (p == VAULT and keyring.staged_pair(VAULT))]


def resume(haven: Haven) -> list[str]:
    """Finish or undo interrupted rotations; returns what was done, one line per purpose (audited).

    A staged key is installed when the store shows the rotation committed (its epoch);
    otherwise it is discarded (shredded) and the old key stays. Old key files an interrupted
    replacement left behind (``<name>.retired``) are shredded. Opening the store finishes or undoes an
    interrupted store-key rotation by itself (``Store.recover``). No passphrase is needed: a
    staged vault pair is installed as it was sealed. An installed rotation with no ``key.rotate``
    entry is then recorded late (module docstring). Audited as ``haven.actor``, in one append
    with the late entries.
    """
    home, actor, keyring = haven.home, haven.actor, haven.keyring
    todo = pending(keyring)
    done = [
        f"{name}: an old key file left by an interrupted replacement was shredded" for name in keyring.shred_leftovers()
    ]
    store = Store(home, keyring)
    claims = store.path.exists() and any(keyring.replacements(p) for p in STAGED)
    if not todo and not done and not claims and not _staged_crosswalks(home):
        return []
    try:
        with store.connect() as con:
            done = [_resume_one(con, home, keyring, purpose) for purpose in todo] + done
            done += _settle_crosswalks(con, home, keyring)
            resumed = _resumed_vault_key(con, keyring, actor)
            done += [f"vault: the rotation to key {e['detail']['new_key_id']} is on record" for e in resumed]
            late, lines = _unrecorded(con, keyring, actor)
            done += lines
            if done:
                audit.append_many(con, [*resumed, *late, _resume_entry(actor, done)], home=home)
    except StoreError as exc:
        raise RotationError(f"cannot open the store to resume: {exc}") from None
    return done


def _resume_entry(actor: str, done: list[str]) -> dict[str, object]:
    return {
        "actor": actor,
        "role": "key_custodian",
        "action": "key.rotate.resume",
        "object": "keys",
        "detail": {"done": done},
    }


def _unrecorded(
    con: duckdb.DuckDBPyConnection, keyring: KeyRing, actor: str
) -> tuple[list[dict[str, object]], list[str]]:
    """The late ``key.rotate`` entries of installed rotations no entry records, and a line for each,
    and for each rotation ``keyring.json`` claims that the store does not confirm (not recorded)."""
    real, unconfirmed = unrecorded_rotations(con, keyring)  # pins.ROTATED: never the vault key
    entries = [_late_entry(actor, r) for r in real]
    lines = [
        f"{r.purpose}: the rotation {r.old_key_id} -> {r.new_key_id} was installed without its audit entry; "
        "recorded now (late)"
        for r in real
    ] + [
        f"{r.purpose}: the store's key epochs and key file show a rotation {r.old_key_id} -> {r.new_key_id} that no "
        "key.rotate.stage entry of the audit trail names (a key swapped with the store key, or a rotation begun "
        "before haven rotations were staged); not recorded as a rotation. The key is used only if the audit "
        "trail records it (a haven whose trail records no haven key yet adopts its current one once); if it "
        "is refused, restore keys/, keyring.json and the store from the key custodian's backup"
        if r.unstaged
        else f"{r.purpose}: keyring.json names a rotation {r.old_key_id} -> {r.new_key_id} that the store's key "
        "epochs and key file do not confirm; not recorded (restore keyring.json from the key custodian's backup)"
        for r in unconfirmed
    ]
    return entries, lines


def _late_entry(actor: str, r: Rotation) -> dict[str, object]:
    """The ``key.rotate`` entry of a rotation recorded after the fact: its ids, ``late`` and when
    the store's epoch of the new key started."""
    detail = {"old_key_id": r.old_key_id, "new_key_id": r.new_key_id, "late": True}
    if r.since is not None:
        detail["epoch_started_at"] = r.since.isoformat()
    return {
        "actor": actor,
        "role": "key_custodian",
        "action": ROTATE_ACTION,
        "object": f"key:{r.purpose}",
        "detail": detail,
    }


def _resumed_vault_key(con: duckdb.DuckDBPyConnection, keyring: KeyRing, actor: str) -> list[dict[str, object]]:
    """The ``key.rotate`` entry of the vault pair ``vault.pub``, ``keyring.json`` and the store's epoch
    all hold when the latest authentic entry on ``key:vault`` is the rotation's own
    ``key.rotate.stage`` naming it, so the audit trail names the key ``vault.pub`` holds
    (``safehaven.core.pins.check_vault_audited``): a pair this resume installed, or one an earlier
    resume installed and was killed before recording (found by review: its staged files gone,
    nothing then recorded it, and vault writes were refused for good). A pair staged some other
    way is installed as before, but vault writes stay refused; nothing when the rotation had
    recorded it already."""
    try:
        staged_id = keyring.get_public(VAULT).key_id  # the file, pinned to keyring.json
    except KeyRingError:
        return []
    if epoch_key_id(con, VAULT) != staged_id:
        return []
    entry = audit.latest_entry(con, VAULT_OBJECT, (STAGE_ACTION, *KEY_SET))
    if entry is None or entry.action != STAGE_ACTION or entry.fields.get("new_key_id") != staged_id:
        return []
    if not audit.authentic_from(con, entry.seq):
        return []
    detail = {**entry.fields, "resumed": True, "staged_seq": entry.seq}
    return [
        {
            "actor": actor,
            "role": "key_custodian",
            "action": ROTATE_ACTION,
            "object": VAULT_OBJECT,
            "detail": detail,
        }
    ]


def _resume_one(con: duckdb.DuckDBPyConnection, home: Home, keyring: KeyRing, purpose: str) -> str:
    committed = epoch_key_id(con, purpose)
    if purpose == VAULT:
        return _resume_vault(keyring, committed)
    staged = keyring.get(_staged(purpose))
    if committed == staged.key_id:
        _finish_haven(keyring, Key("haven", staged.material))
        _commit_crosswalks(home, staged.key_id)
        return f"{purpose}: finished; key {staged.key_id} is current"
    _discard_staged(keyring, purpose)
    return f"{purpose}: the rotation had not committed; the staged key was discarded"


def _settle_crosswalks(con: duckdb.DuckDBPyConnection, home: Home, keyring: KeyRing) -> list[str]:
    """Staged crosswalks left once no haven rotation is pending: those of the current haven key
    (the rotation committed and installed its key) are delivered, any other is shredded."""
    if "haven" in pending(keyring):
        return []
    done = []
    current = epoch_key_id(con, "haven")
    if current and (moved := _commit_crosswalks(home, current)):
        done.append(f"haven: {len(moved)} crosswalk(s) of the current key {current} were delivered")
    if shredded := _shred_staged_crosswalks(home):
        done.append(f"haven: {shredded} crosswalk(s) of a key that never became current were shredded")
    return done


def rotate(haven: Haven, purpose: str) -> RotationReport:
    """Rotate one purpose's key; refuses while an earlier rotation is unfinished.

    ``haven.keyring`` carries the key custodian (haven and vault rotations open the vault's private
    key); a haven rotation re-pseudonymises the landed tables of ``haven.contracts``.
    """
    home, keyring = haven.home, haven.keyring
    if live := runs.live_runs(home):
        raise RotationError(
            f"a pipeline run ({', '.join(live)}) holds the store; rotate the {purpose} key after it has finished"
        )
    if pending(keyring):
        raise RotationError(
            f"an earlier rotation of {', '.join(pending(keyring))} did not finish; "
            "run `safehaven keys rotate --resume` first"
        )
    if purpose == "haven":
        return rotate_haven(haven)
    if purpose == "store":
        return rotate_store(haven)
    if purpose == VAULT:
        return rotate_vault(haven)
    raise KeyRingError(f"unknown key purpose {purpose!r}; expected one of {PURPOSES}")
