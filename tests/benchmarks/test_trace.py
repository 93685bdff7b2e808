"""``--trace-sql`` traces what a run does: the traced connection is answered as the store's own."""

from __future__ import annotations

import pytest

import safehaven.core.store as store
from benchmarks.pipeline import install_trace
from safehaven.core.home import Home
from safehaven.core.store import Store, table_exists


def test_a_traced_store_connection_looks_tables_up_without_a_statement_as_the_store_connection_does(
    home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store answers a look-up of one of its tables on a connection it opened from the catalog,
    with no statement (``safehaven.core.store._table``). A traced connection
    (``benchmarks.pipeline.install_trace``) is answered the same way, so a trace holds the
    statements a run makes (found: 592 of an idle run's 1,574 traced statements were
    ``pragma_table_info`` look-ups the run itself never makes), and the wrapper is forgotten once
    the connection closes."""
    monkeypatch.setattr(store.Store, "connect", store.Store.connect)  # put back after the test
    sink: list[tuple[float, str, float, float]] = []
    install_trace(sink)
    with Store(home).connect() as con:
        con.execute("CREATE TABLE landing.traced (x INTEGER)")
        sink.clear()
        assert table_exists(con, "landing", "traced")
        assert sink == []
        con.execute("SELECT 1")
        assert [text for _, text, _, _ in sink] == ["SELECT 1"]
        traced = con
    assert traced not in store._OPENED_BY
