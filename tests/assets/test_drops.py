"""Drops as partitions (issue 20; ``assets.partitions``, ``assets.intake``): each file received is
a drop, a partition of its collection's landing and validated assets. A run for one drop lands and
validates that drop only; a drop whose run stopped part-way is run again on its own; until it is,
the stages after intake hold its collection, naming the drop and the fix."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import dagster as dg
import pytest

import assets.validate
from assets import keys
from assets.definitions import build_definitions
from assets.releases import release_key
from assets.runner import haven_run_config, run_nightly
from safehaven.core.home import Home
from safehaven.core.store import Store
from safehaven.intake.ingest import BATCHES, drop_key, waiting_drops
from safehaven.intake.validation import held_drop
from safehaven.tools import synthetic
from tests.assets.test_validate import _corrupt_nhs_numbers
from tests.governance_helpers import adopt_project_agreements

PATIENTS = 150


def _old(path: Path) -> Path:
    """A file written long ago (not still arriving)."""
    os.utime(path, (0, 0))
    return path


def _two_gp_drops(home: Home, tmp_path: Path) -> tuple[str, str]:
    """Two GP files in ``incoming/gp_events`` (two seeds): their drop keys, in name order."""
    for seed, name in ((3, "gp_extract_a.csv"), (4, "gp_extract_b.csv")):
        out = tmp_path / f"gen_{seed}"
        synthetic.generate(out, patients=PATIENTS, seed=seed)
        home.incoming_for("gp_events").mkdir(parents=True, exist_ok=True)
        source = next((out / "gp_events").glob("*.csv"))
        shutil.copy(source, home.incoming_for("gp_events") / name)
        _old(home.incoming_for("gp_events") / name)
    found = waiting_drops(home.incoming_for("gp_events"))
    assert len(found) == 2
    return tuple(found)  # type: ignore[return-value]


def _gp_batches(home: Home) -> dict[str, str]:
    """drop key -> batch status, for the GP batches landed."""
    with Store(home).connect(read_only=True) as con:
        rows = con.execute(f"SELECT drop_key, status FROM {BATCHES} WHERE collection = 'gp_events'").fetchall()
    return dict(rows)


def _intake(home: Home, instance: dg.DagsterInstance, drop: str | None = None) -> dg.ExecuteInProcessResult:
    job = build_definitions().resolve_job_def("intake_gp_events")
    if drop is not None:
        instance.add_dynamic_partitions(
            "drops_gp_events", [d for d in [drop] if not instance.has_dynamic_partition("drops_gp_events", d)]
        )
    return job.execute_in_process(
        instance=instance, partition_key=drop, run_config=haven_run_config(home, quiet=True), raise_on_error=False
    )


def _partitions_materialised(instance: dg.DagsterInstance, key: dg.AssetKey) -> set[str]:
    return set(instance.get_materialized_partitions(key))


def test_a_drop_key_is_its_shown_name_and_a_digest_of_what_was_received(tmp_path: Path) -> None:
    first = tmp_path / "extract.csv"
    first.write_text("a,b\n1,2\n")
    _old(first)
    key = drop_key(first)
    name, _, digest = key.rpartition("@")
    assert name == "extract.csv" and len(digest) == 8
    assert drop_key(first) == key, "the sensor and the landing name a drop alike"
    first.write_text("a,b\n1,2\n3,4\n")  # the same name sent again, other bytes: another drop
    _old(first)
    assert drop_key(first) != key
    nhs_like = tmp_path / "gp_943 476 5919...csv"
    nhs_like.write_text("x\n")
    shown = drop_key(nhs_like)
    assert "5919" not in shown and "..." not in shown, "nothing identifiable, nothing Dagster refuses"


def test_drops_wait_in_the_order_they_arrived(tmp_path: Path) -> None:
    """The sensor starts one run per drop in this order, so the latest drop is validated last
    (a refusal holds its collection until a *later* drop passes). Arrival is when the file appeared
    in the folder, by this host's clock: a sender's modification time (here an older one kept by the
    later file) does not reorder drops."""
    for name, when in (("b_monday.csv", 2_000), ("a_tuesday.csv", 1_000)):
        (tmp_path / name).write_text("x\n")
        os.utime(tmp_path / name, (when, when))
        time.sleep(0.01)
    assert [k.split("@")[0] for k in waiting_drops(tmp_path)] == ["b_monday.csv", "a_tuesday.csv"]


def test_a_collection_that_never_sent_a_drop_does_not_stop_the_night(home: Home, dagster_instance) -> None:
    """Its intake never runs, so the stages after intake make its tables, empty, as intake would."""
    synthetic.generate(home.incoming, patients=PATIENTS, seed=5)
    adopt_project_agreements(home)
    for collection in ("hospital_episodes", "social_care"):
        shutil.rmtree(home.incoming_for(collection))
    ok, stages = run_nightly(home, dagster_instance)
    assert ok, [s for s in stages if s.checks_failed]
    by_asset = {s.asset: s for s in stages}
    assert by_asset[keys.haven("social_care").to_user_string()].rows_out == 0
    assert by_asset[keys.haven("gp_events").to_user_string()].rows_out > 0
    assert (home.published / "gp_activity.csv").exists()


def test_a_run_for_one_drop_lands_and_validates_that_drop_only(home: Home, dagster_instance, tmp_path: Path) -> None:
    first, second = _two_gp_drops(home, tmp_path)
    result = _intake(home, dagster_instance, first)
    assert result.success
    assert _gp_batches(home) == {first: "accepted"}
    assert list(waiting_drops(home.incoming_for("gp_events"))) == [second], "the other drop still waits"
    for asset in (keys.landing("gp_events"), keys.validated("gp_events")):
        assert _partitions_materialised(dagster_instance, asset) == {first}

    everything = _intake(home, dagster_instance)  # a night's run: no partition, every drop waiting
    assert everything.success
    assert _gp_batches(home) == {first: "accepted", second: "accepted"}
    assert set(dagster_instance.get_dynamic_partitions("drops_gp_events")) == {first, second}
    for asset in (keys.landing("gp_events"), keys.validated("gp_events")):
        assert _partitions_materialised(dagster_instance, asset) == {first, second}


def _check_passed(result: dg.ExecuteInProcessResult) -> bool:
    (evaluation,) = result.get_asset_check_evaluations()
    return evaluation.passed


def test_an_older_drop_judged_later_never_lifts_a_newer_drops_refusal(
    home: Home, dagster_instance, tmp_path: Path
) -> None:
    """ "Latest" is by arrival: the good drop that came first, validated after the refused drop that
    came later (its sensor run failed and ran again), leaves the collection held; and every run's
    contract check says so, even one with nothing new to check."""
    good, bad = _two_gp_drops(home, tmp_path)  # gp_extract_a.csv, gp_extract_b.csv
    folder = home.incoming_for("gp_events")
    _corrupt_nhs_numbers(folder / "gp_extract_b.csv", 0.2)  # over the contract's tolerance
    os.utime(folder / "gp_extract_a.csv", (1_000, 1_000))  # touched last here: a arrives, then b
    time.sleep(0.01)
    os.utime(folder / "gp_extract_b.csv", (2_000, 2_000))
    good, bad = waiting_drops(folder)  # arrival order: a (Monday), then b (Tuesday)
    assert good.startswith("gp_extract_a.csv@") and bad.startswith("gp_extract_b.csv@")
    refused = _intake(home, dagster_instance, bad)
    assert not _check_passed(refused) and _gp_batches(home) == {bad: "refused"}
    late = _intake(home, dagster_instance, good)  # the older drop, validated last
    assert _gp_batches(home) == {bad: "refused", good: "accepted"}
    assert not _check_passed(late), "the newer drop is still the refused one"
    with Store(home).connect(read_only=True) as con:
        assert held_drop(con, "gp_events") is not None
    nothing_new = _intake(home, dagster_instance)
    assert not _check_passed(nothing_new)
    again = _intake(home, dagster_instance, bad)  # asked for again: its verdict stands, and says so
    (mat,) = [
        e.event_specific_data.materialization
        for e in again.get_asset_materialization_events()
        if e.event_specific_data.materialization.asset_key == keys.validated("gp_events")
    ]
    assert "refused (an earlier run; it stands)" in mat.metadata["drops"].value


def _step_failure(instance: dg.DagsterInstance, step: str) -> str:
    for run in instance.get_runs():
        for event in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_FAILURE):
            if event.step_key == step:
                return str(event.dagster_event.step_failure_data.user_failure_data.description)
    raise AssertionError(f"{step} did not fail")


def test_a_drop_whose_run_stopped_part_way_holds_its_collection_until_that_drop_is_run_again(
    home: Home, dagster_instance, monkeypatch: pytest.MonkeyPatch
) -> None:
    synthetic.generate(home.incoming, patients=PATIENTS, seed=5)
    adopt_project_agreements(home)
    (gp,) = waiting_drops(home.incoming_for("gp_events"))
    real = assets.validate.validate_collection

    def stops_for_gp(con, contract, *args, **kwargs):
        if contract.collection == "gp_events":
            raise RuntimeError("the process stopped here")
        return real(con, contract, *args, **kwargs)

    monkeypatch.setattr(assets.validate, "validate_collection", stops_for_gp)
    ok, _ = run_nightly(home, dagster_instance)
    assert not ok
    assert _gp_batches(home) == {gp: "landed"}, "landed, never validated"
    held = _step_failure(dagster_instance, "haven__gp_events_haven")
    assert f"its drop {gp} was landed but not validated" in held and "run its intake again" in held

    monkeypatch.setattr(assets.validate, "validate_collection", real)
    again = _intake(home, dagster_instance, gp)  # the drop run again on its own (its partition in the UI)
    assert again.success and _gp_batches(home) == {gp: "accepted"}
    assert gp in _partitions_materialised(dagster_instance, keys.validated("gp_events"))
    ok, stages = run_nightly(home, dagster_instance)
    assert ok, [s for s in stages if s.checks_failed]
    haven = {s.asset: s for s in stages}[keys.haven("gp_events").to_user_string()]
    assert haven.rows_out > 0


def test_an_nhs_number_in_a_column_name_of_a_drop_is_withheld_from_its_reason_file_in_a_nightly_run(
    home: Home, dagster_instance
) -> None:
    """A per-patient column (``nhs_9990000018``) refuses the drop, and its reason file names the
    column as ``shown_name`` shows it: no patient's NHS number (CoP 8a)."""
    number = "9990000018"
    adopt_project_agreements(home)
    folder = home.incoming_for("objections")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "objections.csv").write_text(
        f"nhs_number,objection_type,recorded_date,withdrawn_date,source_practice,nhs_{number}\n"
        f"{number},national_opt_out,2024-03-01,,,1\n"
    )
    run_nightly(home, dagster_instance)
    reasons = list(home.quarantine_for("objections").glob("*.reason.json"))
    assert reasons and all(number.encode() not in p.read_bytes() for p in home.quarantine.rglob("*.reason.json"))


def _failure_text(result: dg.ExecuteInProcessResult) -> str:
    failures = [e for e in result.all_events if e.is_failure and e.event_specific_data is not None]
    return " ".join(str(e.event_specific_data.error) for e in failures)


def test_a_held_collection_holds_its_counts_outputs_and_releases_materialised_alone(
    home: Home, dagster_instance, tmp_path: Path
) -> None:
    """CoP 7-9 (``safehaven.intake.validation.refuse_held``): once a collection's latest drop was
    refused at validation, a count, an output, a release or the publication that reads it, materialised alone from
    the UI as the nightly job would never run it, refuses with the reason and its remedy (no
    figures stated, no records released, as if its sender had sent nothing since); an output over
    other collections only is built as before."""
    synthetic.generate(home.incoming, patients=PATIENTS, seed=5)
    adopt_project_agreements(home)
    ok, _ = run_nightly(home, dagster_instance)
    assert ok
    later = tmp_path / "later"
    synthetic.generate(later, patients=PATIENTS, seed=6)
    late = home.incoming_for("gp_events") / "gp_extract_late.csv"
    shutil.copy(next((later / "gp_events").glob("*.csv")), late)
    _corrupt_nhs_numbers(late, 0.2)  # over the contract's tolerance
    _old(late)
    (bad,) = waiting_drops(home.incoming_for("gp_events"))
    _intake(home, dagster_instance, bad)
    assert _gp_batches(home)[bad] == "refused"

    nightly = build_definitions().resolve_job_def("nightly")

    def alone(key: dg.AssetKey) -> dg.ExecuteInProcessResult:
        return nightly.execute_in_process(
            instance=dagster_instance,
            run_config=haven_run_config(home, quiet=True),
            raise_on_error=False,
            asset_selection=[key],
        )

    published = {p.name: p.read_bytes() for p in home.published.iterdir()}
    held = (keys.counts("gp_activity"), keys.published("gp_activity"), release_key("statutory-gp-audit"))
    for key in (*held, keys.PUBLISHED_FILES):
        refused = alone(key)
        why = _failure_text(refused)
        assert not refused.success, key
        assert "gp_events is held" in why and "refused at validation" in why and "corrected file" in why, why
    assert {p.name: p.read_bytes() for p in home.published.iterdir()} == published, "the publication wrote nothing"
    assert alone(keys.published("hospital_admissions")).success
