"""The disclosure-control policy and its defaults, in one place.

Every default of the haven's statistical disclosure control is a named constant here, and
everything else (the output declarations' ``policy:`` block, the data-sharing agreements'
``k_anonymity``, the release code, the audit) reads it from here. Sources:

* ``THRESHOLD`` = 7: the HES analysis guide's small-number rule (counts of 1-7 suppressed)
  and OpenSAFELY's output rules (https://docs.opensafely.org/releasing-files/: redact counts
  <= 7), both under the Anonymisation Standard for Publishing Health and Social Care Data
  (ISB 1523), to which CoP 34b says to have regard.
* ``ROUNDING`` = nearest 5 (HES, OpenSAFELY); ``"midpoint6"`` is OpenSAFELY's alternative.
* ``SUPPRESS_ZEROS`` = False: a zero describes nobody ("zero is zero", OpenSAFELY midpoint-6
  guidance); an output whose dimensions are sensitive may suppress zeros.
* ``K_ANONYMITY`` = 5: the smallest group of people sharing released quasi-identifiers in a
  record-level release (ICO Anonymisation code of practice; ISB 1523's risk thresholds),
  used as the agreements' default.
* ``MIN_K_ANONYMITY`` = 2: a group of one is a person.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = [
    "DEFAULT_POLICY",
    "K_ANONYMITY",
    "MIN_K_ANONYMITY",
    "ROUNDING",
    "SUPPRESS_ZEROS",
    "THRESHOLD",
    "DisclosureError",
    "Policy",
    "Rounding",
    "true_range",
]

Rounding = Literal["nearest5", "midpoint6"]

#: Counts of 1..THRESHOLD people are suppressed (HES, OpenSAFELY).
THRESHOLD = 7
#: Published counts are rounded to the nearest 5 (HES, OpenSAFELY).
ROUNDING: Rounding = "nearest5"
#: Zeros are published as true zeros unless an output says otherwise.
SUPPRESS_ZEROS = False
#: Default k of k-anonymity for record-level releases under an agreement.
K_ANONYMITY = 5
#: The smallest k an agreement may set.
MIN_K_ANONYMITY = 2


class DisclosureError(ValueError):
    """The table cannot be protected as asked (bad arguments or bad source counts)."""


@dataclass(frozen=True)
class Policy:
    """The disclosure-control policy of one output (``safehaven.publish.disclosure.tables``)."""

    threshold: int = THRESHOLD
    """Counts of 1..threshold people are suppressed (HES, OpenSAFELY: 7)."""
    rounding: Rounding = ROUNDING
    """``"nearest5"`` (default) or OpenSAFELY ``"midpoint6"``."""
    suppress_zeros: bool = SUPPRESS_ZEROS
    """Also suppress zero cells and, against a denominator, zero complements (100% cells)."""

    def __post_init__(self) -> None:
        if self.threshold < 0:
            raise DisclosureError("threshold must be >= 0")
        if self.rounding not in ("nearest5", "midpoint6"):
            raise DisclosureError(f"unknown rounding {self.rounding!r}")

    def round_sql(self, expr: str) -> str:
        """SQL rounding a non-negative integer expression onto this policy's grid."""
        if self.rounding == "nearest5":
            return f"((({expr}) + 2) // 5) * 5"
        return f"(CASE WHEN ({expr}) = 0 THEN 0 ELSE ((({expr}) + 5) // 6) * 6 - 3 END)"

    def on_grid_sql(self, expr: str) -> str:
        """SQL true when a published count lies on this policy's grid."""
        if self.rounding == "nearest5":
            return f"(({expr}) % 5 = 0)"
        return f"(({expr}) = 0 OR ({expr}) % 6 = 3)"

    def small_sql(self, expr: str) -> str:
        """SQL true when a true count must be primary-suppressed."""
        zero = f" OR ({expr}) = 0" if self.suppress_zeros else ""
        return f"(({expr}) BETWEEN 1 AND {self.threshold}{zero})"


#: The default policy (every default above).
DEFAULT_POLICY = Policy()


def true_range(published: int, policy: Policy = DEFAULT_POLICY) -> tuple[int, int]:
    """The true counts a published (unsuppressed) cell value can stand for, inclusive.

    The rounding window (nearest 5: +-2; midpoint 6: -2..+3), less the counts
    1..threshold, which are suppressed before rounding. Under the default threshold a
    published 0 is a true zero. Used to reason about differencing between outputs and by
    the disclosure audit, which models every published value as this interval.
    """
    if policy.rounding == "nearest5":
        lo, hi = published - 2, published + 2
    else:
        lo, hi = (0, 0) if published == 0 else (published - 2, published + 3)
    lo = max(lo, 0)
    if lo >= 1:
        lo = max(lo, policy.threshold + 1)
    elif hi <= policy.threshold:
        hi = 0
    return (lo, hi)
