"""GX on the store's own DuckDB connection: right counts, no failing value, reusable connection."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import duckdb
import great_expectations as gx
import pytest
import sqlalchemy as sa
from duckdb_engine import ConnectionWrapper
from sqlalchemy.pool import StaticPool

from safehaven.core.store import Store
from safehaven.intake.gx_duckdb import RESULT_FORMAT, WITHHELD, _BorrowedConnection, run_suite, scrub

E = gx.expectations

# Values seeded as failures; none of them may appear in any result document or log.
DUPLICATE_NHS = "9991234567"
BAD_NHS = "999123456X"
BAD_CODE = "QQZ"
BAD_DATE = "2099-03-04"
BAD_POSTCODE = "ZZ9 9ZZ"
SEEDED = [DUPLICATE_NHS, BAD_NHS, BAD_CODE, BAD_DATE, BAD_POSTCODE]


def _seed(con: duckdb.DuckDBPyConnection) -> None:
    """``landing.t``: 6 rows, with one known failure per rule (and a duplicate NHS number)."""
    con.execute(
        """
        CREATE TABLE landing.t (nhs VARCHAR, code VARCHAR, postcode VARCHAR,
                                seen DATE, registered DATE, n INTEGER)
        """
    )
    con.execute(
        f"""
        INSERT INTO landing.t VALUES
          ('{DUPLICATE_NHS}', 'A', 'LS1 4AP', DATE '2020-01-02', DATE '2019-01-01', 1),
          ('{DUPLICATE_NHS}', 'B', 'LS1 4AP', DATE '2021-05-06', DATE '2019-01-01', 2),
          ('9990000018',      'A', 'M1 1AE',  DATE '2022-07-08', DATE '2023-01-01', 3),
          ('{BAD_NHS}',       '{BAD_CODE}', '{BAD_POSTCODE}', DATE '{BAD_DATE}', DATE '2000-01-01', 4),
          (NULL,              'B', 'M1 1AE',  NULL,              DATE '2000-01-01', 5),
          ('9990000026',      NULL, 'LS1 4AP', DATE '2010-01-01', NULL, 6)
        """
    )


def _suite() -> list[gx.expectations.Expectation]:
    return [
        E.ExpectColumnValuesToNotBeNull(column="nhs", meta={"id": "nhs.present"}),
        E.ExpectColumnValuesToMatchRegex(column="nhs", regex=r"^[0-9]{10}$", meta={"id": "nhs.format"}),
        E.ExpectColumnValuesToBeInSet(column="code", value_set=["A", "B"], meta={"id": "code.known"}),
        E.ExpectColumnValuesToBeBetween(
            column="seen", min_value="2000-01-01", max_value="2030-12-31", meta={"id": "seen.range"}
        ),
        E.ExpectColumnPairValuesAToBeGreaterThanB(
            column_A="seen", column_B="registered", or_equal=True, meta={"id": "seen.after.registered"}
        ),
        E.ExpectColumnValuesToBeUnique(column="nhs", meta={"id": "nhs.unique"}),
        E.ExpectColumnValuesToBeInSet(column="postcode", value_set=["LS1 4AP", "M1 1AE"], meta={"id": "pc.known"}),
    ]


@pytest.fixture
def con(store: Store) -> Iterator[duckdb.DuckDBPyConnection]:
    with store.connect() as connection:
        _seed(connection)
        yield connection


def test_counts_are_right_and_in_the_given_order(con: duckdb.DuckDBPyConnection) -> None:
    result = run_suite(con, "landing", "t", _suite(), "landing.t")

    assert result.success is False
    assert result.gx_version == gx.__version__
    assert result.table == "landing.t"
    by_id = {o.meta_id: o for o in result.outcomes}
    assert [o.meta_id for o in result.outcomes] == [e.meta["id"] for e in _suite()]
    expected_unexpected = {
        "nhs.present": 1,
        "nhs.format": 1,
        "code.known": 1,
        "seen.range": 1,
        "seen.after.registered": 1,  # 2022-07-08 < 2023-01-01
        "nhs.unique": 2,  # both rows of the duplicated NHS number
        "pc.known": 1,
    }
    for meta_id, count in expected_unexpected.items():
        outcome = by_id[meta_id]
        assert outcome.error is None, meta_id
        assert outcome.element_count == 6, meta_id
        assert outcome.unexpected_count == count, meta_id
        assert outcome.success is False, meta_id
    assert by_id["nhs.format"].missing_count == 1
    assert by_id["seen.after.registered"].columns == ("seen", "registered")
    assert by_id["code.known"].columns == ("code",)
    assert by_id["code.known"].unexpected_percent == pytest.approx(20.0)  # 1 of 5 non-null


def test_the_document_carries_no_failing_value(con: duckdb.DuckDBPyConnection) -> None:
    result = run_suite(con, "landing", "t", _suite(), "landing.t")
    text = json.dumps(result.document())  # JSON-able as it is
    for value in SEEDED:
        assert value not in text, value
    for key in ("partial_unexpected_list", "unexpected_list", "partial_unexpected_counts", "details"):
        assert f'"{key}"' not in text


def test_database_errors_are_reported_by_type_without_their_message(con: duckdb.DuckDBPyConnection) -> None:
    # DuckDB's message for this one is "Could not convert string 'QQZ' to INT32 ...".
    bad = E.ExpectColumnValuesToBeInSet(column="code", value_set=[1, 2], meta={"id": "code.int"})
    result = run_suite(con, "landing", "t", [bad, *_suite()], "landing.t")

    outcome = result.outcomes[0]
    assert outcome.meta_id == "code.int"
    assert outcome.success is False
    assert outcome.error is not None and "ConversionException" in outcome.error
    assert outcome.unexpected_count is None
    # The other expectations still ran.
    assert [o.unexpected_count for o in result.outcomes[1:3]] == [1, 1]
    text = json.dumps(result.document())
    assert BAD_CODE not in text
    assert "exception_traceback" not in text and "exception_message" not in text


def test_runs_twice_on_the_same_connection_and_leaves_it_usable(store: Store, con: duckdb.DuckDBPyConnection) -> None:
    first = run_suite(con, "landing", "t", _suite(), "landing.t")
    second = run_suite(con, "landing", "t", _suite(), "landing.t")
    assert [o.unexpected_count for o in first.outcomes] == [o.unexpected_count for o in second.outcomes]
    assert all(o.element_count == 6 for o in second.outcomes)

    # Not closed, not left inside a transaction: a write after GX is committed as usual.
    con.execute("CREATE TABLE landing.after_gx AS SELECT 1 AS x")
    assert con.execute("SELECT count(*) FROM landing.t").fetchone() == (6,)
    con.close()
    with store.connect(read_only=True) as again:
        assert again.execute("SELECT x FROM landing.after_gx").fetchone() == (1,)


def test_a_passing_suite_succeeds_and_a_failing_one_does_not(con: duckdb.DuckDBPyConnection) -> None:
    passing = [
        E.ExpectColumnValuesToNotBeNull(column="postcode"),
        E.ExpectTableRowCountToBeBetween(min_value=1, max_value=10),
    ]
    result = run_suite(con, "landing", "t", passing, "ok")
    assert result.success is True
    assert result.failed == []
    # A table-level count is not data: it stays in the document.
    assert result.document()["results"][1]["result"]["observed_value"] == 6

    failing = [E.ExpectColumnValuesToNotBeNull(column="nhs")]
    result = run_suite(con, "landing", "t", failing, "not ok")
    assert result.success is False
    assert [o.meta_id for o in result.failed] == [None]


def test_regex_is_a_partial_match_like_gx_elsewhere(con: duckdb.DuckDBPyConnection) -> None:
    result = run_suite(con, "landing", "t", [E.ExpectColumnValuesToMatchRegex(column="nhs", regex="999")], "s")
    assert result.outcomes[0].unexpected_count == 0  # every non-null NHS number contains 999
    result = run_suite(con, "landing", "t", [E.ExpectColumnValuesToNotMatchRegex(column="nhs", regex="X$")], "s")
    assert result.outcomes[0].unexpected_count == 1


def test_column_level_observed_values_are_withheld(con: duckdb.DuckDBPyConnection) -> None:
    expectations = [
        E.ExpectColumnMaxToBeBetween(column="seen", min_value="2000-01-01", max_value="2030-01-01"),
        E.ExpectColumnDistinctValuesToBeInSet(column="postcode", value_set=["LS1 4AP"]),
    ]
    result = run_suite(con, "landing", "t", expectations, "s")
    text = json.dumps(result.document())
    assert BAD_DATE not in text and BAD_POSTCODE not in text
    assert [r["result"].get("observed_value") for r in result.document()["results"]] == [WITHHELD, WITHHELD]


def test_callers_expectations_are_not_consumed(con: duckdb.DuckDBPyConnection) -> None:
    expectations = _suite()
    run_suite(con, "landing", "t", expectations, "s")
    assert all(e.id is None for e in expectations)
    assert len(run_suite(con, "landing", "t", expectations, "s").outcomes) == len(expectations)


def test_refuses_what_gx_would_get_wrong(con: duckdb.DuckDBPyConnection) -> None:
    twins = [
        E.ExpectColumnValuesToNotBeNull(column="nhs", meta={"id": "a"}),
        E.ExpectColumnValuesToNotBeNull(column="nhs", meta={"id": "b"}),
    ]
    with pytest.raises(ValueError, match="differ only in meta"):
        run_suite(con, "landing", "t", twins, "s")
    with pytest.raises(ValueError, match="identifier"):
        run_suite(con, "landing", 't"; DROP TABLE landing.t; --', _suite(), "s")
    with pytest.raises(ValueError, match="at least one"):
        run_suite(con, "landing", "t", [], "s")


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_nothing_is_written_to_disk_and_nothing_logged(
    con: duckdb.DuckDBPyConnection, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HOME", str(tmp_path / "user_home"))
    # What an application handler on the root logger sees (pytest's own capture handlers are
    # attached to every logger, so caplog would see records no application handler gets).
    collect = _Collect()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(collect)
    root.setLevel(logging.DEBUG)
    try:
        bad = E.ExpectColumnValuesToBeInSet(column="code", value_set=[1, 2])  # a DuckDB error quoting a value
        run_suite(con, "landing", "t", [bad, *_suite()], "s")
    finally:
        root.removeHandler(collect)
        root.setLevel(old_level)

    assert list(cwd.iterdir()) == []
    assert not (tmp_path / "user_home").exists()
    assert [r.name for r in collect.records if r.name.startswith("great_expectations")] == []
    logged = "\n".join(r.getMessage() for r in collect.records)
    for value in SEEDED:
        assert value not in logged


def test_result_format_asks_for_no_values() -> None:
    assert RESULT_FORMAT["result_format"] == "BASIC"
    assert RESULT_FORMAT["partial_unexpected_count"] == 0
    assert RESULT_FORMAT["include_unexpected_rows"] is False


def test_scrub_removes_every_value_bearing_part() -> None:
    document = {
        "success": False,
        "results": [
            {
                "success": False,
                "expectation_config": {"type": "expect_column_values_to_be_in_set", "kwargs": {"column": "c"}},
                "result": {
                    "element_count": 3,
                    "unexpected_count": 1,
                    "partial_unexpected_list": [DUPLICATE_NHS],
                    "partial_unexpected_counts": [{"value": DUPLICATE_NHS, "count": 1}],
                    "partial_unexpected_index_list": [{"nhs": DUPLICATE_NHS}],
                    "unexpected_list": [DUPLICATE_NHS],
                    "unexpected_index_query": f"SELECT * FROM t WHERE nhs = '{DUPLICATE_NHS}'",
                    "details": {"value_counts": [{"value": DUPLICATE_NHS, "count": 1}]},
                    "observed_value": DUPLICATE_NHS,
                },
                "exception_info": {
                    "metric-id": {
                        "raised_exception": True,
                        "exception_message": f"Could not convert string '{DUPLICATE_NHS}'",
                        "exception_traceback": f"Traceback\nduckdb.ConversionException: '{DUPLICATE_NHS}'",
                    }
                },
            }
        ],
    }
    scrubbed = scrub(document)
    assert DUPLICATE_NHS not in json.dumps(scrubbed)
    result = scrubbed["results"][0]
    assert result["result"] == {"element_count": 3, "unexpected_count": 1, "observed_value": WITHHELD}
    assert result["exception_info"] == {"raised_exception": True, "exception_type": "ConversionException"}


def test_the_wrapper_keeps_the_result_that_a_plain_duckdb_engine_loses() -> None:
    """The upstream bug in one line: close-before-fetch loses the result (GX #11579)."""
    con = duckdb.connect()
    results = []
    for wrapper in (ConnectionWrapper(con), _BorrowedConnection(con)):
        engine = sa.create_engine("duckdb://", creator=lambda w=wrapper: w, poolclass=StaticPool)
        with engine.connect() as connection:
            result = connection.execute(sa.text("SELECT 42"))
        results.append(result.fetchall())  # what GX does: fetch after the connection closed
    assert results == [[], [(42,)]]
    con.close()


def test_regex_and_text_sets_are_rendered_as_literals(con: duckdb.DuckDBPyConnection) -> None:
    """Regex patterns and text value sets go into the statement (fast on DuckDB), quoted safely."""
    seen: list[tuple[str, object]] = []

    @sa.event.listens_for(sa.engine.Engine, "before_cursor_execute")
    def _record(conn, cursor, statement, parameters, context, executemany) -> None:  # noqa: ANN001
        seen.append((statement, parameters))

    con.execute("CREATE TABLE landing.q (v VARCHAR)")
    con.execute("INSERT INTO landing.q VALUES ('it''s'), ('a\\b'), ('plain'), (NULL)")
    try:
        result = run_suite(
            con,
            "landing",
            "q",
            [
                E.ExpectColumnValuesToBeInSet(column="v", value_set=["it's", "plain"], meta={"id": "set"}),
                E.ExpectColumnValuesToMatchRegex(column="v", regex=r"^(?:it's|a\\b)$", meta={"id": "re"}),
            ],
            "literals",
        )
    finally:
        sa.event.remove(sa.engine.Engine, "before_cursor_execute", _record)
    by_id = {o.meta_id: o.unexpected_count for o in result.outcomes}
    assert by_id == {"set": 1, "re": 1}  # 'a\b' is not in the set; 'plain' does not match
    text = "\n".join(s for s, _ in seen)
    assert "regexp_matches(v, '^(?:it''s|a\\\\b)$')" in text
    assert "list_contains(list_value('it''s', 'plain'), v)" in text
    assert not [p for _, p in seen if p and any(isinstance(v, str) and "it's" in v for v in p)]


def test_number_sets_keep_gx_in(con: duckdb.DuckDBPyConnection) -> None:
    result = run_suite(con, "landing", "t", [E.ExpectColumnValuesToBeInSet(column="n", value_set=[1, 2, 3])], "s")
    assert result.outcomes[0].unexpected_count == 3  # 4, 5, 6


def _every_suites_expectations() -> list[gx.expectations.Expectation]:
    """Every expectation the haven validates with (each contract's compiled suite), and this module's."""
    from datetime import date

    from safehaven.intake.contracts import ContractRegistry
    from safehaven.intake.expectations import compile_suite

    registry = ContractRegistry()
    compiled = [
        p.expectation for c in registry.contracts.values() for p in compile_suite(c, registry, date(2026, 1, 31))
    ]
    return [*compiled, *_suite()]


def test_an_expectations_kwargs_are_gxs_own_read_from_one_configuration() -> None:
    """The replacements of ``Expectation._get_domain_kwargs`` and ``_get_success_kwargs``
    (``safehaven.intake.gx_duckdb``: one configuration built per call, not one per key) give
    what GX's own methods give, keys in the same order, for every expectation the haven runs."""
    from safehaven.intake import gx_duckdb

    expectations = _every_suites_expectations()
    assert {type(e).__name__ for e in expectations} >= {"ExpectColumnValuesToBeBetween", "ExpectColumnValuesToBeInSet"}
    for expectation in expectations:
        for ours, gxs in (
            (expectation._get_domain_kwargs, gx_duckdb.GX_DOMAIN_KWARGS),
            (expectation._get_success_kwargs, gx_duckdb.GX_SUCCESS_KWARGS),
        ):
            assert ours.__func__ is not gxs  # the replacement is the one installed
            assert list(ours().items()) == list(gxs(expectation).items()), expectation.expectation_type
