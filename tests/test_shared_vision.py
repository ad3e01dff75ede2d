"""Variants that keep BF16's vision tower are evaluated together (the tower once per page batch), each
with the NDCG@5 and the embeddings it gets alone; which share is decided by the tower's weights, and
how many load together by measured memory."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import colquant
import pytest
import torch
from colquant.basics.measure import measure
from colquant.evaluate import shared_vision
from colquant.evaluate.embedding_cache import manifests
from colquant.evaluate.evaluation import evaluate_variant, get_tasks
from colquant.quantize.fp8_variants import fp8_metadata, quantize_fp8, save_fp8_model
from colquant.research import evaluation_runs, workspace
from colquant.evaluate.shared_vision import (
    Companion,
    MemoryCheck,
    check_shareable,
    sharing_groups,
    vision_fingerprint,
)
from safetensors.torch import load_file, save_file
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel
from tiny_task import N_PAGES, N_QUERIES, TASK

REV = "0123456789abcdef"


@pytest.fixture(scope="module")
def fp8_variants(tiny_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """fp8-lm (BF16 vision tower) and fp8-all (FP8 vision tower), saved as notebook 03 saves them."""
    folder = tmp_path_factory.mktemp("fp8")
    made = {}
    for name, scope in (("fp8-lm", "lm"), ("fp8-all", "lm+vision")):
        model, processor = colquant.load(tiny_path, device="cpu")
        with measure(model.device) as cost:
            layers = quantize_fp8(model, scope)
        metadata = fp8_metadata(name, scope, layers, cost, base_model="embedded-tiny", base_model_revision="local build",
                                random_weights=True)
        made[name] = save_fp8_model(model, processor, folder / name, scope, metadata)
    return made


def with_one_vision_weight_changed(tiny_path: Path, target: Path) -> Path:
    shutil.copytree(tiny_path, target)
    for shard in sorted(target.glob("*.safetensors")):
        tensors = load_file(str(shard))
        name = next((key for key in sorted(tensors) if ".visual." in key and tensors[key].dtype == torch.bfloat16), None)
        if name is not None:
            tensors[name].view(torch.int16).view(-1)[0] ^= 1  # the last bit of one bf16 weight
            save_file(tensors, str(shard), metadata={"format": "pt"})
            return target
    raise AssertionError("no vision tensor found")


def test_the_vision_tower_is_shared_by_its_weights_not_by_name(tiny_path, tiny_w4a16_path, fp8_variants, tmp_path):
    variants = {"bf16": tiny_path, "fp8-all": fp8_variants["fp8-all"], "w4a16": tiny_w4a16_path,
                "fp8-lm": fp8_variants["fp8-lm"], "bf16-copy": with_one_vision_weight_changed(tiny_path, tmp_path / "m")}
    assert sharing_groups(variants) == [["bf16", "w4a16", "fp8-lm"], ["fp8-all"], ["bf16-copy"]]
    assert vision_fingerprint(tiny_path) != vision_fingerprint(tmp_path / "m")


def profile_for(name: str) -> dict:
    return {"profile": name, "model": {"dtype": "bfloat16", "device": "cpu", "max_num_visual_tokens": 64},
            "evaluation": {"batch_size": 4}}


def evaluate_all(profile: dict, variants: dict[str, Path], tasks, monkeypatch, *, joint: bool) -> tuple[dict, dict]:
    """NDCG@5 per variant, and the vision-tower runs each variant's evaluation made."""
    runs = {"count": 0}
    original = Qwen3VLModel.get_image_features

    def counted(self, *args, **kwargs):
        runs["count"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Qwen3VLModel, "get_image_features", counted)
    ndcg, vision_runs = {}, {}
    for variant in evaluation_runs.loaded_variants(profile, variants):
        runs["count"] = 0
        frame = evaluate_variant(variant.model, variant.processor, variant.name, tasks,
                                 workspace.output_dir(profile) / "mteb", revision=REV, batch_size=4,
                                 corpus_chunk_size=4, replicas=(), cache=variant.cache,
                                 companions=variant.companions if joint else ())
        ndcg[variant.name], vision_runs[variant.name] = frame["ndcg_at_5"].tolist(), runs["count"]
    monkeypatch.setattr(Qwen3VLModel, "get_image_features", original)
    return ndcg, vision_runs


def test_joint_evaluation_gives_each_variant_its_own_ndcg_and_embeddings(tiny_path, tiny_w4a16_path, fp8_variants,
                                                                         corpus_root, tmp_path, monkeypatch):
    monkeypatch.setenv(workspace.OUTPUT_ROOT_ENV, str(tmp_path))
    tasks = get_tasks([TASK], corpus_root=corpus_root, n_pages=N_PAGES, n_queries=N_QUERIES)
    variants = {"bf16": tiny_path, "w4a16": tiny_w4a16_path, "fp8-lm": fp8_variants["fp8-lm"]}
    together, joint_runs = evaluate_all(profile_for("joint"), variants, tasks, monkeypatch, joint=True)
    alone, alone_runs = evaluate_all(profile_for("alone"), variants, tasks, monkeypatch, joint=False)
    assert together == alone
    # two corpus chunks: BF16's tower runs twice for all three variants
    assert joint_runs == {"bf16": 2, "w4a16": 0, "fp8-lm": 0}
    assert alone_runs == {"bf16": 2, "w4a16": 2, "fp8-lm": 2}
    joint_entries, alone_entries = (
        {(folder.name, key): folder / f"{key}.safetensors" for folder, manifest in manifests(tmp_path / name / "embeddings")
         for key in manifest["entries"]} for name in ("joint", "alone"))
    assert joint_entries.keys() == alone_entries.keys() and len(joint_entries) == 3 * 3  # queries + 2 chunks each
    for key, path in joint_entries.items():
        joint, single = load_file(str(path)), load_file(str(alone_entries[key]))
        assert all(torch.equal(joint[name], single[name]) for name in ("embeddings", "offsets")), key


def test_a_variant_that_does_not_fit_beside_the_group_is_evaluated_after_it(tiny_path, tiny_w4a16_path, tmp_path,
                                                                          monkeypatch, caplog):
    monkeypatch.setenv(workspace.OUTPUT_ROOT_ENV, str(tmp_path))
    free = iter([10 * 2**30, 0])  # room to load the W4A16 variant; none left once it is loaded
    monkeypatch.setattr(MemoryCheck, "free", lambda self: next(free))
    caplog.set_level(logging.INFO, logger="colquant.research.evaluation_runs")
    seen = []
    for variant in evaluation_runs.loaded_variants(profile_for("tight"), {"bf16": tiny_path, "w4a16": tiny_w4a16_path}):
        seen.append((variant.name, len(variant.companions)))
    assert seen == [("bf16", 0), ("w4a16", 0)]
    assert "w4a16 is evaluated after bf16, not with their vision tower: loaded, it leaves 0.00 GiB free" in caplog.text


def test_the_measured_page_batch_sets_the_memory_kept_free(small_model):
    model, processor = small_model
    memory = MemoryCheck(torch.device("cpu"))
    memory.measure(model, processor, batch_size=8)  # a larger batch first: the allocator keeps what it freed
    peaks = [memory.measure(model, processor, batch_size=2) for _ in range(3)]  # untrimmed, the third read 0
    assert min(peaks) > 0 and memory.reserve == shared_vision.MEMORY_MARGIN * peaks[-1]
    assert memory.before_loading(Path(model.config._name_or_path)) is None  # the tiny model fits in RAM


def test_models_that_cannot_share_a_vision_output_are_refused(small_model, tiny_path):
    model, _ = small_model
    other, _ = colquant.load(tiny_path, max_num_visual_tokens=64)
    other.config.mask_non_image_embeddings = True
    with pytest.raises(ValueError, match="mask_non_image_embeddings"):
        check_shareable([model, other])
    with pytest.raises(ValueError, match="give this encoder a cache too"):
        colquant.evaluate.evaluation.ColQuantEncoder(*small_model, "bf16", REV, companions=[Companion(other, None)])


def test_without_malloc_trim_a_cpu_evaluates_variants_one_by_one(monkeypatch):
    """A peak read off the resident size is only honest once freed heap is handed back."""
    monkeypatch.setattr(shared_vision, "_malloc_trim", lambda: None)
    assert "no malloc_trim" in MemoryCheck.unavailable_reason(torch.device("cpu"))
