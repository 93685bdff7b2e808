"""The objection feed fails closed (issue 14; ``safehaven.protect.feed``).

Objections arrive as real files through real ingest, validation and the register, into a
haven built by ``tests.governance_helpers.small_haven``; releases are real record-level
releases under ``section_251`` (the opt-out applies). The two scenarios of the issue end with
no objector in any release, in the run that sees the fault and every later one until it is
resolved; a stale register refuses; resolving is audited.
"""

from __future__ import annotations

import glob
import json
import os
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import duckdb
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safehaven.context import Haven as Context
from safehaven.core import audit, days
from safehaven.core import registers as reg
from safehaven.core.days import haven_today
from safehaven.core.files import sha256_file
from safehaven.core.home import Home
from safehaven.core.store import Store
from safehaven.intake import batch_seal, ingest
from safehaven.intake.contracts import ContractRegistry
from safehaven.intake.ingest import ingest_collection
from safehaven.intake.validation import validate_collection
from safehaven.protect import feed, register_seal
from safehaven.protect.haven import refuse_while_objections_unregistered
from safehaven.protect.objections import RESTATEMENTS, objectors_sql, register_objections
from safehaven.protect.pseudonymise import install_key
from safehaven.share.releases import ReleaseRefused
from tests.conftest import with_vault_keys
from tests.governance_helpers import (
    BASE,
    NHS,
    OPTED_OUT,
    adopt,
    agreement_data,
    renames_once,
    write_agreement,
)
from tests.unit.feed_helpers import (
    COLUMNS,
    EPISODES_EACH,
    FUTURE,
    Haven,
    Template,
    open_haven,
    opt_out,
    refused,
)


def test_excel_objections_file_is_honoured_in_the_same_run(haven: Haven) -> None:
    """Scenario 1: BOM + every field quoted; the objectors' records are withheld at once."""
    haven.drop("practice_a.csv", [opt_out(10), opt_out(11)], excel=True)
    assert haven.run()
    assert not list(haven.home.quarantine_for("objections").glob("*.reason.json"))
    result = haven.release()
    assert not {haven.pids[NHS[i]] for i in (10, 11, OPTED_OUT)} & haven.members(result.release_id)
    assert result.records_withheld == 3 * EPISODES_EACH


def test_a_file_quarantined_whole_blocks_until_a_person_resolves_it(haven: Haven) -> None:
    folder = haven.home.incoming_for("objections")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "practice_b.csv").write_text("nhs number;objection type\n" + NHS[12] + ";national_opt_out\n")
    haven.run()
    for _ in range(2):  # the run that sees it, and a later run with no new file
        haven.run()
        message = refused(haven)
        assert "practice_b.csv" in message and "the whole file quarantined" in message
        assert "safehaven objections resolve" in message and "\n" not in message
        assert NHS[12] not in message
    assert feed.resolve(haven.con, haven.home, "practice_b.csv", by="Dr Guardian", reason="sent again by post") == 1
    assert haven.release().status == "released"
    [entry] = [e for e in audit.entries_for(haven.con) if e.action == "objections.resolve"]
    assert entry.actor == "Dr Guardian" and entry.detail_value["level"] == "file"


def test_a_refusal_naming_a_file_with_ten_digits_is_recorded_with_the_number_withheld(haven: Haven) -> None:
    """A received name is shown with every run that looks like an NHS number withheld
    (``audit.shown_name``): in the refusal a person reads (logs, metadata) and in what the audit
    trail records, so recording it never fails on a file's name and never leaks the number."""
    folder = haven.home.incoming_for("objections")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "export_1733312345.csv").write_text("nhs number;objection type\n" + NHS[12] + ";national_opt_out\n")
    haven.run()
    message = refused(haven)
    assert "export_[number withheld].csv" in message and "safehaven objections resolve" in message
    assert "1733312345" not in message
    [entry] = [e for e in audit.entries_for(haven.con) if e.action == "release" and e.outcome == "refused"]
    recorded = entry.detail_value["reason"]
    assert "export_[number withheld].csv" in recorded and "1733312345" not in recorded


def test_one_bad_row_blocks_every_later_run_until_a_person_records_the_corrected_file(haven: Haven) -> None:
    """Scenario 2: a future recorded date refuses the batch; the valid rows are honoured; the block stands,
    also after the corrected file lands, until a person records that it corrects the fault (audited)."""
    haven.drop("practice_c.csv", [opt_out(20), opt_out(21), opt_out(22, recorded=FUTURE)])
    assert not haven.run()  # the batch is refused in the run that sees it
    for _ in range(3):  # later runs with no new files
        assert haven.run()
        message = refused(haven)
        assert "practice_c.csv" in message and "1 row(s) rejected (recorded_date.range)" in message
        assert "a later file of that name" not in message
    assert {haven.pids[NHS[20]], haven.pids[NHS[21]]} <= {
        r[0] for r in haven.con.execute("SELECT pid FROM governance.objection_events").fetchall()
    }  # valid rows honoured although the batch was refused
    haven.drop("practice_c.csv", [opt_out(20), opt_out(21), opt_out(22)])
    assert haven.run()
    message = refused(haven)  # the corrected file alone does not clear it
    [fault] = feed.unresolved(haven.con)
    assert fault.later_clean_sha256 is not None and fault.later_clean_files == 1
    fault_key, later_key = fault.sha256[: feed.SHA_SHOWN], fault.later_clean_sha256[: feed.SHA_SHOWN]
    assert f"a later file of that name, practice_c.csv (sha256 {later_key}), landed and validated cleanly" in message
    assert f"safehaven objections resolve {fault_key} --corrected-by {later_key} --by <name>" in message
    assert not any(e.action == "objections.fault_cleared" for e in audit.entries_for(haven.con))
    assert (
        feed.resolve(
            haven.con,
            haven.home,
            fault_key,
            by="Dr Guardian",
            reason="the practice re-sent the file with the date corrected",
            corrected_by=later_key,
        )
        == 1
    )
    result = haven.release()
    assert not {haven.pids[NHS[i]] for i in (20, 21, 22, OPTED_OUT)} & haven.members(result.release_id)
    assert result.records_withheld == 4 * EPISODES_EACH
    [entry] = [e for e in audit.entries_for(haven.con) if e.action == "objections.resolve"]
    assert entry.actor == "Dr Guardian" and entry.detail_value["resolution"] == "corrected_file"
    assert entry.detail_value["corrected_by_batch"] == fault.later_clean_sha256


def test_a_later_clean_file_of_the_same_name_keeps_releases_refused_until_a_person_records_it_corrects_the_fault(
    haven: Haven,
) -> None:
    """A sender using one fixed name: day 1's file is quarantined whole; day 2's routine file of the same
    name (another patient) validates cleanly. The haven cannot tell a correction from the routine file,
    so releases stay refused, and the refusal names the later file and the command recording that it
    corrects the fault. Day 3 the sender re-sends day 1's objection; a person records that, audited."""
    folder = haven.home.incoming_for("objections")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "optouts.csv").write_text("NHS Number," + ",".join(COLUMNS[1:]) + "\n" + ",".join(opt_out(40)) + "\n")
    haven.run()
    assert "the whole file quarantined" in refused(haven)
    haven.drop("optouts.csv", [opt_out(41)])  # day 2: a different patient, well-formed
    assert haven.run()
    for _ in range(2):  # the run that lands it, and a later run
        message = refused(haven)
        problems = feed.feed_problems(haven.con, haven.home, haven_today(), feed.DEFAULT_WINDOW_DAYS)
        [fault] = feed.unresolved(haven.con)
        later = fault.later_clean_sha256
        assert later is not None and fault.later_clean_on == haven_today().isoformat()
        assert len(problems) == 1 and problems[0] in message and "\n" not in message
        assert (
            f"a later file of that name, optouts.csv (sha256 {later[: feed.SHA_SHOWN]}), landed and validated "
            f"cleanly on {haven_today().isoformat()}" in message
        )
        assert (
            f"safehaven objections resolve {fault.sha256[: feed.SHA_SHOWN]} --corrected-by "
            f"{later[: feed.SHA_SHOWN]} --by <name> --reason <text>" in message
        )
        assert NHS[40] not in message and NHS[41] not in message
        haven.run()
    [(resolved_by, resolution)] = haven.con.execute(
        "SELECT resolved_by, resolution FROM governance.objection_feed_faults"
    ).fetchall()
    assert (resolved_by, resolution) == (None, None)
    assert not {"objections.fault_cleared", "objections.resolve"} & {e.action for e in audit.entries_for(haven.con)}
    haven.drop("optouts.csv", [opt_out(40), opt_out(41)])  # day 3: the sender re-sends day 1's objection
    assert haven.run()
    [fault] = feed.unresolved(haven.con)
    assert fault.later_clean_files == 2 and "(the first of 2)" in refused(haven)
    day3 = haven.con.execute(
        "SELECT batch_id FROM governance.batches WHERE collection = 'objections' ORDER BY landed_at DESC LIMIT 1"
    ).fetchone()[0]
    with pytest.raises(ValueError, match="names no objections file"):
        feed.resolve(haven.con, haven.home, "optouts.csv", by="Dr Guardian", reason="x", corrected_by="0" * 16)
    n = feed.resolve(
        haven.con,
        haven.home,
        fault.sha256[: feed.SHA_SHOWN],
        by="Dr Guardian",
        reason="the practice confirmed the file of day 3 re-sends the objection of day 1",
        corrected_by=day3[: feed.SHA_SHOWN],
    )
    assert n == 1 and feed.unresolved(haven.con) == []
    result = haven.release()
    assert not {haven.pids[NHS[i]] for i in (40, 41, OPTED_OUT)} & haven.members(result.release_id)
    [(resolved_by, resolution)] = haven.con.execute(
        "SELECT resolved_by, resolution FROM governance.objection_feed_faults"
    ).fetchall()
    assert (resolved_by, resolution) == ("Dr Guardian", "corrected_file")
    [entry] = [e for e in audit.entries_for(haven.con) if e.action == "objections.resolve"]
    assert entry.actor == "Dr Guardian" and entry.object == f"objections_file:{fault.sha256}"
    assert entry.detail_value["corrected_by_batch"] == day3


def test_stale_register_refuses_and_an_attested_refresh_clears_it(haven: Haven) -> None:
    later = haven_today() + timedelta(days=feed.DEFAULT_WINDOW_DAYS + 1)
    with pytest.raises(ReleaseRefused, match="last refreshed on"):
        haven.release(today=later)
    feed.attest_refresh(
        haven.con, haven_today(), by="Dr Guardian", reason="checked against the current list", today=haven_today()
    )
    with pytest.raises(ReleaseRefused, match="last refreshed on"):
        haven.release(today=later)  # attested today: still older than the window on `later`
    result = haven.release()
    assert result.optout_list_date == haven_today()
    [row] = reg.releases(haven.con, "test-feed")
    assert row["optout_list_date"] == haven_today()
    assert (result.directory / "manifest.json").read_text().count(
        f'"objection_list_date": "{haven_today().isoformat()}"'
    ) == 1


def test_agreement_window_overrides_the_havens(haven: Haven) -> None:
    write_agreement(haven.registry.root, {**agreement_data(id="test-feed-tight"), "objections_max_age_days": 1})
    haven.agreement = "test-feed-tight"
    with pytest.raises(ReleaseRefused, match="more than 1 days"):
        haven.release(today=haven_today() + timedelta(days=3))


def test_the_havens_window_is_passed_in(haven: Haven) -> None:
    """The haven's window is an argument (the resource's field, or the CLI's variable), not ambient."""
    with pytest.raises(ReleaseRefused, match="more than 2 days"):
        haven.release(today=haven_today() + timedelta(days=5), objections_max_age_days=2)


def test_a_window_that_is_not_whole_days_fails_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The agreement's window wins; the haven's is whole days of at least one, read at the edge only."""
    from resources.haven import SafeHavenResource
    from safehaven.cli.common import OBJECTIONS_WINDOW_ENV, objections_window_from_env

    assert (feed.window_days(), feed.window_days(None, 7), feed.window_days(2, 7)) == (31, 7, 2)
    assert (feed.parse_window(" ", "X"), feed.parse_window("14", "X")) == (31, 14)
    for bad in ("0", "-3", "two weeks"):
        with pytest.raises(feed.ObjectionFeedBlocked, match="not a whole number of days"):
            feed.parse_window(bad, OBJECTIONS_WINDOW_ENV)
    with pytest.raises(feed.ObjectionFeedBlocked):
        feed.window_days(None, 0)
    monkeypatch.setenv(OBJECTIONS_WINDOW_ENV, "9")
    assert objections_window_from_env() == 9 == SafeHavenResource.from_environment().objections_max_age_days
    assert SafeHavenResource.from_environment().objections_window() == 9
    monkeypatch.setenv(OBJECTIONS_WINDOW_ENV, "nine")
    with pytest.raises(feed.ObjectionFeedBlocked):
        objections_window_from_env()
    resource = SafeHavenResource.from_environment()  # loads; the window is refused where it is used
    assert resource.objections_max_age_days == 0
    with pytest.raises(feed.ObjectionFeedBlocked, match="not a whole number of days"):
        resource.objections_window()
    with pytest.raises(feed.ObjectionFeedBlocked):
        feed.window_days(haven_days=resource.objections_max_age_days)  # a step reading the field refuses too


def test_a_malformed_window_in_the_environment_still_loads_the_definitions(monkeypatch: pytest.MonkeyPatch) -> None:
    import dagster as dg

    from assets.definitions import build_definitions
    from safehaven.cli.common import OBJECTIONS_WINDOW_ENV

    monkeypatch.setenv(OBJECTIONS_WINDOW_ENV, "abc")
    defs = build_definitions()
    dg.Definitions.validate_loadable(defs)
    assert defs.resolve_job_def("nightly") is not None


def test_a_malformed_window_in_the_environment_refuses_the_objection_feed_step_in_one_line(
    home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dagster as dg

    from assets.objections import feed_asset
    from resources.haven import SafeHavenResource
    from safehaven.cli.common import OBJECTIONS_WINDOW_ENV

    monkeypatch.setenv(OBJECTIONS_WINDOW_ENV, "abc")
    result = dg.materialize(
        [feed_asset()], resources={"haven": SafeHavenResource.from_environment()}, raise_on_error=False
    )
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    message = failure.step_failure_data.user_failure_data.description
    assert message == (
        "SAFEHAVEN_OBJECTIONS_MAX_AGE_DAYS='abc' is not a whole number of days; set it to whole days of at "
        "least one (e.g. 31), or unset it for the default of 31"
    )
    assert "\n" not in message
    assert failure.step_key == feed_asset().op.name
    assert not result.get_asset_materialization_events(), "nothing was materialised"


@pytest.mark.parametrize("identifiability", ["pseudonymised", "anonymised"])
def test_a_malformed_window_in_the_environment_stops_record_level_releases_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, identifiability: str
) -> None:
    import dagster as dg

    from assets.releases import _objections_window
    from resources.haven import SafeHavenResource
    from safehaven.cli.common import OBJECTIONS_WINDOW_ENV
    from safehaven.share.agreements import load_agreement_file

    monkeypatch.setenv(OBJECTIONS_WINDOW_ENV, "abc")
    extra = {"legal_basis": {"basis": "anonymised"}} if identifiability == "anonymised" else {}
    data = agreement_data(id="test-window", identifiability=identifiability, **extra)
    (tmp_path / "agreements").mkdir()
    agreement = load_agreement_file(write_agreement(tmp_path, data))
    haven = SafeHavenResource.from_environment()
    if identifiability == "anonymised":  # not held by the objection feed (guide Rule 4C)
        assert _objections_window(haven, "test-window", agreement) == feed.DEFAULT_WINDOW_DAYS
        return
    with pytest.raises(dg.Failure) as refused:
        _objections_window(haven, "test-window", agreement)
    assert refused.value.description == (
        "release under test-window refused: SAFEHAVEN_OBJECTIONS_MAX_AGE_DAYS='abc' is not a whole number of "
        "days; set it to whole days of at least one (e.g. 31), or unset it for the default of 31"
    )


def test_anonymised_release_is_not_blocked(haven: Haven) -> None:
    haven.drop("practice_d.csv", [opt_out(30, recorded=FUTURE)])
    haven.run()
    write_agreement(
        haven.registry.root,
        agreement_data(id="test-anon", identifiability="anonymised", legal_basis={"basis": "anonymised"}),
    )
    haven.agreement = "test-anon"
    assert haven.release().status == "released"


# --- property: any population, objection set, formatting and mix of good and bad rows ----

SEPARATORS = [" ", "-", "\u00a0", "\u2009", "\u000b", "\u2013", "\u3000", ""]
BAD = {
    "future": lambda n: [n, "national_opt_out", FUTURE, "", ""],
    "spreadsheet": lambda n: [
        n.replace(" ", "")[:9] + "." + n.replace(" ", "")[9:],
        "national_opt_out",
        "2024-01-01",
        "",
        "",
    ],
    "type": lambda n: [n, "type2", "2024-01-01", "", ""],
}


def _row(rendered: str, bad: str | None) -> list[str]:
    return BAD[bad](rendered) if bad else [rendered, "national_opt_out", "2024-03-01", "", ""]


def _render(nhs: str, seps: list[str]) -> str:
    return nhs[:3] + seps[0] + nhs[3:6] + seps[1] + nhs[6:]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    people=st.lists(
        st.tuples(
            st.integers(0, 51),
            st.lists(st.sampled_from(SEPARATORS), min_size=2, max_size=2),
            st.sampled_from([None, *BAD]),
        ),
        min_size=1,
        max_size=8,
        unique_by=lambda p: p[0],
    ),
    excel=st.booleans(),
)
def test_no_objector_leaves_whatever_the_feed(tmp_path: Path, people, excel: bool, template: Template) -> None:
    """Any formatting and any mix of good and bad rows: no objector with a valid row is released,
    and while a bad row is unresolved nothing record-level is released at all. Each example
    starts from its own new haven (a copy of the module's), so no example depends on what an earlier one left."""
    root = Path(tempfile.mkdtemp(dir=tmp_path))
    with open_haven(with_vault_keys(Home(root / "haven").ensure()), root, template) as haven:
        _objectors_are_withheld(haven, people, excel)


def _objectors_are_withheld(haven: Haven, people: list, excel: bool) -> None:
    rows = [_row(_render(NHS[i], seps), bad) for i, seps, bad in people]
    name = "feed.csv"
    haven.drop(name, rows, excel=excel)
    haven.run()
    haven.run()
    objectors = {
        r[0]
        for r in haven.con.execute(
            "SELECT DISTINCT pid FROM governance.objection_events WHERE "
            "objection_type = 'national_opt_out' AND withdrawn_date IS NULL"
        ).fetchall()
    }
    assert {haven.pids[NHS[i]] for i, _, bad in people if bad is None} <= objectors
    if any(bad for _, _, bad in people):
        refused(haven)
        feed.resolve(haven.con, haven.home, name, by="Dr Guardian", reason="the sender confirmed the bad rows")
    result = haven.release()
    assert not objectors & haven.members(result.release_id)


# --- the commands --------------------------------------------------------------------------


def test_type1_needs_its_source_practice(home: Home) -> None:
    from click.testing import CliRunner

    from safehaven.cli.main import main

    runner = CliRunner()
    refused = runner.invoke(main, ["objections", "record", "--nhs-number", NHS[1], "--type", "type1"])
    assert refused.exit_code != 0 and "--source-practice" in refused.output
    assert not list(home.incoming_for("objections").glob("*.csv"))
    done = runner.invoke(
        main, ["objections", "record", "--nhs-number", NHS[1], "--type", "type1", "--source-practice", "A81001"]
    )
    assert done.exit_code == 0, done.output


def test_resolve_command_is_audited_and_says_when_nothing_matches(home: Home) -> None:
    from click.testing import CliRunner

    from safehaven.cli.main import main

    folder = home.incoming_for("objections")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bad.csv").write_text("")  # file.empty: quarantined whole
    with Store(home).connect() as con:
        ingest_collection(con, ContractRegistry().objections(), folder, home.quarantine_for("objections"))
    runner = CliRunner()
    missing = runner.invoke(main, ["objections", "resolve", "other.csv", "--by", "Dr G", "--reason", "n/a"])
    assert missing.exit_code != 0 and "no unresolved objections fault" in missing.output
    done = runner.invoke(main, ["objections", "resolve", "bad.csv", "--by", "Dr G", "--reason", "empty by mistake"])
    assert done.exit_code == 0, done.output
    with Store(home).connect() as con:
        assert feed.unresolved(con) == []
        [entry] = [e for e in audit.entries_for(con) if e.action == "objections.resolve"]
    assert entry.actor == "Dr G" and entry.detail_value["reason"] == "empty by mistake"


def test_the_faults_listing_names_a_later_clean_file_and_resolve_corrected_by_records_it(home: Home) -> None:
    """``objections faults`` names the later clean file of a fault's name and the exact command; the
    command records it as the correction (audited), and refuses a file that is not a clean objections file."""
    import json

    from click.testing import CliRunner

    from safehaven.cli.main import main

    registry = ContractRegistry()
    folder = home.incoming_for("objections")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "daily.csv").write_text("")  # file.empty: quarantined whole
    with Store(home).connect() as con:
        ingest_collection(con, registry.objections(), folder, home.quarantine_for("objections"))
    (folder / "daily.csv").write_text(",".join(COLUMNS) + "\n" + ",".join(opt_out(44)) + "\n")
    with Store(home).connect() as con:
        sealer = batch_seal.sealer(con, "objections", home)
        ingest_collection(con, registry.objections(), folder, home.quarantine_for("objections"), sealer=sealer)
        validate_collection(con, registry.objections(), registry, home.quarantine_for("objections"), sealer=sealer)
    runner = CliRunner()
    listed = runner.invoke(main, ["objections", "faults"])
    assert listed.exit_code == 0, listed.output
    [fault] = json.loads(listed.output)["unresolved"]
    assert fault["file_name"] == "daily.csv" and fault["later_clean_on"] == haven_today().isoformat()
    mine, later = fault["sha256"][: feed.SHA_SHOWN], fault["later_clean_sha256"][: feed.SHA_SHOWN]
    assert f"safehaven objections resolve {mine} --corrected-by {later} --by <name>" in fault["to_clear"]
    assert NHS[44] not in listed.output
    args = ["objections", "resolve", mine, "--by", "Dr G", "--reason", "the practice confirmed it"]
    for bad in ("abc", mine):  # not a SHA-256; the faulty file itself, which never landed
        refused = runner.invoke(main, [*args, "--corrected-by", bad])
        assert refused.exit_code != 0 and "--corrected-by" in refused.output
    done = runner.invoke(main, [*args, "--corrected-by", later])
    assert done.exit_code == 0, done.output
    with Store(home).connect() as con:
        assert feed.unresolved(con) == []
        [entry] = [e for e in audit.entries_for(con) if e.action == "objections.resolve"]
    assert entry.actor == "Dr G" and entry.detail_value["resolution"] == "corrected_file"
    assert entry.detail_value["corrected_by_batch"] == fault["later_clean_sha256"]


def test_type1_registered_after_gp_records_entered_withholds_them_and_the_notice_says_so(haven: Haven) -> None:
    from safehaven.protect.optouts import notices
    from safehaven.protect.pseudonymise import install_agreement_key

    gp_fields = [
        {"collection": "gp_events", "field": "sex", "justification": "Outcomes differ by sex in this audit."},
        {"collection": "gp_events", "field": "event_date", "justification": "Timing of the event is the outcome."},
    ]
    write_agreement(
        haven.registry.root,
        agreement_data(
            id="test-gp", collections=["gp_events"], linkages=[], fields=gp_fields, max_suppressed_share=1.0
        ),
    )
    haven.agreement = "test-gp"
    first = haven.release()
    person = haven.pids[NHS[15]]
    assert person in haven.members(first.release_id)  # GP records already in the haven
    haven.drop("practice_e.csv", [[NHS[15], "type1", "2024-05-01", "", "A81002"]])
    assert haven.run()
    second = haven.release()
    assert person not in haven.members(second.release_id)
    assert second.records_withheld == first.records_withheld + 3  # three GP events each (small_haven)
    name = install_agreement_key(haven.con, haven.keyring, "test-gp", create=False)
    report = notices(
        haven.con, agreement_id="test-gp", recipient_key_name=name, since_release_id=first.release_id, gp_sourced=True
    )
    assert len(report.objected) == 1 and report.withheld == second.records_withheld


def test_a_refused_objections_batch_is_a_fault_even_without_its_reason_file(tmp_path: Path) -> None:
    """The verdict ``refused`` is committed before the batch's reason file is written; a kill in
    between must not leave a refused objections batch that blocks nothing. The batch register
    alone makes it a fault (``feed.sync_faults``)."""
    from safehaven.intake.ingest import BATCHES
    from safehaven.intake.ingest import ensure_tables as ensure_intake

    home = with_vault_keys(Home(tmp_path / "haven").ensure())
    registry = ContractRegistry()
    with Store(home).connect() as con:
        ensure_intake(con, registry.contracts["objections"])
        con.execute(
            f"INSERT INTO {BATCHES} VALUES ('{'ab' * 32}', 'objections', 'objections_daily.csv', '{'ab' * 32}', 5, "
            "now(), 'refused', 1, now(), '1.0.0', NULL, NULL)"
        )
        problems = feed.feed_problems(con, home, haven_today(), 31)
        faults = feed.unresolved(con)
    assert [f.sha256 for f in faults] == ["ab" * 32]
    assert any("objections_daily.csv" in p and "refused at validation" in p for p in problems)


def test_a_request_is_not_delivered_once_someone_in_it_has_opted_out_or_the_feed_broke(
    home: Home, tmp_path: Path, template: Template
) -> None:
    """A request's files were filtered against the register as it stood when it was prepared:
    delivery is refused (audited) once a person in it has opted out since, and while the feed is
    blocked (an objections file quarantined whole may hold an objection the register lacks); the
    next run prepares it again from the register as it stands (NDOP; fail closed)."""
    from safehaven.share import review
    from safehaven.share.releases import PREPARED, prepare
    from safehaven.share.review import ReviewError
    from tests.governance_helpers import adopt, approve_release

    with open_haven(home, tmp_path, template) as h:
        adopt(h.con, h.registry, h.agreement)
        res = prepare(h.con, h.agreement, haven=Context.open(h.home, contracts=h.registry, keyring=h.keyring))
        assert res.status == PREPARED
        h.drop("optouts_d2.csv", [opt_out(31)])
        assert h.run()
        with pytest.raises(ReviewError, match="opted out since it was prepared"):
            approve_release(h.con, res.release_id, h.home, registry=h.registry)
        folder = h.home.incoming_for("objections")
        (folder / "optouts_d3.csv").write_text(
            "sep=,\r\n" + ",".join(COLUMNS) + "\r\n" + ",".join(opt_out(30)) + "\r\n"
        )
        h.run()
        with pytest.raises(
            ReviewError, match="not delivered: record-level releases are blocked"
        ):  # approved, still refused
            review.deliver(h.con, res.release_id, home=h.home, registry=h.registry, by="V. Keeper, custodian")


def test_an_objection_waiting_in_incoming_refuses_preparation_and_delivery_until_it_is_registered(
    home: Home, tmp_path: Path, template: Template
) -> None:
    """``safehaven objections record``, or a sender, puts an objections file in incoming/objections/:
    until intake lands and registers it, its objections are in no register, so a record-level
    release is refused at preparation and at delivery, naming the file and the step that clears it
    (found by review: an approved request was delivered meanwhile with the objector in it); once
    registered, the request is refused as one holding someone who opted out since (NDOP; CoP 11-14)."""
    from safehaven.share import review
    from safehaven.share.releases import PREPARED, prepare
    from safehaven.share.review import ReviewError
    from tests.governance_helpers import adopt, approve_release

    with open_haven(home, tmp_path, template) as h:
        adopt(h.con, h.registry, h.agreement)
        context = Context.open(h.home, contracts=h.registry, keyring=h.keyring)
        res = prepare(h.con, h.agreement, haven=context)
        assert res.status == PREPARED
        h.drop("recorded_by_hand.csv", [opt_out(31)])
        waiting = "recorded_by_hand.csv in incoming/objections/ not yet landed and registered"
        with pytest.raises(ReviewError, match=waiting):
            approve_release(h.con, res.release_id, h.home, registry=h.registry)
        assert review.get(h.con, res.release_id).state != review.RELEASED
        review.withdraw(h.con, res.release_id, by="A. Checker", comment="prepare it again")
        with pytest.raises(ReleaseRefused, match=waiting):
            prepare(h.con, h.agreement, haven=context)
        assert h.run()
        again = prepare(h.con, h.agreement, haven=context)
        assert again.status == PREPARED
        assert approve_release(h.con, again.release_id, h.home, registry=h.registry).state == review.RELEASED
        assert h.pids[NHS[31]] not in h.members(again.release_id), "the objection registered, then applied"


def test_a_request_is_not_delivered_once_someone_in_it_has_a_type1_objection_registered_since(
    home: Home, tmp_path: Path, template: Template
) -> None:
    """A type 1 objection registered after a request was prepared: its files may hold that person's
    GP records, so delivery is refused (audited) whatever the basis; a type 1 objector known when it
    was prepared does not block it (guide Rule 4B; fail closed, not over-refusing)."""
    from safehaven.share.releases import PREPARED, RELEASED, prepare
    from safehaven.share.review import ReviewError, withdraw
    from tests.governance_helpers import adopt, approve_release

    def type1(i: int) -> list[str]:
        return [NHS[i], "type1", "2024-03-01", "", "A81001"]

    with open_haven(home, tmp_path, template) as h:
        h.drop("type1_d1.csv", [type1(32)])
        assert h.run()
        adopt(h.con, h.registry, h.agreement)
        context = Context.open(h.home, contracts=h.registry, keyring=h.keyring)
        first = prepare(h.con, h.agreement, haven=context)
        assert first.status == PREPARED
        h.drop("type1_d2.csv", [type1(33)])
        assert h.run()
        with pytest.raises(ReviewError, match="1 person.s. in it have a type 1 objection registered since"):
            approve_release(h.con, first.release_id, h.home, registry=h.registry)
        assert [e for e in audit.entries_for(h.con) if e.action == "release" and e.outcome == "refused"]
        withdraw(h.con, first.release_id, by="A. Checker", comment="a type 1 objection arrived")
        again = prepare(h.con, h.agreement, haven=context)
        assert approve_release(h.con, again.release_id, h.home, registry=h.registry).state == RELEASED
        assert {h.pids[NHS[32]], h.pids[NHS[33]]} <= h.members(again.release_id), "hospital records go on"


def test_delivery_holds_the_register_to_the_window_the_request_was_prepared_under(haven: Haven) -> None:
    """An agreement's window of 5 days: a request prepared with the register 4 days old is not
    delivered once the register is 7 days old, though the haven's own window (31) would pass it."""
    from safehaven.share.releases import PREPARED, prepare
    from safehaven.share.review import ReviewError
    from tests.governance_helpers import approve_release

    def age(days: int) -> None:
        haven.age(days)
        feed.ensure_tables(haven.con)
        haven.con.execute("UPDATE governance.objection_refreshes SET as_of = as_of - INTERVAL (?) DAY", [days])

    write_agreement(haven.registry.root, {**agreement_data(id="test-feed-five"), "objections_max_age_days": 5})
    haven.agreement = "test-feed-five"
    adopt(haven.con, haven.registry, haven.agreement)
    haven.drop("list.csv", [opt_out(10)])
    haven.run()
    age(4)
    context = Context.open(haven.home, contracts=haven.registry, keyring=haven.keyring)
    res = prepare(haven.con, haven.agreement, haven=context)
    assert res.status == PREPARED
    age(3)
    with pytest.raises(ReviewError, match="more than 5 days"):
        approve_release(haven.con, res.release_id, haven.home, registry=haven.registry)


def test_a_refused_objections_file_that_cannot_be_moved_still_blocks_record_level_releases(
    home: Home, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, template: Template
) -> None:
    """The haven's user may read the sender's upload folder but not write it: a refused objections
    file then stays in incoming/. Its reason file is still written (marked as left there), so the
    feed records the fault and record-level releases wait until a person resolves it."""
    from safehaven.intake import ingest

    def refused_move(path: Path, dest: Path) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    with open_haven(home, tmp_path, template) as h:
        folder = h.home.incoming_for("objections")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "optouts.csv").write_text("sep=,\r\n" + ",".join(COLUMNS) + "\r\n" + ",".join(opt_out(32)) + "\r\n")
        monkeypatch.setattr(ingest, "_move_whole", refused_move)
        report = ingest.ingest_collection(h.con, h.registry.objections(), folder, h.home.quarantine_for("objections"))
        assert [m["file"] for m in report.not_moved] == ["optouts.csv"]
        problems = feed.feed_problems(h.con, h.home, haven_today(), 31)
        assert any("optouts.csv" in p and "file.header.excel_sep" in p for p in problems), problems


def test_two_statements_sent_in_one_night_take_effect_in_the_order_they_arrived(
    home: Home, tmp_path: Path, template: Template
) -> None:
    """Two objections files in one night: the withdrawal arrives first, then the sender's file in
    which the objection stands. Files land in arrival order, not name order, so the later
    statement is the one in force and the objector is not released."""
    import time

    with open_haven(home, tmp_path, template) as h:
        h.drop("optouts_d1.csv", [opt_out(21)])
        assert h.run()
        h.drop("z_0100.csv", [[NHS[21], "national_opt_out", "2024-03-01", "2024-06-01", ""]])
        time.sleep(0.05)  # status-change times are nanoseconds here
        h.drop("a_0200.csv", [opt_out(21), opt_out(22)])
        assert h.run()
        released = h.release()
        assert h.pids[NHS[21]] not in h.members(released.release_id)


def test_a_decision_by_file_name_never_clears_a_second_fault_of_that_name_unseen(haven: Haven) -> None:
    """Two faulty files sent under one name (the second may arrive after the person looked): a
    decision given by the name is refused, saying why; each is resolved by its SHA-256."""
    haven.drop("practice_c.csv", [opt_out(20), opt_out(22, recorded=FUTURE)])
    haven.run()
    haven.drop("practice_c.csv", [opt_out(21), opt_out(23, recorded=FUTURE)])
    haven.run()
    feed.sync_faults(haven.con, haven.home)
    faults = feed.unresolved(haven.con)
    assert len(faults) == 2
    with pytest.raises(ValueError, match="2 unresolved objections faults are named 'practice_c.csv'"):
        feed.resolve(haven.con, haven.home, "practice_c.csv", by="Dr Guardian", reason="checked")
    assert len(feed.unresolved(haven.con)) == 2
    for fault in faults:
        feed.resolve(haven.con, haven.home, fault.sha256[:12], by="Dr Guardian", reason="checked")
    assert feed.unresolved(haven.con) == []


def test_a_request_whose_opt_out_decision_is_lost_is_checked_as_if_it_applied(
    home: Home, tmp_path: Path, template: Template
) -> None:
    """The delivery guard skips only a request whose stored decision says the opt-out does not
    apply: one whose decision is gone (emptied in the store) is checked, and refused once a
    member has opted out (fail closed)."""
    from safehaven.share.releases import PREPARED, prepare
    from safehaven.share.review import ReviewError
    from tests.governance_helpers import adopt, approve_release

    with open_haven(home, tmp_path, template) as h:
        adopt(h.con, h.registry, h.agreement)
        res = prepare(h.con, h.agreement, haven=Context.open(h.home, contracts=h.registry, keyring=h.keyring))
        assert res.status == PREPARED
        h.con.execute(
            "UPDATE governance.release_requests SET optout_decision = '{}' WHERE release_id = ?", [res.release_id]
        )
        h.drop("optouts_d2.csv", [opt_out(31)])
        assert h.run()
        with pytest.raises(ReviewError, match="opted out since it was prepared"):
            approve_release(h.con, res.release_id, h.home, registry=h.registry)


# --- an objections file received again restates its objections (CoP 11-14; fail closed) ----


def _withdrawn(i: int, on: str, recorded: str = "2024-03-01") -> list[str]:
    return [NHS[i], "national_opt_out", recorded, on, ""]


def _in_force(haven: Haven, i: int) -> bool:
    found = haven.con.execute(f"SELECT count(*) FROM ({objectors_sql()}) WHERE pid = ?", [haven.pids[NHS[i]]])
    return found.fetchone()[0] == 1


def _restatements(haven: Haven) -> list[tuple]:
    return haven.con.execute(
        f"SELECT statements, added, withdrawals_held FROM {RESTATEMENTS} ORDER BY arrived_at"
    ).fetchall()


def test_an_objections_file_sent_again_after_a_mistaken_withdrawal_puts_the_objection_back_in_force(
    haven: Haven,
) -> None:
    """The sender withdrew an objection by mistake and sends the original file again: the same
    bytes, so not landed twice, but its objection is registered again and its records withheld."""
    yesterday = (haven_today() - timedelta(days=1)).isoformat()
    haven.drop("objections.csv", [opt_out(10)])
    haven.run()
    haven.learnt_earlier(2)  # the withdrawal below is dated after the register learnt the objection
    haven.drop("withdrawals.csv", [_withdrawn(10, yesterday)])
    haven.run()
    assert not _in_force(haven, 10)
    haven.drop("objections.csv", [opt_out(10)])  # the original file, sent again
    haven.run()
    assert _in_force(haven, 10)
    assert _restatements(haven) == [(1, 1, 0)]
    assert haven.pids[NHS[10]] not in haven.members(haven.release().release_id)


def test_an_old_withdrawal_sent_again_never_lifts_an_objection_the_register_holds(haven: Haven) -> None:
    """Fail closed: a file received again may keep an objection in force, never end one. The old
    withdrawal, re-sent after the objection was restated, is held and counted, not applied."""
    yesterday = (haven_today() - timedelta(days=1)).isoformat()
    haven.drop("objections.csv", [opt_out(10)])
    haven.run()
    haven.learnt_earlier(2)  # the withdrawal below is dated after the register learnt the objection
    haven.drop("withdrawals.csv", [_withdrawn(10, yesterday)])
    haven.run()
    haven.drop("objections.csv", [opt_out(10)])
    haven.run()
    haven.drop("withdrawals.csv", [_withdrawn(10, yesterday)])  # the old withdrawal, sent again
    haven.run()
    assert _in_force(haven, 10)
    assert _restatements(haven) == [(1, 1, 0), (1, 0, 1)]


def test_a_re_saved_copy_restates_too(haven: Haven) -> None:
    """Excel's re-save (byte-order mark, every field quoted, CRLF) holds the same records: a copy,
    not landed again, and a restatement all the same."""
    yesterday = (haven_today() - timedelta(days=1)).isoformat()
    haven.drop("objections.csv", [opt_out(10), opt_out(11)])
    haven.run()
    haven.learnt_earlier(2)
    haven.drop("withdrawals.csv", [_withdrawn(11, yesterday)])
    haven.run()
    haven.drop("objections (1).csv", [opt_out(10), opt_out(11)], excel=True)
    haven.run()
    assert _in_force(haven, 11) and _in_force(haven, 10)
    assert _restatements(haven) == [(2, 1, 0)], "the unchanged statement adds nothing"


def test_an_unchanged_daily_list_adds_no_event_and_keeps_the_register_current(haven: Haven) -> None:
    """A sender's full list, unchanged since yesterday, arrives byte for byte again: nothing is
    added to the register, but the register is as current as that file, so releases go on."""
    haven.drop("daily.csv", [opt_out(10)])
    haven.run()
    haven.age(40)
    with pytest.raises(ReleaseRefused, match="last refreshed on"):
        haven.release()
    events = haven.con.execute("SELECT count(*) FROM governance.objection_events").fetchone()[0]
    haven.drop("daily.csv", [opt_out(10)])
    haven.run()
    assert haven.con.execute("SELECT count(*) FROM governance.objection_events").fetchone()[0] == events
    assert feed.refreshed_on(haven.con) == haven_today()
    assert haven.release().status == "released"


def test_an_objection_recorded_by_hand_is_honoured_but_does_not_refresh_the_register(haven: Haven) -> None:
    """``safehaven objections record`` writes one person's statement, not the current list: it is
    registered like any file, but a stale register stays stale (it counted as a refresh, so one
    hand-recorded objection made a months-old list look current: found on re-reading)."""
    haven.drop("daily.csv", [opt_out(10)])
    haven.run()
    haven.age(40)
    stale = feed.refreshed_on(haven.con)
    haven.drop(feed.recorded_drop_name("20261206T093512123456"), [opt_out(11)])
    haven.run()
    assert _in_force(haven, 11)
    assert feed.refreshed_on(haven.con) == stale
    with pytest.raises(ReleaseRefused, match=f"last refreshed on {stale.isoformat()}"):
        haven.release()
    haven.drop("daily.csv", [opt_out(10)])  # the sender's list, unchanged, sent again
    haven.run()
    assert feed.refreshed_on(haven.con) == haven_today(), "a hand-recorded drop does not hold back a restatement"


def test_a_restatement_not_yet_registered_refuses_record_level_releases(haven: Haven) -> None:
    haven.drop("objections.csv", [opt_out(10)])
    haven.run()
    haven.drop("objections.csv", [opt_out(10)])
    contract = haven.registry.objections()
    haven.land()
    assert feed.pending_batches(haven.con) == 1
    with pytest.raises(ReleaseRefused, match="not yet"):
        haven.release()
    register_objections(haven.con, contract)
    assert feed.pending_batches(haven.con) == 0


def test_the_same_drop_seen_again_after_a_crash_restates_nothing(haven: Haven) -> None:
    """A run killed after landing a file and before shredding it sees that very file again: it is
    already landed, and not a second sending."""
    haven.drop("objections.csv", [opt_out(10)])
    contract = haven.registry.objections()
    folder = haven.home.incoming_for("objections")
    [path] = folder.iterdir()
    ingest.ensure_tables(haven.con, contract)
    ingest.inspect_file(haven.con, path, contract)
    ingest.land_file(haven.con, path, contract, sha256_file(path), os.lstat(path), ingest.drop_key(path))
    report = ingest_collection(haven.con, contract, folder, haven.home.quarantine_for("objections"))
    assert list(report.drops.values()) == ["already landed"] and report.restated == []
    assert _restatements(haven) == []


def _register_as_the_night_does(haven: Haven) -> None:
    """The nightly register step alone (told when the earliest file still waiting in incoming/ arrived)."""
    waiting = feed.waiting_since(haven.home)
    register_objections(haven.con, haven.registry.objections(), waiting_since=waiting)


def test_a_file_sent_again_waits_for_a_withdrawal_that_arrived_before_it(haven: Haven) -> None:
    """Arrival order holds across runs: the withdrawal W lands but its run stops before validating
    it, then the original file is sent again to undo W. The restatement waits (record-level
    releases blocked) until W is validated and registered, then registers after it: in force."""
    haven.drop("objections.csv", [opt_out(10)])
    haven.run()
    haven.drop("withdrawals.csv", [_withdrawn(10, (haven_today() - timedelta(days=1)).isoformat())])
    haven.land()  # W landed; its run stopped here
    haven.drop("objections.csv", [opt_out(10)])  # sent again, after W
    haven.land()
    _register_as_the_night_does(haven)
    assert feed.pending_batches(haven.con) == 2, "W not validated, and the restatement behind it"
    assert _restatements(haven) == [(None, None, None)]
    with pytest.raises(ReleaseRefused, match="they wait for withdrawals.csv, landed but not validated: run intake"):
        haven.release()
    haven.run()  # W validated and registered, then the restatement
    assert _in_force(haven, 10) and feed.pending_batches(haven.con) == 0
    assert haven.pids[NHS[10]] not in haven.members(haven.release().release_id)


def test_a_file_sent_again_waits_for_an_earlier_file_still_in_incoming(haven: Haven) -> None:
    """The withdrawal W is still waiting in incoming/ (its intake run failed, or has not run) when
    the original file, sent again after it, is landed and the register runs: the restatement waits."""
    haven.drop("objections.csv", [opt_out(10)])
    haven.run()
    haven.drop("withdrawals.csv", [_withdrawn(10, (haven_today() - timedelta(days=1)).isoformat())])
    haven.drop("objections.csv", [opt_out(10)])
    haven.land([ingest.drop_key(haven.home.incoming_for("objections") / "objections.csv")])  # the later file's run
    _register_as_the_night_does(haven)
    assert feed.pending_batches(haven.con) == 1
    haven.run()
    assert _in_force(haven, 10)


def _refuse_in_place(h: Haven, monkeypatch: pytest.MonkeyPatch, name: str) -> Path:
    """A refused objections entry (an Excel ``sep=`` line) the haven's user cannot move out of
    incoming/objections/: it stays there with its not-moved reason file."""
    folder = h.home.incoming_for("objections")
    (folder / name).write_text("sep=,\r\n" + ",".join(COLUMNS) + "\r\n" + ",".join(opt_out(32)) + "\r\n")

    def refused_move(path: Path, dest: Path) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(ingest, "_move_whole", refused_move)
    h.run()
    shown = glob.escape(audit.shown_name(name))
    assert (folder / name).exists() and list(h.home.quarantine_for("objections").glob(f"{shown}.*.not-moved.*"))
    return folder / name


def test_a_restatement_does_not_wait_for_an_entry_refused_in_place_whose_fault_was_resolved(
    haven: Haven, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fail closed, never stuck (review: GP data held out of the haven for ever): a refused objections
    entry the haven cannot move stays in incoming/, and a person resolves its fault. The sender's
    unchanged daily list, sent again after it, is registered: nothing of the refused entry will ever
    be registered, so it cannot be overtaken, and waiting for it would hold every restatement, GP
    haven step and record-level release for ever."""
    haven.drop("daily.csv", [opt_out(10)])
    haven.run()
    stuck = _refuse_in_place(haven, monkeypatch, "odd.csv")
    feed.sync_faults(haven.con, haven.home)
    [fault] = feed.unresolved(haven.con)
    assert feed.resolve(haven.con, haven.home, fault.sha256[:16], by="Dr G", reason="sender re-sends by post") == 1
    time.sleep(0.05)  # status-change times are nanoseconds here
    haven.drop("daily.csv", [opt_out(10)])  # the unchanged daily list, sent again
    haven.run()
    assert stuck.exists() and feed.unresolved(haven.con) == []
    assert feed.pending_batches(haven.con) == 0 and _restatements(haven) == [(1, 0, 0)]
    refuse_while_objections_unregistered(haven.con, "gp_events", haven.home)  # not refused
    assert haven.release().status == "released"


def test_an_entry_not_yet_judged_still_holds_a_later_restatement_back_and_the_refusals_name_it(
    haven: Haven, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wait stands for an entry not yet judged: the sender replaces the refused odd.csv with a
    new file of that name (its reason was written before it arrived), then re-sends the daily list,
    and only the list's run lands. The restatement waits, so an earlier statement is never
    registered after a later one, and both refusals name what waits (by shown name, why) and the
    step that clears it; the next run lands odd.csv and registers the restatement after it."""
    haven.drop("daily.csv", [opt_out(10)])
    haven.run()
    stuck = _refuse_in_place(haven, monkeypatch, "odd.csv")
    time.sleep(0.05)
    haven.drop("new.csv", [opt_out(11)])
    os.replace(stuck.with_name("new.csv"), stuck)  # a new file under the refused name, not yet judged
    time.sleep(0.05)
    haven.drop("daily.csv", [opt_out(10)])
    haven.land([ingest.drop_key(stuck.with_name("daily.csv"))])  # the later file's run
    _register_as_the_night_does(haven)
    assert feed.pending_batches(haven.con) == 1 and _restatements(haven) == [(None, None, None)]
    waits = "they wait for odd.csv, which arrived before them and is still in incoming/objections/"
    with pytest.raises(feed.ObjectionFeedBlocked, match="1 objections file.s. sent again") as refused:
        refuse_while_objections_unregistered(haven.con, "gp_events", haven.home)
    assert waits in str(refused.value) and "run intake and the objection register again (safehaven run)" in str(
        refused.value
    )
    with pytest.raises(ReleaseRefused, match=waits):
        haven.release()
    haven.run()
    assert feed.pending_batches(haven.con) == 0 and _in_force(haven, 11) and _in_force(haven, 10)


def test_an_unjudged_entry_sharing_a_refused_entrys_shown_name_still_holds_a_later_restatement_back(
    haven: Haven, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fail closed (review: an objection lifted): a refused entry odd_1234567890.csv stays in
    incoming/ (its not-moved reason rewritten each night), and a withdrawal arrives as
    odd_1234567891.csv, the same shown name (digits withheld), still being written when the night
    runs; the daily list is sent again after it. The withdrawal is not the refused entry (another
    entry, other bytes), so the restatement waits for it and is registered after it: the later
    statement (the objection stands) is the one in force."""
    haven.drop("daily.csv", [opt_out(10)])
    haven.run()
    odd = _refuse_in_place(haven, monkeypatch, "odd_1234567890.csv")
    withdrawal = odd.with_name("odd_1234567891.csv")
    assert audit.shown_name(odd.name) == audit.shown_name(withdrawal.name)
    time.sleep(0.05)
    haven.drop("tmp.csv", [_withdrawn(10, (haven_today() - timedelta(days=1)).isoformat())])
    os.replace(odd.with_name("tmp.csv"), withdrawal)
    with open(withdrawal, "ab"):  # still being written while the night runs
        time.sleep(0.05)
        haven.drop("daily.csv", [opt_out(10)])
        haven.run()
        assert withdrawal.exists() and odd.exists()
        assert feed.first_waiting(haven.home) is not None
        assert feed.pending_batches(haven.con) == 1 and _restatements(haven) == [(None, None, None)]
    haven.run()
    assert feed.pending_batches(haven.con) == 0 and _in_force(haven, 10)


def test_an_entry_replaced_while_the_haven_refuses_it_in_place_is_still_waited_for(
    haven: Haven, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fail closed (review: a race): the haven reads odd.csv and refuses it, and before it writes the
    not-moved reason the sender replaces odd.csv by a withdrawal, an entry never judged. The reason
    records the entry the haven read (its identity and SHA-256), so the withdrawal is waited for:
    the list re-sent after it, landed by its own run, is registered only after the withdrawal."""
    folder = haven.home.incoming_for("objections")
    haven.drop("daily.csv", [opt_out(10)])
    haven.run()
    odd = folder / "odd.csv"
    odd.write_text("sep=,\r\n" + ",".join(COLUMNS) + "\r\n" + ",".join(opt_out(32)) + "\r\n")
    left = ingest._left_in_incoming

    def replaced_first(*args, **kwargs) -> None:
        haven.drop("tmp.csv", [_withdrawn(10, (haven_today() - timedelta(days=1)).isoformat())])
        os.replace(folder / "tmp.csv", odd)  # the sender's replacement lands in the window
        time.sleep(0.02)
        left(*args, **kwargs)

    def refused_move(path: Path, dest: Path) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(ingest, "_move_whole", refused_move)
    monkeypatch.setattr(ingest, "_left_in_incoming", replaced_first)
    haven.land([ingest.drop_key(odd)])  # odd.csv's own run
    monkeypatch.setattr(ingest, "_left_in_incoming", left)
    time.sleep(0.05)
    haven.drop("daily.csv", [opt_out(10)])
    haven.land([ingest.drop_key(folder / "daily.csv")])  # the later file's own run
    _register_as_the_night_does(haven)
    assert feed.first_waiting(haven.home) is not None
    assert feed.pending_batches(haven.con) == 1 and _restatements(haven) == [(None, None, None)]
    monkeypatch.undo()
    haven.run()
    assert feed.pending_batches(haven.con) == 0 and _in_force(haven, 10)


def test_an_entry_refused_in_place_is_waited_for_when_its_bytes_are_not_those_the_haven_refused(
    haven: Haven, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fail closed: an entry is the refused one only when its bytes, hashed again, are those the
    not-moved reason records, not merely its name, inode, size and times; with the recorded SHA-256
    not the entry's, it is waited for, and with it restored it is not (never stuck)."""
    haven.drop("daily.csv", [opt_out(10)])
    haven.run()
    stuck = _refuse_in_place(haven, monkeypatch, "odd.csv")
    [reason_file] = haven.home.quarantine_for("objections").glob("odd.csv.*.not-moved.reason.json")
    reason = json.loads(reason_file.read_text())
    assert reason["entry"]["hashed"] and reason["sha256"] == sha256_file(stuck)
    assert feed.first_waiting(haven.home) is None
    reason_file.write_text(json.dumps({**reason, "sha256": "0" * 64}))
    assert feed.first_waiting(haven.home) is not None
    reason_file.write_text(json.dumps(reason))
    assert feed.first_waiting(haven.home) is None


def test_a_faulty_file_sent_again_does_not_refresh_the_register(haven: Haven) -> None:
    """A file whose every row was rejected (a fault a person resolved) sent again byte for byte:
    it restates nothing, so the register is no fresher for it and a stale register still refuses."""
    haven.drop("daily.csv", [opt_out(10, recorded=FUTURE), opt_out(11, recorded=FUTURE)])
    haven.run()
    feed.resolve(haven.con, haven.home, "daily.csv", by="Dr Guardian", reason="the sender was told")
    haven.age(40)
    haven.drop("daily.csv", [opt_out(10, recorded=FUTURE), opt_out(11, recorded=FUTURE)])
    haven.run()
    assert _restatements(haven) == [(0, 0, 0)]
    with pytest.raises(ReleaseRefused, match="last refreshed on"):
        haven.release()


def test_a_list_with_an_episodes_history_sent_again_restates_its_last_statement(haven: Haven) -> None:
    """A full list holding an objection and, in a later row, its withdrawal: the later row wins
    when it lands, and the same list sent again restates that, not the first row."""
    yesterday = (haven_today() - timedelta(days=1)).isoformat()
    haven.drop("daily.csv", [opt_out(10), _withdrawn(10, yesterday)])
    haven.run()
    haven.drop("daily.csv", [opt_out(10), _withdrawn(10, yesterday)])
    haven.run()
    assert not _in_force(haven, 10)
    assert _restatements(haven) == [(1, 0, 0)]


def test_a_forged_restatement_naming_no_objections_batch_stays_pending(haven: Haven) -> None:
    """A row in the restatements table naming no batch of the objections collection (a forged
    or damaged one) registers nothing, never fails the register, and blocks record-level releases."""
    contract = haven.registry.objections()
    ingest.ensure_tables(haven.con, contract)
    haven.run()
    for batch in (None, "a-batch-of-hospital_episodes"):
        haven.con.execute(
            f"INSERT INTO {RESTATEMENTS} (drop_key, batch_id, file_name, arrived_at, noted_at) "
            "VALUES (?, ?, 'x.csv', now(), now())",
            [f"x.csv@{batch or 'none'}", batch],
        )
    register_objections(haven.con, contract)
    assert feed.pending_batches(haven.con) == 2
    with pytest.raises(ReleaseRefused, match="not yet validated and registered"):
        haven.release()


# --- the register is sealed in the audit trail: an edit outside the haven blocks (CoP 11-14, 23d) ----


def test_an_objection_deleted_outside_the_haven_refuses_record_level_releases_until_a_person_decides(
    haven: Haven,
) -> None:
    """Someone holding the store key deletes an objector's events: every record-level release is
    refused, the next register step does not seal over the edit (it registers the landed row
    again, so the objection is honoured, but the register still differs from its seal), and a
    person's decision (``objections seal``, audited) clears it."""
    haven.drop("objections.csv", [opt_out(10)])
    haven.run()
    assert register_seal.problem(haven.con) is None
    haven.con.execute("DELETE FROM governance.objection_events WHERE pid = ?", [haven.pids[NHS[10]]])
    assert not _in_force(haven, 10)
    for _ in range(2):  # the run that finds it, and a later one
        with pytest.raises(ReleaseRefused, match="differs from its last seal"):
            haven.release()
        haven.run()
    assert _in_force(haven, 10), "the landed row is registered again"
    register_seal.reseal(haven.con, haven.home, by="Dr Guardian", reason="restored from the landed file")
    assert haven.pids[NHS[10]] not in haven.members(haven.release().release_id)
    assert [e.actor for e in audit.entries_for(haven.con) if e.action == register_seal.RESEALED] == ["Dr Guardian"]


def test_a_withdrawal_added_outside_the_haven_is_never_sealed(haven: Haven) -> None:
    """An event appended with SQL (a withdrawal no file stated) lifts the objection in the register,
    so releases are refused, and the register step will not seal it as a run's leftover."""
    yesterday = (haven_today() - timedelta(days=1)).isoformat()
    haven.drop("objections.csv", [opt_out(10)])
    haven.run()
    haven.con.execute(  # after every sealed event, naming the landed row it "restates"
        "INSERT INTO governance.objection_events SELECT (SELECT max(event_id) FROM governance.objection_events) + 1, "
        f"pid, objection_type, recorded_date, DATE '{yesterday}', source_practice, _batch, _row, now(), key_id "
        "FROM governance.objection_events WHERE pid = ?",
        [haven.pids[NHS[10]]],
    )
    haven.run()
    assert not _in_force(haven, 10)
    with pytest.raises(ReleaseRefused, match="differs from its last seal"):
        haven.release()


def test_a_run_stopped_between_registering_and_sealing_is_sealed_by_the_next_register_step(haven: Haven) -> None:
    """Not a breach: events the haven appended after the last seal, each stating a landed row
    exactly, are sealed by the next register step with no one's decision."""
    haven.drop("objections.csv", [opt_out(10)])
    haven.run()
    haven.drop("more.csv", [opt_out(11)])
    contract = haven.registry.objections()
    haven.land()
    haven.validate()
    register_objections(haven.con, contract)  # registered; killed before the seal
    with pytest.raises(ReleaseRefused, match="differs from its last seal"):
        haven.release()
    haven.run()
    assert register_seal.problem(haven.con) is None
    members = haven.members(haven.release().release_id)
    assert not {haven.pids[NHS[10]], haven.pids[NHS[11]]} & members


def test_the_seal_command_records_a_persons_decision(home: Home) -> None:
    from click.testing import CliRunner

    from safehaven.cli.main import main

    runner = CliRunner()
    refused = runner.invoke(main, ["objections", "seal", "--by", " ", "--reason", "checked"])
    assert refused.exit_code != 0 and "name and a reason" in refused.output
    listed = runner.invoke(main, ["objections", "faults"])
    assert listed.exit_code == 0 and '"register_seal_problem": null' in listed.output, listed.output
    done = runner.invoke(main, ["objections", "seal", "--by", "Dr Guardian", "--reason", "restored from the backup"])
    assert done.exit_code == 0 and '"audited": true' in done.output, done.output
    with Store(home).connect() as con:
        [entry] = [e for e in audit.entries_for(con) if e.action == register_seal.RESEALED]
        assert register_seal.problem(con) is None
    assert entry.actor == "Dr Guardian" and entry.detail_value["reason"] == "restored from the backup"


def _withdraw_with_sql(haven: Haven, i: int) -> None:
    """What someone holding the store key could do: append a withdrawal no file stated."""
    yesterday = (haven_today() - timedelta(days=1)).isoformat()
    haven.con.execute(
        "INSERT INTO governance.objection_events SELECT (SELECT max(event_id) FROM governance.objection_events) + 1, "
        f"pid, objection_type, recorded_date, DATE '{yesterday}', source_practice, _batch, _row, now(), key_id "
        "FROM governance.objection_events WHERE pid = ?",
        [haven.pids[NHS[i]]],
    )


def test_a_seal_edited_in_the_store_is_never_trusted(haven: Haven) -> None:
    """The seal's audit entry rewritten to match an edited register (not the trail's last entry, so
    the append-time check of the tail alone would pass), or renamed so the register looks never
    sealed: the seal is read only through the verified trail, so releases are refused."""
    haven.drop("objections.csv", [opt_out(10)])
    haven.run()
    feed.attest_refresh(
        haven.con, haven_today(), by="Dr Guardian", reason="checked", today=haven_today()
    )  # a later entry
    _withdraw_with_sql(haven, 10)
    forged = json.dumps(register_seal.state(haven.con).as_detail())
    haven.con.execute(
        "UPDATE governance.audit_log SET detail = ? WHERE seq = (SELECT max(seq) FROM governance.audit_log "
        "WHERE action = 'objections.sealed')",
        [forged],
    )
    with pytest.raises(ReleaseRefused, match="differs from its last seal"):
        haven.release()
    haven.con.execute("UPDATE governance.audit_log SET action = 'objections.other' WHERE action = 'objections.sealed'")
    assert register_seal.last_seal(haven.con) == register_seal.UNVERIFIED
    with pytest.raises(ReleaseRefused, match="differs from its last seal"):
        haven.release()


def test_an_old_withdrawal_replayed_with_sql_is_not_taken_for_a_runs_leftover(haven: Haven) -> None:
    """A withdrawal that a later file overrode is a landed row; copied as a new event it restates
    that row exactly, but the haven only ever repeats a row to keep an objection in force."""
    yesterday = (haven_today() - timedelta(days=1)).isoformat()
    haven.drop("a.csv", [_withdrawn(10, yesterday)])
    haven.run()
    haven.drop("b.csv", [opt_out(10)])
    haven.run()
    haven.con.execute(
        "INSERT INTO governance.objection_events SELECT (SELECT max(event_id) FROM governance.objection_events) + 1, "
        "pid, objection_type, recorded_date, withdrawn_date, source_practice, _batch, _row, now(), key_id "
        "FROM governance.objection_events WHERE pid = ? AND withdrawn_date IS NOT NULL",
        [haven.pids[NHS[10]]],
    )
    haven.run()
    with pytest.raises(ReleaseRefused, match="differs from its last seal"):
        haven.release()


@pytest.mark.parametrize("edit", ["unnumbered event", "a view in its place", "a macro stored in the store"])
def test_a_register_that_is_not_a_plain_table_of_numbered_events_is_never_sealed(haven: Haven, edit: str) -> None:
    """Edits that would hide from a digest: an event with no number (outside every event_id range,
    yet taken as registered), the table replaced by a view, or a macro stored in the store (which
    could stand in for hash or sum; the haven's own macros are temporary)."""
    haven.drop("objections.csv", [opt_out(10)])
    haven.run()
    if edit == "unnumbered event":
        haven.con.execute(
            "INSERT INTO governance.objection_events SELECT NULL, 'x', objection_type, recorded_date, "
            "withdrawn_date, source_practice, _batch, _row, now(), key_id FROM governance.objection_events LIMIT 1"
        )
    elif edit == "a view in its place":
        haven.con.execute("ALTER TABLE governance.objection_events RENAME TO objection_events_kept")
        haven.con.execute("CREATE VIEW governance.objection_events AS SELECT * FROM governance.objection_events_kept")
    else:
        haven.con.execute("CREATE MACRO store.main.twice(a) AS a * 2")
    assert register_seal.state(haven.con) == register_seal.MALFORMED
    try:
        haven.run()  # the register step cannot append to a view: it fails, and seals nothing
    except duckdb.Error:
        assert edit == "a view in its place"
    with pytest.raises(ReleaseRefused, match="differs from its last seal"):
        haven.release()


def test_delivery_under_an_exempt_basis_still_needs_a_sound_register(haven: Haven) -> None:
    """A request under a basis the opt-out does not cover is still record level: its type 1 check
    reads the register, so delivery refuses while the register differs from its seal."""
    from safehaven.share.releases import PREPARED, prepare
    from safehaven.share.review import ReviewError
    from tests.governance_helpers import approve_release

    write_agreement(
        haven.registry.root,
        agreement_data(
            id="test-statutory",
            legal_basis={"basis": "statutory", "reference": "s.1 Test Act (synthetic)"},
            collections=["hospital_episodes"],
            linkages=[],
            fields=[f for f in BASE["fields"] if f["collection"] == "hospital_episodes"],
            small_groups="suppress",
            max_suppressed_share=1.0,
        ),
    )
    haven.agreement = "test-statutory"
    adopt(haven.con, haven.registry, haven.agreement)
    haven.drop("t1.csv", [[NHS[32], "type1", "2024-03-01", "", "A81001"]])
    assert haven.run()
    res = prepare(
        haven.con, haven.agreement, haven=Context.open(haven.home, contracts=haven.registry, keyring=haven.keyring)
    )
    assert res.status == PREPARED
    haven.drop("t2.csv", [[NHS[33], "type1", "2024-03-01", "", "A81001"]])
    assert haven.run()
    haven.con.execute("DELETE FROM governance.objection_events WHERE pid = ?", [haven.pids[NHS[33]]])
    with pytest.raises(ReviewError, match="differs from its last seal"):
        approve_release(haven.con, res.release_id, haven.home, registry=haven.registry)


@pytest.mark.parametrize("stored", ["5", 5.0, 10**30, 0, True])
def test_an_odd_stored_window_holds_the_register_to_one_day(stored: object) -> None:
    from safehaven.share import review

    assert review._window({review.WINDOW_KEY: stored}) == 1
    assert review._window({review.WINDOW_KEY: 5}) == 5
    assert review._window({}) == feed.DEFAULT_WINDOW_DAYS, "a request prepared before requests stored one"


def test_an_older_file_sent_again_does_not_refresh_the_register(haven: Haven) -> None:
    """Files landed after it hold newer statements: an old list sent again restates its objections
    (they stay in force) but does not make a stale register current."""
    haven.drop("monday.csv", [opt_out(10)])
    haven.run()
    haven.drop("tuesday.csv", [opt_out(10), opt_out(11)])
    haven.run()
    haven.age(40)
    haven.drop("monday.csv", [opt_out(10)])
    haven.run()
    assert _restatements(haven) == [(1, 0, 0)]
    with pytest.raises(ReleaseRefused, match="last refreshed on"):
        haven.release()


def test_a_held_withdrawal_is_applied_by_a_persons_decision(haven: Haven) -> None:
    """A genuine new withdrawal whose records equal an old withdrawal file's is held like an old
    file sent again; a person who confirmed it with the sender applies it (audited, and the
    register sealed), after which the objection ends. The command names the drop it applies."""
    from click.testing import CliRunner

    from safehaven.cli.main import main

    yesterday = (haven_today() - timedelta(days=1)).isoformat()
    haven.drop("objections.csv", [opt_out(10)])
    haven.run()
    haven.learnt_earlier(2)  # the withdrawal below is dated after the register learnt the objection
    haven.drop("withdrawals.csv", [_withdrawn(10, yesterday)])
    haven.run()
    haven.drop("objections.csv", [opt_out(10)])  # the mistaken withdrawal undone
    haven.run()
    haven.drop("withdrawal (new).csv", [_withdrawn(10, yesterday)], excel=True)  # weeks later, genuine
    haven.run()
    assert _in_force(haven, 10)
    [held] = register_seal.held_withdrawals(haven.con)
    assert held["withdrawals_held"] == 1 and held["file"] == "withdrawal (new).csv"
    runner = CliRunner()
    haven.con.close()  # the command opens the store itself
    refused = runner.invoke(main, ["objections", "apply-held", "nothing@00000000", "--by", "Dr G", "--reason", "x"])
    assert refused.exit_code != 0 and "no file sent again with withdrawals held" in refused.output
    done = runner.invoke(
        main, ["objections", "apply-held", str(held["drop"]), "--by", "Dr Guardian", "--reason", "confirmed"]
    )
    assert done.exit_code == 0 and '"events_added": 1' in done.output, done.output
    with Store(haven.home).connect() as con:
        haven.con = con
        install_key(con, "haven", haven.keyring.get("haven"))
        assert not _in_force(haven, 10)
        assert register_seal.problem(con) is None and register_seal.held_withdrawals(con) == []
        assert [e.actor for e in audit.entries_for(con) if e.action == register_seal.HELD_APPLIED] == ["Dr Guardian"]


# --- a new file repeating a withdrawal the sender stated away is stale (CoP 11-14; fail closed) ----


def _stale_story(haven: Haven) -> None:
    """Day 1, extract A: person 10's objection withdrawn ten days ago. Day 2, extract B: the sender
    reversed it, in force. Day 3, A regenerated (A'): one unrelated row differs, so a new batch."""
    withdrawn = (haven_today() - timedelta(days=10)).isoformat()
    haven.drop("extract.csv", [_withdrawn(10, withdrawn), opt_out(12)])
    haven.run()
    haven.drop("extract.csv", [opt_out(10), opt_out(12)])
    haven.run()
    haven.drop("extract.csv", [_withdrawn(10, withdrawn), opt_out(12), opt_out(11)])
    haven.run()


def _held_by_batch(haven: Haven) -> list[dict]:
    return [h for h in register_seal.held_withdrawals(haven.con) if "batch" in h]


def test_a_regenerated_old_extract_does_not_lift_an_objection_the_sender_put_back_in_force(haven: Haven) -> None:
    """A new batch repeating a withdrawal dated on or before the day the register learnt the
    statement that put the objection back in force is stale: its withdrawal is held and counted,
    the objection stays in force, and the rest of the batch registers as ever (its new objector)."""
    _stale_story(haven)
    assert _in_force(haven, 10) and _in_force(haven, 11) and _in_force(haven, 12)
    [held] = _held_by_batch(haven)
    assert held["withdrawals_held"] == 1 and held["file"] == "extract.csv"
    assert feed.pending_batches(haven.con) == 0, "a held withdrawal is decided on, not left pending"
    members = haven.members(haven.release().release_id)
    assert not {haven.pids[NHS[i]] for i in (10, 11, 12)} & members


def test_a_withdrawal_dated_after_the_register_learnt_the_objection_still_applies(haven: Haven) -> None:
    """A genuine new withdrawal, made after the in-force statement it ends was learnt, carries a
    later withdrawn date and takes effect as it always did."""
    _stale_story(haven)
    haven.learnt_earlier(3)
    yesterday = (haven_today() - timedelta(days=1)).isoformat()
    haven.drop("withdrawn.csv", [_withdrawn(10, yesterday)])
    haven.run()
    assert not _in_force(haven, 10)
    assert [h["withdrawals_held"] for h in _held_by_batch(haven)] == [1], "only the stale one is held"


def test_a_withdrawal_dated_the_day_the_objection_was_learnt_is_held(haven: Haven) -> None:
    """Fail closed: the same day cannot tell which came first, so the withdrawal is held."""
    haven.drop("objections.csv", [opt_out(10)])
    haven.run()
    haven.drop("withdrawn.csv", [_withdrawn(10, haven_today().isoformat())])
    haven.run()
    assert _in_force(haven, 10)
    assert [h["withdrawals_held"] for h in _held_by_batch(haven)] == [1]


def test_an_objection_restated_by_a_file_sent_again_was_learnt_when_it_was_sent_again(haven: Haven) -> None:
    """The day the register learnt a statement is the later of its event's registration and its
    batch's arrival: an objection put back in force by the original file sent again was learnt
    today, not when that file first arrived, so a new file's withdrawal dated between is stale."""
    haven.drop("objections.csv", [opt_out(10)])
    haven.run()
    haven.learnt_earlier(5)
    haven.drop("withdrawals.csv", [_withdrawn(10, (haven_today() - timedelta(days=3)).isoformat())])
    haven.run()
    assert not _in_force(haven, 10)
    haven.drop("objections.csv", [opt_out(10)])  # sent again: back in force
    haven.run()
    haven.drop("withdrawals (2).csv", [_withdrawn(10, (haven_today() - timedelta(days=2)).isoformat()), opt_out(11)])
    haven.run()
    assert _in_force(haven, 10) and _in_force(haven, 11)
    assert [h["withdrawals_held"] for h in _held_by_batch(haven)] == [1]


def test_a_new_file_listing_an_episodes_history_is_judged_by_its_last_statement(haven: Haven) -> None:
    """A file listing each episode's history is judged by its last statement about it: an objection
    then an old withdrawal of it is stale (held, in force); an old withdrawal then the objection
    keeps it in force (nothing held); an old withdrawal then a new one ends it (applied)."""
    old, yesterday = ((haven_today() - timedelta(days=n)).isoformat() for n in (10, 1))
    haven.drop("objections.csv", [opt_out(10), opt_out(11), opt_out(12)])
    haven.run()
    haven.learnt_earlier(3)
    history = [opt_out(10), _withdrawn(10, old), _withdrawn(11, old), opt_out(11)]
    haven.drop("history.csv", [*history, _withdrawn(12, old), _withdrawn(12, yesterday)])
    haven.run()
    assert _in_force(haven, 10) and _in_force(haven, 11) and not _in_force(haven, 12)
    assert [h["withdrawals_held"] for h in _held_by_batch(haven)] == [1]


def test_an_objection_restated_unchanged_was_learnt_when_restated_so_an_older_withdrawal_is_held(
    haven: Haven,
) -> None:
    """A file sent again unchanged adds no event, yet its sender stated the objection again that day
    (a registered restatement): the register learnt it then, so a new file's withdrawal dated
    between the first statement and the restatement is stale, held, and the objection stays in
    force (found by review: only the latest event counted, so the old withdrawal lifted it)."""
    haven.drop("objections.csv", [opt_out(10)])
    haven.run()
    haven.learnt_earlier(10)
    haven.drop("objections.csv", [opt_out(10)])  # sent again, unchanged, today
    haven.run()
    assert _restatements(haven) == [(1, 0, 0)], "the unchanged statement adds no event"
    haven.drop("withdrawals.csv", [_withdrawn(10, (haven_today() - timedelta(days=5)).isoformat())])
    haven.run()
    assert _in_force(haven, 10)
    assert [h["withdrawals_held"] for h in _held_by_batch(haven)] == [1]


def test_an_unchanged_daily_list_re_exported_with_other_bytes_was_learnt_the_day_it_came(haven: Haven) -> None:
    """The everyday case: today's daily list holds yesterday's records in other bytes (a spreadsheet's
    re-save), a copy noted as a restatement, adding no event; the register learnt the objection
    today all the same, so a regenerated old extract withdrawing it five days ago is held."""
    haven.drop("daily.csv", [opt_out(10), opt_out(12)])
    haven.run()
    haven.learnt_earlier(10)
    haven.drop("daily.csv", [opt_out(10), opt_out(12)], excel=True)  # today's list: the same records
    haven.run()
    assert _restatements(haven) == [(2, 0, 0)]
    old = _withdrawn(10, (haven_today() - timedelta(days=5)).isoformat())
    haven.drop("old extract.csv", [old, opt_out(12), opt_out(11)])
    haven.run()
    assert _in_force(haven, 10) and _in_force(haven, 11)
    assert [h["withdrawals_held"] for h in _held_by_batch(haven)] == [1]


def test_a_file_sent_again_stating_other_than_the_register_does_not_refresh_when_it_was_learnt(
    haven: Haven,
) -> None:
    """Only a restatement whose statement equals the register's current one tells the haven that
    state again: an old withdrawal file sent again (held) says nothing of the objection in force,
    so a genuine new withdrawal dated after the register last learnt the objection still applies."""
    yesterday, weekago = ((haven_today() - timedelta(days=n)).isoformat() for n in (1, 5))
    haven.drop("objections.csv", [opt_out(10)])
    haven.run()
    haven.learnt_earlier(3)
    haven.drop("withdrawals.csv", [_withdrawn(10, yesterday)])
    haven.run()
    haven.drop("objections.csv", [opt_out(10)])  # sent again: back in force
    haven.run()
    haven.learnt_earlier(10)
    haven.drop("withdrawals.csv", [_withdrawn(10, yesterday)])  # the old withdrawal sent again today: held
    haven.run()
    assert _in_force(haven, 10) and _restatements(haven)[-1] == (1, 0, 1)
    haven.drop("withdrawn.csv", [_withdrawn(10, weekago), opt_out(11)])
    haven.run()
    assert not _in_force(haven, 10), "dated after the register last learnt the objection in force: applied"
    assert _held_by_batch(haven) == []


def test_a_held_withdrawal_the_sender_stated_away_since_the_hold_is_superseded_not_applied(haven: Haven) -> None:
    """A person's decision to apply a stale withdrawal is made on what the register knew when it was
    held; a newer list stating the objection in force since then supersedes it: nothing is
    appended, the objection stays in force, and the decision is audited with the count superseded
    (a count, never a value)."""
    _stale_story(haven)
    [held] = _held_by_batch(haven)
    haven.drop("daily list.csv", [opt_out(10), opt_out(12), opt_out(11), opt_out(13)])  # newer: in force
    haven.run()
    done = register_seal.apply_held_withdrawals(
        haven.con, haven.registry.objections(), str(held["batch"]), "", haven.home, by="Dr Guardian", reason="ok"
    )
    assert done == (0, 1)
    assert _in_force(haven, 10)
    assert register_seal.problem(haven.con) is None and _held_by_batch(haven) == []
    [entry] = [e for e in audit.entries_for(haven.con) if e.action == register_seal.HELD_APPLIED]
    assert entry.detail_value["superseded"] == 1 and entry.detail_value["events_added"] == 0
    assert NHS[10] not in json.dumps(entry.detail_value) and haven.pids[NHS[10]] not in json.dumps(entry.detail_value)


def test_a_withdrawal_held_from_a_file_sent_again_is_superseded_by_a_newer_list(haven: Haven) -> None:
    """The same for a withdrawal held from a file sent again (``apply_held``): a newer list stating
    the objection in force after the hold supersedes it, and the command says how many, not who."""
    from click.testing import CliRunner

    from safehaven.cli.main import main

    yesterday = (haven_today() - timedelta(days=1)).isoformat()
    haven.drop("objections.csv", [opt_out(10)])
    haven.run()
    haven.learnt_earlier(2)
    haven.drop("withdrawals.csv", [_withdrawn(10, yesterday)])
    haven.run()
    haven.drop("objections.csv", [opt_out(10)])  # the mistaken withdrawal undone
    haven.run()
    haven.drop("withdrawal (new).csv", [_withdrawn(10, yesterday)], excel=True)  # held
    haven.run()
    [held] = register_seal.held_withdrawals(haven.con)
    haven.drop("daily list.csv", [opt_out(10), opt_out(11)])  # newer: still in force
    haven.run()
    haven.con.close()  # the command opens the store itself
    args = ["objections", "apply-held", str(held["drop"]), "--by", "Dr Guardian", "--reason", "confirmed"]
    done = CliRunner().invoke(main, args)
    assert done.exit_code == 0, done.output
    shown = json.loads(done.output)
    assert (shown["events_added"], shown["superseded"]) == (0, 1) and "told those objections again" in shown["note"]
    assert NHS[10] not in done.output
    with Store(haven.home).connect() as con:
        haven.con = con
        install_key(con, "haven", haven.keyring.get("haven"))
        assert _in_force(haven, 10)
        assert register_seal.problem(con) is None and register_seal.held_withdrawals(con) == []


def test_the_day_learnt_is_the_uk_day_so_a_same_uk_day_withdrawal_after_midnight_bst_is_held(haven: Haven) -> None:
    """Withdrawn dates are UK calendar dates, so the day the register learnt a statement is its UK
    day (``safehaven.core.sql.haven_day_sql``), not the host's: learnt at 00:30 BST on 2 July
    (23:30 UTC on 1 July), a withdrawal dated 2 July is the same day, and held."""
    haven.drop("objections.csv", [opt_out(10)])
    haven.run()
    at = "2026-07-02 00:30:00+01:00"
    haven.con.execute(f"UPDATE governance.batches SET arrived_at = TIMESTAMPTZ '{at}', landed_at = TIMESTAMPTZ '{at}'")
    sealer = haven.sealer()
    for stage, batches in sealer.held(haven.con).items():
        sealer.seal(haven.con, stage, batches)
    haven.con.execute(f"UPDATE governance.objection_events SET registered_at = TIMESTAMPTZ '{at}'")
    register_seal.seal(haven.con, haven.home, actor="test run")
    haven.con.execute("SET TimeZone = 'UTC'")  # a host in another zone than the haven's
    haven.drop("withdrawn.csv", [_withdrawn(10, "2026-07-02")])
    haven.run()
    assert _in_force(haven, 10)
    assert [h["withdrawals_held"] for h in _held_by_batch(haven)] == [1]


def test_an_objection_recorded_today_is_withheld_from_a_release_prepared_after_uk_midnight(
    haven: Haven, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A release prepared at 00:30 BST on 2 July (23:30 UTC on 1 July) withholds a person whose
    opt-out was recorded on 2 July: the run's today and the objections in force are the haven's
    (UK) day (``safehaven.core.days``), not the host's, still 1 July on a host in UTC (CoP 11-14;
    NDOP: an objection applies from its recorded date)."""
    monkeypatch.setattr(days, "clock", lambda: datetime(2099, 7, 1, 23, 30, tzinfo=UTC))
    haven.con.execute("SET TimeZone = 'UTC'")  # a host in UTC
    haven.drop("objections.csv", [opt_out(10, recorded="2099-07-02")])
    assert haven.run()
    feed.attest_refresh(haven.con, date(2099, 7, 2), by="Dr Guardian", reason="checked", today=days.haven_today())
    result = haven.release()  # the context's default today
    members = haven.members(result.release_id)
    assert haven.pids[NHS[10]] not in members
    assert haven.pids[NHS[11]] in members


def test_a_stale_withdrawal_is_applied_by_a_persons_decision_and_listed_until_then(haven: Haven) -> None:
    """The held withdrawal is listed by ``safehaven objections faults`` under its batch, and applied
    only by ``safehaven objections apply-held <batch>``: audited, the register sealed, and then the
    objection ends; the same decision cannot be applied twice."""
    from click.testing import CliRunner

    from safehaven.cli.main import main

    _stale_story(haven)
    [held] = _held_by_batch(haven)
    runner = CliRunner()
    haven.con.close()  # the commands open the store themselves
    faults = runner.invoke(main, ["objections", "faults"])
    assert faults.exit_code == 0, faults.output
    [listed] = [h for h in json.loads(faults.output)["withdrawals_held"] if "batch" in h]
    assert listed == held and NHS[10] not in faults.output
    args = ["objections", "apply-held", str(held["batch"]), "--by", "Dr Guardian", "--reason", "confirmed"]
    done = runner.invoke(main, args)
    assert done.exit_code == 0 and '"events_added": 1' in done.output, done.output
    again = runner.invoke(main, args)
    assert again.exit_code != 0 and "no objections batch with withdrawals held" in again.output
    with Store(haven.home).connect() as con:
        haven.con = con
        install_key(con, "haven", haven.keyring.get("haven"))
        assert not _in_force(haven, 10) and _in_force(haven, 11)
        assert register_seal.problem(con) is None and register_seal.held_withdrawals(con) == []
        [entry] = [e for e in audit.entries_for(con) if e.action == register_seal.HELD_APPLIED]
        assert entry.actor == "Dr Guardian" and entry.detail_value["batch"] == held["batch"]


def test_a_stale_withdrawal_appended_with_sql_is_not_taken_for_a_runs_leftover(haven: Haven) -> None:
    """The held row is a landed row; copied into the register as an event it states that row
    exactly, but only a person's decision applies it, so the register is not sealed and releases
    are refused."""
    _stale_story(haven)
    haven.con.execute(
        "INSERT INTO governance.objection_events SELECT (SELECT max(event_id) FROM governance.objection_events) + 1, "
        "?, v.objection_type, v.recorded_date, v.withdrawn_date, v.source_practice, v._batch, v._row, now(), '' "
        "FROM landing.objections_valid v JOIN governance.objection_withdrawals_held h "
        "ON h.batch_id = v._batch AND h._row = v._row",
        [haven.pids[NHS[10]]],
    )
    haven.run()
    with pytest.raises(ReleaseRefused, match="differs from its last seal"):
        haven.release()


def test_a_store_made_before_stale_withdrawals_were_held_still_checks_its_register(haven: Haven) -> None:
    """A store with no table of held withdrawals yet: the register step's check of events added
    since the seal makes it, and an edit outside the haven is still refused, not a crash."""
    haven.drop("objections.csv", [opt_out(10)])
    haven.run()
    haven.con.execute("DROP TABLE governance.objection_withdrawals_held")
    _withdraw_with_sql(haven, 10)
    haven.run()
    assert "differs from its last seal" in refused(haven)


def test_a_delivery_stopped_after_its_register_row_still_checks_objections_registered_since(
    home: Home, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, template: Template
) -> None:
    """Registration moves a request's members to the release's; the checks of a delivery finished
    after a stop read them there, so a type 1 objection registered between the stop and the next
    attempt still refuses it (the check saw no members and let it through: found by review)."""
    from safehaven.share import review
    from safehaven.share.releases import PREPARED, prepare
    from tests.governance_helpers import REVIEWERS, approve_as

    type1 = lambda i: [NHS[i], "type1", "2024-03-01", "", "A81001"]  # noqa: E731
    with open_haven(home, tmp_path, template) as h:
        h.drop("type1_d1.csv", [type1(32)])
        assert h.run()
        adopt(h.con, h.registry, h.agreement)
        first = prepare(h.con, h.agreement, haven=Context.open(h.home, contracts=h.registry, keyring=h.keyring))
        assert first.status == PREPARED
        rid, needed = first.release_id, review.get(h.con, first.release_id).reviewers_needed
        for by in REVIEWERS[: needed - 1]:
            approve_as(h.con, rid, by, home=h.home, registry=h.registry)
        with monkeypatch.context() as mp:  # stopped after the register row: no rollback runs
            mp.setattr(review, "_audit_delivery", _stopped)
            mp.setattr(review.os, "rename", renames_once(review.os.rename))
            with pytest.raises((KeyboardInterrupt, OSError)):
                last = approve_as(h.con, rid, REVIEWERS[needed - 1], home=h.home, registry=h.registry)
                if last.state == review.APPROVED:
                    review.deliver(h.con, rid, home=h.home, registry=h.registry, by="V. Keeper, custodian")
        assert [r["release_id"] for r in reg.releases(h.con)] == [rid]
        assert h.pids[NHS[33]] in h.members(rid)
        h.drop("type1_d2.csv", [type1(33)])  # a member's type 1 objection arrives before the next attempt
        assert h.run()
        with pytest.raises(review.ReviewError, match="1 person.s. in it have a type 1 objection registered since"):
            review.deliver(h.con, rid, home=h.home, registry=h.registry, by="V. Keeper, custodian")
        assert review.get(h.con, rid).state != review.RELEASED


def _stopped(*_args: object, **_kwargs: object) -> None:
    raise KeyboardInterrupt("the process was killed")


@pytest.fixture
def controlled_haven(home: Home, tmp_path: Path, template: Template) -> Iterator[Haven]:
    """A haven whose objections contract asks for a control file with each file (``control: manifest``)."""
    with open_haven(home, tmp_path, template) as opened:
        c = opened.registry.objections()
        opened.registry.contracts[c.collection] = c.model_copy(update={"control": "manifest"})
        yield opened


def _drop_controlled(haven: Haven, name: str, rows: list[list[str]], control: bool = True) -> None:
    """An objections file and, unless ``control`` is False (its control file never comes), its control file."""
    haven.drop(name, rows)
    if control:
        (haven.home.incoming_for("objections") / f"{name}.ctl.json").write_text(json.dumps({"rows": len(rows)}))


def test_an_objections_file_waiting_for_its_control_file_refuses_record_level_releases_naming_it(
    controlled_haven: Haven,
) -> None:
    """An objections file whose control file never comes is never read: its objector must not be
    released, so record-level releases are refused, naming the control file and who sends it."""
    haven = controlled_haven
    _drop_controlled(haven, "objections.csv", [opt_out(10)], control=False)
    for _ in range(2):
        haven.run()
    assert not _in_force(haven, 10)
    why = feed.describe_pending(haven.con, haven.home, haven.registry.objections())
    assert why is not None and "objections.csv is in incoming/objections/ waiting for its control file" in why
    assert "ask the sender for objections.csv.ctl.json" in why
    with pytest.raises(ReleaseRefused, match=r"ask the sender for objections\.csv\.ctl\.json"):
        haven.release()
    _drop_controlled(haven, "objections.csv", [opt_out(10)], control=False)
    (haven.home.incoming_for("objections") / "objections.csv.ctl.json").write_text(json.dumps({"rows": 1}))
    haven.run()
    assert _in_force(haven, 10) and feed.describe_pending(haven.con, haven.home, haven.registry.objections()) is None


def test_a_restatement_behind_a_file_waiting_for_its_control_file_names_that_control_file(
    controlled_haven: Haven,
) -> None:
    """A file sent again waits for an earlier file parked for its control file: the refusal names
    the missing control file and its remedy, not "run intake", which would never clear it."""
    haven = controlled_haven
    _drop_controlled(haven, "objections.csv", [opt_out(10)])
    haven.run()
    haven.learnt_earlier(2)
    _drop_controlled(haven, "withdrawals.csv", [_withdrawn(10, (haven_today() - timedelta(days=1)).isoformat())])
    haven.run()
    _drop_controlled(haven, "parked.csv", [opt_out(11)], control=False)
    _drop_controlled(haven, "objections.csv", [opt_out(10)])  # sent again
    for _ in range(3):
        haven.run()
    why = feed.describe_pending(haven.con, haven.home, haven.registry.objections())
    assert why is not None
    assert (
        "they wait for parked.csv, which arrived before them and is still in incoming/objections/, waiting "
        "for its control file parked.csv.ctl.json: ask the sender for parked.csv.ctl.json" in why
    ), why
    assert "intake has not run on it" not in why


def test_a_restatements_refusal_without_the_objections_contract_still_names_a_possibly_missing_control_file(
    controlled_haven: Haven,
) -> None:
    """A caller without the objections contract (``describe_pending(con, home)``) cannot tell a file
    waiting for its control file from one intake has not run on: it names both, with the control
    file to ask the sender for, never "run intake" alone, which would not clear a parked file."""
    haven = controlled_haven
    _drop_controlled(haven, "objections.csv", [opt_out(10)])
    haven.run()
    _drop_controlled(haven, "parked.csv", [opt_out(11)], control=False)
    _drop_controlled(haven, "objections.csv", [opt_out(10)])  # sent again
    haven.run()
    why = feed.describe_pending(haven.con, haven.home)
    assert why is not None and "parked.csv" in why
    assert "waiting for its control file parked.csv.ctl.json if the objections contract asks for one" in why, why
    assert "ask the sender for parked.csv.ctl.json" in why


def test_an_objections_file_waiting_for_its_control_file_refuses_delivery_too(controlled_haven: Haven) -> None:
    """A request prepared before an objections file arrived without its control file is not
    delivered while that file waits: delivery reads the feed with the deployment's contracts, as
    preparation does (found by the re-read: it passed none, so the parked file blocked nothing)."""
    from safehaven.share import review
    from safehaven.share.releases import PREPARED, prepare
    from tests.governance_helpers import REVIEWERS, approve_as

    haven = controlled_haven
    _drop_controlled(haven, "objections.csv", [opt_out(10)])
    assert haven.run()
    adopt(haven.con, haven.registry, haven.agreement)
    context = Context.open(haven.home, contracts=haven.registry, keyring=haven.keyring)
    first = prepare(haven.con, haven.agreement, haven=context)
    assert first.status == PREPARED
    rid, needed = first.release_id, review.get(haven.con, first.release_id).reviewers_needed
    for by in REVIEWERS[: needed - 1]:
        approve_as(haven.con, rid, by, home=haven.home, registry=haven.registry)
    _drop_controlled(haven, "later.csv", [opt_out(11)], control=False)
    haven.run()
    with pytest.raises(review.ReviewError, match=r"ask the sender for later\.csv\.ctl\.json"):
        last = approve_as(haven.con, rid, REVIEWERS[needed - 1], home=haven.home, registry=haven.registry)
        if last.state == review.APPROVED:
            review.deliver(haven.con, rid, home=haven.home, registry=haven.registry, by="V. Keeper, custodian")
    assert review.get(haven.con, rid).state != review.RELEASED
