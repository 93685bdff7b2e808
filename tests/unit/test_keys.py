"""Key files are guarded: mode 0600, no symlinks, never re-created over existing data."""

import multiprocessing
import os
from pathlib import Path

import pytest

from safehaven.core.home import Home
from safehaven.core.keys import KeyRing, KeyRingError, agreement_purpose, key_id, staged
from safehaven.core.store import Store, StoreError
from tests.conftest import test_custodian


def test_new_key_is_created_private(tmp_path: Path) -> None:
    ring = KeyRing(tmp_path / "keys")
    key = ring.get_or_create("haven")
    path = ring.path("haven")
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)
    assert ring.get("haven").material == key.material
    assert key.hex not in repr(key) and key.key_id in repr(key)


def test_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    ring = KeyRing(tmp_path / "keys")
    ring.get_or_create("haven")
    os.chmod(ring.path("haven"), 0o644)
    with pytest.raises(KeyRingError, match="chmod 600"):
        ring.get("haven")


def test_symlinked_key_is_refused(tmp_path: Path) -> None:
    ring = KeyRing(tmp_path / "keys")
    real = ring.get_or_create("haven")
    target = tmp_path / "elsewhere.key"
    target.write_text(real.hex)
    target.chmod(0o600)
    ring.path("haven").unlink()
    ring.path("haven").symlink_to(target)
    with pytest.raises(KeyRingError, match="symbolic link"):
        ring.get("haven")


def test_error_messages_never_carry_key_material(tmp_path: Path) -> None:
    ring = KeyRing(tmp_path / "keys")
    key = ring.get_or_create("store")
    os.chmod(ring.path("store"), 0o640)
    with pytest.raises(KeyRingError) as err:
        ring.get("store")
    assert key.hex not in str(err.value)


def test_pipeline_refuses_loose_store_key(home: Home) -> None:
    store = Store(home)
    with store.connect():
        pass
    os.chmod(store.keyring.path("store"), 0o604)
    with pytest.raises(KeyRingError, match="group or others"):
        with store.connect():
            pass


def test_missing_key_with_existing_store_is_refused(home: Home) -> None:
    store = Store(home)
    with store.connect() as con:
        con.execute("CREATE TABLE landing.t AS SELECT 1 AS x")
    store.keyring.path("store").unlink()
    with pytest.raises(StoreError, match="key .* is missing"):
        with store.connect():
            pass
    assert not store.keyring.exists("store"), "a new key must not be created over existing data"


def test_keyring_manifest_records_ids_not_material(tmp_path: Path) -> None:
    ring = KeyRing(tmp_path / "keys")
    key = ring.get_or_create("haven")
    text = (tmp_path / "keys" / "keyring.json").read_text()
    assert key.key_id in text and key.hex not in text


def test_public_key_may_be_read_by_others_but_never_written(tmp_path: Path) -> None:
    from safehaven.core.keys import VAULT, key_id

    ring = KeyRing(tmp_path / "keys", test_custodian())
    public = ring.create_keypair(VAULT)
    assert oct(ring.public_path(VAULT).stat().st_mode & 0o777) == oct(0o644)
    assert oct(ring.path(VAULT).stat().st_mode & 0o777) == oct(0o600)
    assert ring.get_public(VAULT).material == public.material
    assert ring.current_id(VAULT) == key_id(public.material), "a pair is known by its public half"
    os.chmod(ring.public_path(VAULT), 0o666)
    with pytest.raises(KeyRingError, match="writable by group or others"):
        ring.get_public(VAULT)


def test_loose_agreement_salt_is_refused(tmp_path: Path) -> None:
    from safehaven.core.keys import agreement_key

    ring = KeyRing(tmp_path / "keys")
    ring.get_or_create("haven")
    agreement_key(ring, "study-a")
    os.chmod(ring.path("agreement-study-a"), 0o640)
    with pytest.raises(KeyRingError, match="chmod 600"):
        agreement_key(ring, "study-a")


def test_loose_key_directory_is_refused(tmp_path: Path) -> None:
    ring = KeyRing(tmp_path / "keys")
    ring.get_or_create("haven")
    os.chmod(ring.directory, 0o777)
    with pytest.raises(KeyRingError, match="chmod 700"):
        ring.get("haven")


def test_replacing_a_key_retires_the_old_id(tmp_path: Path) -> None:
    ring = KeyRing(tmp_path / "keys")
    old = ring.get_or_create("haven")
    new = ring.write("haven", os.urandom(32), replace=True)
    assert ring.retired_ids("haven") == [old.key_id]
    assert ring.current_id("haven") == new.key_id


def _spy(path: Path, spies: Path) -> Path:
    """A second name for a key file's inode, so a test can read what became of its bytes."""
    spies.mkdir(exist_ok=True)
    spy = spies / path.name
    os.link(path, spy)
    return spy


def test_a_replaced_key_file_is_shredded_not_just_unlinked(tmp_path: Path) -> None:
    ring = KeyRing(tmp_path / "keys")
    old = ring.get_or_create("haven")
    spy = _spy(ring.path("haven"), tmp_path / "spies")
    new = ring.write("haven", os.urandom(32), replace=True)
    assert ring.get("haven").material == new.material
    left = spy.read_bytes()
    assert len(left) == 2 * len(old.material) and old.hex.encode() not in left  # overwritten in place
    assert not list((tmp_path / "keys").glob("*.retired"))


def test_discard_shreds_a_spent_key(tmp_path: Path) -> None:
    ring = KeyRing(tmp_path / "keys")
    spent = ring.write("store-next", os.urandom(32), record=False)
    spy = _spy(ring.path("store-next"), tmp_path / "spies")
    ring.discard("store-next")
    assert not ring.exists("store-next") and spent.hex.encode() not in spy.read_bytes()
    ring.discard("store-next")  # absent: nothing to do


def test_leftover_from_an_interrupted_replacement(tmp_path: Path) -> None:
    """A crash after the rename leaves the old key under ``.retired``: it is shredded. A crash
    before the rename leaves a second name for the *live* key: only that name goes."""
    ring = KeyRing(tmp_path / "keys")
    live = ring.get_or_create("haven")
    retired = ring.path("haven").with_name("haven.key.retired")
    os.link(ring.path("haven"), retired)  # crash before the rename
    assert ring.shred_leftovers() == ["haven.key.retired"]
    assert ring.get("haven").material == live.material and not retired.exists()

    old = ring.get_or_create("audit")
    retired = ring.path("audit").with_name("audit.key.retired")
    os.link(ring.path("audit"), retired)
    spy = _spy(retired, tmp_path / "spies")
    ring._write_file(ring.path("audit").with_name("audit.key.new"), os.urandom(32).hex().encode(), 0o600)
    os.replace(ring.path("audit").with_name("audit.key.new"), ring.path("audit"))  # crash after the rename
    assert ring.shred_leftovers() == ["audit.key.retired"]
    assert not retired.exists() and old.hex.encode() not in spy.read_bytes()
    assert ring.path("audit").read_text() != old.hex
    with pytest.raises(KeyRingError, match=f"records key {old.key_id}"):
        ring.get("audit")  # a key file the key ring did not write is refused (pinned)


@pytest.mark.parametrize(
    "text", ["[]", "null", '"x"', '{"haven": "x"}', '{"haven": {"current": null, "history": []}, "haven": {}}',
             '{"haven": {"current": 7, "history": []}}', '{"haven": {"current": null, "history": [{}]}}'],
    ids=["a list", "null", "text", "an entry not an object", "a name twice", "an id not text", "history without ids"],
)  # fmt: skip
def test_a_key_ring_manifest_of_another_shape_is_refused_not_read_as_empty(tmp_path: Path, text: str) -> None:
    """``keyring.json`` pins each key file to its recorded id: read as "nothing recorded", an odd
    one accepted any key file and let a missing key be made anew (found by review)."""
    ring = KeyRing(tmp_path / "keys")
    ring.get_or_create("haven")
    (tmp_path / "keys" / "keyring.json").write_text(text)
    with pytest.raises(KeyRingError, match="keeps it as keyring.json.damaged-<time> and records the key files again"):
        ring.get("haven")


@pytest.mark.parametrize("record", ["deleted", "emptied"])
def test_a_key_file_the_key_ring_has_no_note_of_is_refused(tmp_path: Path, record: str) -> None:
    """``keyring.json`` deleted or emptied beside the key files: each key read is refused, naming
    the key custodian's command that records them again (it was read as "nothing recorded", and
    any key file accepted)."""
    ring = KeyRing(tmp_path / "keys")
    ring.get_or_create("haven")
    manifest = tmp_path / "keys" / "keyring.json"
    manifest.unlink() if record == "deleted" else manifest.write_text("{}")
    with pytest.raises(KeyRingError, match="has no note of any key for 'haven'.*safehaven keys recover-record"):
        ring.get("haven")
    with pytest.raises(KeyRingError, match="has no note of any key for 'haven'"):
        ring.get_or_create("haven")
    [(purpose, key)] = ring.unnoted().items()
    assert (purpose, key.key_id) == ("haven", key_id(bytes.fromhex((tmp_path / "keys" / "haven.key").read_text())))


def test_a_first_key_killed_before_its_record_is_accepted_by_its_note_never_recorded_by_a_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every key is noted as pending before its file is written, a new purpose too: killed
    between the file and its record, the key is still the ring's. A read never records it (a
    forged note would then pin the forger's key): the purpose's next write does."""

    def killed(self: KeyRing, purpose: str, kid: str, **_: object) -> None:
        raise SystemExit("killed")

    ring = KeyRing(tmp_path / "keys")
    monkeypatch.setattr(KeyRing, "_record", killed)
    with pytest.raises(SystemExit):
        ring.get_or_create("haven")
    monkeypatch.undo()
    pending = ring.manifest()["haven"]["pending"]
    assert ring.unnoted() == {}, "a pending note is a note"
    assert ring.get("haven").key_id == pending
    assert ring.manifest()["haven"]["current"] is None and ring.manifest()["haven"]["pending"] == pending


def test_an_agreement_whose_id_ends_in_next_is_not_taken_for_a_staged_key(tmp_path: Path) -> None:
    """Only the haven's own staged names (``haven-next``, ``vault-next``...) go unrecorded; an
    agreement ``x-next``'s salt with no note is refused like any other key."""
    ring = KeyRing(tmp_path / "keys")
    ring.get_or_create("haven")
    ring.write(staged("haven"), os.urandom(32), record=False)
    ring.write(agreement_purpose("x-next"), os.urandom(32), record=False)
    assert ring.get(staged("haven"))
    with pytest.raises(KeyRingError, match="has no note of any key for 'agreement-x-next'"):
        ring.get(agreement_purpose("x-next"))


def _note_keys(directory: str, prefix: str, count: int) -> None:
    ring = KeyRing(Path(directory))
    for i in range(count):
        ring.get_or_create(f"agreement-{prefix}{i}")


def test_two_processes_adding_keys_at_once_lose_no_note(tmp_path: Path) -> None:
    """Each read-modify-write of ``keyring.json`` holds its lock: a note lost to a race would leave a
    key file the ring refuses."""
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_note_keys, args=(str(tmp_path / "keys"), p, 40)) for p in "ab"]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert [w.exitcode for w in workers] == [0, 0]
    ring = KeyRing(tmp_path / "keys")
    assert ring.unnoted() == {}
    assert {p for p in ring.manifest() if ring.current_id(p)} == {f"agreement-{p}{i}" for p in "ab" for i in range(40)}


def test_an_agreement_key_is_never_derived_from_a_haven_key_the_store_does_not_pin(home: Home) -> None:
    """A haven key file swapped beside an emptied key ring would give recipients pseudonyms that
    link to nothing they hold: the agreement key is derived only from the store's current haven
    key epoch (``pins.agreement_key``; found by review)."""
    from safehaven.core import pins
    from safehaven.protect.haven import haven_key

    ring = KeyRing(home.keys)
    with Store(home).connect() as con:
        haven_key(con, ring)  # records the haven epoch
        pins.agreement_key(con, ring, "agr1")
    ring.write("haven", os.urandom(32), replace=True)  # swapped, and recorded as an insider would edit keyring.json
    with Store(home).connect() as con, pytest.raises(KeyRingError, match="the store's data was made with key"):
        pins.agreement_key(con, ring, "agr1")


def test_a_first_vault_pair_killed_before_its_public_half_is_made_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed between the sealed private half and the public half of a new haven's vault pair:
    the next creation shreds the orphaned half (it protected nothing, and was never recorded) and
    makes the pair, where it refused "already exists (key -)" for ever (found by review)."""
    from safehaven.core.keys import VAULT, key_id, x25519_public
    from tests.conftest import test_custodian

    ring = KeyRing(tmp_path / "keys", test_custodian())
    real = KeyRing._write_file

    def killed_at_the_public_half(self: KeyRing, path: Path, data: bytes, mode: int) -> None:
        if path.suffix == ".pub":
            raise SystemExit("killed")
        real(self, path, data, mode)

    monkeypatch.setattr(KeyRing, "_write_file", killed_at_the_public_half)
    with pytest.raises(SystemExit):
        ring.create_keypair(VAULT)
    monkeypatch.undo()
    assert ring.unfinished_pair(VAULT)
    public = ring.create_keypair(VAULT)
    assert key_id(x25519_public(ring.get_private(VAULT).material)) == public.key_id == ring.current_id(VAULT)
    assert not ring.unfinished_pair(VAULT)
    with pytest.raises(KeyRingError, match="already exists"):
        ring.create_keypair(VAULT)


def _create_one(directory: str, purpose: str, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    out.put(KeyRing(Path(directory)).get_or_create(purpose).key_id)


def test_processes_creating_the_same_key_at_once_make_one(tmp_path: Path) -> None:
    """The check that a key is missing and its creation hold one lock: each process used to make
    its own, and all but the last were lost with whatever they protected."""
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    workers = [ctx.Process(target=_create_one, args=(str(tmp_path / "keys"), "agreement-a", out)) for _ in range(6)]
    for w in workers:
        w.start()
    ids = {out.get(timeout=60) for _ in workers}
    for w in workers:
        w.join(60)
    assert ids == {KeyRing(tmp_path / "keys").get("agreement-a").key_id}


@pytest.mark.parametrize("lock", ["a link", "a folder"])
def test_a_lock_file_that_cannot_be_opened_is_refused_naming_it(tmp_path: Path, lock: str) -> None:
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    path = keys / ".keyring.lock"
    path.symlink_to(tmp_path / "elsewhere") if lock == "a link" else path.mkdir()
    with pytest.raises(KeyRingError, match=r"lock file .*\.keyring\.lock cannot be opened"):
        KeyRing(keys).get_or_create("haven")
