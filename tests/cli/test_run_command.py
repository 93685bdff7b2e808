"""``safehaven run``: a real run of the code location through the instance, quiet, with a full summary."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import pytest
from click.testing import CliRunner

from assets import keys
from assets.partitions import REPORTING_MONTHS
from safehaven import __version__
from safehaven.cli.common import PASSPHRASE_ENV
from safehaven.cli.main import main
from safehaven.core.home import Home
from safehaven.core.store import Store
from tests.conftest import TEST_PASSPHRASE
from tests.forkserver import ForkServer

ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def _instance(dagster_home: Path) -> Iterator[dg.DagsterInstance]:
    """The run's instance, opened as the ``dagster`` command opens it: $DAGSTER_HOME names it
    (``deploy/dagster.yaml`` places its storage there)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DAGSTER_HOME", str(dagster_home))
        with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
            yield instance


@pytest.fixture(scope="module")
def launched(
    tmp_path_factory: pytest.TempPathFactory, forkserver: ForkServer
) -> tuple[subprocess.CompletedProcess, Path, Path]:
    """One ``safehaven run`` of a small demo drop with its own DAGSTER_HOME (the project's dagster.yaml),
    in a process of its own (a fork of the warm server, ``tests.forkserver``)."""
    tmp = tmp_path_factory.mktemp("run_command")
    dagster_home = tmp / "dagster_home"
    dagster_home.mkdir()
    shutil.copy(ROOT / "deploy" / "dagster.yaml", dagster_home / "dagster.yaml")
    env = {**os.environ, "SAFEHAVEN_HOME": str(tmp / "haven"), "DAGSTER_HOME": str(dagster_home)}
    env[PASSPHRASE_ENV] = TEST_PASSPHRASE  # a new haven: the custodian chooses the vault passphrase
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    command = ["-m", "safehaven.cli.main", "run", "--demo-patients", "300", "--seed", "11"]
    done = forkserver.run(command, env=env, cwd=tmp, timeout=1200)
    return done, dagster_home, tmp / "haven"


@pytest.mark.slow
def test_safehaven_run_is_a_run_of_the_nightly_job_in_the_instance(launched) -> None:
    done, dagster_home, _ = launched
    assert done.returncode == 0, done.stderr[-2000:]
    with _instance(dagster_home) as instance:
        runs = instance.get_runs(filters=dg.RunsFilter(job_name="nightly"))
        assert len(runs) == 1
        run = runs[0]
        assert run.status == dg.DagsterRunStatus.SUCCESS
        assert run.remote_job_origin is not None
        assert run.remote_job_origin.location_name == "safehaven"
        assert run.run_id in done.stdout


@pytest.mark.slow
def test_safehaven_run_prints_progress_and_summary_and_no_event_log(launched) -> None:
    done, _, _ = launched
    out = done.stdout + done.stderr
    assert "DEBUG" not in out and "Deprecation" not in out
    assert re.search(r"\[\s*(\d+)/\1\]", done.stdout), "progress counts every step to the last"
    assert "no checks" in done.stdout, "assets without checks say so"
    assert "skipped: nothing released" in done.stdout and "its file says draft" in done.stdout, (
        "skipped releases give their reason"
    )
    assert "cells of the full grid" in done.stdout
    assert re.search(r"(\d+) of \1 reporting months counted", done.stdout), "a first run counts every month"


@pytest.mark.slow
def test_the_demo_run_adopts_the_example_agreements_audibly_and_releases_under_them(launched) -> None:
    done, _, _ = launched
    assert "demo set-up: adopting the example agreements' approvals as 'demo set-up (make run)'" in done.stdout
    assert "research-hes-asc-linked: adopted as approved by demo set-up (make run)" in done.stdout
    assert "cohort-consent-study: its file's approval block says draft; nothing to adopt" in done.stdout
    assert "release/research-hes-asc-linked" in done.stdout and "release/statutory-gp-audit" in done.stdout
    assert "has not been approved in this haven (its file says approved" not in done.stdout


@pytest.mark.slow
def test_a_month_is_counted_again_by_one_run_of_its_partition(launched, forkserver: ForkServer) -> None:
    """Issue 20: a reporting month is a partition of the counting assets; ``--months`` launches the
    nightly job as one run of it, which recounts it; nothing else changed, so nothing is rebuilt."""
    done, dagster_home, haven = launched
    assert done.returncode == 0, done.stderr[-2000:]
    with _instance(dagster_home) as instance:
        months = instance.get_dynamic_partitions(REPORTING_MONTHS.name)
    assert len(months) >= 3, "the first run added the reporting months"
    env = {**os.environ, "SAFEHAVEN_HOME": str(haven), "DAGSTER_HOME": str(dagster_home)}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    again = forkserver.run(
        ["-m", "safehaven.cli.main", "run", "--no-demo", "--months", months[1]], env=env, cwd=ROOT, timeout=1200
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert "Warning" not in again.stdout + again.stderr
    assert re.search(r"counts/gp_activity_counts[^\n]*\n\s+1 of \d+ reporting months counted\n", again.stdout)
    with _instance(dagster_home) as instance:
        run = instance.get_runs(filters=dg.RunsFilter(job_name="nightly"), limit=1)[0]
        assert run.tags["dagster/partition"] == months[1] and run.status == dg.DagsterRunStatus.SUCCESS
        for name in ("gp_activity", "discharge_to_social_care"):
            records = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=keys.counts(name), asset_partitions=[months[1]]), limit=1
            ).records
            assert records and records[0].run_id == run.run_id, name
            other = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=keys.counts(name), asset_partitions=[months[2]]), limit=1
            ).records
            assert other and other[0].run_id != run.run_id, "a month not asked for is not counted again"
        published = instance.fetch_materializations(keys.published("gp_activity"), limit=1).records[0]
        assert published.run_id == run.run_id
        assert published.asset_materialization.metadata["rebuilt"].value is False, "same counts: reused"


def test_months_are_refused_in_one_line_when_malformed_or_unknown(tmp_path: Path, monkeypatch) -> None:
    runner = CliRunner()
    bad = runner.invoke(main, ["run", "--no-demo", "--months", "2026-03"])
    assert bad.exit_code == 2 and "first day of a month" in bad.output
    backwards = runner.invoke(main, ["run", "--no-demo", "--months", "2026-05-01:2026-03-01"])
    assert backwards.exit_code == 2
    assert runner.invoke(main, ["run", "--no-demo", "--months", ""]).exit_code == 2, "empty is not the whole job"
    monkeypatch.setenv("SAFEHAVEN_HOME", str(tmp_path / "haven"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    monkeypatch.setenv(PASSPHRASE_ENV, TEST_PASSPHRASE)
    unknown = runner.invoke(main, ["run", "--months", "2031-03-01"])
    assert unknown.exit_code == 1, unknown.output
    assert "no reporting month 2031-03-01 in this haven yet" in unknown.output
    assert "Traceback" not in unknown.output
    assert not (tmp_path / "haven").exists(), "refused before any set-up or demo drop"


@pytest.mark.parametrize("made", ["missing", "a file"])
def test_a_dagster_home_that_is_not_a_folder_is_refused_in_one_line_before_any_set_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, made: str
) -> None:
    """Dagster's own error for it was a traceback, after the haven and the demo drop were made."""
    named = tmp_path / "dagster_home"
    if made == "a file":
        named.write_text("")
    monkeypatch.setenv("SAFEHAVEN_HOME", str(tmp_path / "haven"))
    monkeypatch.setenv("DAGSTER_HOME", str(named))
    monkeypatch.setenv(PASSPHRASE_ENV, TEST_PASSPHRASE)
    refused = CliRunner().invoke(main, ["run"])
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    assert f"$DAGSTER_HOME ({named}) is not a folder: create it" in refused.output
    assert "unset DAGSTER_HOME to run on a temporary instance" in refused.output
    assert not (tmp_path / "haven").exists(), "refused before any set-up or demo drop"


@pytest.mark.parametrize("fault", ["anchor history reordered", "key file readable by others"])
def test_a_fault_the_run_would_meet_at_its_start_is_refused_in_one_line_before_launch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    """Two lines of the anchor history swapped (the per-command check reads only the tail) or a key
    file made readable by others: the run's own start refused them, as a Dagster failure with a
    traceback and an empty summary (found by review). ``safehaven run`` now finds them before it
    launches anything, and says so in one line."""
    from safehaven.core import audit, pins
    from safehaven.core.keys import KeyRing

    home = Home(tmp_path / "haven").ensure()
    monkeypatch.setenv("SAFEHAVEN_HOME", str(home.root))
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    with Store(home).connect() as con:
        KeyRing(home.keys).get_or_create("haven")
        pins.verify(con, KeyRing(home.keys))
        for i in range(4):
            audit.append(con, actor="tester", role="pipeline", action="test.entry", object=f"entry:{i}")
    if fault == "key file readable by others":
        (home.keys / "haven.key").chmod(0o644)
        said = "haven.key is accessible by group or others"
    else:
        anchors = home.registers / "audit_anchors.jsonl"
        lines = anchors.read_text().splitlines(True)
        lines[1], lines[2] = lines[2], lines[1]
        anchors.write_text("".join(lines))
        said = "the audit trail failed verification (the anchor)"
    refused = CliRunner().invoke(main, ["run", "--no-demo"])
    assert refused.exit_code != 0 and said in refused.output
    assert "Traceback" not in refused.output and "temporary instance" not in refused.output, "nothing launched"
    assert len(refused.output.strip().splitlines()) == 1


def test_version_is_printed() -> None:
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output


def test_sigterm_ends_the_command_as_ctrl_c_does() -> None:
    """``kill`` (SIGTERM) raises in the command as Ctrl-C does, so the code location's server it
    started is shut down as the command unwinds; Python's default ended the command alone and left
    the server running about 90 s, until its heartbeat ran out (measured here). The handler before
    is put back when the command ends."""
    import signal

    from safehaven.cli.run import _stop_on_sigterm

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt, match="stopped by signal 15"), _stop_on_sigterm():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)  # the handler runs here at the latest
    assert signal.getsignal(signal.SIGTERM) is before
