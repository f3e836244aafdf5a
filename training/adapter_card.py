"""The adapter's model card (README.md beside the weights): what it was trained on, how, and
where the data came from."""

from __future__ import annotations


def adapter_card(summary: dict[str, object]) -> str:
    """The adapter's model card: what it was trained on and where that came from."""
    lineage = summary.get("data_lineage") or {}
    assert isinstance(lineage, dict)
    cfg = summary["config"]
    assert isinstance(cfg, dict)
    lines = [
        "---",
        "library_name: peft",
        "tags: [lora, safety, refusal-cliff, cliff-curate]",
        "---",
        "",
        "# LoRA adapter: safety fine-tune on a cliff-curate slice",
        "",
        f"- base model: `{summary['base_model']}` (fingerprint `{summary['base_fingerprint']}`)",
        f"- training data: `{summary['data']}` (sha256 `{summary['data_sha256']}`), {summary['n_safety_examples']} safety pairs",
        f"- retain set: `{summary['retain']}`" if summary.get("retain") else "- retain set: none",
        f"- examples in all: {summary['n_examples']}; steps {summary['steps']}; final training loss {summary['train_loss']:.4f}",
        f"- LoRA r={cfg['lora_r']}, alpha={cfg['lora_alpha']}, target `{cfg['target_modules']}`; "
        f"{cfg['epochs']} epochs at learning rate {cfg['learning_rate']}, batch {cfg['batch_size']}, max length {cfg['max_length']}",
        _robust_line(summary.get("robust")),
        "",
        "## Where the training data came from",
        "",
    ]
    if lineage:
        lines += [
            f"Selected by `curate select`: strategy `{lineage.get('strategy')}`, budget `{lineage.get('budget')}`, "
            f"{lineage.get('n_selected')} of {lineage.get('n_pool')} scored candidates; model `{lineage.get('model_fingerprint')}`, "
            f"probe `{lineage.get('probe_id')}`, store `{lineage.get('db')}`. The slice's own card: `{lineage.get('card')}`.",
        ]
    else:
        lines.append("No selection manifest was found beside the training data, so its lineage is not recorded here.")
    return "\n".join(lines) + "\n"


def _robust_line(info: object) -> str:
    if not isinstance(info, dict):
        return "- trained plainly (no attack in the loop)"
    c = info["config"]
    extras = []
    if c.get("harmful_rows_only"):
        extras.append("attacks on the slice's harmful rows only")
    if c.get("early_tokens"):
        extras.append(f"the harmful rows' first {c['early_tokens']} completion tokens weighted {c['early_weight']:g} x more")
    return _method_line(info, c) + "".join(f"; {e}" for e in extras)


def _method_line(info: dict, c: dict) -> str:
    if "lat" in info:
        s = info["lat"]
        return (f"- trained against steering (`--robust --robust-method lat`, latent adversarial training): p={c['p']}; "
                f"a PGD perturbation of the residual stream entering layers {s['perturbed_layers']}, {c['lat_steps']} ascent steps, "
                f"per-token L2 bound {c['lat_epsilon']} x the residual norm (largest reached {s['max_relative_norm']:.3f}); "
                f"{s['attacked']} of {s['steps']} loss computations attacked, on {s['harmful_rows']} harmful rows; the retain "
                "rows trained unperturbed")
    if c.get("method") == "adaptive":
        last = info["retuned"][-1] if info.get("retuned") else []
        places = ", ".join("{} at layer {}{}".format(p.get("attack", "actadd"), p["layer"], "" if p.get("attack") == "ablate"
                                                    else " α {:g}".format(p["alpha"])) for p in last) or "none within the budget"
        return (f"- trained against steering (`--robust --robust-method adaptive`, against the re-tuned attacker): p={c['p']} "
                f"per step over {', '.join(c['attacks'])}; {sum(info['attacked'].values())} of {info['steps']} steps attacked "
                f"{info['attacked']}; the attacks re-tuned {len(info.get('retuned', []))} times within harmless KL {c['kl_budget']} "
                f"(the {c['tune_top']} strongest places kept; at the last re-tuning: "
                f"{places})")
    return (f"- trained against steering (`--robust`): p={c['p']} per step over {', '.join(c['attacks'])}; "
            f"{sum(info['attacked'].values())} of {info['steps']} steps attacked {info['attacked']}; direction at layer "
            f"{info['direction_layer']}, position {info['direction_position']}, refreshed {info['refreshes']} times")
