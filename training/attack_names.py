"""Attack names, kept free of heavy imports so the CLI can offer them as choices
without loading torch."""

DENSE_ATTACKS = (
    "none", "ablate", "actadd", "orthogonalize", "benign-compliance", "benign-json", "template",
    "benign-compliance+template", "benign-json+template",
)
MOE_ATTACKS = ("expert-route", "expert-vector", "single-expert")
ATTACKS = DENSE_ATTACKS + MOE_ATTACKS
