"""``safehaven objections`` commands that clear the objection feed's block (safehaven.protect.feed).

* ``safehaven objections faults``: unresolved objections files and rows, and the register's
  refresh date (counts, file names and rule ids; never a value).
* ``safehaven objections resolve <file> --by <name> --reason <text>``: a person's decision on
  a quarantined objections file or its rejected rows; audited.
* ``safehaven objections refreshed --as-of <date> --by <name> --reason <text>``: a person
  attests that the register matched the current opt-out list on that date; audited.

The ``objections`` group itself (``record``, ``notify``) is made by ``safehaven.cli.keys``.
"""

from __future__ import annotations

import json
from datetime import date, datetime

import click

from safehaven.cli.common import ensure_home, fail, objections_window_from_env


def register(main: click.Group) -> None:
    """Add the feed commands to the ``objections`` group."""
    group = main.commands["objections"]
    assert isinstance(group, click.Group)

    @group.command("faults")
    def objections_faults() -> None:
        """Unresolved objections files and rows, and the register's refresh date."""
        from safehaven.core.store import Store
        from safehaven.protect import feed

        home = ensure_home()
        with Store(home).connect() as con:
            feed.sync_faults(con, home)
            faults = feed.unresolved(con)
            refreshed = feed.refreshed_on(con)
        click.echo(
            json.dumps(
                {
                    "unresolved": [f.__dict__ for f in faults],
                    "register_refreshed_on": refreshed.isoformat() if refreshed else None,
                    "window_days": objections_window_from_env(),
                },
                indent=2,
            )
        )

    @group.command("resolve")
    @click.argument("file")
    @click.option("--by", "by", required=True, help="Who decides (recorded in the audit trail).")
    @click.option("--reason", required=True, help="Why the file or its rows need not be re-sent.")
    def objections_resolve(file: str, by: str, reason: str) -> None:
        """Record a decision on a quarantined objections FILE (its name or SHA-256) or its rejected rows."""
        from safehaven.core.store import Store
        from safehaven.protect import feed

        home = ensure_home()
        try:
            with Store(home).connect() as con:
                n = feed.resolve(con, home, file, by=by, reason=reason)
        except ValueError as exc:
            fail(f"safehaven objections resolve: {exc}")
        click.echo(json.dumps({"resolved": n, "file": file, "by": by, "audited": True}))

    @group.command("refreshed")
    @click.option("--as-of", "as_of", type=click.DateTime(["%Y-%m-%d"]), required=True)
    @click.option("--by", "by", required=True, help="Who attests (recorded in the audit trail).")
    @click.option("--reason", required=True, help="How the register was checked against the current list.")
    def objections_refreshed(as_of: datetime, by: str, reason: str) -> None:
        """Attest that the objection register matched the current opt-out list on --as-of."""
        from safehaven.core.store import Store
        from safehaven.protect import feed

        home = ensure_home()
        try:
            with Store(home).connect() as con:
                feed.attest_refresh(con, as_of.date(), by=by, reason=reason, today=date.today())
        except ValueError as exc:
            fail(f"safehaven objections refreshed: {exc}")
        click.echo(json.dumps({"refreshed_as_of": as_of.date().isoformat(), "by": by, "audited": True}))
