"""`DecodingConfig`: the decoding knobs, validated on construction, and the named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields

from toolkit.core.errors import UserError

STRATEGIES = ("greedy", "sample", "beam")
MIN_TEMPERATURE = 1e-6


@dataclass(frozen=True)
class DecodingConfig:
    """How to pick tokens.

    strategy: greedy (argmax every step), sample (draw from the reshaped distribution) or
      beam (keep `num_beams` hypotheses, return the best by log-prob / length**length_penalty).
    temperature: divides the logits before sampling; <1 sharpens, >1 flattens. 0 means greedy.
    top_k: keep only the k most likely tokens (0 = off).
    top_p: keep the smallest set of most likely tokens whose probability reaches p (1 = off).
    min_p: drop tokens less likely than min_p x the top token's probability (0 = off).
    repetition_penalty: >1 makes tokens already in the prompt or answer less likely (1 = off).
    num_beams, length_penalty: beam search width and its length normalisation exponent.
    max_new_tokens: hard cap on generated tokens. stop: strings that end the answer (cut out).
    seed: for sampling; None draws a fresh one.
    """

    strategy: str = "greedy"
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    num_beams: int = 4
    length_penalty: float = 1.0
    max_new_tokens: int = 256
    stop: tuple[str, ...] = field(default_factory=tuple)
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        checks = [
            (self.strategy in STRATEGIES, f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}"),
            # Near 1e-38 logits / temperature overflow float32 and every probability is NaN; at 1e-6 a
            # draw is already the argmax unless two logits are within ~1e-4, so this floor loses nothing.
            (_num(self.temperature) and (self.temperature == 0 or self.temperature >= MIN_TEMPERATURE),
             f"temperature must be 0 (greedy) or at least 1e-6, got {self.temperature}"),
            (_int(self.top_k) and self.top_k >= 0, f"top_k must be an integer >= 0 (0 = off), got {self.top_k}"),
            (_num(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (_num(self.min_p) and 0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (_num(self.repetition_penalty) and self.repetition_penalty > 0,
             f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}"),
            (_int(self.num_beams) and 1 <= self.num_beams <= 16, f"num_beams must be an integer in [1, 16], got {self.num_beams}"),
            (_num(self.length_penalty), f"length_penalty must be a number, got {self.length_penalty}"),
            (_int(self.max_new_tokens) and self.max_new_tokens >= 1,
             f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
            (self.seed is None or (_int(self.seed) and 0 <= self.seed < 2**64),  # torch.Generator's range
             f"seed must be an integer in [0, 2**64), got {self.seed}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    @property
    def effective_strategy(self) -> str:
        """Sampling at temperature 0 is greedy (as in llama.cpp and the OpenAI API), and so is a beam
        search of one beam (as in transformers, whose repetition penalty then acts on the logits,
        not on the log-probabilities a beam search scores)."""
        if (self.strategy == "sample" and self.temperature == 0) or (self.strategy == "beam" and self.num_beams == 1):
            return "greedy"
        return self.strategy

    @classmethod
    def from_dict(cls, data: dict) -> "DecodingConfig":
        """Build from a mapping; unknown keys are an error naming the key."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"unknown decoding setting(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**data)

    def replace(self, **changes) -> "DecodingConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["stop"] = list(self.stop)
        return d


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x  # x == x rejects NaN


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# Plain data, so the UI, the CLI and the docs read the same numbers.
PRESETS: dict[str, dict] = {
    # Reproducible, the most likely continuation: short factual answers, code, extraction.
    "precise": {"strategy": "greedy", "repetition_penalty": 1.1},
    # The usual chat setting: mild sampling with the long tail cut off.
    "balanced": {"strategy": "sample", "temperature": 0.7, "top_k": 50, "top_p": 0.9, "min_p": 0.05,
                 "repetition_penalty": 1.1},
    # More variety (brainstorming, stories); min-p keeps it from derailing at high temperature.
    "creative": {"strategy": "sample", "temperature": 1.1, "top_k": 0, "top_p": 0.98, "min_p": 0.05,
                 "repetition_penalty": 1.05},
}


# Settings that act only when sampling: setting one while the strategy is greedy (and not set too)
# means sampling, as llama.cpp, Ollama and LM Studio read a temperature; temperature 0 still
# decodes greedily (`effective_strategy`). A seed alone does not: it would sample at temperature 1.
SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "min_p")


def implied_strategy(strategy: str, given) -> str:
    """The strategy once the settings named in `given` are set on top of `strategy`."""
    if strategy == "greedy" and "strategy" not in given and any(f in SAMPLING_FIELDS for f in given):
        return "sample"
    return strategy


def preset(name: str, **overrides) -> DecodingConfig:
    """The named preset, with `overrides` (None values ignored) applied on top."""
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r} (choose from {', '.join(PRESETS)})")
    data = dict(PRESETS[name])
    data.update({k: v for k, v in overrides.items() if v is not None})
    return DecodingConfig.from_dict(data)

# The fields some preset sets; choosing a preset resets these (to the defaults where it is silent)
# and keeps the rest (beams, max tokens, seed, stop) as the user set them.
PRESET_FIELDS = tuple(f.name for f in fields(DecodingConfig) if any(f.name in p for p in PRESETS.values()))


def with_preset(cfg: DecodingConfig, name: str) -> DecodingConfig:
    """`cfg` with preset `name` chosen: what the chat UI's preset menu and the terminal's /preset do."""
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r} (choose from {', '.join(PRESETS)})")
    chosen = {**DecodingConfig().to_dict(), **PRESETS[name]}
    return cfg.replace(**{k: chosen[k] for k in PRESET_FIELDS})
