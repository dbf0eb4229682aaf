"""One line of help per recipe field, read from the comments on the dataclass fields in `recipe.py`.

The comments next to (or right above) each field in `toolkit/finetune/recipe.py` are the
documentation; `field_docs()` reads them from the source, so the comments `toolkit recipe new`
writes into recipe.yaml can't drift from the code. Fields that carry no comment there are
documented in `_UNCOMMENTED` below (a test checks that every field has exactly one of the two).
`render_yaml` writes a recipe with each field's line of help above it.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re

_FIELD_LINE = re.compile(r"^\s+(\w+)\s*:\s*[^=]+=.*$")

_UNCOMMENTED = {
    "name": "Recipe name; run folders are named <name>-<date>-<time> (default: the folder's name).",
    "description": "One line saying what this fine-tune teaches; shown in run reports.",
    "method.double_quant": "Quantize the 4-bit blocks' scales too (QLoRA): ~0.4 bit/weight less memory.",
    "lora.r": "Adapter rank: trainable capacity (and adapter size) grows with it.",
    "lora.alpha": "Adapter scale numerator: the update is scaled by alpha / r.",
    "lora.target_modules": "Linear layers that get adapters: [all-linear] or some of q_proj, k_proj, v_proj, o_proj, "
                           "gate_proj, up_proj, down_proj.",
    "training.epochs": "Passes over the (mixed) training examples; ignored when max_steps > 0.",
    "training.learning_rate": "Peak learning rate (AdamW).",
    "training.lr_scheduler": "linear | cosine | constant | constant_with_warmup.",
    "training.warmup_ratio": "Fraction of the steps spent ramping the learning rate up from 0.",
    "training.weight_decay": "AdamW weight decay.",
    "training.max_grad_norm": "Gradients are clipped to this global norm.",
    "training.batch_size": "Sequences per device per step (packed sequences with data.packing).",
    "training.grad_accum": "Steps whose gradients add up before one optimizer update (effective batch = batch_size x this).",
    "training.gradient_checkpointing": "Recompute activations in the backward: less memory, ~30% more time.",
    "training.logging_steps": "Log loss and learning rate every N optimizer steps.",
    "training.seed": "Seed for data order, mixing, dropout and LoRA init: same seed, same run (0 to 2**32 - 1).",
    "eval.max_new_tokens": "Longest answer generated per held-out question (greedy) for the report.",
    "eval.side_by_side": "Held-out questions shown base vs fine-tuned in report.md.",
    "output.runs_dir": "Where run folders go (relative to the current directory).",
}


@functools.cache  # the source doesn't change while the process runs
def _comments(cls) -> dict[str, str]:
    """Field name → the comment after it on its line, or else the comment lines right above it."""
    lines, _ = inspect.getsourcelines(cls)
    out: dict[str, str] = {}
    above: list[str] = []
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("#").strip())
            continue
        m = _FIELD_LINE.match(line)
        if m:
            trailing = line.partition("  #")[2]
            doc = trailing.strip() or " ".join(above)
            if doc:
                out[m.group(1)] = doc
        above = []
    return out


def sections() -> dict[str, type]:
    """Recipe YAML sections in file order (name → dataclass)."""
    from toolkit.finetune import recipe

    return {f.name: f.default_factory for f in dataclasses.fields(recipe.Recipe)  # type: ignore[misc]
            if f.metadata.get("yaml", True) and dataclasses.is_dataclass(f.default_factory)}


def field_docs() -> dict[str, str]:
    """`section.field` (and top-level `name`, `description`) → one line of help."""
    from toolkit.finetune import recipe

    docs: dict[str, str] = {}
    top = _comments(recipe.Recipe)
    for f in dataclasses.fields(recipe.Recipe):
        if f.metadata.get("yaml", True) and f.name not in sections():
            docs[f.name] = top.get(f.name) or _UNCOMMENTED.get(f.name, "")
    for name, cls in sections().items():
        found = _comments(cls)  # read-only: cached
        for f in dataclasses.fields(cls):
            key = f"{name}.{f.name}"
            docs[key] = found.get(f.name) or _UNCOMMENTED.get(key, "")
    return docs


def source_docs() -> dict[str, str]:
    """Docs of a `{path, weight}` training source (`data.train` list entries)."""
    from toolkit.finetune.recipe import TrainSource

    return dict(_comments(TrainSource))


def _yaml_scalar(value) -> str:
    import yaml

    # Dump inside a flow list so a scalar is not followed by YAML's document-end marker.
    return yaml.safe_dump([value], default_flow_style=True, width=10**6, sort_keys=False).strip()[1:-1]


def render_yaml(rec, header: list[str]) -> str:
    """recipe.yaml text: `header` as comments, then every field with its help on the line above."""
    docs = field_docs()
    out = [f"# {h}" if h else "#" for h in header]
    for key, value in rec.to_dict().items():
        if not isinstance(value, dict):
            out += ["", f"# {docs[key]}", f"{key}: {_yaml_scalar(value)}"]
            continue
        out += ["", f"{key}:"]
        for k, v in value.items():
            out.append(f"  # {docs[f'{key}.{k}']}")
            out.append(f"  {k}: {_yaml_scalar(v)}")
    return "\n".join(out) + "\n"
