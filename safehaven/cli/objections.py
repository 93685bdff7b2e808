"""``safehaven objections`` commands that clear the objection feed's block (safehaven.protect.feed).

* ``safehaven objections faults``: unresolved objections files and rows, whether the register
  differs from its seal (``register_seal_problem``), and the register's refresh date (counts,
  file names and rule ids; never a value); for each, a later clean file of its name, if one
  landed, and the exact command that clears it (``to_clear``).
* ``safehaven objections resolve <file> --by <name> --reason <text> [--corrected-by <sha256>]``:
  a person's decision on a quarantined objections file or its rejected rows, or (with
  ``--corrected-by``) that a later file corrects it; audited. A later file never clears a
  fault by itself (safehaven.protect.feed, "Clearing a fault").
* ``safehaven objections seal --by <name> --reason <text>``: a person's decision that the objection
  register as it now stands is right (after an edit outside the haven was found and undone or
  checked: ``safehaven.protect.register_seal``); audited.
* ``safehaven objections apply-held <drop or batch> --by <name> --reason <text>``: a person's decision
  that the withdrawals held from an objections file sent again (its drop key), or from a new batch
  whose withdrawals were stale (its batch id: dated on or before the register learnt the statement
  they contradict), are genuine; audited, register sealed.
* ``safehaven objections accept-batch <batch> --by <name> --reason <text>``: a person's decision
  that an objections batch whose landed rows differ from their seal is right as it stands
  (``safehaven.intake.batch_seal``); audited, then sealed.
* ``safehaven objections refreshed --as-of <date> --by <name> --reason <text>``: a person
  attests that the register matched the current opt-out list on that date; audited.

The ``objections`` group itself (``record``, ``notify``) is made by ``safehaven.cli.keys``.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import datetime

import click

from safehaven.cli.common import ensure_home, fail, objections_window_from_env, registry_from_env
from safehaven.core.days import haven_today

#: what apply-held says when held withdrawals were superseded (CoP 11-14; a count, never a value)
SUPERSEDED_NOTE = (
    "superseded withdrawals were not applied: the register was told those objections again after they were held "
    "(a newer file or a file sent again); confirm with the sender and have them send a new withdrawal"
)


def register(main: click.Group) -> None:
    """Add the feed commands to the ``objections`` group."""
    group = main.commands["objections"]
    assert isinstance(group, click.Group)

    @group.command("faults")
    def objections_faults() -> None:
        """Unresolved objections files and rows, whether the register matches its seal, and its refresh date."""
        from safehaven.core.store import Store
        from safehaven.intake import batch_seal
        from safehaven.protect import feed, register_seal

        home = ensure_home()
        with Store(home).connect() as con:
            feed.sync_faults(con, home, registry_from_env().contracts)
            faults = feed.unresolved(con)
            refreshed = feed.refreshed_on(con)
            tampered = register_seal.problem(con, home)
            batches, unsound = batch_seal.check(con, feed.COLLECTION, home)
            held = register_seal.held_withdrawals(con)
        click.echo(
            json.dumps(
                {
                    "unresolved": [{**asdict(f), "to_clear": feed.how_to_clear(f)} for f in faults],
                    "register_seal_problem": tampered,
                    "batch_seal_problem": batches,
                    "batches_unsound": [{"batch": b, "why": why} for b, why in unsound.items()],
                    "withdrawals_held": held,
                    "register_refreshed_on": refreshed.isoformat() if refreshed else None,
                    "window_days": objections_window_from_env(),
                },
                indent=2,
            )
        )

    @group.command("resolve")
    @click.argument("file")
    @click.option("--by", "by", required=True, help="Who decides (recorded in the audit trail).")
    @click.option(
        "--reason", required=True, help="Why the file or its rows need not be re-sent, or why the file corrects it."
    )
    @click.option(
        "--corrected-by",
        "corrected_by",
        default=None,
        help="SHA-256 (12+ characters) of a later objections file, landed and validated cleanly, that you judge "
        "re-sends the lost objections (shown by: safehaven objections faults).",
    )
    def objections_resolve(file: str, by: str, reason: str, corrected_by: str | None) -> None:
        """Record a decision on a quarantined objections FILE (its name or SHA-256) or its rejected rows.

        A later file of the same name never clears a fault by itself; with --corrected-by a person
        records that a named later file corrects it.
        """
        from safehaven.core.store import Store
        from safehaven.protect import feed

        home = ensure_home()
        try:
            with Store(home).connect() as con:
                n = feed.resolve(
                    con,
                    home,
                    file,
                    by=by,
                    reason=reason,
                    corrected_by=corrected_by,
                    collections=registry_from_env().contracts,
                )
        except ValueError as exc:
            fail(f"safehaven objections resolve: {exc}")
        click.echo(json.dumps({"resolved": n, "file": file, "corrected_by": corrected_by, "by": by, "audited": True}))

    _register_seal_decisions(group)

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
                feed.attest_refresh(con, as_of.date(), by=by, reason=reason, today=haven_today())
        except ValueError as exc:
            fail(f"safehaven objections refreshed: {exc}")
        click.echo(json.dumps({"refreshed_as_of": as_of.date().isoformat(), "by": by, "audited": True}))


def _register_seal_decisions(group: click.Group) -> None:
    """The decisions on the register's seal and the batches' seals (``seal``, ``apply-held``, ``accept-batch``)."""

    @group.command("seal")
    @click.option("--by", "by", required=True, help="Who decides (recorded in the audit trail).")
    @click.option("--reason", required=True, help="How the register was restored or checked.")
    def objections_seal(by: str, reason: str) -> None:
        """Seal the objection register as it now stands, once a person has restored it or checked a change.

        Record-level releases are refused while the register differs from its last seal (an edit
        made outside the haven); this records the decision (audited) and clears that refusal.
        """
        from safehaven.core.store import Store
        from safehaven.protect import register_seal

        home = ensure_home()
        try:
            with Store(home).connect() as con:
                before = register_seal.problem(con)
                now = register_seal.reseal(con, home, by=by, reason=reason)
        except ValueError as exc:
            fail(f"safehaven objections seal: {exc}")
        click.echo(json.dumps({"sealed": now.as_detail(), "differed": before is not None, "by": by, "audited": True}))

    @group.command("apply-held")
    @click.argument("drop")
    @click.option("--by", "by", required=True, help="Who decides (recorded in the audit trail).")
    @click.option(
        "--reason", required=True, help="How the withdrawals were confirmed as genuine (e.g. with the sender)."
    )
    def objections_apply_held(drop: str, by: str, reason: str) -> None:
        """Apply the withdrawals held from an objections file sent again (its DROP key) or from a new
        batch whose withdrawals were stale (its batch id), as shown by safehaven objections faults, once
        a person has confirmed them; audited, and the register sealed."""
        from safehaven.core.keys import KeyRing
        from safehaven.core.store import Store
        from safehaven.protect import register_seal
        from safehaven.protect.haven import haven_key
        from safehaven.protect.pseudonymise import install_key

        home = ensure_home()
        contract = registry_from_env().objections()
        try:
            with Store(home).connect() as con:
                key = haven_key(con, KeyRing(home.keys), home)
                install_key(con, "haven", key)
                done = register_seal.apply_held_withdrawals(con, contract, drop, key.key_id, home, by=by, reason=reason)
        except ValueError as exc:
            fail(f"safehaven objections apply-held: {exc}")
        shown = {"drop": drop, "events_added": done.added, "superseded": done.superseded, "by": by, "audited": True}
        if done.superseded:
            shown["note"] = SUPERSEDED_NOTE
        click.echo(json.dumps(shown))

    @group.command("accept-batch")
    @click.argument("batch")
    @click.option("--by", "by", required=True, help="Who decides (recorded in the audit trail).")
    @click.option("--reason", required=True, help="How the batch's rows were checked (e.g. with the sender).")
    def objections_accept_batch(batch: str, by: str, reason: str) -> None:
        """Seal an objections BATCH (its id, or 12+ characters of it; or the drop key of a file sent
        again, as shown by safehaven objections faults) whose rows differ from their seal, as they now
        stand, once a person has checked them with the sender; audited. Until then the register does
        not take it in."""
        from safehaven.core.store import Store
        from safehaven.intake import batch_seal
        from safehaven.protect import feed

        home = ensure_home()
        try:
            with Store(home).connect() as con:
                done = batch_seal.accept(con, feed.COLLECTION, batch, home, by=by, reason=reason)
        except ValueError as exc:
            fail(f"safehaven objections accept-batch: {exc}")
        click.echo(json.dumps({**done, "by": by, "audited": True}))
