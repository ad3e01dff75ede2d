"""The embedded default model: a tiny, randomly initialised ColQwen3 in the hub checkpoint's layout.

Nothing here reaches a hub. The model has the 4B's exact architecture at toy width
(`ColQwen3Config.tiny`), is saved as sharded safetensors with an index json and a tokenizer that
keeps the Qwen special tokens at their real ids, so `colquant.load` reads it through the same code
path as `TomoroAI/tomoro-colqwen3-embed-4b`. Its weights are random: numbers it produces check the
machinery, not retrieval quality.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from colquant.basics.arguments import require_count
from colquant.basics.files import atomic_directory, refuse_unrelated
from colquant.retriever.model import QWEN_SPECIAL_TOKENS, ColQwen3, ColQwen3Config
from colquant.retriever.processing import ColQwen3Processor
from colquant.retriever.remote_code import write_remote_code

TINY_SHARD_SIZE = "16MB"  # small enough that the tiny checkpoint is sharded like the real one
TINY_MARKER = "colquant_tiny.json"
TINY_FORMAT = 2  # bumped when the built files change (2: the hub's Qwen3-VL preprocessor_config.json)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (one token per byte, ids 0-255) with Qwen's special tokens at Qwen's ids.

    Without hub access there is no Qwen vocabulary to copy; byte-level coverage means any text
    tokenizes, and matching special-token ids means image/pad handling is exercised exactly.
    """
    byte_symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(byte_symbols)}
    vocab.update(QWEN_SPECIAL_TOKENS)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=[t for t in QWEN_SPECIAL_TOKENS if t not in ("<|endoftext|>", "<|im_end|>")],
        padding_side="left",
    )
    return tokenizer


def build(
    path: str | Path,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    *,
    size: str = "tiny",
    device: str | torch.device = "cpu",
) -> Path:
    """Write a random-weight checkpoint to `path`; reuse it if already built with the same settings.

    `size="tiny"` (default) takes seconds on CPU. `size="4b"` gives the exact 4B shapes (8.3 GB,
    built on `device`, a GPU in practice), for measuring memory, speed and quantization cost without
    a download. Written into a temporary sibling and renamed into place, so an interrupted build
    never leaves a directory that looks complete. A build with other settings is replaced; a file or
    a folder holding anything else (outputs, another checkpoint) is refused, never overwritten.
    """
    configs = {"tiny": ColQwen3Config.tiny, "4b": ColQwen3Config.colqwen3_4b}
    if size not in configs:
        raise ValueError(f"size={size!r}: use 'tiny' or '4b'")
    require_count("seed", seed, 0)  # torch.manual_seed truncates 1.5 to 1, while the marker would say 1.5
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype={dtype!r} is not a floating torch dtype: pass e.g. torch.bfloat16 or torch.float32")
    path = Path(path)
    marker = path / TINY_MARKER
    settings = {"seed": seed, "dtype": str(dtype), "size": size, "format": TINY_FORMAT}
    if marker.exists() and json.loads(marker.read_text()) == settings:
        return path
    refuse_unrelated(path, TINY_MARKER, "tiny ColQuant model build", "colquant.tiny.build")
    torch.manual_seed(seed)
    with atomic_directory(path) as staging:
        with torch.device(device):
            model = ColQwen3(configs[size]()).to(dtype).eval()
        model.save_pretrained(str(staging), max_shard_size=TINY_SHARD_SIZE if size == "tiny" else "2GB")
        # the 4B's processor files: Qwen3-VL's preprocessor_config.json and the reference's 1280 budget
        ColQwen3Processor(build_tokenizer()).save_pretrained(staging)
        write_remote_code(staging)  # transformers' AutoModel/AutoProcessor load it without colquant
        (staging / TINY_MARKER).write_text(json.dumps(settings) + "\n")
    return path
