"""Key epochs: every key pinned a second time, inside the encrypted store.

Rules (CoP 27b-c; NIST SP 800-57 Part 1 section 8.2, key states):

* ``governance.key_epochs`` (purpose, key id, started, retired) records the id of the key each
  purpose's data is made with: the haven key (pseudonyms), the vault public key (wrapped data
  keys), the audit key (the chain's MAC) and each agreement's pseudonym salt
  (``agreement-<id>``). The store is encrypted under its own key, so the record cannot be
  edited together with a key file and ``keyring.json``; the store key itself is pinned by
  ``keyring.json`` and by the store's authenticated encryption.
* Before a key is used its file must hold the key of the current epoch. A missing key is never
  re-created; a different one (swapped, substituted, an old backup) is refused. The message
  names the key id expected and says to restore it from the key custodian's backup.
* A purpose without an epoch gets one on first use, from the key the key ring records.
* **Vault writes** (``vault_public``): refused while a vault-key rotation is pending (a staged
  pair under ``keys/vault-next.*``), so no data key is wrapped to a key that a resumed rotation
  would then replace; after the rotation commits, the store's epoch names the new key and the
  old ``vault.pub`` no longer matches it until ``safehaven keys rotate --resume`` installs it.
  The pipeline never creates the vault pair: the key custodian does (``safehaven keys init-vault``).
* **Every installed rotation is on record** (:func:`unrecorded_rotations`): a haven key
  rotation that was installed with no authentic ``key.rotate`` entry (the process was killed
  between installing the key and appending the entry, or ``--resume`` installed it) refuses the
  use of that key (:func:`check_rotations_recorded`: the haven key, vault writes, :func:`verify`)
  until the key custodian runs ``safehaven keys rotate --resume``, which records it then
  (``"late": true``). Only a rotation the store's key epochs and the key file confirm is
  recorded; a claim of ``keyring.json`` alone is reported, never recorded. The vault key is not
  recorded late so: it is on record only by its own rotation's entries (next rule), since the
  store's epochs and ``keyring.json`` are what a store-key holder substituting ``vault.pub`` rewrites.
* **The vault key is the audit trail's** (:func:`check_vault_audited`, every vault write): besides
  ``keyring.json`` and the store's epoch, which anyone holding the store key and the haven's files
  can rewrite together, ``vault.pub`` must be the key the latest authentic audit entry that set the
  vault key names (``key.create`` by ``safehaven keys init-vault``, ``key.rotate`` by a vault-key
  rotation or its ``--resume``, ``key.adopt`` below, each on ``key:vault``): that entry is keyed
  under the audit key, chained and anchored, so it cannot be forged with the store key. Otherwise
  a substituted ``vault.pub`` would have every new data key wrapped to someone else's key,
  silently. A different key, or an entry that does not verify, is refused, naming the key the
  trail expects; the fix is to restore ``keys/vault.pub`` from the key custodian's backup (a new
  vault key is only ever installed by an audited rotation, ``safehaven keys rotate --purpose vault``).
  A haven whose trail records no vault key (a pair made before its creation was audited, e.g.
  by ``KeyRing.create_keypair`` directly) has it **adopted once**, by a ``key.adopt`` entry at
  its first vault write, only while the vault holds no entry (``vault.data_keys`` and
  ``vault.identity`` empty: nothing has been wrapped to any key yet) and the whole trail
  verifies (a ``key.create`` renamed or removed with the store key must not pass for none, as
  ``safehaven.protect.register_seal.last_seal`` reads a missing seal). With entries and no key
  on record it is refused: the key custodian rotates the vault key, which records it.
* **The haven key is the audit trail's** (:func:`check_haven_audited`, every use of the haven key,
  ``safehaven.protect.haven.haven_key``): as for the vault key, ``keyring.json`` and the store's
  epoch can be rewritten together by whoever holds the store key, and a haven key swapped so would
  make pseudonyms that no longer match the objection register's, so objectors' records would pass
  unseen (found by review). The key must be the one the latest haven-key entry names (``key.create``
  when the haven made its first key, ``key.rotate`` by a haven-key rotation or its ``--resume``,
  ``key.adopt``), that entry and every one after it authentic, for a pipeline step as for a command
  (a run verifies the whole chain at its start, but does not hold the store between its steps). A haven made
  before this rule has its key adopted once, only while the whole trail verifies, and never inside
  a caller's transaction. A different key is refused, naming the key the trail records and saying
  to restore ``keys/haven.key`` from the key custodian's backup; with no key file and no epoch, a
  key the trail records is never made again. A haven-key rotation writes ``key.rotate.stage``
  before it re-keys anything, and ``--resume`` records late only a rotation so staged, so a key
  swapped together with ``keyring.json`` and the store's epochs dressed up as an interrupted
  rotation is never recorded (found by review).
* **Agreement salts** (``agreement_key``): created once, when the agreement is first approved
  (or, for an agreement approved by editing its file, at its first release); never re-created
  once recorded, once released or prepared for release under, or after disposal destroyed it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import datetime

import duckdb

from safehaven.core import audit, schema
from safehaven.core.home import Home
from safehaven.core.keys import (
    VAULT,
    Key,
    KeyRing,
    KeyRingError,
    agreement_purpose,
    derive_agreement_key,
    missing_agreement_key,
)
from safehaven.core.store import in_transaction, table_exists

EPOCHS = schema.KEY_EPOCHS
#: Symmetric keys whose file is checked against the store's epoch by :func:`verify`. The store
#: key is pinned by the store itself (AES-GCM: no other key opens it) and by ``keyring.json``.
SYMMETRIC = ("audit", "haven")
RESUME = "safehaven keys rotate --resume"
#: Purposes whose installed rotations must each have a ``key.rotate`` entry, recorded late by
#: ``--resume`` when a kill left one without (:func:`unrecorded_rotations`). The store key is left
#: out: physical disposal re-keys it as well (``Store.rebuild``), so its key ring history is not its
#: rotations. The vault key too: it is on record only by its own rotation's entries
#: (``key.rotate.stage`` before anything is written, ``key.rotate`` before the install;
#: :func:`check_vault_audited`), never late from ``keyring.json`` and the store's epochs, which
#: whoever holds the store key can rewrite together with ``vault.pub``.
ROTATED = ("haven",)
#: The audit action of a rotation (``safehaven.protect.rotation``), detail ``old_key_id``, ``new_key_id``.
ROTATE_ACTION = "key.rotate"
#: The entry a rotation writes before it re-keys anything (same detail); ``safehaven.protect.rotation``.
STAGE_ACTION = "key.rotate.stage"


def ensure_epochs(con: duckdb.DuckDBPyConnection) -> None:
    schema.ensure(con, EPOCHS)


def epoch_key_id(con: duckdb.DuckDBPyConnection, purpose: str = "haven") -> str | None:
    """The id of the key the store's data of ``purpose`` is made with, if recorded (read-only safe)."""
    schema, _, table = EPOCHS.partition(".")
    if not table_exists(con, schema, table):
        return None
    row = con.execute(
        f"SELECT key_id FROM {EPOCHS} WHERE purpose = ? AND retired_at IS NULL ORDER BY started_at DESC LIMIT 1",
        [purpose],
    ).fetchone()
    return row[0] if row else None


def start_epoch(con: duckdb.DuckDBPyConnection, purpose: str, kid: str) -> None:
    """Make ``kid`` the current epoch of ``purpose``, retiring the one before (call in a transaction)."""
    ensure_epochs(con)
    con.execute(f"UPDATE {EPOCHS} SET retired_at = now() WHERE purpose = ? AND retired_at IS NULL", [purpose])
    con.execute(f"INSERT INTO {EPOCHS} VALUES (?, ?, now(), NULL)", [purpose, kid])


def current_epochs(con: duckdb.DuckDBPyConnection) -> dict[str, str]:
    """Every purpose's current epoch key id (as :func:`epoch_key_id` reads one), in one query."""
    schema, _, table = EPOCHS.partition(".")
    if not table_exists(con, schema, table):
        return {}
    rows = con.execute(  # the same order as epoch_key_id's, per purpose
        "SELECT purpose, key_id FROM (SELECT purpose, key_id, row_number() OVER (PARTITION BY purpose "
        f"ORDER BY started_at DESC) AS n FROM {EPOCHS} WHERE retired_at IS NULL) WHERE n = 1"
    ).fetchall()
    return {str(purpose): str(kid) for purpose, kid in rows if kid is not None}


def check_epoch(con: duckdb.DuckDBPyConnection, purpose: str, kid: str, what: str, *, writable: bool = True) -> None:
    """Refuse ``kid`` for ``purpose`` unless it is the current epoch; record it when there is none
    (on a connection without the store's governance zone there is nothing to pin against)."""
    _check_recorded(con, purpose, kid, what, epoch_key_id(con, purpose), writable=writable)


def _check_recorded(
    con: duckdb.DuckDBPyConnection, purpose: str, kid: str, what: str, recorded: str | None, *, writable: bool
) -> None:
    """:func:`check_epoch` against ``recorded``, the epoch read on this connection just before."""
    if recorded is None:
        if writable and _has_governance(con):
            start_epoch(con, purpose, kid)
        return
    if kid != recorded:
        raise KeyRingError(
            f"{what} holds key {kid}, but the store's data was made with key {recorded}; restore key {recorded} "
            f"from the key custodian's backup, or finish a pending rotation ({RESUME})"
        )


def _has_governance(con: duckdb.DuckDBPyConnection) -> bool:
    row = con.execute(
        "SELECT count(*) FROM information_schema.schemata WHERE catalog_name = current_database() "
        "AND schema_name = 'governance'"
    ).fetchone()
    return bool(row and row[0])


def verify(con: duckdb.DuckDBPyConnection, keyring: KeyRing, *, writable: bool = True) -> None:
    """Check the audit and haven key files against their epochs (each pipeline connection), and that
    every installed haven and vault key rotation is on record (:func:`check_rotations_recorded`).

    Both epochs are read in one query on this connection, right before the checks (issue 22:
    it was four lookups, each with its catalog check); each key file is still read and checked
    here, every connection. Recording the audit key's first epoch does not touch the haven's.
    """
    epochs = current_epochs(con)
    for purpose in SYMMETRIC:
        pinned = epochs.get(purpose)
        recorded = pinned or keyring.current_id(purpose)
        if not keyring.exists(purpose):
            if recorded or keyring.recorded(purpose):
                raise KeyRingError(
                    f"key {purpose!r} (key {recorded or '-'}) is missing ({keyring.path(purpose)}); "
                    "restore it from the key custodian's backup"
                )
            continue
        kid = keyring.get(purpose).key_id
        _check_recorded(con, purpose, kid, str(keyring.path(purpose)), pinned, writable=writable)
    check_rotations_recorded(con, keyring)


@dataclass(frozen=True)
class Rotation:
    """A rotation of ``purpose`` from ``old_key_id`` to ``new_key_id``; ``since`` when the store's
    epoch of the new key started (the re-keying committed)."""

    purpose: str
    old_key_id: str
    new_key_id: str
    since: datetime | None = None
    #: the store and the key file show it, but no ``key.rotate.stage`` entry names it (never recorded)
    unstaged: bool = False


def unrecorded_rotations(
    con: duckdb.DuckDBPyConnection, keyring: KeyRing, purposes: tuple[str, ...] = ROTATED
) -> tuple[list[Rotation], list[Rotation]]:
    """Rotations the key ring records as installed for which the authentic audit trail holds no
    ``key.rotate`` entry: ``(real, unconfirmed)``.

    Rule (CoP 23d, every change recorded; CoP 27b-c and NIST SP 800-57 Part 1 section 8.2, which
    key protects the data since when): every installed rotation of a :data:`ROTATED` key (the
    haven key; the vault key is on record by its own rotation's entries, :func:`check_vault_audited`)
    is on record. A rotation killed between installing its key and appending its entry left none, and
    moving the entry before the install records rotations that then never finish. So the key
    ring's record of each purpose's retired and current ids is compared, here and only here,
    with the ``key.rotate`` entries whose own hash verifies under the audit key
    (``audit.authentic_entries``). A claimed step ``old -> new`` with no entry is *real* only when
    the store agrees: ``governance.key_epochs`` has the epoch of ``old`` retired for that of
    ``new`` (written in the re-keying transaction), while ``new`` is current its key file holds
    it, and the rotation's own ``key.rotate.stage`` entry (written before it re-keyed anything)
    names both ids: the store's epochs and ``keyring.json`` alone are what a store-key holder
    rewrites. Anything else (``keyring.json`` edited to claim a rotation) is *unconfirmed* and is
    never recorded as a rotation. A first key (created, not rotated) is no step, so the pipeline's
    first epochs and havens that never rotated expect nothing. A rotation the store shows but no
    stage entry names (``unstaged``: a swap, or a rotation made before haven rotations were
    staged) is never recorded; the haven key is then accepted only as the trail's record of it
    allows (:func:`check_haven_audited`: a haven whose trail names no haven key yet, one from
    before that record, adopts its current key once). Nothing is read from the store unless the
    key ring claims a step."""
    claims = [(p, old, new) for p in purposes for old, new in keyring.replacements(p)]
    if not claims:
        return [], []
    recorded = _recorded_rotations(con)
    staged = _recorded_rotations(con, STAGE_ACTION)
    steps = {purpose: _epoch_steps(con, purpose) for purpose in purposes}
    real: list[Rotation] = []
    unconfirmed: list[Rotation] = []
    for purpose, old, new in claims:
        if (purpose, old, new) in recorded:
            continue
        shown = (old, new) in steps[purpose] and (
            keyring.current_id(purpose) != new or _file_id(keyring, purpose) == new
        )
        confirmed = shown and (purpose, old, new) in staged
        rotation = Rotation(purpose, old, new, steps[purpose].get((old, new)), unstaged=shown and not confirmed)
        (real if confirmed else unconfirmed).append(rotation)
    return real, unconfirmed


def check_rotations_recorded(
    con: duckdb.DuckDBPyConnection, keyring: KeyRing, purposes: tuple[str, ...] = ROTATED
) -> None:
    """Refuse a key whose installed rotation is not on record (:func:`unrecorded_rotations`),
    naming the command that records it."""
    real, _ = unrecorded_rotations(con, keyring, purposes)
    if real:
        r = real[0]
        raise KeyRingError(
            f"the {r.purpose} key rotation {r.old_key_id} -> {r.new_key_id} was installed but is pending its "
            f"audit entry (the rotation was stopped before it); the key custodian runs `{RESUME}`, which records it"
        )


def _recorded_rotations(con: duckdb.DuckDBPyConnection, action: str = ROTATE_ACTION) -> set[tuple[str, str, str]]:
    """(purpose, old id, new id) of every authentic ``key.rotate`` entry (or ``action``'s: a rotation's
    ``key.rotate.stage``, written before anything is re-keyed)."""
    found = set()
    for entry in audit.authentic_entries(con, [action]):
        fields = entry.fields
        found.add((entry.object.removeprefix("key:"), fields.get("old_key_id"), fields.get("new_key_id")))
    return found


def _epoch_steps(con: duckdb.DuckDBPyConnection, purpose: str) -> dict[tuple[str, str], datetime]:
    """(old id, new id) -> when the new epoch started, for each epoch of ``purpose`` the store
    retired for the next one."""
    schema_name, _, table = EPOCHS.partition(".")
    if not table_exists(con, schema_name, table):
        return {}
    rows = con.execute(
        f"SELECT key_id, started_at, retired_at FROM {EPOCHS} WHERE purpose = ? ORDER BY started_at, key_id",
        [purpose],
    ).fetchall()
    return {(a[0], b[0]): b[1] for a, b in itertools.pairwise(rows) if a[2] is not None}


def _file_id(keyring: KeyRing, purpose: str) -> str | None:
    """The id of the key ``purpose``'s file holds (a pair: its public half); None when unreadable."""
    try:
        return (keyring.get_public(purpose) if purpose == VAULT else keyring.get(purpose)).key_id
    except KeyRingError:
        return None


def vault_public(con: duckdb.DuckDBPyConnection, keyring: KeyRing, home: Home | None = None) -> Key:
    """The vault public key for a vault write, pinned (module docstring); the pipeline's only vault key.
    ``home``: the haven whose audit trail records the key, when ``con`` was not opened by its store."""
    if keyring.staged_pair(VAULT):
        raise KeyRingError(
            "a vault key rotation is pending (keys/vault-next.*): vault writes are refused until the key "
            f"custodian runs `{RESUME}`"
        )
    path = keyring.public_path(VAULT)
    if not path.exists() and not path.is_symlink():
        expected = epoch_key_id(con, VAULT) or keyring.current_id(VAULT)
        if expected:
            raise KeyRingError(
                f"the vault public key {path} (key {expected}) is missing; restore it from the key custodian's backup"
            )
        raise KeyRingError(
            "the identity vault has no key pair yet; the key custodian creates it with `safehaven keys init-vault`"
        )
    public = keyring.get_public(VAULT)
    check_epoch(con, VAULT, public.key_id, str(path))
    check_vault_audited(con, public.key_id, str(path), home)
    return public


#: Audit actions on a key's object (``key:<purpose>``) that set that key, and the detail field
#: naming it: the vault key's (:func:`check_vault_audited`) and the haven key's (:func:`check_haven_audited`).
KEY_SET = {"key.create": "key_id", "key.rotate": "new_key_id", "key.adopt": "key_id"}
VAULT_OBJECT = f"key:{VAULT}"
HAVEN_OBJECT = "key:haven"
CREATE = "key.create"
ADOPT = "key.adopt"
ROTATE_VAULT = "safehaven keys rotate --purpose vault"
ROTATE_HAVEN = "safehaven keys rotate --purpose haven"


def audited_key(con: duckdb.DuckDBPyConnection, object: str) -> tuple[audit.Entry, str | None] | None:
    """The latest audit entry on ``object`` (``key:<purpose>``) that set that key and the key id it
    names (unverified: None when the trail records none)."""
    entry = audit.latest_entry(con, object, tuple(KEY_SET))
    if entry is None:
        return None
    kid = entry.fields.get(KEY_SET[entry.action])
    return entry, kid if isinstance(kid, str) else None


@dataclass(frozen=True)
class _Audited:
    """A key the audit trail pins (:func:`check_haven_audited`, :func:`check_vault_audited`): its name
    as messages say it, its audit object, the file a custodian restores, and the one command that
    installs a new one."""

    name: str
    object: str
    file: str
    rotate: str
    #: what else clears an entry that does not verify, besides restoring the key it names
    or_else: str = ""


HAVEN = _Audited("haven", HAVEN_OBJECT, "keys/haven.key", ROTATE_HAVEN)
VAULT_PIN = _Audited(
    "vault", VAULT_OBJECT, "keys/vault.pub", ROTATE_VAULT, f" or records the key with `{ROTATE_VAULT}`"
)


def _check_on_record(
    con: duckdb.DuckDBPyConnection,
    pin: _Audited,
    recorded: tuple[audit.Entry, str | None],
    kid: str,
    what: str,
    home: Home | None,
) -> None:
    """Refuse key ``kid`` (held in ``what``) unless the trail's entry that set ``pin``'s key and every
    entry after it are authentic (``audit.authentic_from``) and it names ``kid``: one rule for the
    haven and vault keys, for a command and a pipeline step alike (module docstring; CoP 27b-c). A
    step walks the whole tail too: its run verified the trail at its start, but the run does not
    hold the store between steps, so an entry renamed since would otherwise bring back an old key
    (found by review)."""
    entry, expected = recorded
    if not audit.authentic_from(con, entry.seq, home):
        raise KeyRingError(
            f"the audit entry that set the {pin.name} key (seq {entry.seq}, key {expected or '-'}) does not verify, "
            f"so {what} (key {kid}) cannot be checked against it: run `safehaven audit verify`; the key custodian "
            f"then restores key {expected or '-'} from backup{pin.or_else}"
        )
    if kid != expected:
        raise KeyRingError(
            f"{what} holds {pin.name} key {kid}, but the audit trail records {pin.name} key {expected or '-'} "
            f"({entry.action}, seq {entry.seq}); restore {pin.file} (key {expected or '-'}) from the key "
            f"custodian's backup (a new {pin.name} key is installed only by `{pin.rotate}`)"
        )


def check_haven_audited(
    con: duckdb.DuckDBPyConnection,
    kid: str,
    what: str,
    home: Home | None = None,
    *,
    record: bool = True,
) -> None:
    """Refuse haven key ``kid`` (held in ``what``) unless it is the key the latest audit entry that
    set the haven key names, that entry and every one after it authentic; record it when the trail
    records none (module docstring, "The haven key is the audit trail's"; CoP 27b-c,
    ``docs/rules.md`` "Pseudonymisation and encryption" and "Audit").

    A key with no record is one made before this rule, adopted once (``key.adopt``), only while the
    whole trail verifies (a record renamed or removed must not pass for none) and outside a
    transaction (:func:`haven_key_recordable`); a key the haven makes is recorded by its maker
    (``safehaven.protect.haven``: ``key.create``).
    Every entry from the one that set the key on is checked, by a pipeline step as by a command
    (found by review: a later ``key.rotate`` renamed with the store key otherwise brought back the
    key before it, and a run does not hold the store between its steps).
    ``record=False``: a reader (an agreement's key, :func:`agreement_key`, on a connection that may
    be read-only) records nothing; with no key on record it has nothing to check against, and the
    pipeline's next use of the haven key records it.
    """
    recorded = audited_key(con, HAVEN_OBJECT)
    if recorded is None:
        if record:
            haven_key_recordable(con, f"{what} holds haven key {kid}", home)
            record_haven_key(con, kid, home, created=False)
        return
    _check_on_record(con, HAVEN, recorded, kid, what, home)


def haven_key_recordable(con: duckdb.DuckDBPyConnection, what: str, home: Home | None = None) -> None:
    """Refuse to record a haven key (made, or adopted) inside the caller's transaction (the entry is
    appended in a transaction of its own), or unless the whole trail verifies: with its
    ``key.create`` renamed or removed with the store key, the trail would seem to record none (found
    by review). ``what``: the key, as the message names it. Called before anything is written."""
    if in_transaction(con):
        raise KeyRingError(
            f"{what}, which the audit trail does not record yet, and it cannot be recorded inside this "
            "transaction: run the nightly job (or `safehaven audit verify`) first, which records it"
        )
    if not audit.verify(con, home).ok:
        raise KeyRingError(
            f"{what}, but the audit trail records no haven key and does not verify, so no haven key is made or "
            "recorded: run `safehaven audit verify`, and restore keys/haven.key from the key custodian's backup"
        )


def record_haven_key(con: duckdb.DuckDBPyConnection, kid: str, home: Home | None, *, created: bool) -> None:
    """Append the entry naming the haven key the trail does not name yet, once
    :func:`haven_key_recordable` allowed it: ``key.create`` for a key just made, else ``key.adopt``."""
    _record_key(con, HAVEN_OBJECT, kid, home, CREATE if created else ADOPT)


def _record_key(con: duckdb.DuckDBPyConnection, object: str, kid: str, home: Home | None, action: str) -> None:
    """The pipeline's entry setting ``object``'s key (``key:<purpose>``) to ``kid`` (:data:`KEY_SET`)."""
    audit.append(
        con, actor="pipeline", role="pipeline", action=action, object=object, detail={"key_id": kid}, home=home
    )


def check_vault_audited(con: duckdb.DuckDBPyConnection, kid: str, what: str, home: Home | None = None) -> None:
    """Refuse vault key ``kid`` (held in ``what``) unless it is the key the latest authentic audit
    entry that set the vault key names; adopt it once when the trail records none and the vault
    holds no entry (module docstring, "The vault key is the audit trail's"; CoP 27b-c,
    ``docs/rules.md`` "Pseudonymisation and encryption" and "Audit")."""
    recorded = audited_key(con, VAULT_OBJECT)
    if recorded is None:
        if vault_holds_entries(con):
            raise KeyRingError(
                f"{what} holds vault key {kid}, but the audit trail records no vault key while the vault holds "
                f"entries; restore keys/vault.pub from the key custodian's backup, and the key custodian "
                f"records the key with an audited rotation (`{ROTATE_VAULT}`)"
            )
        if not audit.verify(con, home).ok:  # a record renamed or removed must not pass for none (last_seal's rule)
            raise KeyRingError(
                f"{what} holds vault key {kid}, but the audit trail records no vault key and does not verify, so "
                "the key is not adopted: run `safehaven audit verify`, and restore keys/vault.pub from the key "
                "custodian's backup"
            )
        _record_key(con, VAULT_OBJECT, kid, home, ADOPT)  # a key never audited, before its first entry
        return
    _check_on_record(con, VAULT_PIN, recorded, kid, what, home)


def vault_holds_entries(con: duckdb.DuckDBPyConnection) -> bool:
    """Whether anything was ever wrapped to a vault key: a data key or an entry in the vault."""
    for held in (schema.VAULT_DATA_KEYS, schema.VAULT_IDENTITY):
        name, _, table = held.partition(".")
        if table_exists(con, name, table) and con.execute(f"SELECT count(*) FROM {held}").fetchone()[0]:
            return True
    return False


def agreement_salt(con: duckdb.DuckDBPyConnection, keyring: KeyRing, agreement_id: str, *, create: bool = True) -> Key:
    """An agreement's pseudonym salt, pinned to the store's epoch; created only if it never existed
    and nothing was ever released under the agreement (module docstring)."""
    purpose = agreement_purpose(agreement_id)
    if not keyring.exists(purpose):
        recorded = epoch_key_id(con, purpose)
        problem = _destroyed_salt(con, agreement_id, recorded) or missing_agreement_key(keyring, agreement_id, recorded)
        if problem is None and released_under(con, agreement_id):
            problem = missing_agreement_key(keyring, agreement_id, "recorded in the release register")
        if problem or not create:
            raise KeyRingError(problem or f"agreement {agreement_id!r} has no pseudonym key yet")
    salt = keyring.get_or_create(purpose)
    check_epoch(con, purpose, salt.key_id, str(keyring.path(purpose)))
    return salt


def destroyed_keys(con: duckdb.DuckDBPyConnection) -> dict[str, str]:
    """Key id -> the disposal that destroyed it, from the disposal register (its certificates'
    ``key_ids_destroyed``): the store's own record, which a lost ``keyring.json`` does not take with it."""
    schema_name, _, table = schema.DISPOSAL_REGISTER.partition(".")
    if not table_exists(con, schema_name, table):
        return {}
    rows = con.execute(  # one row per disposal
        f"SELECT disposal_id, key_ids_destroyed FROM {schema.DISPOSAL_REGISTER} WHERE key_ids_destroyed IS NOT NULL"
    ).fetchall()
    return {kid.strip(): str(disposal) for disposal, ids in rows for kid in str(ids).split(",") if kid.strip()}


def _destroyed_salt(con: duckdb.DuckDBPyConnection, agreement_id: str, recorded: str | None) -> str | None:
    """Why a missing salt the store's disposal register records as destroyed is gone for good, or None."""
    disposal = destroyed_keys(con).get(recorded or "")
    if disposal is None:
        return None
    return (
        f"agreement {agreement_id}'s pseudonym key {recorded} was destroyed by disposal {disposal}; "
        "its pseudonym domain is gone and nothing more is released under it (a destroyed key is never restored)"
    )


def agreement_key(con: duckdb.DuckDBPyConnection, keyring: KeyRing, agreement_id: str, *, create: bool = True) -> Key:
    """An agreement's pseudonym key: HKDF over the haven key with its pinned salt (``safehaven.core.keys``).

    The haven key is the store's current epoch and the audit trail's (:func:`check_haven_audited`) or
    refused (:func:`check_epoch`): a key file swapped or re-made beside an edited ``keyring.json``
    would otherwise give a recipient pseudonyms that link to nothing they hold, and
    re-identification a wrong person (found by review)."""
    salt = agreement_salt(con, keyring, agreement_id, create=create)
    haven = keyring.get("haven")
    what = f"the haven key file {keyring.path('haven')}"
    check_epoch(con, "haven", haven.key_id, what, writable=False)
    check_rotations_recorded(con, keyring, ("haven",))
    check_haven_audited(con, haven.key_id, what, record=False)  # found by review: releases derive from it
    return derive_agreement_key(haven.material, salt.material, agreement_id)


#: release requests (``safehaven.share.review.REQUESTS``): a prepared request's staged files
#: already hold pseudonyms under the agreement's salt, released or not
RELEASE_REQUESTS = "governance.release_requests"


def released_under(con: duckdb.DuckDBPyConnection, agreement_id: str) -> bool:
    """Whether anything was ever released, or prepared for release, under ``agreement_id`` (its
    salt must then exist)."""
    from safehaven.core.registers import RELEASE_REGISTER  # the registers import the store

    for held in (RELEASE_REGISTER, RELEASE_REQUESTS):
        schema, _, table = held.partition(".")
        if not table_exists(con, schema, table):
            continue
        if con.execute(f"SELECT count(*) FROM {held} WHERE agreement_id = ?", [agreement_id]).fetchone()[0]:
            return True
    return False
