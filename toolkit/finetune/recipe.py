"""Fine-tune recipes: `recipes/<name>/recipe.yaml` mapped onto validated dataclasses.

YAML keys are the dataclass fields below, section by section. Unknown keys, keys given twice, wrong
types and out-of-range values raise `UserError` naming the key and the file (and the profile), on
every machine whichever profile it applies (the range rules are in `toolkit.finetune.recipe_checks`).
A `cpu:` section holds the same sections with partial values; it is applied on top when no GPU is
present, so one recipe serves a consumer GPU (Llama-3.2-1B, QLoRA) and a CPU box (small model, short
run). A `fallback:` section, alike, is applied on a GPU when the base falls back to
`model.fallback_model` (a small model wants other settings than the big one; on a CPU the `cpu:`
profile already targets it). `--set section.key=value` overrides come last and are coerced to the
field's type.

This module imports only the standard library and PyYAML: `toolkit finetune --help` stays instant.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

from toolkit.core.errors import UserError
# The allowed values stay importable from here (`recipe.METHODS`), as before the checks moved out.
from toolkit.finetune.recipe_checks import DTYPES, FORMATS, METHODS, SCHEDULERS, check_ranges  # noqa: F401
from toolkit.finetune.sources import read_text
from toolkit.finetune.typed_yaml import coerce, field_types, load_yaml



@dataclass
class ModelConfig:
    """Which weights to fine-tune."""

    # HF id, local HF folder, .gguf file, `embedded`, or `auto` (the estimator's pick).
    base_model: str = "embedded"
    # Used when the base can't be had (offline, gated, doesn't fit); "" disables the fallback.
    fallback_model: str = "embedded"
    # Seconds to wait for the HF hub before calling it unreachable.
    hub_timeout_s: float = 3.0
    # Longest run `base_model: auto` may pick ("90s", "30m", "1.5h", "2h30m"); "" = the default
    # (30 min on a CPU, none on a GPU; toolkit.estimate.timeplan).
    time_budget: str = ""


@dataclass
class MethodConfig:
    """How the weights are trained: adapters on a 4-bit base, adapters on a full-precision base, or all weights."""

    # qlora (LoRA adapters on a 4-bit base, least memory) | lora | full (all weights) | auto (plain lora where
    # memory is plentiful: no 4-bit dequantization per step; else qlora)
    name: str = "qlora"
    quant_type: str = "nf4"  # bitsandbytes 4-bit type: nf4 | fp4
    double_quant: bool = True
    # Compute dtype; `auto` asks toolkit.core.hardware.dtype_choice (bf16 on Ampere+, fp16 on older GPUs,
    # fp32 on Pascal's sm61; on CPU bf16 only where native and measured faster, else fp32). float16 on a
    # CPU is an error.
    compute_dtype: str = "auto"
    # Use Unsloth's FastLanguageModel when CUDA and unsloth are present.
    unsloth: bool = True


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    # Dropout on the adapter input during training. 0 (off) is PEFT's default and what Unsloth's fast path
    # needs; any other value also takes a CPU's LoRA layers off the fused path (slower: docs/cpu-training.md).
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])


@dataclass
class TrainSource:
    """One training source in a mix: a file (relative to the recipe folder) or `hf:org/name[:split]`."""

    path: str = ""  # a data file (relative to the recipe folder) or hf:org/name[:split]
    # How often its examples are seen: 2 = twice, 0.5 = a seeded random half (training.seed).
    weight: float = 1.0


@dataclass
class DataConfig:
    """Training/eval files (paths relative to the recipe folder) and how to turn them into tokens.

    A data file is JSONL, a JSON array, CSV/TSV, Parquet or Arrow (or .txt raw text), or a hub
    dataset `hf:org/name[:split]`. `train` is one such source, or a list of sources mixed by weight:

        train:
          - {path: chats.jsonl, weight: 2}
          - {path: hf:org/name:train, weight: 0.5}
    """

    # One data file or dataset, or a list of {path, weight} sources mixed by weight.
    train: str | list[TrainSource] = "train.jsonl"
    eval: str = ""  # "" = no held-out set (no eval loss, no report comparison)
    format: str = "auto"  # auto (from each record's keys) | messages | sharegpt | alpaca | prompt_completion | text
    max_seq_len: int = 512  # tokens per training sequence (the chat template included)
    overlong: str = "truncate"  # truncate | drop examples longer than max_seq_len
    packing: bool = True  # padding-free packing: no compute spent on pad tokens
    completion_only_loss: bool = True  # loss on assistant tokens only
    system_prompt: str = ""  # prepended to conversations that have no system message


@dataclass
class TrainingConfig:
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    learning_rate: float = 2e-4
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    neftune_noise_alpha: float = 0.0  # NEFTune (Jain et al. 2023): noise on input embeddings while training; 0 = off
    # LoRA+ (Hayou et al. 2024): LoRA's B matrices learn this many times faster than A; 0 = plain LoRA
    loraplus_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    gradient_checkpointing: bool = False
    save_steps: int = 50  # checkpoint every N optimizer steps (for --resume); 0 = only on Ctrl-C
    logging_steps: int = 5
    seed: int = 42


@dataclass
class EvalConfig:
    eval_steps: int = 0  # held-out loss every N steps; 0 = none (the report still measures base and fine-tuned)
    eval_examples: int = 0  # held-out examples used for the in-training eval loss; 0 = all
    early_stopping_patience: int = 0  # evals without improvement before stopping; 0 = off
    report: bool = True  # base vs fine-tuned report (report.json / report.md)
    generation_samples: int = 16  # held-out questions answered greedily for the generation score
    max_new_tokens: int = 96
    side_by_side: int = 3


@dataclass
class OutputConfig:
    runs_dir: str = "runs"
    name: str = ""  # run-folder prefix; "" = the recipe's name


@dataclass
class Recipe:
    name: str = ""
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    # Folder the recipe came from; relative data paths resolve against it. Not a YAML key.
    root: Path = field(default=Path("."), metadata={"yaml": False})
    # Which profile was applied ("cpu", "fallback" or ""); recorded in the resolved recipe. Not a YAML key.
    profile: str = field(default="", metadata={"yaml": False})
    # The validated `fallback:` section, applied by `for_fallback` once a run falls back. Not a YAML key.
    fallback_profile: dict = field(default_factory=dict, metadata={"yaml": False})
    # The recipe file, for errors found after loading (the fallback profile with --set). Not a YAML key.
    source: str = field(default="", metadata={"yaml": False})

    def data_path(self, rel: str) -> Path:
        p = Path(rel).expanduser()
        return p if p.is_absolute() else self.root / p

    def to_dict(self) -> dict:
        """The recipe as YAML-ready data (what `recipe.yaml` in a run folder holds)."""
        out = {}
        for f in dataclasses.fields(self):
            if f.metadata.get("yaml", True):
                v = getattr(self, f.name)
                out[f.name] = dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
        return out


_SECTION_TYPES = {
    "model": ModelConfig, "method": MethodConfig, "lora": LoraConfig, "data": DataConfig,
    "training": TrainingConfig, "eval": EvalConfig, "output": OutputConfig,
}
_TOP_SCALARS = ("name", "description")


PROFILES = ("cpu", "fallback")


def _apply(recipe: Recipe, data: dict, src: str, allow_profile: bool) -> dict:
    """Write the YAML mapping `data` onto `recipe`; returns its profile sections ({"cpu": ...})."""
    if not isinstance(data, dict):
        raise UserError(f"{src}: a recipe must be a mapping of sections, got {type(data).__name__}")
    profiles = {}
    for key, value in data.items():
        if key in PROFILES and allow_profile:
            if not isinstance(value, dict):
                raise UserError(f"{src}: `{key}` must be a mapping of sections")
            profiles[key] = value
            continue
        if key in _TOP_SCALARS:
            setattr(recipe, key, coerce(value, str, f"{src}: {key}"))
            continue
        if key not in _SECTION_TYPES:
            known = ", ".join([*_TOP_SCALARS, *_SECTION_TYPES, *PROFILES])
            raise UserError(f"{src}: unknown key `{key}` (known: {known})")
        if not isinstance(value, dict):
            raise UserError(f"{src}: `{key}` must be a mapping, got {type(value).__name__}")
        section = getattr(recipe, key)
        types_ = field_types(type(section))
        for k, v in value.items():
            if k not in types_:
                raise UserError(f"{src}: unknown key `{key}.{k}` (known: {', '.join(types_)})")
            setattr(section, k, coerce(v, types_[k], f"{src}: {key}.{k}"))
    return profiles


def parse_override(item: str) -> tuple[list[str], object]:
    """`section.key=value` → (path, YAML-typed value). `true`, `3`, `2e-4`, `[a, b]` parse as YAML."""
    import yaml

    if "=" not in item:
        raise UserError(f"--set {item!r}: expected section.key=value")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise UserError(f"--set {item!r}: empty key")
    try:
        value = load_yaml(raw, f"--set {item}", ".".join(path)) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return path, value


def _nest(path: list[str], value) -> dict:
    out: object = value
    for p in reversed(path):
        out = {p: out}
    return out  # type: ignore[return-value]


def recipe_file(spec: str | Path) -> Path:
    """`recipes/finance`, `recipes/finance/recipe.yaml` or `finance` (looked up under recipes/)."""
    p = Path(spec).expanduser()
    if p.is_dir():
        p = p / "recipe.yaml"
    elif not p.exists() and p.suffix not in (".yaml", ".yml") and (Path("recipes") / p / "recipe.yaml").is_file():
        p = Path("recipes") / p / "recipe.yaml"
    if not p.is_file():
        raise UserError(f"recipe not found: {spec} (expected a folder with recipe.yaml, or a .yaml file)")
    return p


def load(spec: str | Path, overrides: typing.Sequence[str] = (), gpu: bool | None = None) -> Recipe:
    """Load and validate a recipe; apply its `cpu:` profile when `gpu` is False (None: detect), then overrides."""
    import yaml

    path = recipe_file(spec)
    src = str(path)
    try:
        data = load_yaml(read_text(path), src)  # UTF-8 as `recipe new` writes it, not the locale's (cp1252)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{src}:{mark.line + 1}" if mark is not None else src
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{where}: bad YAML: {problem}") from None
    if data is None:
        raise UserError(f"{src}: empty recipe")
    recipe = Recipe(root=path.parent.resolve(), source=src)
    profiles = _apply(recipe, data, src, allow_profile=True)
    if not recipe.name:
        recipe.name = path.parent.name if path.name == "recipe.yaml" else path.stem
    # Every profile is checked (keys, types, then ranges) on every machine, and so is the base a GPU
    # trains with: a bad value must not pass on the machine whose profile happens to shadow it.
    variants = {name: copy.deepcopy(recipe) for name in PROFILES if name in profiles}
    for name, variant in variants.items():
        _apply(variant, profiles[name], f"{src} ({name} profile)", allow_profile=False)
    check_ranges(recipe, src)
    for name, variant in variants.items():
        check_ranges(variant, f"{src} ({name} profile)")
    if "fallback" in profiles:
        recipe.fallback_profile = profiles["fallback"]
    profile = profiles.get("cpu")
    if profile is not None:
        if gpu is None:
            from toolkit.core.hardware import detect

            gpu = detect().kind == "cuda"
        if not gpu:
            _apply(recipe, profile, f"{src} (cpu profile)", allow_profile=False)
            recipe.profile = "cpu"
    _apply_overrides(recipe, overrides)
    check_ranges(recipe, src if not overrides else f"{src} (with --set)")
    return recipe


def _apply_overrides(recipe: Recipe, overrides: typing.Sequence[str]) -> None:
    for item in overrides:
        p, value = parse_override(item)
        if len(p) == 1 and p[0] in _TOP_SCALARS:
            _apply(recipe, {p[0]: value}, f"--set {item}", allow_profile=False)
        elif len(p) != 2:
            raise UserError(f"--set {item}: expected section.key=value (e.g. training.max_steps=20)")
        else:
            _apply(recipe, _nest(p, value), f"--set {item}", allow_profile=False)


def for_fallback(recipe: Recipe, overrides: typing.Sequence[str] = ()) -> Recipe:
    """The recipe a run trains the fallback model with: a copy with the `fallback:` profile applied,
    then the same `--set` overrides. Unchanged when a profile is already applied (on a CPU the
    `cpu:` profile targets the small model) or the recipe has no `fallback:` section."""
    if recipe.profile or not recipe.fallback_profile:
        return recipe
    out = copy.deepcopy(recipe)
    # load() checked the profile alone; what can still fail here is its mix with the --set values.
    src = f"{recipe.source or recipe.name} (fallback profile" + (", with --set)" if overrides else ")")
    _apply(out, out.fallback_profile, src, allow_profile=False)
    _apply_overrides(out, overrides)
    check_ranges(out, src)
    out.profile = "fallback"
    return out


def dump(recipe: Recipe) -> str:
    """YAML text of the resolved recipe (profile and overrides applied)."""
    import yaml

    data = recipe.to_dict()
    header = f"# resolved recipe {recipe.name!r}" + (f" (profile: {recipe.profile})" if recipe.profile else "")
    return header + "\n" + yaml.safe_dump(data, sort_keys=False)
