"""Seeded, vectorised synthetic data for the safe haven.

What is generated
-----------------
One synthetic population, shared by every collection so that linkage means something, written
as the files a haven finds in its ``incoming/`` folder::

    DIR/gp_events/gp_events_<YYYYMMDD>.csv                  coded GP diagnoses, ~7.5 per patient
    DIR/hospital_episodes/hospital_episodes_<YYYYMMDD>.csv  admitted patient care, ~2 per patient
    DIR/social_care/social_care_<YYYYMMDD>.csv              adult social care services, ~0.5 per patient
    DIR/objections/objections_<YYYYMMDD>.csv                type 1 objections and national opt-outs

``<YYYYMMDD>`` is the period end; the reporting period is the twelve months ending on it, and
every clean event, admission, service start and objection falls inside it.

* **Patients** have unique NHS numbers in the never-issued 999 test range with valid mod-11 check
  digits (``docs/rules.md`` "Synthetic data only"); an England-like age pyramid (0-100); a PERSON GENDER
  CODE (mostly 1/2, a few 9/0); a postcode in valid UK format, fixed per patient; and one GP
  practice each. Practices have ODS-like codes (letter + five digits) and skewed list sizes
  (lognormal, about 2k-20k at national scale; at least three practices even for tiny N). Each
  practice sits in a local authority, which fixes the patients' postcode area, the local
  authority that provides their social care and their usual hospital provider.
* **gp_events** rise with age (plus a bump in infancy); diagnoses are drawn from the SNOMED CT
  code list with age- and sex-specific weights (no prostate disease in women, no dementia in
  children).
* **hospital_episodes**: most patients have none; the chance of any admission and the number of
  episodes rise steeply with age. Primary diagnoses come from the ICD-10 list, sometimes with a
  fourth character (``I219``); discharge is never before admission.
* **social_care**: adults only, mostly older people. Part of it follows a hospital discharge
  (reablement, home care, care homes starting 0-14 days after the patient's last discharge) so
  a linked hospital-to-social-care statistic has something to count; the rest is community
  support. ``end_date`` is empty while a service is ongoing.
* **objections**: about 5% of patients have a national data opt-out and 2% a type 1 objection,
  except one practice (the median-sized one, so deterministic for a seed) where about 25% have
  a type 1 objection, for the objection-rate monitor (Govt response 7.15) to find. About 10% of
  objections are later withdrawn. ``source_practice`` is filled for type 1 objections only (the
  practice where it was recorded; the collection contract makes it optional).

Why it looks like this
----------------------
No real patient data exists in the project. The data has to exercise every rule the haven
enforces, so it carries, deliberately:

* NHS numbers formatted three ways (``9991234567``, ``999 123 4567``, ``999-123-4567``; the same
  patient may be formatted differently in different rows and files), so canonicalisation is
  tested on every load (CoP 11-14: formatting never lets an objector through);
* defects at ``defect_rate`` of the rows of gp_events, hospital_episodes and social_care, one per
  defective row: a bad check digit, an unknown code, an impossible date (event before birth,
  discharge/end before admission/start, a date about ten years after the period end, or an
  unparseable date such as ``2025-13-45``) or a missing required value. Date columns are
  therefore text in the files. The defect count per collection is exactly
  ``round(defect_rate * rows)``, so quality measures (CoP 4, 28-29) can be checked;
* realistic skew (small practices, rare diagnoses, few very old people) so statistical
  disclosure control has small cells to suppress.

Everything is vectorised (numpy ``default_rng(seed)`` + polars): there are loops over
collections, code lists, strata and defect kinds, never over rows or patients. The same
arguments give byte-identical files.

Capacity: the 999 range holds 1,000,000 nine-digit prefixes, of which 909,091 have a usable check
digit (the others would need check digit 10). That is the largest population that can have
unique, valid test numbers; ``generate`` refuses more (``MAX_PATIENTS``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from functools import lru_cache
from pathlib import Path

import numpy as np
import polars as pl

from safehaven.core import yamlio
from safehaven.core.identifiers import MODULUS, WEIGHTS

#: Where the code lists live (``data_contracts/code_lists/<name>.yaml``).
CODE_LIST_DIR: Path = Path(__file__).resolve().parents[2] / "data_contracts" / "code_lists"

#: The collections written, with their columns in file order.
COLUMNS: dict[str, tuple[str, ...]] = {
    "gp_events": (
        "practice_code",
        "nhs_number",
        "date_of_birth",
        "sex",
        "postcode",
        "event_date",
        "diagnosis_code",
    ),
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
    "objections": (
        "nhs_number",
        "objection_type",
        "recorded_date",
        "withdrawn_date",
        "source_practice",
    ),
}

#: Collections that receive defects (objections are the haven's own reference data: clean).
DEFECT_COLLECTIONS: tuple[str, ...] = ("gp_events", "hospital_episodes", "social_care")

#: Valid 999-range NHS numbers: 1,000,000 prefixes less those whose check digit would be 10.
MAX_PATIENTS: int = 909_091

# Volumes and rates (per patient unless stated).
GP_EVENTS_PER_PATIENT = 7.5
EPISODES_PER_PATIENT = 2.0
SOCIAL_CARE_ROWS_PER_PATIENT = 0.5
NATIONAL_OPT_OUT_RATE = 0.05
TYPE1_RATE = 0.02
OUTLIER_TYPE1_RATE = 0.25
WITHDRAWN_SHARE = 0.10
MEAN_LIST_SIZE = 8_500
#: Shares of NHS numbers written plain, "999 123 4567" and "999-123-4567".
NHS_FORMAT_SHARES = (0.85, 0.10, 0.05)
#: "Future" defect dates are this many days (plus up to a year) after the period end.
FUTURE_OFFSET_DAYS = 3_650

_EPOCH = date(1970, 1, 1)
#: Day number standing for an empty (optional) date. Real day numbers are negative before 1970.
NO_DATE = -(10**9)

#: England-like population shares by five-year age band (0-4 ... 95-99, then 100), per cent.
_AGE_BAND_SHARES = np.array(
    [
        5.4,
        5.9,
        6.0,
        5.6,
        6.0,
        6.5,
        6.9,
        6.7,
        6.3,
        6.3,
        6.8,
        6.7,
        5.8,
        5.0,
        5.0,
        3.6,
        2.5,
        1.5,
        0.7,
        0.2,
        0.02,
    ]
)

#: Lower bounds of the age bands used to weight diagnoses: 0, 1-4, 5-17, 18-44, 45-64, 65-79, 80+.
_CODE_BAND_LOWER = np.array([0, 1, 5, 18, 45, 65, 80])

#: Local authorities: population (thousands, weights practices), postcode area, district range,
#: ODS practice-code letter and usual hospital provider. Keys must be in ons_local_authorities.
_LOCAL_AREAS: dict[str, tuple[int, str, int, int, str, str]] = {
    "E08000025": (1145, "B", 1, 48, "M", "RRK"),  # Birmingham
    "E08000029": (217, "B", 90, 94, "M", "RR1"),  # Solihull
    "E08000026": (345, "CV", 1, 7, "M", "RRK"),  # Coventry
    "E08000035": (812, "LS", 1, 29, "B", "RR8"),  # Leeds
    "E08000032": (546, "BD", 1, 22, "B", "RR8"),  # Bradford
    "E08000019": (556, "S", 1, 36, "C", "RHQ"),  # Sheffield
    "E08000003": (552, "M", 1, 40, "P", "R0A"),  # Manchester
    "E08000007": (294, "SK", 1, 8, "P", "R0A"),  # Stockport
    "E08000012": (487, "L", 1, 38, "N", "REM"),  # Liverpool
    "E08000021": (300, "NE", 1, 15, "A", "RTD"),  # Newcastle upon Tyne
    "E06000018": (324, "NG", 1, 11, "C", "RX1"),  # Nottingham
    "E06000016": (368, "LE", 1, 9, "C", "RX1"),  # Leicester
    "E06000023": (472, "BS", 1, 16, "L", "RA7"),  # Bristol
    "E06000025": (291, "BS", 30, 37, "L", "RA7"),  # South Gloucestershire
    "E09000033": (205, "W", 1, 14, "E", "RJ1"),  # Westminster
    "E09000028": (307, "SE", 1, 27, "G", "RJ1"),  # Southwark
    "E09000022": (318, "SW", 2, 17, "G", "RJ1"),  # Lambeth
    "E09000007": (210, "NW", 1, 6, "F", "RJ1"),  # Camden
    "E10000016": (1577, "ME", 1, 20, "G", "RWF"),  # Kent
    "E10000030": (1204, "GU", 1, 27, "H", "RTK"),  # Surrey
}

#: Hospital providers (NHS trust ODS codes).
PROVIDERS: tuple[str, ...] = (
    "RRK",
    "RR1",
    "RR8",
    "RHQ",
    "R0A",
    "REM",
    "RTD",
    "RX1",
    "RA7",
    "RJ1",
    "RWF",
    "RTK",
)
_HOME_PROVIDER_SHARE = 0.85

#: Letters used in the inward part of a postcode (never C, I, K, M, O, V).
_INWARD_LETTERS = np.array(list("ABDEFGHJLNPQRSTUWXYZ"))

#: Person gender codes in sampling order; index 2 and 3 are the rare "9" and "0".
_SEX_CODES = np.array(["1", "2", "9", "0"])

# Diagnosis weights. weight(code, band, sex) = base * age multiplier * sex multiplier, where the
# age multiplier comes from the code's own override or else from its group, over the seven
# _CODE_BAND_LOWER bands; sex multipliers are (male, female, not known/specified).
_Mult = tuple[float, float, float, float, float, float, float]
_Sex = tuple[float, float, float]
_MALE: _Sex = (1.0, 0.0, 0.0)
_FEMALE: _Sex = (0.0, 1.0, 0.0)

_SNOMED_GROUP_AGE: dict[str, _Mult] = {
    "Cardiovascular": (0, 0, 0.01, 0.2, 1.5, 3.0, 3.5),
    "Respiratory": (2.5, 2.5, 1.5, 1.0, 1.0, 1.3, 1.5),
    "Endocrine": (0, 0.05, 0.2, 0.6, 1.5, 2.0, 1.8),
    "Mental health": (0, 0, 0.4, 1.5, 1.2, 0.8, 0.8),
    "Neurological": (0.2, 0.4, 0.6, 1.0, 1.0, 1.2, 1.4),
    "Musculoskeletal": (0, 0.02, 0.2, 1.0, 1.5, 2.0, 2.0),
    "Gastrointestinal": (0.4, 0.4, 0.6, 1.0, 1.0, 1.2, 1.2),
    "Renal and urological": (0.1, 0.2, 0.3, 0.5, 0.8, 1.5, 2.5),
    "Skin": (2.0, 2.0, 1.5, 1.0, 0.8, 0.8, 0.9),
    "Cancer": (0, 0, 0.01, 0.1, 0.8, 1.5, 1.5),
    "Infection": (3.0, 3.0, 2.0, 1.0, 0.8, 0.8, 1.0),
}
_SNOMED_BASE: dict[str, float] = {
    "38341003": 3.0,
    "44054006": 2.5,
    "54150009": 3.0,
    "35489007": 2.0,
    "197480006": 2.0,
    "195967001": 2.0,
    "279039007": 2.0,
    "396275006": 2.0,
    "55822004": 1.5,
    "68566005": 1.5,
    "58214004": 0.3,
    "13746004": 0.3,
    "24700007": 0.2,
    "34000006": 0.3,
    "64766004": 0.3,
    "22298006": 0.5,
    "46635009": 0.4,
}
_SNOMED_AGE: dict[str, _Mult] = {
    "52448006": (0, 0, 0, 0, 0.05, 1.0, 4.0),  # dementia
    "26929004": (0, 0, 0, 0, 0.05, 1.0, 3.5),  # Alzheimer's disease
    "13645005": (0, 0, 0, 0.1, 1.0, 2.0, 2.0),  # COPD
    "195967001": (0, 1.5, 3.0, 1.5, 1.0, 1.0, 1.0),  # asthma
    "46635009": (0, 0.2, 1.0, 1.0, 1.0, 0.8, 0.6),  # type 1 diabetes
    "24079001": (2.0, 3.0, 2.0, 1.0, 0.6, 0.4, 0.4),  # atopic dermatitis
    "65363002": (1.0, 4.0, 2.0, 0.3, 0.2, 0.1, 0.1),  # otitis media
    "43878008": (0, 1.0, 3.0, 1.0, 0.3, 0.1, 0.1),  # streptococcal sore throat
    "49049000": (0, 0, 0, 0.02, 0.3, 2.0, 3.0),  # Parkinson's disease
    "64859006": (0, 0, 0, 0.05, 0.8, 2.5, 3.0),  # osteoporosis
    "266569009": (0, 0, 0, 0, 0.5, 2.0, 2.5),  # benign prostatic hyperplasia
    "399068003": (0, 0, 0, 0, 0.5, 2.0, 2.5),  # prostate cancer
}
_SNOMED_SEX: dict[str, _Sex] = {
    "266569009": _MALE,
    "399068003": _MALE,
    "254837009": (0.01, 1.0, 0.5),
    "64859006": (0.3, 1.0, 0.6),
}

_ICD_GROUP_AGE: dict[str, _Mult] = {
    "I": (1.5, 2.0, 1.0, 0.6, 0.6, 1.0, 1.5),
    "II": (0, 0, 0.02, 0.2, 1.2, 2.0, 1.8),
    "III": (0.2, 0.2, 0.3, 0.5, 0.8, 1.5, 2.0),
    "IV": (0.3, 0.2, 0.2, 0.5, 1.0, 1.5, 2.0),
    "V": (0, 0, 0.3, 1.0, 0.8, 0.8, 1.5),
    "VI": (0.1, 0.3, 0.5, 0.6, 0.8, 1.2, 1.5),
    "VII": (0, 0, 0, 0.01, 0.5, 2.0, 2.5),
    "VIII": (0.5, 2.0, 1.0, 0.3, 0.2, 0.2, 0.2),
    "IX": (0, 0, 0.01, 0.2, 1.2, 2.5, 3.0),
    "X": (2.0, 2.5, 1.5, 0.5, 0.8, 1.5, 2.5),
    "XI": (0.2, 0.3, 0.8, 1.0, 1.2, 1.3, 1.3),
    "XII": (0.3, 0.3, 0.5, 0.5, 0.8, 1.2, 2.0),
    "XIII": (0, 0.02, 0.2, 0.6, 1.2, 1.5, 1.2),
    "XIV": (0.3, 0.3, 0.4, 0.5, 0.8, 1.5, 2.5),
    "XV": (0, 0, 0, 3.0, 0, 0, 0),
    "XVI": (6.0, 0, 0, 0, 0, 0, 0),
    "XVIII": (0.5, 0.8, 1.0, 1.0, 1.0, 1.2, 1.5),
    "XIX": (0.5, 1.2, 1.0, 0.6, 0.6, 1.0, 2.5),
    "XXI": (0, 0.05, 0.1, 0.5, 1.5, 2.0, 1.5),
}
_ICD_BASE: dict[str, float] = {
    "J18": 2.0,
    "R07": 2.0,
    "R10": 2.0,
    "N39": 1.5,
    "I50": 1.2,
    "I10": 0.3,
    "H25": 1.5,
    "Z38": 4.0,
}
_ICD_AGE: dict[str, _Mult] = {
    "Z38": (8.0, 0, 0, 0, 0, 0, 0),  # liveborn infants
    "F03": (0, 0, 0, 0, 0.05, 1.0, 4.0),  # dementia
    "G30": (0, 0, 0, 0, 0.05, 1.0, 3.5),  # Alzheimer's disease
    "J45": (0, 2.0, 3.0, 1.0, 0.6, 0.5, 0.4),  # asthma
    "J44": (0, 0, 0, 0.1, 1.0, 2.0, 2.0),  # COPD
    "K35": (0, 0.3, 2.0, 1.5, 0.6, 0.3, 0.2),  # appendicitis
    "M16": (0, 0, 0, 0.1, 1.0, 2.0, 1.5),  # hip arthrosis
    "M17": (0, 0, 0, 0.1, 1.0, 2.0, 1.5),  # knee arthrosis
    "S72": (0, 0.02, 0.05, 0.1, 0.3, 1.5, 4.0),  # fractured femur
    "C61": (0, 0, 0, 0, 0.5, 2.0, 2.0),  # prostate cancer
    "N40": (0, 0, 0, 0, 0.5, 2.0, 2.5),  # prostatic hyperplasia
}
_ICD_SEX: dict[str, _Sex] = {
    "C61": _MALE,
    "N40": _MALE,
    "O80": _FEMALE,
    "O82": _FEMALE,
    "C50": (0.01, 1.0, 0.5),
}
#: Fourth characters that exist for some categories (e.g. I21 -> I210, I211, I214, I219).
_ICD_FOURTH: dict[str, str] = {
    "A41": "9",
    "C34": "19",
    "C50": "9",
    "E11": "9",
    "E87": "16",
    "F05": "19",
    "F10": "2",
    "F32": "9",
    "F41": "19",
    "G30": "9",
    "G40": "9",
    "I20": "09",
    "I21": "0149",
    "I25": "19",
    "I26": "9",
    "I48": "0129",
    "I50": "019",
    "I63": "9",
    "J06": "9",
    "J18": "019",
    "J44": "019",
    "J45": "09",
    "K57": "3",
    "K80": "2",
    "K92": "2",
    "K56": "6",
    "L03": "19",
    "M17": "09",
    "M54": "5",
    "N17": "9",
    "N18": "3459",
    "N39": "0",
    "R07": "34",
    "R10": "4",
    "S06": "0",
    "S42": "2",
    "S52": "5",
    "S72": "0",
    "T81": "4",
}
_FOURTH_CHAR_SHARE = 0.5

#: Social care service mix: after a hospital discharge, community 18-64, community 65+.
_SERVICE_MIX: dict[str, tuple[float, float, float]] = {
    "long_term_residential": (0.08, 0.05, 0.15),
    "long_term_nursing": (0.10, 0.02, 0.10),
    "community_home_care": (0.25, 0.25, 0.35),
    "community_supported_living": (0.00, 0.20, 0.02),
    "direct_payment": (0.00, 0.25, 0.10),
    "day_care": (0.00, 0.15, 0.08),
    "short_term_reablement": (0.45, 0.03, 0.12),
    "short_term_other": (0.12, 0.05, 0.08),
}
#: Per service type: chance it ends (if that falls inside the period) and duration range, days.
_SERVICE_END: dict[str, tuple[float, int, int]] = {
    "long_term_residential": (0.2, 30, 300),
    "long_term_nursing": (0.3, 14, 300),
    "community_home_care": (0.3, 14, 300),
    "community_supported_living": (0.1, 60, 300),
    "direct_payment": (0.15, 60, 300),
    "day_care": (0.25, 30, 300),
    "short_term_reablement": (0.9, 7, 42),
    "short_term_other": (0.85, 3, 56),
}
#: Chance that a hospital patient, by age (18-64, 65-79, 80+), starts social care after discharge.
_POST_DISCHARGE_SHARE = (0.04, 0.18, 0.35)

#: Values used for "unknown code" defects (typos of real codes, codes from other lists).
_UNKNOWN_VALUES: dict[str, tuple[str, ...]] = {
    "diagnosis_code": ("38341004", "44054007", "195967002", "999999999"),
    "primary_diagnosis": ("I2I", "J4S", "U999", "Q999", "XXX"),
    "service_type": ("residential", "homecare", "respite"),
    "local_authority_code": ("E99999999", "W06000015", "S12000036"),
}


@dataclass(frozen=True)
class CodeList:
    """One code list from ``data_contracts/code_lists``: codes and their groups, in file order."""

    name: str
    system: str
    codes: tuple[str, ...]
    groups: tuple[str, ...]


def load_code_list(name: str, directory: Path = CODE_LIST_DIR) -> CodeList:
    """Read ``<directory>/<name>.yaml``; codes are always strings."""
    data = yamlio.safe_load((directory / f"{name}.yaml").read_text(encoding="utf-8"))
    codes = tuple(str(c["code"]) for c in data["codes"])
    groups = tuple(str(c.get("group", "")) for c in data["codes"])
    return CodeList(name=str(data["name"]), system=str(data["system"]), codes=codes, groups=groups)


def default_period_end(today: date | None = None) -> date:
    """The last day of the calendar month before ``today``."""
    today = today or date.today()
    return today.replace(day=1) - timedelta(days=1)


def period_start(period_end: date) -> date:
    """First day of the twelve-month reporting period ending on ``period_end``."""
    try:
        year_before = period_end.replace(year=period_end.year - 1)
    except ValueError:  # 29 February
        year_before = period_end.replace(year=period_end.year - 1, day=28)
    return year_before + timedelta(days=1)


def _days(d: date) -> int:
    return (d - _EPOCH).days


@lru_cache(maxsize=1)
def _test_number_space() -> tuple[np.ndarray, np.ndarray]:
    """All 999-range nine-digit prefixes with a usable check digit, and those check digits."""
    prefixes = np.arange(999_000_000, 1_000_000_000, dtype=np.int64)
    total = np.zeros_like(prefixes)
    rest = prefixes.copy()
    for weight in reversed(WEIGHTS):  # the rule's weights (safehaven.core.identifiers), last digit first
        total += weight * (rest % 10)
        rest //= 10
    check = (MODULUS - total % MODULUS) % MODULUS
    usable = check != 10
    return prefixes[usable], check[usable]


@dataclass(frozen=True)
class _Calendar:
    """Period bounds as day numbers, and a lookup table from day number to ISO date string.

    The table's last entry is empty (missing); optional dates use the day number ``NO_DATE``.
    """

    start: int
    end: int
    base: int
    table: pl.Series

    @classmethod
    def build(cls, period_end: date) -> _Calendar:
        end = _days(period_end)
        base = end - 45_000  # about 123 years back: every date of birth fits
        days = np.arange(base, end + FUTURE_OFFSET_DAYS + 800, dtype=np.int64)
        table = pl.Series("d", days.astype("datetime64[D]")).cast(pl.Utf8)
        table = pl.concat([table, pl.Series("d", [None], dtype=pl.Utf8)])
        return cls(start=_days(period_start(period_end)), end=end, base=base, table=table)

    def index(self, days: np.ndarray) -> np.ndarray:
        """Table positions for day numbers; ``NO_DATE`` maps to the empty entry."""
        return np.where(days == NO_DATE, len(self.table) - 1, days - self.base)

    def col(self, days: np.ndarray) -> _Col:
        return _Col(self.table, self.index(days))

    def strings(self, days: np.ndarray) -> pl.Series:
        """ISO date strings for day numbers (vectorised lookup, no per-row formatting)."""
        return self.table.gather(self.index(days))


@dataclass
class _Col:
    """A text column as a lookup table plus one index per row.

    Rows are materialised by a single gather at the end; defects only re-point indices at a
    few appended values, so patching never rewrites millions of strings.
    """

    lookup: pl.Series
    index: np.ndarray
    extra: list[pl.Series] = field(default_factory=list)

    def patch(self, rows: np.ndarray, values: pl.Series) -> None:
        """Rows ``rows`` take ``values`` (same length)."""
        if len(rows):
            offset = len(self.lookup) + sum(len(e) for e in self.extra)
            self.index[rows] = offset + np.arange(len(rows))
            self.extra.append(values.cast(pl.Utf8))

    def blank(self, rows: np.ndarray) -> None:
        """Rows ``rows`` become empty (missing)."""
        if len(rows):
            self.patch(rows[:1], pl.Series([None], dtype=pl.Utf8))
            self.index[rows] = self.index[rows[0]]

    def series(self, name: str) -> pl.Series:
        table = pl.concat([self.lookup, *self.extra]) if self.extra else self.lookup
        return table.gather(self.index).alias(name)


@dataclass(frozen=True)
class _Population:
    """Patient-level attributes; every array has one entry per patient."""

    nhs: np.ndarray  # int64 canonical NHS number
    nhs_text: pl.Series  # 3 * n strings: plain, spaced, hyphenated
    age: np.ndarray  # whole years at the period end
    dob: np.ndarray  # day number
    sex: np.ndarray  # index into _SEX_CODES
    postcode: pl.Series
    practice: np.ndarray  # index into practice_codes
    practice_codes: pl.Series
    outlier_practice: int
    la: np.ndarray  # index into la_codes
    la_codes: pl.Series
    home_provider: np.ndarray  # index into PROVIDERS

    @property
    def n(self) -> int:
        return len(self.nhs)

    @property
    def sex_group(self) -> np.ndarray:
        """0 male, 1 female, 2 not known / not specified."""
        return np.minimum(self.sex, 2)

    @property
    def code_band(self) -> np.ndarray:
        return np.searchsorted(_CODE_BAND_LOWER, self.age, side="right") - 1


def _concat(parts: Sequence[pl.Series | pl.Expr], separator: str = "") -> pl.Series:
    """Row-wise string concatenation of equal-length Series (and literals)."""
    return pl.select(pl.concat_str(list(parts), separator=separator)).to_series()


def _largest_remainder(shares: np.ndarray, total: int) -> np.ndarray:
    """Integers proportional to ``shares`` summing exactly to ``total``."""
    raw = shares / shares.sum() * total
    out = np.floor(raw).astype(np.int64)
    short = total - int(out.sum())
    if short:
        out[np.argsort(-(raw - out), kind="stable")[:short]] += 1
    return out


def _uniform_days(rng: np.random.Generator, lo: np.ndarray, hi: int | np.ndarray) -> np.ndarray:
    """A uniformly random day in ``[lo, hi]`` for each row (``lo <= hi`` assumed)."""
    span = np.asarray(hi) - lo + 1
    return lo + np.floor(rng.random(len(lo)) * span).astype(np.int64)


def _population(rng: np.random.Generator, n: int, cal: _Calendar, la_list: CodeList) -> _Population:
    """Draw the shared population: identity, demographics, practice, area."""
    prefixes, checks = _test_number_space()
    pick = rng.choice(len(prefixes), size=n, replace=False)
    nhs = prefixes[pick] * 10 + checks[pick]
    plain = pl.Series("nhs_number", nhs).cast(pl.Utf8)
    parts = [plain.str.slice(0, 3), plain.str.slice(3, 3), plain.str.slice(6, 4)]
    nhs_text = pl.concat(
        [
            plain,
            _concat(parts, separator=" "),
            _concat(parts, separator="-"),
        ]
    ).alias("nhs_number")

    band = rng.choice(len(_AGE_BAND_SHARES), size=n, p=_AGE_BAND_SHARES / _AGE_BAND_SHARES.sum())
    age = np.where(band == 20, 100, band * 5 + rng.integers(0, 5, size=n)).astype(np.int64)
    # At least floor(age * 365.2425) + 1 days old: 18 years never exceed 6,575 days, so anyone
    # aged 18+ reaches dob + 6,575 by the period end.
    dob = cal.end - np.floor(age * 365.2425).astype(np.int64) - rng.integers(1, 366, size=n)

    p_female = 0.49 + 0.2 * np.clip((age - 55) / 40.0, 0.0, 1.0)
    sex = (rng.random(n) < p_female).astype(np.int64)
    rare = rng.random(n)
    sex[rare < 0.003] = 2
    sex[(rare >= 0.003) & (rare < 0.004)] = 3

    # Practices: skewed list sizes, each in a local authority weighted by population.
    n_practices = min(n, max(3, round(n / MEAN_LIST_SIZE)))
    weights = np.clip(rng.lognormal(0.0, 0.55, n_practices), 0.25, 2.3)
    sizes = 1 + _largest_remainder(weights, n - n_practices)
    practice = rng.permutation(np.repeat(np.arange(n_practices), sizes))
    outlier = int(np.argsort(sizes, kind="stable")[n_practices // 2])

    unknown = set(_LOCAL_AREAS) - set(la_list.codes)
    if unknown:
        raise ValueError(f"local areas missing from {la_list.name}: {sorted(unknown)}")
    areas = list(_LOCAL_AREAS.values())
    la_pop = np.array([a[0] for a in areas], dtype=float)
    practice_la = rng.choice(len(areas), size=n_practices, p=la_pop / la_pop.sum())
    letters = np.array([a[4] for a in areas])[practice_la]
    numbers = rng.choice(90_000, size=n_practices, replace=False) + 10_000
    practice_codes = pl.Series("practice_code", np.char.add(letters, numbers.astype(str)))
    la = practice_la[practice]

    # Postcodes: the local authority's area, a district in its range, an inward code.
    district = _uniform_days(rng, np.array([a[2] for a in areas])[la], np.array([a[3] for a in areas])[la])
    letters_in = pl.Series(_INWARD_LETTERS)
    postcode = _concat(
        [
            pl.Series([a[1] for a in areas]).gather(la),
            pl.Series(district).cast(pl.Utf8),
            pl.lit(" "),
            pl.Series(rng.integers(0, 10, size=n)).cast(pl.Utf8),
            letters_in.gather(rng.integers(0, len(_INWARD_LETTERS), size=n)),
            letters_in.gather(rng.integers(0, len(_INWARD_LETTERS), size=n)),
        ]
    ).alias("postcode")

    provider_index = {p: i for i, p in enumerate(PROVIDERS)}
    home = np.array([provider_index[a[5]] for a in areas])[la]

    return _Population(
        nhs=nhs,
        nhs_text=nhs_text,
        age=age,
        dob=dob,
        sex=sex,
        postcode=postcode,
        practice=practice,
        practice_codes=practice_codes,
        outlier_practice=outlier,
        la=la,
        la_codes=pl.Series("la", list(_LOCAL_AREAS)),
        home_provider=home,
    )


def _code_weights(
    codes: CodeList,
    group_age: dict[str, _Mult],
    code_age: dict[str, _Mult],
    code_sex: dict[str, _Sex],
    base: dict[str, float],
    by_chapter: bool,
) -> np.ndarray:
    """Weights of shape (7 age bands, 3 sex groups, n codes) for stratified sampling.

    ``by_chapter``: look group multipliers up by the group's first word (the ICD-10 chapter
    numeral) rather than by the whole group name.
    """
    out = np.zeros((len(_CODE_BAND_LOWER), 3, len(codes.codes)))
    for j, (code, group) in enumerate(zip(codes.codes, codes.groups, strict=True)):
        key = group.split()[0] if by_chapter else group
        age = np.array(code_age.get(code, group_age.get(key, (1.0,) * 7)))
        sex = np.array(code_sex.get(code, (1.0, 1.0, 1.0)))
        out[:, :, j] = base.get(code, 1.0) * age[:, None] * sex[None, :]
    if (out.sum(axis=2) <= 0).any():
        raise ValueError(f"{codes.name}: some age/sex stratum has no possible code")
    return out


def _sample_codes(rng: np.random.Generator, band: np.ndarray, sex_group: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Draw a code index per row from its (age band, sex group) stratum's distribution."""
    n_codes = weights.shape[2]
    stratum = (band * 3 + sex_group).astype(np.int16)
    cdfs = np.cumsum(weights.reshape(-1, n_codes), axis=1)
    cdfs /= cdfs[:, -1:]
    order = np.argsort(stratum, kind="stable")  # radix sort: O(rows)
    bounds = np.concatenate([[0], np.cumsum(np.bincount(stratum, minlength=len(cdfs)))])
    u = rng.random(len(band))
    out = np.empty(len(band), dtype=np.int64)
    for s in range(len(cdfs)):
        rows = order[bounds[s] : bounds[s + 1]]
        out[rows] = np.searchsorted(cdfs[s], u[rows], side="right")
    return np.minimum(out, n_codes - 1)


@dataclass
class _Table:
    """One collection before writing: lookup-backed columns plus numbers for defect injection."""

    columns: dict[str, _Col]
    patient: np.ndarray  # patient index per row
    start: np.ndarray  # main date (event / admission / service start) as day number
    end: np.ndarray | None  # discharge / end date as day number, NO_DATE when empty

    def frame(self, names: Sequence[str]) -> pl.DataFrame:
        return pl.DataFrame([self.columns[c].series(c) for c in names])


def _radix_order(primary: np.ndarray, secondary: np.ndarray) -> np.ndarray:
    """Row order by (primary, secondary, original position): two stable radix passes.

    Both keys must fit in 16 bits (indices of providers or authorities, days within the
    period); numpy's stable sort of 16-bit integers is a radix sort, linear in the rows.
    """
    first = np.argsort(secondary.astype(np.uint16), kind="stable")
    return first[np.argsort(primary[first].astype(np.uint16), kind="stable")]


def _person_columns(rng: np.random.Generator, pop: _Population, patient: np.ndarray, cal: _Calendar) -> dict[str, _Col]:
    """nhs_number (formatting varies per row), date_of_birth, sex, postcode for rows."""
    fmt = rng.choice(3, size=len(patient), p=NHS_FORMAT_SHARES)
    return {
        "nhs_number": _Col(pop.nhs_text, fmt * pop.n + patient),
        "date_of_birth": cal.col(pop.dob[patient]),
        "sex": _Col(pl.Series(_SEX_CODES), pop.sex[patient]),
        "postcode": _Col(pop.postcode, patient.copy()),
    }


def _gp_events(rng: np.random.Generator, pop: _Population, cal: _Calendar, snomed: CodeList) -> _Table:
    """Coded GP diagnoses: rate rising with age (and in infancy), overdispersed per patient.

    Rows come grouped by practice (as practices' extracts would be concatenated).
    """
    age = pop.age
    rate = 0.6 + 1.8 * (age / 80.0) ** 2 + 1.0 * np.exp(-age / 3.0)
    rate = rate * (GP_EVENTS_PER_PATIENT / rate.mean()) * rng.gamma(2.0, 0.5, size=pop.n)
    counts = rng.poisson(rate)
    by_practice = np.argsort(pop.practice.astype(np.uint16), kind="stable")
    patient = np.repeat(by_practice, counts[by_practice])
    day = _uniform_days(rng, np.maximum(cal.start, pop.dob[patient]), cal.end)
    weights = _code_weights(snomed, _SNOMED_GROUP_AGE, _SNOMED_AGE, _SNOMED_SEX, _SNOMED_BASE, by_chapter=False)
    code = _sample_codes(rng, pop.code_band[patient], pop.sex_group[patient], weights)
    columns = {
        "practice_code": _Col(pop.practice_codes, pop.practice[patient]),
        **_person_columns(rng, pop, patient, cal),
        "event_date": cal.col(day),
        "diagnosis_code": _Col(pl.Series(snomed.codes), code),
    }
    return _Table(columns, patient, day, None)


def _hospital_episodes(
    rng: np.random.Generator, pop: _Population, cal: _Calendar, icd10: CodeList
) -> tuple[_Table, np.ndarray]:
    """Admitted patient care episodes, and each patient's last discharge (NO_DATE if none)."""
    age = pop.age
    p_any = np.clip(0.15 + 0.7 * (age / 90.0) ** 2, 0.0, 0.9)
    p_any[age == 0] = 0.8  # births
    more = 0.5 + (age / 60.0) ** 2
    scale = max(EPISODES_PER_PATIENT - p_any.mean(), 0.0) / (p_any * more).mean()
    extra = rng.poisson(scale * more * rng.gamma(1.0, 1.0, size=pop.n))
    counts = np.where(rng.random(pop.n) < p_any, 1 + extra, 0)
    patient = np.repeat(np.arange(pop.n), counts)

    admission = _uniform_days(rng, np.maximum(cal.start, pop.dob[patient]), cal.end)
    day_case = rng.random(len(patient)) < 0.35
    stay = rng.geometric(1.0 / (2.0 + age[patient] / 12.0))
    discharge = np.minimum(admission + np.where(day_case, 0, stay), cal.end)

    last = np.full(pop.n, NO_DATE, dtype=np.int64)
    has = counts > 0
    if has.any():
        first_row = (np.cumsum(counts) - counts)[has]
        last[has] = np.maximum.reduceat(discharge, first_row)

    weights = _code_weights(icd10, _ICD_GROUP_AGE, _ICD_AGE, _ICD_SEX, _ICD_BASE, by_chapter=True)
    code = _sample_codes(rng, pop.code_band[patient], pop.sex_group[patient], weights)
    # Lookup: the three-character codes, then each code's four-character variants.
    lookup = list(icd10.codes)
    add = rng.random(len(patient)) < _FOURTH_CHAR_SHARE
    for j, three in enumerate(icd10.codes):
        chars = _ICD_FOURTH.get(three, "")
        rows = np.flatnonzero(add & (code == j)) if chars else np.empty(0, np.int64)
        if len(rows):
            code[rows] = len(lookup) + rng.integers(0, len(chars), size=len(rows))
        lookup.extend(three + c for c in chars)

    provider = np.where(
        rng.random(len(patient)) < _HOME_PROVIDER_SHARE,
        pop.home_provider[patient],
        rng.integers(0, len(PROVIDERS), size=len(patient)),
    )
    order = _radix_order(provider, admission - cal.start)
    patient, admission, discharge = patient[order], admission[order], discharge[order]
    columns = {
        "provider_code": _Col(pl.Series(PROVIDERS), provider[order]),
        **_person_columns(rng, pop, patient, cal),
        "admission_date": cal.col(admission),
        "discharge_date": cal.col(discharge),
        "primary_diagnosis": _Col(pl.Series(lookup), code[order]),
    }
    return _Table(columns, patient, admission, discharge), last


def _social_care(
    rng: np.random.Generator,
    pop: _Population,
    cal: _Calendar,
    services: CodeList,
    last_discharge: np.ndarray,
) -> _Table:
    """Adult social care: post-discharge packages for hospital patients, then community support."""
    missing = set(_SERVICE_MIX) - set(services.codes)
    if missing:
        raise ValueError(f"service types missing from {services.name}: {sorted(missing)}")
    age = pop.age
    adult_from = pop.dob + 6_575  # on or after the 18th birthday (18 years <= 6,575 days)
    age_group = np.select([age >= 80, age >= 65], [2, 1], 0)

    # After a hospital discharge: starts 0-14 days after the patient's last discharge.
    share = np.array(_POST_DISCHARGE_SHARE)[age_group]
    link_start = np.maximum(last_discharge + rng.integers(0, 15, size=pop.n), adult_from)
    linked = (age >= 18) & (last_discharge != NO_DATE) & (rng.random(pop.n) < share)
    linked &= link_start <= cal.end
    linked_patient = np.flatnonzero(linked)

    # Community support: recipients chosen by age so that total rows hit the target.
    rows_per_recipient = 2.5  # 1 + Poisson(1.5)
    wanted = max(SOCIAL_CARE_ROWS_PER_PATIENT * pop.n - len(linked_patient), 0.0)
    ages = np.arange(101)
    weight_by_age = np.select([ages >= 85, ages >= 75, ages >= 65, ages >= 18], [2.0, 1.0, 0.4, 0.05], 0.0)
    adults_by_age = np.bincount(age, minlength=101) * (ages >= 18)
    lo, hi = 0.0, 1e6
    for _ in range(60):  # bisection over the 101 ages, not over patients
        mid = (lo + hi) / 2
        expected = (adults_by_age * np.minimum(0.9, mid * weight_by_age)).sum()
        lo, hi = (mid, hi) if expected < wanted / rows_per_recipient else (lo, mid)
    p_recipient = np.minimum(0.9, lo * weight_by_age)[age]
    recipient = (age >= 18) & (rng.random(pop.n) < p_recipient)
    n_rows = np.where(recipient, 1 + rng.poisson(rows_per_recipient - 1, size=pop.n), 0)
    community_patient = np.repeat(np.arange(pop.n), n_rows)

    patient = np.concatenate([linked_patient, community_patient])
    start = np.concatenate(
        [
            link_start[linked_patient],
            _uniform_days(rng, np.maximum(cal.start, adult_from[community_patient]), cal.end),
        ]
    )
    mix_column = np.concatenate(
        [
            np.zeros(len(linked_patient), dtype=np.int64),
            np.where(age[community_patient] >= 65, 2, 1),
        ]
    )
    type_codes = list(_SERVICE_MIX)
    service = np.empty(len(patient), dtype=np.int64)
    for m in range(3):
        rows = np.flatnonzero(mix_column == m)
        p = np.array([_SERVICE_MIX[t][m] for t in type_codes])
        service[rows] = rng.choice(len(type_codes), size=len(rows), p=p / p.sum())

    end_rule = np.array([_SERVICE_END[t] for t in type_codes])
    duration = _uniform_days(rng, end_rule[service, 1].astype(np.int64), end_rule[service, 2].astype(np.int64))
    ends = (rng.random(len(patient)) < end_rule[service, 0]) & (start + duration <= cal.end)
    end = np.where(ends, start + duration, NO_DATE)

    la = pop.la[patient]
    order = _radix_order(la, start - cal.start)
    patient, start, end = patient[order], start[order], end[order]
    code_index = {c: i for i, c in enumerate(services.codes)}
    service_code = np.array([code_index[t] for t in type_codes])[service[order]]
    columns = {
        "local_authority_code": _Col(pop.la_codes, la[order]),
        "service_type": _Col(pl.Series(services.codes), service_code),
        "start_date": cal.col(start),
        "end_date": cal.col(end),
        **_person_columns(rng, pop, patient, cal),
    }
    return _Table(columns, patient, start, end)


def _objections(rng: np.random.Generator, pop: _Population, cal: _Calendar) -> _Table:
    """Type 1 objections (one outlier practice) and national opt-outs, some withdrawn."""
    type1_rate = np.full(len(pop.practice_codes), TYPE1_RATE)
    type1_rate[pop.outlier_practice] = OUTLIER_TYPE1_RATE
    type1 = np.flatnonzero(rng.random(pop.n) < type1_rate[pop.practice])
    opt_out = np.flatnonzero(rng.random(pop.n) < NATIONAL_OPT_OUT_RATE)
    patient = np.concatenate([type1, opt_out])
    kind = np.concatenate([np.zeros(len(type1), np.int64), np.ones(len(opt_out), np.int64)])

    recorded = _uniform_days(rng, np.maximum(cal.start, pop.dob[patient]), cal.end)
    withdrawn = (rng.random(len(patient)) < WITHDRAWN_SHARE) & (recorded < cal.end)
    later = recorded + 1 + np.floor(rng.random(len(patient)) * (cal.end - recorded))
    withdrawn_day = np.where(withdrawn, np.minimum(later.astype(np.int64), cal.end), NO_DATE)

    order = _radix_order(recorded - cal.start, np.zeros(len(patient), np.int64))
    patient, kind = patient[order], kind[order]
    person = _person_columns(rng, pop, patient, cal)
    practice_lookup = pl.concat([pop.practice_codes, pl.Series([None], dtype=pl.Utf8)])
    columns = {
        "nhs_number": person["nhs_number"],
        "objection_type": _Col(pl.Series(["type1", "national_opt_out"]), kind),
        "recorded_date": cal.col(recorded[order]),
        "withdrawn_date": cal.col(withdrawn_day[order]),
        "source_practice": _Col(practice_lookup, np.where(kind == 0, pop.practice[patient], len(pop.practice_codes))),
    }
    return _Table(columns, patient, recorded[order], withdrawn_day[order])


@dataclass(frozen=True)
class _DefectSpec:
    """Where defects go in one collection."""

    code_columns: tuple[str, ...]
    start: str
    end: str | None
    required: tuple[str, ...]


_DEFECT_SPECS: dict[str, _DefectSpec] = {
    "gp_events": _DefectSpec(
        ("diagnosis_code",),
        "event_date",
        None,
        ("practice_code", "nhs_number", "date_of_birth", "sex", "postcode", "event_date", "diagnosis_code"),
    ),
    "hospital_episodes": _DefectSpec(
        ("primary_diagnosis",),
        "admission_date",
        "discharge_date",
        (
            "provider_code",
            "nhs_number",
            "date_of_birth",
            "sex",
            "postcode",
            "admission_date",
            "discharge_date",
            "primary_diagnosis",
        ),
    ),
    "social_care": _DefectSpec(
        ("service_type", "local_authority_code"),
        "start_date",
        "end_date",
        ("local_authority_code", "service_type", "start_date", "nhs_number", "date_of_birth", "sex", "postcode"),
    ),
}


def _inject_defects(
    rng: np.random.Generator,
    table: _Table,
    spec: _DefectSpec,
    pop: _Population,
    cal: _Calendar,
    rate: float,
    code_lists: dict[str, CodeList],
    year: int,
) -> int:
    """Give exactly ``round(rate * rows)`` distinct rows one defect each; return that number.

    Kinds, equally likely: bad check digit; unknown code; impossible date (before birth, end
    before start where there is an end, about ten years after the period end, unparseable);
    missing required value.
    """
    n = len(table.patient)
    k = int(round(rate * n))
    if k == 0:
        return 0
    rows = np.sort(rng.choice(n, size=k, replace=False))
    kind = rng.integers(0, 4, size=k)
    cols = table.columns

    # Bad check digit: any other last digit is wrong (the check digit is unique).
    sel = rows[kind == 0]
    canonical = pop.nhs[table.patient[sel]]
    last = canonical % 10
    wrong = canonical - last + (last + rng.integers(1, 10, size=len(sel))) % 10
    cols["nhs_number"].patch(sel, pl.Series(wrong).cast(pl.Utf8))

    # Unknown code: a value that is not in the column's code list.
    sel = rows[kind == 1]
    target = rng.integers(0, len(spec.code_columns), size=len(sel))
    for t, column in enumerate(spec.code_columns):
        known = set(code_lists[column].codes)
        values = pl.Series([v for v in _UNKNOWN_VALUES[column] if v[:3] not in known and v not in known])
        these = sel[target == t]
        cols[column].patch(these, values.gather(rng.integers(0, len(values), size=len(these))))

    # Impossible date.
    sel = rows[kind == 2]
    subkinds = ("before_birth", "future", "unparseable") + (("end_before_start",) if spec.end else ())
    sub = rng.integers(0, len(subkinds), size=len(sel))
    for s, name in enumerate(subkinds):
        these = sel[sub == s]
        first = table.start[these]
        if name == "before_birth":  # a recorded birth date after the event
            cols["date_of_birth"].patch(these, cal.strings(first + rng.integers(1, 366, size=len(these))))
        elif name == "future":
            shifted = first + FUTURE_OFFSET_DAYS + rng.integers(0, 366, size=len(these))
            cols[spec.start].patch(these, cal.strings(shifted))
            if spec.end is not None and table.end is not None:
                old_end = table.end[these]
                keep = old_end != NO_DATE
                cols[spec.end].patch(these[keep], cal.strings((shifted + old_end - first)[keep]))
        elif name == "unparseable":
            month = pl.Series(rng.integers(13, 20, size=len(these))).cast(pl.Utf8)
            day = pl.Series(rng.integers(32, 46, size=len(these))).cast(pl.Utf8)
            cols[spec.start].patch(these, _concat([pl.lit(str(year)), month, day], "-"))
        else:  # end before start
            assert spec.end is not None
            cols[spec.end].patch(these, cal.strings(first - rng.integers(1, 31, size=len(these))))

    # Missing required value.
    sel = rows[kind == 3]
    target = rng.integers(0, len(spec.required), size=len(sel))
    for t, column in enumerate(spec.required):
        cols[column].blank(sel[target == t])
    return k


def _write(frame: pl.DataFrame, out: Path, name: str, period_end: date, fmt: str) -> Path:
    """Write one collection file atomically (temporary name, then rename)."""
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}_{period_end:%Y%m%d}.{fmt}"
    tmp = folder / f".{path.name}.tmp"
    if fmt == "csv":
        frame.write_csv(tmp)
    else:
        frame.write_parquet(tmp, compression="zstd", statistics=True)
    os.replace(tmp, path)
    return path


def generate(
    out: Path,
    patients: int,
    seed: int = 42,
    defect_rate: float = 0.01,
    period_end: date | None = None,
    fmt: str = "csv",
) -> dict[str, int]:
    """Generate the four collections into ``out`` (an ``incoming/`` folder).

    Returns the number of rows written per collection. Same arguments, same bytes.
    """
    if not 1 <= patients <= MAX_PATIENTS:
        raise ValueError(
            f"patients must be between 1 and {MAX_PATIENTS:,} (the number of valid NHS numbers "
            f"in the 999 test range), got {patients:,}"
        )
    if not 0.0 <= defect_rate <= 1.0:
        raise ValueError(f"defect_rate must be in [0, 1], got {defect_rate}")
    if fmt not in ("csv", "parquet"):
        raise ValueError(f"fmt must be 'csv' or 'parquet', got {fmt!r}")
    period_end = period_end or default_period_end()
    out = Path(out)

    lists = {
        name: load_code_list(name)
        for name in ("icd10", "snomed_gp_diagnoses", "ons_local_authorities", "asc_service_types")
    }
    rng = np.random.default_rng(seed)
    cal = _Calendar.build(period_end)
    pop = _population(rng, patients, cal, lists["ons_local_authorities"])

    gp = _gp_events(rng, pop, cal, lists["snomed_gp_diagnoses"])
    hospital, last_discharge = _hospital_episodes(rng, pop, cal, lists["icd10"])
    social = _social_care(rng, pop, cal, lists["asc_service_types"], last_discharge)
    objections = _objections(rng, pop, cal)

    code_lists = {
        "diagnosis_code": lists["snomed_gp_diagnoses"],
        "primary_diagnosis": lists["icd10"],
        "service_type": lists["asc_service_types"],
        "local_authority_code": lists["ons_local_authorities"],
    }
    tables = {
        "gp_events": gp,
        "hospital_episodes": hospital,
        "social_care": social,
        "objections": objections,
    }
    counts: dict[str, int] = {}
    for name, table in tables.items():
        if name in DEFECT_COLLECTIONS:
            _inject_defects(rng, table, _DEFECT_SPECS[name], pop, cal, defect_rate, code_lists, period_end.year)
        frame = table.frame(COLUMNS[name])
        _write(frame, out, name, period_end, fmt)
        counts[name] = frame.height
        del frame
    return counts


def _parse_date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected YYYY-MM-DD, got {text!r}") from exc


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m safehaven.tools.synthetic --patients N --seed S --out DIR``."""
    parser = argparse.ArgumentParser(
        prog="python -m safehaven.tools.synthetic",
        description="Generate seeded synthetic GP, hospital, social care and objection files.",
    )
    parser.add_argument("--patients", type=int, required=True, help=f"1..{MAX_PATIENTS}")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", type=Path, required=True, help="the incoming/ folder")
    parser.add_argument("--defect-rate", type=float, default=0.01)
    parser.add_argument(
        "--period-end", type=_parse_date, default=None, help="YYYY-MM-DD (default: last day of the previous month)"
    )
    parser.add_argument("--format", choices=("csv", "parquet"), default="csv")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    try:
        counts = generate(args.out, args.patients, args.seed, args.defect_rate, args.period_end, args.format)
    except ValueError as exc:
        parser.error(str(exc))
    elapsed = time.perf_counter() - began
    for name, rows in counts.items():
        print(f"{name}: {rows:,} rows")
    print(f"{args.patients:,} patients in {elapsed:.1f}s -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
