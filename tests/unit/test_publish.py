"""Publication: the guard, the refusal of a violating release, the files written.

Rules under test: ``safehaven.publish.publication`` module docstring (CoP 35-36, 45-46; ISB 1523; guide
Rule 3 part A; OWASP CSV injection).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
from collections.abc import Callable
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import duckdb
import pytest

from safehaven.core import audit
from safehaven.core.home import Home
from safehaven.core.store import Store
from safehaven.intake.contracts import ContractRegistry
from safehaven.publish import publication, release_audit, reuse
from safehaven.publish.outputs import Output, build_output
from safehaven.publish.publication import (
    OGL,
    PublicationRefused,
    guard_table,
    identifying_columns,
    publish_release,
    verify_release,
)
from safehaven.publish.quality import _revision_lines, build_statement, store_statement

TODAY = date(2026, 3, 15)
NOW = datetime(2026, 3, 20, 9, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def registry() -> ContractRegistry:
    return ContractRegistry()


def output(name: str = "adm", **extra: object) -> Output:
    spec = {
        "name": name,
        "version": "1.0.0",
        "title": "People admitted",
        "description": "Distinct people admitted in the month.",
        "purpose": "A test output for the publication rules.",
        "users": ["tests"],
        "collections": ["hospital_episodes"],
        "dimensions": [
            {"name": "month", "description": "month", "domain": "reporting_months"},
            {"name": "provider_code", "description": "provider", "domain": "observed"},
            {"name": "label", "description": "a text dimension", "domain": "observed"},
        ],
        "measures": [{"name": "people", "description": "people"}],
        "zeros": {"publish": True, "structural": []},
        "sql": """SELECT m.month, h.provider_code, h.primary_diagnosis AS label, count(DISTINCT h.pid) AS people
                  FROM haven.hospital_episodes h
                  JOIN reporting_months m ON h.admission_date BETWEEN m.month AND m.month_end GROUP BY ALL""",
    }
    spec.update(extra)
    return Output.model_validate(spec)


def seed_haven(con: duckdb.DuckDBPyConnection, labels: dict[str, int]) -> None:
    """Pseudonymised rows for the outputs; on a new haven the run is recorded first, as the pipeline
    does, since an audit trail is never started on a store that holds data (CoP 23d)."""
    if audit._tail(con).seq == 0:
        audit.begin_run(con, audit.home_of(con), actor="pipeline", job="seed_haven", run_id="seed_haven")
    con.execute(
        "CREATE OR REPLACE TABLE haven.hospital_episodes (pid VARCHAR, provider_code VARCHAR, admission_date DATE, "
        "discharge_date DATE, primary_diagnosis VARCHAR)"
    )
    for label, n in labels.items():
        for month in ("2026-01-10", "2026-02-10"):
            con.execute(
                "INSERT INTO haven.hospital_episodes SELECT md5(? || ? || i::VARCHAR), 'RX1', CAST(? AS DATE), "
                "CAST(? AS DATE), ? FROM range(?) t(i)",
                [label, month, month, month, label, n],
            )


def build_all(con: duckdb.DuckDBPyConnection, out: Output, registry: ContractRegistry, home: Home) -> None:
    built = build_output(con, out, registry, today=TODAY)
    assert built.violations == []
    store_statement(con, build_statement(con, out, registry, home, built, as_of=NOW))


# --- the guard ---------------------------------------------------------------------------


@pytest.fixture
def con() -> duckdb.DuckDBPyConnection:
    c = duckdb.connect()
    c.execute("CREATE SCHEMA published")
    yield c
    c.close()


def test_identifying_columns_come_from_the_contracts(registry: ContractRegistry) -> None:
    always, declarable = identifying_columns(registry)
    for name in ("pid", "batch", "row", "nhsnumber", "dateofbirth", "postcode", "birthweek", "postcodedistrict"):
        assert name in always, name
    assert {"practicecode", "sex"} <= set(declarable)


@pytest.mark.parametrize(
    ("column", "why"),
    [
        ("pid", "pseudonym"),
        ("NHS_Number", "direct identifier"),
        ("patient_nhs_number", "direct identifier"),
        ("date_of_birth", "fine-grained quasi-identifier"),
        ("birth_week", "coarsened form"),
        ("postcode_district", "coarsened form"),
        ("practice_code", "does not declare why"),
    ],
)
def test_guard_refuses_identifying_columns(
    con: duckdb.DuckDBPyConnection, registry: ContractRegistry, column: str, why: str
) -> None:
    out = output(dimensions=[{"name": "month", "description": "m", "domain": "reporting_months"}])
    con.execute(
        f"CREATE TABLE published.t AS SELECT DATE '2026-01-01' AS month, 'x' AS \"{column}\", "
        "10 AS people, false AS suppressed"
    )
    problems = guard_table(con, "published.t", out, registry)
    assert any(column in p and why in p for p in problems), problems


def test_guard_accepts_a_declared_quasi_identifier(con: duckdb.DuckDBPyConnection, registry: ContractRegistry) -> None:
    out = output(
        dimensions=[
            {"name": "month", "description": "m", "domain": "reporting_months"},
            {
                "name": "practice_code",
                "description": "p",
                "domain": "observed",
                "quasi_identifier": "a provider of care may be named (CoP 36)",
            },
        ]
    )
    con.execute(
        "CREATE TABLE published.t AS SELECT DATE '2026-01-01' AS month, 'A81001' AS practice_code, "
        "10 AS people, false AS suppressed"
    )
    assert guard_table(con, "published.t", out, registry) == []


@pytest.mark.parametrize(
    ("value", "finding"),
    [
        ("3f2a9c0d4e5b6a7980f1e2d3c4b5a697", "pseudonym"),
        ("ref 9434765919", "NHS-number-like"),
        ("943 476 5919", "NHS-number-like"),
        ("LS1 4AB", "postcode"),
        ("sw1a1aa", "postcode"),
        ("born 1956-03-12", "full date"),
        ("12/03/1956", "full date"),
        ('=HYPERLINK("http://x")', "formula-leading"),
        ("\tcmd", "formula-leading"),
    ],
)
def test_guard_refuses_identifying_values_without_repeating_them(
    con: duckdb.DuckDBPyConnection, registry: ContractRegistry, value: str, finding: str
) -> None:
    con.execute(
        "CREATE TABLE published.t AS SELECT DATE '2026-01-01' AS month, 'RX1' AS provider_code, "
        "? AS label, 10 AS people, false AS suppressed",
        [value],
    )
    problems = guard_table(con, "published.t", output(), registry)
    assert any(finding in p for p in problems), problems
    assert value not in "\n".join(problems)


def test_guard_refuses_day_precise_dates_big_integers_and_a_reason_column(
    con: duckdb.DuckDBPyConnection, registry: ContractRegistry
) -> None:
    con.execute(
        "CREATE TABLE published.t AS SELECT DATE '1956-03-12' AS month, 'RX1' AS provider_code, "
        "'ok' AS label, 9434765919 AS people, 'secondary' AS suppressed"
    )
    text = "\n".join(guard_table(con, "published.t", output(), registry))
    assert "day-precise date" in text
    assert "10-digit number" in text
    assert "kind of suppression" in text


def test_guard_passes_ordinary_labels(con: duckdb.DuckDBPyConnection, registry: ContractRegistry) -> None:
    con.execute(
        "CREATE TABLE published.t AS SELECT DATE '2026-01-01' AS month, 'RX1' AS provider_code, "
        "unnest(['IX Diseases of the circulatory system', '18-44', '85+', 'E08000025', 'Long term support: "
        "community - home care', '''-3']) AS label, 10 AS people, false AS suppressed"
    )
    assert guard_table(con, "published.t", output(), registry) == []


# --- the release -------------------------------------------------------------------------


def test_release_writes_every_file_neutralised_and_licensed(store: Store, registry: ContractRegistry) -> None:
    home = store.home
    labels = {"=1+1": 20, "+44": 30, "-3": 40, "@SUM(A1)": 25, "\tTab": 35, "\rCR": 45, "Plain": 50}
    out = output()
    with store.connect() as con:
        seed_haven(con, labels)
        build_all(con, out, registry, home)
        release = publish_release(con, [out], registry, home, now=NOW)
        audited = con.execute(
            "SELECT count(*) FROM governance.audit_log WHERE action = 'publish' AND legal_basis = 'anonymised'"
        ).fetchone()[0]
    pub = home.published
    for name in (
        "adm.csv",
        "adm.parquet",
        "adm.dictionary.json",
        "adm.quality.json",
        "adm.quality.md",
        "published.duckdb",
        "LICENCE.txt",
        "release.json",
    ):
        assert (pub / name).is_file(), name
    assert audited == 1
    with open(pub / "adm.csv", newline="") as fh:
        got = {row["label"] for row in csv.DictReader(fh)}
    assert got == {"'=1+1", "'+44", "'-3", "'@SUM(A1)", "'\tTab", "'\rCR", "Plain"}
    pq = duckdb.sql(f"SELECT DISTINCT label FROM '{pub / 'adm.parquet'}'").fetchall()
    assert {r[0] for r in pq} == got
    manifest = json.loads((pub / "release.json").read_text())
    assert manifest["licence"] == OGL and manifest["release_id"] == release.release_id
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((pub / name).read_bytes()).hexdigest() == digest, name
    dictionary = json.loads((pub / "adm.dictionary.json").read_text())
    assert "Open Government Licence" in dictionary["licence"]
    assert {c["name"] for c in dictionary["columns"]} == {"month", "provider_code", "label", "people", "suppressed"}
    assert all(c.get("description") for c in dictionary["columns"])
    assert "Open Government Licence" in (pub / "LICENCE.txt").read_text()
    assert (pub / "methods.md").is_file(), "the methods document is published with the outputs"
    db = duckdb.connect(str(pub / "published.duckdb"), read_only=True)
    assert {r[0] for r in db.execute("SHOW TABLES").fetchall()} == {"adm", "dictionary", "quality"}
    db.close()
    assert not list(pub.glob(".staging-*"))


def test_a_violating_table_refuses_the_whole_release_and_writes_nothing(
    store: Store, registry: ContractRegistry
) -> None:
    home = store.home
    good, bad = output("good"), output("bad")
    with store.connect() as con:
        seed_haven(con, {"A": 40, "B": 60})
        build_all(con, good, registry, home)
        build_all(con, bad, registry, home)
        assert verify_release(con, [good, bad], registry) == []
        con.execute("UPDATE published.bad SET people = 3, suppressed = false WHERE label = 'A'")  # tampered
        with pytest.raises(PublicationRefused) as refused:
            publish_release(con, [good, bad], registry, home, now=NOW)
    assert any("bad: people" in p and "in 1..7" in p for p in refused.value.problems)
    assert not [p for p in home.published.iterdir() if not p.name.startswith(".")], "nothing is written"


def test_a_guard_finding_or_a_missing_statement_refuses_the_release(store: Store, registry: ContractRegistry) -> None:
    home = store.home
    out = output()
    with store.connect() as con:
        seed_haven(con, {"A": 40})
        build_output(con, out, registry, today=TODAY)
        assert any("no quality statement" in p for p in verify_release(con, [out], registry))
        store_statement(con, build_statement(con, out, registry, home, build_output(con, out, registry, today=TODAY)))
        con.execute("ALTER TABLE published.adm ADD COLUMN pid VARCHAR")
        problems = verify_release(con, [out], registry)
    assert any("'pid'" in p for p in problems)
    changed = output(title="Another title")
    with store.connect() as con:
        con.execute("ALTER TABLE published.adm DROP COLUMN pid")
        assert any("another definition" in p for p in verify_release(con, [changed], registry))


def test_a_second_release_replaces_files_and_drops_a_withdrawn_output(store: Store, registry: ContractRegistry) -> None:
    home = store.home
    first, second = output("first"), output("second")
    with store.connect() as con:
        seed_haven(con, {"A": 40})
        build_all(con, first, registry, home)
        build_all(con, second, registry, home)
        publish_release(con, [first, second], registry, home, now=NOW)
        assert (home.published / "first.csv").exists()
        again = publish_release(con, [second], registry, home, now=NOW)
        changes = json.loads((home.published / "second.quality.json").read_text())
    assert not (home.published / "first.csv").exists()
    assert "first.csv" in again.removed
    history = changes["comparability_and_coherence"]["changes_since_last_release"]
    assert history == ["first release of this output"], "the statement was built before the first release"


def test_methods_document_exists_and_explains_the_choices() -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "methods.md").read_text()
    for topic in (
        "Why",
        "1 to 7",
        "nearest 5",
        "midpoint",
        "Secondary suppression",
        "[c]",
        "Open Government Licence",
        "type 1",
        "linkage",
        "Relevance",
        "Accuracy",
        "Timeliness",
        "Accessibility",
        "Comparability",
    ):
        assert topic.lower() in text.lower(), topic


# --- the disclosure audit of the whole release (safehaven.publish.release_audit) --------------------

REVISION = {"kind": "revision", "why": "each release re-publishes every month"}
#: The output's dimensions with its labels declared: the releases below have a label held by a few
#: people (B: 3 a month), which an observed label would not be (safehaven.publish.observed).
DECLARED = [
    {"name": "month", "description": "month", "domain": "reporting_months"},
    {"name": "provider_code", "description": "provider", "domain": "observed"},
    {"name": "label", "description": "a text dimension", "domain": {"values": ["A", "B"]}},
]


def test_the_audit_refuses_a_release_whose_relation_exposes_a_suppressed_cell(
    store: Store, registry: ContractRegistry
) -> None:
    home = store.home
    dims = {"month": "month", "provider_code": "provider_code", "label": "label"}
    parent = output("parent", dimensions=DECLARED)
    child = output(
        "child",
        dimensions=DECLARED,
        relations=[{"kind": "subset", "of": "parent", "match": dims, "why": "the same people"}],
    )
    with store.connect() as con:
        seed_haven(con, {"A": 40, "B": 3})
        build_all(con, child, registry, home)  # built first: nothing to protect it jointly with
        build_all(con, parent, registry, home)
        # a parent that publishes 0 where the child suppresses: each table alone passes its checks
        con.execute("UPDATE published.parent SET people = 0, suppressed = false")
        assert verify_release(con, [parent, child], registry) == []
        with pytest.raises(PublicationRefused) as refused:
            publish_release(con, [parent, child], registry, home, now=NOW)
    assert any(p.startswith("child: 4 suppressed cell(s)") for p in refused.value.problems)
    assert not [p for p in home.published.iterdir() if not p.name.startswith(".")], "nothing is written"


def test_a_second_release_lists_revised_cells_and_audits_the_changes(store: Store, registry: ContractRegistry) -> None:
    home = store.home
    out = output(relations=[REVISION], dimensions=DECLARED)
    with store.connect() as con:
        seed_haven(con, {"A": 40, "B": 3})
        build_all(con, out, registry, home)
        publish_release(con, [out], registry, home, now=NOW)
        first = json.loads((home.published / "adm.quality.json").read_text())
        seed_haven(con, {"A": 52, "B": 12})  # late records
        build_all(con, out, registry, home)
        publish_release(con, [out], registry, home, now=NOW)
        second = json.loads((home.published / "adm.quality.json").read_text())
    assert "revisions" not in first["accuracy"]
    revised = second["accuracy"]["revisions"]
    assert {k: revised[k] for k in ("cells_compared", "cells_revised", "suppression_changed", "cells_not_listed")} == {
        "cells_compared": 4,
        "cells_revised": 4,
        "suppression_changed": 4,
        "cells_not_listed": 0,
    }
    # 40 and 3 people (all suppressed: 3 is small, 40 its secondary), then 52 and 12 (published 50 and 10)
    assert revised["cells"] == [
        {"cell": {"month": m, "provider_code": "RX1", "label": label}, "previous": "suppressed", "new": new}
        for m in ("2026-01-01", "2026-02-01")
        for label, new in (("A", 50), ("B", 10))
    ], "published values only: never the true 52 or 12"
    md = (home.published / "adm.quality.md").read_text()
    assert "| month | provider_code | label | previous | new |" in md
    assert "| 2026-01-01 | RX1 | A | suppressed | 50 |" in md
    audit = second["accuracy"]["disclosure_audit"]
    assert audit["audit_cells"] == 0 and audit["audit_changes"] == 4 and audit["audit_failing"] == 0


def test_revised_cells_are_listed_with_their_published_values_up_to_the_cap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Six of eight cells revised: each listed with its previous and new published value
    ("suppressed" for a suppressed cell), in dimension order, up to the cap; the rest counted."""
    monkeypatch.setattr(release_audit, "REVISED_CELLS_LISTED", 4)
    con = duckdb.connect()
    cols = "month DATE, provider_code VARCHAR, label VARCHAR, people BIGINT, suppressed BOOLEAN"
    before = [10, None, 20, 30, 40, 50, None, 70]
    after = [15, 25, 20, None, 45, 55, None, 75]  # cells 0, 1, 3, 4, 5, 7 revised
    for table, values in (("now", after), ("before", before)):
        con.execute(f"CREATE TABLE {table} ({cols})")
        con.executemany(
            f"INSERT INTO {table} VALUES (DATE '2026-01-01', 'RX1', ?, ?, ?)",
            [(f"L{i}", v, v is None) for i, v in enumerate(values)],
        )
    got = release_audit.revisions(con, output(), "now", "before")
    assert (got["cells_compared"], got["cells_revised"], got["suppression_changed"]) == (8, 6, 2)
    assert [(c["cell"]["label"], c["previous"], c["new"]) for c in got["cells"]] == [
        ("L0", 10, 15),
        ("L1", "suppressed", 25),
        ("L3", 30, "suppressed"),
        ("L4", 40, 45),
    ]
    assert got["cells"][0]["cell"] == {"month": "2026-01-01", "provider_code": "RX1", "label": "L0"}
    assert got["cells_not_listed"] == 2
    md = "".join(_revision_lines(got))
    assert "2 further revised cell(s) are not listed" in md and "| L3 | 30 | suppressed |" in md
    con.close()


def test_an_unreadable_previous_publication_refuses_the_release(store: Store, registry: ContractRegistry) -> None:
    home = store.home
    out = output(relations=[REVISION])
    with store.connect() as con:
        seed_haven(con, {"A": 40})
        build_all(con, out, registry, home)
        publish_release(con, [out], registry, home, now=NOW)
        (home.published / "adm.parquet").write_bytes(b"not parquet")
        before = sorted(p.name for p in home.published.iterdir())
        with pytest.raises(PublicationRefused) as refused:
            publish_release(con, [out], registry, home, now=NOW)
    (problem,) = refused.value.problems
    assert problem.startswith("adm: published/adm.parquet of release ") and "is not the file" in problem
    assert sorted(p.name for p in home.published.iterdir()) == before


# --- the previous publication is the store's record, not what sits in published/ (CoP 23d) ---------


def _publish_twice(
    store: Store, registry: ContractRegistry, tamper: Callable[[Home], None], *, restore: bool = False
) -> tuple[list[str], dict[str, Any] | None]:
    """Publish 40/3, ``tamper`` with published/, then publish 52/12 (late records): the refusal of
    the second, and with ``restore`` (published/ put back from a backup) the next one's accuracy."""
    home = store.home
    out = output(relations=[REVISION], dimensions=DECLARED)
    with store.connect() as con:
        seed_haven(con, {"A": 40, "B": 3})
        build_all(con, out, registry, home)
        publish_release(con, [out], registry, home, now=NOW)
        backup = {p.name: p.read_bytes() for p in home.published.iterdir() if p.is_file()}
        tamper(home)
        before = {p.name: p.read_bytes() for p in home.published.iterdir() if p.is_file()}
        seed_haven(con, {"A": 52, "B": 12})
        build_all(con, out, registry, home)
        with pytest.raises(PublicationRefused) as refused:
            publish_release(con, [out], registry, home, now=NOW)
        assert {p.name: p.read_bytes() for p in home.published.iterdir() if p.is_file()} == before, "nothing written"
        with pytest.raises(PublicationRefused):
            publish_release(con, [out], registry, home, now=NOW)  # and again, until a person puts it right
        if not restore:
            return refused.value.problems, None
        for name, data in backup.items():
            (home.published / name).write_bytes(data)
        publish_release(con, [out], registry, home, now=NOW)
    return refused.value.problems, json.loads((home.published / "adm.quality.json").read_text())["accuracy"]


def test_a_previous_publication_whose_manifest_is_gone_refuses_the_next_one(
    store: Store, registry: ContractRegistry
) -> None:
    """A deleted ``published/release.json`` is not "no previous publication": the store records
    one that analysts hold, so the next release is refused, naming the manifest and how to put it
    back, until it is; then the changes are audited against it (``release_audit`` "Fail closed")."""
    problems, accuracy = _publish_twice(store, registry, _delete_manifest, restore=True)
    (problem,) = problems
    assert problem.startswith("published/release.json of release ") and "is missing" in problem
    assert "from a backup of published/" in problem
    assert accuracy and accuracy["disclosure_audit"]["audit_changes"] == 4
    assert accuracy["revisions"]["cells_revised"] == 4


def _delete_manifest(home: Home) -> None:
    (home.published / "release.json").unlink()


def _drop_from_manifest(home: Home) -> None:
    manifest = json.loads((home.published / "release.json").read_text())
    manifest["files"].pop("adm.parquet")
    (home.published / "release.json").write_text(json.dumps(manifest))


def test_a_manifest_that_no_longer_lists_an_output_refuses_the_next_publication(
    store: Store, registry: ContractRegistry
) -> None:
    """A manifest edited so that it no longer lists an output's file does not make the output
    new: the manifest must list the files the store records for the last publication, or the
    release is refused (``release_audit`` "Fail closed")."""
    (problem,), _ = _publish_twice(store, registry, _drop_from_manifest)
    assert problem.startswith("published/release.json of release ") and "edited or replaced" in problem


def _swap_parquet(home: Home) -> None:
    """Another readable Parquet of the same columns, with no rows, in place of the published one."""
    path = home.published / "adm.parquet"
    con = duckdb.connect()
    con.execute(f"COPY (SELECT * FROM read_parquet('{path}') LIMIT 0) TO '{path}.tmp' (FORMAT parquet)")
    con.close()
    Path(f"{path}.tmp").replace(path)


def test_a_swapped_previous_parquet_refuses_the_next_publication(store: Store, registry: ContractRegistry) -> None:
    """The previous Parquet is read only if its SHA-256 is the one the store recorded when it was
    published: another file, however readable, refuses the release, naming the file and how to put
    it back; put back, the changes are audited against it (``release_audit`` "Fail closed")."""
    problems, accuracy = _publish_twice(store, registry, _swap_parquet, restore=True)
    (problem,) = problems
    assert problem.startswith("adm: published/adm.parquet of release ") and "is not the file" in problem
    assert "its SHA-256 must match" in problem
    assert accuracy and accuracy["revisions"]["cells_compared"] == 4
    assert accuracy["disclosure_audit"]["audit_changes"] == 4


def test_an_output_left_out_of_a_publication_is_compared_with_its_last_publication_when_it_returns(
    store: Store, registry: ContractRegistry
) -> None:
    """An output left out of one publication (its files removed from published/) and back in a
    later one is not new: analysts hold its last publication, so the release is refused, naming
    that release's file, until a person puts it back; then the changes since it are audited."""
    home = store.home
    adm, other = output(relations=[REVISION], dimensions=DECLARED), output("other", dimensions=DECLARED)
    with store.connect() as con:
        seed_haven(con, {"A": 40, "B": 3})
        build_all(con, adm, registry, home)
        build_all(con, other, registry, home)
        first = publish_release(con, [adm, other], registry, home, now=NOW)
        kept = (home.published / "adm.parquet").read_bytes()
        seed_haven(con, {"A": 41, "B": 3})
        build_all(con, other, registry, home)
        publish_release(con, [other], registry, home, now=NOW)
        assert not (home.published / "adm.parquet").exists()
        seed_haven(con, {"A": 52, "B": 12})
        build_all(con, adm, registry, home)
        build_all(con, other, registry, home)
        with pytest.raises(PublicationRefused) as refused:
            publish_release(con, [adm, other], registry, home, now=NOW)
        (home.published / "adm.parquet").write_bytes(kept)
        publish_release(con, [adm, other], registry, home, now=NOW)
    (problem,) = refused.value.problems
    assert problem.startswith(f"adm: published/adm.parquet of release {first.release_id}, the last publication of adm")
    assert "left the output out" in problem
    accuracy = json.loads((home.published / "adm.quality.json").read_text())["accuracy"]
    assert accuracy["disclosure_audit"]["audit_changes"] == 4 and accuracy["revisions"]["cells_revised"] == 4


# --- a publication a crash left part way into published/ ------------------------------------------


@pytest.mark.parametrize("moved", [1, 3, "all"], ids=["one file moved", "three files moved", "all moved, unrecorded"])
def test_a_publication_stopped_part_way_into_published_is_audited_against_and_the_next_run_goes_on(
    store: Store, registry: ContractRegistry, monkeypatch: pytest.MonkeyPatch, moved: int | str
) -> None:
    """A kill while the files move into ``published/`` (or after, before the release is recorded)
    leaves some of a release there unrecorded: it is recorded as pending before the first move, so
    the next run needs no person (the files there are that release's or the last recorded one's)
    and audits its changes against whichever analysts may hold (``release_audit``)."""
    home, out = store.home, output(relations=[REVISION])
    with store.connect() as con:
        seed_haven(con, {"A": 40, "B": 20})
        build_all(con, out, registry, home)
        publish_release(con, [out], registry, home, now=NOW)
        seed_haven(con, {"A": 52, "B": 5})  # B suppressed (and A with it) in the release that is stopped
        build_all(con, out, registry, home)
        with monkeypatch.context() as mp:
            if moved == "all":
                mp.setattr(reuse, "record_publication", _killed)
            else:
                mp.setattr(publication.os, "replace", _replaces(moved))
            with pytest.raises(KeyboardInterrupt):
                publish_release(con, [out], registry, home, now=NOW)
        assert reuse.pending_publications(con)
        seed_haven(con, {"A": 60, "B": 30})
        build_all(con, out, registry, home)
        release = publish_release(con, [out], registry, home, now=NOW)
        assert not release.unchanged and not reuse.pending_publications(con)
        assert [p.release_id for p in reuse.publications(con)][0] == release.release_id
    accuracy = json.loads((home.published / "adm.quality.json").read_text())["accuracy"]
    previous = {c["cell"]["label"]: c["previous"] for c in accuracy["revisions"]["cells"]}
    # compared with the stopped release: its Parquet moves first, so any of its figures public means it is in place
    assert previous == {"A": "suppressed", "B": "suppressed"}
    assert accuracy["disclosure_audit"]["audit_changes"] == 4


def _killed(*_args: object, **_kwargs: object) -> None:
    raise KeyboardInterrupt("killed")


def _replaces(allowed: int) -> Callable[[object, object], None]:
    """``os.replace`` that moves ``allowed`` files, then the process is killed."""
    done: list[object] = []
    real = os.replace

    def replace(src: object, dst: object) -> None:
        if len(done) >= allowed:
            raise KeyboardInterrupt("killed")
        done.append(src)
        real(src, dst)  # type: ignore[arg-type]

    return replace


@pytest.mark.parametrize("moved", [0, 1, 3], ids=["none moved", "one moved", "three moved"])
def test_two_publications_stopped_in_a_row_need_no_person(
    store: Store, registry: ContractRegistry, monkeypatch: pytest.MonkeyPatch, moved: int
) -> None:
    """Release B stopped after all its files moved, then C stopped before its manifest moved: B's
    files in ``published/`` stay known as pending (one pending row, replaced by C's, refused every
    later release as tampering: found by review), so the next publication goes through."""
    home, out = store.home, output(relations=[REVISION])
    with store.connect() as con:
        for counts, stop in (({"A": 40, "B": 20}, None), ({"A": 52, "B": 25}, "all"), ({"A": 60, "B": 30}, moved)):
            seed_haven(con, counts)
            build_all(con, out, registry, home)
            with monkeypatch.context() as mp:
                if stop == "all":
                    mp.setattr(reuse, "record_publication", _killed)
                elif stop is not None:
                    mp.setattr(publication.os, "replace", _replaces(stop))
                with pytest.raises(KeyboardInterrupt) if stop is not None else contextlib.nullcontext():
                    publish_release(con, [out], registry, home, now=NOW)
        assert len(reuse.pending_publications(con)) == 2
        seed_haven(con, {"A": 70, "B": 35})
        build_all(con, out, registry, home)
        release = publish_release(con, [out], registry, home, now=NOW)
        assert not release.unchanged and not reuse.pending_publications(con)


@pytest.mark.parametrize("stored", ["[]", '"x"', '{"adm.parquet": 7}'], ids=["a list", "text", "a hash not text"])
def test_a_publication_record_of_another_shape_refuses_the_next_release_naming_the_manifest(
    store: Store, registry: ContractRegistry, stored: str
) -> None:
    """The store's record of the last publication (its files by SHA-256) edited to another shape
    matches no file: the next release is refused naming the manifest, not failed on the shape,
    and an unchanged publication is never taken as "not re-issued" on it."""
    home, out = store.home, output(relations=[REVISION], dimensions=DECLARED)
    with store.connect() as con:
        seed_haven(con, {"A": 40, "B": 3})
        build_all(con, out, registry, home)
        publish_release(con, [out], registry, home, now=NOW)
        con.execute("UPDATE governance.publication_contents SET files = ?", [stored])
        assert reuse.publications(con)[0].files == {}
        seed_haven(con, {"A": 52, "B": 12})
        build_all(con, out, registry, home)
        with pytest.raises(PublicationRefused) as refused:
            publish_release(con, [out], registry, home, now=NOW)
    assert "release.json of release" in refused.value.problems[0]


# --- what is in published/ is what the store records (safehaven.publish.integrity) ----------------


def _actions(con: duckdb.DuckDBPyConnection, action: str) -> list[dict[str, Any]]:
    rows = con.execute(
        "SELECT object, outcome, detail FROM governance.audit_log WHERE action = ? ORDER BY seq", [action]
    ).fetchall()
    return [{"object": r[0], "outcome": r[1], **json.loads(r[2])} for r in rows]


def _evidence(home: Home) -> list[Path]:
    """Every entry kept as evidence, in every evidence folder."""
    return sorted(p for folder in home.evidence.glob("published-*") for p in (folder / "files").iterdir())


def test_an_altered_published_database_is_refused_to_analysts_and_recorded_kept_and_replaced_at_the_next_run(
    store: Store, registry: ContractRegistry
) -> None:
    """Suppressed cells rewritten in published.duckdb as small counts (an insider, no key): the
    analyst's query is refused; the next publication records an incident (audit entry and breach
    register), keeps the altered file as evidence and publishes afresh, saying so; once."""
    from safehaven.core.registers import breaches
    from safehaven.publish.query import QueryRefused, run_query

    home, out = store.home, output(dimensions=DECLARED)
    with store.connect() as con:
        seed_haven(con, {"A": 40, "B": 3})
        build_all(con, out, registry, home)
        first = publish_release(con, [out], registry, home, now=NOW)
    db = home.published_db
    tamper = duckdb.connect(str(db))
    tamper.execute("UPDATE adm SET people = 3, suppressed = false WHERE label = 'B'")
    tamper.close()
    altered = hashlib.sha256(db.read_bytes()).hexdigest()
    with pytest.raises(QueryRefused, match="differs from the release it belongs to"):
        run_query(db, "SELECT people FROM adm WHERE label = 'B' AND NOT suppressed")
    with store.connect() as con:
        second = publish_release(con, [out], registry, home, now=NOW)
        recorded = _actions(con, "published_altered")
        breach = [b for b in breaches(con) if b["kind"] == "published_altered"]
        third = publish_release(con, [out], registry, home, now=NOW)
        again = _actions(con, "published_altered")
    assert second.release_id != first.release_id and third.unchanged
    assert [(r["object"], r["sha256"], r["release_id"]) for r in recorded] == [
        ("published/published.duckdb", altered, first.release_id)
    ]
    assert len(breach) == 1 and breach[0]["severity"] == 2 and recorded[0]["breach_id"] == breach[0]["breach_id"]
    (kept,) = _evidence(home)
    assert kept.name == "published.duckdb" and hashlib.sha256(kept.read_bytes()).hexdigest() == altered
    (listed,) = json.loads((kept.parents[1] / "set_aside.json").read_text())["entries"]
    assert (listed["release_id"], listed["moved"], listed["sha256"]) == (first.release_id, False, altered)
    (line,) = second.set_aside
    assert "published/published.duckdb was altered" in line and f"breach {breach[0]['breach_id']}" in line
    assert run_query(db, "SELECT count(*) FROM adm WHERE label = 'B' AND NOT suppressed").rows == [(0,)]
    assert again == recorded and third.set_aside == [], "recorded once; the fresh publication is the haven's"


@pytest.mark.parametrize("name", ["adm.csv", "adm.parquet", "adm.quality.json", "adm.dictionary.json", "LICENCE.txt"])
def test_any_recorded_file_altered_after_publication_is_an_incident_and_replaced(
    store: Store, registry: ContractRegistry, name: str
) -> None:
    home, out = store.home, output(dimensions=DECLARED)
    with store.connect() as con:
        seed_haven(con, {"A": 40, "B": 20})
        build_all(con, out, registry, home)
        publish_release(con, [out], registry, home, now=NOW)
        original = (home.published / name).read_bytes()
        (home.published / name).write_bytes(original + b"\n")
        release = publish_release(con, [out], registry, home, now=NOW)
        recorded = _actions(con, "published_altered")
    assert [r["object"] for r in recorded] == [f"published/{name}"] and not release.unchanged
    assert [p.name for p in _evidence(home)] == [name]
    manifest = json.loads((home.published / "release.json").read_text())
    assert hashlib.sha256((home.published / name).read_bytes()).hexdigest() == manifest["files"][name]


def test_an_altered_previous_parquet_is_recorded_once_while_the_release_audit_refuses(
    store: Store, registry: ContractRegistry
) -> None:
    """The release audit still refuses over a swapped previous Parquet, which stays in place for it
    (``test_a_swapped_previous_parquet_refuses_the_next_publication``); the swap is recorded once,
    with a copy kept, however many runs are refused, and the refusal says so."""
    swapped: list[str] = []

    def swap(home: Home) -> None:
        _swap_parquet(home)
        swapped.append(hashlib.sha256((home.published / "adm.parquet").read_bytes()).hexdigest())

    problems, accuracy = _publish_twice(store, registry, swap, restore=True)
    assert len(problems) == 1 and accuracy is not None
    with store.connect() as con:
        recorded = _actions(con, "published_altered")
    assert [(r["object"], r["sha256"]) for r in recorded] == [("published/adm.parquet", swapped[0])]
    assert [p.name for p in _evidence(store.home)] == ["adm.parquet"]


def test_a_refusal_after_the_check_of_published_says_what_was_set_aside(
    store: Store, registry: ContractRegistry
) -> None:
    home, out = store.home, output(relations=[REVISION], dimensions=DECLARED)
    with store.connect() as con:
        seed_haven(con, {"A": 40, "B": 3})
        build_all(con, out, registry, home)
        publish_release(con, [out], registry, home, now=NOW)
        _swap_parquet(home)
        with pytest.raises(PublicationRefused) as refused:
            publish_release(con, [out], registry, home, now=NOW)
    (line,) = refused.value.set_aside
    assert "published/adm.parquet was altered" in line and line in str(refused.value)


PLANTED = {
    "adm_by_postcode.csv": "nhs_number,postcode\n9434765919,LS1 4AP\n",
    "9434765919.csv": "x\n",
    ".hidden": "x\n",
    "published.duckdb.wal": "not a log\n",
}


def test_an_entry_planted_in_published_is_moved_out_recorded_and_reported(
    store: Store, registry: ContractRegistry
) -> None:
    """Files (and a folder) the store records no publication of, put in published/ between runs:
    the next publication moves each into the evidence folder, records it (audit entry, breach
    register) and reports it, never naming an NHS number; the publication itself goes on."""
    from safehaven.core.registers import breaches

    home, out = store.home, output(dimensions=DECLARED)
    with store.connect() as con:
        seed_haven(con, {"A": 40, "B": 20})
        build_all(con, out, registry, home)
        publish_release(con, [out], registry, home, now=NOW)
        for name, text in PLANTED.items():
            (home.published / name).write_text(text)
        (home.published / "extra").mkdir()
        (home.published / "extra" / "list.csv").write_text(PLANTED["adm_by_postcode.csv"])
        same = publish_release(con, [out], registry, home, now=NOW)
        recorded = _actions(con, "published_planted")
        kinds = [b["kind"] for b in breaches(con)]
        seed_haven(con, {"A": 45, "B": 25})
        build_all(con, out, registry, home)
        changed = publish_release(con, [out], registry, home, now=NOW)
    planted = {*PLANTED, "extra"}
    assert same.unchanged and not changed.unchanged and changed.set_aside == []
    assert not planted & {p.name for p in home.published.iterdir()}
    assert {p.name for p in _evidence(home)} == planted, "kept, not deleted"
    assert (home.evidence.glob("published-*").__next__() / "files" / "extra" / "list.csv").is_file()
    assert len(recorded) == len(planted) and kinds.count("published_planted") == len(planted)
    assert all(r["outcome"] == "set_aside" and r["breach_id"] for r in recorded)
    text = json.dumps(recorded) + "\n".join(same.set_aside)
    assert "9434765919" not in text and "published/[number withheld].csv" in text
    assert len(same.set_aside) == len(planted) and all("moved out of published/" in line for line in same.set_aside)


def test_a_manifest_rewritten_for_a_new_audit_head_and_killed_before_its_record_is_no_incident(
    store: Store, registry: ContractRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unchanged publication rewrites only its manifest's audit head; a kill between the rename
    and recording its hash leaves the haven's own manifest, which the next run must not report."""
    home, out = store.home, output(dimensions=DECLARED)
    with store.connect() as con:
        seed_haven(con, {"A": 40, "B": 20})
        build_all(con, out, registry, home)
        publish_release(con, [out], registry, home, now=NOW)
        audit.append(con, actor="tests", role="pipeline", action="noted", object="tests")  # a newer head
        with monkeypatch.context() as mp:
            mp.setattr(reuse, "record_manifest", _killed)
            with pytest.raises(KeyboardInterrupt):
                publish_release(con, [out], registry, home, now=NOW)
        release = publish_release(con, [out], registry, home, now=NOW)
        recorded = _actions(con, "published_altered")
    assert recorded == [] and release.set_aside == [] and not _evidence(home)


NHS_LIST = PLANTED["adm_by_postcode.csv"]


def test_an_entry_named_like_the_old_staging_folders_is_judged_planted_moved_out_and_recorded(
    store: Store, registry: ContractRegistry
) -> None:
    """No publication stages in published/ any more: a plain file, a link and a folder named
    ``.staging-*`` are entries like any other, moved into evidence (the folder kept, not deleted)
    and recorded, by an unchanged publication as by a changed one."""
    from safehaven.core.registers import breaches

    home, out = store.home, output(dimensions=DECLARED)
    with store.connect() as con:
        seed_haven(con, {"A": 40, "B": 20})
        build_all(con, out, registry, home)
        publish_release(con, [out], registry, home, now=NOW)
        (home.published / ".staging-nhs.csv").write_text(NHS_LIST)
        outside = home.root.parent / "outside.csv"
        outside.write_text(NHS_LIST)
        (home.published / ".staging-x").symlink_to(outside)
        (home.published / ".staging-leak").mkdir()
        (home.published / ".staging-leak" / "list.csv").write_text(NHS_LIST)
        same = publish_release(con, [out], registry, home, now=NOW)
        seed_haven(con, {"A": 45, "B": 25})
        build_all(con, out, registry, home)
        changed = publish_release(con, [out], registry, home, now=NOW)
        recorded = _actions(con, "published_planted")
        kinds = [b["kind"] for b in breaches(con)]
    names = {".staging-nhs.csv", ".staging-x", ".staging-leak"}
    assert same.unchanged and not changed.unchanged and len(same.set_aside) == 3 and changed.set_aside == []
    assert not [p for p in home.published.iterdir() if p.name.startswith(".staging-")]
    assert {p.name for p in _evidence(home)} == names
    (folder,) = home.evidence.glob("published-*")
    assert (folder / "files" / ".staging-leak" / "list.csv").read_text() == NHS_LIST, "kept, not deleted"
    assert (folder / "files" / ".staging-x").is_symlink() and outside.read_text() == NHS_LIST
    assert len(recorded) == 3 and kinds.count("published_planted") == 3


def test_an_altered_file_of_an_output_left_out_is_moved_out_not_left_in_published(
    store: Store, registry: ContractRegistry
) -> None:
    """``first.parquet`` of an output a later publication left out is the haven's own by name, so a
    file written there is altered; but no publication rewrites it, so it is moved out into evidence
    (recorded) rather than left for analysts, and the release audit asks for it when the output returns."""
    home = store.home
    first, second = output("first", dimensions=DECLARED), output("second", dimensions=DECLARED)
    with store.connect() as con:
        seed_haven(con, {"A": 40, "B": 20})
        build_all(con, first, registry, home)
        build_all(con, second, registry, home)
        publish_release(con, [first, second], registry, home, now=NOW)
        publish_release(con, [second], registry, home, now=NOW)
        (home.published / "first.parquet").write_text(NHS_LIST)
        one = publish_release(con, [second], registry, home, now=NOW)
        gone = not (home.published / "first.parquet").exists()
        (home.published / "first.parquet").write_text(NHS_LIST)  # put there again: a new incident
        two = publish_release(con, [second], registry, home, now=NOW)
        recorded = _actions(con, "published_altered")
    assert gone and not (home.published / "first.parquet").exists()
    assert [p.read_text() for p in _evidence(home)] == [NHS_LIST, NHS_LIST]
    assert [r["object"] for r in recorded] == ["published/first.parquet"] * 2
    (line,) = one.set_aside
    assert "moved out of published/" in line and "put back" in line and len(two.set_aside) == 1


def test_the_same_alteration_made_again_after_a_publication_replaced_the_file_is_a_new_incident(
    store: Store, registry: ContractRegistry
) -> None:
    """'Recorded once' holds while an altered file stays in place; once a publication has replaced
    it, the same bytes written again are a fresh tampering: recorded again, with its own evidence."""
    from safehaven.core.registers import breaches

    home, out = store.home, output(dimensions=DECLARED)
    with store.connect() as con:
        seed_haven(con, {"A": 40, "B": 20})
        build_all(con, out, registry, home)
        publish_release(con, [out], registry, home, now=NOW)
        path = home.published / "adm.csv"
        original = path.read_bytes()
        path.write_bytes(original + b"A,99\n")
        first = publish_release(con, [out], registry, home, now=NOW)
        assert path.read_bytes() == original
        path.write_bytes(original + b"A,99\n")
        second = publish_release(con, [out], registry, home, now=NOW)
        recorded = _actions(con, "published_altered")
        kinds = [b["kind"] for b in breaches(con)]
    assert len(first.set_aside) == 1 and len(second.set_aside) == 1
    assert len(recorded) == 2 and recorded[1]["release_id"] == first.release_id != recorded[0]["release_id"]
    assert kinds.count("published_altered") == 2 and [p.name for p in _evidence(home)] == ["adm.csv", "adm.csv"]


def test_before_the_first_publication_a_manifest_in_published_is_no_record_and_every_entry_is_planted(
    store: Store, registry: ContractRegistry
) -> None:
    """With no publication recorded (nor pending), a ``release.json`` in published/ is anyone's: it
    vouches for nothing, so the file it lists and the manifest itself are moved out and recorded."""
    home, out = store.home, output(dimensions=DECLARED)
    with store.connect() as con:
        seed_haven(con, {"A": 40, "B": 20})
        build_all(con, out, registry, home)
        home.published.mkdir(parents=True, exist_ok=True)
        (home.published / "list.csv").write_text(NHS_LIST)
        sha = hashlib.sha256(NHS_LIST.encode()).hexdigest()
        forged = json.dumps({"release_id": "forged", "files": {"list.csv": sha}})
        (home.published / "release.json").write_text(forged)
        release = publish_release(con, [out], registry, home, now=NOW)
        recorded = _actions(con, "published_planted")
    assert not (home.published / "list.csv").exists() and "list.csv" not in release.removed
    assert {r["object"] for r in recorded} == {"published/list.csv", "published/release.json"}
    kept = {p.name: p.read_text() for p in _evidence(home)}
    assert kept == {"list.csv": NHS_LIST, "release.json": forged}
    assert json.loads((home.published / "release.json").read_text())["release_id"] == release.release_id


def _hold(con: duckdb.DuckDBPyConnection, collection: str) -> None:
    """The collection's latest drop, arrived now, was refused at validation: the collection is held."""
    from safehaven.core import schema

    schema.ensure(con, schema.BATCHES)
    con.execute(
        f"INSERT INTO {schema.BATCHES} (batch_id, collection, file_name, sha256, rows, landed_at, status, "
        "invalid_rows, validated_at, contract_version, drop_key, arrived_at) VALUES "
        "(?, ?, 'bad.csv', 'x', 10, now(), 'refused', 10, now(), '1', 'drop-bad', now())",
        [f"held-{collection}", collection],
    )


def test_a_publication_of_an_output_reading_a_held_collection_is_refused_and_writes_nothing(
    store: Store, registry: ContractRegistry
) -> None:
    """The publish step materialised alone, after the collection was held, refuses the whole
    release, naming the collection and what clears the hold; published/ is left as it was."""
    from safehaven.intake.validation import CollectionHeld

    home, out = store.home, output(dimensions=DECLARED)
    with store.connect() as con:
        seed_haven(con, {"A": 40, "B": 20})
        build_all(con, out, registry, home)
        _hold(con, "hospital_episodes")
        with pytest.raises(CollectionHeld) as refused:
            publish_release(con, [out], registry, home, now=NOW)
        published = _actions(con, "publish")
    message = str(refused.value)
    assert message.startswith("publication refused") and "hospital_episodes is held" in message
    assert "corrected file" in message
    assert published == [] and not (home.published.exists() and any(home.published.iterdir()))


def test_a_published_file_hard_linked_elsewhere_is_not_an_incident(
    store: Store, registry: ContractRegistry, tmp_path: Path
) -> None:
    """A backup's hard-linked snapshot gives a published file a second name; its bytes are still
    those published, so nothing is set aside and the publication is unchanged (``integrity._plain_sha``
    reads regular files, never through a symbolic link)."""
    home, out = store.home, output(dimensions=DECLARED)
    with store.connect() as con:
        seed_haven(con, {"A": 40, "B": 3})
        build_all(con, out, registry, home)
        publish_release(con, [out], registry, home, now=NOW)
        os.link(home.published / "adm.csv", tmp_path / "snapshot-adm.csv")
        again = publish_release(con, [out], registry, home, now=NOW)
    assert again.unchanged and again.set_aside == []
