"""Drop-in loading: transformers alone (no colquant) loads ColQuant checkpoints and embeds identically."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import colquant
from colquant.retriever.remote_code import AUTO_MAP, REMOTE_CODE_FILES, write_remote_code

UP_PROJ = "vlm.model.language_model.layers.1.mlp.up_proj.weight"
QUERIES = ["what was the revenue of Norbright Labs in 2019?", "pie chart"]

# Runs in a fresh interpreter where `import colquant` fails, so only the checkpoint's own files count.
STANDALONE = """
import sys
sys.modules["colquant"] = None
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoModel, AutoProcessor

path, out, pages = sys.argv[1], sys.argv[2], sys.argv[3:]
model = AutoModel.from_pretrained(path, trust_remote_code=True, dtype=torch.bfloat16).eval()
processor = AutoProcessor.from_pretrained(path, trust_remote_code=True, max_num_visual_tokens=1280)
queries = {queries!r}
with torch.no_grad():
    q = model(**processor(text=queries)).embeddings
    p = model(**processor(images=[Image.open(page) for page in pages])).embeddings
layers = sorted({{type(m).__name__ for m in model.modules() if hasattr(m, "qweight")}})
save_file({{"queries": q.float().contiguous(), "pages": p.float().contiguous()}}, out, metadata={{"layers": ",".join(layers)}})
"""


@pytest.fixture(scope="module")
def page_files(tmp_path_factory) -> list[Path]:
    rng = np.random.default_rng(1)
    folder = tmp_path_factory.mktemp("pages")
    files = []
    for index, size in enumerate([(224, 160, 3), (96, 128, 3)]):
        files.append(folder / f"page{index}.png")
        Image.fromarray(rng.integers(0, 255, size, dtype=np.uint8)).save(files[-1])
    return files


def standalone_embeddings(checkpoint: Path, pages: list[Path], tmp_path: Path) -> tuple[dict, dict]:
    out = tmp_path / "standalone.safetensors"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run(
        [sys.executable, "-c", STANDALONE.format(queries=QUERIES), str(checkpoint), str(out), *map(str, pages)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as handle:
        metadata = handle.metadata()
    return load_file(str(out)), metadata


@torch.no_grad()
def colquant_embeddings(checkpoint: Path, pages: list[Path]) -> dict:
    model, processor = colquant.load(checkpoint)
    images = [Image.open(page) for page in pages]
    return {
        "queries": model(**processor.process_queries(QUERIES)).embeddings.float(),
        "pages": model(**processor.process_images(images)).embeddings.float(),
    }


@pytest.mark.parametrize("which", ["bf16", "w4a16"])
def test_automodel_without_colquant_embeds_exactly_like_colquant_load(which, tiny_path, tiny_w4a16_path, page_files, tmp_path):
    checkpoint = tiny_path if which == "bf16" else tiny_w4a16_path
    theirs, metadata = standalone_embeddings(checkpoint, page_files, tmp_path)
    ours = colquant_embeddings(checkpoint, page_files)
    for kind in ("queries", "pages"):
        assert theirs[kind].shape == ours[kind].shape, kind
        assert torch.equal(theirs[kind], ours[kind]), (kind, (theirs[kind] - ours[kind]).abs().max())
    assert bool(metadata["layers"]) == (which == "w4a16"), metadata  # 4-bit layers restored by auto-round


def test_every_checkpoint_colquant_writes_carries_auto_map_and_code(tiny_path, tiny_w4a16_path):
    for checkpoint in (tiny_path, tiny_w4a16_path):
        assert json.loads((checkpoint / "config.json").read_text())["auto_map"] == AUTO_MAP
        for name in REMOTE_CODE_FILES:
            assert (checkpoint / name).is_file(), (checkpoint, name)


def test_remote_code_files_need_nothing_but_transformers_stack():
    """transformers refuses remote code whose (non-try-guarded) imports are missing: colquant must not be one."""
    from transformers.dynamic_module_utils import get_imports

    for name, source in REMOTE_CODE_FILES.items():
        assert not [module for module in get_imports(source) if module.startswith("colquant")], name


def test_write_remote_code_refuses_a_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        write_remote_code(tmp_path)


def test_mteb_colqwen3_wrapper_encodes_with_a_colquant_checkpoint(tiny_w4a16_path, page_files, tmp_path, monkeypatch):
    """mteb's registered ColQwen3 wrapper loads the variant by path and encodes queries and pages.

    (Its DataLoader loop imports torchvision, which has no wheel for this CPU torch; the wrapper's
    own encode step and similarity are called directly.)"""
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    from mteb.models.model_implementations.colqwen_models import ColQwen3Wrapper

    wrapper = ColQwen3Wrapper(str(tiny_w4a16_path), device="cpu")
    ours = colquant_embeddings(tiny_w4a16_path, page_files)
    with torch.no_grad():
        queries = wrapper._encode_inputs(wrapper.processor(text=QUERIES)).float()
        pages = wrapper._encode_inputs(wrapper.processor(images=[Image.open(p) for p in page_files])).float()
    assert torch.equal(queries, ours["queries"]) and torch.equal(pages, ours["pages"])
    scores = wrapper.similarity(list(queries), list(pages))
    assert scores.shape == (len(QUERIES), len(page_files)) and torch.isfinite(scores).all()


def _damaged_copy(checkpoint: Path, tmp_path: Path, damage: str) -> Path:
    """A copy of `checkpoint` whose config.json or weights no longer agree (the probes' damages)."""
    import shutil

    copy = Path(shutil.copytree(checkpoint, tmp_path / "damaged"))
    config = json.loads((copy / "config.json").read_text())
    if damage == "quantization_config lost":
        del config["quantization_config"]
    elif damage == "layers lowered":
        config["text_config"]["num_hidden_layers"] -= 1
    else:  # a tensor stored in another dtype than config.json declares, or holding NaN
        index = json.loads((copy / "model.safetensors.index.json").read_text())["weight_map"]
        shard = copy / index[UP_PROJ]
        tensors = load_file(str(shard))
        tensors[UP_PROJ] = tensors[UP_PROJ].float() if damage == "float32 tensor" else tensors[UP_PROJ].index_fill(0, torch.tensor([3]), float("nan"))
        save_file(tensors, str(shard), metadata={"format": "pt"})
    (copy / "config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize(
    ("damage", "which", "message"),
    [("quantization_config lost", "w4a16", r"unexpected keys: .*qweight.*quantization_config is missing"),
     ("layers lowered", "w4a16", r"unexpected keys: vlm\.model\.language_model\.layers\.3\..*num_hidden_layers=3"),
     ("layers lowered", "bf16", r"unexpected keys: vlm\.model\.language_model\.layers\.3\..*num_hidden_layers=3"),
     ("float32 tensor", "bf16", rf"{UP_PROJ} is stored as float32, expected bfloat16"),
     ("NaN tensor", "bf16", rf"tensor {UP_PROJ} holds 128 NaN/Inf")],
)
def test_automodel_refuses_what_colquant_load_refuses(damage, which, message, tiny_path, tiny_w4a16_path, tmp_path):
    """The remote code checks weights as `colquant.load` does: no random or missing layers, no silent cast."""
    from transformers import AutoModel

    damaged = _damaged_copy(tiny_w4a16_path if which == "w4a16" else tiny_path, tmp_path, damage)
    with pytest.raises(colquant.CheckpointError, match=message):
        colquant.load(damaged, accelerate=False)
    with pytest.raises(RuntimeError, match=message) as raised:  # the checkpoint's own copy of CheckpointError
        AutoModel.from_pretrained(str(damaged), trust_remote_code=True, dtype=torch.bfloat16)
    assert type(raised.value).__name__ == "CheckpointError"


@torch.no_grad()
def test_automodel_casts_to_the_dtype_asked_for_as_colquant_load_does(tiny_path):
    """`AutoModel.from_pretrained(dir, trust_remote_code=True, dtype=torch.float32)` of a bfloat16 checkpoint
    was refused as 'config.json declares dtype float32 and loading would cast silently': the check read
    the dtype asked for, not the one config.json declares."""
    from transformers import AutoModel

    theirs = AutoModel.from_pretrained(str(tiny_path), trust_remote_code=True, dtype=torch.float32).eval()
    ours, processor = colquant.load(tiny_path, dtype="float32", accelerate=False)
    assert {parameter.dtype for parameter in theirs.parameters()} == {torch.float32}
    batch = processor.process_queries(QUERIES)
    assert torch.equal(theirs(**batch).embeddings, ours(**batch).embeddings)


def test_automodel_checks_a_hub_checkpoint_once_downloaded(tiny_path, tmp_path):
    """By hub id (as mteb loads a pushed variant) the tensor headers are checked in the downloaded snapshot."""
    from transformers import AutoModel

    damaged = _damaged_copy(tiny_path, tmp_path, "float32 tensor")
    # huggingface_hub's cache layout; a commit of its own, since transformers caches remote code by commit
    repo, commit = tmp_path / "cache" / "models--colquant--damaged", hashlib.sha1(str(tmp_path).encode()).hexdigest()
    (repo / "snapshots").mkdir(parents=True)
    damaged.rename(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    with pytest.raises(RuntimeError, match=rf"snapshots/{commit} does not match its config\.json: .*{UP_PROJ} is stored as float32"):
        AutoModel.from_pretrained("colquant/damaged", cache_dir=str(tmp_path / "cache"), trust_remote_code=True,
                                  dtype=torch.bfloat16, local_files_only=True)


def colpali_engine_scores(queries: list[torch.Tensor], pages: list[torch.Tensor], batch_size: int = 128) -> torch.Tensor:
    """colpali-engine's `score_multi_vector`, restated: queries and pages zero-padded per group of `batch_size`,
    einsum in the inputs' dtype, max over page tokens, sum over query tokens, float32 at the end."""
    pad = torch.nn.utils.rnn.pad_sequence
    rows = []
    for i in range(0, len(queries), batch_size):
        q = pad(queries[i : i + batch_size], batch_first=True, padding_value=0)
        blocks = [torch.einsum("bnd,csd->bcns", q, pad(pages[j : j + batch_size], batch_first=True, padding_value=0))
                  .max(dim=3)[0].sum(dim=2) for j in range(0, len(pages), batch_size)]
        rows.append(torch.cat(blocks, dim=1).cpu())
    return torch.cat(rows, dim=0).to(torch.float32)


def test_score_multi_vector_pads_pages_in_groups_of_128_like_colpali_engine(tiny_path):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(tiny_path), trust_remote_code=True)
    generator = torch.Generator().manual_seed(0)
    unit = lambda n: torch.nn.functional.normalize(torch.randn(n, 8, generator=generator), dim=-1).bfloat16()  # noqa: E731
    queries = [unit(5).abs(), unit(9).abs()]
    # the second group is narrower than the first, and its tokens oppose every query token: best matches < 0
    pages = [unit(12) for _ in range(128)] + [-unit(3).abs(), -unit(4).abs()]
    expected = colpali_engine_scores(queries, pages)
    padded_at_once = colpali_engine_scores(queries, pages, batch_size=len(pages))
    assert not torch.equal(expected[:, 128:], padded_at_once[:, 128:])  # the grouping changes these scores
    assert torch.equal(processor.score_multi_vector(queries, pages, device="cpu"), expected)
