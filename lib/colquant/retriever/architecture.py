"""What ColQwen3 is made of, and what 4-bit weights would save, computed from the module tree.

Works on a model built on the meta device, so the 4B's inventory costs no memory and no download.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn

from colquant.retriever.model import ColQwen3, ColQwen3Config

COMPONENTS = {
    "vision tower": "vlm.model.visual",
    "language model (decoder Linear)": "vlm.model.language_model.layers",
    "token embeddings": "vlm.model.language_model.embed_tokens",
    "projection (320-d)": "embedding_proj_layer",
}
BF16_BYTES = 2.0


@dataclass(frozen=True)
class PackedCost:
    """Bytes per weight of a W4 group-g layer in auto-round's auto_gptq packing."""

    bits: int = 4
    group_size: int = 128

    def bytes_per_weight(self) -> float:
        # 4-bit value + per group: one fp16 scale and one 4-bit zero point
        return self.bits / 8 + (2 + self.bits / 8) / self.group_size


def meta_model(config: ColQwen3Config) -> ColQwen3:
    """The architecture with no storage behind it: shapes only."""
    with torch.device("meta"):
        return ColQwen3(config)


def linear_inventory(model: nn.Module) -> pd.DataFrame:
    """Every Linear layer: where it sits, its shape, and whether the W4A16 scheme covers it."""
    rows = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            rows.append(
                {
                    "name": name,
                    "component": component_of(name),
                    "in_features": module.in_features,
                    "out_features": module.out_features,
                    "params": module.weight.numel(),
                    "w4a16_lm_only": name.startswith(COMPONENTS["language model (decoder Linear)"]),
                }
            )
    return pd.DataFrame(rows)


def component_of(name: str) -> str:
    for component, prefix in COMPONENTS.items():
        if name.startswith(prefix):
            return component
    return "language model (norms)"


def parameter_table(model: nn.Module) -> pd.DataFrame:
    """Parameters per component (decoder Linear weights separated from norms and embeddings)."""
    counts: dict[str, int] = {}
    for name, parameter in model.named_parameters():
        component = component_of(name)
        if component == "language model (decoder Linear)" and not name.endswith("proj.weight"):
            component = "language model (norms)"
        counts[component] = counts.get(component, 0) + parameter.numel()
    table = pd.DataFrame({"component": list(counts), "params": list(counts.values())})
    table["share"] = table["params"] / table["params"].sum()
    return table.sort_values("params", ascending=False, ignore_index=True)


def predicted_sizes(model: nn.Module, cost: PackedCost = PackedCost()) -> pd.DataFrame:
    """Checkpoint size / weight memory for BF16, W4A16 on the language model, and W4A16 with the
    vision tower's Linear layers too (where their input width is a multiple of the group size)."""
    inventory = linear_inventory(model)
    total = sum(p.numel() for p in model.parameters())
    lm = inventory.loc[inventory["w4a16_lm_only"], "params"].sum()
    vision_ok = inventory["component"].eq("vision tower") & (inventory["in_features"] % cost.group_size == 0)
    vision = inventory.loc[vision_ok, "params"].sum()
    rows = []
    for scheme, quantized in (("BF16", 0), ("W4A16 (language model)", lm), ("W4A16 (+ vision tower)", lm + vision)):
        size = (total - quantized) * BF16_BYTES + quantized * cost.bytes_per_weight()
        rows.append({"scheme": scheme, "quantized_params": int(quantized), "bytes": size, "GiB": size / 2**30})
    table = pd.DataFrame(rows)
    table["vs_bf16"] = table["bytes"] / table.loc[0, "bytes"]
    return table


def w4a16_coverage(model: nn.Module) -> float:
    """Fraction of all parameters that the language-model-only W4A16 scheme quantizes."""
    inventory = linear_inventory(model)
    return float(inventory.loc[inventory["w4a16_lm_only"], "params"].sum() / sum(p.numel() for p in model.parameters()))


def component_tree(model: nn.Module, depth: int = 3) -> str:
    """Indented module tree to `depth`, collapsing repeated blocks (layers.0..N-1)."""
    lines: list[str] = []

    def walk(module: nn.Module, name: str, level: int) -> None:
        params = sum(p.numel() for p in module.parameters())
        lines.append(f"{'  ' * level}{name} ({type(module).__name__}, {params / 1e6:,.1f} M)")
        if level + 1 >= depth:
            return
        children = list(module.named_children())
        if isinstance(module, nn.ModuleList) and len(children) > 1:
            walk(children[0][1], f"[0..{len(children) - 1}]", level + 1)
            return
        for child_name, child in children:
            walk(child, child_name, level + 1)

    walk(model, type(model).__name__, 0)
    return "\n".join(lines)
