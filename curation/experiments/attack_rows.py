"""The attack matrix's rows and adaptive attacks by name (no torch: the command line reads them)."""

from __future__ import annotations

# (strategy, budget, robust fine-tune: False; True for --robust-method random; or the method's name, "lat"
# for latent adversarial training, "adaptive" for training against the re-tuned actadd attacker), each robust
# row with the setting robust-sweep chose for its method where given, else the method's defaults; None: the base model.
ROWS: dict[str, tuple[str, str, bool | str] | None] = {
    "base": None,
    "cliff 1.7%": ("cliff", "1.7%", False),
    "random 1.7%": ("random", "1.7%", False),
    "full": ("full", "100%", False),
    "cliff 1.7% robust": ("cliff", "1.7%", True),
    "random 1.7% robust": ("random", "1.7%", True),
    "full robust": ("full", "100%", True),
    "cliff 1.7% robust-lat": ("cliff", "1.7%", "lat"),
    "cliff 1.7% robust-adaptive": ("cliff", "1.7%", "adaptive"),
}
# Re-tuned on every row's own validation prompts: the attacks the robust fine-tune targets.
ADAPTIVE_ATTACKS = ("ablate", "actadd")
