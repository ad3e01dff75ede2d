"""ColQuant's vLLM plugin: serve ColQwen3 checkpoints whose 320-d projection has a bias.

vLLM 0.32's `ColQwen3Model` builds `custom_text_proj` without a bias whenever config.json names
`embed_dim` (every TomoroAI-layout checkpoint does) and then silently skips
`embedding_proj_layer.bias`, so every token vector is off by the bias (cosine 0.977 with a
non-zero bias). The real 4B checkpoint has that bias. Installing colquant registers this module
under vLLM's `vllm.general_plugins` entry point group; vLLM calls `register` in every process it
starts (engine core included), which replaces the `ColQwen3` architecture with a subclass that adds
the bias when the checkpoint carries one. Nothing here imports colquant or its dependencies, so the
plugin loads in a serving environment that has only vLLM.
"""

from __future__ import annotations

ARCHITECTURE = "ColQwen3"
PLUGIN_CLASS = "colquant_vllm.model:ColQwen3WithProjectionBias"


def register() -> None:
    """Entry point for `vllm.general_plugins`: point the ColQwen3 architecture at the fixed class.

    The class is given as a "module:Class" string so vLLM imports it lazily (and only where a
    ColQwen3 checkpoint is actually served)."""
    from vllm import ModelRegistry

    ModelRegistry.register_model(ARCHITECTURE, PLUGIN_CLASS)
