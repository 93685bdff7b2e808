"""The plain-DuckDB baseline: the nightly job's work, written by hand, with no framework.

What a competent engineer would write in one script to do the same work as the pipeline
on the same drop, so the pipeline's cost can be judged against it:

* **ingest**: each collection's CSV into a landing table, every column as text (the same
  ``read_csv`` options as a strict reader: header, quote, escape, no auto-detection).
* **validate**: the contracts' rules, written out here as SQL (nothing is compiled from the
  project, except the NHS number's canonical form and check digit, which have one definition in
  ``safehaven.core.identifiers``): required fields; NHS number canonicalised (Unicode spaces and
  dashes removed), ten digits, mod-11 check digit, and a spreadsheet's float or scientific
  rendering also failing its own rule; ISO dates that parse, within their plausible
  range (dates of birth from 1900, other dates from 2000, none after today); codes in their
  code lists (ICD-10 on the first three characters); postcode, ODS and GSS formats;
  cross-field order rules (event/admission/service not before birth, discharge/end not
  before admission/start, withdrawal not before recording). A missing value breaks only its
  field's ``required`` rule, as in the contracts. Each row gets the list of rules it breaks;
  a batch whose invalid share is over its tolerance (5%, objections 0%) is refused whole.
  Valid rows go on typed; failing rows are kept with their rule ids.
* **objections**: HMAC pseudonym of each objector; the latest statement about each (person,
  type, recorded date) wins; in force from its recorded date until withdrawn.
* **pseudonymise**: HMAC-SHA256 (RFC 2104, written in SQL over blobs, first 128 bits as
  hex) of the canonical NHS number, once per distinct number and joined back; date of birth
  to its ISO week, postcode to its district; GP records about type 1 objectors dropped and
  counted per sending practice.
* **aggregate**: the four published counts of distinct people per calendar month of the
  reporting period (GP activity by practice, diagnosis group, age band and sex; hospital
  admissions by provider and ICD-10 chapter; social care users by local authority and
  service type; and the linked one: people starting social care within 14 days of a hospital
  discharge, by provider, local authority and service type), each on its full grid of
  declared and observed values with empty cells as 0, then disclosure control: counts 1-7
  suppressed, others rounded to the nearest 5, secondary suppression along every dimension
  (along the providers only for the linked one, as its declared margins say) to a fixed point
  (the smallest unsuppressed non-zero cell of a group with exactly one suppressed cell);
  written in public form (one boolean marker, labels, text neutralised).
* **publish**: CSV and Parquet per output, and an unencrypted ``published.duckdb``.

The code lists are read from ``data_contracts/code_lists/*.yaml`` as reference data (they
are the data the rules refer to). The store is an encrypted DuckDB file
(``ATTACH ... (ENCRYPTION_KEY ...)`` after loading the signed httpfs extension), like the
pipeline's, and DuckDB is set as the pipeline's store sets it: no row-group merges at
checkpoints (``safehaven.core.store.MAX_VACUUM_TASKS``; with DuckDB's default the baseline's
night at 909,091 patients took 39.2 s, with the store's setting 31.8 s, its landing 15.5 -> 9.6 s:
a yardstick left at the default would credit the pipeline with an engine setting); ``--plain``
runs the same SQL on an unencrypted file in the same storage format (``STORAGE_VERSION
'v1.4.0'``, which an encrypted file implies) to show the cost of encryption.
Run as a worker by ``benchmarks.run``::

    python -m benchmarks.baseline --drop DIR --work DIR --out result.json [--plain] [--threads N] [--append]

With ``--append`` (the multi-night benchmark) the database in ``--work`` persists from night to
night: each night lands and validates its own drop, adds its records to the haven and its
objection statements to the register, and rebuilds the outputs over the whole haven.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import secrets  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from datetime import date, timedelta  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import duckdb  # noqa: E402
import yaml  # noqa: E402

from benchmarks.common import CONTENT, Clock, peak_rss_bytes, write_json  # noqa: E402
from safehaven.core.identifiers import canonical_nhs_sql, nhs_valid_sql, spreadsheet_sql  # noqa: E402

CODE_LISTS = Path(__file__).resolve().parents[1] / "data_contracts" / "code_lists"
TOLERANCE = {"gp_events": 0.05, "hospital_episodes": 0.05, "social_care": 0.05, "objections": 0.0}
THRESHOLD = 7

COLUMNS = {
    "gp_events": ("practice_code", "nhs_number", "date_of_birth", "sex", "postcode", "event_date", "diagnosis_code"),
    "hospital_episodes": (
        "provider_code",
        "nhs_number",
        "date_of_birth",
        "sex",
        "postcode",
        "admission_date",
        "discharge_date",
        "primary_diagnosis",
    ),
    "social_care": (
        "local_authority_code",
        "service_type",
        "start_date",
        "end_date",
        "nhs_number",
        "date_of_birth",
        "sex",
        "postcode",
    ),
    "objections": ("nhs_number", "objection_type", "recorded_date", "withdrawn_date", "source_practice"),
}


# --- small SQL helpers (written here; nothing is compiled from the project) -----------------


def _txt(col: str) -> str:
    return f"nullif(trim({col}), '')"


def _date(col: str) -> str:
    return f"CAST(try_strptime(nullif(trim({col}), ''), '%Y-%m-%d') AS DATE)"


def _codes(values: list[str]) -> str:
    return "(" + ", ".join("'" + v.replace("'", "''") + "'" for v in values) + ")"


#: The NHS number rule and canonical form, from the one place that defines them.
NHS_OK = nhs_valid_sql("nhs")
#: A present NHS number that breaks the rule. ``nhs_valid_sql`` is false (not NULL) on NULL, so
#: without the guard a missing number would also fail ``nhs_number.nhs_number``; a missing value
#: fails only its ``required`` rule (``safehaven.intake.contracts``).
NHS_BAD = f"nhs IS NOT NULL AND NOT {NHS_OK}"
NHS_CANON = canonical_nhs_sql("nhs_number")
#: A spreadsheet's float or scientific rendering (true for such values, NULL for NULL).
NHS_SPREADSHEET = spreadsheet_sql("nhs")
POSTCODE_RE = "[A-Z]{1,2}[0-9][A-Z0-9]? ?[0-9][A-Z]{2}"
ODS_RE = "[A-Z0-9]{3,6}"


def _fail(rule: str, bad: str) -> str:
    """A list item: the rule id when ``bad`` is true (NULL counts as not failing)."""
    return f"CASE WHEN {bad} THEN '{rule}' END"


def _date_rules(name: str, low: str, required: bool = True) -> list[str]:
    items = [_fail(f"{name}.required", f"{name}_raw IS NULL")] if required else []
    items += [
        _fail(f"{name}.type", f"{name}_raw IS NOT NULL AND {name} IS NULL"),
        _fail(f"{name}.range", f"NOT ({name} BETWEEN DATE '{low}' AND current_date)"),
    ]
    return items


def load_code_lists() -> dict[str, list[dict[str, str]]]:
    lists = {}
    for path in sorted(CODE_LISTS.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        lists[doc["name"]] = [{k: str(v) for k, v in c.items()} for c in doc["codes"]]
    return lists


def _person_typed() -> str:
    """Typed person columns (every content collection): canonical NHS number, date of birth, sex, postcode."""
    return f"""{NHS_CANON} AS nhs,
  {_txt("date_of_birth")} AS date_of_birth_raw, {_date("date_of_birth")} AS date_of_birth,
  {_txt("sex")} AS sex, upper({_txt("postcode")}) AS postcode"""


def _person_rules(codes: Callable[[str], str]) -> list[str]:
    """The person rules of every content collection: NHS number, date of birth, sex, postcode."""
    return [
        _fail("nhs_number.required", "nhs IS NULL"),
        _fail("nhs_number.nhs_number", NHS_BAD),
        _fail("nhs_number.spreadsheet", NHS_SPREADSHEET),
        *_date_rules("date_of_birth", "1900-01-01"),
        _fail("sex.required", "sex IS NULL"),
        _fail("sex.code_list", f"sex NOT IN {codes('person_gender')}"),
        _fail("postcode.required", "postcode IS NULL"),
        _fail("postcode.format", f"NOT regexp_full_match(postcode, '{POSTCODE_RE}')"),
    ]


def rules(collection: str, lists: dict[str, list[dict[str, str]]]) -> tuple[str, list[str]]:
    """The typed columns over ``landing.<collection>`` and its rules, one list item per rule."""

    def codes(name: str) -> str:
        return _codes([c["code"] for c in lists[name]])

    if collection == "gp_events":
        typed = f"""
  {_txt("practice_code")} AS practice_code, {_person_typed()},
  {_txt("event_date")} AS event_date_raw, {_date("event_date")} AS event_date,
  {_txt("diagnosis_code")} AS diagnosis_code"""
        items = [
            _fail("practice_code.required", "practice_code IS NULL"),
            _fail("practice_code.format", f"NOT regexp_full_match(practice_code, '{ODS_RE}')"),
            *_person_rules(codes),
            *_date_rules("event_date", "2000-01-01"),
            _fail("diagnosis_code.required", "diagnosis_code IS NULL"),
            _fail("diagnosis_code.code_list", f"diagnosis_code NOT IN {codes('snomed_gp_diagnoses')}"),
            _fail("event_not_before_birth", "event_date < date_of_birth"),
        ]
    elif collection == "hospital_episodes":
        typed = f"""
  {_txt("provider_code")} AS provider_code, {_person_typed()},
  {_txt("admission_date")} AS admission_date_raw, {_date("admission_date")} AS admission_date,
  {_txt("discharge_date")} AS discharge_date_raw, {_date("discharge_date")} AS discharge_date,
  {_txt("primary_diagnosis")} AS primary_diagnosis"""
        items = [
            _fail("provider_code.required", "provider_code IS NULL"),
            _fail("provider_code.format", f"NOT regexp_full_match(provider_code, '{ODS_RE}')"),
            *_person_rules(codes),
            *_date_rules("admission_date", "2000-01-01"),
            *_date_rules("discharge_date", "2000-01-01"),
            _fail("primary_diagnosis.required", "primary_diagnosis IS NULL"),
            _fail("primary_diagnosis.code_list", f"upper(left(primary_diagnosis, 3)) NOT IN {codes('icd10')}"),
            _fail("discharge_not_before_admission", "discharge_date < admission_date"),
            _fail("admission_not_before_birth", "admission_date < date_of_birth"),
        ]
    elif collection == "social_care":
        typed = f"""
  {_txt("local_authority_code")} AS local_authority_code, {_txt("service_type")} AS service_type,
  {_txt("start_date")} AS start_date_raw, {_date("start_date")} AS start_date,
  {_txt("end_date")} AS end_date_raw, {_date("end_date")} AS end_date, {_person_typed()}"""
        items = [
            _fail("local_authority_code.required", "local_authority_code IS NULL"),
            _fail("local_authority_code.code_list", f"local_authority_code NOT IN {codes('ons_local_authorities')}"),
            _fail("service_type.required", "service_type IS NULL"),
            _fail("service_type.code_list", f"service_type NOT IN {codes('asc_service_types')}"),
            *_date_rules("start_date", "2000-01-01"),
            *_date_rules("end_date", "2000-01-01", required=False),
            *_person_rules(codes),
            _fail("end_not_before_start", "end_date < start_date"),
            _fail("start_not_before_birth", "start_date < date_of_birth"),
        ]
    elif collection == "objections":
        typed = f"""
  {NHS_CANON} AS nhs, {_txt("objection_type")} AS objection_type,
  {_txt("recorded_date")} AS recorded_date_raw, {_date("recorded_date")} AS recorded_date,
  {_txt("withdrawn_date")} AS withdrawn_date_raw, {_date("withdrawn_date")} AS withdrawn_date,
  {_txt("source_practice")} AS source_practice"""
        items = [
            _fail("nhs_number.required", "nhs IS NULL"),
            _fail("nhs_number.nhs_number", NHS_BAD),
            _fail("nhs_number.spreadsheet", NHS_SPREADSHEET),
            _fail("objection_type.required", "objection_type IS NULL"),
            _fail("objection_type.code_list", f"objection_type NOT IN {codes('objection_types')}"),
            *_date_rules("recorded_date", "2000-01-01"),
            *_date_rules("withdrawn_date", "2000-01-01", required=False),
            _fail("source_practice.format", f"NOT regexp_full_match(source_practice, '{ODS_RE}')"),
            _fail("withdrawn_not_before_recorded", "withdrawn_date < recorded_date"),
        ]
    else:
        raise ValueError(collection)
    return typed, items


def checks_sql(collection: str, lists: dict[str, list[dict[str, str]]]) -> str:
    """SELECT over ``landing.<collection>``: typed columns plus ``failed`` (rule ids broken)."""
    typed, items = rules(collection, lists)
    failed = "list_filter([" + ", ".join(items) + "], x -> x IS NOT NULL)"
    return f"SELECT *, {failed} AS failed FROM (SELECT _row, {typed}\nFROM landing.{collection})"


#: Valid, typed columns of each collection (the canonical NHS number as ``nhs_number``).
VALID_COLUMNS = {
    c: ", ".join("nhs AS nhs_number" if x == "nhs_number" else x for x in cols) for c, cols in COLUMNS.items()
}

#: RFC 2104 over blobs with the padded key blocks from the one-row table ``k``; first 128 bits as hex.
HMAC = "left(sha256(k.opad || unhex(sha256(k.ipad || encode(nhs_number)))), 32)"
DISTRICT = (
    "CASE WHEN v.postcode IS NULL THEN NULL ELSE "
    "left(replace(v.postcode, ' ', ''), length(replace(v.postcode, ' ', '')) - 3) END"
)
WEEK = "CAST(date_trunc('week', v.date_of_birth) AS DATE)"
#: Haven columns: the pseudonym, no NHS number, birth week, postcode district.
HAVEN_COLUMNS = {
    "gp_events": f"i.pid, v.practice_code, {WEEK} AS birth_week, v.sex, {DISTRICT} AS postcode_district, "
    "v.event_date, v.diagnosis_code, v._row",
    "hospital_episodes": f"i.pid, v.provider_code, {WEEK} AS birth_week, v.sex, {DISTRICT} AS postcode_district, "
    "v.admission_date, v.discharge_date, v.primary_diagnosis, v._row",
    "social_care": f"i.pid, v.local_authority_code, v.service_type, v.start_date, v.end_date, {WEEK} AS birth_week, "
    f"v.sex, {DISTRICT} AS postcode_district, v._row",
}
#: The field dating each record (the reporting period is built from it).
PERIOD_FIELD = {"gp_events": "event_date", "hospital_episodes": "admission_date", "social_care": "start_date"}

AGE_BAND = """CASE WHEN age < 18 THEN '0-17' WHEN age < 45 THEN '18-44' WHEN age < 65 THEN '45-64'
  WHEN age < 75 THEN '65-74' WHEN age < 85 THEN '75-84' ELSE '85+' END"""


def _list(name: str, part: str = "code") -> str:
    """The declared values of a code list (codes or groups), as a relation of one column."""
    return f"SELECT DISTINCT {part} FROM governance.code_list WHERE list = '{name}' AND {part} IS NOT NULL"


def _values(*values: str) -> str:
    return f"SELECT unnest([{', '.join(repr(v) for v in values)}])"


#: The value a code-list domain declares besides its list (``also: [Unknown]``): a code not grouped.
UNKNOWN = " UNION SELECT 'Unknown'"

#: The trusts ``hospital_admissions`` declares (its ``provider_code`` domain).
TRUSTS = ("R0A", "RA7", "REM", "RHQ", "RJ1", "RR1", "RR8", "RRK", "RTD", "RTK", "RWF", "RX1")


@dataclass(frozen=True)
class Out:
    """One published output: its dimensions (each with the relation of its declared values, or
    None for "the values observed"), the labels added after protection, its collections and its
    count query (``months`` is the reporting period)."""

    dims: tuple[tuple[str, str | None], ...]
    labels: tuple[tuple[str, str, str], ...]  # (column, dimension, code list)
    collections: tuple[str, ...]
    sql: str
    #: the dimensions secondary suppression runs along (the output's declared ``margins``: each
    #: group holds the others fixed); None: every dimension
    along: tuple[str, ...] | None = None


OUTPUTS: dict[str, Out] = {
    # People with a GP-coded diagnosis in the month, by practice, diagnosis group, age band at the
    # start of the month (completed years from the week of birth) and sex (codes 0 and 9 combined).
    "gp_activity": Out(
        (
            ("month", "SELECT month FROM months"),
            ("practice_code", None),
            ("diagnosis_group", _list("snomed_gp_diagnoses", "grp") + UNKNOWN),
            ("age_band", _values("0-17", "18-44", "45-64", "65-74", "75-84", "85+")),
            ("sex", _values("Female", "Male", "Not known")),
        ),
        (),
        ("gp_events",),
        f"""
SELECT month, practice_code, coalesce(d.grp, 'Unknown') AS diagnosis_group, {AGE_BAND} AS age_band,
       CASE s.grp WHEN 'Male' THEN 'Male' WHEN 'Female' THEN 'Female' ELSE 'Not known' END AS sex,
       count(DISTINCT pid) AS people
FROM (SELECT *, CAST(date_trunc('month', event_date) AS DATE) AS month,
             date_sub('year', birth_week, CAST(date_trunc('month', event_date) AS DATE)) AS age
      FROM haven.gp_events
      WHERE event_date BETWEEN (SELECT min(month) FROM months) AND (SELECT max(month_end) FROM months)) e
LEFT JOIN governance.code_list d ON d.list = 'snomed_gp_diagnoses' AND d.code = e.diagnosis_code
LEFT JOIN governance.code_list s ON s.list = 'person_gender' AND s.code = e.sex
GROUP BY ALL""",
    ),
    # People admitted in the month, by provider and ICD-10 chapter of the primary diagnosis.
    "hospital_admissions": Out(
        (
            ("month", "SELECT month FROM months"),
            ("provider_code", _values(*TRUSTS)),
            ("diagnosis_chapter", _list("icd10", "grp") + UNKNOWN),
        ),
        (),
        ("hospital_episodes",),
        """
SELECT CAST(date_trunc('month', admission_date) AS DATE) AS month, provider_code,
       coalesce(c.grp, 'Unknown') AS diagnosis_chapter, count(DISTINCT pid) AS people
FROM haven.hospital_episodes h
LEFT JOIN governance.code_list c ON c.list = 'icd10' AND c.code = upper(left(h.primary_diagnosis, 3))
WHERE admission_date BETWEEN (SELECT min(month) FROM months) AND (SELECT max(month_end) FROM months)
GROUP BY ALL""",
    ),
    # People receiving a service at any time in the month (ongoing when there is no end date).
    "social_care_users": Out(
        (
            ("month", "SELECT month FROM months"),
            ("local_authority_code", _list("ons_local_authorities")),
            ("service_type", _list("asc_service_types")),
        ),
        (
            ("local_authority_name", "local_authority_code", "ons_local_authorities"),
            ("service_type_name", "service_type", "asc_service_types"),
        ),
        ("social_care",),
        """
SELECT m.month, s.local_authority_code, s.service_type, count(DISTINCT s.pid) AS people
FROM haven.social_care s
JOIN months m ON s.start_date <= m.month_end AND (s.end_date IS NULL OR s.end_date >= m.month)
GROUP BY ALL""",
    ),
    # Linkage: people discharged in the month who start social care within 14 days, by provider,
    # local authority and service type; only months whose whole follow-up is inside the period.
    "discharge_to_social_care": Out(
        (
            ("month", "SELECT month FROM months WHERE month_end + 14 <= (SELECT max(month_end) FROM months)"),
            ("provider_code", "SELECT DISTINCT provider_code FROM haven.hospital_episodes"),
            ("local_authority_code", _list("ons_local_authorities")),
            ("service_type", _list("asc_service_types")),
        ),
        (
            ("local_authority_name", "local_authority_code", "ons_local_authorities"),
            ("service_type_name", "service_type", "asc_service_types"),
        ),
        ("hospital_episodes", "social_care"),
        """
SELECT d.month, d.provider_code, s.local_authority_code, s.service_type, count(DISTINCT d.pid) AS people
FROM (SELECT pid, provider_code, discharge_date, CAST(date_trunc('month', discharge_date) AS DATE) AS month
      FROM haven.hospital_episodes
      WHERE discharge_date >= (SELECT min(month) FROM months)
        AND discharge_date <= (SELECT max(month_end) FROM months
                               WHERE month_end + 14 <= (SELECT max(month_end) FROM months))) d
JOIN haven.social_care s ON s.pid = d.pid AND s.start_date BETWEEN d.discharge_date AND d.discharge_date + 14
GROUP BY ALL""",
        along=("provider_code",),  # margins: [[month, local_authority_code, service_type]]
    ),
}


def reporting_months(con: duckdb.DuckDBPyConnection, collections: tuple[str, ...]) -> None:
    """Temp table ``months``: from the first month any collection covers to the last complete
    month (before today's) that all of them cover."""
    cap = date.today().replace(day=1) - timedelta(days=1)
    starts, ends = [], []
    for c in collections:
        lo, hi = con.execute(f"SELECT min({PERIOD_FIELD[c]}), max({PERIOD_FIELD[c]}) FROM haven.{c}").fetchone()
        starts.append(lo.replace(day=1))
        ends.append(min((hi.replace(day=1) + timedelta(days=32)).replace(day=1) - timedelta(days=1), cap))
    con.execute(
        """CREATE OR REPLACE TEMP TABLE months AS
SELECT CAST(m AS DATE) AS month, CAST(m + INTERVAL 1 MONTH - INTERVAL 1 DAY AS DATE) AS month_end
FROM generate_series(CAST(? AS TIMESTAMP), CAST(? AS TIMESTAMP), INTERVAL 1 MONTH) g(m)""",
        [min(starts), min(ends)],
    )


def _ident(name: str) -> str:
    return '"' + name + '"'


def _neutral(col: str) -> str:
    """Formula-leading text gets a leading quote (CSV injection), tested as the pipeline tests it
    (``disclosure.tables.formula_led_sql``: one ``regexp_matches``, which DuckDB plans far faster)."""
    return f"CASE WHEN regexp_matches({col}, '^[=+\\-@\t\r]') THEN '''' || {col} ELSE {col} END"


#: Cells another output proves to be 0: a service starting within 14 days of a discharge in month M
#: is in use in M or M+1, so where social_care_users publishes 0 (a true 0) for the local authority
#: and service in both months, the discharge cell is 0 too.
KNOWN_ZERO = {
    "discharge_to_social_care": """UPDATE w SET a = true
FROM published.social_care_users u0, published.social_care_users u1
WHERE u0.month = w.month AND u1.month = CAST(w.month + INTERVAL 1 MONTH AS DATE)
  AND u0.local_authority_code = w.local_authority_code AND u1.local_authority_code = w.local_authority_code
  AND u0.service_type = w.service_type AND u1.service_type = w.service_type AND u0.people = 0 AND u1.people = 0"""
}


def protect(con: duckdb.DuckDBPyConnection, name: str, out: Out) -> dict[str, int]:
    """True counts on the full grid -> ``published.<name>`` under disclosure control, public form."""
    dims = [d for d, _ in out.dims]
    d = ", ".join(_ident(x) for x in dims)
    con.execute(f"CREATE OR REPLACE TEMP TABLE cells AS {out.sql}")
    domains = []
    for dim, declared in out.dims:
        if declared is None:  # observed: the values in the cells
            domains.append(f"(SELECT DISTINCT {dim} FROM cells)")
        else:  # declared: exactly these values (any other value is an error)
            domains.append(f"(SELECT DISTINCT v AS {dim} FROM ({declared}) s(v))")
    grid = " CROSS JOIN ".join(domains)
    outside = con.execute(f"SELECT count(*) FROM cells ANTI JOIN (SELECT * FROM {grid}) USING ({d})").fetchone()[0]
    if outside:
        raise RuntimeError(f"{name}: {outside} cells outside the declared grid")
    # Cells numbered in dimension order; counts of 1..7 people suppressed (primary).
    con.execute(f"""CREATE OR REPLACE TEMP TABLE w AS
SELECT row_number() OVER (ORDER BY {d}) AS cell, {d}, n,
       CASE WHEN n BETWEEN 1 AND {THRESHOLD} THEN 'primary' END AS s
FROM (SELECT g.*, CAST(coalesce(c.people, 0) AS BIGINT) AS n
      FROM (SELECT * FROM {grid}) g LEFT JOIN cells c USING ({d}))""")
    # Joint protection: a cell that another output already proves to be 0 is chosen last as a secondary.
    con.execute("ALTER TABLE w ADD COLUMN a BOOLEAN DEFAULT false")
    if name in KNOWN_ZERO:
        con.execute(KNOWN_ZERO[name])
    # Secondary suppression along every dimension until nothing changes: in each group (all other
    # dimensions fixed) holding exactly one suppressed cell, suppress its smallest other non-zero cell.
    passes = 0
    while True:
        passes += 1
        changed = 0
        for along in out.along or dims:
            margin = ", ".join(_ident(x) for x in dims if x != along)
            part = f"PARTITION BY {margin}" if margin else ""
            rank_part = f"PARTITION BY {margin + ', ' if margin else ''}(s IS NULL)"
            changed += con.execute(f"""
UPDATE w SET s = 'secondary' WHERE cell IN (
  SELECT cell FROM (SELECT cell, s, count(s) OVER ({part}) AS n_supp, count(*) OVER ({part}) AS n_cells,
                           row_number() OVER ({rank_part} ORDER BY a, (n = 0), n, cell) AS rk FROM w)
  WHERE s IS NULL AND n_supp = 1 AND n_cells > 1 AND rk = 1)""").fetchone()[0]
        if not changed:
            break
    # Public form: counts rounded to 5, NULL where suppressed, one boolean marker, labels after
    # the dimensions, formula-leading text neutralised.
    cols = [f"{_neutral('w.' + _ident(x))} AS {_ident(x)}" if x != "month" else "w.month" for x in dims]
    joins = ""
    for i, (column, dim, code_list) in enumerate(out.labels):
        cols.append(f"{_neutral(f'l{i}.display')} AS {column}")
        joins += f" LEFT JOIN governance.code_list l{i} ON l{i}.list = '{code_list}' AND l{i}.code = w.{dim}"
    cols += ["CASE WHEN s IS NULL THEN ((n + 2) // 5) * 5 END AS people", "s IS NOT NULL AS suppressed"]
    con.execute(
        f"CREATE OR REPLACE TABLE published.{name} AS SELECT {', '.join(cols)} FROM w{joins} "
        f"ORDER BY {', '.join('w.' + _ident(x) + ' NULLS LAST' for x in dims)}"
    )
    row = con.execute(
        "SELECT count(*), count(*) FILTER (WHERE s = 'primary'), "
        "count(*) FILTER (WHERE s = 'secondary'), coalesce(sum(n), 0) FROM w"
    ).fetchone()
    con.execute("DROP TABLE w")
    con.execute("DROP TABLE cells")
    return {"cells": row[0], "primary": row[1], "secondary": row[2], "people": int(row[3]), "passes": passes}


def _keys(work: Path, append: bool) -> tuple[str, bytes]:
    """The store's encryption key (hex) and the HMAC key: fresh, or kept in ``work`` across nights."""
    if not append:
        return secrets.token_hex(32), secrets.token_bytes(32)
    path = work / "keys.json"
    if not path.exists():
        path.write_text(json.dumps({"store": secrets.token_hex(32), "hmac": secrets.token_hex(32)}))
        path.chmod(0o600)
    doc = json.loads(path.read_text())
    return doc["store"], bytes.fromhex(doc["hmac"])


def _into(con: duckdb.DuckDBPyConnection, table: str, select: str, append: bool) -> None:
    """``CREATE TABLE table AS select``; with ``append``, create it empty if missing and insert."""
    if not append:
        con.execute(f"CREATE TABLE {table} AS {select}")
        return
    con.execute(f"CREATE TABLE IF NOT EXISTS {table} AS SELECT * FROM ({select}) LIMIT 0")
    con.execute(f"INSERT INTO {table} {select}")


def _rows(con: duckdb.DuckDBPyConnection, table: str, what: str = "count(*)") -> int:
    """``what`` (an integer aggregate) over ``table``; 0 if the table does not exist yet."""
    schema, name = table.split(".")
    exists = con.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE database_name = current_database() "
        "AND schema_name = ? AND table_name = ?",
        [schema, name],
    ).fetchone()[0]
    return int(con.execute(f"SELECT coalesce({what}, 0) FROM {table}").fetchone()[0]) if exists else 0


def _new_counts() -> dict[str, Any]:
    """The night's per-collection counts, filled in by the stages."""
    return {"valid": {}, "rejected": {}, "failures_by_rule": {}, "refused": {}, "haven": {}, "published": {}}


def _connect(work: Path, db: Path, encrypted: bool, threads: int | None, store_key: str) -> duckdb.DuckDBPyConnection:
    """The night's database attached as ``b`` with its schemas: encrypted like the store, or plain
    in the same storage format (so only encryption differs)."""
    config: dict[str, Any] = {"temp_directory": str(work / "tmp")}
    if threads:
        config["threads"] = threads
    con = duckdb.connect(":memory:", config=config)
    from safehaven.core.store import MAX_VACUUM_TASKS  # DuckDB set as the store sets it (module docstring)

    con.execute(f"SET max_vacuum_tasks = {MAX_VACUUM_TASKS}")
    if encrypted:
        from safehaven.core.store import httpfs_extension_path  # the signed extension's installed path

        con.execute(f"LOAD '{httpfs_extension_path()}'")
        con.execute("SET temp_file_encryption = true")
        con.execute(f"ATTACH '{db}' AS b (ENCRYPTION_KEY '{store_key}')")
    else:
        # The storage format an encrypted file gets (DuckDB 1.4's), so only encryption differs:
        # a default ATTACH writes the older format, which costs about twice the CPU to write.
        con.execute(f"ATTACH '{db}' AS b (STORAGE_VERSION 'v1.4.0')")
    con.execute("USE b")
    for schema in ("landing", "haven", "governance", "published"):
        con.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
    return con


def _bind_key(con: duckdb.DuckDBPyConnection, hmac_key: bytes) -> None:
    """HMAC key blocks in the temp table ``k``, bound as parameters (key material never in SQL text)."""
    key = hmac_key.ljust(64, b"\x00")
    con.execute("CREATE TEMP TABLE k (ipad BLOB, opad BLOB)")
    con.execute("INSERT INTO k VALUES (?, ?)", [bytes(b ^ 0x36 for b in key), bytes(b ^ 0x5C for b in key)])


def _ingest(con: duckdb.DuckDBPyConnection, drop: Path, rows: dict[str, int]) -> None:
    """Land each collection's CSV files as text, strictly parsed, numbered by row: read on every
    thread in file order and numbered from the row ids the insert gave them, as the pipeline
    numbers them (``safehaven.intake.ingest.insert_numbered``; ``row_number() OVER ()`` would read
    on one thread)."""
    for c, cols in COLUMNS.items():
        spec = "{" + ", ".join(f"'{x}': 'VARCHAR'" for x in cols) + "}"
        con.execute("BEGIN")
        con.execute(f"CREATE OR REPLACE TABLE landing.{c} ({', '.join(f'{x} VARCHAR' for x in cols)}, _row BIGINT)")
        con.execute(f"""INSERT INTO landing.{c} ({", ".join(cols)}) SELECT *
FROM read_csv('{drop / c}/*.csv', header = true, delim = ',', quote = '"', escape = '"',
              columns = {spec}, strict_mode = true, auto_detect = false)""")
        con.execute(f"UPDATE landing.{c} SET _row = rowid - (SELECT min(rowid) FROM landing.{c}) + 1")
        con.execute("COMMIT")
        rows[f"ingest.{c}"] = con.execute(f"SELECT count(*) FROM landing.{c}").fetchone()[0]


def _validate_one(
    con: duckdb.DuckDBPyConnection, c: str, lists: dict[str, list[dict[str, str]]], counts: dict[str, Any]
) -> int:
    """Check one collection's rows: valid rows go on unless the batch exceeds its tolerance
    (then none do); rejected rows keep the rules they broke. Returns the rows checked."""
    con.execute(f"CREATE TEMP TABLE checked AS {checks_sql(c, lists)}")
    total, invalid = con.execute("SELECT count(*), count(*) FILTER (WHERE len(failed) > 0) FROM checked").fetchone()
    refused = total > 0 and invalid / total > TOLERANCE[c]
    con.execute(
        f"CREATE OR REPLACE TABLE landing.{c}_valid AS SELECT {VALID_COLUMNS[c]}, _row FROM checked "
        f"WHERE len(failed) = 0 AND NOT {refused}"
    )
    con.execute(
        f"CREATE OR REPLACE TABLE landing.{c}_rejected AS SELECT _row, failed FROM checked WHERE len(failed) > 0"
    )
    counts["failures_by_rule"][c] = dict(
        con.execute(
            "SELECT rule, count(*) FROM (SELECT unnest(failed) AS rule FROM checked) GROUP BY 1 ORDER BY 1"
        ).fetchall()
    )
    con.execute("DROP TABLE checked")
    counts["valid"][c] = 0 if refused else total - invalid
    counts["rejected"][c] = invalid
    counts["refused"][c] = bool(refused)
    return total


def _validate(
    con: duckdb.DuckDBPyConnection,
    lists: dict[str, list[dict[str, str]]],
    rows: dict[str, int],
    counts: dict[str, Any],
    detail: dict[str, float],
) -> None:
    """Validate every collection (``_validate_one``), timing each."""
    for c in COLUMNS:
        lap = time.perf_counter()
        rows[f"validate.{c}"] = _validate_one(con, c, lists, counts)
        detail[f"validate.{c}"] = time.perf_counter() - lap


def _objections(con: duckdb.DuckDBPyConnection, rows: dict[str, int], counts: dict[str, Any], append: bool) -> None:
    """The register (keyed by pseudonym) and its current state: the latest statement about each
    (person, type, recorded date) wins; in force from its recorded date until withdrawn.
    Later nights' statements come after earlier ones (their rows numbered on)."""
    offset = _rows(con, "governance.objection_events", "max(_row)")
    _into(
        con,
        "governance.objection_events",
        f"""SELECT {HMAC} AS pid, objection_type, recorded_date, withdrawn_date, source_practice,
  _row + {offset} AS _row FROM landing.objections_valid, k""",
        append,
    )
    con.execute("""CREATE OR REPLACE TABLE governance.objections_current AS
SELECT pid, objection_type, recorded_date, withdrawn_date,
       recorded_date <= current_date AND (withdrawn_date IS NULL OR withdrawn_date > current_date) AS in_force
FROM governance.objection_events
QUALIFY row_number() OVER (PARTITION BY pid, objection_type, recorded_date ORDER BY _row DESC) = 1""")
    counts["objections_in_force"] = dict(
        con.execute(
            "SELECT objection_type, count(DISTINCT pid) FILTER (WHERE in_force) FROM governance.objections_current "
            "GROUP BY 1"
        ).fetchall()
    )
    rows["objections"] = counts["valid"]["objections"]


def _type1_incidents(con: duckdb.DuckDBPyConnection, c: str, counts: dict[str, Any]) -> str:
    """GP-sourced records about type 1 objectors should never have been sent: record an incident
    per sending practice and return the filter that drops them (empty for other collections)."""
    if c != "gp_events":
        return ""
    incidents = con.execute(
        f"SELECT v.practice_code, count(*) FROM landing.{c}_valid v "
        "JOIN (SELECT nhs_number FROM ids WHERE type1) USING (nhs_number) GROUP BY 1 ORDER BY 1"
    ).fetchall()
    con.executemany("INSERT INTO governance.type1_incidents VALUES (now(), 'gp_events', ?, ?)", incidents)
    counts["type1_dropped"] = sum(n for _, n in incidents)
    return " WHERE NOT i.type1"


def _pseudonymise(con: duckdb.DuckDBPyConnection, rows: dict[str, int], counts: dict[str, Any], append: bool) -> None:
    """Into the haven: one HMAC per distinct NHS number, joined back to the records; type 1
    objectors' GP records dropped (``_type1_incidents``)."""
    con.execute(
        "CREATE TEMP TABLE type1 AS SELECT DISTINCT pid FROM governance.objections_current "
        "WHERE objection_type = 'type1' AND in_force"
    )
    con.execute(
        "CREATE TABLE IF NOT EXISTS governance.type1_incidents (detected_at TIMESTAMPTZ, collection VARCHAR, "
        "sender VARCHAR, records_dropped BIGINT)"
    )
    for c in CONTENT:
        con.execute(f"""CREATE OR REPLACE TEMP TABLE ids AS
SELECT nhs_number, {HMAC} AS pid, pid IN (SELECT pid FROM type1) AS type1
FROM (SELECT DISTINCT nhs_number FROM landing.{c}_valid), k""")
        where = _type1_incidents(con, c, counts)
        held = _rows(con, f"haven.{c}")
        _into(
            con,
            f"haven.{c}",
            f"SELECT {HAVEN_COLUMNS[c]} FROM landing.{c}_valid v JOIN ids i USING (nhs_number){where}",
            append,
        )
        rows[f"pseudonymise.{c}"] = counts["valid"][c]
        counts["haven"][c] = _rows(con, f"haven.{c}") - held  # this night's records
    con.execute("DROP TABLE ids")


def _aggregate(
    con: duckdb.DuckDBPyConnection,
    lists: dict[str, list[dict[str, str]]],
    rows: dict[str, int],
    counts: dict[str, Any],
) -> None:
    """The code lists as a table, then each output built and protected (``protect``)."""
    con.execute(
        "CREATE OR REPLACE TABLE governance.code_list (list VARCHAR, code VARCHAR, display VARCHAR, grp VARCHAR)"
    )
    con.executemany(
        "INSERT INTO governance.code_list VALUES (?, ?, ?, ?)",
        [(name, c["code"], c.get("display"), c.get("group")) for name, codes in lists.items() for c in codes],
    )
    for name, out in OUTPUTS.items():
        reporting_months(con, out.collections)
        counts["published"][name] = protect(con, name, out)
    rows["aggregate"] = sum(counts["haven"].values())


def _publish_files(con: duckdb.DuckDBPyConnection, published: Path) -> None:
    """Each output as CSV and Parquet, written beside and renamed into place."""
    for name in OUTPUTS:
        for ext, options in (("csv", "FORMAT csv, HEADER true"), ("parquet", "FORMAT parquet")):
            tmp = published / f".{name}.{ext}.tmp"
            con.execute(f"COPY published.{name} TO '{tmp}' ({options})")
            os.replace(tmp, published / f"{name}.{ext}")


def _publish_db(con: duckdb.DuckDBPyConnection, published: Path) -> None:
    """``published.duckdb`` for analysts, built beside and renamed into place."""
    pub_db = published / "published.duckdb"
    tmp_db = published / ".published.duckdb.tmp"
    tmp_db.unlink(missing_ok=True)
    con.execute(f"ATTACH '{tmp_db}' AS pub")
    for name in OUTPUTS:
        con.execute(f"CREATE TABLE pub.main.{name} AS SELECT * FROM published.{name}")
    con.execute("DETACH pub")
    os.replace(tmp_db, pub_db)


def _publish(con: duckdb.DuckDBPyConnection, published: Path, rows: dict[str, int], counts: dict[str, Any]) -> None:
    """Files, the analysts' database and a dictionary (column names) per output."""
    _publish_files(con, published)
    _publish_db(con, published)
    for name in OUTPUTS:
        (published / f"{name}.dictionary.json").write_text(
            json.dumps({"name": name, "columns": [r[0] for r in con.execute(f"DESCRIBE published.{name}").fetchall()]})
        )
    rows["publish"] = sum(p["cells"] for p in counts["published"].values())


def run(drop: Path, work: Path, encrypted: bool, threads: int | None, append: bool = False) -> dict[str, Any]:
    """One night's work on ``drop``; with ``append`` on the database kept in ``work`` from earlier
    nights: the night's drop is landed and validated afresh, its records and objection statements
    are added to the haven and the register, and the outputs are rebuilt over the whole haven."""
    work.mkdir(parents=True, exist_ok=True)
    db = work / "baseline.duckdb"
    if not append:
        db.unlink(missing_ok=True)
    store_key, hmac_key = _keys(work, append)
    published = work / "published"
    published.mkdir(exist_ok=True)
    (work / "tmp").mkdir(exist_ok=True)
    lists = load_code_lists()
    clock = Clock()
    rows: dict[str, int] = {}
    detail: dict[str, float] = {}
    counts = _new_counts()
    began, cpu_began = time.perf_counter(), time.process_time()
    con = _connect(work, db, encrypted, threads, store_key)
    setup = time.perf_counter() - began
    _bind_key(con, hmac_key)
    with clock("ingest"):
        _ingest(con, drop, rows)
    with clock("validate"):
        _validate(con, lists, rows, counts, detail)
    with clock("objections"):
        _objections(con, rows, counts, append)
    with clock("pseudonymise"):
        _pseudonymise(con, rows, counts, append)
    with clock("aggregate"):
        _aggregate(con, lists, rows, counts)
    with clock("publish"):
        _publish(con, published, rows, counts)
    con.execute("CHECKPOINT")
    end_to_end, cpu_end_to_end = time.perf_counter() - began, time.process_time() - cpu_began
    con.close()
    return {
        "encrypted": encrypted,
        "threads": threads,
        "seconds_import": began - _T0,
        "seconds_setup": setup,
        "seconds_end_to_end": end_to_end,
        "cpu_seconds_end_to_end": cpu_end_to_end,
        "stages": {
            name: {"seconds": s, "cpu_seconds": clock.cpu_seconds[name], "rows": _stage_rows(rows, name)}
            for name, s in clock.seconds.items()
        },
        "stage_detail": detail,
        "rows": rows,
        "counts": counts,
        "db_bytes": db.stat().st_size,
        "peak_rss_bytes": peak_rss_bytes(),
    }


def _stage_rows(rows: dict[str, int], stage: str) -> int:
    return sum(n for k, n in rows.items() if k == stage or k.startswith(stage + "."))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.baseline")
    parser.add_argument("--drop", type=Path, required=True, help="folder with <collection>/*.csv")
    parser.add_argument("--work", type=Path, required=True, help="scratch folder for the database")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--plain", action="store_true", help="unencrypted database file")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument(
        "--append",
        action="store_true",
        help="keep the database in --work from earlier nights and add this drop to it (multi-night runs)",
    )
    args = parser.parse_args(argv)
    doc = run(args.drop, args.work, not args.plain, args.threads or None, append=args.append)
    write_json(args.out, doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
