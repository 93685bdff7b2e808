"""``safehaven run``: one nightly run, followed to the end, then a summary of every asset.

With ``$DAGSTER_HOME`` set (``make run`` sets it), the run is a real run of the code location
through that instance (``assets.runner.launch_nightly``): the UI lists it under the nightly
job. Without it, the job runs in this process on a temporary instance. The terminal shows
progress and the summary only; ``--verbose`` adds the run's event log.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from safehaven.cli import keys
from safehaven.cli.common import ensure_home
from safehaven.core.home import Home


def _has_files(path: Path) -> bool:
    return path.exists() and any(p.is_file() for p in path.rglob("*"))


def _checks(stage) -> str:
    if stage.checks_failed:
        return "FAILED: " + ", ".join(stage.checks_failed)
    if stage.checks_warned:
        return "WARNING: " + ", ".join(stage.checks_warned)
    return f"{stage.checks_passed} passed" if stage.checks_passed else "no checks"


def _count(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def print_summary(stages, home: Home) -> None:
    """Every asset with its rows and checks, notes (skipped releases, grid cells), then where things are."""
    width = max((len(s.asset) for s in stages), default=10)
    click.echo(f"\n{'asset'.ljust(width)}  {'rows in':>12}  {'rows out':>12}  checks")
    for s in sorted(stages, key=lambda s: s.asset):
        click.echo(f"{s.asset.ljust(width)}  {_count(s.rows_in):>12}  {_count(s.rows_out):>12}  {_checks(s)}")
        if s.note:
            click.echo(f"{''.ljust(width)}  {s.note}")
    warnings = [s for s in stages if s.checks_warned]
    if warnings:
        click.echo(f"\nwarnings: {len(warnings)} (see the checks above and the Dagster UI)")
    click.echo(f"\nhome:        {home.root}")
    click.echo(f"published:   {home.published}  (CSV, Parquet, published.duckdb for analysts)")
    click.echo(f"releases:    {home.root / 'releases'}")
    click.echo(f"quarantine:  {home.quarantine}")
    click.echo(f"registers:   {home.registers}")
    click.echo(f"store:       {home.store_file} (encrypted; key in {home.keys})")


def _recovered(line: str) -> None:
    click.echo(f"recovered: {line}")


def _execute(home: Home, verbose: bool, in_process: bool):
    """Launch through the instance named by ``$DAGSTER_HOME``, or run in this process (no
    ``$DAGSTER_HOME``: on a temporary instance; ``--in-process``: on that instance)."""
    import dagster as dg

    from assets.runner import launch_nightly, run_nightly

    if not os.environ.get("DAGSTER_HOME"):
        click.echo("no DAGSTER_HOME: running in this process on a temporary instance")
        ok, stages = run_nightly(home, report=_recovered)
        return ok, stages, None
    with dg.DagsterInstance.get() as instance:
        if in_process:
            ok, stages = run_nightly(home, instance, report=_recovered)
            return ok, stages, None
        return launch_nightly(instance, home, progress=click.echo, verbose=verbose)


def register(main: click.Group) -> None:
    @main.command()
    @click.option(
        "--demo-patients",
        type=int,
        default=2000,
        show_default=True,
        help="Size of the synthetic demo drop generated when incoming/ is empty.",
    )
    @click.option("--seed", type=int, default=42, show_default=True)
    @click.option("--no-demo", is_flag=True, help="Never generate a demo drop.")
    @click.option("--verbose", is_flag=True, help="Also show the run's event log.")
    @click.option(
        "--in-process",
        is_flag=True,
        help="Run the job in this process on the instance instead of launching it (debugging, crash tests).",
    )
    def run(demo_patients: int, seed: int, no_demo: bool, verbose: bool, in_process: bool) -> None:
        """Run the whole nightly job once, then say what it did and where the outputs are."""
        from safehaven.tools import synthetic

        home = ensure_home()
        keys.ensure_vault(home)  # refuses an unsealed private key; on a new haven the custodian creates the pair
        if not no_demo and not _has_files(home.incoming):
            counts = synthetic.generate(home.incoming, patients=demo_patients, seed=seed)
            click.echo(
                f"generated a synthetic demo drop in {home.incoming}: "
                + ", ".join(f"{k} {v:,}" for k, v in counts.items())
            )
        ok, stages, run_id = _execute(home, verbose, in_process)
        print_summary(stages, home)
        if run_id:
            click.echo(f"run:         {run_id} (make ui: Runs)")
        if not ok:
            click.echo(
                "\nthe run did not complete cleanly: see the failed checks above and the Dagster UI (make ui)", err=True
            )
            sys.exit(1)
