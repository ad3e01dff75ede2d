"""Run profiles: the YAML files in `params/` that parameterise every notebook and the pipeline.

A profile is read once, validated against a typed schema (one pydantic model per section) and
passed around as a plain dict with the defaults filled in, so notebooks can show it and code can
index it. The schema is strict on purpose: a misspelt key, a quoted number or boolean, or a setting
the model cannot take would otherwise surface an hour into a GPU run, or never (a wrong result).
Every error names the file, the key path and what is allowed.

The schema (`Profile`) is the one place defaults live; code reads the validated dict without
fallbacks of its own. Command-line overrides (`--set quantization.iters=50`) edit the file's content
before validation, so they meet the same checks; the quantization settings name the variants
(`QuantizationSection.variant_name`).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import ErrorDetails

from colquant.basics.arguments import cuda_unavailable_reason
from colquant.inference.compress import COMPRESSION_FORMS, COMPRESSION_PATTERN
from colquant.quantize.weight_formats import variant_name
from colquant.research.profile_checks import architecture_problems

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
DEVICE_FORMS = "cpu, cuda, cuda:N or auto (CUDA when present, else CPU)"
_DEVICE_PATTERN = re.compile(r"^(cpu|auto|cuda(:\d+)?)$")
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
EXAMPLE_PROFILE = "params/tiny.yaml"


class ProfileError(ValueError):
    """A profile file is missing, malformed, or names an impossible setting."""


class _Section(BaseModel):
    """Strict: no string-to-number/boolean coercion, and unknown keys are errors, not ignored."""

    model_config = ConfigDict(strict=True, extra="forbid")


def _listed_once(values: list[Any]) -> list[Any]:
    """Refuse a list naming one value twice: a repeated seqlen, task or batch size would run (and
    report) the same step or row twice."""
    repeated = sorted({str(value) for value in values if values.count(value) > 1})
    if repeated:
        raise ValueError(f"{', '.join(repeated)} listed more than once; list each value once")
    return values


class ModelSection(_Section):
    id: str = Field(min_length=1)
    revision: str | None = None  # a hub commit sha for hub ids; null for local or built models
    dtype: Literal["bfloat16", "float16", "float32"]
    device: str
    max_num_visual_tokens: PositiveInt

    @field_validator("device")
    @classmethod
    def _device_exists(cls, device: str, info: ValidationInfo) -> str:
        if not _DEVICE_PATTERN.match(device):
            raise ValueError(f"use {DEVICE_FORMS}")
        if (info.context or {}).get("check_device", True):
            reason = cuda_unavailable_reason(device)
            if reason:
                raise ValueError(f"{reason}; use device: auto (CUDA when present, else CPU) or cpu, or run on a GPU machine")
        return device


class CorpusSection(_Section):
    source: Literal["embedded", "vidore"]
    n_pages: PositiveInt = 60
    n_queries: PositiveInt = 120
    seed: NonNegativeInt = 0


class CalibrationSection(_Section):
    source: Literal["pile-10k", "colpali-train", "pages"]
    offline_fallback: Literal["embedded", "none"]
    nsamples: PositiveInt
    seqlens: list[PositiveInt] = Field(min_length=1)
    seed: NonNegativeInt

    _seqlens_listed_once = field_validator("seqlens")(_listed_once)


GridBits = Literal[2, 3, 4, 8]  # the weight widths auto-round packs (auto_round:auto_gptq) and transformers loads


class AutoSchemeSection(_Section):
    """auto-round's AutoScheme: per-layer bit widths, chosen among `options` (W{bits}A16 at
    `group_size`) by its delta-loss sensitivity, one variant per average-bits budget in `avg_bits`."""

    avg_bits: list[PositiveFloat] = Field(min_length=1)
    options: list[GridBits] = Field(min_length=2)
    group_size: PositiveInt = 128
    nsamples: PositiveInt | None = None  # calibration windows AutoScheme scores on (None: all of them)

    _lists_listed_once = field_validator("avg_bits", "options")(_listed_once)


class GridSection(_Section):
    """The frontier's weight settings (`colquant.quantize.weight_grid`), tuned on the calibration set of `seqlen`:
    auto-round W{bits}A16 for every bits x group size, an RTN baseline for each (`rtn`), and AutoScheme."""

    seqlen: PositiveInt | None = None  # None: the middle of calibration.seqlens (sorted; the lower middle if even)
    bits: list[GridBits] = []
    group_sizes: list[PositiveInt] = Field(default=[128], min_length=1)
    rtn: bool = True
    autoscheme: AutoSchemeSection | None = None

    _lists_listed_once = field_validator("bits", "group_sizes")(_listed_once)


class QuantizationSection(_Section):
    bits: Literal[4]  # the seeds' variant per seqlen; other widths are grid settings (`grid`)
    group_size: PositiveInt
    sym: bool
    iters: NonNegativeInt  # 0 = RTN
    batch_size: PositiveInt
    rtn_baseline: bool
    export_formats: list[Literal["auto_round", "auto_gptq", "auto_awq"]] = Field(min_length=1)
    fp8: list[Literal["lm", "all"]] = []  # W8A8 FP8 variants (colquant.retriever.fp8): fp8-lm, fp8-all (+ vision tower)
    # an auto-round variant also run as W4A8: the same checkpoint loaded with colquant.load(...,
    # activations="fp8") (colquant.kernels.w4a8), compared in notebooks 04-07 as a variant. true: the
    # largest calibration seqlen's; a number: that seqlen's (one of calibration.seqlens); false: none
    w4a8: bool | PositiveInt = False
    grid: GridSection | None = None  # the frontier's weight settings; None: the variants above only

    _lists_listed_once = field_validator("export_formats", "fp8")(_listed_once)

    def variant_name(self, seqlen: int, method: str = "autoround", *, calibration_source: str | None = None) -> str:
        """This section's variant at `seqlen` (`variant_name` with its bits, group size and iters)."""
        return variant_name(self.bits, self.group_size, self.sym, method, seqlen=seqlen, iters=self.iters,
                            calibration_source=calibration_source)

    def w4a8_variant_name(self, seqlen: int, *, calibration_source: str) -> str:
        """The W4A8 run of the auto-round variant at `seqlen`: its name with the activations' bits, e.g.
        `w4a8-g128-sym-pile10k-seqlen512-iters200` for `w4a16-g128-sym-pile10k-seqlen512-iters200`."""
        name = self.variant_name(seqlen, calibration_source=calibration_source)
        return f"w{self.bits}a8-" + name.removeprefix(f"w{self.bits}a16-")


class EvaluationSection(_Section):
    tasks: list[str] = Field(min_length=1)
    languages: list[str] | None = None
    scoring: Literal["colpali", "exact"] = "colpali"  # colpali-engine's scoring, as the published numbers
    batch_size: PositiveInt
    corpus_chunk_size: PositiveInt

    _tasks_listed_once = field_validator("tasks")(_listed_once)


class FidelitySection(_Section):
    n_queries: PositiveInt
    n_pages: PositiveInt


class SweepSection(_Section):
    query_batch_sizes: list[PositiveInt] = Field(min_length=1)
    page_batch_sizes: list[PositiveInt] = Field(min_length=1)
    query_tokens: PositiveInt
    repeats: PositiveInt
    memory_budgets_gb: list[PositiveFloat] = Field(min_length=1)

    _lists_listed_once = field_validator("query_batch_sizes", "page_batch_sizes", "memory_budgets_gb")(_listed_once)


class CompressionSection(_Section):
    settings: list[str] = Field(default=["none", "pool2", "pool3", "int8", "binary", "pool3+binary"], min_length=1)

    @field_validator("settings")
    @classmethod
    def _settings_follow_the_grammar(cls, settings: list[str]) -> list[str]:
        wrong = [setting for setting in settings if not COMPRESSION_PATTERN.match(setting)]
        if wrong:
            raise ValueError(f"{', '.join(map(repr, wrong))} not understood; each setting is one of {COMPRESSION_FORMS}")
        return _listed_once(settings)


class FrontierSection(_Section):
    """Notebook 08: NDCG@5 against total bytes (the model on the GPU + the page index of a corpus of each
    size in `corpus_pages`), and the best (weights, index) pair under each of `memory_budgets_gb`."""

    corpus_pages: list[PositiveInt] = Field(default=[10_000, 100_000, 1_000_000], min_length=1)
    memory_budgets_gb: list[PositiveFloat] = Field(default=[8, 12, 24, 80], min_length=1)

    _lists_listed_once = field_validator("corpus_pages", "memory_budgets_gb")(_listed_once)


class BenchSettings(_Section):
    """`python -m colquant bench`: what is timed, at which sizes, against which targets.

    `precisions` are timed in order, each on a freshly loaded model (`colquant.deploy.bench.PREPARE` names
    the choices); `vision` times pages with transformers' eager vision tower and/or the fast one;
    `page_size` is the page image's (height, width) in pixels before the processor resizes it to the
    model's visual-token budget. `targets` are minimums (`*_per_s`, `*_ratio_min`) or maximums (`*_ms`)."""

    precisions: list[str] = Field(default=["bf16-eager", "bf16", "w4a16"], min_length=1)
    vision: list[Literal["eager", "fast"]] = Field(default=["eager", "fast"], min_length=1)
    query_tokens: PositiveInt = 32
    query_batches: list[PositiveInt] = Field(default=[1, 4], min_length=1)
    eager_query_batches: list[PositiveInt] = Field(default=[1])
    page_batches: list[PositiveInt] = Field(default=[1], min_length=1)
    page_size: list[PositiveInt] = Field(default=[256, 256], min_length=2, max_length=2)
    # page batches per timed end-to-end (PIL) call through a warm PagePipeline; 0 = none
    end_to_end_batches: int = Field(default=3, ge=0)
    workers: NonNegativeInt = 0  # DataLoader workers decoding/resizing pages in the end-to-end timing
    reps: PositiveInt = 3
    min_time_s: float = Field(default=0.0, ge=0)
    kernel_checks: bool = True  # GEMM candidates and fused ops against their references (CUDA only)
    check_ms: list[PositiveInt] = Field(default=[1, 16, 44, 176, 1408])
    targets: dict[str, float] = Field(default_factory=dict)


class Profile(_Section):
    """A whole profile; `model_dump()` is the plain dict the notebooks and the pipeline read."""

    profile: str
    random_weights: bool
    model: ModelSection
    corpus: CorpusSection
    calibration: CalibrationSection
    quantization: QuantizationSection
    evaluation: EvaluationSection
    fidelity: FidelitySection
    sweep: SweepSection
    compression: CompressionSection = Field(default_factory=CompressionSection)
    frontier: FrontierSection = Field(default_factory=FrontierSection)
    bench: BenchSettings = Field(default_factory=BenchSettings)

    @model_validator(mode="after")
    def _grid_seqlen_defaults_to_the_middle_one(self) -> "Profile":
        """The grid is tuned at one calibration seqlen: the middle one unless it names one (512 in the
        shipped profiles, the seqlen the committed notebooks run 02-03 at)."""
        grid = self.quantization.grid
        if grid is not None and grid.seqlen is None:
            seqlens = sorted(self.calibration.seqlens)
            grid.seqlen = seqlens[(len(seqlens) - 1) // 2]
        return self

    @field_validator("profile")
    @classmethod
    def _profile_is_a_plain_name(cls, name: str) -> str:
        """Outputs go to <output root>/<profile>: a name with '/' or '..' would write elsewhere."""
        if not _PLAIN_NAME.match(name) or ".." in name:
            raise ValueError("a profile name is a plain name: letters, digits, '.', '_' and '-', no '/' and no '..'")
        return name


def load_profile(path: str | Path, *, overrides: Sequence[str] = (), check_device: bool = True) -> dict[str, Any]:
    """Read and validate `params/<name>.yaml`; relative paths inside stay relative to the repo root.

    `overrides` are the command line's `--set KEY.PATH=VALUE` (e.g. `quantization.iters=50`), applied
    to the file's content before validation, so they pass the same checks as the file itself.
    `check_device=False` validates a profile for another machine (e.g. a CUDA profile on a CPU box).
    """
    path = Path(path)
    if not path.exists():
        available = ", ".join(sorted(p.name for p in path.parent.glob("*.yaml"))) or "none"
        raise ProfileError(f"no profile at {path} (profiles in {path.parent}: {available})")
    try:
        profile = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ProfileError(f"{path} is not valid YAML: {_yaml_problem(error)}") from error
    if not isinstance(profile, dict):
        raise ProfileError(f"{path} must be a YAML mapping of sections; see {EXAMPLE_PROFILE} for a complete profile")
    for override in overrides:
        apply_override(profile, override)
    source = f"{path} with --set {' --set '.join(overrides)}" if overrides else str(path)
    return validate_profile(profile, source=source, check_device=check_device)


def apply_override(profile: dict[str, Any], override: str) -> None:
    """Set `KEY.PATH=VALUE` in a raw (not yet validated) profile, the value read as YAML (`50` is a
    number, `true` a boolean, `[256, 512]` a list); keys are checked by the validation that follows."""
    key, equals, text = override.partition("=")
    parts = key.strip().split(".")
    if not equals or not all(parts):
        raise ProfileError(f"--set {override!r} is not KEY=VALUE with a dotted key; write e.g. --set quantization.iters=50")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ProfileError(f"--set {override!r}: the value is not valid YAML ({_yaml_problem(error)})") from error
    node = profile
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            section = ".".join(parts[: depth + 1])
            raise ProfileError(f"--set {override!r}: {section} is a value ({child!r}), not a section with keys; "
                               f"set it directly, e.g. --set {section}=...")
        node = child
    node[parts[-1]] = value


def quantization_section(profile: dict[str, Any]) -> QuantizationSection:
    """The (validated) profile's quantization settings as their typed model, which names variants."""
    return QuantizationSection.model_validate(profile["quantization"])


def validate_profile(profile: dict[str, Any], source: str = "profile", *, check_device: bool = True) -> dict[str, Any]:
    """The profile as a plain dict with defaults filled in, or a ProfileError listing every problem."""
    try:
        validated = Profile.model_validate(profile, context={"check_device": check_device})
    except ValidationError as error:
        problems = [_describe(detail) for detail in error.errors(include_url=False)]
        raise ProfileError(_problem_report(source, problems)) from None
    dumped = validated.model_dump()
    problems = architecture_problems(dumped)
    if problems:
        raise ProfileError(_problem_report(source, problems))
    return dumped




def _problem_report(source: str, problems: list[str]) -> str:
    if len(problems) == 1:
        return f"{source}: {problems[0]}"
    return f"{source} has {len(problems)} problems:\n" + "\n".join(f"  - {problem}" for problem in problems)


def _describe(detail: ErrorDetails) -> str:
    """One pydantic error as a sentence: the key path, what was found, what is allowed."""
    location, kind, value = detail["loc"], detail["type"], detail.get("input")
    key = _key_path(location)
    message = detail["msg"].removeprefix("Value error, ")
    if kind == "extra_forbidden":
        return _unknown_key(location)
    if kind == "missing":
        return f"{key} is missing; add it (see {EXAMPLE_PROFILE} for a complete profile)"
    if kind == "too_short":
        needed = detail.get("ctx", {}).get("min_length", 1)
        if needed > 1 and value:
            return f"{key}={value!r} has {len(value)} value(s); give at least {needed}"
        return f"{key} is empty; give at least {'one value' if needed == 1 else needed}"
    if kind == "literal_error":
        allowed = re.findall(r"'([^']*)'|(\d+)", detail.get("ctx", {}).get("expected", ""))
        nearest = difflib.get_close_matches(str(value), [a or b for a, b in allowed], n=1)
        hint = f"; did you mean {nearest[0]!r}?" if nearest else ""
        return f"{key}={value!r} is not allowed: {message[0].lower()}{message[1:]}{hint}"
    if kind == "list_type" and isinstance(value, (str, int, float)):
        return f"{key}={value!r} is a single value: {message[0].lower()}{message[1:]}; write a list, e.g. [{value}]"
    if kind == "model_type":
        return f"{key} must be a mapping of its keys (see {EXAMPLE_PROFILE}), got {value!r}"
    if kind.endswith("_type") and isinstance(value, str):
        return f"{key}={value!r} is a string: {message[0].lower()}{message[1:]}; write the value without quotes"
    return f"{key}={value!r}: {message[0].lower()}{message[1:]}"


def _key_path(location: tuple[int | str, ...]) -> str:
    path = ""
    for part in location:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "the profile"


def _unknown_key(location: tuple[int | str, ...]) -> str:
    """Names the nearest valid key: at the same level, else in a section (a top-level `seqlens`)."""
    *parent, name = location
    section = _section_model(tuple(parent))
    allowed = list(section.model_fields)
    nearest = difflib.get_close_matches(str(name), allowed, n=1)
    if not nearest:
        nested = {key: f"{field}.{key}" for field in allowed for key in _nested_keys(section, field)}
        nearest = [nested[key] for key in difflib.get_close_matches(str(name), list(nested), n=1)]
    hint = f"did you mean {nearest[0]!r}? " if nearest else ""
    where = _key_path(tuple(parent)) if parent else "the top level"
    return f"{_key_path(location)} is not a known key; {hint}keys of {where}: {', '.join(allowed)}"


def _nested_keys(section: type[BaseModel], field: str) -> list[str]:
    annotation = section.model_fields[field].annotation
    models = [a for a in (annotation, *get_args(annotation)) if isinstance(a, type) and issubclass(a, BaseModel)]
    return list(models[0].model_fields) if models else []


def _section_model(location: tuple[int | str, ...]) -> type[BaseModel]:
    model: type[BaseModel] = Profile
    for part in location:
        annotation = model.model_fields[str(part)].annotation
        model = next(a for a in (annotation, *get_args(annotation)) if isinstance(a, type) and issubclass(a, BaseModel))
    return model


def _yaml_problem(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else problem
