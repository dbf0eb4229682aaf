"""The decoding flags of `toolkit generate` and `toolkit chat`, generated from `FIELDS`."""

from __future__ import annotations

import argparse

from toolkit.decoding.config import PRESETS, DecodingConfig, implied_strategy
from toolkit.decoding.fields import FIELDS


def _help(f) -> str:
    if f.default is None or f.default == ():
        return f.help
    return f"{f.help} (default {f.default})"


def add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --preset and one flag per decoding field (--stop repeatable) to `parser`.

    Every flag defaults to None, so `config_from_args` can tell "not given" from a value and a
    preset's values survive the flags the user left out."""
    g = parser.add_argument_group("decoding")
    g.add_argument("--preset", choices=sorted(PRESETS), help="named settings; other flags override it")
    for f in FIELDS:
        if f.repeated:
            g.add_argument(f.flag, dest=f.name, action="append", default=None, metavar="TEXT", help=_help(f))
        elif f.choices:
            g.add_argument(f.flag, dest=f.name, default=None, choices=list(f.choices), help=_help(f))
        else:
            g.add_argument(f.flag, dest=f.name, default=None, type=f.type, help=_help(f))


def config_from_args(args: argparse.Namespace) -> DecodingConfig:
    """DecodingConfig from the preset (if any) plus the flags given; UserError if invalid. A
    sampling flag (--temperature, --top-k, --top-p, --min-p) without --strategy means sampling."""
    data = dict(PRESETS[args.preset]) if args.preset else {}
    given = []
    for f in FIELDS:
        value = getattr(args, f.name)
        if f.repeated:
            if value:  # --stop given at least once replaces the preset's stop strings
                data[f.name] = tuple(value)
        elif value is not None:
            data[f.name] = value
            given.append(f.name)
    data["strategy"] = implied_strategy(data.get("strategy", DecodingConfig.strategy), given)
    return DecodingConfig.from_dict(data)
