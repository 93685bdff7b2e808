"""``safehaven`` commands for outputs: ``safehaven query`` over the published outputs."""

from __future__ import annotations

from pathlib import Path

import click

from safehaven.cli.common import fail, home_from_env


def register(main: click.Group) -> None:
    """Add this area's commands to the CLI."""

    @main.command("query")
    @click.argument("sql")
    @click.option(
        "--format", "fmt", type=click.Choice(["table", "csv", "json", "jsonl"]), default="table", show_default=True
    )
    @click.option(
        "--max-rows",
        type=click.IntRange(min=1),
        default=1000,
        show_default=True,
        help="Rows printed at most (the output says when it was cut).",
    )
    @click.option(
        "--timeout",
        type=click.FloatRange(min=0.1),
        default=60.0,
        show_default=True,
        help="Seconds before the query is stopped.",
    )
    @click.option(
        "--db",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="A published.duckdb with its release.json beside it "
        "(default: $SAFEHAVEN_HOME/published/published.duckdb).",
    )
    def query(sql: str, fmt: str, max_rows: int, timeout: float, db: Path | None) -> None:
        """Run one read-only SELECT against the published (anonymised) outputs only.

        The database is used only while it is the file its release.json records (SHA-256), then
        opened read-only with external access disabled and locked, so the query cannot read
        other files or the store. Tables: one per output, plus
        `dictionary` and `quality`. Example:

          safehaven query "SELECT month, sum(people) FROM hospital_admissions GROUP BY ALL ORDER BY 1"
        """
        from safehaven.publish.query import QueryRefused, format_result, run_query

        path = db or home_from_env().published_db
        try:
            result = run_query(path, sql, max_rows=max_rows, timeout=timeout)
        except QueryRefused as exc:
            fail(f"query refused: {exc}")
        click.echo(format_result(result, fmt), nl=False)
