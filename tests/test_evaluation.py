"""mteb evaluation of ColQwen3 variants and the seed-000 NDCG@5 report."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import yaml
from matplotlib.figure import Figure
from mteb._create_dataloaders import create_dataloader
from mteb.abstasks import AbsTaskRetrieval
from mteb.types import PromptType
from PIL import Image
from transformers import BatchFeature

import colquant
from colquant.evaluate import mteb_encoder
from colquant.evaluate.corpus import Corpus, build_corpus
from colquant.research import workspace
from colquant.evaluate.evaluation import (
    ColQuantEncoder,
    ColQuantTinyPagesRetrieval,
    change_counts,
    delta_column,
    evaluate_variant,
    format_seed_table,
    get_tasks,
    ndcg_table,
    plot_delta,
    plot_ndcg,
)
from colquant.research.params import load_profile
from colquant.retriever.processing import to_rgb

REPO = Path(__file__).resolve().parents[1]
N_PAGES, N_QUERIES = 8, 16
TASK = "ColQuantTinyPagesRetrieval"
REV = "0123456789abcdef"  # a fingerprint of the variant's inputs (workspace.evaluation_fingerprint)


@pytest.fixture(scope="module")
def corpus_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("evaluation") / "corpus"
    build_corpus(root, n_pages=N_PAGES, n_queries=N_QUERIES, progress=False)
    return root


@pytest.fixture(scope="module")
def small_model(tiny_path: Path):
    """The tiny model with a 64-visual-token budget, so pages encode in milliseconds."""
    return colquant.load(tiny_path, max_num_visual_tokens=64)


def local_task(corpus_root: Path) -> ColQuantTinyPagesRetrieval:
    return get_tasks([TASK], corpus_root=corpus_root, n_pages=N_PAGES, n_queries=N_QUERIES)[0]


def result_path(output_dir: Path, variant: str) -> Path:
    return output_dir / "results" / f"colquant__{variant}" / REV / f"{TASK}.json"


# --------------------------------------------------------------------------------------------
# Encoder


def test_encoder_embeddings_equal_the_models_outputs(small_model, corpus_root):
    model, processor = small_model
    encoder = ColQuantEncoder(model, processor, "bf16", REV)
    task = local_task(corpus_root)
    task.load_data()
    split = task.dataset["default"]["test"]
    for prompt_type, column, process in ((PromptType.query, "text", processor.process_queries),
                                         (PromptType.document, "image", processor.process_images)):
        dataset = split["queries" if prompt_type is PromptType.query else "corpus"].select(range(5))
        loader = create_dataloader(dataset, task_metadata=task.metadata, prompt_type=prompt_type, batch_size=3)
        encoded = encoder.encode(loader, task_metadata=task.metadata, hf_split="test", hf_subset="default",
                                 prompt_type=prompt_type)
        assert len(encoded) == 5 and encoded.dtype == torch.bfloat16
        direct, masks = [], []
        with torch.inference_mode():
            for batch in loader:  # the same batches, so padding (and hence numerics) match
                features = process(batch[column])
                direct.extend(model(**features).embeddings)
                masks.extend(features["attention_mask"].bool())
        for item, row, mask in zip(encoded, direct, masks):
            n_tokens = int(mask.sum())
            assert torch.equal(item[:n_tokens], row[mask])
            assert not item[n_tokens:].any()
    task.unload_data()


@pytest.mark.parametrize(("batches_per_call", "on_model", "on_replica"), [(1, 2, 2), (3, 3, 1)])
def test_pages_split_across_replicas_equal_one_models_and_every_replica_encodes(small_model, tiny_path,
                                                                               corpus_root, batches_per_call,
                                                                               on_model, on_replica):
    """Group k of `batches_per_call` mteb batches goes to replica k mod n in its own thread, through
    that replica's own page pipeline (two CPU copies stand for two GPUs); the result is the
    one-model result, in order."""
    model, processor = small_model
    replica, _ = colquant.load(tiny_path, max_num_visual_tokens=64)
    calls = {id(model): 0, id(replica): 0}
    hooks = [m.register_forward_hook(lambda module, *_: calls.__setitem__(id(module), calls[id(module)] + 1))
             for m in (model, replica)]
    task = local_task(corpus_root)
    task.load_data()
    corpus = task.dataset["default"]["test"]["corpus"].select(range(7))
    loader = create_dataloader(corpus, task_metadata=task.metadata, prompt_type=PromptType.document, batch_size=2)
    arguments = {"task_metadata": task.metadata, "hf_split": "test", "hf_subset": "default",
                 "prompt_type": PromptType.document}
    try:
        with ColQuantEncoder(model, processor, "bf16", REV, replicas=()) as encoder:
            alone = encoder.encode(loader, **arguments)
        assert calls == {id(model): 4, id(replica): 0}
        with ColQuantEncoder(model, processor, "bf16", REV, replicas=[replica],
                             batches_per_call=batches_per_call) as encoder:
            split = encoder.encode(loader, **arguments)
            assert set(encoder.pipelines) == {id(model), id(replica)}
    finally:
        for hook in hooks:
            hook.remove()
        task.unload_data()
    assert calls == {id(model): 4 + on_model, id(replica): on_replica}
    assert torch.equal(alone, split)


# page 0 has one token, page 1 two: padded to two rows, page 0's padding floors a negative best match
# at 0 under colpali-engine's scoring, while exact MaxSim keeps the -1
@pytest.mark.parametrize(("scoring", "expected"), [("exact", [[-1.0, 1.4], [0.0, 0.8]]),
                                                   ("colpali", [[0.0, 1.4], [0.0, 0.8]])])
@pytest.mark.parametrize("budget", [100_000_000, 2])  # 2 entries: the smallest blocks
def test_encoder_similarity_follows_the_scoring_mode(small_model, monkeypatch, scoring, expected, budget):
    monkeypatch.setattr(mteb_encoder, "SIMILARITY_ELEMENTS", budget)
    model, processor = small_model
    encoder = ColQuantEncoder(model, processor, "bf16", REV, scoring)
    queries = torch.nn.utils.rnn.pad_sequence([torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 1.0]])],
                                              batch_first=True)
    pages = torch.nn.utils.rnn.pad_sequence([torch.tensor([[-1.0, 0.0]]), torch.tensor([[0.6, 0.8], [0.0, -1.0]])],
                                            batch_first=True)
    assert torch.allclose(encoder.similarity(queries, pages), torch.tensor(expected))
    assert torch.allclose(encoder.similarity_pairwise(queries, pages), torch.tensor(expected).diagonal())


def test_scoring_mode_is_part_of_the_results_key(small_model, tiny_path):
    profile = load_profile(REPO / "params" / "tiny.yaml")
    assert (workspace.evaluation_fingerprint(profile, tiny_path, "colpali")
            != workspace.evaluation_fingerprint(profile, tiny_path, "exact"))
    assert workspace.evaluation_fingerprint(profile, tiny_path) == workspace.evaluation_fingerprint(profile, tiny_path, "colpali")
    with pytest.raises(ValueError, match="evaluation.scoring"):
        ColQuantEncoder(*small_model, "bf16", REV, "maxsim")


def test_variant_names_must_be_mteb_model_name_parts(small_model):
    with pytest.raises(ValueError, match="contain no '/'"):
        ColQuantEncoder(*small_model, "org/bf16", REV)


# --------------------------------------------------------------------------------------------
# End to end through mteb


def test_local_task_evaluates_end_to_end_and_writes_mteb_json(small_model, corpus_root, tmp_path):
    frame = evaluate_variant(*small_model, "bf16", [local_task(corpus_root)], tmp_path, revision=REV,
                             batch_size=4, corpus_chunk_size=3)
    assert len(frame) == 1
    row = frame.iloc[0]
    assert (row["task"], row["subset"], row["language"], row["variant"]) == (TASK, "default", "English", "bf16")
    assert row["main_score"] == "ndcg_at_5" and row["main_score_value"] == row["ndcg_at_5"]
    assert 0.0 <= row["ndcg_at_5"] <= 1.0 and row["evaluation_time_s"] > 0
    assert row["scoring"] == "colpali" and row["model_revision"] is None

    stored = json.loads(result_path(tmp_path, "bf16").read_text())
    assert stored["task_name"] == TASK
    assert stored["dataset_revision"] == f"format-v1-seed0-pages{N_PAGES}-queries{N_QUERIES}"
    assert stored["scores"]["test"][0]["ndcg_at_5"] == row["ndcg_at_5"]


def test_variants_get_separate_results_and_finished_ones_are_reused(small_model, corpus_root, tmp_path,
                                                                      monkeypatch):
    tasks = [local_task(corpus_root)]
    first = evaluate_variant(*small_model, "bf16", tasks, tmp_path, revision=REV, batch_size=8, corpus_chunk_size=8)
    evaluate_variant(*small_model, "w4a16-g128-sym-rtn", tasks, tmp_path, revision=REV, batch_size=8, corpus_chunk_size=8)
    assert result_path(tmp_path, "bf16").is_file()
    assert result_path(tmp_path, "w4a16-g128-sym-rtn").is_file()

    def must_not_encode(*args, **kwargs):
        raise AssertionError("a finished variant was encoded again")

    monkeypatch.setattr(ColQuantEncoder, "encode", must_not_encode)
    again = evaluate_variant(*small_model, "bf16", tasks, tmp_path, revision=REV, batch_size=8, corpus_chunk_size=8)
    assert again["ndcg_at_5"].tolist() == first["ndcg_at_5"].tolist()


def test_a_revision_must_be_a_fingerprint(small_model):
    with pytest.raises(ValueError, match="must be a hex fingerprint"):
        ColQuantEncoder(*small_model, "bf16", "local")


def test_halving_the_visual_token_budget_recomputes_instead_of_reading_the_old_result(tiny_path, corpus_root,
                                                                                       tmp_path, monkeypatch):
    """Issue 8's probe: max_num_visual_tokens 64 -> 32 left BF16 at its old NDCG@5."""
    from colquant.research import workspace

    profile = {"model": {"dtype": "bfloat16", "max_num_visual_tokens": 64}, "evaluation": {"scoring": "colpali"}}
    encoded = []
    original = ColQuantEncoder.encode

    def counting(self, *args, **kwargs):
        encoded.append(self.processor.max_num_visual_tokens)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ColQuantEncoder, "encode", counting)
    revisions = []
    for budget in (64, 32):
        profile["model"]["max_num_visual_tokens"] = budget
        revisions.append(workspace.evaluation_fingerprint(profile, tiny_path))
        model, processor = colquant.load(tiny_path, max_num_visual_tokens=budget)
        evaluate_variant(model, processor, "bf16", [local_task(corpus_root)], tmp_path, revision=revisions[-1],
                         batch_size=8, corpus_chunk_size=8)
    assert revisions[0] != revisions[1] and encoded == [64, 64, 32, 32]  # queries and pages, twice
    stored = sorted(p.parent.name for p in (tmp_path / "results" / "colquant__bf16").glob(f"*/{TASK}.json"))
    assert stored == sorted(revisions)


def test_a_result_file_cut_short_by_a_kill_is_evaluated_again(small_model, corpus_root, tmp_path, caplog):
    first = evaluate_variant(*small_model, "bf16", [local_task(corpus_root)], tmp_path, revision=REV,
                             batch_size=8, corpus_chunk_size=8)
    path = result_path(tmp_path, "bf16")
    path.write_text(path.read_text()[:200])
    again = evaluate_variant(*small_model, "bf16", [local_task(corpus_root)], tmp_path, revision=REV,
                             batch_size=8, corpus_chunk_size=8)
    assert again["ndcg_at_5"].tolist() == first["ndcg_at_5"].tolist()
    assert json.loads(path.read_text())["task_name"] == TASK
    assert f"{path} is not a complete mteb result" in caplog.text


def test_results_on_another_corpus_are_refused(small_model, corpus_root, tmp_path):
    evaluate_variant(*small_model, "bf16", [local_task(corpus_root)], tmp_path, revision=REV, batch_size=8, corpus_chunk_size=8)
    bigger = ColQuantTinyPagesRetrieval(tmp_path / "other-corpus", n_pages=N_PAGES, n_queries=N_QUERIES + 4)
    with pytest.raises(ValueError, match="dataset revision"):
        evaluate_variant(*small_model, "bf16", [bigger], tmp_path, revision=REV, batch_size=8, corpus_chunk_size=8)
    assert not (tmp_path / "other-corpus").exists()


class OracleProcessor:
    """Embeds each page as the one-hot vector of its index and each query as ±(one-hot of its
    relevant page): +1 ranks the relevant page first for every query, -1 ranks it last."""

    tokenizer = SimpleNamespace(pad_token_id=0)  # what the encoder's page pipeline pads prompts with

    def __init__(self, corpus: Corpus, sign: float) -> None:
        self.sign = sign
        self.n_pages = len(corpus.pages)
        index = {page.page_id: i for i, page in enumerate(corpus.pages)}
        self.page_by_pixels = {corpus.image(page.page_id).tobytes(): index[page.page_id] for page in corpus.pages}
        self.page_by_query = {query.text: index[query.page_id] for query in corpus.queries}

    def _one_hot(self, indices: list[int], sign: float) -> BatchFeature:
        vectors = sign * torch.nn.functional.one_hot(torch.tensor(indices), self.n_pages).float()
        ones = torch.ones(len(indices), 1, dtype=torch.long)  # one token per item, as a processor's prompt
        return BatchFeature({"vectors": vectors[:, None, :], "input_ids": ones, "attention_mask": ones})

    def process_queries(self, texts: list[str]) -> BatchFeature:
        return self._one_hot([self.page_by_query[text] for text in texts], self.sign)

    def process_images(self, images: list[Image.Image]) -> BatchFeature:
        return self._one_hot([self.page_by_pixels[to_rgb(image).tobytes()] for image in images], 1.0)


class PassThroughModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the encoder a device

    def forward(self, vectors: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> BatchFeature:
        return BatchFeature({"embeddings": vectors * attention_mask[..., None]})


@pytest.mark.parametrize(("sign", "expected"), [(1.0, 1.0), (-1.0, 0.0)])
def test_ndcg_at_5_is_one_for_a_perfect_ranker_and_zero_for_an_inverted_one(corpus_root, tmp_path, sign, expected):
    corpus = build_corpus(corpus_root, n_pages=N_PAGES, n_queries=N_QUERIES, progress=False)
    frame = evaluate_variant(PassThroughModel(), OracleProcessor(corpus, sign), f"oracle{sign:+.0f}",
                             [local_task(corpus_root)], tmp_path, revision=REV, batch_size=4, corpus_chunk_size=3)
    assert frame["ndcg_at_5"].item() == expected


def test_evaluate_variant_closes_the_encoder_it_makes_and_leaves_a_given_one_open(corpus_root, tmp_path,
                                                                                  monkeypatch):
    """The encoder's page pipelines (worker processes) stop with the evaluation that made them; an
    encoder passed in is the caller's to close."""
    corpus = build_corpus(corpus_root, n_pages=N_PAGES, n_queries=N_QUERIES, progress=False)
    closed = []
    close = ColQuantEncoder.close
    monkeypatch.setattr(ColQuantEncoder, "close", lambda self: closed.append(self) or close(self))
    arguments = {"revision": REV, "batch_size": 4, "corpus_chunk_size": 3}
    evaluate_variant(PassThroughModel(), OracleProcessor(corpus, 1.0), "made", [local_task(corpus_root)], tmp_path,
                     **arguments)
    assert len(closed) == 1 and closed[0].mteb_model_meta.name == "colquant/made"
    given = ColQuantEncoder(PassThroughModel(), OracleProcessor(corpus, 1.0), "given", REV)
    evaluate_variant(given.model, given.processor, "given", [local_task(corpus_root)], tmp_path, encoder=given,
                     **arguments)
    assert len(closed) == 1 and given.pipelines  # still open: its pipeline is kept for the caller
    given.close()


# --------------------------------------------------------------------------------------------
# Task lists


def test_the_profiles_22_vidore_tasks_resolve_offline():
    names = yaml.safe_load((REPO / "params" / "colqwen3-4b.yaml").read_text())["evaluation"]["tasks"]
    tasks = get_tasks(names, languages=["eng"])
    assert [task.metadata.name for task in tasks] == names and len(tasks) == 22
    assert all(isinstance(task, AbsTaskRetrieval) and task.metadata.category == "t2i" for task in tasks)
    assert {task.metadata.main_score for task in tasks if task.metadata.name.startswith("Vidore3")} == {"ndcg_at_10"}


def test_local_task_needs_a_corpus_root():
    with pytest.raises(ValueError, match="corpus_root"):
        get_tasks([TASK])


def test_local_task_keeps_its_corpus_revision_after_unloading(corpus_root):
    task = local_task(corpus_root)
    task.load_data()
    task.unload_data()
    assert task.metadata.revision == f"format-v1-seed0-pages{N_PAGES}-queries{N_QUERIES}"


# --------------------------------------------------------------------------------------------
# The seed-000 report

SEED_000_ROWS = """\
| Vidore2BioMedicalLecturesRetrieval [English] | 0.67177 | 0.66380 | -1.19% | 0.65376 | -2.68% | 0.66300 | -1.31% |
| Vidore2ESGReportsHLRetrieval [English] | 0.74647 | 0.74601 | -0.06% | 0.73799 | -1.14% | 0.74659 | +0.02% |
| Vidore2ESGReportsRetrieval [English] | 0.62995 | 0.61395 | -2.54% | 0.61398 | -2.54% | 0.59529 | -5.50% |
| Vidore2EconomicsReportsRetrieval [English] | 0.59102 | 0.58929 | -0.29% | 0.56702 | -4.06% | 0.58675 | -0.72% |
| Vidore3ComputerScienceRetrieval [English] | 0.74080 | 0.73873 | -0.28% | 0.73706 | -0.50% | 0.74100 | +0.03% |
| Vidore3EnergyRetrieval [English] | 0.60348 | 0.61152 | +1.33% | 0.61355 | +1.67% | 0.61693 | +2.23% |
| Vidore3FinanceEnRetrieval [English] | 0.67494 | 0.67323 | -0.25% | 0.67275 | -0.32% | 0.67734 | +0.36% |
| Vidore3FinanceFrRetrieval [English] | 0.42003 | 0.42656 | +1.55% | 0.43031 | +2.45% | 0.42032 | +0.07% |
| Vidore3HrRetrieval [English] | 0.60373 | 0.60522 | +0.25% | 0.60278 | -0.16% | 0.60136 | -0.39% |
| Vidore3IndustrialRetrieval [English] | 0.57932 | 0.57386 | -0.94% | 0.56961 | -1.68% | 0.58028 | +0.17% |
| Vidore3PharmaceuticalsRetrieval [English] | 0.66048 | 0.66057 | +0.01% | 0.65923 | -0.19% | 0.65902 | -0.22% |
| Vidore3PhysicsRetrieval [English] | 0.46403 | 0.46300 | -0.22% | 0.45698 | -1.52% | 0.46362 | -0.09% |
| VidoreArxivQARetrieval [English] | 0.90576 | 0.90194 | -0.42% | 0.90728 | +0.17% | 0.90693 | +0.13% |
| VidoreDocVQARetrieval [English] | 0.66296 | 0.66667 | +0.56% | 0.67285 | +1.49% | 0.66742 | +0.67% |
| VidoreInfoVQARetrieval [English] | 0.94312 | 0.94207 | -0.11% | 0.94088 | -0.24% | 0.94444 | +0.14% |
| VidoreShiftProjectRetrieval [English] | 0.87389 | 0.87063 | -0.37% | 0.87802 | +0.47% | 0.87819 | +0.49% |
| VidoreSyntheticDocQAAIRetrieval [English] | 0.99262 | 0.98893 | -0.37% | 0.99262 | 0.00% | 0.98893 | -0.37% |
| VidoreSyntheticDocQAEnergyRetrieval [English] | 0.96911 | 0.96524 | -0.40% | 0.97262 | +0.36% | 0.96393 | -0.53% |
| VidoreSyntheticDocQAGovernmentReportsRetrieval [English] | 0.97172 | 0.97172 | 0.00% | 0.97911 | +0.76% | 0.97911 | +0.76% |
| VidoreSyntheticDocQAHealthcareIndustryRetrieval [English] | 0.99631 | 0.99262 | -0.37% | 0.99262 | -0.37% | 0.99631 | 0.00% |
| VidoreTabfquadRetrieval [English] | 0.94329 | 0.94087 | -0.26% | 0.93698 | -0.67% | 0.93681 | -0.69% |
| VidoreTatdqaRetrieval [English] | 0.79867 | 0.79347 | -0.65% | 0.78702 | -1.46% | 0.79457 | -0.51% |
| **Average** | **0.74743** | **0.74545** | **-0.26%** | **0.74432** | **-0.42%** | **0.74582** | **-0.21%** |"""
SEED_000_VARIANTS = ("Original", "seqlen=256", "seqlen=512", "seqlen=1024")


def seed_000_results() -> pd.DataFrame:
    """The seed's per-task NDCG@5 in the long form `evaluate_variant` returns."""
    rows = []
    for line in SEED_000_ROWS.splitlines()[:-1]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        task = cells[0].removesuffix(" [English]")
        for variant, value in zip(SEED_000_VARIANTS, [cells[1], *cells[2::2]], strict=True):
            rows.append({"task": task, "language": "English", "variant": variant, "ndcg_at_5": float(value)})
    return pd.DataFrame(rows)


def test_seed_000_table_is_reproduced_from_its_scores():
    table = ndcg_table(seed_000_results(), baseline="Original")
    assert table.loc["Average", "Original"] == pytest.approx(0.74743, abs=5e-6)
    assert table.loc["Average", "seqlen=256 Δ%"] == pytest.approx(-0.265, abs=5e-3)
    lines = format_seed_table(table).splitlines()
    assert lines[0] == "| Benchmark | Original | seqlen=256 | Δ% | seqlen=512 | Δ% | seqlen=1024 | Δ% |"
    assert [line for line in lines if not line.startswith("|-")][1:] == SEED_000_ROWS.splitlines()
    assert change_counts(table).to_dict() == {
        "seqlen=256": {"Improved": 5, "Degraded": 16, "Unchanged": 1},
        "seqlen=512": {"Improved": 7, "Degraded": 14, "Unchanged": 1},
        "seqlen=1024": {"Improved": 11, "Degraded": 10, "Unchanged": 1},
    }


def hand_made_results() -> pd.DataFrame:
    return pd.DataFrame({
        "task": ["B", "A", "B", "A"],
        "language": ["English"] * 4,
        "variant": ["bf16", "bf16", "w4", "w4"],
        "ndcg_at_5": [0.5, 0.8, 0.55, 0.6],
    })


def test_ndcg_table_deltas_and_average_on_hand_made_scores():
    table = ndcg_table(hand_made_results())
    assert table.index.tolist() == ["A [English]", "B [English]", "Average"]
    assert table.columns.tolist() == ["bf16", "w4", "w4 Δ%"]
    assert table["w4 Δ%"].tolist() == pytest.approx([-25.0, 10.0, (0.575 - 0.65) / 0.65 * 100])
    assert table.loc["Average", "bf16"] == pytest.approx(0.65)
    assert change_counts(table, tolerance=15.0).to_dict() == {"w4": {"Improved": 0, "Degraded": 1, "Unchanged": 1}}


def test_ndcg_table_uses_the_main_scoring_and_adds_the_baseline_scored_the_other_way():
    colpali = hand_made_results().assign(scoring="colpali")
    exact_bf16 = pd.DataFrame({"task": ["A", "B"], "language": ["English"] * 2, "variant": ["bf16"] * 2,
                               "ndcg_at_5": [0.9, 0.4], "scoring": ["exact"] * 2})
    exact_w4 = exact_bf16.assign(variant="w4", ndcg_at_5=[0.1, 0.1])  # not shown: one extra column only
    table = ndcg_table(pd.concat([colpali, exact_bf16, exact_w4]), scoring="colpali")
    assert table.columns.tolist() == ["bf16", "bf16 (exact MaxSim)", "w4", "w4 Δ%"]
    assert table["bf16 (exact MaxSim)"].tolist() == pytest.approx([0.9, 0.4, 0.65])
    assert table["w4 Δ%"].tolist() == pytest.approx(ndcg_table(hand_made_results())["w4 Δ%"].tolist())
    assert format_seed_table(table).splitlines()[0] == "| Benchmark | bf16 | bf16 (exact MaxSim) | w4 | Δ% |"
    assert change_counts(table).columns.tolist() == ["w4"]
    swapped = ndcg_table(pd.concat([colpali, exact_bf16, exact_w4]), scoring="exact")
    assert swapped.columns.tolist() == ["bf16", "bf16 (colpali scoring)", "w4", "w4 Δ%"]
    assert swapped["bf16"].tolist() == pytest.approx([0.9, 0.4, 0.65])


def test_ndcg_table_refuses_a_missing_baseline_or_uneven_tasks():
    with pytest.raises(ValueError, match="baseline 'fp32'"):
        ndcg_table(hand_made_results(), baseline="fp32")
    with pytest.raises(ValueError, match="lack results"):
        ndcg_table(hand_made_results().iloc[:3])


def test_plots_are_figures_with_one_bar_per_task_and_variant():
    results = hand_made_results()
    figure = plot_ndcg(results)
    assert isinstance(figure, Figure) and len(figure.axes[0].patches) >= 4
    delta = plot_delta(ndcg_table(results))
    assert isinstance(delta, Figure)
    assert any(list(line.get_xdata()) == [0, 0] for line in delta.axes[0].lines)
    assert delta_column("w4") in ndcg_table(results).columns
