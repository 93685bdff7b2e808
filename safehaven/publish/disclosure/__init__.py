"""Statistical disclosure control: the policy, one table's protection, the joint audit.

* :mod:`.policy`: the policy and every default (threshold, rounding, zeros, k of k-anonymity).
* :mod:`.tables`: one table's protection (suppression, rounding, secondary suppression,
  totals and rates from published values) and its invariants.
* :mod:`.relations`: the relations between outputs that a reader can use (declared in the
  output definitions) and the joint protection of one publication.
* :mod:`.kanon`: k-anonymity of record-level releases (``safehaven.share.releases`` applies it).
* :mod:`.joint`: one table protected knowing the rest of the publication.
* :mod:`.audit`: the attack run before publication: linear programming over every published
  value of the publication, its relations and the previous publication.

The names of :mod:`.tables` are re-exported here, so ``from safehaven.publish.disclosure
import protect`` keeps working.
"""

from safehaven.publish.disclosure.policy import DisclosureError, Policy, true_range
from safehaven.publish.disclosure.tables import (
    FORMULA_LEADERS,
    PRIMARY,
    REASON,
    SECONDARY,
    TOTAL_OVER,
    ColumnReport,
    ProtectionReport,
    check_invariants,
    default_margins,
    formula_led_sql,
    formula_safe_type,
    neutralise_formula_cells,
    neutralise_sql,
    protect,
    public_select_sql,
)

__all__ = [
    "FORMULA_LEADERS",
    "PRIMARY",
    "REASON",
    "SECONDARY",
    "TOTAL_OVER",
    "ColumnReport",
    "DisclosureError",
    "Policy",
    "ProtectionReport",
    "check_invariants",
    "default_margins",
    "formula_led_sql",
    "formula_safe_type",
    "neutralise_formula_cells",
    "neutralise_sql",
    "protect",
    "public_select_sql",
    "true_range",
]
