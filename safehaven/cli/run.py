"""``safehaven run``: one nightly run, followed to the end, then a summary of every asset.

With ``$DAGSTER_HOME`` set (``make run`` sets it), the run is a real run of the code location
through that instance (``assets.runner.launch_nightly``): the UI lists it under the nightly
job. Without it, the job runs in this process on a temporary instance. The terminal shows
progress and the summary only; ``--verbose`` adds the run's event log.

When ``incoming/`` is empty (and not ``--no-demo``) it generates a synthetic demo drop and, on
that demo path only, adopts the project's example agreements' ``approval:`` blocks as
"demo set-up (make run)", audited and printed (:func:`adopt_demo_agreements`): a file's block
alone approves nothing (``safehaven.share.approvals``), so a normal run never does this.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path

import click

from safehaven.cli import keys
from safehaven.cli.common import ensure_home, fail
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


def parse_months(value: str | None) -> tuple[str, str] | None:
    """``--months FIRST[:LAST]``: reporting months as partition keys (``2026-03-01``); usage error otherwise."""
    if value is None:
        return None
    first, _, last = value.partition(":")
    try:
        start, end = date.fromisoformat(first), date.fromisoformat(last or first)
    except ValueError:
        raise click.BadParameter("give months as FIRST[:LAST], each the first day of a month (2026-03-01)") from None
    if start.day != 1 or end.day != 1 or end < start:
        raise click.BadParameter("each month is its first day (2026-03-01), and LAST is not before FIRST")
    return start.isoformat(), end.isoformat()


def check_instance_home() -> None:
    """Refuse in one line, before anything is set up, a ``$DAGSTER_HOME`` that is not a folder
    (Dagster's own error is a traceback): say how to make it, or to run without it."""
    named = os.environ.get("DAGSTER_HOME")
    if named and not Path(named).is_dir():
        fail(
            f"$DAGSTER_HOME ({named}) is not a folder: create it (mkdir -p, and copy deploy/dagster.yaml into it for "
            "the project's instance settings, as make run does), or unset DAGSTER_HOME to run on a temporary instance"
        )


def check_months(months: tuple[str, str] | None) -> None:
    """Refuse months the haven has not counted yet (they are not partitions: ``assets.partitions``),
    and months without the instance that knows them; before the run changes anything."""
    import dagster as dg

    from assets.partitions import REPORTING_MONTHS

    if months is None:
        return
    if not os.environ.get("DAGSTER_HOME"):
        fail("--months needs the instance that knows the haven's months: set DAGSTER_HOME")
    with dg.DagsterInstance.get() as instance:
        known = instance.get_dynamic_partitions(REPORTING_MONTHS.name)
    missing = [m for m in dict.fromkeys(months) if m not in known]
    if missing:
        fail(
            f"no reporting month {', '.join(missing)} in this haven yet (months are added as the data reach "
            f"them; known: {min(known) + ' to ' + max(known) if known else 'none, run safehaven run first'})"
        )


def _execute(home: Home, verbose: bool, in_process: bool, months: tuple[str, str] | None = None):
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
            ok, stages = run_nightly(home, instance, report=_recovered, months=months)
            return ok, stages, None
        return launch_nightly(instance, home, progress=click.echo, verbose=verbose, months=months)


#: who adopts the project's example agreements on a demo haven (named in the store and the audit)
DEMO_ADOPTER = "demo set-up (make run)"
DEMO_REASON = (
    "synthetic demo drop generated by safehaven run: the project's example agreements are adopted "
    "so the demo shows releases; a real haven's governance lead approves each agreement"
)


def adopt_demo_agreements(home: Home) -> None:
    """On the demo path only (a synthetic drop was just generated): adopt the project's example
    agreements' approval blocks, audibly and audited, as :data:`DEMO_ADOPTER` (Caldicott 1;
    ``safehaven.share.approvals``: a file's block alone approves nothing). Agreements that
    already have a decision are left as they are. Never called by a normal ``safehaven run``."""
    from safehaven.cli.governance import adopt_in_store
    from safehaven.core.registers import current_actor
    from safehaven.core.store import Store

    click.echo(f"demo set-up: adopting the example agreements' approvals as {DEMO_ADOPTER!r} (audited)")
    with Store(home).connect() as con:
        adopt_in_store(con, home, None, DEMO_ADOPTER, DEMO_REASON, actor=current_actor())


@contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """SIGTERM (``kill``, a service manager stopping the command) ends ``safehaven run`` as Ctrl-C
    does: the command unwinds and shuts down the code location's server it started. Python's
    default ended the command alone, and the server ran on for about 90 s, until its heartbeat
    ran out. The handler before is put back when the command ends (a test's process keeps its own)."""

    def stop(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"stopped by signal {signum}")

    before = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _night(demo_patients: int, seed: int, no_demo: bool, verbose: bool, in_process: bool, months: str | None) -> None:
    """``safehaven run``'s work (its options, as the command takes them)."""
    month_range = parse_months(months)
    check_instance_home()
    check_months(month_range)  # before anything is set up or generated
    home = ensure_home()
    keys.ensure_vault(home)  # refuses an unsealed private key; on a new haven the custodian creates the pair
    if not no_demo and not _has_files(home.incoming):
        from safehaven.tools import synthetic  # here: numpy and polars, for the demo drop only

        counts = synthetic.generate(home.incoming, patients=demo_patients, seed=seed)
        click.echo(
            f"generated a synthetic demo drop in {home.incoming}: " + ", ".join(f"{k} {v:,}" for k, v in counts.items())
        )
        adopt_demo_agreements(home)
    ok, stages, run_id = _execute(home, verbose, in_process, month_range)
    print_summary(stages, home)
    if run_id:
        click.echo(f"run:         {run_id} (make ui: Runs)")
    if not ok:
        click.echo(
            "\nthe run did not complete cleanly: see the failed checks above and the Dagster UI (make ui)", err=True
        )
        sys.exit(1)


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
    @click.option(
        "--no-demo",
        is_flag=True,
        help="Never generate a demo drop (nor adopt the example agreements' approvals for it).",
    )
    @click.option("--verbose", is_flag=True, help="Also show the run's event log.")
    @click.option(
        "--months",
        metavar="FIRST[:LAST]",
        help="Also count these reporting months again (first days, e.g. 2026-03-01:2026-05-01): the run is "
        "one run of those partitions, as a backfill in the UI makes.",
    )
    @click.option(
        "--in-process",
        is_flag=True,
        help="Run the job in this process on the instance instead of launching it (debugging, crash tests).",
    )
    def run(demo_patients: int, seed: int, no_demo: bool, verbose: bool, in_process: bool, months: str | None) -> None:
        """Run the whole nightly job once, then say what it did and where the outputs are."""
        with _stop_on_sigterm():
            _night(demo_patients, seed, no_demo, verbose, in_process, months)
