"""``python -m deat report``: the argument parser (light: no pandas, so that ``python -m deat --help`` stays
fast) and the command, which regenerates the report of one or several studies."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)

DESCRIPTION = """Tables, statistics and figures of studies, from per-run metrics.json / eval.json (no training).

    python -m deat report --results-dir results
    python -m deat report --manifest results/studies/quick/manifest.json

Per study: tables as .md, .tex (booktabs) and .csv (plain: pandas.read_csv(path) loads them) under the tables
folder, with the study's protocol once in protocol.md there; runs.csv; summary.json; figures as .png and .pdf."""


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=DESCRIPTION, add_help=add_help,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", nargs="+", type=Path, metavar="PATH",
                        help="study manifest(s) written by the workflow; run dirs are relative to the current "
                             "directory (the repository root)")
    source.add_argument("--results-dir", type=Path, metavar="DIR",
                        help="regenerate every study found as DIR/studies/*/manifest.json; run dirs are relative "
                             "to DIR's parent")
    parser.add_argument("--tables-dir", default=None,
                        help="where tables go; '{study}' is replaced by the study name "
                             "(default: <results>/tables/{study}, <results> = --results-dir or 'results')")
    parser.add_argument("--figures-dir", default=None,
                        help="where figures go; '{study}' is replaced (default: <results>/figures/{study})")
    return parser


def main(args: argparse.Namespace) -> int:
    from .loading import load_manifest
    from .study import build_report

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.results_dir is not None:
        manifest_paths = sorted(args.results_dir.glob("studies/*/manifest.json"))
        if not manifest_paths:
            raise ValueError(f"--results-dir {args.results_dir}: no studies/*/manifest.json under it")
        results_root, runs_root = args.results_dir, args.results_dir.parent
    else:
        manifest_paths, results_root, runs_root = args.manifest, Path("results"), Path(".")
    tables_template = args.tables_dir or str(results_root / "tables" / "{study}")
    figures_template = args.figures_dir or str(results_root / "figures" / "{study}")
    for name, template in (("--tables-dir", tables_template), ("--figures-dir", figures_template)):
        if len(manifest_paths) > 1 and "{study}" not in template:
            raise ValueError(f"{name} {template!r}: several studies need '{{study}}' in the path")

    for path in manifest_paths:
        manifest = load_manifest(path)
        study = manifest["study"]
        written = build_report(manifest, tables_template.format(study=study), figures_template.format(study=study),
                               runs_root)
        log.info("study %s: wrote %d files under %s and %s", study, len(written),
                 tables_template.format(study=study), figures_template.format(study=study))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
