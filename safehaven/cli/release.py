"""``safehaven release``: the key custodian prepares an identifiable release for review.

* ``safehaven release --agreement <id>``: prepare one release under ``<id>`` now. An identifiable
  release opens the sealed identity-vault key, so the command asks for the key custodian's
  passphrase (``$SAFEHAVEN_CUSTODIAN_PASSPHRASE`` for automation); the nightly run only records
  that one is due (``safehaven.share.due``). The files are staged and a release request opened
  (``safehaven.share.review``, rule ``two_reviewers_and_custodian``): after two reviewers approve
  it, the custodian delivers it with ``safehaven review release <release-id> --by ...``.
  Audited as a re-identification and a release preparation.
* ``safehaven release --due``: the identifiable releases waiting for the custodian.
"""

from __future__ import annotations

import click

from safehaven.cli.common import (
    USAGE,
    custodian_keyring,
    ensure_home,
    fail,
    haven_from_env,
    objections_window_from_env,
)


def register(main: click.Group) -> None:
    """Add the ``release`` command to the CLI."""

    @main.command("release")
    @click.option("--agreement", "agreement_id", default=None, help="The agreement to prepare a release under now.")
    @click.option("--due", "show_due", is_flag=True, help="List identifiable releases waiting for the custodian.")
    def release_cmd(agreement_id: str | None, show_due: bool) -> None:
        """Prepare a release as the key custodian (the nightly run never builds identifiable extracts)."""
        from safehaven.core import pins
        from safehaven.core.audit import AuditTrailBroken
        from safehaven.core.store import Store
        from safehaven.share import due
        from safehaven.share.releases import PREPARED, RELEASED, prepare

        if not agreement_id and not show_due:
            fail("give --agreement <id> (or --due)", USAGE)
        home = ensure_home()
        keyring = custodian_keyring(home)  # the passphrase is asked for only if the vault key is opened
        try:
            with Store(home, keyring).connect() as con:
                pins.verify(con, keyring)
                if show_due:
                    for aid, since in due.due(con) or [("nothing is due", "")]:
                        click.echo(f"{aid}  {since}".rstrip())
                    return
                result = prepare(
                    con,
                    agreement_id or "",
                    haven=haven_from_env(home, keyring),
                    objections_max_age_days=objections_window_from_env(),
                )
        except AuditTrailBroken:
            raise  # reported by the safehaven group (fails closed)
        except Exception as exc:  # reasons name ids and counts only, never values
            fail(f"refused: {exc}")
        click.echo(result.reason)
        if result.status == PREPARED:
            click.echo(
                f"{result.release_id}: {result.records_released} records in {len(result.files)} file(s) (mode 0600) "
                f"staged in {result.directory}, {result.records_withheld} withheld for objections. Audited.\n"
                f"review it: safehaven review show {result.release_id}; after two reviewers approve, the key "
                f'custodian delivers it: safehaven review release {result.release_id} --by "Name, role"'
            )
        elif result.status == RELEASED:
            click.echo(f"{result.release_id} -> {result.directory}. Audited.")
