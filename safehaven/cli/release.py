"""``safehaven release``: a release made by the key custodian (identifiable releases).

* ``safehaven release --agreement <id>``: make one release under ``<id>`` now. An identifiable
  release opens the sealed identity-vault key, so the command asks for the key custodian's
  passphrase (``$SAFEHAVEN_CUSTODIAN_PASSPHRASE`` for automation); the nightly run only records
  that one is due (``safehaven.share.due``). Audited as a re-identification and a release.
* ``safehaven release --due``: the identifiable releases waiting for the custodian.
"""

from __future__ import annotations

import click

from safehaven.cli.common import custodian_keyring, ensure_home, fail


def register(main: click.Group) -> None:
    """Add the ``release`` command to the CLI."""

    @main.command("release")
    @click.option("--agreement", "agreement_id", default=None, help="The agreement to release under now.")
    @click.option("--due", "show_due", is_flag=True, help="List identifiable releases waiting for the custodian.")
    def release_cmd(agreement_id: str | None, show_due: bool) -> None:
        """Make a release as the key custodian (the nightly run never writes identifiable extracts)."""
        from safehaven.core import pins
        from safehaven.core.registers import current_actor
        from safehaven.core.store import Store
        from safehaven.intake.contracts import ContractRegistry
        from safehaven.share import due
        from safehaven.share.releases import release

        if not agreement_id and not show_due:
            raise click.UsageError("give --agreement <id> (or --due)")
        home = ensure_home()
        keyring = custodian_keyring(home)  # the passphrase is asked for only if the vault key is opened
        try:
            with Store(home, keyring).connect() as con:
                pins.verify(con, keyring)
                if show_due:
                    for aid, since in due.due(con) or [("nothing is due", "")]:
                        click.echo(f"{aid}  {since}".rstrip())
                    return
                registry = ContractRegistry()
                result = release(
                    con, agreement_id or "", home=home, registry=registry, keyring=keyring, actor=current_actor()
                )
        except Exception as exc:  # reasons name ids and counts only, never values
            fail(f"refused: {exc}")
        if result.status != "released":
            click.echo(result.reason)
            return
        click.echo(
            f"{result.release_id}: {result.records_released} records in {len(result.files)} file(s) (mode 0600), "
            f"{result.records_withheld} withheld for objections -> {result.directory}. Audited."
        )
