"""End to end: a small synthetic population through the pipeline to ``published/``.

Rules under test: ``safehaven.publish.outputs``, ``safehaven.publish.disclosure``, ``safehaven.publish.publication``,
``safehaven.publish.quality`` and ``safehaven.publish.query`` (CoP 28-29, 34-36, 45-46; ISB 1523; guide Rule 3
part A), on the real outputs of one run: no seeded identifier or pseudonym in any published
file, the disclosure invariants on the files themselves, quality figures that agree with the
validation results, linkage only under its agreement, blocking checks that really stop
publication, and an analysts' query that cannot reach the store.
"""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from assets import counts, intake, objections, outputs, pseudonymise, publish
from assets.keys import PUBLISHED_FILES
from assets.keys import published as published_key
from assets.keys import validated as validated_key
from resources.haven import SafeHavenResource
from safehaven.core.days import haven_today
from safehaven.core.home import Home
from safehaven.core.keys import VAULT
from safehaven.core.store import Store
from safehaven.intake.contracts import ContractRegistry
from safehaven.publish.disclosure import Policy, check_invariants, true_range
from safehaven.publish.outputs import Output, build_output, load_outputs
from safehaven.publish.publication import guard_table
from safehaven.publish.query import QueryRefused, run_query
from safehaven.tools import synthetic
from tests.conftest import custodian_ring, scan_for
from tests.governance_helpers import adopt_project_agreements
from tests.stages import materialize_stages

PATIENTS = 600
# Every test here reads or reruns a run of the pipeline: the slow tier (`pytest -m "not slow"` skips it).
pytestmark = pytest.mark.slow


def stage_assets(registry: ContractRegistry) -> list[dg.AssetsDefinition]:
    """The stages from ingest to publication (release extracts are another stage's tests)."""
    return [
        *intake.build(registry),
        *objections.build(registry),
        *pseudonymise.build(registry),
        *counts.build(registry),
        *outputs.build(registry),
        *publish.build(registry),
    ]


@dataclass
class Run:
    home: Home
    registry: ContractRegistry
    result: dg.ExecuteInProcessResult
    outputs: dict[str, Output]
    nhs_numbers: set[str]
    postcodes: set[str]
    dobs: set[str]
    pids: set[str]


def seeded_values(incoming: Path) -> tuple[set[str], set[str], set[str]]:
    """NHS numbers (as written and canonical), full postcodes and dates of birth in the drop."""
    nhs, postcodes, dobs = set(), set(), set()
    for path in incoming.rglob("*.csv"):
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                raw = (row.get("nhs_number") or "").strip()
                digits = "".join(ch for ch in raw if ch.isdigit())
                if len(digits) == 10:
                    nhs |= {raw, digits}
                pc = (row.get("postcode") or "").strip().upper()
                if len(pc) >= 5:
                    postcodes |= {pc, pc.replace(" ", "")}
                dob = (row.get("date_of_birth") or "").strip()
                # Month starts and recent dates coincide with published months and process dates.
                if len(dob) == 10 and not dob.endswith("-01") and dob < "2024-01-01":
                    dobs.add(dob)
    return nhs, postcodes, dobs


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    root = tmp_path_factory.mktemp("e2e")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAFEHAVEN_HOME", str(root / "haven"))
        mp.setenv("DAGSTER_HOME", str(root / "dagster"))
        (root / "dagster").mkdir()
        home = Home(root / "haven").ensure()
        custodian_ring(home).create_keypair(VAULT)  # the custodian sets the haven up
        adopt_project_agreements(home)
        synthetic.generate(home.incoming, patients=PATIENTS, seed=11)
        nhs, postcodes, dobs = seeded_values(home.incoming)
        assert nhs and postcodes and dobs
        registry = ContractRegistry()
        result = materialize_stages(
            stage_assets(registry), resources={"haven": SafeHavenResource()}, raise_on_error=False
        )
        with Store(home).connect(read_only=True) as con:
            pids = {
                r[0]
                for c in ("gp_events", "hospital_episodes", "social_care")
                for r in con.execute(f"SELECT DISTINCT pid FROM haven.{c}").fetchall()
            }
        yield Run(home, registry, result, load_outputs(registry), nhs, postcodes, dobs, pids)


def materialization(run: Run, key: dg.AssetKey) -> dg.AssetMaterialization:
    """The run's materialisation of ``key`` (for an intake asset, the run's own: each drop's partition
    is recorded beside it with its outcome only)."""
    for event in run.result.get_asset_materialization_events():
        mat = event.event_specific_data.materialization  # type: ignore[union-attr]
        if mat.asset_key == key and mat.partition is None:
            return mat
    raise AssertionError(f"{key.to_user_string()} was not materialised")


def test_the_run_publishes_every_output_with_its_checks_passed(run: Run) -> None:
    assert run.result.success
    mine = {f"{name}_{kind}" for name in run.outputs for kind in ("disclosure_safe", "publication_guard")}
    evaluations = {e.check_name: e.passed for e in run.result.get_asset_check_evaluations()}
    assert mine <= set(evaluations)
    assert all(evaluations[name] for name in mine), {n: evaluations[n] for n in mine if not evaluations[n]}
    pub = run.home.published
    for name in run.outputs:
        for suffix in (".csv", ".parquet", ".dictionary.json", ".quality.json", ".quality.md"):
            assert (pub / f"{name}{suffix}").is_file(), name + suffix
    for name in ("published.duckdb", "methods.md", "LICENCE.txt", "release.json"):
        assert (pub / name).is_file(), name
    assert "Open Government Licence" in (pub / "LICENCE.txt").read_text()


def test_no_seeded_identifier_or_pseudonym_in_any_published_file(run: Run) -> None:
    assert len(run.pids) > PATIENTS // 2
    needles = sorted(run.nhs_numbers | run.postcodes | run.dobs | run.pids)
    assert scan_for(run.home.published, [n.encode() for n in needles]) == {}
    # And through the readers too (Parquet and DuckDB may compress what a byte scan would miss).
    pub = run.home.published
    db = duckdb.connect(str(pub / "published.duckdb"), read_only=True)
    try:
        for name in run.outputs:
            sources = (name, f"read_parquet('{pub / name}.parquet')", f"read_csv('{pub / name}.csv', all_varchar=true)")
            for source in sources:
                values = {str(v) for row in db.execute(f"SELECT * FROM {source}").fetchall() for v in row}
                assert not values & set(needles), f"{name} via {source}"
    finally:
        db.close()


def test_published_files_keep_the_disclosure_invariants_and_pass_the_guard(run: Run) -> None:
    pub = run.home.published
    db = duckdb.connect(str(pub / "published.duckdb"), read_only=True)
    try:
        for name, output in run.outputs.items():
            db.execute(f"CREATE TEMP VIEW pq_{name} AS SELECT * FROM read_parquet('{pub / name}.parquet')")
            for table in (name, f"pq_{name}"):
                assert (
                    check_invariants(
                        db,
                        table,
                        output.dimension_names,
                        output.count_col,
                        output.disclosure_policy,
                        margins=output.margins,
                    )
                    == []
                ), table
                assert guard_table(db, table, output, run.registry) == [], table
            types = dict(db.execute(f"SELECT column_name, column_type FROM (DESCRIBE {name})").fetchall())
            assert types["suppressed"] == "BOOLEAN", "one public marker, never the kind of suppression"
            n = db.execute(f"SELECT count(*) FROM {name}").fetchone()[0]
            assert n == db.execute(f"SELECT count(*) FROM pq_{name}").fetchone()[0]
            months = db.execute(
                f"SELECT count(DISTINCT month), min(day(month)), max(day(month)) FROM {name}"
            ).fetchone()
            assert months[0] >= 1 and months[1:] == (1, 1)
    finally:
        db.close()


def test_every_month_of_the_period_is_a_full_grid(run: Run) -> None:
    db = duckdb.connect(str(run.home.published / "published.duckdb"), read_only=True)
    try:
        for name, output in run.outputs.items():
            dims = output.dimension_names
            sizes = [db.execute(f"SELECT count(DISTINCT {d}) FROM {name}").fetchone()[0] for d in dims]
            total = db.execute(f"SELECT count(*) FROM {name}").fetchone()[0]
            product = 1
            for s in sizes:
                product *= s
            assert total == product, f"{name}: every combination of the dimensions is a row"
    finally:
        db.close()


def test_quality_statement_figures_agree_with_the_validation_results(run: Run) -> None:
    pub = run.home.published
    with Store(run.home).connect(read_only=True) as con:
        for name, output in run.outputs.items():
            st = json.loads((pub / f"{name}.quality.json").read_text())
            assert st["release"]["status"] == "published"
            assert st["release"]["id"] == json.loads((pub / "release.json").read_text())["release_id"]
            for c in output.collections:
                figures = st["accuracy"]["collections"][c]
                meta = materialization(run, validated_key(c)).metadata
                assert figures["rows_checked"] == meta["rows_checked"].value
                assert figures["rows_invalid"] == meta["rows_invalid"].value
                assert figures["pass_rate"] == pytest.approx(meta["pass_rate"].value, abs=1e-6)
                assert figures["contract_version"] == meta["contract_version"].value
                rejected = con.execute(f"SELECT count(*) FROM landing.{c}_rejected").fetchone()[0]
                valid = con.execute(f"SELECT count(*) FROM landing.{c}_valid").fetchone()[0]
                in_haven = con.execute(f"SELECT count(*) FROM haven.{c}").fetchone()[0]
                assert figures["rows_invalid"] == rejected
                assert figures["rows_valid"] == valid
                assert figures["records_in_haven"] == in_haven
                assert figures["records_not_in_haven_type1_objections"] == valid - in_haven
                rules = con.execute(
                    f"SELECT rule, count(*) FROM (SELECT unnest(failed_rules) AS rule FROM landing.{c}_rejected) "
                    "GROUP BY ALL"
                ).fetchall()
                assert figures["failures_by_rule"] == dict(rules)
                measured = figures["measures_from_validation"]["row_validity"]["*"]
                assert measured["denominator"] == figures["rows_checked"]
                assert measured["numerator"] == figures["rows_checked"] - figures["rows_invalid"]
            sdc = st["accuracy"]["disclosure_control"]
            cells, suppressed = con.execute(
                f"SELECT count(*), count(*) FILTER (WHERE suppressed) FROM published.{name}"
            ).fetchone()
            assert (sdc["cells"], sdc["cells_suppressed"]) == (cells, suppressed)
            meta = materialization(run, published_key(name)).metadata
            assert sdc["cells_suppressed"] == meta["sdc_people_primary"].value + meta["sdc_people_secondary"].value
            # how many cells rounding changed is not published: it would say which counts are exact
            assert not {"cells_rounded", "cells_published_unchanged"} & set(sdc)
            md = (pub / f"{name}.quality.md").read_text()
            assert f"{sdc['cells_suppressed']:,} are suppressed" in md and "changed by rounding" not in md
    gp = json.loads((pub / "gp_activity.quality.json").read_text())["accuracy"]["collections"]["gp_events"]
    assert gp["records_not_in_haven_type1_objections"] > 0, "the synthetic drop has type 1 objectors"


def test_quality_statement_is_markdown_metadata_of_each_output(run: Run) -> None:
    for name in run.outputs:
        meta = materialization(run, published_key(name)).metadata
        assert isinstance(meta["quality_statement"], dg.MarkdownMetadataValue)
        assert "## Comparability and coherence" in meta["quality_statement"].value


def test_the_linked_output_ran_under_its_agreement(run: Run) -> None:
    with Store(run.home).connect(read_only=True) as con:
        links = con.execute("SELECT agreement, outcome FROM governance.audit_log WHERE action = 'link'").fetchall()
        published = con.execute(
            "SELECT object, legal_basis, agreement FROM governance.audit_log WHERE action = 'publish' ORDER BY object"
        ).fetchall()
    assert ("anon-linked-stats", "ok") in links
    assert ("published/discharge_to_social_care", "anonymised", "anon-linked-stats") in published
    assert {p[0] for p in published} >= {f"published/{n}" for n in run.outputs}


def test_the_query_command_reads_published_outputs_only(run: Run) -> None:
    db = run.home.published_db
    ok = run_query(db, "SELECT count(*) FROM gp_activity WHERE suppressed")
    assert ok.rows[0][0] > 0
    store = run.home.store_file
    for sql in (
        f"ATTACH '{store}' AS s",
        f"SELECT * FROM query('ATTACH ''{store}'' AS s')",
        f"SELECT * FROM read_blob('{store}')",
        f"SELECT * FROM read_text('{run.home.keys / 'store.key'}')",
        f"SELECT * FROM glob('{run.home.root}/**')",
        f"SELECT * FROM read_csv('{run.home.published / 'gp_activity.csv'}')",
    ):
        with pytest.raises(QueryRefused):
            run_query(db, sql)


def test_a_differencing_pair_on_the_real_data_never_pins_a_small_count(run: Run) -> None:
    """Admissions by month over all providers, and without the smallest: one release, one policy."""
    with Store(run.home).connect() as con:
        smallest = con.execute(
            "SELECT provider_code FROM haven.hospital_episodes GROUP BY 1 ORDER BY count(DISTINCT pid), 1 LIMIT 1"
        ).fetchone()[0]
        base = run.outputs["hospital_admissions"]
        sql = (
            "SELECT m.month, count(DISTINCT h.pid) AS people FROM haven.hospital_episodes h JOIN reporting_months m "
            "ON h.admission_date BETWEEN m.month AND m.month_end {where} GROUP BY ALL"
        )
        a = base.model_copy(update={"name": "diff_all", "dimensions": base.dimensions[:1], "sql": sql.format(where="")})
        without = sql.format(where=f"WHERE provider_code <> '{smallest}'")
        b = a.model_copy(update={"name": "diff_without", "sql": without})
        build_output(con, a, run.registry)
        build_output(con, b, run.registry)
        pairs = con.execute(
            "SELECT a.month, a.people, b.people FROM published.diff_all a JOIN published.diff_without b USING (month) "
            "WHERE a.people IS NOT NULL AND b.people IS NOT NULL"
        ).fetchall()
        truth = dict(
            con.execute(
                "SELECT CAST(date_trunc('month', admission_date) AS DATE), count(DISTINCT pid) "
                "FROM haven.hospital_episodes "
                "WHERE provider_code = ? GROUP BY 1",
                [smallest],
            ).fetchall()
        )
        con.execute("DROP TABLE published.diff_all")
        con.execute("DROP TABLE published.diff_without")
    assert pairs
    for month, pa, pb in pairs:
        (alo, ahi), (blo, bhi) = true_range(pa, Policy()), true_range(pb, Policy())
        window = range(max(0, alo - bhi), ahi - blo + 1)
        assert truth.get(month, 0) in window or truth.get(month, 0) == 0
        assert len(window) >= 5, f"{month}: the excluded provider's count is pinned to {list(window)}"


# --- blocking: a violating output or a guard finding stops publication in the same run ------


def copy_haven(run: Run, dest: Path, monkeypatch: pytest.MonkeyPatch) -> Home:
    shutil.copytree(run.home.root, dest)
    home = Home(dest)
    for path in home.published.iterdir():
        if path.is_file():
            path.unlink()
    monkeypatch.setenv("SAFEHAVEN_HOME", str(dest))
    return home


def test_a_violating_output_blocks_publication_in_the_same_run(
    run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = copy_haven(run, tmp_path / "haven", monkeypatch)
    import safehaven.publish.outputs as core

    real = core.protect

    def broken_protect(con, source, target, dimensions, **kwargs):  # type: ignore[no-untyped-def]
        report = real(con, source, target, dimensions, **kwargs)
        name = target.split(".", 1)[1]
        con.execute(
            f"CREATE OR REPLACE TEMP TABLE {name} AS SELECT *, CAST(NULL AS VARCHAR) AS suppressed FROM {source}"
        )
        return report

    monkeypatch.setattr(core, "protect", broken_protect)
    import safehaven.publish.reuse as reuse

    monkeypatch.setattr(reuse, "code_sha", lambda: "the broken protection is new code")  # so outputs rebuild
    keys = [published_key(n) for n in run.outputs] + [PUBLISHED_FILES]
    result = materialize_stages(
        stage_assets(run.registry), resources={"haven": SafeHavenResource()}, selection=keys, raise_on_error=False
    )
    assert not result.success
    failed = {e.check_name for e in result.get_asset_check_evaluations() if not e.passed}
    assert "hospital_admissions_disclosure_safe" in failed
    done = {
        e.event_specific_data.materialization.asset_key  # type: ignore[union-attr]
        for e in result.get_asset_materialization_events()
    }
    assert PUBLISHED_FILES not in done
    assert not [p for p in home.published.iterdir() if p.is_file()], "no published file was written"


def test_an_output_carrying_pseudonyms_is_refused_by_the_guard(
    run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The dimension is named pid and holds the trusts: since a values domain is exactly its declared
    # values, SQL emitting h.pid under it is refused by the build before the guard could see it
    # (tests/unit/test_outputs.py::test_a_values_or_code_list_domain_is_exactly_its_declared_values).
    home = copy_haven(run, tmp_path / "haven", monkeypatch)
    contracts = tmp_path / "contracts"
    shutil.copytree(run.registry.root, contracts)
    (contracts / "outputs" / "leaky.yaml").write_text(
        (contracts / "outputs" / "hospital_admissions.yaml")
        .read_text()
        .replace("name: hospital_admissions", "name: leaky")
        .replace("name: provider_code", "name: pid")
        .replace("h.provider_code", "h.provider_code AS pid")
    )
    monkeypatch.setenv("SAFEHAVEN_CONTRACTS", str(contracts))
    registry = ContractRegistry(contracts)
    resource = SafeHavenResource(contracts=str(contracts))
    result = materialize_stages(
        stage_assets(registry),
        resources={"haven": resource},
        selection=[published_key("leaky"), PUBLISHED_FILES],
        raise_on_error=False,
    )
    assert not result.success
    guard = next(e for e in result.get_asset_check_evaluations() if e.check_name == "leaky_publication_guard")
    assert not guard.passed
    findings = guard.metadata["first_findings"].value
    assert "'pid'" in findings and "pseudonym" in findings
    assert not any(pid in findings for pid in run.pids), "findings never repeat a value"
    assert not [p for p in home.published.iterdir() if p.is_file()]


def test_reporting_period_ends_with_the_last_complete_month(run: Run) -> None:
    st = json.loads((run.home.published / "hospital_admissions.quality.json").read_text())
    end = date.fromisoformat(st["accuracy"]["reporting_period"]["end"])
    assert end < haven_today().replace(day=1)
    assert st["timeliness_and_punctuality"]["days_from_period_end_to_publication"] >= 1


# --- a night with nothing new: outputs reused, the publication not re-issued (issue 22) -----


def rerun_outputs(run: Run, dest: Path, monkeypatch: pytest.MonkeyPatch) -> dg.ExecuteInProcessResult:
    """Run the aggregate and publish stages again on ``dest`` (a copy of the run's haven)."""
    monkeypatch.setenv("SAFEHAVEN_HOME", str(dest))
    keys = [published_key(n) for n in run.outputs] + [PUBLISHED_FILES]
    result = materialize_stages(stage_assets(run.registry), resources={"haven": SafeHavenResource()}, selection=keys)
    assert result.success
    return result


def rebuilt(result: dg.ExecuteInProcessResult) -> dict[str, bool]:
    """Per output: whether this run rebuilt it (False: reused, nothing it reads changed)."""
    found = {}
    for event in result.get_asset_materialization_events():
        mat = event.event_specific_data.materialization  # type: ignore[union-attr]
        if "rebuilt" in mat.metadata:
            found[mat.asset_key.path[-1]] = mat.metadata["rebuilt"].value
    return found


def publish_metadata(result: dg.ExecuteInProcessResult) -> dict[str, object]:
    for event in result.get_asset_materialization_events():
        mat = event.event_specific_data.materialization  # type: ignore[union-attr]
        if mat.asset_key == PUBLISHED_FILES:
            return {k: v.value for k, v in mat.metadata.items()}
    raise AssertionError("published files were not materialised")


def published_tables(home: Home, names: list[str]) -> dict[str, list[tuple]]:
    with Store(home).connect(read_only=True) as con:
        return {n: sorted(con.execute(f"SELECT * FROM published.{n}").fetchall(), key=repr) for n in names}


def file_hashes(folder: Path) -> dict[str, str]:
    from safehaven.core.files import sha256_file

    return {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}


def test_a_night_with_nothing_new_reuses_every_output_and_does_not_reissue_the_publication(
    run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / "haven"
    shutil.copytree(run.home.root, dest)
    before = file_hashes(Home(dest).published)
    old_manifest = json.loads((dest / "published" / "release.json").read_text())
    with Store(Home(dest)).connect(read_only=True) as con:
        register_rows = con.execute("SELECT count(*) FROM governance.publication_contents").fetchone()[0]
    result = rerun_outputs(run, dest, monkeypatch)
    assert rebuilt(result) == {n: False for n in run.outputs}
    meta = publish_metadata(result)
    assert meta["unchanged"] is True
    manifest = json.loads((dest / "published" / "release.json").read_text())
    assert meta["release_id"] == manifest["release_id"] == old_manifest["release_id"]
    assert manifest["files"] == old_manifest["files"]
    assert manifest["audit_head"]["seq"] >= old_manifest["audit_head"]["seq"], "it carries tonight's audit head"
    after = file_hashes(Home(dest).published)
    del before["release.json"], after["release.json"]
    assert after == before, "not one published file was rewritten"
    with Store(Home(dest)).connect(read_only=True) as con:
        assert con.execute("SELECT count(*) FROM governance.publication_contents").fetchone()[0] == register_rows
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks and all(checks.values()), "the checks ran again on the reused tables, and pass"


def test_reused_outputs_equal_a_full_rebuild_over_the_same_history(
    run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / "haven"
    shutil.copytree(run.home.root, dest)
    reused = rerun_outputs(run, dest, monkeypatch)
    assert not any(rebuilt(reused).values())
    tables = published_tables(Home(dest), list(run.outputs))
    import safehaven.publish.reuse as reuse

    monkeypatch.setattr(reuse, "code_sha", lambda: "a new version of the code")  # every output rebuilt
    full = rerun_outputs(run, dest, monkeypatch)
    assert all(rebuilt(full).values()) and set(rebuilt(full)) == set(run.outputs)
    assert published_tables(Home(dest), list(run.outputs)) == tables


def test_a_changed_haven_table_rebuilds_the_outputs_that_read_it_and_republishes(
    run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / "haven"
    shutil.copytree(run.home.root, dest)
    with Store(Home(dest)).connect() as con:  # as a disposal of one batch's records would
        con.execute("DELETE FROM haven.social_care WHERE _row IN (SELECT _row FROM haven.social_care LIMIT 25)")
    result = rerun_outputs(run, dest, monkeypatch)
    reads_social_care = {n for n, o in run.outputs.items() if "social_care" in o.collections}
    assert reads_social_care
    assert rebuilt(result) == {n: n in reads_social_care for n in run.outputs}
    assert publish_metadata(result)["unchanged"] is False


def test_an_altered_protected_table_or_a_missing_file_is_put_right(
    run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / "haven"
    shutil.copytree(run.home.root, dest)
    name = next(iter(run.outputs))
    with Store(Home(dest)).connect() as con:  # an edit behind the pipeline's back
        con.execute(f"DELETE FROM published.{name} WHERE rowid IN (SELECT rowid FROM published.{name} LIMIT 1)")
    (dest / "published" / f"{next(reversed(run.outputs))}.csv").unlink()
    result = rerun_outputs(run, dest, monkeypatch)
    assert rebuilt(result)[name] is True
    assert publish_metadata(result)["unchanged"] is False
    assert (dest / "published" / f"{next(reversed(run.outputs))}.csv").is_file()
