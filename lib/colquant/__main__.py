"""Command line: `python -m colquant run params/<profile>.yaml` and `python -m colquant bench ...`."""

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
    add_push_command(commands)
    args, rest = parser.parse_known_args(argv)
    if args.command == "push":
        return push_command(args)
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


def add_push_command(commands: argparse._SubParsersAction) -> None:
    push = commands.add_parser("push", help="upload a quantized variant, its model card and results to the hub")
    push.add_argument("variant", help="the variant's directory (outputs/<profile>/variants/<name>)")
    push.add_argument("--repo-id", required=True, help="ORG/NAME on the hub")
    push.add_argument("--private", action="store_true", help="create the repo as private")
    push.add_argument("--dry-run", action="store_true", help="validate the card and list the files; upload nothing")
    push.add_argument("--force", action="store_true", help="upload even a random-weight variant")


def push_command(args: argparse.Namespace) -> int:
    from colquant.hub import PushError, push

    try:
        files = push(args.variant, args.repo_id, private=args.private, dry_run=args.dry_run, force=args.force)
    except PushError as error:
        print(f"colquant push: {error}", file=sys.stderr)
        return 1
    verb = "would upload" if args.dry_run else "uploaded"
    print(f"{verb} {len(files)} files to {args.repo_id} (model card valid):\n" + "\n".join(f"  {name}" for name in files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
