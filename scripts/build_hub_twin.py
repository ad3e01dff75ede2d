"""Build an offline twin of the Hugging Face hub for the real profile, so CI runs it end to end.

    python scripts/build_hub_twin.py <root>
    HF_HOME=<root> HF_HUB_OFFLINE=1 python -m colquant run params/twin.yaml

`<root>` becomes a Hugging Face home directory, the same layout as a user's ~/.cache/huggingface after
they ran the real profile once with hub access:

- `<root>/hub/` (HF_HUB_CACHE) holds, under the real repo ids and revisions, the model repo
  `TomoroAI/tomoro-colqwen3-embed-4b` (tiny random weights in the real file set), the datasets
  `NeelNanda/pile-10k` and `vidore/colpali_train_set`, and two ViDoRe tasks' datasets (v1
  `VidoreArxivQARetrieval`, v3 `Vidore3HrRetrieval`) as parquet files in their repo layout;
- `<root>/datasets/` (HF_DATASETS_CACHE) holds those datasets prepared by `datasets`' own Parquet
  builder from the hub files. This half is needed because datasets 5.2 never reads the hub cache
  offline: with HF_HUB_OFFLINE=1, `dataset_module_factory` raises before any hub download and falls
  back to `CachedDatasetModuleFactory`, which reads `<HF_DATASETS_CACHE>/<namespace>___<name>/<config>/
  <version>/<hash>/` (datasets/load.py, `dataset_module_factory` and `CachedDatasetModuleFactory`;
  datasets/packaged_modules/cache/cache.py, `_find_hash_in_cache`). Online, `load_dataset` writes that
  directory with `hash` = the repo commit (`HubDatasetModuleFactory.get_module`), so the twin does too.

Nothing in `lib/colquant` knows about the twin: the package reads it through huggingface_hub,
datasets and mteb exactly as it reads a cache filled from the real hub. The weights are random and
the pages are rendered by `colquant.evaluate.corpus`: numbers computed on the twin check the machinery only.

Where each layout fact comes from is noted beside it. Layout of a hub cache (blobs/, snapshots/<commit>/
as relative symlinks into blobs/, refs/main holding the commit): huggingface_hub's file_download.py
(`hf_hub_download`, `_create_symlink`) and `repo_folder_name` for the directory names.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import mteb
from datasets import Dataset, Features, Image, Value
from datasets.data_files import DataFilesDict
from datasets.naming import camelcase_to_snakecase
from datasets.packaged_modules.parquet.parquet import Parquet
from huggingface_hub.file_download import repo_folder_name
from PIL import Image as PILImage

from colquant.evaluate.corpus import Corpus, build_corpus
from colquant.retriever import tiny
from colquant.retriever.remote_code import REMOTE_CODE_FILES

log = logging.getLogger("build_hub_twin")

MODEL_ID = "TomoroAI/tomoro-colqwen3-embed-4b"
PILE_10K = "NeelNanda/pile-10k"
COLPALI_TRAIN = "vidore/colpali_train_set"
VIDORE_V1_TASK = "VidoreArxivQARetrieval"
VIDORE_V3_TASK = "Vidore3HrRetrieval"
# Files a ColQuant build writes that the hub repo does not have: the twin holds the real file set only
# (the hub repo's own remote code is TomoroAI's, which the twin cannot carry; ColQuant's is not it).
COLQUANT_ONLY_FILES = ("colquant_processor.json", tiny.TINY_MARKER, *REMOTE_CODE_FILES)
# config.json of the hub repo points transformers at the repo's own code (DESIGN.md §2 and §7:
# "transformers cannot load model_type colqwen3 without auto_map + remote code").
AUTO_MAP = {
    "AutoConfig": "configuration_colqwen3.ColQwen3Config",
    "AutoModel": "modeling_colqwen3.ColQwen3",
    "AutoProcessor": "processing_colqwen3.ColQwen3Processor",
}
# Qwen3-VL's image-processor config (DESIGN.md §2: patch 16, merge 2, temporal patch 2, mean/std 0.5,
# shortest_edge 65,536 px); longest_edge is Qwen3-VL's default, mteb's wrapper lowers it per run.
PREPROCESSOR_CONFIG = {
    "image_processor_type": "Qwen2VLImageProcessorFast",
    "processor_class": "ColQwen3Processor",
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "rescale_factor": 1 / 255,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "size": {"shortest_edge": 65536, "longest_edge": 16777216},
}


# --------------------------------------------------------------------------------------------
# The hub cache layout


@dataclass(frozen=True)
class HubRepo:
    """One repo of the twin: its id, type ("model"/"dataset"), commit and files (path -> bytes)."""

    repo_id: str
    repo_type: str
    revision: str
    files: Mapping[str, bytes]


def content_revision(files: Mapping[str, bytes]) -> str:
    """A 40-hex commit id derived from the files, for repos no registry pins (pile-10k, colpali train)."""
    digest = hashlib.sha1()
    for path in sorted(files):
        digest.update(path.encode() + b"\0" + hashlib.sha1(files[path]).digest())
    return digest.hexdigest()


def write_repo(hub_cache: Path, repo: HubRepo) -> Path:
    """Write `repo` into the hub cache: content-addressed blobs, a snapshot of relative symlinks,
    refs/main -> the commit (huggingface_hub's layout; its snapshot_download/hf_hub_download read it
    offline when asked for that revision or for main). Returns the snapshot directory."""
    folder = hub_cache / repo_folder_name(repo_id=repo.repo_id, repo_type=repo.repo_type)
    snapshot = folder / "snapshots" / repo.revision
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    for path, data in repo.files.items():
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / path
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(repo.revision)
    return snapshot


# --------------------------------------------------------------------------------------------
# The model repo


def model_repo(revision: str) -> HubRepo:
    """The model repo's file set with tiny random weights: config.json (nested text/vision configs,
    auto_map), two safetensors shards + model.safetensors.index.json, tokenizer files,
    preprocessor_config.json. `colquant.tiny` already writes the hub checkpoint's layout."""
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = tiny.build(Path(scratch) / "model")
        files = {path.name: path.read_bytes() for path in sorted(checkpoint.iterdir())
                 if path.is_file() and path.name not in COLQUANT_ONLY_FILES}
    config = json.loads(files["config.json"])
    config["auto_map"] = AUTO_MAP
    files["config.json"] = (json.dumps(config, indent=2) + "\n").encode()
    files["preprocessor_config.json"] = (json.dumps(PREPROCESSOR_CONFIG, indent=2) + "\n").encode()
    shards = sorted(name for name in files if name.endswith(".safetensors"))
    if len(shards) != 2 or "model.safetensors.index.json" not in files:
        raise RuntimeError(f"the tiny checkpoint gave shards {shards}; the twin needs two shards and an index, "
                           "like the real repo (adjust colquant.tiny.TINY_SHARD_SIZE)")
    return HubRepo(MODEL_ID, "model", revision, files)


# --------------------------------------------------------------------------------------------
# Dataset repos: parquet files in the repo layout, with the README's `configs:` YAML


@dataclass(frozen=True)
class DatasetConfig:
    """One `configs:` entry of a dataset repo: a name and its splits' tables."""

    name: str
    splits: Mapping[str, Dataset]


def parquet_bytes(table: Dataset) -> bytes:
    """A table as parquet the way push_to_hub writes it (features in the schema metadata)."""
    buffer = io.BytesIO()
    table.to_parquet(buffer)
    return buffer.getvalue()


def shard_path(config: str, split: str, directory: str | None) -> str:
    """Repo path of a config's split: `<dir>/<split>-00000-of-00001.parquet`, push_to_hub's naming."""
    return f"{directory or config}/{split}-00000-of-00001.parquet"


def readme(configs: Iterable[DatasetConfig], directories: Mapping[str, str]) -> bytes:
    """README.md front matter declaring each config's data files, as push_to_hub writes it
    (datasets/utils/metadata.py `MetadataConfigs`)."""
    lines = ["---", "configs:"]
    for config in configs:
        lines += [f"- config_name: {config.name}", "  data_files:"]
        for split in config.splits:
            lines += [f"  - split: {split}", f"    path: {shard_path(config.name, split, directories.get(config.name))}"]
    lines += ["---", "Offline twin built by ColQuant's scripts/build_hub_twin.py (rendered pages, random text).", ""]
    return "\n".join(lines).encode()


def dataset_repo(repo_id: str, configs: list[DatasetConfig], revision: str | None = None,
                 directories: Mapping[str, str] | None = None) -> HubRepo:
    """A dataset repo with one parquet shard per (config, split) and a README declaring them."""
    directories = directories or {}
    files = {shard_path(config.name, split, directories.get(config.name)): parquet_bytes(table)
             for config in configs for split, table in config.splits.items()}
    files["README.md"] = readme(configs, directories)
    return HubRepo(repo_id, "dataset", revision or content_revision(files), files)


def prepare_datasets_cache(datasets_cache: Path, snapshot: Path, repo: HubRepo, configs: list[DatasetConfig],
                           directories: Mapping[str, str] | None = None) -> None:
    """Run datasets' Parquet builder over the snapshot's files into the directory `load_dataset(repo,
    config)` prepares online: `<namespace>___<snake name>/<config>/<version>/<commit>/` with arrow
    files named after the dataset (datasets/builder.py `_relative_data_dir`)."""
    directories = directories or {}
    namespace, name = repo.repo_id.split("/")
    dataset_name = camelcase_to_snakecase(name)
    with tempfile.TemporaryDirectory() as scratch:
        for config in configs:
            data_files = DataFilesDict({split: [str(snapshot / shard_path(config.name, split, directories.get(config.name)))]
                                        for split in config.splits})
            builder = Parquet(cache_dir=scratch, dataset_name=dataset_name, config_name=config.name,
                              hash=repo.revision, data_files=data_files)
            target = (datasets_cache / f"{namespace}___{dataset_name}" / config.name
                      / str(builder.config.version) / repo.revision)
            builder.download_and_prepare(output_dir=str(target))


# --------------------------------------------------------------------------------------------
# Contents: rendered pages and their texts from colquant.evaluate.corpus


# Real ViDoRe pages come in many sizes, so pages in one corpus chunk have different visual-token
# counts and the reference scoring's zero padding matters; the twin scales its rendered pages to
# these fractions (in turn) so that the two scoring modes can differ on it too.
PAGE_SCALES = (0.4, 0.6, 0.8, 1.0)


def page_images(corpus: Corpus) -> dict[str, PILImage.Image]:
    """The corpus's rendered pages, each scaled by one of PAGE_SCALES in turn."""
    images = {}
    for index, page in enumerate(corpus.pages):
        image = corpus.image(page.page_id)
        scale = PAGE_SCALES[index % len(PAGE_SCALES)]
        images[page.page_id] = image.resize((round(image.width * scale), round(image.height * scale)))
    return images


def pile_10k(corpus: Corpus, rows: int) -> list[DatasetConfig]:
    """`NeelNanda/pile-10k`: split `train`, columns `text` and `meta` ({pile_set_name}), as the
    dataset card lists them; ColQuant reads `text` (calibration.load_text_documents)."""
    rng = random.Random(0)
    texts = [page.text for page in corpus.pages]
    table = Dataset.from_dict({
        "text": [" ".join(rng.sample(texts, k=min(3, len(texts)))) for _ in range(rows)],
        "meta": [{"pile_set_name": rng.choice(["Pile-CC", "ArXiv", "Github", "Wikipedia (en)"])} for _ in range(rows)],
    })
    return [DatasetConfig("default", {"train": table})]


def colpali_train_set(corpus: Corpus, train_rows: int, test_rows: int) -> list[DatasetConfig]:
    """`vidore/colpali_train_set`: splits `train` and `test`; columns image, image_filename, query,
    answer, source, options, page, model, prompt, answer_type (the dataset card); ColQuant streams
    query, answer and source (calibration.load_text_documents)."""
    images = page_images(corpus)
    sources = ["arxiv_qa", "docvqa", "infovqa", "tatdqa", "pdf"]
    features = Features({
        "image": Image(), "image_filename": Value("string"), "query": Value("string"), "answer": Value("string"),
        "source": Value("string"), "options": Value("string"), "page": Value("string"), "model": Value("string"),
        "prompt": Value("string"), "answer_type": Value("string"),
    })

    def rows(count: int, offset: int) -> Dataset:
        picked = [corpus.queries[(offset + index) % len(corpus.queries)] for index in range(count)]
        return Dataset.from_dict({
            "image": [images[query.page_id].resize((128, 160)) for query in picked],
            "image_filename": [f"images/{query.page_id}.png" for query in picked],
            "query": [query.text for query in picked],
            "answer": [query.answer for query in picked],
            "source": [sources[(offset + index) % len(sources)] for index in range(count)],
            "options": [None] * count, "page": [""] * count, "model": ["twin"] * count,
            "prompt": [None] * count, "answer_type": [None] * count,
        }, features=features)

    return [DatasetConfig("default", {"train": rows(train_rows, 0), "test": rows(test_rows, train_rows)})]


def vidore_v1(corpus: Corpus, split: str) -> list[DatasetConfig]:
    """ViDoRe v1 BEIR repos (e.g. `mteb/arxivqa_test_subsampled_beir`): configs `queries` (query-id,
    query), `corpus` (corpus-id, image), `qrels` (query-id, corpus-id, score), one split per eval
    split — what mteb/tasks/retrieval/eng/vidore_bench_retrieval.py `_load_data` reads."""
    page_index = {page.page_id: index for index, page in enumerate(corpus.pages)}
    images = page_images(corpus)
    queries = Dataset.from_dict({"query-id": list(range(len(corpus.queries))),
                                 "query": [query.text for query in corpus.queries]})
    pages = Dataset.from_dict({"corpus-id": list(range(len(corpus.pages))),
                               "image": [images[page.page_id] for page in corpus.pages]},
                              features=Features({"corpus-id": Value("int64"), "image": Image()}))
    qrels = Dataset.from_dict({"query-id": list(range(len(corpus.queries))),
                               "corpus-id": [page_index[query.page_id] for query in corpus.queries],
                               "score": [1] * len(corpus.queries)})
    return [DatasetConfig("corpus", {split: pages}), DatasetConfig("queries", {split: queries}),
            DatasetConfig("qrels", {split: qrels})]


def vidore_v3(corpora: Mapping[str, Corpus], split: str) -> list[DatasetConfig]:
    """ViDoRe v3 mteb-format repos (e.g. `vidore/vidore_v3_hr_mteb_format`): per language subset,
    configs `<subset>-corpus` (id, image), `<subset>-queries` (id, text), `<subset>-qrels` (query-id,
    corpus-id, score) — what mteb/abstasks/retrieval_dataset_loaders.py `RetrievalDatasetLoader`
    reads for `hf_subset=<subset>` (subsets from the task's eval_langs keys)."""
    configs = []
    for subset, corpus in corpora.items():
        images = page_images(corpus)
        pages = Dataset.from_dict({"id": [page.page_id for page in corpus.pages],
                                   "image": [images[page.page_id] for page in corpus.pages]},
                                  features=Features({"id": Value("string"), "image": Image()}))
        queries = Dataset.from_dict({"id": [query.query_id for query in corpus.queries],
                                     "text": [query.text for query in corpus.queries]})
        qrels = Dataset.from_dict({"query-id": [query.query_id for query in corpus.queries],
                                   "corpus-id": [query.page_id for query in corpus.queries],
                                   "score": [1] * len(corpus.queries)})
        configs += [DatasetConfig(f"{subset}-corpus", {split: pages}), DatasetConfig(f"{subset}-queries", {split: queries}),
                    DatasetConfig(f"{subset}-qrels", {split: qrels})]
    return configs


# --------------------------------------------------------------------------------------------
# Building the twin


def task_dataset(name: str) -> tuple[str, str, str, list[str]]:
    """(repo id, revision, eval split, hf subsets) of an mteb task, from mteb's registry."""
    task = mteb.get_task(name)
    return task.metadata.dataset["path"], task.metadata.dataset["revision"], task.metadata.eval_splits[0], list(task.hf_subsets)


def build(root: str | Path, *, pages: int = 16, queries: int = 24, calibration_rows: int = 300) -> Path:
    """Write the twin under `root` (replacing a previous twin there) and return `root`."""
    root = Path(root)
    for part in ("hub", "datasets"):
        shutil.rmtree(root / part, ignore_errors=True)
    hub_cache, datasets_cache = root / "hub", root / "datasets"
    # mteb's registry pins the model revision its published ViDoRe numbers were computed with
    write_repo(hub_cache, model_repo(mteb.get_model_meta(MODEL_ID).revision))
    with tempfile.TemporaryDirectory() as scratch:
        def corpus(seed: int) -> Corpus:
            return build_corpus(Path(scratch) / f"corpus-{seed}", n_pages=pages, n_queries=queries, seed=seed, progress=False)

        repos: list[tuple[HubRepo, list[DatasetConfig], Mapping[str, str]]] = []
        base = corpus(1)
        for repo_id, configs in ((PILE_10K, pile_10k(base, calibration_rows)),
                                 (COLPALI_TRAIN, colpali_train_set(base, calibration_rows, calibration_rows // 10))):
            directories = {"default": "data"}  # push_to_hub puts a single config's shards under data/
            repos.append((dataset_repo(repo_id, configs, directories=directories), configs, directories))
        repo_id, revision, split, _ = task_dataset(VIDORE_V1_TASK)
        configs = vidore_v1(corpus(2), split)
        repos.append((dataset_repo(repo_id, configs, revision), configs, {}))
        repo_id, revision, split, subsets = task_dataset(VIDORE_V3_TASK)
        # every language subset the real repo has; the profile's language filter then picks english
        all_subsets = ["english", "french"] if "english" in subsets else subsets
        configs = vidore_v3({subset: corpus(3 + index) for index, subset in enumerate(all_subsets)}, split)
        repos.append((dataset_repo(repo_id, configs, revision), configs, {}))
        for repo, configs, directories in repos:
            snapshot = write_repo(hub_cache, repo)
            prepare_datasets_cache(datasets_cache, snapshot, repo, configs, directories)
            log.info("wrote %s@%s (%s)", repo.repo_id, repo.revision[:8], ", ".join(config.name for config in configs))
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="directory to use as HF_HOME (hub/ and datasets/ are written in it)")
    parser.add_argument("--pages", type=int, default=16, help="pages per ViDoRe task subset")
    parser.add_argument("--queries", type=int, default=24, help="queries per ViDoRe task subset")
    parser.add_argument("--calibration-rows", type=int, default=300, help="rows of pile-10k and colpali_train_set")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = build(args.root, pages=args.pages, queries=args.queries, calibration_rows=args.calibration_rows)
    log.info("twin ready: HF_HOME=%s HF_HUB_OFFLINE=1 python -m colquant run params/twin.yaml", root)


if __name__ == "__main__":
    main()
