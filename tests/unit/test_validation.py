"""Row-level validation: valid rows go on, failing rows are quarantined by rule id, GX decides the batch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import pytest
import yaml

from safehaven.core.home import Home
from safehaven.core.store import Store
from safehaven.intake import rules
from safehaven.intake.contracts import CONTRACTS_DIR, ContractRegistry
from safehaven.intake.rules import RuleCheck
from safehaven.intake.validation import RESULTS, RULE_RESULTS, CollectionHeld, refuse_held, validate_collection
from tests.unit.validation_helpers import gp_rows, land, nhs_numbers

REGISTRY = ContractRegistry(CONTRACTS_DIR)
GP = REGISTRY.contracts["gp_events"]

BAD_CHECK_DIGIT = "9990000019"  # 999 000 001 -> check digit 8
BAD_CODE = "12345678"
BAD_POSTCODE = "QQ 1ZZ"
CHECKS_DISAGREE = "batch.checks_disagree"  # the reason file's rule of a batch the two checks disagree on


@pytest.fixture
def con(store: Store):
    with store.connect() as connection:
        yield connection


def _validate(
    con: duckdb.DuckDBPyConnection, home: Home, collection: str = "gp_events", registry: ContractRegistry = REGISTRY
):
    return validate_collection(con, registry.contracts[collection], registry, home.quarantine_for(collection))


def _defective(rows: list[dict[str, str]], count: int) -> list[dict[str, str]]:
    """Give the first ``count`` rows one defect each, cycling through three rules."""
    out = [dict(r) for r in rows]
    defects = [("nhs_number", BAD_CHECK_DIGIT), ("diagnosis_code", BAD_CODE), ("postcode", BAD_POSTCODE)]
    for i in range(count):
        field, value = defects[i % 3]
        out[i][field] = value
    return out


def test_valid_rows_go_on_typed_and_failing_rows_are_quarantined_by_rule(con, home: Home) -> None:
    rows = _defective(gp_rows(100), 3)
    rows[50]["nhs_number"] = (
        rows[50]["nhs_number"][:3] + " " + rows[50]["nhs_number"][3:6] + " " + rows[50]["nhs_number"][6:]
    )
    batch = land(con, home, REGISTRY, "gp_events", rows, "gp_1.csv")
    report = _validate(con, home)

    assert (report.rows_checked, report.rows_valid, report.rows_invalid) == (100, 97, 3)
    assert report.failures_by_rule == {"diagnosis_code.code_list": 1, "nhs_number.nhs_number": 1, "postcode.format": 1}
    assert report.batches_accepted == [batch] and not report.batches_refused and report.gx_success
    assert con.execute("SELECT status, invalid_rows FROM governance.batches").fetchall() == [("accepted", 3)]
    rejected = con.execute("SELECT _row, failed_rules FROM landing.gp_events_rejected ORDER BY _row").fetchall()
    assert rejected == [(1, ["nhs_number.nhs_number"]), (2, ["diagnosis_code.code_list"]), (3, ["postcode.format"])]
    typed = con.execute(
        "SELECT typeof(date_of_birth), typeof(event_date), count(*), "
        "count(*) FILTER (WHERE nhs_number = ?) FROM landing.gp_events_valid GROUP BY ALL",
        [rows[50]["nhs_number"].replace(" ", "")],
    ).fetchall()
    assert typed == [("DATE", "DATE", 97, 1)]  # canonical NHS number, typed dates


def test_a_batch_over_tolerance_is_refused_whole_with_a_reason(con, home: Home) -> None:
    rows = _defective(gp_rows(100), 9)  # 9% > 5%
    batch = land(con, home, REGISTRY, "gp_events", rows, "gp_bad.csv")
    report = _validate(con, home)

    assert report.batches_refused and not report.gx_success
    assert report.rows_valid == 0 and report.rows_invalid == 9
    assert con.execute("SELECT count(*) FROM landing.gp_events_valid").fetchone() == (0,)
    assert con.execute("SELECT status FROM governance.batches WHERE batch_id = ?", [batch]).fetchone() == ("refused",)
    reason_file = home.quarantine_for("gp_events") / "gp_bad.csv.reason.json"
    reason = json.loads(reason_file.read_text())
    assert reason["rule"] == "batch.tolerance"
    assert "9 of 100 rows" in reason["reason"] and "5.00%" in reason["reason"]
    assert reason["failures_by_rule"] == {
        "nhs_number.nhs_number": 3,
        "diagnosis_code.code_list": 3,
        "postcode.format": 3,
    }
    text = reason_file.read_text()
    for value in (BAD_CHECK_DIGIT, BAD_CODE, BAD_POSTCODE, *[r["nhs_number"] for r in rows]):
        assert value not in text
    stored = con.execute(f"SELECT gx_success, status FROM {RESULTS} WHERE batch_id = ?", [batch]).fetchone()
    assert stored == (False, "refused")
    over = con.execute(f"SELECT rule_id FROM {RULE_RESULTS} WHERE NOT gx_success ORDER BY rule_id").fetchall()
    assert [r[0] for r in over] == ["rows.within_tolerance"]  # 3% per rule is within 5%; the rows are not


def test_refused_files_of_one_name_each_keep_their_own_reason(con, home: Home) -> None:
    """A sender using one file name: a file quarantined at ingest, then two refused batches of
    that name; no reason overwrites another's (each names its own file's SHA-256)."""
    folder = home.quarantine_for("gp_events")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "gp.csv").write_text("quarantined whole at ingest\n")
    (folder / "gp.csv.reason.json").write_text(json.dumps({"rule": "file.header.columns", "sha256": "a" * 64}))
    batches = [
        land(con, home, REGISTRY, "gp_events", _defective(gp_rows(100, start=100 * n), 9), "gp.csv") for n in (1, 2)
    ]
    _validate(con, home)
    reasons = {json.loads(p.read_text())["sha256"]: p.name for p in folder.glob("*.reason.json")}
    assert set(reasons) == {"a" * 64, *batches}
    assert reasons["a" * 64] == "gp.csv.reason.json"
    assert all(json.loads((folder / reasons[b]).read_text())["rule"] == "batch.tolerance" for b in batches)


def test_one_rule_over_tolerance_of_its_values_refuses_the_batch(con, home: Home) -> None:
    """An optional field mostly empty: 2 bad end dates are 2% of the rows but 40% of the end dates."""
    numbers = nhs_numbers(100)
    rows = [
        {
            "local_authority_code": "E08000025",
            "service_type": "day_care",
            "start_date": "2026-01-02",
            "end_date": "",
            "nhs_number": n,
            "date_of_birth": "1950-02-03",
            "sex": "2",
            "postcode": "M1 1AE",
        }
        for n in numbers
    ]
    for i, end in enumerate(["2026-02-01", "2026-03-01", "2026-04-01", "2099-01-01", "2098-01-01"]):
        rows[i]["end_date"] = end
    land(con, home, REGISTRY, "social_care", rows, "sc.csv")
    report = _validate(con, home, "social_care")
    assert report.rows_invalid == 2
    assert report.batches_refused
    assert report.batches_refused[0]["rules_over_tolerance"] == ["end_date.range"]
    reason = json.loads((home.quarantine_for("social_care") / "sc.csv.reason.json").read_text())
    assert "end_date.range" in reason["reason"]


def test_each_batch_is_judged_on_its_own(con, home: Home) -> None:
    good = land(con, home, REGISTRY, "gp_events", gp_rows(50), "gp_a.csv")
    bad = land(con, home, REGISTRY, "gp_events", _defective(gp_rows(50, start=100), 10), "gp_b.csv")
    report = _validate(con, home)
    assert report.batches_accepted == [good]
    assert [b["batch"] for b in report.batches_refused] == [bad]
    assert con.execute("SELECT DISTINCT _batch FROM landing.gp_events_valid").fetchall() == [(good,)]
    assert con.execute("SELECT count(*) FROM landing.gp_events_valid").fetchone() == (50,)
    rejected = dict(con.execute("SELECT _batch, count(*) FROM landing.gp_events_rejected GROUP BY ALL").fetchall())
    assert rejected == {bad: 10}
    assert con.execute(f"SELECT count(*) FROM {RESULTS}").fetchone() == (2,)


def test_validation_is_incremental_and_idempotent(con, home: Home) -> None:
    land(con, home, REGISTRY, "gp_events", gp_rows(20), "gp_1.csv")
    first = _validate(con, home)
    again = _validate(con, home)
    assert first.rows_checked == 20
    assert again.rows_checked == 0 and not again.batches and not again.batches_refused
    assert con.execute("SELECT count(*) FROM landing.gp_events_valid").fetchone() == (20,)
    land(con, home, REGISTRY, "gp_events", gp_rows(5, start=50), "gp_2.csv")
    assert _validate(con, home).rows_checked == 5
    assert con.execute("SELECT count(*) FROM landing.gp_events_valid").fetchone() == (25,)


def test_gx_and_the_pass_agree_on_every_rule(con, home: Home) -> None:
    rows = gp_rows(200)
    defects = {
        0: ("practice_code", ""),
        1: ("practice_code", "TOO_LONG_CODE"),
        2: ("nhs_number", ""),
        3: ("nhs_number", BAD_CHECK_DIGIT),
        4: ("nhs_number", "12345"),
        5: ("date_of_birth", ""),
        6: ("date_of_birth", "1950-02-30"),
        7: ("date_of_birth", "1850-01-01"),
        8: ("sex", ""),
        9: ("sex", "7"),
        10: ("postcode", ""),
        11: ("postcode", BAD_POSTCODE),
        12: ("event_date", ""),
        13: ("event_date", "soon"),
        14: ("event_date", "2099-01-01"),
        15: ("diagnosis_code", ""),
        16: ("diagnosis_code", BAD_CODE),
        17: ("date_of_birth", "2026-06-01"),  # event before birth
    }
    for i, (field, value) in defects.items():
        rows[i][field] = value
    rows[17]["event_date"] = "2026-01-01"
    land(con, home, REGISTRY, "gp_events", rows, "gp.csv")
    report = _validate(con, home)
    table = report.rules_table()
    for rule, row in table.items():
        if row["evaluated_by"] == "gx":
            assert row["gx_unexpected"] == row["sql_failures"], rule
    assert table["nhs_number.nhs_number"]["sql_failures"] == 2
    assert table["nhs_number.nhs_number"]["gx_unexpected"] == 1  # the wrong shape
    assert table["nhs_number.nhs_number"]["check_digit_failures_sql"] == 1  # the wrong check digit
    assert {r: n for r, n in report.failures_by_rule.items() if n != 1} == {"nhs_number.nhs_number": 2}
    assert len(report.failures_by_rule) == 17
    assert table["rows.within_tolerance"]["sql_failures"] == 18


def test_a_disagreement_between_gx_and_the_pass_refuses_the_batch_naming_the_rule_and_a_rerun_does_not_raise(
    con, home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blind the pass's code-list rule: GX, reading the code list itself, still finds the bad code.

    The stage does not fail: that batch is refused (none of its rows go on) under
    ``batch.checks_disagree``, naming the rule and never the value; the good batch beside it
    and later ones are accepted; the contract check fails; the next run does not raise.
    """
    original = rules.compile_checks

    def blind(*args, **kwargs) -> list[RuleCheck]:
        return [
            RuleCheck(c.id, c.description, c.fields, "true", c.kind) if c.id == "sex.code_list" else c
            for c in original(*args, **kwargs)
        ]

    monkeypatch.setattr(rules, "compile_checks", blind)  # used by the single pass only
    rows = gp_rows(30)
    rows[4]["sex"] = "7"
    bad = land(con, home, REGISTRY, "gp_events", rows, "gp.csv")
    good = land(con, home, REGISTRY, "gp_events", gp_rows(20, start=100), "gp_good.csv")
    report = _validate(con, home)  # raised ValidationInconsistent on the old code

    assert report.batches_accepted == [good] and not report.gx_success
    [refused] = report.batches_refused
    assert (refused["batch"], refused["rule"], refused["rules_disagreeing"]) == (
        bad,
        CHECKS_DISAGREE,
        ["sex.code_list"],
    )
    assert report.rules_disagreeing == ["sex.code_list"]
    statuses = dict(con.execute("SELECT batch_id, status FROM governance.batches").fetchall())
    assert statuses == {bad: "refused", good: "accepted"}
    assert con.execute("SELECT DISTINCT _batch FROM landing.gp_events_valid").fetchall() == [(good,)]
    assert con.execute(f"SELECT status FROM {RESULTS} WHERE batch_id = ?", [bad]).fetchone() == ("refused",)
    reason = json.loads((home.quarantine_for("gp_events") / "gp.csv.reason.json").read_text())
    assert reason["rule"] == CHECKS_DISAGREE and reason["rules_disagreeing"] == ["sex.code_list"]
    assert "sex.code_list: GX counts 1, the single pass 0" in reason["reason"]
    assert "sex.code_list" in reason["what_to_do"]
    for text in (reason["reason"], reason["what_to_do"]):
        assert "7" not in text  # the value is never named
    for nhs in (r["nhs_number"] for r in rows):
        assert nhs not in json.dumps(reason)

    from assets.validate import contract_check_result

    check = contract_check_result(GP, report)
    assert check.passed is False
    assert check.metadata["rules_gx_and_sql_disagree_on"].value == ["sex.code_list"]

    again = _validate(con, home)  # recorded: the refused batch is not judged again
    assert not again.batches and again.gx_success
    later = land(con, home, REGISTRY, "gp_events", gp_rows(10, start=200), "gp_later.csv")
    assert _validate(con, home).batches_accepted == [later]
    monkeypatch.setattr(rules, "compile_checks", original)
    assert not _validate(con, home).batches


def test_stored_results_keep_counts_and_never_values(con, home: Home) -> None:
    rows = _defective(gp_rows(40), 2)
    land(con, home, REGISTRY, "gp_events", rows, "gp.csv")
    _validate(con, home)
    document = con.execute(f"SELECT document FROM {RESULTS}").fetchone()[0]
    parsed = json.loads(document)
    assert parsed["great_expectations"]["success"] is True
    gx_types = {r["expectation_config"]["type"] for r in parsed["great_expectations"]["results"]}
    assert {
        "expect_column_values_to_be_in_set",
        "expect_column_values_to_match_regex",
        "expect_column_values_to_be_between",
        "expect_column_pair_values_a_to_be_greater_than_b",
        "expect_column_values_to_not_be_null",
    } <= gx_types
    dump = document + json.dumps(con.execute(f"SELECT * FROM {RULE_RESULTS}").fetchall(), default=str)
    dump += json.dumps(con.execute("SELECT * FROM governance.quality_measures").fetchall(), default=str)
    for value in (BAD_CHECK_DIGIT, BAD_CODE, *[r["nhs_number"] for r in rows]):
        assert value not in dump
    assert "partial_unexpected_list" not in dump


def test_a_uniqueness_declaration_refuses_repeated_keys(con, home: Home, tmp_path: Path) -> None:
    root = tmp_path / "data_contracts"
    shutil.copytree(CONTRACTS_DIR, root)
    path = root / "collections" / "gp_events.yaml"
    doc = yaml.safe_load(path.read_text())
    doc["unique"] = [
        {
            "id": "one_code_per_patient_day",
            "description": "a diagnosis is recorded once a day",
            "fields": ["nhs_number", "event_date", "diagnosis_code"],
        }
    ]
    path.write_text(yaml.safe_dump(doc))
    registry = ContractRegistry(root)
    rows = gp_rows(40)
    rows[10] = dict(rows[3])  # a repeat of row 4
    rows[11] = dict(rows[3], nhs_number=" ".join([rows[3]["nhs_number"][:3], rows[3]["nhs_number"][3:]]))
    rows[12] = dict(rows[3], diagnosis_code="")  # a missing key field is not compared
    land(con, home, registry, "gp_events", rows, "gp.csv")
    report = _validate(con, home, registry=registry)
    assert report.failures_by_rule == {"diagnosis_code.required": 1, "one_code_per_patient_day": 2}
    rejected = con.execute(
        "SELECT _row FROM landing.gp_events_rejected WHERE "
        "list_contains(failed_rules, 'one_code_per_patient_day') ORDER BY _row"
    ).fetchall()
    assert rejected == [(11,), (12,)]  # the first of the key stays valid
    unique = report.rules_table()["one_code_per_patient_day"]
    assert unique["gx"] == "expect_compound_columns_to_be_unique"
    assert unique["gx_unexpected"] == 3  # GX counts every row of a repeated key


def test_a_stage_reading_a_collection_the_contracts_do_not_describe_is_refused_as_held() -> None:
    """Whether a collection the deployment's contracts do not describe is held cannot be told, so
    a stage reading it is refused, naming it (``refuse_held``: one rule for counts, outputs,
    publication, releases and delivery; fail closed)."""
    with pytest.raises(CollectionHeld, match="release refused: the contracts given do not describe nowhere"):
        refuse_held(duckdb.connect(), ContractRegistry(), ["hospital_episodes", "nowhere"], "release")
    refuse_held(duckdb.connect(), ContractRegistry(), ["hospital_episodes"], "release")  # no drop yet: not held
