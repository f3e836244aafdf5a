"""The ``curate`` command: a dispatcher over the verb registry.

Parse the verb's flags, resolve layered settings (defaults < config file <
``CURATE_*`` environment < flags), validate a recipe when the verb reads one,
refuse unsafe outputs, run the verb's job, and turn every failure into one
line on stderr: exit 2 for an expected failure (bad input, a flag, a file),
exit 3 for a bug, with the traceback saved to a file (``--debug`` prints it).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import duckdb
from rich.markup import escape
from safetensors import SafetensorError

from curation.cli.options import add_options, help_text, load_config_file, resolve
from curation.cli.progress import configure
from curation.cli.recipes import validate_manifest
from curation.cli.registry import VERBS
from curation.cli.verb import Settings, Verb, console
from probes.outputs import OutputSpec, check_outputs, mark_output, mark_path

# Failures a user can cause and fix: one line naming the file, row or flag, exit 2.
EXPECTED = (ValueError, OSError, RuntimeError, duckdb.Error, SafetensorError)
EXIT_EXPECTED, EXIT_BUG, EXIT_INTERRUPTED = 2, 3, 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="curate", description="Cliff-as-a-Judge safety data curation for reasoning models.")
    parser.add_argument("--config", help="YAML file of option values (layered: defaults < file < CURATE_* env < flags)")
    parser.add_argument("--debug", action="store_true", help="print the full traceback of an unexpected error")
    loud = parser.add_mutually_exclusive_group()
    loud.add_argument("--quiet", action="store_true", help="no progress: results and errors only")
    loud.add_argument("--verbose", action="store_true", help="also the libraries' own logs (transformers, datasets)")
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
        add_options(p, verb.cli_options)
        p.set_defaults(_verb=verb.name)
    return parser


def _paths(value: object) -> list[str]:
    """An input option's paths: a YAML list, or a comma-separated flag (``--sources a,b``)."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    text = str(value)
    return [text] if Path(text).exists() or "," not in text else [p.strip() for p in text.split(",") if p.strip()]


def _check_outputs(verb: Verb, s: Settings) -> list[OutputSpec]:
    specs = [OutputSpec(o.flag, s.get(_dest(o.flag)), verb.output_is_folder(o, s)) for o in verb.outputs]
    inputs = {f"{flag} ({i + 1})" if i else flag: path for flag in verb.inputs for i, path in enumerate(_paths(s.get(_dest(flag))))}
    replaced = [spec for spec, o in zip(specs, verb.outputs, strict=True) if not o.appends]
    appended = [spec for spec, o in zip(specs, verb.outputs, strict=True) if o.appends]
    check_outputs(verb.name, replaced, inputs, force=bool(s.get("force")))
    check_outputs(verb.name, appended, inputs, force=True)  # appended outputs: inputs and kinds only
    return replaced


def _claim_files(specs: list[OutputSpec], verb: str) -> list[tuple[Path, Path]]:
    """Mark every file output as ours *before* the verb writes it: an export cut off between
    renaming its output into place and writing the mark (a signal, a full disk) would otherwise
    leave a file that its own rerun refuses as someone else's. Folders are marked after the run
    (the mark lives inside them)."""
    claimed: list[tuple[Path, Path]] = []
    for spec in specs:
        if not spec.path or spec.folder:
            continue
        path = Path(spec.path)
        if path.is_dir() or not path.parent.is_dir():
            continue
        try:
            mark_output(path, verb)
        except OSError:
            continue  # an unwritable folder: the verb's own write reports it, with the path
        claimed.append((mark_path(path), path))
    return claimed


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _save_traceback() -> Path | None:
    folder = Path(os.environ.get("CURATE_CACHE_DIR", Path.home() / ".cache" / "cliff-curate")) / "crashes"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"curate-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.txt"
        path.write_text(" ".join(sys.argv) + "\n\n" + traceback.format_exc(), encoding="utf-8")
        return path
    except OSError:
        return None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, duckdb.Error):  # met after the store opened: say what it means, keep DuckDB's words
        lowered = text.lower()
        if "no space left" in lowered or "disk is full" in lowered:
            text = f"no space left on the device holding the store (nothing of the failed commit was kept): {text}"
        elif "permission denied" in lowered or "read-only file system" in lowered:
            text = f"permission denied writing the store or its write-ahead log: {text}"
        else:
            text = f"the store is not a readable DuckDB database or a query on it failed ({type(exc).__name__}): {text}"
    return escape(text if len(text) <= 2000 else text[:2000] + " …")  # a message may hold [brackets]: never markup


def _terminated(signum: int, frame: object) -> None:
    """SIGTERM (a scheduler's stop, ``kill``) unwinds like Ctrl-C: every cleanup that runs on
    an interrupt (temporary files, open runs marked failed, the writer lock) runs on it too."""
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        signal.signal(signal.SIGTERM, _terminated)
    except ValueError:  # not the main thread (curate called from a worker thread): leave signals alone
        pass
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) >= 2 and argv[0] == "run" and not argv[1].startswith("-"):
        argv = ["--config", argv[1], "run", *argv[2:]]  # curate run MANIFEST [flags]
    args = build_parser().parse_args(argv)
    verb = VERBS[args._verb]
    configure(quiet=args.quiet, verbose=args.verbose)
    try:
        file_values = load_config_file(args.config)
        settings = resolve(args, verb.cli_options, verb.section, file_values)
        settings["_config"] = args.config
        if verb.validates_recipe and args.config:
            validate_manifest(args.config)
        replaced = _check_outputs(verb, settings)
        claimed = _claim_files(replaced, verb.name)
        try:
            code = verb.run(settings)
        finally:
            # A claim for a file the run never wrote is dropped; one for a partial file stays, so that
            # the same command can rerun over its own leftovers without --force.
            for mark, path in claimed:
                if not path.exists():
                    mark.unlink(missing_ok=True)
        for spec in replaced:
            if spec.path and Path(spec.path).exists():
                mark_output(spec.path, verb.name)
        return code
    except KeyboardInterrupt:
        console.print("[red]interrupted[/red]", soft_wrap=True, highlight=False)
        return EXIT_INTERRUPTED
    except EXPECTED as exc:
        # One unwrapped line: cron logs are grepped, and rich would wrap at 80 columns off a terminal.
        if args.debug:
            console.print(traceback.format_exc(), soft_wrap=True, highlight=False, markup=False)
        console.print(f"[red]error:[/red] {_one_line(exc)}", soft_wrap=True, highlight=False)
        return EXIT_EXPECTED
    except Exception as exc:  # a bug: one line and where the traceback went
        if args.debug:
            console.print(traceback.format_exc(), soft_wrap=True, highlight=False, markup=False)
        saved = _save_traceback()
        where = f"traceback saved to {saved}" if saved else "the traceback could not be saved"
        console.print(f"[red]unexpected error[/red] ({type(exc).__name__}): {_one_line(exc)}; {where}; "
                      "rerun with --debug to print it", soft_wrap=True, highlight=False)
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
