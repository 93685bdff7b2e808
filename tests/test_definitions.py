"""The Dagster definitions load, and the nightly job, schedule and sensor are wired."""

import os
from pathlib import Path

import dagster as dg

from assets import keys, partitions
from assets.catalog import IDENTIFIABILITY_TAG, STAGE_TAG
from assets.definitions import build_definitions, build_definitions_for, defs
from assets.keys import PUBLISHED_FILES
from resources.haven import SafeHavenResource
from safehaven.intake.contracts import ContractRegistry
from safehaven.intake.ingest import drop_key
from safehaven.publish.outputs import load_outputs


def test_definitions_load() -> None:
    dg.Definitions.validate_loadable(defs)


def test_a_night_covers_every_stage_intake_per_collection_then_the_nightly_job() -> None:
    """Issue 20: each collection's intake job lands and validates its drops; the nightly job does
    every stage after intake; between them every asset of the graph is in a night's jobs."""
    graph = defs.resolve_asset_graph()
    nightly = defs.resolve_job_def("nightly").asset_layer.executable_asset_keys
    stages = {graph.get(key).tags[STAGE_TAG] for key in nightly}
    assert {"objections", "pseudonymise", "aggregate", "publish", "release"} <= stages
    assert not stages & {"ingest", "validate"}
    covered = set(nightly)
    for collection in ContractRegistry().contracts:
        intake = defs.resolve_job_def(f"intake_{collection}")
        assert set(intake.asset_layer.executable_asset_keys) == {keys.landing(collection), keys.validated(collection)}
        assert intake.partitions_def == partitions.drops(collection)
        covered |= set(intake.asset_layer.executable_asset_keys)
    assert covered == set(graph.get_all_asset_keys())


def test_every_asset_has_a_distinct_label_and_its_group_is_the_first_part_of_its_key() -> None:
    """The UI labels an asset by its key's last part: no two assets share one (issue 20)."""
    graph = build_definitions().resolve_asset_graph()
    groups = {
        keys.LANDING,
        keys.VALIDATED,
        keys.HAVEN,
        keys.COUNTS,
        keys.VAULT,
        keys.GOVERNANCE,
        keys.PUBLISHED,
        keys.RELEASE,
    }
    labels: dict[str, list[str]] = {}
    for key in graph.get_all_asset_keys():
        assert len(key.path) == 2, key
        assert graph.get(key).group_name == key.path[0] == keys.group(key), key
        assert keys.group(key) in groups, key
        labels.setdefault(keys.label(key), []).append(key.to_user_string())
    assert not {label: ks for label, ks in labels.items() if len(ks) > 1}
    gp_events = {"gp_events_landed", "gp_events_valid", "gp_events_haven", "gp_events_vault"}
    assert gp_events | {"published_files", "objection_register", "gp_activity", "gp_activity_counts"} <= set(labels)


def test_intake_is_partitioned_by_drop_counting_by_reporting_month_and_nothing_else_is() -> None:
    """Issue 20 (partitions that fit the data; ``assets.partitions``): a collection's landing and
    validation by its drops, counting by month; protection is whole-table (CoP 34b), so
    ``published/<output>`` reads every month's counts, and the stages between are unpartitioned."""
    graph = defs.resolve_asset_graph()
    partitioned = {key for key in graph.get_all_asset_keys() if graph.get(key).partitions_def is not None}
    counting = {keys.counts(name) for name in load_outputs(ContractRegistry())}
    collections = ContractRegistry().contracts
    intake = {key for c in collections for key in (keys.landing(c), keys.validated(c))}
    assert partitioned == counting | intake
    for key in counting:
        assert graph.get(key).partitions_def == partitions.REPORTING_MONTHS
        (child,) = graph.get(key).child_keys
        assert child == keys.published(keys.label(key).removesuffix("_counts"))
    for c in collections:
        assert graph.get(keys.landing(c)).partitions_def == graph.get(keys.validated(c)).partitions_def
        assert graph.get(keys.landing(c)).partitions_def == partitions.drops(c)
    assert defs.resolve_job_def("nightly").partitions_def == partitions.REPORTING_MONTHS


def test_every_asset_has_owners_and_a_code_version_from_its_contract() -> None:
    graph = defs.resolve_asset_graph()
    registry = ContractRegistry()
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        assert node.owners and all(o.startswith("team:") or "@" in o for o in node.owners), key
        if key != PUBLISHED_FILES:
            assert node.code_version, f"{key.to_user_string()} has no code version"
    gp = graph.get(keys.landing("gp_events"))
    assert gp.code_version == registry.contracts["gp_events"].version
    assert gp.owners == ["team:data-engineering"]


def test_every_table_asset_declares_its_columns_with_their_identifiability() -> None:
    graph = defs.resolve_asset_graph()
    registry = ContractRegistry()
    tables = {keys.LANDING, keys.VALIDATED, keys.HAVEN, keys.VAULT, keys.PUBLISHED}
    for key in graph.get_all_asset_keys():
        if keys.group(key) in tables and key != PUBLISHED_FILES:
            schema = graph.get(key).metadata["dagster/column_schema"]
            assert schema.columns and all(c.tags.get(IDENTIFIABILITY_TAG) for c in schema.columns), key
    landing = {c.name: c.tags[IDENTIFIABILITY_TAG] for c in _schema(graph, keys.landing("gp_events")).columns}
    assert landing["nhs_number"] == "direct_identifier"
    haven = {c.name: c.tags[IDENTIFIABILITY_TAG] for c in _schema(graph, keys.haven("gp_events")).columns}
    assert "nhs_number" not in haven and haven["pid"] == "pseudonym"
    assert set(landing) == {f.name for f in registry.contracts["gp_events"].fields}


def _schema(graph, key: dg.AssetKey) -> dg.TableSchema:
    return graph.get(key).metadata["dagster/column_schema"]


def test_published_outputs_are_stale_past_their_timeliness_target() -> None:
    graph = defs.resolve_asset_graph()
    policy = graph.get(keys.published("gp_activity")).freshness_policy
    assert policy is not None and policy.fail_window.to_timedelta().days == 35


def test_code_location_is_named_safehaven() -> None:
    import yaml

    workspace = yaml.safe_load((Path(__file__).parent.parent / "workspace.yaml").read_text())
    assert workspace["load_from"][0]["python_module"]["location_name"] == "safehaven"


def test_each_intake_job_runs_at_a_quarter_to_two_in_london_without_a_partition() -> None:
    """A drop whose sensor-started run failed, or a batch landed and not validated, is taken up
    before the nightly job, with no one stepping in (``assets.automation.intake_schedules``)."""
    for collection in ContractRegistry().contracts:
        schedule = defs.resolve_schedule_def(f"intake_{collection}_0145_london")
        assert schedule.job_name == f"intake_{collection}"
        assert (schedule.cron_schedule, schedule.execution_timezone) == ("45 1 * * *", "Europe/London")
        assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING


def test_nightly_schedule_runs_at_two_in_london() -> None:
    schedule = defs.resolve_schedule_def("nightly_0200_london")
    assert schedule.cron_schedule == "0 2 * * *"
    assert schedule.execution_timezone == "Europe/London"
    assert schedule.job_name == "nightly"


def test_sensor_adds_each_drop_starts_its_intake_run_then_the_nightly_job(home) -> None:
    """Issue 20: each file waiting is a drop, added as a partition of its collection's drops and
    given its own intake run; the nightly job is asked for after them, once per set of files."""
    sensor = defs.resolve_sensor_def("incoming_sensor")
    haven = {"haven": SafeHavenResource(home=str(home.root))}
    with dg.build_sensor_context(resources=haven) as ctx:
        assert isinstance(sensor(ctx), dg.SkipReason)
    drop = home.incoming_for("gp_events")
    drop.mkdir(parents=True)
    for name in ("gp_events_20260101.csv", "gp_events_20260102.csv"):
        (drop / name).write_text("practice_code\n")
        os.utime(drop / name, (0, 0))  # written long ago: not still arriving
    with dg.build_sensor_context(resources=haven) as ctx:
        result = sensor(ctx)
    assert isinstance(result, dg.SensorResult)
    *intake, nightly = result.run_requests
    wanted = [drop_key(drop / "gp_events_20260101.csv"), drop_key(drop / "gp_events_20260102.csv")]
    assert [(r.job_name, r.partition_key) for r in intake] == [("intake_gp_events", k) for k in wanted]
    assert wanted[0].startswith("gp_events_20260101.csv@")
    assert nightly.job_name == "nightly" and nightly.partition_key is None
    (added,) = result.dynamic_partitions_requests
    assert added.partitions_def_name == "drops_gp_events" and list(added.partition_keys) == wanted
    with dg.build_sensor_context(cursor=ctx.cursor, resources=haven) as again:
        assert isinstance(sensor(again), dg.SkipReason), "the same files must not start a second run"
    assert not home.store_file.exists(), "evaluating the sensor opens no store"


def test_the_sensor_starts_no_run_for_a_file_waiting_for_its_control_file(home, tmp_path) -> None:
    """A collection whose contract asks for control files (``control: manifest``): a data file is a
    drop only once its control file is there (a run before would land nothing, and its run key
    would never start it again), and the control file is never a drop of its own."""
    import shutil

    contracts = tmp_path / "data_contracts"
    shutil.copytree(ContractRegistry().root, contracts)
    with open(contracts / "collections" / "gp_events.yaml", "a") as fh:
        fh.write("control: manifest\n")
    sensor = build_definitions_for(ContractRegistry(contracts)).resolve_sensor_def("incoming_sensor")
    haven = {"haven": SafeHavenResource(home=str(home.root))}
    drop = home.incoming_for("gp_events")
    drop.mkdir(parents=True)
    (drop / "gp_events_20260101.csv").write_text("practice_code\n")
    with dg.build_sensor_context(resources=haven) as ctx:
        assert isinstance(sensor(ctx), dg.SkipReason)
    (drop / "gp_events_20260101.csv.ctl.json").write_text('{"rows": 1}')
    with dg.build_sensor_context(resources=haven) as ctx:
        result = sensor(ctx)
    assert isinstance(result, dg.SensorResult)
    *intake, _nightly = result.run_requests
    assert [r.partition_key for r in intake] == [drop_key(drop / "gp_events_20260101.csv")]


def test_the_sensor_watches_the_incoming_folder_of_the_resources_home(home, tmp_path) -> None:
    from safehaven.core.home import Home

    sensor = defs.resolve_sensor_def("incoming_sensor")
    elsewhere = Home(tmp_path / "elsewhere")  # the resource's home, not $SAFEHAVEN_HOME
    haven = {"haven": SafeHavenResource(home=str(elsewhere.root))}
    drop = home.incoming_for("gp_events")
    drop.mkdir(parents=True)
    (drop / "gp_events_20260101.csv").write_text("practice_code\n")
    with dg.build_sensor_context(resources=haven) as context:
        assert isinstance(sensor(context), dg.SkipReason)
    elsewhere.incoming_for("gp_events").mkdir(parents=True)
    (elsewhere.incoming_for("gp_events") / "gp_events_20260101.csv").write_text("practice_code\n")
    os.utime(elsewhere.incoming_for("gp_events") / "gp_events_20260101.csv", (0, 0))
    with dg.build_sensor_context(resources=haven) as context:
        assert isinstance(sensor(context), dg.SensorResult)


def test_every_store_asset_shares_the_single_writer_pool() -> None:
    built = build_definitions()
    job = built.resolve_job_def("nightly")
    for key in job.asset_layer.executable_asset_keys:
        assert built.resolve_assets_def(key).node_def.pool == "safehaven_store"


def test_instance_settings_limit_the_store_pool_to_one(tmp_path, monkeypatch) -> None:
    import shutil
    from pathlib import Path

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))  # where deploy/dagster.yaml places the storage
    shutil.copy(Path(__file__).parent.parent / "deploy" / "dagster.yaml", tmp_path / "dagster.yaml")
    instance = dg.DagsterInstance.from_config(str(tmp_path))
    try:
        config = instance.get_concurrency_config()
        assert config.pool_config.default_pool_limit == 1
        limits = config.run_queue_config.tag_concurrency_limits
        assert {"key": "safehaven/store", "limit": 1} in limits
    finally:
        instance.dispose()


def test_publication_agreement_gets_no_second_release_asset() -> None:
    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert "published/discharge_to_social_care" in keys
    assert "release/anon-linked-stats" not in keys
    assert "release/research-hes-asc-linked" in keys


def test_loading_the_code_location_imports_no_numerical_libraries() -> None:
    """Issue 22: every process that loads the definitions (the code server, each run worker)
    does not pay for numpy, scipy or pyarrow; the steps that use them import them."""
    import subprocess
    import sys

    heavy = ("numpy", "scipy", "pyarrow", "great_expectations")
    code = f"import sys, assets.definitions; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_definitions_are_built_once_while_nothing_they_read_changes(tmp_path, monkeypatch) -> None:
    import shutil

    from safehaven.cli.common import CONTRACTS_ENV

    assert build_definitions() is build_definitions()
    contracts = tmp_path / "data_contracts"
    shutil.copytree(ContractRegistry().root, contracts)
    monkeypatch.setenv(CONTRACTS_ENV, str(contracts))
    first = build_definitions()
    assert build_definitions() is first
    code_list = sorted((contracts / "code_lists").glob("*.yaml"))[0]
    code_list.write_text(code_list.read_text() + "\n# edited\n")  # any file changed: built again
    again = build_definitions()
    assert again is not first and build_definitions() is again


def test_an_output_whose_name_makes_a_taken_label_is_refused_when_the_definitions_load(tmp_path) -> None:
    """Label uniqueness holds when the definitions load, not only in this suite: an output named
    like a collection's haven asset is refused, naming both assets."""
    import shutil

    import pytest

    contracts = tmp_path / "data_contracts"
    shutil.copytree(ContractRegistry().root, contracts)
    source = contracts / "outputs" / "gp_activity.yaml"
    clash = contracts / "outputs" / "gp_events_haven.yaml"
    clash.write_text(source.read_text().replace("name: gp_activity", "name: gp_events_haven"))
    with pytest.raises(
        dg.DagsterInvalidDefinitionError,
        match="published/gp_events_haven and haven/gp_events_haven|haven/gp_events_haven and published/gp_events_haven",
    ):
        build_definitions_for(ContractRegistry(contracts))
