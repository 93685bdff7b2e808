"""Recovering a lost key ring record: the key custodian's ``safehaven keys recover-record``.

Rules (CoP 27b-c; fail closed; ``safehaven.core.keys``, "Every key is pinned"):

* ``keys/keyring.json`` deleted or emptied beside the key files stops every use of a key it has
  no note of (``KeyRing._check_pinned``). Restoring the file from a backup is advice nobody can
  follow (it changes at every approval and rotation), so the way back is :func:`recover_record`.
* Each key file is read once and checked against the encrypted store, whose own encryption the
  file holder cannot rewrite without the store key:

  - the store key, by opening the store with it (AES-GCM: no other key opens it);
  - the audit key, by the trail: every entry verifies under it and no anchor names another key;
    never beside an empty trail (``safehaven.core.audit.key_problem``);
  - every other key, by the store's current epoch of its purpose (``governance.key_epochs``); a
    haven key rotation the store committed but whose key was never installed is accepted as the
    previous epoch's key, and ``safehaven keys rotate --resume`` is named to finish it;
  - the vault's public half and the haven key also by the audit trail's record of that key
    (``safehaven.core.pins.audited_key``);
  - a key with no epoch only where the store holds nothing made with it (the haven key: no data;
    an agreement's salt: nothing released or prepared under it; the vault: no entry);
  - a key a disposal destroyed (the disposal register, ``safehaven.core.pins.destroyed_keys``) is
    never brought back, nor one a disposal the audit trail records starting destroys (the ids its
    authentic ``dispose`` ``started`` entry names, :func:`_trail`): a disposal
    interrupted after its key step, with the record lost and a backup of the key put back, would
    otherwise have its crypto-shredding undone, since its resume skips a step journalled done; and
    the register, inside the store, is rewritable with the store key. What is not on the trail
    cannot be read there, so no agreement salt is recorded while the trail does not verify or has
    entries written off by a breach decision (:func:`_refuse_destroyed`); the refusal says to shred a
    destroyed key's file, never to restore it.

* Only the key custodian recovers: the passphrase must open the sealed vault private key on this
  host, which must be one of the haven's vault keys (the store's epochs, the trail's record, the
  note), never one only the files beside it name (:func:`_custodian_proven`), before anything is recorded;
  a refusal puts a damaged record set aside back.
* Recorded only when every key agrees, then audited as ``key.record.recover`` with ids only; if
  the entry cannot be written the notes are taken back. A key the store disagrees with is
  refused, naming the key it expects, and nothing is recorded.
* The store is never created here: a haven whose store file is gone while its anchors or an
  installed audit key remain is refused (restore the store); one with no store and no sign of use
  has nothing made with its keys and no trail to write to, so they are recorded unaudited (the
  first run starts the trail).
* A ``keyring.json`` that cannot be read as a record at all (empty, half-written, another shape)
  is kept as ``keyring.json.damaged-<time>`` and read as lost; the entry names the copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import duckdb

from safehaven.core import audit, pins, schema
from safehaven.core.home import Home
from safehaven.core.keys import (
    AGREEMENT_PREFIX,
    MANIFEST,
    PAIRS,
    VAULT,
    Key,
    KeyRing,
    KeyRingError,
    check_key_file,
    hex_key,
    key_id,
    open_sealed,
    staged,
    x25519_public,
)
from safehaven.core.store import MemoryLimitInvalid, Store, StoreError, table_exists
from safehaven.dispose.model import ACTION as DISPOSE
from safehaven.dispose.model import DESTROYS, STARTED

RECOVER_ACTION = "key.record.recover"
RESUME = "safehaven keys rotate --resume"
#: How a recovered key was checked, as the audit entry and the command say.
OPENS_STORE = "opens the store"
MATCHES_EPOCH = "the store's epoch"
TRAIL_VERIFIES = "the audit trail verifies under it"
UNUSED = "no epoch, and nothing in the store is made with it"
NO_STORE = "no store and no sign of use: nothing is made with it"
ROTATION_PENDING = f"the store's previous epoch: a rotation to the staged key awaits `{RESUME}`"


@dataclass(frozen=True)
class Recovered:
    """A key file recorded again by :func:`recover_record`, and how it was checked."""

    purpose: str
    key_id: str
    checked: str


def recover_record(home: Home, keyring: KeyRing, *, actor: str) -> list[Recovered]:
    """Record again the key files a lost ``keyring.json`` noted, each checked against the store
    (module docstring); audited. Returns what was recorded ([]: every key file is noted).
    Refused (KeyRingError), recording nothing, when any key disagrees with the store, and unless
    ``keyring``'s custodian proves the passphrase (:func:`_custodian_proven`)."""
    Store(home, keyring).recover()  # an interrupted store swap first: it replaces the store key file
    kept = _set_aside_damaged(keyring)
    try:
        found = keyring.unnoted()
        checked = _checked(home, keyring, found) if found else []
    except BaseException:
        _put_back(keyring, kept)  # a refusal leaves the record as it found it (found by review)
        raise
    if not found:
        return []
    if not home.store_file.exists():
        keyring.note_recovered({item.purpose: found[item.purpose] for item in checked})  # type: ignore[misc]
        return checked  # nothing is made with them and there is no trail: the first run starts it
    try:
        keyring.note_recovered({item.purpose: found[item.purpose] for item in checked})  # type: ignore[misc]
        with Store(home, keyring).connect() as con:
            detail = {item.purpose: {"key_id": item.key_id, "checked": item.checked} for item in checked}
            audit.append(
                con,
                actor=actor,
                role="key_custodian",
                action=RECOVER_ACTION,
                object="key:record",
                detail={"recorded": detail, **({"damaged_record_kept_as": kept} if kept else {})},
                home=home,
            )
    except BaseException:
        for item in checked:
            keyring.forget_recovered(item.purpose, item.key_id)
        raise
    return checked


def _custodian_proven(keyring: KeyRing, accepted: tuple[str, ...]) -> None:
    """Only the key custodian records key files again (CoP 27b-c; NIST SP 800-57 Part 2 roles): the
    passphrase given must open the sealed vault private key on this host, and that key must be the
    haven's current vault key, ``accepted[0]`` (:func:`_vault_expected`), or, while a rotation to
    it awaits ``--resume``, the key it replaces (``vault.pub`` itself is checked with the other key
    files, :func:`_check`). Never a retired key
    (it may be why the key was rotated), never one only the files or a store row name (found by
    review). The key ring refuses files it has no note of, so the file is opened here directly. A
    private half from before sealing (raw) proves itself by the same match: whoever holds it holds
    the custodian's key. With no vault key known and none on disk, the haven has no custodian
    secret yet and the recovery goes on without one; with one known and the pair gone, nothing is
    recorded (deleting the pair is no way round the proof).

    What this proves, and what it does not: that the person knows the custodian's passphrase, or
    holds the vault's private key, against every file and store row a person with the haven's files
    and store key can rewrite, except the audit trail itself. The audit key is kept with the other
    key files for the pipeline's appends, so whoever can read ``keys/`` can also append an authentic
    entry naming a vault key of their own (found by review); against that insider the gate is a
    procedure, and the write-once target and others' copies of the published heads are the record.
    A vault key id held where the audit key alone cannot write (the write-once target) would make
    it a boundary."""
    private, public = keyring.path(VAULT), keyring.public_path(VAULT)
    on_disk = any(p.exists() or p.is_symlink() for p in (private, public))
    if not on_disk and not accepted:
        return
    if not on_disk:
        raise KeyRingError(
            f"the vault key pair ({private}, {public}) is missing, but the haven's vault key is {accepted[0]}: the "
            "key custodian restores the pair from backup, then runs `safehaven keys recover-record`; nothing was "
            "recorded"
        )
    opened = key_id(_vault_public_of(keyring, private))
    accepted = accepted or tuple(k.key_id for k in [keyring.file_key(VAULT)] if k)  # a haven with no vault key yet
    if accepted and opened not in accepted:
        raise KeyRingError(
            f"the vault private key {private} is not the haven's vault key {accepted[0]}: restore the pair from the "
            "key custodian's backup; nothing was recorded"
        )


def _vault_expected(con: duckdb.DuckDBPyConnection, keyring: KeyRing, trail: _Trail) -> tuple[str, ...]:
    """The vault keys that prove the custodian: the haven's current vault key, then, while a
    rotation to it awaits ``--resume`` (``vault-next.pub`` names it), the key it replaces. From the
    audit trail's authentic entries that set the vault key (:func:`_trail`; only while it verifies:
    a later entry made unreadable must not bring back an earlier key) when it has any: the store's
    epochs and ``keyring.json`` are rewritable by whoever holds the store key and the files (found
    by review). Otherwise, a haven from before vault keys were audited: the store's current vault
    epoch, else the note."""
    if trail.problem:
        raise KeyRingError(f"{trail.problem}; nothing was recorded")
    if not trail.vault:
        current = pins.current_epochs(con).get(VAULT) or _noted_vault(keyring)
        return (current,) if current else ()
    _refuse_decision_after(trail.decisions, trail.vault[-1][0])
    ids = [kid for _, kid in trail.vault]
    pending = len(ids) > 1 and keyring.staged_public_id(VAULT) == ids[-1]
    return (ids[-1], ids[-2]) if pending else (ids[-1],)


def _refuse_decision_after(decisions: tuple[tuple[int, int], ...], latest: int) -> None:
    """A breach decision after the entry that names the vault key may have written off a later one
    (a rotation renamed, then the trail resumed), which would bring a retired key back as current:
    which key is current cannot be told, so nothing is recorded (found by review)."""
    after = [seq for _, seq in decisions if seq > latest]
    if after:
        raise KeyRingError(
            f"the audit trail holds a breach decision (entry {after[-1]}) after the entry that names the vault key "
            f"(entry {latest}), so which vault key is current cannot be told (a later one may have been written off): "
            "restore keys/keyring.json from the key custodian's backup; nothing was recorded"
        )


def _noted_vault(keyring: KeyRing) -> str | None:
    """``keyring.json``'s note of the vault key, when it has one (a record partly lost)."""
    try:
        return keyring.current_id(VAULT)
    except KeyRingError:
        return None


def _vault_public_of(keyring: KeyRing, private: Path) -> bytes:
    """The public half of the vault private key file: a sealed one opened with the custodian's
    passphrase (refused without a custodian or with a wrong one), a raw one (from before sealing) read."""
    if not private.is_file() or private.is_symlink():
        raise KeyRingError(
            f"the sealed vault private key {private} is not on this host, so the custodian's passphrase cannot be "
            "checked: bring it (the key custodian's backup) and run again; nothing was recorded"
        )
    check_key_file(private)
    raw = hex_key(private)
    if raw is not None:
        return x25519_public(raw)
    if keyring.custodian is None:
        raise KeyRingError(
            "recording key files again is the key custodian's: run `safehaven keys recover-record` as the "
            "custodian (it asks for the passphrase); nothing was recorded"
        )
    return x25519_public(open_sealed(private.read_bytes(), keyring.custodian.passphrase(), private))


def _put_back(keyring: KeyRing, kept: str | None) -> None:
    """Rename a damaged record set aside by :func:`_set_aside_damaged` back, when nothing took its place."""
    path = keyring.directory / MANIFEST
    if kept and not path.exists():
        (keyring.directory / kept).rename(path)


def _set_aside_damaged(keyring: KeyRing) -> str | None:
    """A ``keyring.json`` that cannot be read as a record (empty, half-written, another shape) is
    kept under another name and read as lost; returns that name (None when it reads)."""
    try:
        keyring.manifest()
        return None
    except KeyRingError:
        path = keyring.directory / MANIFEST
        kept = path.with_name(f"{MANIFEST}.damaged-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}")
        path.rename(kept)
        return kept.name


def _checked(home: Home, keyring: KeyRing, found: dict[str, Key | None]) -> list[Recovered]:
    """Each unnoted key checked against the store; refused naming every key the store disagrees with."""
    _refuse_unreadable(keyring, found)
    store = Store(home, keyring)
    if not store.path.exists():
        noted = _noted_vault(keyring)
        _custodian_proven(keyring, (noted,) if noted else ())
        return _without_store(home, keyring, found)
    store_key = found.get("store") or keyring.get("store")
    try:
        with store.opened_with(store_key) as con:
            trail = _trail(con, home, keyring, found.get(audit.KEY_PURPOSE))  # verified once for every check
            _refuse_destroyed(con, keyring, found, trail)
            _custodian_proven(keyring, _vault_expected(con, keyring, trail))
            epochs = pins.current_epochs(con)  # read once, not per key
            results = {p: _check(con, home, keyring, p, key, epochs) for p, key in found.items()}
    except MemoryLimitInvalid:
        raise  # the store's configuration, not its key: said as such (found by review)
    except StoreError as exc:
        raise KeyRingError(f"{keyring.path('store')}: {exc}") from None
    wrong = [problem for problem, _ in results.values() if problem]
    if wrong:
        raise KeyRingError("; ".join(wrong) + "; restore them from the key custodian's backup (nothing recorded)")
    return [Recovered(p, key.key_id, results[p][1]) for p, key in found.items() if key is not None and results[p][1]]


def _without_store(home: Home, keyring: KeyRing, found: dict[str, Key | None]) -> list[Recovered]:
    """No store file: the keys protect nothing only where nothing shows the haven was used."""
    with duckdb.connect() as con:  # an empty database: only the anchors and published files are judged
        evidence = audit.evidence_of_use(con, home)
    if evidence is None and keyring.exists(audit.KEY_PURPOSE):
        evidence = (
            "an installed audit key exists (a new trail's key is installed only once its first entry is anchored)"
        )
    if evidence:
        raise KeyRingError(
            f"the store {home.store_file} is missing, so no key can be checked ({evidence}); "
            "restore the store from backup, then run this again"
        )
    return [Recovered(p, key.key_id, NO_STORE) for p, key in found.items() if key is not None]


def _refuse_unreadable(keyring: KeyRing, found: dict[str, Key | None]) -> None:
    """A symmetric key file that holds no key is refused (a pair's missing half is :func:`_check`'s)."""
    for purpose, key in found.items():
        if key is None and purpose not in PAIRS:
            raise KeyRingError(
                f"{keyring.path(purpose)} holds no key the haven can read; restore it from the key custodian's backup"
            )


#: what a person does with a key file a disposal destroyed (or is destroying)
DESTROYED_ADVICE = (
    "a key a disposal destroys is never recorded again: shred that file (shred -u <file>), run `safehaven keys "
    "recover-record` again for the other keys, then finish the disposal if it is not finished: `safehaven dispose "
    "--resume`, or, with no disposal pending (no store/disposal.json), dispose of its agreement again "
    "(`safehaven dispose --agreement <id>`); nothing was recorded"
)


def _refuse_destroyed(
    con: duckdb.DuckDBPyConnection, keyring: KeyRing, found: dict[str, Key | None], trail: _Trail
) -> None:
    """Refuse, recording nothing, when an unnoted key file holds a key a disposal destroyed or was
    to destroy (module docstring; CoP 43d, 49: crypto-shredding is for good), or holds an agreement's
    salt while the audit trail cannot vouch that no disposal did: it must verify whole and hold no
    breach decision, since what is not on the trail cannot be read there, and a decision that says
    nothing was lost is not taken at its word (found by review)."""
    by_agreement = trail.destroyed_agreements
    destroyed = {**trail.destroyed, **pins.destroyed_keys(con)}
    gone = []
    for purpose, key in found.items():
        disposal = None if key is None else destroyed.get(key.key_id)
        if disposal is None and purpose.startswith(AGREEMENT_PREFIX):  # a disposal from before its entry named keys
            disposal = by_agreement.get(purpose.removeprefix(AGREEMENT_PREFIX))
        if key is not None and disposal is not None:
            where = _file(keyring, purpose)
            gone.append(f"{where} holds key {key.key_id}, which disposal {disposal} destroyed or was to destroy")
    if gone:
        raise KeyRingError("; ".join(gone) + f"; {DESTROYED_ADVICE}")
    salts = [str(_file(keyring, p)) for p, key in found.items() if key is not None and p.startswith(AGREEMENT_PREFIX)]
    problem = trail.problem or (
        f"the trail holds a breach decision (entry {trail.decisions[-1][1]}), and entries before it may have been lost"
        if trail.decisions
        else None
    )
    if salts and problem:
        raise KeyRingError(
            f"{', '.join(salts)}: whether a disposal destroyed these agreement keys cannot be told, because {problem}; "
            "a key a disposal destroyed is never recorded again, so they are not recorded by this command: restore "
            "keys/keyring.json from the key custodian's backup; nothing was recorded"
        )


@dataclass(frozen=True)
class _Trail:
    """The audit trail as a recovery reads it, once (:func:`_trail`): why it does not verify (None
    when it does), the breach decisions it holds ((lost_from, seq), as ``VerifyResult.breaks``),
    the (seq, key id) of each authentic entry that set the vault key, in order, and what the
    authentic entries recording a disposal's start say it destroys (CoP 43d, 49: crypto-shredding
    is for good; module docstring): key id -> disposal, from the ids the entry names, and
    agreement -> disposal for an agreement's disposal started before its entries named their keys
    (its salt, whatever its id). That no such entry is missing is :func:`_refuse_destroyed`'s to
    judge."""

    problem: str | None
    decisions: tuple[tuple[int, int], ...]
    vault: list[tuple[int, str]]
    destroyed: dict[str, str]
    destroyed_agreements: dict[str, str]


def _trail(con: duckdb.DuckDBPyConnection, home: Home, keyring: KeyRing, audit_key: Key | None) -> _Trail:
    """Read the trail under the audit key file being recovered when it is unnoted (its own check,
    :func:`_check`, refuses a trail that does not verify under it), else verified whole under the
    recorded key."""
    problem = None
    if audit_key is None:
        result = audit.verify(con, home, keyring=keyring)
        decisions = result.breaks
        if not result.ok:
            problem = f"the audit trail does not verify ({result.reason}): run `safehaven audit verify`"
    else:
        decisions = audit.written_off(con, audit_key)
    entries = audit.authentic_entries(con, [*pins.KEY_SET, DISPOSE], home, key=audit_key)  # one pass for both
    vault = [
        (e.seq, str(e.fields.get(pins.KEY_SET[e.action])))
        for e in entries
        if e.action in pins.KEY_SET and e.object == pins.VAULT_OBJECT
    ]
    by_key: dict[str, str] = {}
    by_agreement: dict[str, str] = {}
    for entry in (e for e in entries if e.action == DISPOSE and e.outcome == STARTED):
        disposal, ids = entry.object.removeprefix("disposal:"), entry.fields.get(DESTROYS)
        if isinstance(ids, list):
            by_key |= {str(kid): disposal for kid in ids}
        elif entry.agreement:
            by_agreement[entry.agreement] = disposal
    return _Trail(problem, decisions, vault, by_key, by_agreement)


def _check(
    con: duckdb.DuckDBPyConnection, home: Home, keyring: KeyRing, purpose: str, key: Key | None, epochs: dict[str, str]
) -> tuple[str | None, str]:
    """(what is wrong, or None; how it was checked, "" for a file left alone) for one unnoted key."""
    if key is None:
        return _missing_half(con, keyring, purpose, epochs.get(purpose))
    if purpose == "store":
        return None, OPENS_STORE
    epoch = epochs.get(purpose)
    if epoch is not None and epoch != key.key_id:
        return _not_epoch(con, keyring, purpose, key, epoch)
    if purpose == audit.KEY_PURPOSE:
        problem = audit.key_problem(con, home, key)
        return (f"{_file(keyring, purpose)} holds key {key.key_id}, but {problem}" if problem else None), TRAIL_VERIFIES
    if purpose == VAULT and (problem := _trail_disagrees(con, keyring, purpose, key)):
        return problem, ""
    if epoch is None and _made_with(con, purpose):
        return (
            f"the store has no epoch of the {purpose} key though it holds data made with one: the store was edited "
            "(restore it from backup)",
            "",
        )
    if purpose == "haven" and (problem := _trail_disagrees(con, keyring, purpose, key)):
        return problem, ""
    return None, MATCHES_EPOCH if epoch else UNUSED


def _trail_disagrees(con: duckdb.DuckDBPyConnection, keyring: KeyRing, purpose: str, key: Key) -> str | None:
    """What is wrong when the audit trail's latest entry setting ``purpose``'s key (the vault's, the
    haven's: ``safehaven.core.pins.audited_key``) names another key than the file holds; else None."""
    audited = pins.audited_key(con, f"key:{purpose}")
    if audited and audited[1] and audited[1] != key.key_id:
        return f"{_file(keyring, purpose)} holds key {key.key_id}, but the audit trail names {purpose} key {audited[1]}"
    return None


def _not_epoch(
    con: duckdb.DuckDBPyConnection, keyring: KeyRing, purpose: str, key: Key, epoch: str
) -> tuple[str | None, str]:
    """A key that is not its purpose's current epoch: accepted only as the previous epoch's key of a
    rotation the store committed and whose staged key is the current epoch (``--resume`` installs it)."""
    if purpose in PAIRS:
        next_id = keyring.staged_public_id(purpose)
    else:
        next_key = keyring.file_key(staged(purpose))
        next_id = next_key.key_id if next_key else None
    if next_id == epoch and _previous_epoch(con, purpose) == key.key_id:
        return None, ROTATION_PENDING
    return f"{_file(keyring, purpose)} holds key {key.key_id}, but the store's data was made with key {epoch}", ""


def _missing_half(
    con: duckdb.DuckDBPyConnection, keyring: KeyRing, purpose: str, epoch: str | None
) -> tuple[str | None, str]:
    """A pair whose public half is missing or unreadable: refused once the store pins the pair; else
    an unfinished first creation, left for ``safehaven keys init-vault`` (it shreds the orphan)."""
    if epoch is None and not pins.vault_holds_entries(con):
        return None, ""
    return (
        f"{keyring.public_path(purpose)} is missing or unreadable; restore the public half of key {epoch or '-'} "
        "from the key custodian's backup",
        "",
    )


def _made_with(con: duckdb.DuckDBPyConnection, purpose: str) -> bool:
    """Whether the store holds anything made with ``purpose``'s key (a key with no epoch must not)."""
    if purpose == "haven":
        return audit.holds_data(con)
    if purpose == VAULT:
        return pins.vault_holds_entries(con)
    if purpose.startswith(AGREEMENT_PREFIX):
        return pins.released_under(con, purpose.removeprefix(AGREEMENT_PREFIX))
    return False


def _previous_epoch(con: duckdb.DuckDBPyConnection, purpose: str) -> str | None:
    """The key id of the epoch before ``purpose``'s current one, if any."""
    if not table_exists(con, *schema.KEY_EPOCHS.split(".")):
        return None
    row = con.execute(
        f"SELECT key_id FROM {schema.KEY_EPOCHS} WHERE purpose = ? ORDER BY started_at DESC LIMIT 1 OFFSET 1",
        [purpose],
    ).fetchone()
    return str(row[0]) if row else None


def _file(keyring: KeyRing, purpose: str) -> object:
    """The file a purpose's key id is read from (a pair: its public half)."""
    return keyring.public_path(purpose) if purpose in PAIRS else keyring.path(purpose)
