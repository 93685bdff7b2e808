"""``safehaven`` commands for keys, re-identification and recording objections.

* ``safehaven keys list``: key ids per purpose, current and retired (never material).
* ``safehaven keys rotate --purpose haven|store|vault``: rotate one key (``safehaven.protect.rotation``);
  ``--resume`` finishes or undoes an interrupted rotation, and records late a rotation that was
  installed without its ``key.rotate`` entry (the haven key is refused until then:
  ``safehaven.core.pins.unrecorded_rotations``). Haven and vault rotations open the sealed vault
  private key, so they ask for the key custodian's passphrase.
* ``safehaven keys init-vault``: the key custodian creates the identity vault's key pair, the
  private half sealed under their passphrase (``safehaven.protect.custody``); ``safehaven run``
  does this on a new haven.
* ``safehaven keys seal-vault``: seal a vault private key left unencrypted by an older key ring
  (the pipeline refuses to start on one until this is done).
* ``safehaven keys recover-record``: the key custodian records again the key files a deleted or
  emptied ``keys/keyring.json`` noted, each checked against the store; audited
  (``safehaven.protect.key_record``).
* ``safehaven reidentify --agreement <id> --pseudonym <p> [--pseudonym ...] | --file <f>``:
  the governance lead's re-identification under an agreement that permits identifiable data
  (``safehaven.share.reidentify``), printed as CSV or written to a 0600 file; always audited.
* ``safehaven objections record``: write an objection as a drop in ``incoming/objections/``
  (0600), which the next run validates and registers like any other (CoP 14a).
* ``safehaven objections notify --agreement <id>``: the CoP 14b notice for one recipient
  (``safehaven.protect.optouts.notices``), written under ``releases/<id>/notices/``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TextIO

import click

from safehaven.cli.common import (
    PASSPHRASE_ENV,
    REFUSED,
    contracts_from_env,
    custodian_keyring,
    ensure_home,
    fail,
    haven_from_env,
    registry_from_env,
)
from safehaven.core.days import haven_today
from safehaven.core.home import Home

if TYPE_CHECKING:
    from safehaven.intake.contracts import Contract
    from safehaven.share.reidentify import ReidentifyResult


def ensure_vault(home: Home) -> None:
    """Before a run: refuse an unsealed private key; on a new haven, have the custodian create the
    vault pair (passphrase from the environment or a prompt) and say where its halves went."""
    from safehaven.core.keys import VAULT, KeyRing, KeyRingError
    from safehaven.core.registers import current_actor
    from safehaven.protect.custody import init_vault

    keyring = KeyRing(home.keys)
    try:
        keyring.check_custody()
        if keyring.recorded(VAULT) or keyring.public_path(VAULT).exists():
            return
        click.echo("a new haven: the key custodian creates the identity vault's key pair now")
        public = init_vault(home, custodian_keyring(home, confirm=True), actor=current_actor())
    except KeyRingError as exc:
        fail(f"refused: {exc}", REFUSED)
    click.echo(
        f"identity vault key {public.key_id}: the pipeline holds only the public half ({keyring.public_path(VAULT)}); "
        f"the private half {keyring.path(VAULT)} is sealed under the key custodian's passphrase. Keep a copy of it "
        f"off this host. Commands that read identities ask for the passphrase (or read ${PASSPHRASE_ENV})."
    )


def register(main: click.Group) -> None:
    """Add this area's commands to the CLI."""
    main.add_command(keys_group)
    main.add_command(reidentify_cmd)
    main.add_command(objections_group)


# --- keys ----------------------------------------------------------------------------------


@click.group("keys")
def keys_group() -> None:
    """The key ring under keys/: ids and rotation (key material is never shown)."""


def _key_state(item: dict[str, str]) -> str:
    """One key's state in the manifest: destroyed, retired or current (ids and times only)."""
    if "destroyed_at" in item:
        return "destroyed " + item["destroyed_at"]
    if "retired_at" in item:
        return "retired " + item["retired_at"]
    return "current"


@keys_group.command("list")
def keys_list() -> None:
    """Current and retired key ids per purpose."""
    from safehaven.core.keys import RECOVER_COMMAND, KeyRing

    keyring = KeyRing(ensure_home().keys)
    manifest = keyring.manifest()
    unnoted = sorted(keyring.unnoted())
    if unnoted:
        click.echo(f"keyring.json has no note of: {', '.join(unnoted)} (refused until `{RECOVER_COMMAND}`)")
    if not manifest:
        click.echo("no keys recorded")
        return
    for purpose, entry in sorted(manifest.items()):
        click.echo(f"{purpose}: current {entry.get('current') or '-'}")
        for item in entry.get("history", []):  # type: ignore[union-attr]
            click.echo(f"  {item['key_id']}  created {item['created_at']}  {_key_state(item)}")


def _resume_rotation(home: Home) -> None:
    """Finish or undo an interrupted rotation, record one installed without its audit entry
    (``safehaven.protect.rotation.resume``), and say what was done."""
    from safehaven.protect import rotation

    try:
        done = rotation.resume(haven_from_env(home))
    except Exception as exc:  # ids and counts only
        fail(f"not resumed: {exc}")
    for line in done or ["nothing to resume"]:
        click.echo(line)


def _rotate(home: Home, purpose: str) -> None:
    """Rotate one key (``safehaven.protect.rotation.rotate``); the custodian is asked only if the
    vault private key is opened. Prints the retired and new ids, counts and crosswalks."""
    from safehaven.protect import rotation

    keyring = custodian_keyring(home)
    try:
        report = rotation.rotate(haven_from_env(home, keyring), purpose)
    except Exception as exc:  # every error here names ids and counts only
        raise click.ClickException(f"{purpose} key not rotated: {exc}") from None
    click.echo(f"{purpose} key rotated: {report.old_key_id} (retired) -> {report.new_key_id}")
    for name, n in sorted(report.counts.items()):
        click.echo(f"  {name}: {n:,}")
    for path in report.crosswalks:
        click.echo(f"  crosswalk for the recipient: {path}")


@keys_group.command("rotate")
@click.option(
    "--purpose",
    type=click.Choice(["haven", "store", "vault"]),
    default=None,
    help="haven: pseudonym key (re-pseudonymises the haven; needs the vault private key); "
    "store: encryption at rest (re-encrypts the store); vault: identity-vault key pair.",
)
@click.option(
    "--resume", is_flag=True, help="Finish or undo an interrupted rotation; record one installed without its entry."
)
def keys_rotate(purpose: str | None, resume: bool) -> None:
    """Rotate a key; the old key id is recorded as retired and the rotation audited."""
    home = ensure_home()
    if resume:
        _resume_rotation(home)
        if purpose is None:
            return
    if purpose is None:
        raise click.UsageError("give --purpose haven|store|vault (or --resume)")
    _rotate(home, purpose)


# --- re-identification ---------------------------------------------------------------------


def _pseudonyms_asked(pseudonyms: tuple[str, ...], file: Path | None) -> list[str]:
    """The pseudonyms given on the command line, then those of ``file`` (first column, header skipped)."""
    asked = list(pseudonyms)
    if file is not None:
        with open(file, newline="") as fh:
            asked += [row[0] for row in csv.reader(fh) if row and row[0].strip().lower() != "pseudonym"]
    return asked


def _write_identified(result: ReidentifyResult, output: Path | None) -> None:
    """The re-identified CSV to ``output`` (created 0600, never through a link) or standard output."""
    if output is None:
        _identified_csv(result, sys.stdout)
        return
    fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", newline="") as fh:
        _identified_csv(result, fh)


def _identified_csv(result: ReidentifyResult, fh: TextIO) -> None:
    """One row per pseudonym: the identifiers its agreement releases, several values joined by ';'."""
    writer = csv.writer(fh)
    writer.writerow(["pseudonym", *result.fields])
    for p, values in sorted(result.identified.items()):
        writer.writerow([p, *(";".join(values.get(f, [])) for f in result.fields)])


@click.command("reidentify")
@click.option("--agreement", "agreement_id", required=True, help="Agreement id (must permit identifiable data).")
@click.option("--pseudonym", "pseudonyms", multiple=True, help="A pseudonym the recipient received (repeatable).")
@click.option(
    "--file",
    "file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A file of pseudonyms, one per line (a CSV's first column; a header is ignored).",
)
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the CSV here (mode 0600) instead of standard output.",
)
def reidentify_cmd(agreement_id: str, pseudonyms: tuple[str, ...], file: Path | None, output: Path | None) -> None:
    """Resolve a recipient's pseudonyms to the identifiers its agreement releases (audited)."""
    from safehaven.share.reidentify import ReidentificationRefused, reidentify

    asked = _pseudonyms_asked(pseudonyms, file)
    if not asked:
        raise click.UsageError("give --pseudonym or --file")
    home = ensure_home()
    try:
        result = reidentify(haven_from_env(home, custodian_keyring(home)), agreement_id, asked)
    except ReidentificationRefused as exc:
        raise click.ClickException(f"refused: {exc}") from None
    except Exception as exc:
        raise click.ClickException(str(exc)) from None
    _write_identified(result, output)
    click.echo(
        f"re-identified {len(result.identified)} of {result.requested} under {agreement_id}; "
        f"not released to this recipient {result.not_released}, malformed {result.malformed}, "
        f"withheld (objection) {result.withheld_objection}. Audited.",
        err=True,
    )


# --- objections ----------------------------------------------------------------------------


@click.group("objections")
def objections_group() -> None:
    """Record patients' objections; notify recipients of changes (CoP 14)."""


def _notify_failed(agreement_id: str, exc: Exception) -> NoReturn:
    """Refuse a notice: an agreement with no file and no key is named as a typo, else the error."""
    from safehaven.share.agreements import scan_agreements

    known, broken = scan_agreements(contracts_from_env())
    if agreement_id not in known and agreement_id not in broken:
        fail(f"no such agreement: {agreement_id} (safehaven agreements list shows them)")
    fail(str(exc))


@objections_group.command("notify")
@click.option("--agreement", "agreement_id", required=True, help="The recipient's agreement id.")
@click.option(
    "--since-release",
    default=None,
    help="Report changes since this release (default: since this agreement's last notice).",
)
@click.option("--gp-sourced", is_flag=True, help="The agreement's releases hold GP data (type 1 applies too).")
def objections_notify(agreement_id: str, since_release: str | None, gp_sourced: bool) -> None:
    """Write the CoP 14b notice for one recipient: objected, withdrawn, withheld (audited)."""
    from safehaven.core.keys import KeyRing
    from safehaven.core.store import Store
    from safehaven.protect.optouts import notices
    from safehaven.protect.pseudonymise import install_agreement_key

    home = ensure_home()
    keyring = KeyRing(home.keys)
    try:
        with Store(home, keyring).connect() as con:
            name = install_agreement_key(con, keyring, agreement_id, create=False)
            report = notices(
                con,
                agreement_id=agreement_id,
                recipient_key_name=name,
                since_release_id=since_release,
                home=home,
                gp_sourced=gp_sourced,
            )
    except Exception as exc:
        _notify_failed(agreement_id, exc)
    click.echo(json.dumps(report.summary(), indent=2, sort_keys=True))


def _check_objection(nhs_number: str, objection_type: str, source_practice: str) -> None:
    """A valid NHS number (mod-11), and a practice for a type 1 objection (recorded at a GP, CoP 14a)."""
    from safehaven.core.identifiers import is_valid_nhs

    if not is_valid_nhs(nhs_number):
        raise click.ClickException("that is not a valid NHS number (10 digits, mod-11 check digit)")
    if objection_type == "type1" and not source_practice.strip():
        raise click.ClickException(
            "a type 1 objection is recorded at a GP practice: give its ODS code with --source-practice"
        )


def _check_dates(contract: Contract, recorded: date, withdrawn: date | None) -> None:
    """Dates the register can take, by the objections contract's own range of each field (no
    future dates, none before its ``min``), and a withdrawal not before its objection: the next
    run's validation would reject the row, and every record-level release would wait on a file no
    sender can correct (found by review)."""
    today = haven_today()
    for name, day in (("recorded_date", recorded), ("withdrawn_date", withdrawn)):
        rule = contract.field(name).rule if day is not None else None
        what = name.replace("_", " ")
        if rule is not None and rule.min is not None and day < rule.min:
            raise click.ClickException(f"the {what} {day.isoformat()} is before {rule.min.isoformat()}, the earliest")
        latest = today if rule is None or rule.max in (None, "today") else min(today, rule.max)
        if day is not None and day > latest:
            raise click.ClickException(f"the {what} {day.isoformat()} is after today ({today.isoformat()})")
    if withdrawn is not None and withdrawn < recorded:
        raise click.ClickException("the withdrawn date is before the recorded date")


#: the audit action of an objection written by ``safehaven objections record`` (its file, never its number)
RECORD_ACTION = "objections.record"


def _audit_record(home: Home, path: Path, objection_type: str, recorded: str, withdrawn: str) -> None:
    """Audit the drop just written (its file name, type and dates; never the NHS number); if the
    trail cannot take the entry, the file is removed and the command refused: an objection is
    recorded with its entry, or not at all (the README lists the command as audited)."""
    from safehaven.core import audit
    from safehaven.core.registers import current_actor
    from safehaven.core.store import Store

    try:
        with Store(home).connect() as con:
            audit.append(
                con, actor=current_actor(), role="governance", action=RECORD_ACTION,
                object=f"objections-file:{path.name}",
                detail={"type": objection_type, "recorded_date": recorded, "withdrawn_date": withdrawn or None},
            )  # fmt: skip
    except Exception as exc:  # the trail broken, the store busy: nothing is left recorded
        path.unlink(missing_ok=True)
        fail(f"not recorded (the audit trail could not take its entry: {type(exc).__name__}); nothing was written")


def _objection_csv(fields: list[str], row: dict[str, str]) -> str:
    """The drop's text: the contract's columns in its order (a field it lacks raises, before any file)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fields)
    writer.writeheader()
    writer.writerow(row)
    return text.getvalue()


def _write_drop(folder: Path, text: str) -> Path:
    """A new drop in ``folder`` (0700), created 0600 and never over an existing file or through a link."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    from safehaven.protect.feed import recorded_drop_name

    path = folder / recorded_drop_name(datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f"))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", newline="") as fh:
        fh.write(text)
    return path


@objections_group.command("record")
@click.option("--nhs-number", required=True, help="Any formatting: 943 476 5919, 943-476-5919, 9434765919.")
@click.option("--type", "objection_type", type=click.Choice(["type1", "national_opt_out"]), required=True)
@click.option(
    "--recorded-date",
    type=click.DateTime(["%Y-%m-%d"]),
    default=None,
    help="Date the objection took effect (default today).",
)
@click.option(
    "--withdrawn-date",
    type=click.DateTime(["%Y-%m-%d"]),
    default=None,
    help="To withdraw an objection: its recorded date plus the withdrawal date.",
)
@click.option("--source-practice", default="", help="ODS code of the practice (required for type 1).")
def objections_record(
    nhs_number: str,
    objection_type: str,
    recorded_date: datetime | None,
    withdrawn_date: datetime | None,
    source_practice: str,
) -> None:
    """Write one objection (or withdrawal) as a drop for the objections collection."""
    from safehaven.core.identifiers import canonical_nhs

    _check_objection(nhs_number, objection_type, source_practice)
    contract = registry_from_env().objections()
    recorded_day = recorded_date.date() if recorded_date else haven_today()
    withdrawn_day = withdrawn_date.date() if withdrawn_date else None
    _check_dates(contract, recorded_day, withdrawn_day)
    recorded = recorded_day.isoformat()
    withdrawn = withdrawn_day.isoformat() if withdrawn_day else ""
    row = {
        contract.patient_key: canonical_nhs(nhs_number),
        "objection_type": objection_type,
        "recorded_date": recorded,
        "withdrawn_date": withdrawn,
        "source_practice": source_practice,
    }
    text = _objection_csv(contract.field_names, row)
    home = ensure_home()
    path = _write_drop(home.incoming_for(contract.collection), text)
    _audit_record(home, path, objection_type, recorded, withdrawn)
    click.echo(
        json.dumps(
            {
                "written": path.name,
                "type": objection_type,
                "recorded_date": recorded,
                "withdrawn_date": withdrawn or None,
                "next": "run `safehaven run` (or wait for the nightly run) to register it",
                "refreshes_register": False,
            }
        )
    )


@click.command("init-vault")
def keys_init_vault() -> None:
    """Create the identity vault's key pair (key custodian; asks for a new passphrase twice)."""
    from safehaven.core.keys import VAULT, KeyRingError
    from safehaven.core.registers import current_actor
    from safehaven.protect.custody import init_vault

    home = ensure_home()
    keyring = custodian_keyring(home, confirm=True)
    try:
        public = init_vault(home, keyring, actor=current_actor())
    except Exception as exc:  # ids only
        fail(f"refused: {exc}" if isinstance(exc, KeyRingError) else str(exc))
    click.echo(
        f"identity vault key {public.key_id}: public half {keyring.public_path(VAULT)}, private half "
        f"{keyring.path(VAULT)} sealed under your passphrase; keep a copy of it off this host. Audited."
    )


@click.command("seal-vault")
def keys_seal_vault() -> None:
    """Seal an unencrypted vault private key in place (key custodian; asks for a new passphrase)."""
    from safehaven.core.registers import current_actor
    from safehaven.protect.custody import seal_vault

    home = ensure_home()
    try:
        done = seal_vault(home, custodian_keyring(home, confirm=True), actor=current_actor())
    except Exception as exc:  # ids only
        fail(f"not sealed: {exc}")
    for line in done or ["nothing to seal: the vault private key is already sealed"]:
        click.echo(line)


@click.command("recover-record")
def keys_recover_record() -> None:
    """Record again the key files a lost keyring.json noted, each checked against the store (key custodian)."""
    from safehaven.core.keys import KeyRingError
    from safehaven.core.registers import current_actor
    from safehaven.protect.key_record import recover_record

    home = ensure_home()
    try:  # the custodian's key ring: the passphrase is asked for and proved (key_record._custodian_proven)
        done = recover_record(home, custodian_keyring(home), actor=current_actor())
    except Exception as exc:  # ids only
        fail(f"refused: {exc}" if isinstance(exc, KeyRingError) else f"not recovered: {exc}")
    for item in done:
        click.echo(f"{item.purpose}: key {item.key_id} recorded ({item.checked})")
    click.echo("audited" if done else "nothing to recover: keyring.json has a note of every key file")


keys_group.add_command(keys_init_vault)
keys_group.add_command(keys_seal_vault)
keys_group.add_command(keys_recover_record)
