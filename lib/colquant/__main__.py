"""colquant: run the notebook pipeline for a profile, benchmark 4-bit against BF16, tune the
4-bit kernels for this GPU, refresh notebooks.

Every subcommand takes the same profile argument: a name from params/ (`tiny`, `colqwen3-4b`,
`synthetic-4b`) or the path of a profile YAML. Heavy imports (torch, transformers, papermill) happen
inside the subcommand that needs them, so `colquant --help` and `colquant --version` are instant.
A subcommand is one `add_<name>` function that registers its parser and handler in `SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("colquant")
REPO_ROOT = Path(__file__).resolve().parents[2]
PARAMS_DIR = REPO_ROOT / "params"
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
DEFAULT_PROFILE = "tiny"
CHECKOUT_HINT = (
    "they ship with the repository, not the installed package: clone it "
    "(git clone <colquant repo> && cd colquant && pip install -e .) and run colquant from the checkout"
)


class CliError(RuntimeError):
    """A command-line argument names something that does not exist; the message says what does."""


def profile_file(name_or_path: str) -> Path:
    """`tiny` -> params/tiny.yaml; an existing file or anything ending in .yaml/.yml is a path."""
    candidate = Path(name_or_path).expanduser()
    if candidate.suffix in (".yaml", ".yml") or candidate.is_file():
        return candidate
    if not PARAMS_DIR.is_dir():
        raise CliError(f"no profile {name_or_path!r}: the profiles in params/ are not here ({PARAMS_DIR}); {CHECKOUT_HINT}")
    path = PARAMS_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        names = ", ".join(sorted(p.stem for p in PARAMS_DIR.glob("*.yaml")))
        raise CliError(f"no profile {name_or_path!r}: pass one of {names} or the path of a profile YAML")
    return path


def require_notebooks() -> None:
    """The pipeline executes the repository's notebooks; say so plainly when they are absent."""
    if not NOTEBOOKS_DIR.is_dir():
        raise CliError(f"the pipeline's notebooks are not at {NOTEBOOKS_DIR}: {CHECKOUT_HINT}")


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("colquant")
    except PackageNotFoundError:  # run from a source tree that was never pip-installed
        return "unknown (not installed; pip install -e .)"


# --- subcommands ----------------------------------------------------------------------------------


def add_run(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("run", help="execute the notebooks for a profile and write REPORT.md")
    parser.add_argument("profile", nargs="?", default=DEFAULT_PROFILE, help="profile name (tiny, ...) or YAML path")
    parser.add_argument("--force", action="store_true", help="re-run steps even if unchanged")
    parser.add_argument("--plan", action="store_true",
                        help="print the steps a run would execute (and which are done), the pages and queries each "
                             "notebook encodes, the caches it reuses and an estimated wall time from a short warm-up "
                             "on this machine's device; run and write nothing")
    parser.add_argument("--notebooks", help="comma-separated notebook numbers to run, e.g. 01,02,03,06")
    parser.add_argument("--wait", type=seconds, default=0.0, metavar="SECONDS",
                        help="wait this long for another run on the same outputs to finish (default: refuse at once)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override a profile setting, validated like the file (repeatable), e.g. "
                             "--set quantization.iters=50 --set 'calibration.seqlens=[256]'")
    parser.set_defaults(handler=run_command)


def seconds(text: str) -> float:
    """`--wait`'s value: a number of seconds >= 0 (`inf`: until free); NaN would never time out."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds >= 0 (e.g. --wait 600)")
    return value


def run_command(args: argparse.Namespace, rest: list[str]) -> int:
    from colquant.research.params import ProfileError
    from colquant.research.pipeline import PipelineError, run
    from colquant.research.workspace import OutputError

    require_notebooks()
    selected = None if args.notebooks is None else tuple(args.notebooks.split(","))  # checked by run()
    if args.plan:
        return plan_command(args, selected)
    try:
        summary = run(profile_file(args.profile), overrides=args.overrides, force=args.force, notebooks=selected,
                      wait_s=args.wait)
    except ProfileError as error:
        raise CliError(str(error)) from error
    except (PipelineError, OutputError) as error:
        log.error("colquant run: %s", error)
        return 1
    width = max(len(row["step"]) for row in summary)
    print("\n".join(f"{row['step']:<{width}}  {row['status']}" for row in summary))
    return 0


def plan_command(args: argparse.Namespace, selected: tuple[str, ...] | None) -> int:
    """`colquant run PROFILE --plan`: the plan on stdout, nothing run or written."""
    from colquant.research.params import ProfileError
    from colquant.research.pipeline import PipelineError
    from colquant.research.run_plan import format_plan, make_plan

    try:
        print(format_plan(make_plan(profile_file(args.profile), overrides=args.overrides, force=args.force,
                                    notebooks=selected)))
    except (ProfileError, PipelineError) as error:
        raise CliError(str(error)) from error
    return 0


def add_notebooks(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("notebooks", help="re-execute the committed notebooks/ in place (nbval reference)")
    parser.add_argument("profile", nargs="?", default=DEFAULT_PROFILE, help="profile name or YAML path")
    parser.set_defaults(handler=notebooks_command)


def notebooks_command(args: argparse.Namespace, rest: list[str]) -> int:
    from colquant.research.pipeline import refresh_committed_notebooks

    require_notebooks()
    for notebook in refresh_committed_notebooks(profile_file(args.profile)):
        log.info("executed %s", notebook)
    return 0


def add_passthrough(commands: argparse._SubParsersAction, name: str, handler: Callable[..., int], help: str) -> None:
    """A subcommand that parses its own options (`colquant <name> --help` shows them)."""
    commands.add_parser(name, add_help=False, help=help).set_defaults(handler=handler)


def add_bench(commands: argparse._SubParsersAction) -> None:
    add_passthrough(commands, "bench", bench_command,
                    "4-bit vs BF16 inference benchmark: colquant bench [profile] [options] (colquant bench --help)")


def bench_command(args: argparse.Namespace, rest: list[str]) -> int:
    """`colquant bench tiny ...` reads as `--profile tiny ...`; --profile works too (a name or a YAML path)."""
    from colquant.deploy import bench
    from colquant.research.params import ProfileError, load_profile

    if rest and not rest[0].startswith("-"):
        profile, *rest = rest
        rest = ["--profile", profile, *rest]
    options = bench.build_parser().parse_args(rest)
    try:
        profile = load_profile(profile_file(options.profile), check_device=options.device is None)
    except ProfileError as error:
        raise CliError(str(error)) from error
    bench.run_with_options(profile, options)
    return 0


def add_tune(commands: argparse._SubParsersAction) -> None:
    add_passthrough(commands, "tune", tune_command,
                    "tune the 4-bit kernels for this GPU once (cached on disk) and print the table (colquant tune --help)")


def tune_command(args: argparse.Namespace, rest: list[str]) -> int:
    from colquant.kernels.autotune import tune_main

    return tune_main(rest)


def add_push(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("push", help="upload a quantized variant, its model card and results to the hub")
    parser.add_argument("variant", help="the variant's directory (outputs/<profile>/variants/<name>)")
    parser.add_argument("--repo-id", required=True, help="ORG/NAME on the hub")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--dry-run", action="store_true", help="run every check push runs and list the files it would send; upload nothing")
    parser.add_argument("--force", action="store_true", help="upload even a random-weight variant")
    parser.set_defaults(handler=push_command)


def push_command(args: argparse.Namespace, rest: list[str]) -> int:
    """The file list is the command's output (stdout); problems are CliErrors like every subcommand's."""
    from colquant.deploy.hub import PushError, push

    try:
        files = push(args.variant, args.repo_id, private=args.private, dry_run=args.dry_run, force=args.force)
    except PushError as error:
        raise CliError(str(error)) from error
    verb = "would upload" if args.dry_run else "uploaded"
    print(f"{verb} {len(files)} files to {args.repo_id} (variant loads, model card valid):\n"
          + "\n".join(f"  {name}" for name in files))
    return 0


def whole_number(text: str) -> int:
    """An argparse type: a whole number >= 1 (0 and negatives are refused, not replaced by a default)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return value


def add_encode_corpus(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "encode-corpus", help="encode a page corpus into a sharded, resumable index "
                              "(N GPUs: torchrun --nproc-per-node N -m colquant encode-corpus ...)",
        description="Encode every page of SOURCE into a sharded index at OUT; a rerun resumes, keeping the "
                    "shards whose pages are unchanged. A folder is read recursively (hidden entries skipped); "
                    "symbolic links are followed wherever they point; each page of a PDF and each frame of a "
                    "multi-frame image (TIFF, GIF, WebP, PNG) is a page, FILE#page=N.")
    parser.add_argument("model", help="hub id or checkpoint directory of the model or variant")
    parser.add_argument("source", help="folder of page images and/or PDFs, one PDF or image file, a dataset saved "
                                       "with save_to_disk, or a datasets repository (with --split)")
    parser.add_argument("out", help="index directory (a rerun into it resumes)")
    parser.add_argument("--batch-size", type=whole_number, default=8, help="pages per forward pass (default 8)")
    parser.add_argument("--shard-size", type=whole_number,
                        help="pages per shard file, the unit of resumption (default 256)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                        help="weights and stored embeddings (default bfloat16)")
    parser.add_argument("--device", default="auto", help="auto (this rank's GPU, else CPU), cpu, cuda:N")
    parser.add_argument("--max-num-visual-tokens", type=whole_number,
                        help="visual tokens per page (default: the checkpoint's)")
    parser.add_argument("--split", help="the datasets split to read (SOURCE is then read by datasets.load_dataset)")
    parser.add_argument("--image-column", help="the dataset column holding pages (default: its one image column)")
    parser.add_argument("--id-column", help="the dataset column holding page ids (default: the row number)")
    parser.add_argument("--dpi", type=whole_number, help="resolution PDF pages are rendered at (default 144)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=encode_corpus_command)


def encode_corpus_command(args: argparse.Namespace, rest: list[str]) -> int:
    """Index problems (bad source, another model's index in OUT, OUT not writable, missing extra)
    are CliErrors."""
    from colquant.basics.files import OutputError
    from colquant.inference.distributed import encode_corpus, leave_multicast_off
    from colquant.inference.index import CorpusIndexError
    from colquant.retriever.checkpoint import CheckpointError

    leave_multicast_off()  # before any process group starts (encode_corpus sets them too)
    defaults_unless_given = {name: getattr(args, name) for name in ("shard_size", "dpi")
                             if getattr(args, name) is not None}
    try:
        out = encode_corpus(args.model, args.source, args.out, batch_size=args.batch_size, dtype=args.dtype,
                            device=args.device, max_num_visual_tokens=args.max_num_visual_tokens, split=args.split,
                            image_column=args.image_column, id_column=args.id_column,
                            show_progress_bar=not args.no_progress, **defaults_unless_given)
    except (CorpusIndexError, CheckpointError, OutputError, ValueError) as error:
        raise CliError(str(error)) from error
    log.info("index written to %s (read it with colquant.inference.index.load_index)", out)
    return 0


SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (add_run, add_notebooks, add_bench, add_tune, add_push,
                                                                      add_encode_corpus)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="colquant", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(commands)
    return parser


class CurrentStderrHandler(logging.StreamHandler):
    """A stream handler that writes to whatever `sys.stderr` is at emit time, not at creation:
    `main` may be called many times in one process (tests, notebooks) that swap stderr."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property ignores it
        pass


def show_package_logs() -> None:
    """colquant's own INFO messages on stderr; other libraries' loggers keep their settings."""
    package = logging.getLogger("colquant")
    if not package.handlers:
        handler = CurrentStderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        package.addHandler(handler)
    package.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    show_package_logs()
    args, rest = build_parser().parse_known_args(argv)
    if rest and args.command not in ("bench", "tune"):
        build_parser().error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.handler(args, rest)
    except CliError as error:
        log.error("colquant %s: %s", args.command, error)
        return 2


if __name__ == "__main__":
    sys.exit(main())
