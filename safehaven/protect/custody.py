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
"""

from __future__ import annotations

import duckdb

from safehaven.core import audit
from safehaven.core.home import Home
from safehaven.core.keys import VAULT, Key, KeyRing, KeyRingError, staged
from safehaven.core.pins import epoch_key_id, start_epoch
from safehaven.core.store import Store


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
