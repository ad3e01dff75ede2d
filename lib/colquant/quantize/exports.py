"""GPTQ/AWQ exports as whole retrievers, not bare text towers.

auto-round exports only the module it quantized (the Qwen3VLTextModel), so its GPTQ/AWQ folders lack
the vision tower, the projection, the processor files and the ColQwen3 config: no server can use
them for retrieval. `complete_export` rewrites such a folder into a full ColQwen3 checkpoint: the
tower's packed tensors under their full names (`vlm.model.language_model.*`), every other tensor of
the saved variant as it is, the variant's config with the export's `quantization_config`, and the
processor and remote-code files. vLLM infers which layers are 4-bit from the tensors' dtypes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from huggingface_hub import save_torch_state_dict
from safetensors.torch import load_file

TOWER_PREFIX = "vlm.model.language_model."
NOT_COPIED = {"config.json", "README.md", "model.safetensors.index.json"}


def complete_export(variant: Path, export: Path, *, max_shard_size: str = "2GB") -> None:
    """Turn the tower-only export in `export` into a whole ColQwen3 checkpoint, using `variant`
    (the saved full checkpoint, top-level files only) for everything outside the text tower."""
    tower = {}
    for shard in sorted(export.glob("*.safetensors")):
        tower.update(load_file(str(shard)))
    if not tower:
        raise FileNotFoundError(f"{export} holds no *.safetensors: the auto-round export did not run")
    state = {}
    for shard in sorted(variant.glob("*.safetensors")):
        state.update({name: tensor for name, tensor in load_file(str(shard)).items() if not name.startswith(TOWER_PREFIX)})
    state.update({TOWER_PREFIX + name: tensor for name, tensor in tower.items()})
    quantization_config = json.loads((export / "config.json").read_text())["quantization_config"]
    for stale in [*export.glob("*.safetensors"), *export.glob("*.index.json")]:
        stale.unlink()
    save_torch_state_dict(state, str(export), max_shard_size=max_shard_size)
    for item in variant.iterdir():
        if item.is_file() and item.name not in NOT_COPIED and item.suffix != ".safetensors":
            shutil.copyfile(item, export / item.name)
    config = json.loads((variant / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (export / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
