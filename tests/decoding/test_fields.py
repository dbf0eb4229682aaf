"""The decoding fields table: it covers `DecodingConfig` exactly, the CLI flags built from it
parse as before, and its UI / typed values convert back. No model, no torch."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys

import pytest

from toolkit.core.errors import UserError
from toolkit.decoding.config import PRESETS, DecodingConfig, preset
from toolkit.decoding.fields import FIELDS, field_named
from toolkit.decoding.flags import add_decoding_arguments, config_from_args


def test_table_covers_exactly_the_config_fields():
    names = [f.name for f in FIELDS]
    assert len(names) == len(set(names))
    assert sorted(names) == sorted(f.name for f in dataclasses.fields(DecodingConfig))
    for f in FIELDS:
        assert f.help and f.control.label
        assert f.control.kind in ("radio", "slider", "number", "textbox")
        if f.control.kind == "slider":
            assert f.control.minimum <= f.to_ui(f.default) <= f.control.maximum, f.name
            # no slider position is a value DecodingConfig refuses (temperature: 0, then 0.05 >= 1e-6)
            for v in (f.control.minimum, f.control.minimum + f.control.step, f.control.maximum):
                DecodingConfig(**{f.name: f.from_ui(v)})
        # every default survives the trip through its UI control
        assert f.from_ui(f.to_ui(f.default)) == f.default, f.name


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_decoding_arguments(parser)
    return parser.parse_args(argv)


def test_flags_are_the_same_as_before():
    parser = argparse.ArgumentParser()
    add_decoding_arguments(parser)
    flags = {a.option_strings[0]: a for a in parser._actions if a.option_strings and a.dest != "help"}
    assert list(flags) == ["--preset", "--strategy", "--temperature", "--top-k", "--top-p", "--min-p",
                           "--repetition-penalty", "--num-beams", "--length-penalty", "--max-new-tokens",
                           "--seed", "--stop"]
    assert all(a.default is None for a in flags.values())  # None = not given, so a preset survives
    assert flags["--strategy"].choices == ["greedy", "sample", "beam"]
    assert flags["--preset"].choices == sorted(PRESETS)
    assert flags["--top-k"].dest == "top_k" and flags["--top-k"].type is int
    assert flags["--top-p"].type is float and flags["--seed"].type is int
    assert isinstance(flags["--stop"], argparse._AppendAction) and flags["--stop"].metavar == "TEXT"
    assert "(default 1.0)" in flags["--temperature"].help  # read from DecodingConfig


def test_flags_give_the_same_config_as_before():
    assert config_from_args(_parse()) == DecodingConfig()
    assert config_from_args(_parse("--preset", "balanced", "--temperature", "0.2", "--seed", "3")) == \
        preset("balanced", temperature=0.2, seed=3)
    assert config_from_args(_parse("--preset", "creative")).top_p == PRESETS["creative"]["top_p"]
    two = config_from_args(_parse("--stop", "END", "--stop", "\n\n", "--max-new-tokens", "9"))
    assert two == DecodingConfig(stop=("END", "\n\n"), max_new_tokens=9)
    beam = config_from_args(_parse("--strategy", "beam", "--num-beams", "3", "--length-penalty", "0.5"))
    assert (beam.strategy, beam.num_beams, beam.length_penalty) == ("beam", 3, 0.5)
    with pytest.raises(UserError, match="top_p must be in"):
        config_from_args(_parse("--top-p", "1.5"))
    with pytest.raises(SystemExit):
        _parse("--strategy", "nucleus")


def test_ui_and_typed_values_convert_back():
    seed, stop, top_k = field_named("seed"), field_named("stop"), field_named("top_k")
    assert seed.from_ui(-1) is None and seed.from_ui(7.0) == 7 and seed.to_ui(None) == -1
    assert seed.from_text("none") is None and seed.from_text(" 12 ") == 12
    assert stop.from_ui("END\n\nUser:") == ("END", "User:") and stop.to_ui(("a", "b")) == "a\nb"
    assert stop.from_text("END|User:") == ("END", "User:")
    assert top_k.from_ui(40.0) == 40 and isinstance(top_k.from_ui("40"), int)
    with pytest.raises(UserError, match="top_k must be a whole number, got 2.5"):
        top_k.from_ui(2.5)
    with pytest.raises(UserError, match="temperature must be a number"):
        field_named("temperature").from_text("warm")
    with pytest.raises(UserError, match="unknown decoding setting.*top_q"):
        field_named("top_q")


def test_import_and_generate_help_stay_torch_free():
    code = ("import argparse, sys\nimport toolkit.decoding\n"
            "from toolkit.commands import chat, generate\n"
            "for command in (generate, chat):\n    command.add_arguments(argparse.ArgumentParser())\n"
            "heavy = [m for m in ('torch', 'transformers', 'gradio') if m in sys.modules]\nassert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_a_sampling_setting_without_a_strategy_means_sampling():
    """`--temperature 0.9` alone samples, as llama.cpp, Ollama and LM Studio read it (it was silently
    greedy); an explicit --strategy wins, a seed alone stays greedy, and temperature 0 is still greedy."""
    from toolkit.decoding.config import implied_strategy

    assert config_from_args(_parse("--temperature", "0.9")).strategy == "sample"
    assert config_from_args(_parse("--top-p", "0.8")).strategy == "sample"
    assert config_from_args(_parse("--temperature", "0.9", "--strategy", "greedy")).strategy == "greedy"
    assert config_from_args(_parse("--seed", "3")).strategy == "greedy"
    assert config_from_args(_parse("--preset", "precise", "--min-p", "0.1")).strategy == "sample"
    assert config_from_args(_parse("--strategy", "beam", "--top-k", "5")).strategy == "beam"
    assert config_from_args(_parse("--temperature", "0")).effective_strategy == "greedy"
    assert implied_strategy("greedy", ["max_new_tokens"]) == "greedy"
