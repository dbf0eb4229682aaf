"""`FIELDS`: one entry per `DecodingConfig` field, the single list the CLI flags (`flags.py`),
the chat UI's controls (`ui/chat.py`) and the terminal chat's `/set key=value` are built from.

An entry says what one value is (str, int or float), the flag's help text, how the web UI shows
it, and how a UI or typed value converts back. Defaults are never written here: they are read
from `DecodingConfig` itself. Adding a field to `DecodingConfig` without an entry fails a test.
Plain data and no heavy imports: `toolkit generate --help` reads this.
"""

from __future__ import annotations

from dataclasses import dataclass

from toolkit.core.errors import UserError
from toolkit.decoding.config import STRATEGIES, DecodingConfig

_DEFAULTS = DecodingConfig()


@dataclass(frozen=True)
class Control:
    """How the web UI shows a field. kind: radio | slider | number | textbox; minimum, maximum
    and step are for sliders."""

    kind: str
    label: str
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None


@dataclass(frozen=True)
class Field:
    """One `DecodingConfig` field.

    type: what one value is parsed as (str, int or float).
    choices: the allowed values of a str field (the flag's choices, the radio's options).
    none_as: the UI number that stands for None (seed: -1 = random); any negative number does.
    repeated: the field is a tuple of strings: a repeatable flag, one value per line in the UI,
      values separated by | in the terminal's /set.
    """

    name: str
    type: type
    help: str
    control: Control
    choices: tuple[str, ...] = ()
    none_as: int | None = None
    repeated: bool = False

    @property
    def flag(self) -> str:
        """The CLI flag, e.g. --top-k."""
        return "--" + self.name.replace("_", "-")

    @property
    def default(self):
        """`DecodingConfig`'s default for this field."""
        return getattr(_DEFAULTS, self.name)

    def to_ui(self, value):
        """The UI control's value that shows `value` (a DecodingConfig value)."""
        if self.repeated:
            return "\n".join(value)
        if value is None and self.none_as is not None:
            return self.none_as
        return value

    def from_ui(self, value):
        """A UI control's value (a number may come as a float or a string) as the DecodingConfig
        value. Range checks are left to DecodingConfig; this only fixes the type, so a UserError
        here names the field too."""
        if self.repeated:
            return tuple(s for s in str(value or "").split("\n") if s)
        if self.type is str:
            return value.strip() if isinstance(value, str) else value
        if value is None and self.none_as is not None:
            return None
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise UserError(f"{self.name} must be a number, got {value!r}") from None
        if self.none_as is not None and number < 0:
            return None
        if self.type is int:
            if not number.is_integer():
                raise UserError(f"{self.name} must be a whole number, got {value}")
            return int(number)
        return number

    def from_text(self, raw: str):
        """A typed value (the terminal's /set key=value): as in the UI, but stop strings are
        separated by | and `none` clears an optional field."""
        if self.repeated:
            return tuple(s for s in raw.split("|") if s)
        raw = raw.strip()
        if self.none_as is not None and raw.lower() == "none":
            return None
        return self.from_ui(raw)


# Table order is the order of the flags in --help, of the UI controls and of the chat API's inputs.
FIELDS: tuple[Field, ...] = (
    Field("strategy", str, "token choice", Control("radio", "Strategy"), choices=STRATEGIES),
    Field("temperature", float, "sampling temperature, 0 = greedy",
          Control("slider", "Temperature (0 = greedy)", 0, 2, 0.05)),
    Field("top_k", int, "keep the k most likely tokens, 0 = off", Control("slider", "Top-k (0 = off)", 0, 200, 1)),
    Field("top_p", float, "nucleus: keep tokens up to this probability mass, 1 = off",
          Control("slider", "Top-p (1 = off)", 0.01, 1, 0.01)),
    Field("min_p", float, "drop tokens below min_p x top probability, 0 = off",
          Control("slider", "Min-p (0 = off)", 0, 1, 0.01)),
    Field("repetition_penalty", float, "penalise tokens already seen, 1 = off",
          Control("slider", "Repetition penalty (1 = off)", 0.5, 2, 0.05)),
    Field("num_beams", int, "beam width for --strategy beam", Control("slider", "Beams (strategy beam)", 1, 16, 1)),
    # Any number is valid (below 0 favours short answers); the slider covers the useful range.
    Field("length_penalty", float, "beam score = logprob / length**this",
          Control("slider", "Length penalty (strategy beam)", 0, 2, 0.1)),
    Field("max_new_tokens", int, "at most this many new tokens", Control("number", "Max new tokens")),
    Field("seed", int, "random seed for sampling", Control("number", "Seed (-1 = random)"), none_as=-1),
    Field("stop", str, "stop string (repeatable)", Control("textbox", "Stop strings (one per line)"), repeated=True),
)

_BY_NAME = {f.name: f for f in FIELDS}


def field_named(name: str) -> Field:
    """The table entry for `name`; UserError (listing the known ones) if there is none."""
    if name not in _BY_NAME:
        raise UserError(f"unknown decoding setting(s): {name} (known: {', '.join(sorted(_BY_NAME))})")
    return _BY_NAME[name]
