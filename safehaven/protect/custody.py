"""Custody of the identity vault's key pair: created and sealed by the key custodian only.

Rules (NIST SP 800-57 Part 2, key custodian role; CoP 27b; ``safehaven.core.keys``):

* The pipeline never creates the vault pair (``safehaven.core.pins.vault_public`` refuses a
  vault write without one). The key custodian creates it once, its private half sealed under
  their passphrase, and the store records the vault epoch at once, so a later substitute for
  ``vault.pub`` is refused from the first run. The ``key.create`` entry naming its id is what
  every vault write checks ``vault.pub`` against (``safehaven.core.pins.check_vault_audited``).
* A key ring from before sealing holds the private half as raw hex, which the pipeline could
  read; the pipeline refuses to start on it (``KeyRing.check_custody``) until the custodian
  seals it in place (same pair, so no data key needs re-wrapping).
* Both acts are audited with key ids only.
* **A lost key ring record** (``keys/keyring.json`` deleted or emptied beside the key files) stops
  every use of a key it has no note of (``safehaven.core.keys.KeyRing._check_pinned``). The way
  back is :func:`recover_record` (``safehaven keys recover-record``), never a restored file nobody
  keeps: each key file is checked against the encrypted store, the store key by opening the store
  (AES-GCM: no other key opens it), every other key by the store's epoch of its purpose
  (``governance.key_epochs``), and recorded again only when every one agrees; a key with no epoch
  has protected nothing in the store yet. It is audited as ``key.record.recover`` with ids only.
  A key the store disagrees with is refused, naming the key the store expects, and nothing is
  recorded (CoP 27b-c; fail closed).
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb

from safehaven.core import audit
from safehaven.core.home import Home
from safehaven.core.keys import PAIRS, VAULT, Key, KeyRing, KeyRingError, staged
from safehaven.core.pins import current_epochs, epoch_key_id, start_epoch
from safehaven.core.store import Store, StoreError

RECOVER_ACTION = "key.record.recover"
#: How a recovered key was checked (:func:`recover_record`), as the audit entry says.
OPENS_STORE = "opens the store"
MATCHES_EPOCH = "the store's epoch"
NO_EPOCH = "no epoch: nothing in the store is made with it"
NO_STORE = "no store yet: nothing is made with it"
TRAIL_VERIFIES = "the audit trail verifies under it"


@dataclass(frozen=True)
class Recovered:
    """A key file recorded again by :func:`recover_record`, and how it was checked."""

    purpose: str
    key_id: str
    checked: str


def init_vault(home: Home, keyring: KeyRing, *, actor: str) -> Key:
    """Create the vault key pair (custodian only), record its epoch, audit it; returns the public key."""
    with Store(home, keyring).connect() as con:
        pinned = epoch_key_id(con, VAULT)
        if pinned:
            raise KeyRingError(
                f"the store's vault entries are wrapped to vault key {pinned}; restore that key pair "
                "from the key custodian's backup instead of creating a new one"
            )
        unfinished = keyring.unfinished_pair(VAULT)  # an earlier creation's orphaned private half, shredded
        public = keyring.create_keypair(VAULT)
        start_epoch(con, VAULT, public.key_id)
        shredded = {"unfinished_pair_shredded": True} if unfinished else {}
        _audit(con, home, actor, "key.create", {"key_id": public.key_id, **shredded})
    return public


def seal_vault(home: Home, keyring: KeyRing, *, actor: str) -> list[str]:
    """Seal an unsealed vault private key (and a staged one) in place; returns what was sealed."""
    done = []
    for stage in (False, True):
        public = keyring.seal_in_place(VAULT, stage=stage)
        if public is not None:
            name = staged(VAULT) if stage else VAULT
            done.append(f"{keyring.path(name).name}: key {public.key_id} sealed")
    keyring.check_custody()
    if done:
        with Store(home, keyring).connect() as con:
            _audit(con, home, actor, "key.seal", {"sealed": done})
    return done


def _audit(con: duckdb.DuckDBPyConnection, home: Home, actor: str, action: str, detail: dict[str, object]) -> None:
    audit.append(
        con,
        actor=actor,
        role="key_custodian",
        action=action,
        object=f"key:{VAULT}",
        detail=detail,
        home=home,
    )


def recover_record(home: Home, keyring: KeyRing, *, actor: str) -> list[Recovered]:
    """Record again the key files a lost ``keyring.json`` noted, each checked against the store
    (module docstring, "A lost key ring record"); audited. Returns what was recorded ([]: every
    key file is noted). Refused, recording nothing, when any key disagrees with the store."""
    found = keyring.unnoted()
    unreadable = [p for p, kid in found.items() if kid is None and p not in PAIRS]
    if unreadable:
        raise KeyRingError(
            f"{keyring.path(unreadable[0])} holds no key the haven can read; restore it from the key custodian's backup"
        )
    checked = _checked_against_store(home, keyring, {p: kid for p, kid in found.items() if kid is not None})
    for item in checked:
        keyring.note_recovered(item.purpose, item.key_id)
    if checked:
        with Store(home, keyring).connect() as con:
            detail = {item.purpose: {"key_id": item.key_id, "checked": item.checked} for item in checked}
            audit.append(
                con,
                actor=actor,
                role="key_custodian",
                action=RECOVER_ACTION,
                object="key:record",
                detail={"recorded": detail},
                home=home,
            )
    return checked


def _checked_against_store(home: Home, keyring: KeyRing, found: dict[str, str]) -> list[Recovered]:
    """Each unnoted key file checked against the store (module docstring). Refused (KeyRingError)
    naming every key the store disagrees with."""
    store = Store(home, keyring)
    if not found:
        return []
    if not store.path.exists():
        return [Recovered(p, kid, NO_STORE) for p, kid in found.items()]
    store_key = keyring.unnoted_key("store") if "store" in found else keyring.get("store")
    try:
        with store.opened_with(store_key) as con:
            epochs = current_epochs(con)
            checks = {p: _check(con, keyring, p, kid, epochs.get(p)) for p, kid in found.items()}
    except StoreError as exc:
        raise KeyRingError(f"{keyring.path('store')}: {exc}; restore it from the key custodian's backup") from None
    wrong = [problem for problem, _ in checks.values() if problem]
    if wrong:
        raise KeyRingError("; ".join(wrong) + "; restore those keys from the key custodian's backup (nothing recorded)")
    return [Recovered(p, kid, checks[p][1]) for p, kid in found.items()]


def _check(
    con: duckdb.DuckDBPyConnection, keyring: KeyRing, purpose: str, kid: str, epoch: str | None
) -> tuple[str | None, str]:
    """(what is wrong, or None; how it was checked) for one unnoted key file: the store key opened
    the store; any other must be its purpose's epoch, and the audit key must verify the trail."""
    if purpose == "store":
        return None, OPENS_STORE
    if epoch not in (None, kid):
        return f"{_file(keyring, purpose)} holds key {kid}, but the store's data was made with key {epoch}", ""
    if purpose == audit.KEY_PURPOSE:
        verified = audit.verifies_under(con, keyring.unnoted_key(purpose))
        if verified is False:
            return f"{_file(keyring, purpose)} holds key {kid}, but the audit trail does not verify under it", ""
        if verified:
            return None, TRAIL_VERIFIES
    return None, NO_EPOCH if epoch is None else MATCHES_EPOCH


def _file(keyring: KeyRing, purpose: str) -> object:
    """The file a purpose's key id is read from (a pair: its public half)."""
    return keyring.public_path(purpose) if purpose in PAIRS else keyring.path(purpose)
