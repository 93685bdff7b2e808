"""A lost key ring record: ``keys/keyring.json`` deleted or emptied beside the key files.

Every key it has no note of is refused (it was read as "nothing recorded", and any key file
accepted), and the way back is the key custodian's ``safehaven keys recover-record``: each key
file is checked against the encrypted store (the store key by opening it, every other by its
purpose's epoch) and recorded again, audited, only when all agree (CoP 27b-c; fail closed;
``safehaven.protect.custody.recover_record``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from safehaven.cli.main import main
from safehaven.core import audit, pins
from safehaven.core.home import Home
from safehaven.core.keys import KeyRing, KeyRingError
from safehaven.core.store import Store
from safehaven.protect import custody
from tests.conftest import copy_haven


@pytest.fixture
def haven_home(home: Home, populated_haven: Path) -> Home:
    return copy_haven(populated_haven, home)


def _lose_record(home: Home, how: str) -> dict[str, str]:
    """Delete or empty ``keyring.json``; returns the current key ids it recorded."""
    path = home.keys / "keyring.json"
    current = {p: str(e["current"]) for p, e in json.loads(path.read_text()).items() if e.get("current")}
    path.unlink() if how == "deleted" else path.write_text("{}")
    return current


def _swap(path: Path) -> None:
    path.write_text(os.urandom(32).hex())
    path.chmod(0o600)


@pytest.mark.parametrize("how", ["deleted", "emptied"])
def test_a_lost_record_refuses_every_key_until_the_custodian_records_the_files_again(
    haven_home: Home, how: str
) -> None:
    current = _lose_record(haven_home, how)
    with pytest.raises(KeyRingError, match="has no note of any key for 'store'.*safehaven keys recover-record"):
        with Store(haven_home).connect():
            pass
    recovered = custody.recover_record(haven_home, KeyRing(haven_home.keys), actor="custodian")
    assert {r.purpose: r.key_id for r in recovered} == current
    checked = {r.purpose: r.checked for r in recovered}
    assert checked["store"] == custody.OPENS_STORE
    assert checked["haven"] == checked["vault"] == custody.MATCHES_EPOCH
    assert checked["audit"] == custody.TRAIL_VERIFIES
    ring = KeyRing(haven_home.keys)
    with Store(haven_home).connect() as con:
        pins.verify(con, ring)
        assert audit.verify(con, haven_home).ok
        entry = audit.latest_entry(con, "key:record", [custody.RECOVER_ACTION])
    assert entry is not None and entry.actor == "custodian"
    assert json.loads(entry.detail or "{}")["recorded"]["haven"] == {
        "key_id": current["haven"],
        "checked": custody.MATCHES_EPOCH,
    }
    assert custody.recover_record(haven_home, ring, actor="custodian") == [], "once recorded, nothing to recover"


@pytest.mark.parametrize(
    ("purpose", "refusal"),
    [("haven", "made with key {expected}"), ("audit", "the audit trail does not verify under it")],
)
def test_a_swapped_key_is_not_recorded_and_the_refusal_says_what_the_store_expects(
    haven_home: Home, purpose: str, refusal: str
) -> None:
    current = _lose_record(haven_home, "deleted")
    path = haven_home.keys / f"{purpose}.key"
    original = path.read_text()
    _swap(path)
    ring = KeyRing(haven_home.keys)
    expected = refusal.format(expected=current[purpose])
    with pytest.raises(KeyRingError, match=f"{purpose}.key holds key .*{expected}.*nothing recorded"):
        custody.recover_record(haven_home, ring, actor="custodian")
    assert not (haven_home.keys / "keyring.json").exists(), "nothing recorded, not even the keys that agreed"
    path.write_text(original)  # restored from the custodian's backup
    assert {r.purpose for r in custody.recover_record(haven_home, ring, actor="custodian")} == set(current)


def test_a_store_key_that_does_not_open_the_store_is_refused_without_showing_it(haven_home: Home) -> None:
    _lose_record(haven_home, "emptied")
    _swap(haven_home.keys / "store.key")
    swapped = (haven_home.keys / "store.key").read_text()
    with pytest.raises(KeyRingError, match="store.key: key .* does not open the encrypted store") as refused:
        custody.recover_record(haven_home, KeyRing(haven_home.keys), actor="custodian")
    assert swapped not in str(refused.value)
    assert json.loads((haven_home.keys / "keyring.json").read_text()) == {}


def test_an_intact_record_has_nothing_to_recover_and_nothing_is_audited(haven_home: Home) -> None:
    ring = KeyRing(haven_home.keys)
    before = ring.manifest()
    assert custody.recover_record(haven_home, ring, actor="custodian") == []
    assert ring.manifest() == before
    with Store(haven_home).connect() as con:
        assert audit.latest_entry(con, "key:record", [custody.RECOVER_ACTION]) is None


def test_the_commands_name_the_unnoted_keys_and_record_them_again(haven_home: Home) -> None:
    current = _lose_record(haven_home, "deleted")
    listed = CliRunner().invoke(main, ["keys", "list"])
    assert listed.exit_code == 0, listed.output
    assert f"keyring.json has no note of: {', '.join(sorted(current))}" in listed.output
    refused = CliRunner().invoke(main, ["audit", "verify"])
    assert refused.exit_code == 1 and "safehaven keys recover-record" in refused.output
    recovered = CliRunner().invoke(main, ["keys", "recover-record"])
    assert recovered.exit_code == 0, recovered.output
    assert f"haven: key {current['haven']} recorded (the store's epoch)" in recovered.output
    assert recovered.output.strip().endswith("audited")
    assert "no note" not in CliRunner().invoke(main, ["keys", "list"]).output
