"""Quality statements: every published output says how good it is, on the ESS dimensions.

Rule (CoP 28: "quality should be monitored, assured and reported on, taking account of ...
the European Statistical System dimensions of quality": relevance, accuracy, timeliness and
punctuality, accessibility and clarity, comparability and coherence; CoP 29b-d: publish the
methods and why each choice was made, inform users about quality, consider coherence with
other products; CoP 29i: say what changed). Each output carries one statement, built from
the records it came from, never typed by hand:

* **Relevance**: the output's declared purpose, users, unit and dimensions (its YAML).
* **Accuracy**: per collection, the validation figures of every batch (``governance.batches``,
  with the same meaning as the validate stage's ``ValidationReport``: ``pass_rate`` = rows
  entering the haven / rows checked), failures per rule (``governance.validation_rule_results``:
  rows breaking each rule in the batches validated and not disposed of, the rows that
  ``landing.<c>_rejected`` holds), files quarantined whole at ingest (their reason files), records not in the haven
  (type 1 objections), records held for a later period; the per-batch measures of
  ``governance.quality_measures`` written by the validation stage (``safehaven.intake.measures``:
  row validity, completeness and validity per field, uniqueness of the patient key, date
  coverage), pooled over batches, or where that table is absent the completeness of each
  field as received, computed here; the disclosure control applied (cells suppressed: a count
  of cells, never which cells; not how many cells rounding changed, which would undo the
  protection); the zeros
  policy: whether sampling zeros are published, and the structural zeros declared (impossible
  combinations, with their reasons) and the grid cells they removed; against the previous
  publication, the revised cells (``safehaven.publish.release_audit.revisions``: counted, and
  listed with their previous and new *published* values, capped).
* **Timeliness and punctuality**: days from the end of the reporting period to publication,
  against the output's target; when the data were last received.
* **Accessibility and clarity**: the files, formats, licence, data dictionary and methods.
* **Comparability and coherence**: contract and code-list versions, the output definition's
  version and hash, the disclosure policy, coherence notes, and the changes since the last
  release of the output (``governance.output_releases``).

Statements carry counts, versions, dates of the process and rates only: no value of any
record. The aggregate stage stores the statement (``governance.output_quality``) and shows
it as Dagster metadata; the publication step stamps the release and writes it next to the
output as ``<output>.quality.json`` and ``.quality.md``.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import UTC, date, datetime
from typing import Any

import duckdb

from safehaven.core import schema
from safehaven.core.home import Home
from safehaven.core.sql import q
from safehaven.core.store import table_exists
from safehaven.intake.contracts import Contract, ContractRegistry
from safehaven.intake.ingest import BATCHES
from safehaven.intake.measures import MEASURES_TABLE, RULE_RESULTS
from safehaven.intake.rules import ROWS_RULE, text_sql
from safehaven.intake.validation import BATCH_REFUSALS
from safehaven.publish.outputs import Output, OutputBuild, code_lists_of

#: The licence of every published output (CoP 36; the haven is a public body).
LICENCE = "Open Government Licence v3.0"
LICENCE_URL = "https://www.nationalarchives.gov.uk/doc/open-government-licence/version/3/"
OGL = f"{LICENCE} - {LICENCE_URL}"

QUALITY_TABLE = schema.OUTPUT_QUALITY
RELEASES_TABLE = schema.OUTPUT_RELEASES
ESS_DIMENSIONS = (
    "relevance",
    "accuracy",
    "timeliness_and_punctuality",
    "accessibility_and_clarity",
    "comparability_and_coherence",
)


def ensure_tables(con: duckdb.DuckDBPyConnection) -> None:
    """The stored statements (latest per output) and the history of published releases."""
    schema.ensure(con, QUALITY_TABLE, RELEASES_TABLE)


# --- accuracy --------------------------------------------------------------------------


def _rate(num: int, den: int) -> float | None:
    return None if den == 0 else round(num / den, 6)


def collection_figures(con: duckdb.DuckDBPyConnection, contract: Contract, home: Home) -> dict[str, Any]:
    """Validation and coverage figures of one collection, from the records of the run."""
    c = contract.collection
    figures: dict[str, Any] = {"contract_version": contract.version}
    if table_exists(con, *BATCHES.split(".")):
        row = con.execute(
            f"""SELECT count(*),
                 count(*) FILTER (WHERE status = 'accepted'),
                 count(*) FILTER (WHERE status = 'refused'),
                 count(*) FILTER (WHERE status = 'landed'),
                 coalesce(sum(rows), 0),
                 coalesce(sum(rows) FILTER (WHERE status IN ('accepted', 'refused')), 0),
                 coalesce(sum(invalid_rows) FILTER (WHERE status IN ('accepted', 'refused')), 0),
                 coalesce(sum(rows - invalid_rows) FILTER (WHERE status = 'accepted'), 0),
                 coalesce(sum(invalid_rows) FILTER (WHERE status = 'accepted'), 0),
                 coalesce(sum(rows) FILTER (WHERE status = 'refused'), 0),
                 max(landed_at), list(DISTINCT contract_version ORDER BY contract_version)
                   FILTER (WHERE contract_version IS NOT NULL)
               FROM {BATCHES} WHERE collection = ?""",
            [c],
        ).fetchone()
        (
            batches,
            accepted,
            refused,
            pending,
            received,
            checked,
            invalid,
            valid,
            rejected_rows,
            refused_rows,
            last_landed,
            versions,
        ) = row
        figures.update(
            {
                "batches": int(batches),
                "batches_accepted": int(accepted),
                "batches_refused": int(refused),
                "batches_awaiting_validation": int(pending),
                "rows_received": int(received),
                "rows_checked": int(checked),
                "rows_invalid": int(invalid),
                "rows_valid": int(valid),
                "pass_rate": _rate(int(valid), int(checked)),
                "row_validity_rate": _rate(int(checked) - int(invalid), int(checked)),
                "rows_quarantined_in_accepted_batches": int(rejected_rows),
                "rows_withheld_in_refused_batches": int(refused_rows),
                "contract_versions_of_batches": list(versions or []),
                "data_last_received_at": last_landed.astimezone(UTC).isoformat(timespec="seconds")
                if last_landed
                else None,
            }
        )
        if table_exists(con, *RULE_RESULTS.split(".")):
            figures["failures_by_rule"] = _failures_by_rule(con, c)
    if table_exists(con, *MEASURES_TABLE.split(".")):
        figures["measures_from_validation"] = _measures(con, c)
    elif table_exists(con, "landing", c):
        # Fallback when the validation stage records no measures: completeness as received.
        parts = ", ".join(f"count({text_sql(f.name)})" for f in contract.fields)
        row = con.execute(f"SELECT count(*), {parts} FROM landing.{q(c)}").fetchone()
        total = int(row[0])
        figures["completeness_as_received"] = {
            f.name: _rate(int(n), total) for f, n in zip(contract.fields, row[1:], strict=True)
        }
    if table_exists(con, "haven", c) and table_exists(con, "landing", f"{c}_valid"):
        valid_rows = con.execute(
            f"SELECT count(*) FROM landing.{q(c + '_valid')} WHERE _batch IN "
            f"(SELECT batch_id FROM {BATCHES} WHERE collection = ? AND status = 'accepted')",
            [c],
        ).fetchone()[0]
        haven_rows = con.execute(f"SELECT count(*) FROM haven.{q(c)}").fetchone()[0]
        figures["records_in_haven"] = int(haven_rows)
        figures["records_not_in_haven_type1_objections"] = int(valid_rows) - int(haven_rows)
    figures["files_quarantined_at_ingest"] = _quarantined_files(home, c)
    return figures


def _quarantined_files(home: Home, collection: str) -> dict[str, Any]:
    """Whole files set aside at ingest (reason files other than batch refusals), by rule."""
    by_rule: dict[str, int] = {}
    folder = home.quarantine_for(collection)
    for path in sorted(folder.glob("*.reason.json")) if folder.exists() else []:
        try:
            rule = str(json.loads(path.read_text()).get("rule", "unknown"))
        except (OSError, ValueError):
            rule = "unreadable reason file"
        if rule not in BATCH_REFUSALS:
            by_rule[rule] = by_rule.get(rule, 0) + 1
    return {"files": sum(by_rule.values()), "by_rule": by_rule}


def _failures_by_rule(con: duckdb.DuckDBPyConnection, collection: str) -> dict[str, int]:
    """Rows breaking each rule, summed over the collection's validated batches (by rule id).

    From the per-batch, per-rule results of the validate stage: the batches accepted or
    refused (a disposed batch's rows have left ``_rejected``), rules with failures only, the
    row-level tolerance left out. The same counts as unnesting the rule lists of
    ``landing.<collection>_rejected``, from a table of a few rows per batch.
    """
    return {
        str(rule): int(n)
        for rule, n in con.execute(
            f"SELECT r.rule_id, sum(r.sql_failures) FROM {RULE_RESULTS} r JOIN {BATCHES} b USING (batch_id) "
            "WHERE b.collection = ? AND b.status IN ('accepted', 'refused') AND r.rule_id <> ? AND r.sql_failures > 0 "
            "GROUP BY r.rule_id ORDER BY r.rule_id",
            [collection, ROWS_RULE],
        ).fetchall()
    }


def _measures(con: duckdb.DuckDBPyConnection, collection: str) -> dict[str, Any]:
    """The validation stage's per-batch measures (``safehaven.intake.measures``), pooled over batches.

    Each (measure, field) is the sum of numerators over the sum of denominators of every
    batch (accepted or refused); date coverage keeps its earliest start and latest end.
    """
    rows = con.execute(
        "SELECT measure, field, sum(numerator), sum(denominator), min(period_start), max(period_end) "
        f"FROM {MEASURES_TABLE} WHERE collection = ? GROUP BY ALL ORDER BY measure, field",
        [collection],
    ).fetchall()
    batches = con.execute(
        f"SELECT count(DISTINCT batch_id) FROM {MEASURES_TABLE} WHERE collection = ?", [collection]
    ).fetchone()[0]
    pooled: dict[str, Any] = {"batches": int(batches)}
    for measure, fld, num, den, lo, hi in rows:
        entry: dict[str, Any] = {
            "value": _rate(int(num), int(den)) if num is not None and den else None,
            "numerator": None if num is None else int(num),
            "denominator": None if den is None else int(den),
        }
        if lo is not None or hi is not None:
            entry["period"] = [lo.isoformat() if lo else None, hi.isoformat() if hi else None]
        pooled.setdefault(str(measure), {})[str(fld)] = entry
    return pooled


def policy_record(output: Output) -> dict[str, Any]:
    """The disclosure policy as stated: threshold, rounding, zeros, and the structural zeros declared."""
    return {**asdict(output.disclosure_policy), "structural_zeros": [z.label() for z in output.zeros.structural]}


def disclosure_figures(output: Output, build: OutputBuild) -> dict[str, Any]:
    """What disclosure control did, as numbers of cells (never which cells), and the zeros policy.

    Suppressed cells are counted; cells changed by rounding are not, nor those it left as they
    were: how many published counts are exact would tell a reader which of them rounding hides
    nothing in (a table of multiples of 5 with "0 changed" is a table of true counts), undoing
    the rounding across tables and nights (CoP 34b; ONS disclosure guidance: rounding protects
    only while the true values stay unknown).

    The structural zeros are declarations (which combinations cannot occur, and why) and the
    grid cells they removed: they describe the table's shape, not anybody in it.
    """
    main = build.report.main
    suppressed = main.primary + main.secondary
    return {
        "policy": asdict(output.disclosure_policy),
        "zeros": {
            "sampling_zeros": "published as 0" if output.zeros.publish else "suppressed",
            "structural_zeros": build.structural.as_dict(),
        },
        "margins_protected": "every row and column (each dimension's margin)"
        if output.margins is None
        else [", ".join(m) or "the whole table" for m in output.margins],
        "cells": build.report.cells,
        "cells_suppressed": suppressed,
        "share_of_cells_suppressed": _rate(suppressed, build.report.cells),
    }


# --- the statement ---------------------------------------------------------------------


def build_statement(
    con: duckdb.DuckDBPyConnection,
    output: Output,
    registry: ContractRegistry,
    home: Home,
    build: OutputBuild,
    *,
    as_of: datetime | None = None,
) -> dict[str, Any]:
    """The quality statement of one freshly built output (release pending)."""
    as_of = as_of or datetime.now(UTC)
    collections = {c: collection_figures(con, registry.contracts[c], home) for c in output.collections}
    lists = {}
    for name in code_lists_of(output):
        cl = registry.code_list(name)
        lists[name] = {"version": cl.version, "system": cl.system}
    columns = [d[0] for d in con.execute(f"SELECT * FROM {build.table} LIMIT 0").description]
    received = [f["data_last_received_at"] for f in collections.values() if f.get("data_last_received_at")]
    statement: dict[str, Any] = {
        "output": output.name,
        "title": output.title,
        "output_version": output.version,
        "definition_sha256": output.definition_sha256(),
        "release": {"id": None, "status": "pending", "published_at": None},
        "relevance": {
            "description": output.description.strip(),
            "purpose": output.purpose.strip(),
            "users": list(output.users),
            "unit": "people (distinct persons, by haven pseudonym)",
            "dimensions": output.dimension_names,
            "measures": [m.name for m in output.measures],
        },
        "accuracy": {
            "reporting_period": build.period.as_dict(),
            "collections": collections,
            "disclosure_control": disclosure_figures(output, build),
            "linkage": None
            if output.linkage is None
            else {
                "agreement": build.agreement,
                "collections": [output.linkage.left, output.linkage.right],
                "method": "deterministic: exact match on the haven pseudonym of the validated NHS number",
            },
        },
        "timeliness_and_punctuality": {
            "period_end": build.period.end.isoformat() if build.period.end else None,
            "target_days_after_period_end": output.timeliness_target_days,
            "data_last_received_at": max(received) if received else None,
        },
        "accessibility_and_clarity": {
            "files": [f"{output.name}.csv", f"{output.name}.parquet", "published.duckdb"],
            "dictionary": f"{output.name}.dictionary.json",
            "quality_statement": [f"{output.name}.quality.md", f"{output.name}.quality.json"],
            "methods": "methods.md",
            "licence": OGL,
            "columns": columns,
            "suppression_marker": "people is empty (NULL) and suppressed is true: the ONS [c] marker",
        },
        "comparability_and_coherence": {
            "contracts": {c: registry.contracts[c].version for c in output.collections},
            "code_lists": lists,
            "disclosure_policy": policy_record(output),
            "coherence": list(output.coherence),
            "changes_since_last_release": [],
        },
    }
    cc = statement["comparability_and_coherence"]
    cc["changes_since_last_release"] = changes_since_last_release(con, output.name, _comparable(statement))
    return finalise(statement, None, as_of)


def finalise(statement: dict[str, Any], release_id: str | None, published_at: datetime) -> dict[str, Any]:
    """Stamp a statement with its release (or the time it was built) and its timeliness."""
    out = json.loads(json.dumps(statement))
    status = "published" if release_id else "pending"
    out["release"] = {"id": release_id, "status": status, "published_at": published_at.isoformat(timespec="seconds")}
    tp = out["timeliness_and_punctuality"]
    end = tp.get("period_end")
    if end:
        days = (published_at.date() - date.fromisoformat(end)).days
        tp["days_from_period_end_to_publication"] = days
        tp["punctual"] = days <= int(tp["target_days_after_period_end"])
    else:
        tp["days_from_period_end_to_publication"] = None
        tp["punctual"] = None
    return out


def _comparable(statement: dict[str, Any]) -> dict[str, Any]:
    """What a release is compared on: definition version and hash, contracts, code lists, policy, columns."""
    cc = statement.get("comparability_and_coherence", {})
    return {
        "output_version": statement.get("output_version"),
        "definition_sha256": statement.get("definition_sha256"),
        "contracts": cc.get("contracts"),
        "code_lists": cc.get("code_lists"),
        "policy": cc.get("disclosure_policy"),
        "columns": statement.get("accessibility_and_clarity", {}).get("columns"),
    }


def changes_since_last_release(con: duckdb.DuckDBPyConnection, output: str, current: dict[str, Any]) -> list[str]:
    """What changed in the definition, contracts, code lists, policy or columns since the last release."""
    ensure_tables(con)
    row = con.execute(
        f"SELECT release_id, statement FROM {RELEASES_TABLE} WHERE output = ? ORDER BY published_at DESC LIMIT 1",
        [output],
    ).fetchone()
    if row is None:
        return ["first release of this output"]
    before = _comparable(json.loads(row[1]))
    changes = []
    labels = {
        "output_version": "output definition version",
        "definition_sha256": "output definition (query, dimensions or text)",
        "contracts": "collection contract versions",
        "code_lists": "code list versions",
        "policy": "disclosure control policy",
        "columns": "published columns",
    }
    for key, label in labels.items():
        if before.get(key) != current.get(key):
            changes.append(f"{label}: {json.dumps(before.get(key))} -> {json.dumps(current.get(key))}")
    return changes or [f"no change of definition, contracts, code lists, policy or columns since release {row[0]}"]


def store_statement(con: duckdb.DuckDBPyConnection, statement: dict[str, Any]) -> None:
    """Keep the latest statement of an output for the publication step."""
    ensure_tables(con)
    con.execute(
        f"INSERT OR REPLACE INTO {QUALITY_TABLE} VALUES (?, now(), ?)",
        [statement["output"], json.dumps(statement)],
    )


def load_statement(con: duckdb.DuckDBPyConnection, output: str) -> dict[str, Any] | None:
    ensure_tables(con)
    row = con.execute(f"SELECT statement FROM {QUALITY_TABLE} WHERE output = ?", [output]).fetchone()
    return json.loads(row[0]) if row else None


def record_release(con: duckdb.DuckDBPyConnection, statements: list[dict[str, Any]]) -> None:
    """Add the published statements to the release history (the base of the next release's changes)."""
    ensure_tables(con)
    for st in statements:
        con.execute(
            f"INSERT INTO {RELEASES_TABLE} VALUES (?, ?, ?, ?)",
            [st["release"]["id"], st["output"], st["release"]["published_at"], json.dumps(st)],
        )


# --- rendering -------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2%}"


def _n(x: Any) -> str:
    return f"{x:,}" if isinstance(x, int) and not isinstance(x, bool) else str(x)


def _measures_line(name: str, measured: dict[str, Any]) -> str:
    """One sentence of the validation stage's pooled measures."""
    parts = [f"Measures from validation of {name} ({measured.get('batches', 0)} batch(es))"]
    rows = measured.get("row_validity", {}).get("*")
    if rows:
        parts.append(f"row validity {_pct(rows['value'])}")
    for measure in ("validity", "completeness"):
        low = {k: v["value"] for k, v in measured.get(measure, {}).items() if v["value"] is not None and v["value"] < 1}
        if low:
            parts.append(f"{measure} below 100%: " + ", ".join(f"`{k}` {_pct(v)}" for k, v in low.items()))
    for fld, v in measured.get("uniqueness", {}).items():
        parts.append(f"uniqueness of `{fld}` {_pct(v['value'])}")
    for fld, v in measured.get("date_coverage", {}).items():
        period = v.get("period") or [None, None]
        parts.append(f"date coverage of `{fld}` {_pct(v['value'])} ({period[0]} to {period[1]})")
    return "; ".join(parts) + "."


def _zeros_lines(zeros: dict[str, Any] | None) -> list[str]:
    """The zeros policy: sampling zeros published or not; the structural zeros and the cells they removed."""
    if not zeros:
        return []
    structural = zeros["structural_zeros"]
    declared = structural["declared"]
    text = (
        "; ".join(f"`{d['match']}` ({d['reason']}): {_n(d['cells_removed'])} cell(s)" for d in declared)
        + f"; {_n(structural['cells_removed'])} cell(s) removed from the grid in all"
        if declared
        else "none declared"
    )
    return [
        "",
        f"**Zeros.** Sampling zeros (possible cells in which no one was counted) are {zeros['sampling_zeros']}. "
        f"Structural zeros (combinations that cannot occur, which are not cells of the table): {text}.",
    ]


def _cell(value: Any) -> str:
    """A dimension value as a markdown table cell (a ``|`` would end the cell)."""
    return str(value).replace("|", "\\|")


def _revision_lines(rev: dict[str, Any] | None) -> list[str]:
    """The cells revised since the previous publication of the same months, with published values."""
    if not rev:
        return []
    lines = [
        "",
        f"**Revisions.** Against the previous publication of the same months, {_n(rev['cells_revised'])} of "
        f"{_n(rev['cells_compared'])} cells are revised ({_n(rev['suppression_changed'])} changed suppression). "
        "Values are published values.",
    ]
    cells = rev.get("cells") or []
    if cells:
        dims = list(cells[0]["cell"])
        lines += ["", "| " + " | ".join([*dims, "previous", "new"]) + " |", "|" + "---|" * (len(dims) + 2)]
        lines += [
            "| " + " | ".join([*(_cell(v) for v in c["cell"].values()), _n(c["previous"]), _n(c["new"])]) + " |"
            for c in cells
        ]
    if rev.get("cells_not_listed"):
        lines += ["", f"{_n(rev['cells_not_listed'])} further revised cell(s) are not listed."]
    return lines


def render_markdown(st: dict[str, Any]) -> str:
    """The statement as a page for readers (the same figures as the JSON)."""
    rel, acc = st["relevance"], st["accuracy"]
    tp, ac, cc = st["timeliness_and_punctuality"], st["accessibility_and_clarity"], st["comparability_and_coherence"]
    period = acc["reporting_period"]
    sdc = acc["disclosure_control"]
    lines = [
        f"# Quality statement: {st['title']}",
        "",
        f"Output `{st['output']}` version {st['output_version']}; release {st['release']['id'] or '(pending)'}, "
        f"{st['release']['status']} {st['release']['published_at']}. Methods: `methods.md`.",
        "",
        "## Relevance",
        "",
        rel["description"],
        "",
        f"**Purpose.** {rel['purpose']}",
        "",
        "**Users.** " + "; ".join(rel["users"]) + ".",
        "",
        f"**Unit.** {rel['unit']}. Dimensions: {', '.join(rel['dimensions'])}. Measures: {', '.join(rel['measures'])}.",
        "",
        "## Accuracy",
        "",
        f"Reporting period {period['start']} to {period['end']} ({period['months']} months).",
        "",
        "| collection | batches (accepted / refused) | rows checked | rows invalid | rows entering the haven "
        "| pass rate | files quarantined at ingest | records not in the haven (type 1) "
        "| records held for a later period |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, f in acc["collections"].items():
        lines.append(
            f"| {name} | {_n(f.get('batches', 0))} ({_n(f.get('batches_accepted', 0))} / "
            f"{_n(f.get('batches_refused', 0))}) "
            f"| {_n(f.get('rows_checked', 0))} | {_n(f.get('rows_invalid', 0))} | {_n(f.get('rows_valid', 0))} "
            f"| {_pct(f.get('pass_rate'))} | {_n(f['files_quarantined_at_ingest']['files'])} "
            f"| {_n(f.get('records_not_in_haven_type1_objections', 0))} "
            f"| {_n(period['records_after_period_end'].get(name, 0))} |"
        )
    lines.append("")
    for name, f in acc["collections"].items():
        rules = f.get("failures_by_rule") or {}
        if rules:
            lines.append(f"Rule failures in {name}: " + ", ".join(f"`{r}` {_n(n)}" for r, n in rules.items()) + ".")
        incomplete = {k: v for k, v in (f.get("completeness_as_received") or {}).items() if v is not None and v < 1}
        if incomplete:
            lines.append(
                f"Completeness of {name} as received (share of rows with a value), fields below 100%: "
                + ", ".join(f"`{k}` {_pct(v)}" for k, v in incomplete.items())
                + "."
            )
        measured = f.get("measures_from_validation") or {}
        if measured:
            lines.append(_measures_line(name, measured))
    margins = sdc["margins_protected"]
    margins = margins if isinstance(margins, str) else "; ".join(margins)
    lines += [
        "",
        f"**Disclosure control.** Counts of 1-{sdc['policy']['threshold']} suppressed, others rounded "
        f"({sdc['policy']['rounding']}); secondary suppression over {margins}. "
        f"Of {_n(sdc['cells'])} cells, {_n(sdc['cells_suppressed'])} are suppressed "
        f"({_pct(sdc['share_of_cells_suppressed'])}); every other count is rounded, and how many of them "
        "rounding changed is not stated (it would tell which published counts are exact).",
    ]
    lines += _zeros_lines(sdc.get("zeros"))
    lines += _revision_lines(acc.get("revisions"))
    if acc.get("linkage"):
        link = acc["linkage"]
        lines += [
            "",
            f"**Linkage.** {' and '.join(link['collections'])} linked under agreement "
            f"`{link['agreement']}`, {link['method']}.",
        ]
    lines += [
        "",
        "## Timeliness and punctuality",
        "",
        f"Period end {tp['period_end']}; published {st['release']['published_at']}: "
        f"{tp.get('days_from_period_end_to_publication')} days after the period end, against a target of "
        f"{tp['target_days_after_period_end']} days ({'punctual' if tp.get('punctual') else 'late'}). "
        f"Data last received {tp.get('data_last_received_at')}.",
        "",
        "## Accessibility and clarity",
        "",
        f"Files: {', '.join('`' + f + '`' for f in ac['files'])}; data dictionary `{ac['dictionary']}`; "
        f"methods `{ac['methods']}`. Licence: {ac['licence']}. Suppressed cells: {ac['suppression_marker']}.",
        "",
        "## Comparability and coherence",
        "",
        "Contracts: "
        + ", ".join(f"{k} v{v}" for k, v in cc["contracts"].items())
        + ". Code lists: "
        + (", ".join(f"{k} ({v['version']}, {v['system']})" for k, v in cc["code_lists"].items()) or "none")
        + ".",
        "",
    ]
    lines += [f"- {note}" for note in cc["coherence"]]
    lines += ["", "Changes since the last release:", ""]
    lines += [f"- {change}" for change in cc["changes_since_last_release"]]
    return "\n".join(lines) + "\n"
