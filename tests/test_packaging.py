"""Packaging: ranges in the package, the exact CPU pin only in the constraints file, extras that
`make` and environment.yml install alike, and a core that imports without the extras."""

import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# Packages only notebooks, evaluation and tests use: the core must not need them.
EXTRA_ONLY = ["matplotlib", "seaborn", "scipy", "mteb", "papermill", "nbclient", "nbval", "jupyterlab",
              "ipywidgets", "ipykernel", "tabulate", "pytest"]


def name_of(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower()


def test_core_dependencies_are_ranges_that_admit_other_torch_releases():
    core = {name_of(r): r for r in PROJECT["dependencies"]}
    assert core["torch"] == "torch>=2.6"
    assert all("==" not in requirement for requirement in core.values()), core
    assert not set(core) & set(EXTRA_ONLY), "notebook/eval/test packages belong in extras"
    assert "psutil" not in core  # never imported


def test_the_cpu_pin_lives_in_the_constraints_file():
    pins = [line for line in (ROOT / "constraints/cpu.txt").read_text().splitlines() if line and not line.startswith("#")]
    assert pins == ["torch==2.13.0"]


def test_extras_cover_notebooks_eval_gpu_dev_and_all():
    extras = PROJECT["optional-dependencies"]
    assert {name_of(r) for r in extras["notebooks"]} >= {"jupyterlab", "papermill", "nbval", "seaborn", "ipywidgets", "ipykernel"}
    assert [name_of(r) for r in extras["eval"]] == ["mteb"]
    assert "triton" in {name_of(r) for r in extras["gpu"]}
    assert "pytest" in {name_of(r) for r in extras["dev"]}
    assert extras["all"] == ["colquant[notebooks,eval,gpu,dev]"]
    assert PROJECT["scripts"]["colquant"] == "colquant.__main__:main"


def test_make_and_conda_install_the_same_extras_with_the_same_constraints():
    makefile = (ROOT / "Makefile").read_text()
    make_extras = re.search(r"^EXTRAS\s*\?=\s*([\w,]+)", makefile, re.M).group(1)
    assert re.search(r"^CONSTRAINTS\s*\?=\s*constraints/cpu.txt$", makefile, re.M)
    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(entry["pip"] for entry in environment["dependencies"] if isinstance(entry, dict))
    assert pip_section == ["-c constraints/cpu.txt", f"-e .[{make_extras}]"]
    assert set(make_extras.split(",")) <= set(PROJECT["optional-dependencies"])


def test_core_imports_and_embeds_without_the_extras(tiny_path):
    """Load, encode, score and the quantization module with every extra-only package made unimportable."""
    script = textwrap.dedent(
        f"""
        import sys
        for name in {EXTRA_ONLY!r}:
            sys.modules[name] = None  # `import name` now raises ImportError, find_spec says absent
        import colquant, colquant.quantization
        model, processor = colquant.load({str(tiny_path)!r})
        scores = colquant.score(model.encode_queries(["revenue 2019"]), model.encode_queries(["a page"]))
        assert scores.shape == (1, 1)
        loaded = [name for name in {EXTRA_ONLY!r} if sys.modules.get(name) is not None]
        assert not loaded, loaded
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
