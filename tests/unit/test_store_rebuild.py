"""Rebuilding the store: deleted bytes gone, fresh key, crash-safe swap (CoP 43d, 48-50)."""

import duckdb
import pytest

from safehaven.core.home import Home
from safehaven.core.store import Store

SECRET = "ZZSEEDVALUE"


def _seed(store: Store) -> None:
    with store.connect() as con:
        con.execute(f"CREATE TABLE haven.t AS SELECT range AS id, '{SECRET}' || range AS v FROM range(20000)")
        con.execute("CREATE TABLE haven.keep AS SELECT range AS id FROM range(100)")
        con.execute("DELETE FROM haven.t WHERE id >= 10")


def test_control_delete_and_checkpoint_leaves_bytes_in_a_plain_duckdb_file(tmp_path) -> None:
    path = tmp_path / "plain.duckdb"
    con = duckdb.connect(str(path))
    # Compression would hide values from a byte scan without removing them; storing them
    # uncompressed makes the residue visible.
    con.execute("SET force_compression = 'uncompressed'")
    con.execute("CREATE TABLE t AS SELECT range AS id, md5(range::VARCHAR) AS v FROM range(20000)")
    needle = con.execute("SELECT v FROM t WHERE id = 12345").fetchone()[0].encode()
    con.execute("CHECKPOINT")
    con.execute("DELETE FROM t WHERE id BETWEEN 12000 AND 12999")  # dispose of some records
    con.execute("CHECKPOINT")
    con.execute("VACUUM")
    assert con.execute("SELECT count(*) FROM t WHERE id = 12345").fetchone()[0] == 0
    con.close()
    assert needle in path.read_bytes(), "DELETE alone must not be relied on"


def test_rebuild_keeps_live_rows_and_changes_key(store: Store, home: Home) -> None:
    _seed(store)
    old_size = home.store_file.stat().st_size
    ids = store.rebuild()
    assert ids["old_key_id"] != ids["new_key_id"]
    assert store.keyring.get("store").key_id == ids["new_key_id"]
    with store.connect(read_only=True) as con:
        assert con.execute("SELECT count(*) FROM haven.t").fetchone()[0] == 10
        assert con.execute("SELECT count(*) FROM haven.keep").fetchone()[0] == 100
    assert home.store_file.stat().st_size <= old_size
    assert not store.journal.exists()
    assert not store.keyring.exists("store-next")
    history = store.keyring.manifest()["store"]["history"]
    assert [h["key_id"] for h in history][-2:] == [ids["old_key_id"], ids["new_key_id"]]


def test_old_key_cannot_open_rebuilt_store(store: Store, home: Home) -> None:
    _seed(store)
    old = store.keyring.get("store")
    store.rebuild()
    con = duckdb.connect()
    from safehaven.core.store import httpfs_extension_path

    con.execute(f"LOAD '{httpfs_extension_path()}'")
    with pytest.raises(duckdb.Error):
        con.execute(f"ATTACH '{home.store_file}' AS s (ENCRYPTION_KEY '{old.hex}')")


@pytest.mark.parametrize("crash", ["build", "journal"])
def test_crash_during_rebuild_leaves_a_state_the_next_open_completes(store: Store, crash: str) -> None:
    _seed(store)
    old = store.keyring.get("store")
    with pytest.raises(RuntimeError, match="simulated crash"):
        store.rebuild(_crash_after=crash)
    with store.connect(read_only=True) as con:  # opening recovers
        assert con.execute("SELECT count(*) FROM haven.t").fetchone()[0] == 10
    assert not store.journal.exists()
    current = store.keyring.get("store").key_id
    assert (current == old.key_id) if crash == "build" else (current != old.key_id)
    store.rebuild()  # and a rebuild after recovery works
    with store.connect(read_only=True) as con:
        assert con.execute("SELECT count(*) FROM haven.keep").fetchone()[0] == 100
