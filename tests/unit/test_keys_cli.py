"""``safehaven keys``, ``safehaven objections record`` (safehaven.cli.keys)."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from safehaven.cli.main import main
from safehaven.core.home import Home
from safehaven.core.keys import KeyRing
from safehaven.core.store import Store
from safehaven.protect.feed import RECORDED_PREFIX
from safehaven.protect.objections import objectors_sql
from safehaven.protect.pseudonymise import install_key, pseudonym
from tests.conftest import copy_haven
from tests.unit.populate import process


def test_keys_rotate_and_list_show_ids_never_material(home: Home, populated_haven: Path) -> None:
    copy_haven(populated_haven, home)  # as populated(home) leaves it
    keyring = KeyRing(home.keys)
    old = keyring.get("haven")
    runner = CliRunner()
    rotated = runner.invoke(main, ["keys", "rotate", "--purpose", "haven"])
    assert rotated.exit_code == 0, rotated.output
    new = keyring.get("haven")
    assert f"{old.key_id} (retired) -> {new.key_id}" in rotated.output
    listed = runner.invoke(main, ["keys", "list"])
    assert listed.exit_code == 0 and old.key_id in listed.output and "retired" in listed.output
    for out in (rotated.output, listed.output):
        assert old.hex not in out and new.hex not in out
    assert runner.invoke(main, ["keys", "rotate"]).exit_code != 0
    assert "nothing to resume" in runner.invoke(main, ["keys", "rotate", "--resume"]).output


def test_recorded_objection_in_any_formatting_enters_the_register(home: Home, populated_haven: Path) -> None:
    copy_haven(populated_haven, home)  # as populated(home) leaves it
    with Store(home).connect() as con:
        nhs = con.execute("SELECT nhs_number FROM landing.hospital_episodes_valid ORDER BY 1 LIMIT 1").fetchone()[0]
    spaced = f"{nhs[:3]} {nhs[3:6]} {nhs[6:]}"
    runner = CliRunner()
    done = runner.invoke(
        main,
        ["objections", "record", "--nhs-number", spaced, "--type", "national_opt_out", "--recorded-date", "2024-01-01"],
    )
    assert done.exit_code == 0, done.output
    assert nhs not in done.output and spaced not in done.output
    drops = list(home.incoming_for("objections").glob("*.csv"))
    assert len(drops) == 1 and oct(drops[0].stat().st_mode & 0o777) == oct(0o600)
    assert drops[0].name.startswith(RECORDED_PREFIX), "named so that it never refreshes the register"
    assert json.loads(done.output)["refreshes_register"] is False
    assert runner.invoke(main, ["objections", "record", "--nhs-number", "9990001237", "--type", "type1"]).exit_code
    process(home)
    with Store(home).connect() as con:
        install_key(con, "haven", KeyRing(home.keys).get("haven"))
        objecting = {r[0] for r in con.execute(objectors_sql()).fetchall()}
    assert pseudonym(KeyRing(home.keys).get("haven").material, nhs) in objecting


def test_recording_an_objection_refuses_future_dates_and_is_audited_without_its_number(home: Home) -> None:
    """A future recorded or withdrawn date, or a withdrawal before its objection, would be rejected
    by the next run's validation and hold every record-level release on a file no sender can
    correct: refused in one line, nothing written. A recorded one is audited by its file, type and
    dates, never its NHS number (found by review: the command wrote no audit entry)."""
    from datetime import timedelta

    from safehaven.cli.keys import RECORD_ACTION
    from safehaven.core import audit
    from safehaven.core.days import haven_today

    runner = CliRunner()
    tomorrow = (haven_today() + timedelta(days=1)).isoformat()
    base = ["objections", "record", "--nhs-number", "9434765919", "--type", "national_opt_out"]
    for extra, said in (
        (["--recorded-date", tomorrow], f"the recorded date {tomorrow} is after today"),
        (["--recorded-date", "2024-01-01", "--withdrawn-date", tomorrow], f"the withdrawn date {tomorrow} is after"),
        (["--recorded-date", "2024-01-02", "--withdrawn-date", "2024-01-01"], "withdrawn date is before the recorded"),
        (["--recorded-date", "1999-12-31"], "the recorded date 1999-12-31 is before 2000-01-01, the earliest"),
    ):
        refused = runner.invoke(main, base + extra)
        assert refused.exit_code != 0 and said in refused.output
    assert not list(home.incoming_for("objections").glob("*.csv"))
    done = runner.invoke(main, [*base, "--recorded-date", "2024-01-01"])
    assert done.exit_code == 0, done.output
    [drop] = home.incoming_for("objections").glob("*.csv")
    with Store(home).connect(read_only=True) as con:
        [entry] = [e for e in audit.entries_for(con) if e.action == RECORD_ACTION]
    assert entry.object == f"objections-file:{drop.name}" and entry.detail_value["recorded_date"] == "2024-01-01"
    assert "9434765919" not in (entry.detail or "")


def test_objections_notify_writes_the_notice(home: Home, populated_haven: Path) -> None:
    import json

    from safehaven.core.keys import agreement_key
    from safehaven.protect.optouts import MEMBERS
    from safehaven.protect.optouts import ensure_tables as ensure_optout_tables

    copy_haven(populated_haven, home)  # as populated(home) leaves it
    keyring = KeyRing(home.keys)
    agreement_key(keyring, "study-a")
    with Store(home).connect() as con:
        ensure_optout_tables(con)
        install_key(con, "haven", keyring.get("haven"))
        con.execute(
            f"INSERT INTO {MEMBERS} SELECT 'r1', 'study-a', pid, now() - INTERVAL 1 DAY "
            "FROM (SELECT DISTINCT pid FROM haven.hospital_episodes)"
        )
        expected = con.execute(
            f"SELECT count(*) FROM ({objectors_sql()}) WHERE pid IN (SELECT pid FROM haven.hospital_episodes)"
        ).fetchone()[0]
    out = CliRunner().invoke(main, ["objections", "notify", "--agreement", "study-a"])
    assert out.exit_code == 0, out.output
    summary = json.loads(out.output)
    assert summary["objected"] == expected > 0 and summary["withdrawn"] == 0
    assert (home.releases / "study-a" / "notices").is_dir()
    assert CliRunner().invoke(main, ["objections", "notify", "--agreement", "never-made"]).exit_code != 0
