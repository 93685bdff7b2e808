"""The validate stage in the nightly job: a batch over tolerance blocks its collection downstream in the
same run, nothing identifiable leaks, and a collection added by contract alone flows through."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from assets import keys
from assets.runner import run_nightly
from safehaven.core.home import Home
from safehaven.core.store import Store
from safehaven.intake.contracts import CONTRACTS_DIR
from safehaven.intake.validation import RESULTS, RULE_RESULTS
from safehaven.tools import synthetic
from tests.conftest import building_haven, leaked_nhs_numbers, seeded_nhs_numbers
from tests.governance_helpers import adopt_project_agreements
from tests.unit.validation_helpers import nhs_numbers, write_csv

PATIENTS = 300
# Every test here reads or reruns a run of the pipeline: the slow tier (`pytest -m "not slow"` skips it).
pytestmark = pytest.mark.slow


def _corrupt_nhs_numbers(path: Path, share: float) -> int:
    """Give ``share`` of the file's rows a wrong check digit (the rest stay as generated)."""
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        columns, rows = list(reader.fieldnames or []), list(reader)
    bad = int(len(rows) * share)
    for row in rows[:bad]:
        digits = "".join(ch for ch in row["nhs_number"] if ch.isdigit())
        row["nhs_number"] = digits[:9] + str((int(digits[9]) + 1) % 10)
    write_csv(path, rows, columns)
    return bad


@contextmanager
def captured_logs() -> Iterator[list[str]]:
    """What ``caplog.set_level(logging.DEBUG)`` and ``capfd`` would catch, for a module-scoped fixture.

    Every record of DEBUG and up reaching the root logger (formatted as caplog does), then all
    written to stdout and stderr, both Python's streams and file descriptors 1 and 2 (Dagster's own
    console log): appended to the yielded list, as one string, when the block ends.
    """
    handler = logging.StreamHandler(io.StringIO())
    handler.setFormatter(logging.Formatter("%(levelname)-8s %(name)s:%(filename)s:%(lineno)d %(message)s"))
    handler.setLevel(logging.DEBUG)
    root = logging.getLogger()
    level = root.level
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    sink = tempfile.TemporaryFile()
    texts: list[str] = []
    try:
        root.addHandler(handler)
        root.setLevel(logging.DEBUG)
        for fd in saved:
            os.dup2(sink.fileno(), fd)
        with (
            io.TextIOWrapper(os.fdopen(os.dup(sink.fileno()), "wb"), write_through=True) as stream,
            contextlib.redirect_stdout(stream),
            contextlib.redirect_stderr(stream),
        ):
            yield texts
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        sink.seek(0)
        texts.append(handler.stream.getvalue() + sink.read().decode("utf-8", "replace"))
        sink.close()


@pytest.fixture(scope="module")
def blocked_once(tmp_path_factory: pytest.TempPathFactory):
    """One blocked nightly run for the module: its root, ok, the stages, seeded numbers, bad rows, logs."""
    root = tmp_path_factory.mktemp("blocked")
    with building_haven(root) as (home, instance):
        synthetic.generate(home.incoming, patients=PATIENTS, seed=5, defect_rate=0.01)
        seeded = seeded_nhs_numbers(home.incoming)
        social = next(home.incoming_for("social_care").glob("*.csv"))
        bad = _corrupt_nhs_numbers(social, 0.2)  # 20% > the contract's 5%
        seeded |= seeded_nhs_numbers(home.incoming_for("social_care"))
        with captured_logs() as logs:  # Dagster's own console log, beside Python logging
            ok, stages = run_nightly(home, instance)
    return root, ok, {s.asset: s for s in stages}, seeded, bad, logs[0]


@pytest.fixture
def prebuilt(request: pytest.FixtureRequest) -> Path | None:
    """The blocked run's haven for the tests that read it; an empty home for the others."""
    return request.getfixturevalue("blocked_once")[0] if "blocked_run" in request.fixturenames else None


@pytest.fixture
def blocked_run(blocked_once):
    """The module's blocked run; ``home`` and ``dagster_instance`` are this test's own copy of its haven."""
    return blocked_once[1:]


def _records(instance) -> list:
    """The event records of every run of the night (each collection's intake, then the nightly job)."""
    return [r for run in instance.get_runs() for r in instance.get_records_for_run(run_id=run.run_id).records]


def test_a_batch_over_tolerance_holds_its_collection_downstream_until_a_drop_passes(
    blocked_run, home: Home, dagster_instance
) -> None:
    ok, stages, _, bad, _ = blocked_run
    assert not ok
    social_care = stages[keys.validated("social_care").to_user_string()]
    assert social_care.checks_failed == ["social_care_meets_contract"]
    assert social_care.rows_out == 0
    # Nothing downstream of social care materialised (its haven and vault steps refused, naming
    # the drop); the other collections went on.
    assert keys.haven("social_care").to_user_string() not in stages
    assert keys.vault("social_care").to_user_string() not in stages
    assert stages["haven__social_care_haven (step)"].checks_failed == ["step failed"]
    assert not [a for a in stages if a.startswith(f"{keys.PUBLISHED}/social_care")]
    for collection in ("gp_events", "hospital_episodes"):
        assert stages[keys.validated(collection).to_user_string()].checks_failed == []
        assert stages[keys.haven(collection).to_user_string()].rows_out > 0
    # The check's metadata: version, rows, failures per rule, pass rate; decided by GX.
    evaluations = [
        e
        for e in _records(dagster_instance)
        if e.event_log_entry.dagster_event
        and e.event_log_entry.dagster_event.event_type_value == "ASSET_CHECK_EVALUATION"
    ]
    social = next(
        e.event_log_entry.dagster_event.event_specific_data
        for e in evaluations
        if e.event_log_entry.dagster_event.event_specific_data.check_name == "social_care_meets_contract"
    )
    assert social.passed is False
    meta = {k: v.value for k, v in social.metadata.items()}
    assert meta["contract_version"] == "1.0.0"
    assert meta["failures_per_rule"]["nhs_number.nhs_number"] >= bad
    assert meta["gx_success"] is False and meta["pass_rate"] == 0.0
    assert meta["rows_checked"] > 0 and "rows.within_tolerance" in meta["gx_expectations_failed"]
    reason = json.loads(next(home.quarantine_for("social_care").glob("*.reason.json")).read_text())
    assert reason["rule"] == "batch.tolerance"
    # Issue 20: the UI says which drop failed: the validated asset's "drops" table, and the drop's own
    # partition, materialised with its outcome.
    materialised = [
        e.event_log_entry.dagster_event.event_specific_data.materialization
        for e in _records(dagster_instance)
        if e.event_log_entry.dagster_event
        and e.event_log_entry.dagster_event.event_type_value == "ASSET_MATERIALIZATION"
        and e.event_log_entry.dagster_event.event_specific_data.materialization.asset_key
        == keys.validated("social_care")
    ]
    drops = next(m.metadata["drops"].value for m in materialised if "drops" in m.metadata)
    assert re.search(
        r"\| [^|]+\.csv@[0-9a-f]{8} \| \w{12} \| [\d,]+ \| [\d,]+ \| refused \(batch\.tolerance\) \|", drops
    ), drops
    (per_drop,) = [m for m in materialised if m.partition is not None]
    assert per_drop.metadata["outcome"].value == "refused (batch.tolerance)"
    assert per_drop.partition in dagster_instance.get_dynamic_partitions("drops_social_care")


def test_the_hold_ends_when_a_later_drop_of_the_collection_passes(
    blocked_run, home: Home, dagster_instance, tmp_path: Path
) -> None:
    """The refused drop stays refused; a corrected file sent afterwards passes, and the stages after
    intake go on with the collection (``safehaven.intake.validation.refusal_outstanding``)."""
    synthetic.generate(tmp_path / "resent", patients=PATIENTS, seed=5, defect_rate=0.0)
    corrected = next((tmp_path / "resent" / "social_care").glob("*.csv"))
    shutil.copy(corrected, home.incoming_for("social_care") / "social_care_resent.csv")
    ok, stages = run_nightly(home, dagster_instance)
    by_asset = {s.asset: s for s in stages}
    assert by_asset[keys.validated("social_care").to_user_string()].checks_failed == []
    assert by_asset[keys.haven("social_care").to_user_string()].rows_out > 0
    assert ok, [s for s in stages if s.checks_failed]


def test_no_seeded_nhs_number_in_event_storage_gx_results_or_logs(blocked_run, home: Home, tmp_path: Path) -> None:
    _, _, seeded, _, logs = blocked_run
    assert len(seeded) > 100
    assert leaked_nhs_numbers([home.root, tmp_path / "dagster_home"], seeded) == {}
    with Store(home).connect(read_only=True) as con:
        stored = json.dumps(con.execute(f"SELECT * FROM {RESULTS}").fetchall(), default=str)
        stored += json.dumps(con.execute(f"SELECT * FROM {RULE_RESULTS}").fetchall(), default=str)
        stored += json.dumps(con.execute("SELECT * FROM governance.quality_measures").fetchall(), default=str)
    assert "expect_column_values_to_be_in_set" in stored
    digits = "".join(ch if ch.isdigit() else " " for ch in stored + logs).split()
    assert not set(digits) & seeded
    assert "social_care_meets_contract" in logs  # the logs were captured


AE_CONTRACT = {
    "collection": "ae_attendances",
    "version": "0.1.0",
    "owner": "Emergency care data set (synthetic), data engineering team",
    "description": "Emergency department attendances, one row per attendance.",
    "kind": "content",
    "patient_key": "nhs_number",
    "period_field": "arrival_date",
    "tolerance": 0.05,
    "retention_days": 2557,
    "fields": [
        {
            "name": "site_code",
            "type": "VARCHAR",
            "description": "ODS code of the emergency department's site.",
            "identifiability": "content",
            "rule": {"format": "ods_code"},
        },
        {
            "name": "nhs_number",
            "type": "VARCHAR",
            "description": "The patient's NHS number.",
            "identifiability": "direct_identifier",
            "rule": {"format": "nhs_number"},
        },
        {
            "name": "date_of_birth",
            "type": "DATE",
            "description": "The patient's date of birth.",
            "identifiability": "quasi_identifier",
            "rule": {"format": "date", "min": "1900-01-01", "max": "today"},
        },
        {
            "name": "arrival_date",
            "type": "DATE",
            "description": "Date of arrival.",
            "identifiability": "content",
            "rule": {"format": "date", "min": "2000-01-01", "max": "today"},
        },
        {
            "name": "acuity",
            "type": "VARCHAR",
            "description": "Acuity on arrival (1 most urgent).",
            "identifiability": "sensitive",
            "rule": {"allowed": ["1", "2", "3", "4", "5"]},
        },
    ],
    "rules": [
        {
            "id": "arrival_not_before_birth",
            "description": "A patient cannot arrive before being born.",
            "later": "arrival_date",
            "earlier": "date_of_birth",
        }
    ],
}


def test_a_collection_added_by_contract_alone_flows_through(
    home: Home, dagster_instance, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    contracts = tmp_path / "data_contracts"
    shutil.copytree(CONTRACTS_DIR, contracts)
    (contracts / "collections" / "ae_attendances.yaml").write_text(yaml.safe_dump(AE_CONTRACT, sort_keys=False))
    monkeypatch.setenv("SAFEHAVEN_CONTRACTS", str(contracts))
    synthetic.generate(home.incoming, patients=PATIENTS, seed=6, defect_rate=0.0)
    rows = [
        {
            "site_code": "RRK02",
            "nhs_number": n,
            "date_of_birth": "1960-05-06",
            "arrival_date": "2026-03-04",
            "acuity": str(1 + i % 5),
        }
        for i, n in enumerate(nhs_numbers(40, start=700_000))
    ]
    rows[0]["acuity"] = "9"  # one invalid row: quarantined, within tolerance
    write_csv(home.incoming_for("ae_attendances") / "ae_20260331.csv", rows, [f["name"] for f in AE_CONTRACT["fields"]])

    adopt_project_agreements(home)
    ok, stages = run_nightly(home, dagster_instance)
    by_asset = {s.asset: s for s in stages}
    assert ok, [s for s in stages if s.checks_failed]
    assert by_asset[keys.landing("ae_attendances").to_user_string()].rows_in == 40
    assert by_asset[keys.validated("ae_attendances").to_user_string()].rows_out == 39
    assert by_asset[keys.haven("ae_attendances").to_user_string()].rows_out == 39
    with Store(home).connect(read_only=True) as con:
        rejected = con.execute("SELECT failed_rules FROM landing.ae_attendances_rejected").fetchall()
        measures = con.execute(
            "SELECT count(*) FROM governance.quality_measures WHERE collection = 'ae_attendances'"
        ).fetchone()[0]
    assert rejected == [(["acuity.allowed"],)]
    assert measures > 0
