"""The Dagster definitions load, and the nightly job, schedule and sensor are wired."""

import dagster as dg

from assets.definitions import build_definitions, defs


def test_definitions_load() -> None:
    dg.Definitions.validate_loadable(defs)


def test_nightly_job_covers_every_stage() -> None:
    job = defs.resolve_job_def("nightly")
    groups = {defs.resolve_assets_def(key).group_names_by_key[key] for key in job.asset_layer.executable_asset_keys}
    assert {"ingest", "validate", "objections", "pseudonymise", "aggregate", "publish"} <= groups


def test_nightly_schedule_runs_at_two_in_london() -> None:
    schedule = defs.resolve_schedule_def("nightly_0200_london")
    assert schedule.cron_schedule == "0 2 * * *"
    assert schedule.execution_timezone == "Europe/London"
    assert schedule.job_name == "nightly"


def test_sensor_on_incoming_starts_the_nightly_job(home) -> None:
    sensor = defs.resolve_sensor_def("incoming_sensor")
    ctx = dg.build_sensor_context()
    assert isinstance(sensor(ctx), dg.SkipReason)
    drop = home.incoming_for("gp_events")
    drop.mkdir(parents=True)
    (drop / "gp_events_20260101.csv").write_text("practice_code\n")
    ctx = dg.build_sensor_context()
    result = sensor(ctx)
    assert isinstance(result, dg.RunRequest)
    again = sensor(dg.build_sensor_context(cursor=ctx.cursor))
    assert isinstance(again, dg.SkipReason), "the same files must not start a second run"


def test_every_store_asset_shares_the_single_writer_pool() -> None:
    built = build_definitions()
    job = built.resolve_job_def("nightly")
    for key in job.asset_layer.executable_asset_keys:
        assert built.resolve_assets_def(key).node_def.pool == "safehaven_store"


def test_instance_settings_limit_the_store_pool_to_one(tmp_path) -> None:
    import shutil
    from pathlib import Path

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
