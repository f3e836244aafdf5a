"""The ``curate`` command: a dispatcher over the verb registry.

Parse the verb's flags, resolve layered settings (defaults < config file <
``CURATE_*`` environment < flags), validate a recipe when the verb reads one,
run the verb's job, and turn an expected failure into one line on stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from curation.cli.options import add_options, help_text, load_config_file, resolve
from curation.cli.recipes import validate_manifest
from curation.cli.registry import VERBS
from curation.cli.verb import console


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="curate", description="Cliff-as-a-Judge safety data curation for reasoning models.")
    parser.add_argument("--config", help="YAML file of option values (layered: defaults < file < CURATE_* env < flags)")
    sub = parser.add_subparsers(dest="verb", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for verb in VERBS.values():
        parts = verb.name.split()
        text = help_text(verb.help)  # a description is not %-formatted, a help line is
        if len(parts) == 2:
            if parts[0] not in groups:
                actions = [v.name.split()[1] for v in VERBS.values() if v.name.startswith(parts[0] + " ")]
                group = sub.add_parser(parts[0], help=f"{parts[0]} commands: {', '.join(actions)}")
                groups[parts[0]] = group.add_subparsers(dest="action", required=True)
            p = groups[parts[0]].add_parser(parts[1], help=text, description=verb.help)
        else:
            p = sub.add_parser(verb.name, help=text, description=verb.help)
        add_options(p, verb.options)
        p.set_defaults(_verb=verb.name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) >= 2 and argv[0] == "run" and not argv[1].startswith("-"):
        argv = ["--config", argv[1], "run", *argv[2:]]  # curate run MANIFEST [flags]
    args = build_parser().parse_args(argv)
    verb = VERBS[args._verb]
    try:
        file_values = load_config_file(args.config)
        settings = resolve(args, verb.options, verb.section, file_values)
        settings["_config"] = args.config
        if verb.validates_recipe and args.config:
            validate_manifest(args.config)
        return verb.run(settings)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        # One unwrapped line: cron logs are grepped, and rich would wrap at 80 columns off a terminal.
        console.print(f"[red]error:[/red] {exc}", soft_wrap=True, highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
