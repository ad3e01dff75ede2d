"""The checks a checkpoint's weights pass before a model computes with them, in one file for two loaders.

`colquant.load` runs them, and every ColQuant checkpoint carries this very file as transformers remote
code (`colquant.retriever.remote_code`) for `ColQwen3.from_pretrained`, so `AutoModel.from_pretrained(dir,
trust_remote_code=True)` refuses what `colquant.load` refuses: a tensor whose shape or dtype the
config's architecture (and its 4-bit or FP8 packing) does not describe, a missing or unexpected
tensor (transformers would initialise the missing ones at random and drop the others with a log line),
a NaN or Inf weight. Because it ships inside checkpoints it imports only torch, safetensors and the
standard library: remote code cannot import colquant.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import safe_open

SHARD_NAME = re.compile(r"model-(?P<number>\d+)-of-(?P<total>\d+)\.safetensors")
SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64", "I8": "int8",
                      "U8": "uint8", "I16": "int16", "I32": "int32", "I64": "int64", "BOOL": "bool",
                      "F8_E4M3": "float8_e4m3fn"}
FLOATING_DTYPES = frozenset({"bfloat16", "float16", "float32"})
INT32 = frozenset({"int32"})
# config.json's count of each stack of numbered layers, by the prefix of the layers' tensor names
LAYER_COUNTS = {"vlm.model.language_model.layers.": ("text_config", "num_hidden_layers"),
                "vlm.model.visual.blocks.": ("vision_config", "depth")}
QUANTIZED_TENSOR_SUFFIXES = (".qweight", ".qzeros", ".weight_scale")
HUB_OPTIONS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreachable, incomplete or does not match the architecture."""


# --------------------------------------------------------------------------------------------
# loading with the checks (what ColQwen3.from_pretrained runs)
# --------------------------------------------------------------------------------------------


def load_strictly(load: Callable[..., Any], model_class: type, name_or_path: str | os.PathLike,
                  args: tuple, kwargs: dict[str, Any]) -> Any:
    """`load(name_or_path, *args, **kwargs)` (transformers' from_pretrained), refused unless the weights
    match the config: tensor headers before loading (after it for a hub id, once they are downloaded),
    missing/unexpected/mismatched keys and non-finite values after. Returns what `load` would."""
    wants_info = kwargs.pop("output_loading_info", False)
    local = Path(name_or_path) if os.path.isdir(name_or_path) else None
    if local is not None:
        verify_tensors(local, _config_of(model_class, local, kwargs), model_class)
    model, info = load(name_or_path, *args, output_loading_info=True, **kwargs)
    folder = local or _downloaded_folder(name_or_path, kwargs)
    if local is None:
        verify_tensors(folder, model.config, model_class)
    raise_on_key_mismatch(folder, info, model.config)
    raise_on_non_finite(folder, model)
    return (model, info) if wants_info else model


def _config_of(model_class: type, folder: Path, kwargs: dict[str, Any]) -> Any:
    """The config the model will be built with: the one passed (AutoModel passes it), else the folder's."""
    config = kwargs.get("config")
    return config if isinstance(config, model_class.config_class) else model_class.config_class.from_pretrained(str(folder))


def _downloaded_folder(repo_id: str | os.PathLike, kwargs: dict[str, Any]) -> Path:
    """The local snapshot folder transformers just read a hub checkpoint from."""
    from transformers.utils import cached_file

    options = {key: kwargs[key] for key in HUB_OPTIONS if key in kwargs}
    return Path(cached_file(str(repo_id), "config.json", **options)).parent


# --------------------------------------------------------------------------------------------
# shards and tensor headers
# --------------------------------------------------------------------------------------------


def read_json_object(file: Path, fix: str) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{file} is not valid JSON ({error}); {fix}") from error
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} holds a JSON {type(data).__name__}, not an object of settings; {fix}")
    return data


def shard_files(path: Path) -> list[Path]:
    index_file = path / "model.safetensors.index.json"
    if index_file.exists():
        index = read_json_object(index_file, "re-download it (it maps every tensor to its shard)")
        if not isinstance(index.get("weight_map"), dict):
            raise CheckpointError(f"{index_file} has no weight_map object; re-download it")
        return [path / name for name in sorted(set(index["weight_map"].values()))]
    shards = sorted(path.glob("*.safetensors"))
    numbered = [match for shard in shards if (match := SHARD_NAME.fullmatch(shard.name))]
    if numbered:
        total = int(numbered[0]["total"])
        absent = sorted(set(range(1, total + 1)) - {int(match["number"]) for match in numbered})
        gaps = f"; shard(s) {', '.join(map(str, absent))} of {total} are missing too" if absent else ""
        raise CheckpointError(
            f"{path} holds sharded weights (model-*-of-{total:05d}.safetensors) but no model.safetensors.index.json"
            f"{gaps}. Re-download the checkpoint: without the index the shards cannot be read as one model."
        )
    if not shards:
        raise CheckpointError(f"{path} holds no *.safetensors weights")
    return shards


def verify_shard(shard: Path) -> None:
    """Open the shard's header: safetensors checks it against the file size, so a truncated
    download fails here with the shard's name instead of deep inside from_pretrained."""
    if not shard.exists():
        raise CheckpointError(f"shard {shard.name} is listed in the index but missing from {shard.parent}: re-download it")
    try:
        with safe_open(str(shard), framework="pt"):
            pass
    except Exception as error:  # safetensors raises its own SafetensorError type
        raise CheckpointError(
            f"shard {shard.name} in {shard.parent} is truncated or corrupt ({error}); delete it and download again"
        ) from error


def verify_tensors(path: Path, config: Any, model_class: type) -> None:
    """Every shard readable and every tensor's shape and dtype as the config's architecture (and its
    4-bit or FP8 packing) requires: transformers would otherwise cast a wrong dtype silently and report
    a wrong shape as a bare RuntimeError. Reads only the shards' headers."""
    shards = shard_files(path)
    for shard in shards:
        verify_shard(shard)
    expected = expected_tensors(config, model_class, declared_dtype(path))
    problems, fixes = [], []
    for shard in shards:
        with safe_open(str(shard), framework="pt") as reader:
            for name in reader.keys():
                header = reader.get_slice(name)
                dtype = SAFETENSORS_DTYPES.get(header.get_dtype(), header.get_dtype())
                problem = tensor_problem(name, tuple(header.get_shape()), dtype, expected)
                if problem:
                    problems.append(f"{shard.name}: {problem[0]}")
                    fixes += [problem[1]] if problem[1] not in fixes else []
    if problems:
        shown = "; ".join(problems[:4]) + (f"; ... ({len(problems)} tensors in all)" if len(problems) > 4 else "")
        raise CheckpointError(f"{path} does not match its config.json: {shown}. {' '.join(fixes)}")


class Expected(NamedTuple):
    """What one tensor must look like, and what to do when it does not."""

    shape: tuple[int, ...]
    dtypes: frozenset[str]
    shape_fix: str
    dtype_fix: str


def declared_dtype(path: Path) -> str:
    """The dtype the checkpoint's config.json declares ('' when none). Read from the file, not from the
    config a load builds: `from_pretrained(..., dtype=torch.float32)` sets that config's dtype to the
    cast the caller asked for, which is no disagreement between the checkpoint and its config."""
    config = read_json_object(path / "config.json", "re-download the checkpoint")
    return str(config.get("dtype") or config.get("torch_dtype") or "").removeprefix("torch.")


def expected_tensors(config: Any, model_class: type, declared: str) -> dict[str, Expected]:
    """Per tensor name, from a weightless (meta-device) model of the config; a quantized Linear's
    packed tensors follow from its widths and the config's quantization settings. Floating tensors
    are expected in `declared`, config.json's dtype (any floating dtype when it declares none)."""
    with torch.device("meta"):
        reference = model_class(config)
    shape_fix = "The checkpoint is corrupt or from another model than its config.json describes: re-download it."
    dtype_fix = (f"config.json declares dtype {declared or 'none'} and loading would cast silently: "
                 "re-save the checkpoint in one dtype or correct config.json.")
    floating = frozenset({declared}) if declared else FLOATING_DTYPES
    expected = {
        name: Expected(tuple(tensor.shape), floating if tensor.is_floating_point()
                       else frozenset({str(tensor.dtype).removeprefix("torch.")}), shape_fix, dtype_fix)
        for name, tensor in reference.state_dict().items()
    }
    quantization = quantization_settings(config)
    if is_fp8_config(quantization):
        fix = "The FP8 checkpoint does not match its quantization_config: re-create the variant (notebook 03)."
        expected |= {name: Expected(shape, dtypes, fix, fix)
                     for name, (shape, dtypes) in fp8_expected_tensors(reference, quantization).items()}
    elif quantization:
        expected |= packed_tensors(reference, quantization["bits"], quantization["group_size"],
                                   quantization.get("extra_config") or {})
    return expected


def quantization_settings(config: Any) -> dict[str, Any] | None:
    """config's `quantization_config` as a dict (transformers may have parsed it into its config class)."""
    quantization = getattr(config, "quantization_config", None)
    return quantization.to_dict() if hasattr(quantization, "to_dict") else quantization


def packed_tensors(reference: torch.nn.Module, bits: int, group_size: int,
                   layers: dict[str, dict[str, Any]] | None = None) -> dict[str, Expected]:
    """The GPTQ-style packing auto-round writes: int32 words of 32/bits weights, one scale and one
    packed zero point per group of `group_size` inputs (one group per row when group_size <= 0).
    `layers` (quantization_config's `extra_config`, by full layer name) gives a layer its own bits or
    group size, as mixed-precision variants do; a layer it keeps at 16 bits or more has no packing."""
    expected = {}
    for name, module in reference.named_modules():
        if isinstance(module, torch.nn.Linear):
            own = (layers or {}).get(name, {})
            layer_bits, layer_group = own.get("bits", bits), own.get("group_size", group_size)
            if layer_bits >= 16:
                continue
            fix = (f"config.json's quantization_config says bits={layer_bits}, group_size={layer_group}"
                   f"{' for this layer' if own else ''}, which does not describe these tensors: re-export the "
                   "checkpoint, or set quantization_config to the settings it was quantized with.")
            n_in, n_out = module.in_features, module.out_features
            groups = 1 if layer_group <= 0 else -(-n_in // layer_group)
            for part, shape, dtypes in (("qweight", (n_in * layer_bits // 32, n_out), INT32),
                                        ("qzeros", (groups, n_out * layer_bits // 32), INT32),
                                        ("scales", (groups, n_out), FLOATING_DTYPES),
                                        ("g_idx", (n_in,), INT32)):
                expected[f"{name}.{part}"] = Expected(shape, dtypes, fix, fix)
    return expected


def tensor_problem(name: str, shape: tuple[int, ...], dtype: str, expected: dict[str, Expected]) -> tuple[str, str] | None:
    """(what is wrong with one tensor, the fix); names the model does not know are left to the key
    check after loading."""
    want = expected.get(name)
    if want is None:
        return None
    if shape != want.shape:
        return f"{name} has shape {list(shape)}, the architecture needs {list(want.shape)}", want.shape_fix
    if dtype not in want.dtypes:
        return f"{name} is stored as {dtype}, expected {' or '.join(sorted(want.dtypes))}", want.dtype_fix
    return None


# --------------------------------------------------------------------------------------------
# the FP8 variants' layout (compressed-tensors "float-quantized", as vLLM reads it)
# --------------------------------------------------------------------------------------------


def is_fp8_config(quantization: Any) -> bool:
    """True for a compressed-tensors float-quantized config (the FP8 variants' checkpoints)."""
    return isinstance(quantization, dict) and quantization.get("quant_method") == "compressed-tensors" \
        and quantization.get("format") == "float-quantized"


def check_config(quantization: dict[str, Any], where: Path | str) -> list[str]:
    """The target patterns of a supported FP8 config; a CheckpointError naming what is not supported."""
    groups = quantization.get("config_groups") or {}
    fix = ("ColQuant reads FP8 checkpoints with 8-bit float weights per output channel and dynamic per-token "
           "activations (colquant.retriever.fp8.quantization_config); re-create the variant with notebook 03")
    if len(groups) != 1:
        raise CheckpointError(f"{where}: quantization_config has {len(groups)} config_groups, expected one. {fix}")
    group = next(iter(groups.values()))
    weights, acts = group.get("weights") or {}, group.get("input_activations") or {}
    wanted = {"weights": (weights, {"num_bits": 8, "type": "float", "strategy": "channel"}),
              "input_activations": (acts, {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True})}
    for part, (given, need) in wanted.items():
        wrong = {key: given.get(key) for key, value in need.items() if given.get(key) != value}
        if wrong:
            raise CheckpointError(f"{where}: quantization_config {part} has {wrong}, expected {need}. {fix}")
    targets = group.get("targets") or []
    if not targets or not all(isinstance(t, str) and t.startswith("re:") for t in targets):
        raise CheckpointError(f"{where}: quantization_config targets {targets} are not 're:' patterns of layer names. {fix}")
    return [t.removeprefix("re:") for t in targets]


def quantized_layer_names(model: torch.nn.Module, quantization: dict[str, Any], where: Path | str = "checkpoint") -> list[str]:
    """The Linear layers of ``model`` that a config's targets cover (minus its `ignore` list)."""
    patterns = [re.compile(p) for p in check_config(quantization, where)]
    ignore = set(quantization.get("ignore") or [])
    return [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and name not in ignore and any(p.match(name) for p in patterns)]


def fp8_expected_tensors(reference: torch.nn.Module, quantization: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], frozenset[str]]]:
    """Shape and dtype of each FP8 layer's `weight` and `weight_scale`, for the checkpoint's header check."""
    expected = {}
    for name in quantized_layer_names(reference, quantization):
        module = reference.get_submodule(name)
        expected[f"{name}.weight"] = ((module.out_features, module.in_features), frozenset({"float8_e4m3fn"}))
        expected[f"{name}.weight_scale"] = ((module.out_features, 1), frozenset({"float32"}))
    return expected


# --------------------------------------------------------------------------------------------
# after loading
# --------------------------------------------------------------------------------------------


def raise_on_key_mismatch(path: Path, info: dict[str, Any], config: Any) -> None:
    """Missing, unexpected or mismatched tensors, named, with the likeliest fix: transformers only logs
    them, initialising missing layers at random."""
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        names = sorted(str(name) for name in info.get(kind, ()))
        if names:
            shown = ", ".join(names[:8]) + (f" ... ({len(names)} in all)" if len(names) > 8 else "")
            problems.append(f"{kind.replace('_', ' ')}: {shown}")
    if problems:
        fix = _mismatch_fix({str(name) for name in info.get("unexpected_keys", ())}, config)
        raise CheckpointError(f"{path} does not match the ColQwen3 architecture ({'; '.join(problems)}). {fix}")


def _mismatch_fix(unexpected: set[str], config: Any) -> str:
    """What config.json edits explain the unexpected tensors (the probes' two cases), else the general fix."""
    fixes = []
    if any(name.endswith(QUANTIZED_TENSOR_SUFFIXES) for name in unexpected):
        fixes.append("The checkpoint holds quantized tensors that no layer of the model takes: config.json's "
                     "quantization_config is missing or names other layers; restore it (quantization_metadata.json "
                     "records it) or re-download the variant.")
    for prefix, (part, setting) in LAYER_COUNTS.items():
        stored = {int(match[1]) for name in unexpected if (match := re.match(re.escape(prefix) + r"(\d+)\.", name))}
        declared = getattr(getattr(config, part), setting)
        if stored and max(stored) >= declared:
            fixes.append(f"config.json's {part} says {setting}={declared} but the checkpoint holds {max(stored) + 1} "
                         f"layers there: restore {setting}={max(stored) + 1}.")
    return " ".join(fixes) or "The checkpoint is incomplete or from another model; re-download it or check the model id."


def raise_on_non_finite(path: Path, model: torch.nn.Module) -> None:
    """One pass over the loaded weights: a NaN or Inf would otherwise surface as NaN scores far
    downstream (or as a quality drop blamed on quantization), with no hint of the tensor at fault."""
    for name, tensor in model.state_dict().items():
        values = tensor.float() if tensor.dtype == torch.float8_e4m3fn else tensor
        if values.is_floating_point() and not bool(torch.isfinite(values).all()):
            count = int((~torch.isfinite(values)).sum())
            raise CheckpointError(
                f"{path}: tensor {name} holds {count} NaN/Inf value(s) (after casting to {tensor.dtype}); the "
                "checkpoint is corrupt or was saved from a diverged run: re-download it or re-create the variant"
            )
