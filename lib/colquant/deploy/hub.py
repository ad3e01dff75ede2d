"""`colquant push`: a quantized variant, its model card (`colquant.quantize.cards`) and results, uploaded.

`push --dry-run` runs every check `push` runs and lists exactly the files it would send: the
variant loads as `colquant.load` loads it, the repo id is one the hub accepts, the reported results
are those of the weights the variant holds, its random-weights flag agrees with its base model's
provenance, and it holds no hidden file or link (`.env`, `.git/`, ...). Those are refused, not left
out: a stray file in a folder about to be published is the user's to move, not ours to skip.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard

from colquant.basics.files import OutputError, write_text
from colquant.quantize.cards import PIPELINE_TAG, base_model_license, build_model_card
from colquant.retriever.checkpoint_files import METADATA_FILE, read_reported_results, read_variant_metadata

log = logging.getLogger(__name__)

REQUIRED_CARD_FIELDS = ("base_model", "library_name", "pipeline_tag", "license", "tags")
# Profile model ids of the checkpoints ColQuant builds itself, with random weights (`workspace.base_model`).
RANDOM_WEIGHT_BUILDS = ("embedded-tiny", "synthetic-4b")


class PushError(RuntimeError):
    """A variant cannot be pushed: random weights, an invalid card, no hub access."""


def validate_card(card: ModelCard) -> None:
    """Offline checks of what the hub would reject or mis-index: metadata re-parses, required fields set."""
    reparsed = ModelCard(str(card)).data.to_dict()
    missing = [field for field in REQUIRED_CARD_FIELDS if not reparsed.get(field)]
    if missing:
        raise PushError(f"the model card lacks {', '.join(missing)} in its metadata")
    if reparsed["pipeline_tag"] != PIPELINE_TAG:
        raise PushError(f"pipeline_tag is {reparsed['pipeline_tag']!r}, expected {PIPELINE_TAG!r}")


def files_to_upload(checkpoint: Path) -> list[str]:
    """Every file of the checkpoint (weights, configs, processor files, remote code, metadata, exports),
    relative to it; a hidden file or folder, or a link, anywhere in it is refused by name."""
    files, refused = [], []
    for folder, subfolders, names in os.walk(checkpoint):
        for name in [*subfolders, *names]:
            path = Path(folder) / name
            relative = path.relative_to(checkpoint).as_posix()
            if name.startswith(".") or path.is_symlink():
                refused.append(relative + ("/" if path.is_dir() and not path.is_symlink() else ""))
            elif path.is_file():
                files.append(relative)
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
    if refused:
        raise PushError(f"{checkpoint} holds {', '.join(sorted(refused))}: hidden files and links are not uploaded "
                        "with a variant (they may hold secrets, or point outside it). Move them out of the folder, "
                        "then push again.")
    return sorted(files)


def check_repo_id(repo_id: str) -> None:
    """ORG/NAME as the hub accepts it (huggingface_hub's own validator), before anything is loaded or sent."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if repo_id.count("/") != 1:
        raise PushError(f"--repo-id {repo_id!r} is not ORG/NAME")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise PushError(f"--repo-id {repo_id!r} is not a valid hub repo id: {error}") from error


def random_weights(metadata: dict[str, Any], checkpoint: Path) -> bool:
    """The variant's random-weights flag, checked against what it was made from: a base model that is
    one of ColQuant's random-weight builds makes the variant random whatever the flag says."""
    from colquant.retriever.tiny import TINY_MARKER

    base = str(metadata.get("base_model"))
    built = base in RANDOM_WEIGHT_BUILDS or (Path(base) / TINY_MARKER).is_file()
    if built and not metadata["random_weights"]:
        raise PushError(
            f"{checkpoint / 'quantization_metadata.json'} says random_weights: false, but its base model {base} is "
            f"ColQuant's random-weight build ({'a profile model id' if base in RANDOM_WEIGHT_BUILDS else TINY_MARKER}): "
            "the flag was edited. Restore random_weights: true; a random-weight variant is pushed only with --force.")
    return bool(metadata["random_weights"])


def check_loads(checkpoint: Path) -> None:
    """Load the variant on the CPU as `colquant.load` does (config, every shard and tensor, keys,
    NaN/Inf), so a push never publishes a checkpoint that does not load."""
    from colquant.inference.loading import load
    from colquant.retriever.checkpoint import CheckpointError

    try:
        load(checkpoint, device="cpu", accelerate=False)
    except CheckpointError as error:
        raise PushError(f"{checkpoint} does not load as colquant.load loads it, so it is not pushed: {error}") from error


def push(variant: str | Path, repo_id: str, *, private: bool = False, dry_run: bool = False, force: bool = False) -> list[str]:
    """Upload a variant with a regenerated card; returns the files (all that would go, on a dry run).

    Checks run before anything is written or sent, the same on a dry run: the variant's metadata,
    the repo id, hidden files and links (refused), random weights (refused unless `force`, and
    checked against the base model), reported results of other weights (refused), a full load on
    the CPU, the card, and (for a real push) that the hub is reachable. The upload sends exactly the
    files returned."""
    from colquant.retriever.checkpoint import hub_offline

    checkpoint = Path(variant)
    metadata_file = checkpoint / METADATA_FILE
    if not metadata_file.exists():
        raise PushError(f"{checkpoint} has no {METADATA_FILE}: pass a variant directory ColQuant wrote (variants/<name>)")
    try:
        metadata = read_variant_metadata(checkpoint)
    except OutputError as error:
        raise PushError(str(error)) from error
    loads = metadata.get("loads")
    if loads:  # a W4A8 run (variants.produce_w4a8_variant) names a checkpoint and holds no weights
        raise PushError(f"{checkpoint.name} is a W4A8 run of {loads['checkpoint']} with no weights of its own: push "
                        f"{loads['checkpoint']} (its folder beside this one); users run it as W4A8 with "
                        f"colquant.load(path, activations=\"{loads['activations']}\")")
    check_repo_id(repo_id)
    files = sorted(set(files_to_upload(checkpoint)) | {"README.md"})
    try:  # fidelity and NDCG@5 recorded by later notebooks, for the weights the variant holds now
        metadata["results"] = read_reported_results(checkpoint)
    except OutputError as error:
        raise PushError(str(error)) from error
    if random_weights(metadata, checkpoint) and not force:
        raise PushError(f"{checkpoint.name} was quantized from random weights: it is not for use. Pass --force to upload it anyway.")
    check_loads(checkpoint)
    card = build_model_card({**metadata, "variant": repo_id}, checkpoint)
    validate_card(card)
    if dry_run:
        return files
    if hub_offline():
        raise PushError("the hub is unreachable (or HF_HUB_OFFLINE is set): nothing was uploaded. Push from a machine with hub access.")
    from huggingface_hub import HfApi

    write_text(checkpoint / "README.md", str(card))
    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(folder_path=str(checkpoint), repo_id=repo_id, repo_type="model", allow_patterns=files,
                      commit_message=f"Upload {metadata['variant']} (ColQuant)")
    return files


def content_revision(checkpoint: Path) -> str:
    """A 40-hex content hash of the weights and config: the revision mteb files results under until
    the variant is pushed and has a hub commit."""
    import hashlib

    digest = hashlib.sha1()
    for file in sorted([checkpoint / "config.json", *checkpoint.glob("*.safetensors")]):
        digest.update(file.name.encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def logical_parameters(checkpoint: Path) -> int:
    """Parameters of the model as trained: a packed int32 qweight holds 32/bits weights, bits being the
    layer's own width where config.json's quantization_config gives it one (`extra_config`, mixed-width
    variants); the quantization side tensors (scales, zeros, g_idx) are not parameters."""
    from safetensors import safe_open

    quantization = json.loads((checkpoint / "config.json").read_text()).get("quantization_config") or {}
    layers = quantization.get("extra_config") or {}
    total = 0
    for shard in checkpoint.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as tensors:
            for name in tensors.keys():
                if name.endswith((".scales", ".qzeros", ".g_idx")):
                    continue
                numel = 1
                for size in tensors.get_slice(name).get_shape():
                    numel *= size
                if name.endswith(".qweight"):
                    bits = layers.get(name.removesuffix(".qweight"), {}).get("bits", quantization.get("bits"))
                    numel = numel * 32 // bits
                total += numel
    return total


def variant_model_meta(checkpoint: str | Path, repo_id: str, *, base_model: str = "TomoroAI/tomoro-colqwen3-embed-4b"):
    """mteb's ModelMeta for a quantized variant, complete enough for a results submission.

    Name is the intended hub repo id, revision the content hash until pushed; training data, language
    and instructions use are the base model's (quantization trains nothing)."""
    import mteb
    from mteb.models.model_implementations.colqwen_models import ColQwen3Wrapper
    from mteb.models.model_meta import ModelMeta, ScoringFunction

    checkpoint = Path(checkpoint)
    metadata = json.loads((checkpoint / METADATA_FILE).read_text())
    config = json.loads((checkpoint / "config.json").read_text())
    base = mteb.get_model_meta(base_model)
    return ModelMeta(
        loader=ColQwen3Wrapper,
        name=repo_id,
        revision=content_revision(checkpoint),
        release_date=metadata["created"][:10],
        languages=base.languages,
        n_parameters=logical_parameters(checkpoint),
        memory_usage_mb=round(metadata["size_on_disk_bytes"] / 2**20),
        max_tokens=config["text_config"]["max_position_embeddings"],
        embed_dim=config["embed_dim"],
        license=metadata.get("license") or base_model_license(metadata["base_model"]) or base.license,
        open_weights=True,
        public_training_code=base.public_training_code,
        public_training_data=base.public_training_data,
        framework=["PyTorch", "Transformers", "safetensors"],
        reference=f"https://huggingface.co/{repo_id}",
        similarity_fn_name=ScoringFunction.MAX_SIM,
        use_instructions=base.use_instructions,
        training_datasets=base.training_datasets,
        adapted_from=base_model,
        modalities=["image", "text"],
        model_type=["late-interaction"],
    )
