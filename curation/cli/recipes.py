"""Run recipes (``manifests/*.yaml``): validated against the CLI's own option
declarations, so a recipe cannot name an option the CLI does not have.

A recipe is a ``--config`` file with one more section, ``recipe`` (what it is
for). Top-level keys apply to every verb that has that option; a section named
for a verb (``probe_train``, ``score``, ``select``, ``finetune``, ``evaluate``,
``retain``, ``demo``, ``organism_build``) applies to that verb alone::

    curate --config manifests/qwen3-8b-thinking.yaml score --probe P --data D --db DB
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from curation.cli.options import Option, convert_value, parse_bool, read_yaml_mapping
from curation.cli.registry import VERBS


class RecipeInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    description: str
    hf_id: str | None = None  # where to download the checkpoint from, outside this tool
    architecture: str
    template_opens_thinking: bool = Field(
        description="whether the model's own chat template already opens the thinking block in the generation prompt"
    )
    gpu: str | None = None


class Manifest(BaseModel):
    model_config = ConfigDict(extra="allow")

    # Optional: a manifest that only sets options (a nightly job on a model directory) needs no
    # recipe; the model's own family then gives the format.
    recipe: RecipeInfo | None = None


_RECIPE_EXAMPLE = ("recipe:\n  name: my-run\n  description: what this runs\n  architecture: Qwen3ForCausalLM\n"
                   "  template_opens_thinking: false")


def _options_by_section() -> dict[str, dict[str, Option]]:
    return {verb.section: {o.dest: o for o in verb.cli_options} for verb in VERBS.values()}


def validate_manifest(path: str | Path) -> tuple[Manifest, dict[str, Any]]:
    """Parse and check a recipe; returns it and its raw mapping. Errors name the key."""
    path = Path(path)
    raw = read_yaml_mapping(path, "recipe")
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"{path}: '{where}': {first['msg'].lower()}. A recipe block looks like:\n{_RECIPE_EXAMPLE}\n"
                         "(or leave the whole 'recipe' block out: it is optional)") from None
    from probes.families import UnsupportedModelError, family_for_architecture

    if manifest.recipe is not None:
        try:
            family_for_architecture(manifest.recipe.architecture)
        except UnsupportedModelError as exc:
            raise ValueError(f"{path}: recipe.architecture: {exc}") from None
    sections = _options_by_section()
    all_options: dict[str, Option] = {}
    for opts in sections.values():
        all_options.update(opts)
    for key, value in raw.items():
        if key == "recipe":
            continue
        # "judge" is both a verb (a section) and an option of many verbs: a mapping is the section.
        if key in sections and (isinstance(value, dict) or key not in all_options):
            if not isinstance(value, dict):
                raise ValueError(f"{path}: section '{key}' must be a mapping")
            for name, sub in value.items():
                if name not in sections[key]:
                    raise ValueError(f"{path}: '{key}.{name}' is not an option of curate {key.replace('_', ' ')}")
                _check_value(path, f"{key}.{name}", sections[key][name], sub)
        elif key in all_options:
            _check_value(path, key, all_options[key], value)
        else:
            raise ValueError(f"{path}: '{key}' is neither a verb section nor an option of any verb")
    return manifest, raw


def _check_value(path: Path, where: str, option: Option, value: Any) -> None:
    if value is None:
        return
    if option.repeat and isinstance(value, list):
        for item in value:
            _check_value(path, where, option, item)
        return
    try:
        converted = convert_value(option.type or parse_bool, value, where)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    if option.choices is not None and converted not in option.choices:
        raise ValueError(f"{path}: '{where}' must be one of {list(option.choices)}, got {value!r}")


def thinking_format(raw: dict[str, Any], section: str = "score"):
    """The ThinkingFormat a recipe gives a verb: its architecture's family format, with the
    recipe's keys over it (section keys over top-level ones), as the command line resolves it."""
    from dataclasses import replace

    from probes.families import family_for_architecture

    merged = {**{k: v for k, v in raw.items() if not isinstance(v, dict) or k == "chat_template_kwargs"},
              **raw.get(section, {})}
    from probes.chat import ThinkingFormat
    from probes.families import family_for_dir

    recipe = raw.get("recipe")
    model = merged.get("model")
    if isinstance(recipe, dict) and recipe.get("architecture"):
        fmt = family_for_architecture(recipe["architecture"]).thinking
    elif isinstance(model, str) and Path(model, "config.json").is_file():
        fmt = family_for_dir(model).thinking
    else:
        fmt = ThinkingFormat()
    changes = {field: merged[key] for key, field in (("think_open", "open_marker"), ("think_close", "close_marker"),
                                                      ("system_prompt", "system_prompt")) if merged.get(key)}
    if merged.get("chat_template_kwargs") is not None:
        changes["template_kwargs"] = dict(merged["chat_template_kwargs"])
    return replace(fmt, **changes)
