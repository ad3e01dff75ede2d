"""The `colquant` command line: instant --help/--version, one profile argument for every subcommand,
clear errors for unknown profiles and missing notebooks, and `make lab` usable as root."""

import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from colquant import __main__ as cli

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "pandas", "papermill", "PIL")


def run_cli_in_fresh_interpreter(*args: str) -> subprocess.CompletedProcess:
    code = (
        "import sys\nfrom colquant.__main__ import main\n"
        f"try:\n    main({list(args)!r})\nexcept SystemExit:\n    pass\n"
        f"print('HEAVY:', [m for m in {HEAVY!r} if m in sys.modules])"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_help_and_version_import_no_heavy_package(flag):
    result = run_cli_in_fresh_interpreter(flag)
    assert result.returncode == 0, result.stderr
    assert "HEAVY: []" in result.stdout, result.stdout


def test_version_is_the_installed_one(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert capsys.readouterr().out.strip() == f"colquant {version('colquant')}"


def test_profile_is_a_name_or_a_path(tmp_path):
    assert cli.profile_file("tiny") == ROOT / "params" / "tiny.yaml"
    own = tmp_path / "mine.yaml"
    assert cli.profile_file(str(own)) == own
    assert cli.profile_file("params/colqwen3-4b.yaml") == Path("params/colqwen3-4b.yaml")


def test_unknown_profile_names_the_known_ones(caplog):
    with pytest.raises(cli.CliError, match="pass one of colqwen3-4b, synthetic-4b, tiny"):
        cli.profile_file("tinny")
    assert cli.main(["run", "tinny"]) == 2
    assert "no profile 'tinny'" in caplog.text


def test_outside_a_checkout_the_error_says_to_clone(monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "PARAMS_DIR", tmp_path / "params")
    monkeypatch.setattr(cli, "NOTEBOOKS_DIR", tmp_path / "notebooks")
    with pytest.raises(cli.CliError, match="clone it"):
        cli.profile_file("tiny")
    with pytest.raises(cli.CliError, match="notebooks are not at .* clone it"):
        cli.require_notebooks()


def test_run_and_notebooks_pass_the_resolved_profile(monkeypatch):
    from colquant.research import pipeline

    seen = []
    monkeypatch.setattr(pipeline, "run", lambda path, **kw: seen.append((path, kw)) or [{"step": "x", "status": "ok"}])
    monkeypatch.setattr(pipeline, "refresh_committed_notebooks", lambda path: seen.append((path, {})) or [])
    assert cli.main(["run", "tiny", "--notebooks", "04,05"]) == 0
    assert cli.main(["notebooks", "tiny"]) == 0
    assert cli.main(["run", "tiny", "--set", "quantization.iters=50", "--set", "sweep.repeats=2"]) == 0
    assert seen == [
        (ROOT / "params/tiny.yaml", {"overrides": [], "force": False, "notebooks": ("04", "05"), "wait_s": 0.0}),
        (ROOT / "params/tiny.yaml", {}),
        (ROOT / "params/tiny.yaml", {"overrides": ["quantization.iters=50", "sweep.repeats=2"], "force": False,
                                     "notebooks": None, "wait_s": 0.0}),
    ]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["bench", "tiny", "--no-kernel-checks"], "tiny"),
        (["bench", str(ROOT / "params/synthetic-4b.yaml"), "--device", "cpu"], "synthetic-4b"),
        (["bench", "--profile", "tiny"], "tiny"),
    ],
)
def test_bench_takes_the_same_profile_argument(monkeypatch, argv, expected):
    from colquant.deploy import bench

    seen = []
    monkeypatch.setattr(bench, "run_bench", lambda profile, out, device=None: seen.append(profile["profile"]))
    assert cli.main(argv) == 0
    assert seen == [expected]


def test_bench_refuses_an_unknown_profile_like_the_other_commands(caplog):
    assert cli.main(["bench", "tinny"]) == 2
    assert "no profile 'tinny'" in caplog.text


def test_unknown_options_are_refused_outside_bench(capsys):
    with pytest.raises(SystemExit):
        cli.main(["run", "tiny", "--frobnicate"])
    assert "unrecognized arguments: --frobnicate" in capsys.readouterr().err


def test_make_lab_passes_extra_args_and_allow_root_as_root():
    stamp = ".venv/.colquant-installed"
    # Under `make test` the outer make's MAKEFLAGS/MAKELEVEL would make this one print directories.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    result = subprocess.run(
        ["make", "--no-print-directory", "-n", "-o", stamp, "lab", "ARGS=--port 9999"],
        cwd=ROOT, capture_output=True, text=True, env=env,
    )
    line = result.stdout.strip().splitlines()[-1]
    assert line.endswith("--port 9999") and "jupyter lab notebooks" in line
    assert ("--allow-root" in line) == (os.getuid() == 0)


@pytest.mark.parametrize("option", ["--dpi", "--shard-size", "--batch-size", "--max-num-visual-tokens"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_encode_corpus_refuses_a_count_below_one_instead_of_replacing_it(option, value, capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["encode-corpus", "model", "pages", "out", option, value])
    assert f"argument {option}: '{value}' is not a whole number >= 1" in capsys.readouterr().err


@pytest.fixture
def one_page(tmp_path: Path) -> Path:
    from PIL import Image

    (tmp_path / "pages").mkdir()
    Image.new("RGB", (64, 64), "white").save(tmp_path / "pages" / "page.png")
    return tmp_path / "pages"


def test_encode_corpus_into_a_file_is_one_clear_error(tiny_path, one_page, tmp_path, capsys):
    (tmp_path / "index").write_text("not a directory")
    assert cli.main(["encode-corpus", str(tiny_path), str(one_page), str(tmp_path / "index"), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "index is a file, not a directory: pass a directory for the index (OUT), a new one or one encode-corpus wrote")


def test_encode_corpus_into_a_read_only_directory_is_one_clear_error(tiny_path, one_page, tmp_path, capsys, monkeypatch):
    import errno
    import tempfile

    real_mkstemp = tempfile.mkstemp

    def read_only(*args, dir=None, **kwargs):  # what a read-only directory does, even for root
        if dir is not None and Path(dir).is_relative_to(tmp_path / "index"):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    assert cli.main(["encode-corpus", str(tiny_path), str(one_page), str(tmp_path / "index"), "--no-progress"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors[-1].endswith("index (Permission denied): pass a directory you can write to, or fix its permissions")
    assert not any("Traceback" in line for line in errors)


@pytest.mark.parametrize("notebooks", ["09", "04 05", "04,,05", ""])
def test_notebook_numbers_no_notebook_has_are_refused_naming_the_known_ones(caplog, notebooks):
    """They selected nothing: the run did nothing, rewrote REPORT.md and exited 0 (`""` ran everything)."""
    assert cli.main(["run", "tiny", "--notebooks", notebooks]) == 1
    assert "is not a notebook number; choose from 01,02,03,04,05,06,07,08" in caplog.text


@pytest.mark.parametrize("wait", ["nan", "-5", "soon"])
def test_a_wait_that_is_no_number_of_seconds_is_refused_by_the_parser(monkeypatch, capsys, wait):
    """NaN waited forever on a locked directory; a negative number was taken as 0."""
    from colquant.research import pipeline

    monkeypatch.setattr(pipeline, "run", lambda path, **kw: pytest.fail(f"ran with --wait {wait}"))
    with pytest.raises(SystemExit):
        cli.main(["run", "tiny", "--wait", wait])
    assert "is not a number of seconds >= 0" in capsys.readouterr().err
