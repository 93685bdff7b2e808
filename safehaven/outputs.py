"""The anonymised aggregates the haven publishes, each protected before it is written.

Each output is a SQL query over the haven zone giving true counts of *people* per cell, per
reporting month; ``safehaven.disclosure`` then applies statistical disclosure control
(CoP 34b, 35; ISB 1523) and only the protected table is kept in the ``published`` zone.
Anonymised aggregates include everyone by default: the national data opt-out covers
confidential information only, and these are not confidential (BRIEF "Objections").
Labels come from the contracts' code lists (CoP 46), so a published code can be resolved.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb

from safehaven.contracts import ContractRegistry
from safehaven.rules import lit

CODES = "governance.code_list"

AGE_BAND_SQL = """CASE
  WHEN {age} < 18 THEN '0-17' WHEN {age} < 45 THEN '18-44' WHEN {age} < 65 THEN '45-64'
  WHEN {age} < 75 THEN '65-74' WHEN {age} < 85 THEN '75-84' ELSE '85+' END"""


def age_band_sql(birth_week: str, at: str) -> str:
    """Age band at a date; age from the week of birth (the haven holds no full date of birth)."""
    return AGE_BAND_SQL.format(age=f"date_diff('year', {birth_week}, {at})")


@dataclass(frozen=True)
class Output:
    """An anonymised aggregate: its name, what it counts, its dimensions and its query."""

    name: str
    title: str
    description: str
    collections: tuple[str, ...]
    dimensions: tuple[str, ...]
    sql: str
    count_col: str = "people"
    linked: bool = False


def label(code_list: str, expr: str) -> str:
    return f"(SELECT display FROM {CODES} WHERE list = {lit(code_list)} AND code = {expr})"


def group_of(code_list: str, expr: str) -> str:
    return f"coalesce((SELECT grp FROM {CODES} WHERE list = {lit(code_list)} AND code = {expr}), 'Unknown')"


OUTPUTS: tuple[Output, ...] = (
    Output(
        name="gp_activity",
        title="People with GP-recorded diagnoses, by diagnosis group, practice, age band and sex",
        description="Distinct people with at least one coded diagnosis event in the month.",
        collections=("gp_events",),
        dimensions=("month", "practice_code", "diagnosis_group", "age_band", "sex"),
        sql=f"""
SELECT CAST(date_trunc('month', event_date) AS DATE) AS month, practice_code,
       {group_of('snomed_gp_diagnoses', 'diagnosis_code')} AS diagnosis_group,
       {age_band_sql('birth_week', 'event_date')} AS age_band,
       coalesce({label('person_gender', 'sex')}, 'Unknown') AS sex,
       count(DISTINCT pid) AS people
FROM haven.gp_events GROUP BY ALL""",
    ),
    Output(
        name="hospital_admissions",
        title="People admitted to hospital, by primary diagnosis chapter and provider",
        description="Distinct people with an admission in the month.",
        collections=("hospital_episodes",),
        dimensions=("month", "provider_code", "diagnosis_chapter"),
        sql=f"""
SELECT CAST(date_trunc('month', admission_date) AS DATE) AS month, provider_code,
       {group_of('icd10', 'upper(left(primary_diagnosis, 3))')} AS diagnosis_chapter,
       count(DISTINCT pid) AS people
FROM haven.hospital_episodes GROUP BY ALL""",
    ),
    Output(
        name="social_care_users",
        title="Adult social care service users, by local authority and service type",
        description="Distinct people whose service started in the month.",
        collections=("social_care",),
        dimensions=("month", "local_authority", "service_type"),
        sql=f"""
SELECT CAST(date_trunc('month', start_date) AS DATE) AS month,
       coalesce({label('ons_local_authorities', 'local_authority_code')}, local_authority_code) AS local_authority,
       coalesce({label('asc_service_types', 'service_type')}, service_type) AS service_type,
       count(DISTINCT pid) AS people
FROM haven.social_care GROUP BY ALL""",
    ),
)


def load_code_lists(con: duckdb.DuckDBPyConnection, registry: ContractRegistry) -> int:
    """Refresh the store's copy of every code list the contracts use (reference data)."""
    con.execute(
        f"CREATE OR REPLACE TABLE {CODES} (list VARCHAR, code VARCHAR, display VARCHAR, grp VARCHAR, "
        "system VARCHAR, version VARCHAR)"
    )
    names = sorted({f.rule.code_list for c in registry.contracts.values() for f in c.fields
                    if f.rule and f.rule.code_list})
    rows = []
    for name in names:
        cl = registry.code_list(name)
        rows += [(name, str(c["code"]), c.get("display"), c.get("group"), cl.system, cl.version)
                 for c in cl.codes]
    con.executemany(f"INSERT INTO {CODES} VALUES (?, ?, ?, ?, ?, ?)", rows)
    return len(rows)
