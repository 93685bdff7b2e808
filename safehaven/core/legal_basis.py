"""The legal bases a flow out of the haven may declare, and which of them overrule the opt-out.

One place for the list (CoP 21, 30-31, 40, 43a: every disclosure names its legal basis):

* ``consent``: the patient consented to this flow;
* ``statutory``: disclosure required by law or a court order;
* ``public_interest``: disclosure in the public interest (permitted, not required);
* ``section_251``: COPI regulation 5, with Confidentiality Advisory Group support (permitted,
  not required);
* ``copi_reg3``: COPI regulation 3, communicable disease and public health emergencies;
* ``anonymised``: no confidential information leaves, so no basis for confidential data is
  needed; identifiable or pseudonymised data under it has no legal basis and is refused.

The national data opt-out is honoured for uses "only permitted but not required by law" (CoP 13,
14b); it is overruled by consent (the later and more specific expression of the patient's
wishes), by a legal requirement (CoP 13; guide Rule 4D) and by COPI regulation 3 (the CoP's
preamble to 11-14: preventing the spread of notifiable disease): :data:`OPT_OUT_EXEMPT`.
``docs/rules.md`` lists where each rule is enforced and tested.
"""

from __future__ import annotations

from typing import Literal, get_args

LegalBasis = Literal["consent", "statutory", "public_interest", "section_251", "copi_reg3", "anonymised"]

CONSENT = "consent"
STATUTORY = "statutory"
PUBLIC_INTEREST = "public_interest"
SECTION_251 = "section_251"
COPI_REG3 = "copi_reg3"
ANONYMISED = "anonymised"

#: Every legal basis, in the order they are offered (the ``LegalBasis`` type).
BASES_IN_ORDER: tuple[str, ...] = get_args(LegalBasis)
#: Every legal basis a flow out of the haven may declare.
LEGAL_BASES: frozenset[str] = frozenset(BASES_IN_ORDER)
#: Bases under which confidential (identifiable or pseudonymised) data may leave (CoP 21, 40).
CONFIDENTIAL_BASES: frozenset[str] = LEGAL_BASES - {ANONYMISED}
#: Bases the national data opt-out does not apply to, each with the reason it overrules it (CoP 13).
OPT_OUT_EXEMPT: dict[str, str] = {
    CONSENT: "the patient consented to this flow (rules for sharing, first rule)",
    STATUTORY: "disclosure required by law or court order (CoP 13; guide Rule 4D)",
    COPI_REG3: "COPI regulation 3, communicable disease / public health emergency "
    "(rules for sharing; CoP preamble to 11-14)",
}
#: The bases exempt from the national data opt-out (:data:`OPT_OUT_EXEMPT`).
EXEMPT_BASES: frozenset[str] = frozenset(OPT_OUT_EXEMPT)
