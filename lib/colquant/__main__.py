"""Command line: `python -m colquant run params/<profile>.yaml`, `python -m colquant bench ...` and
`python -m colquant tune`."""

from __future__ import annotations

import argparse
import sys

import pandas as pd


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="colquant", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="execute the notebooks for a profile and write REPORT.md")
    run.add_argument("profile", help="params/<profile>.yaml")
    run.add_argument("--force", action="store_true", help="re-run steps even if unchanged")
    run.add_argument("--notebooks", help="comma-separated notebook numbers to run, e.g. 01,02,03,06")
    commands.add_parser("notebooks", help="re-execute the committed notebooks/ in place (nbval reference)")
    commands.add_parser("bench", help="4-bit vs BF16 inference benchmark (see colquant.bench)", add_help=False)
    commands.add_parser("tune", help="tune the 4-bit kernels for this GPU (cached) and print the table",
                        add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "tune":
        from colquant.kernels.autotune import tune_main

        return tune_main(rest)
    if args.command == "bench":
        from colquant.bench import main as bench_main

        return bench_main(rest)
    from colquant.pipeline import PipelineError, refresh_committed_notebooks, run as run_pipeline

    if args.command == "notebooks":
        for notebook in refresh_committed_notebooks():
            print(f"executed {notebook}")
        return 0
    selected = tuple(args.notebooks.split(",")) if args.notebooks else None
    try:
        summary = run_pipeline(args.profile, force=args.force, notebooks=selected)
    except PipelineError as error:
        print(f"colquant run: {error}", file=sys.stderr)
        return 1
    print(pd.DataFrame(summary).to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
