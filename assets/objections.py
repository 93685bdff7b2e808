"""Objections stage: the objection register, fed by validated objection drops (CoP 11-14), the
objection feed with its blocking check ``objections_feed_complete`` (safehaven.protect.feed: while
an objections file or row is unresolved, or the register is stale, no record-level release runs),
and the objection-rate monitor with its warning check (Govt response 7.15)."""

from datetime import datetime

import dagster as dg
import duckdb

from assets import keys
from resources.haven import SafeHavenResource
from safehaven.core.days import haven_today
from safehaven.intake.contracts import ContractRegistry
from safehaven.intake.validation import ensure_tables_validated
from safehaven.protect import feed, register_seal
from safehaven.protect.haven import haven_key
from safehaven.protect.objections import (
    ALPHA_UPPER,
    EVENTS,
    HELD,
    NATIONAL_OPT_OUT,
    RESTATEMENTS,
    TYPE1,
    current_sql,
    objection_rates_of,
    save_rates,
)
from safehaven.protect.pseudonymise import install_key
from safehaven.protect.register_seal import register_and_seal

RATE_CHECK = "objection_rate_within_control_limits"
FEED_CHECK = "objections_feed_complete"


def feed_asset() -> dg.AssetsDefinition:
    """The objection feed: faults and freshness, with the blocking check record-level releases wait on."""
    spec = dg.AssetCheckSpec(
        FEED_CHECK,
        asset=keys.OBJECTION_FEED,
        blocking=True,
        description="Every objections file landed whole and every row of it was valid (or a person resolved "
        "it: safehaven objections resolve), and the register was refreshed within the haven's window. "
        "While not, no record-level release runs (CoP 11-14; safehaven.protect.feed).",
    )

    @dg.asset(
        key=keys.OBJECTION_FEED,
        deps=[keys.OBJECTION_REGISTER],
        group_name="objections",
        pool=keys.STORE_POOL,
        check_specs=[spec],
        description="Unresolved objections files and rows, and the register's refresh date "
        "(governance.objection_feed_faults); record-level releases depend on its blocking check.",
        kinds={"duckdb"},
    )
    def objection_feed(context: dg.AssetExecutionContext, haven: SafeHavenResource) -> dg.MaterializeResult:
        try:
            window = haven.objections_window()
        except feed.ObjectionFeedBlocked as exc:  # an unreadable window: refuse, in one line
            raise dg.Failure(description=str(exc), metadata={"window_days": "refused"}) from None
        with haven.connect() as con:
            problems = feed.feed_problems(con, haven.home_dir(), haven_today(), window, haven.registry().contracts)
            faults = feed.unresolved(con)
            refreshed = feed.refreshed_on(con)
            events = int(con.execute(f"SELECT count(*) FROM {EVENTS}").fetchone()[0])
        for problem in problems:
            context.log.error(problem)
        counts = {
            "unresolved_files": len(faults),
            "rows_unresolved": sum(f.rows or 0 for f in faults),
            "files_quarantined_whole": sum(f.level == "file" for f in faults),
            "later_clean_files_awaiting_a_decision": sum(f.later_clean_sha256 is not None for f in faults),
            "register_refreshed_on": refreshed.isoformat() if refreshed else "never",
            "window_days": window,
        }
        return dg.MaterializeResult(
            metadata={"rows_in": events, "rows_out": events, **counts},  # the register passes through unchanged
            check_results=[
                dg.AssetCheckResult(
                    check_name=FEED_CHECK,
                    passed=not problems,
                    severity=dg.AssetCheckSeverity.ERROR,
                    metadata={**counts, "problems": dg.MetadataValue.json(problems)},
                )
            ],
        )

    return objection_feed


def _withdrawals_held(con: duckdb.DuckDBPyConnection, since: datetime) -> int:
    """Withdrawals in objections files received again, registered since ``since``, that were not
    applied (``safehaven.protect.objections.register_restatements``)."""
    return int(
        con.execute(
            f"SELECT coalesce(sum(withdrawals_held), 0) FROM {RESTATEMENTS} WHERE registered_at >= ?", [since]
        ).fetchone()[0]
    )


def _stale_withdrawals_held(con: duckdb.DuckDBPyConnection, since: datetime) -> int:
    """Withdrawals in new objections batches, held since ``since`` as stale (dated on or before the
    register learnt the statement they contradict: ``safehaven.protect.objections._register_batch``)."""
    return int(con.execute(f"SELECT count(*) FROM {HELD} WHERE statement AND held_at >= ?", [since]).fetchone()[0])


def build(registry: ContractRegistry) -> list[dg.AssetsDefinition]:
    contract = registry.objections()

    @dg.asset(
        key=keys.OBJECTION_REGISTER,
        deps=[keys.validated(contract.collection)],
        group_name="objections",
        pool=keys.STORE_POOL,
        description="Append-only register of objections (type 1 and national data opt-out), "
        "keyed by haven pseudonym; the current state is derived from it.",
        kinds={"duckdb"},
    )
    def objection_register(context: dg.AssetExecutionContext, haven: SafeHavenResource) -> dg.MaterializeResult:
        with haven.connect() as con:
            ensure_tables_validated(con, contract)  # a collection that never sent a drop has its tables, empty
            key = haven_key(con, haven.keyring())
            install_key(con, "haven", key)
            (started,) = con.execute("SELECT now()").fetchone()
            waiting = feed.waiting_since(haven.home_dir())  # not an entry refused in place
            unit = haven.context()
            added, sealed = register_and_seal(
                con, contract, key.key_id, unit.home, actor=unit.actor, waiting_since=waiting
            )
            if not sealed:
                context.log.warning(register_seal.problem(con) or "the objection register differs from its seal")
            held = _withdrawals_held(con, started)
            if held:
                context.log.warning(
                    f"{held} withdrawal(s) in objections files received again were not applied (a file sent "
                    "again may keep an objection in force, never end one): check with the sender; a genuine "
                    "withdrawal takes effect once it arrives in a file whose records differ from any received "
                    "before, or once a person applies it: safehaven objections faults lists it, safehaven "
                    "objections apply-held <drop> --by <name> --reason <text> applies it"
                )
            stale = _stale_withdrawals_held(con, started)
            if stale:
                context.log.warning(
                    f"{stale} withdrawal(s) in new objections files were not applied: each is dated on or before "
                    "the day the register learnt the statement that kept the objection in force, so the file "
                    "repeats an old withdrawal (a regenerated old extract) and the objection stays in force: "
                    "check with the sender; a genuine withdrawal dated after that statement takes effect, or a "
                    "person applies it: safehaven objections faults lists it, safehaven objections apply-held "
                    "<batch> --by <name> --reason <text> applies it"
                )
            total = con.execute(f"SELECT count(*) FROM {EVENTS}").fetchone()[0]
            in_force = dict(
                con.execute(
                    f"SELECT objection_type, count(*) FILTER (WHERE in_force) FROM ({current_sql()}) GROUP BY 1"
                ).fetchall()
            )
        return dg.MaterializeResult(
            metadata={
                "rows_in": added,
                "rows_out": int(total),
                "dagster/row_count": int(total),
                "type1_in_force": int(in_force.get(TYPE1, 0)),
                "national_opt_out_in_force": int(in_force.get(NATIONAL_OPT_OUT, 0)),
                "pseudonym_key_id": key.key_id,
                "withdrawals_held_from_files_sent_again": held,
                "stale_withdrawals_held": stale,
                "register_sealed": sealed,
            }
        )

    gp = [c for c in registry.content() if c.practice_field]
    spec = dg.AssetCheckSpec(
        RATE_CHECK,
        asset=keys.OBJECTION_RATES,
        blocking=False,
        description="No practice's type 1 objection rate is above the 99.8% funnel-plot control limit "
        "(exact binomial) around the pooled rate of the other practices (Govt response 7.15). A warning: an outlier is "
        "explored with the practice, not a reason to stop the pipeline.",
    )

    @dg.asset(
        key=keys.OBJECTION_RATES,
        deps=[keys.OBJECTION_REGISTER, *[keys.haven(c.collection) for c in gp]],
        group_name="objections",
        pool=keys.STORE_POOL,
        check_specs=[spec],
        description="Objection rate per GP practice against the pooled rate of the other practices, "
        "with 99.8% funnel-plot control limits (safehaven.protect.objections.objection_rates).",
        kinds={"duckdb"},
    )
    def objection_rates_asset(context: dg.AssetExecutionContext, haven: SafeHavenResource) -> dg.MaterializeResult:
        with haven.connect() as con:
            store = haven.store()
            sources = [
                (f"haven.{c.collection}", c.practice_field or "")
                for c in gp
                if store.table_exists(con, "haven", c.collection)
            ]  # none before a GP batch arrives
            rates = objection_rates_of(con, (TYPE1, NATIONAL_OPT_OUT), gp_sources=sources)
            save_rates(con, rates)
        type1 = [r for r in rates if r.objection_type == TYPE1]
        outliers = [r for r in type1 if r.outlier]
        flagged = [
            {
                "practice": r.practice,
                "rate": round(r.rate, 4),
                "baseline": round(r.baseline, 4),
                "upper_limit": round(r.upper_limit or 0.0, 4),
                "p_value": float(f"{r.p_value or 0.0:.3g}"),
                "z": round(r.z or 0.0, 2),
                "list_size": r.list_size,
                "objectors": r.objectors,
            }
            for r in outliers
        ]
        for f in flagged:
            context.log.warning(
                f"practice {f['practice']}: type 1 objection rate {f['rate']:.1%} against a baseline of "
                f"{f['baseline']:.1%} (99.8% upper limit {f['upper_limit']:.1%})"
            )
        nat_outliers = sum(r.outlier for r in rates if r.objection_type == NATIONAL_OPT_OUT)
        return dg.MaterializeResult(
            metadata={
                "rows_in": len(type1),
                "rows_out": sum(r.assessed for r in type1),
                "practices_flagged": len(outliers),
                "national_opt_out_practices_flagged": int(nat_outliers),
            },
            check_results=[
                dg.AssetCheckResult(
                    check_name=RATE_CHECK,
                    passed=not outliers,
                    severity=dg.AssetCheckSeverity.WARN,
                    metadata={
                        "practices_assessed": sum(r.assessed for r in type1),
                        "practices_flagged": len(outliers),
                        "flagged": dg.MetadataValue.json(flagged),
                        "method": "baseline: pooled rate of the other practices; outlier: above the 99.8% "
                        f"funnel limit, exact binomial P(X >= x) < {ALPHA_UPPER} (Spiegelhalter 2005)",
                    },
                )
            ],
        )

    return [objection_register, objection_rates_asset, feed_asset()]
