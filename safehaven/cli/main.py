"""The ``safehaven`` command: the nightly run and the governance jobs.

Commands never print identifiable values unless the command exists to do so under a
recorded legal basis (re-identification, subject access), and those are audited.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from safehaven.cli import disposal, governance, keys, outputs, release
from safehaven.core.home import Home


@click.group()
def main() -> None:
    """A health-data safe haven run the way the Code of Practice on Confidential Information asks."""


def _has_files(path: Path) -> bool:
    return path.exists() and any(p.is_file() for p in path.rglob("*"))


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
def run(demo_patients: int, seed: int, no_demo: bool) -> None:
    """Materialise the whole nightly job once, then say where the outputs are."""
    from assets.runner import run_nightly
    from safehaven.tools import synthetic

    home = Home.from_env().ensure()
    keys.ensure_vault(home)  # refuses an unsealed private key; on a new haven the custodian creates the pair
    if not no_demo and not _has_files(home.incoming):
        counts = synthetic.generate(home.incoming, patients=demo_patients, seed=seed)
        click.echo(
            f"generated a synthetic demo drop in {home.incoming}: " + ", ".join(f"{k} {v:,}" for k, v in counts.items())
        )
    ok, stages = run_nightly(home)
    width = max((len(s.asset) for s in stages), default=10)
    click.echo(f"\n{'asset'.ljust(width)}  {'rows in':>12}  {'rows out':>12}  checks")
    for s in stages:
        fmt = lambda n: "-" if n is None else f"{n:,}"  # noqa: E731
        checks = "ok"
        if s.checks_warned:
            checks = "WARNING: " + ", ".join(s.checks_warned)
        if s.checks_failed:
            checks = "FAILED: " + ", ".join(s.checks_failed)
        click.echo(f"{s.asset.ljust(width)}  {fmt(s.rows_in):>12}  {fmt(s.rows_out):>12}  {checks}")
    click.echo(f"\nhome:        {home.root}")
    click.echo(f"published:   {home.published}  (CSV, Parquet, published.duckdb for analysts)")
    click.echo(f"quarantine:  {home.quarantine}")
    click.echo(f"registers:   {home.registers}")
    click.echo(f"store:       {home.store_file} (encrypted; key in {home.keys})")
    if not ok:
        click.echo(
            "\nthe run did not complete cleanly: see the failed checks above and the Dagster UI (make ui)", err=True
        )
        sys.exit(1)


for _area in (keys, governance, outputs, disposal, release):
    _area.register(main)


if __name__ == "__main__":  # pragma: no cover
    main()
