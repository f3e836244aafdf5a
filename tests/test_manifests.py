"""Every recipe in manifests/ validates against the CLI's options, and its
chat-template handling works on a tokenizer stand-in of its model family."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from curation.cli.main import build_parser
from curation.cli.options import load_config_file, resolve
from curation.cli.recipes import thinking_format, validate_manifest
from curation.cli.registry import VERBS
from probes.chat import render_generation_prompt
from probes.models import LoadedModel

MANIFESTS = sorted((Path(__file__).parent.parent / "manifests").glob("*.yaml"))

# Stand-ins for the two template families the recipes cover: one that opens the
# thinking block itself (DeepSeek-R1 distills), one that does not and renders an
# empty closed block when thinking is off (Qwen3).
R1_STYLE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}"
)
QWEN3_STYLE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def test_there_are_real_model_recipes() -> None:
    names = {p.stem for p in MANIFESTS}
    assert {"deepseek-r1-distill-qwen-7b", "qwen3-8b-thinking", "qwen3-30b-a3b-thinking", "demo"} <= names


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.stem)
def test_manifest_validates_and_resolves_for_each_verb(path: Path) -> None:
    manifest, raw = validate_manifest(path)
    assert manifest.recipe.name == path.stem
    parser = build_parser()
    values = load_config_file(path)
    for verb, declared in VERBS.items():
        options, section = declared.options, declared.section
        if not isinstance(raw.get(section), dict):
            continue  # no section for this verb ("judge: context" at the top level is the option, not curate judge's section)
        args = parser.parse_args([*verb.split(), *_required_flags(options)])
        resolved = resolve(args, options, section, values)
        for key, value in raw[section].items():
            assert resolved[key] == value or str(resolved[key]) == str(value), (verb, key)
    if isinstance(raw.get("judge"), str):  # one judge for every stage, set once at the top level
        declared = VERBS["probe train"]
        args = parser.parse_args(["probe", "train", *_required_flags(declared.options)])
        assert resolve(args, declared.options, declared.section, values)["judge"] == [raw["judge"]]


def _required_flags(options) -> list[str]:
    flags: list[str] = []
    for o in options:
        if o.required:
            flags += [o.flag, "x"]
    return flags


@pytest.mark.parametrize("path", [p for p in MANIFESTS if p.stem != "demo"], ids=lambda p: p.stem)
def test_manifest_chat_template_opens_exactly_one_thinking_block(path: Path, lm: LoadedModel) -> None:
    manifest, raw = validate_manifest(path)
    tok = AutoTokenizer.from_pretrained(lm.path)
    tok.chat_template = R1_STYLE if manifest.recipe.template_opens_thinking else QWEN3_STYLE
    fmt = thinking_format(raw)
    text = render_generation_prompt(tok, "Is it safe?", fmt)
    assert text.rstrip().endswith(fmt.open_marker)
    if fmt.harmony:  # openai-harmony renders it; <|end|> ends every message, the user's turn too
        assert text.endswith("Is it safe?<|end|><|start|>assistant" + fmt.open_marker)
        return
    assert text.count(fmt.open_marker) == 1 and fmt.close_marker not in text


def test_broken_recipes_fail(tmp_path: Path, lm: LoadedModel) -> None:
    good = MANIFESTS[0].read_text()
    bad_key = tmp_path / "bad-key.yaml"
    bad_key.write_text(good + "\nscore:\n  max_new_tokenz: 5\n")
    with pytest.raises(ValueError):
        validate_manifest(bad_key)
    bad_type = tmp_path / "bad-type.yaml"
    bad_type.write_text(good.replace("budget: 1.7%", "budget: 1.7%\n  seed: many"))
    with pytest.raises(ValueError, match="seed"):
        validate_manifest(bad_type)
    # Qwen3 with thinking switched off renders a closed block: the check catches it.
    qwen = (Path(__file__).parent.parent / "manifests" / "qwen3-8b-thinking.yaml").read_text()
    off = tmp_path / "qwen3-off.yaml"
    off.write_text(qwen.replace("enable_thinking: true", "enable_thinking: false"))
    manifest, raw = validate_manifest(off)
    tok = AutoTokenizer.from_pretrained(lm.path)
    tok.chat_template = QWEN3_STYLE
    # The render itself refuses, naming the kwarg that fixes it, before any generation.
    with pytest.raises(ValueError, match=r"closes the thinking block.*enable_thinking"):
        render_generation_prompt(tok, "Is it safe?", thinking_format(raw))


def test_a_manifest_without_a_recipe_block_is_valid_and_a_broken_one_names_the_key(tmp_path: Path) -> None:
    plain = tmp_path / "nightly.yaml"
    plain.write_text("run:\n  budget: 1.7%\n  max_new_tokens: 128\n")
    manifest, _ = validate_manifest(plain)
    assert manifest.recipe is None
    broken = tmp_path / "broken.yaml"
    broken.write_text("recipe:\n  name: x\n  description: y\nrun:\n  budget: 1.7%\n")
    with pytest.raises(ValueError, match=r"'recipe\.architecture': field required\. A recipe block looks like:"):
        validate_manifest(broken)
