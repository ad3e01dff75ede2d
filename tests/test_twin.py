"""The offline hub twin (scripts/build_hub_twin.py) and the real profile's hub plumbing it exercises.

The twin is read in subprocesses: `datasets` and huggingface_hub read HF_HOME and HF_HUB_OFFLINE
when imported, so a process started with the twin's environment sees exactly what a user's
process sees with a cache filled from the real hub. The end-to-end run (`-m twin`, `make
test-twin`) executes notebooks 01-06 on params/twin.yaml and checks REPORT.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mteb
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
MODEL_ID = "TomoroAI/tomoro-colqwen3-embed-4b"
SCRIPT = REPO / "scripts" / "build_hub_twin.py"


def profile(name: str) -> dict:
    return yaml.safe_load((REPO / "params" / f"{name}.yaml").read_text())


def twin_env(root: Path, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "COLQUANT_"))}
    env.update(HF_HOME=str(root), HF_HUB_OFFLINE="1", TQDM_DISABLE="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
               PYTHONPATH=os.pathsep.join([str(REPO / "lib"), env.get("PYTHONPATH", "")]), **extra)
    return env


def run_in_twin(root: Path, code: str, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=twin_env(root, **extra), cwd=REPO,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def twin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("twin") / "hf"
    built = subprocess.run([sys.executable, str(SCRIPT), str(root), "--pages", "6", "--queries", "8",
                            "--calibration-rows", "40"], env=twin_env(root), capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    return root


# --------------------------------------------------------------------------------------------
# The pinned revision


def test_real_profile_pins_the_revision_mteb_registers_for_the_model():
    assert profile("colqwen3-4b")["model"]["revision"] == mteb.get_model_meta(MODEL_ID).revision


def test_twin_profile_is_the_real_profile_at_ci_size():
    real, twin_profile = profile("colqwen3-4b"), profile("twin")
    for section, keys in {"model": ("id", "revision", "dtype"), "calibration": ("source", "offline_fallback", "seed"),
                          "quantization": ("bits", "group_size", "sym", "rtn_baseline", "export_formats"),
                          "evaluation": ("languages", "scoring"), "corpus": ("source",)}.items():
        for key in keys:
            assert twin_profile[section][key] == real[section][key], f"{section}.{key}"
    assert set(twin_profile["evaluation"]["tasks"]) < set(real["evaluation"]["tasks"])
    assert len(twin_profile["calibration"]["seqlens"]) == 1


# --------------------------------------------------------------------------------------------
# The twin's layout and what the real loading code reads from it


def test_model_repo_has_the_hub_file_set_under_the_pinned_revision(twin):
    revision = profile("colqwen3-4b")["model"]["revision"]
    folder = twin / "hub" / "models--TomoroAI--tomoro-colqwen3-embed-4b"
    assert (folder / "refs" / "main").read_text() == revision
    snapshot = folder / "snapshots" / revision
    files = sorted(path.name for path in snapshot.iterdir())
    assert files == ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                     "model.safetensors.index.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json"]
    assert all((snapshot / name).is_symlink() for name in files)  # into blobs/, as huggingface_hub stores them
    config = json.loads((snapshot / "config.json").read_text())
    assert config["model_type"] == "colqwen3" and {"text_config", "vision_config", "auto_map"} <= set(config)
    assert json.loads((snapshot / "preprocessor_config.json").read_text())["size"]["shortest_edge"] == 65536


def test_real_loading_code_reads_the_twin_offline(twin):
    """Calibration text (pile-10k, colpali_train_set), both ViDoRe tasks through mteb, and the model at
    its pinned revision, all through the package's own code with HF_HUB_OFFLINE=1."""
    result = run_in_twin(twin, """
        import json
        import mteb
        from colquant.quantize.calibration import load_text_documents
        from colquant.research import workspace
        from colquant.research.params import load_profile

        profile = load_profile("params/twin.yaml")
        out = {"pile": load_text_documents("pile-10k", seed=0, limit=10),
               "colpali": load_text_documents("colpali-train", seed=0, limit=10)}
        for task in mteb.get_tasks(tasks=profile["evaluation"]["tasks"], languages=profile["evaluation"]["languages"]):
            task.load_data()
            out[task.metadata.name] = task.hf_subsets
        path = workspace.base_model(profile)
        out["base_model"] = [path.parent.name, workspace.base_model_revision(profile)]
        model, processor = workspace.load_variant(profile, path)
        out["model"] = type(model).__name__
        print(json.dumps(out))
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(out["pile"]) == 10 and {origin for _, origin in out["pile"]} == {"pile-10k"}
    assert len(out["colpali"]) == 10 and len({origin for _, origin in out["colpali"]}) > 1  # stratified by source
    assert out["VidoreArxivQARetrieval"] == ["default"] and out["Vidore3HrRetrieval"] == ["english"]
    assert out["base_model"] == ["snapshots", profile("twin")["model"]["revision"]]
    assert out["model"] == "ColQwen3"


def test_a_revision_the_cache_lacks_is_an_error_naming_the_fix(twin):
    result = run_in_twin(twin, f"""
        import colquant
        colquant.load("{MODEL_ID}", revision="{'0' * 40}")
    """)
    assert result.returncode != 0 and "CheckpointError" in result.stderr and "hf download" in result.stderr


def test_offline_without_the_dataset_cached_still_refuses_to_substitute(tmp_path):
    """The real profile's `offline_fallback: none` holds when the cache lacks the dataset."""
    result = run_in_twin(tmp_path, """
        from colquant.quantize.calibration import build_text_calibration
        from colquant.retriever.tiny import build_tokenizer
        build_text_calibration(build_tokenizer(), source="pile-10k", seqlen=16, nsamples=1, seed=0, offline_fallback="none")
    """)
    assert result.returncode != 0 and "CalibrationDataError" in result.stderr


# --------------------------------------------------------------------------------------------
# End to end (make test-twin)


@pytest.mark.twin
def test_twin_profile_runs_notebooks_01_to_06_and_reports_both_scorings(tmp_path):
    build = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "hf")], env=twin_env(tmp_path / "hf"),
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    outputs = tmp_path / "outputs"
    run = subprocess.run([sys.executable, "-m", "colquant", "run", "params/twin.yaml"], cwd=REPO,
                         env=twin_env(tmp_path / "hf", COLQUANT_OUTPUT_ROOT=str(outputs), PYTHONWARNINGS="ignore"),
                         capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-5000:]
    report = (outputs / "twin" / "REPORT.md").read_text()
    quality = report.split("## Retrieval quality")[1].split("\n## ")[0]
    header = next(line for line in quality.splitlines() if line.startswith("| Benchmark"))
    columns = [cell.strip() for cell in header.strip("|").split("|")]
    assert columns[:3] == ["Benchmark", "bf16", "bf16 (exact MaxSim)"]
    assert "w4a16-g128-sym-pile10k-seqlen256-iters10" in columns and "w4a16-g128-sym-rtn" in columns
    for task in ("VidoreArxivQARetrieval [English]", "Vidore3HrRetrieval [English]", "**Average**"):
        assert any(line.startswith(f"| {task} |") for line in quality.splitlines()), task
    assert f"`{profile('twin')['model']['revision']}`" in report
    metadata = json.loads((outputs / "twin" / "variants" / "w4a16-g128-sym-pile10k-seqlen256-iters10"
                           / "quantization_metadata.json").read_text())
    assert metadata["calibration"]["source_used"] == "pile-10k" and metadata["calibration"]["fallback_reason"] is None
    assert metadata["base_model_revision"] == profile("twin")["model"]["revision"]
