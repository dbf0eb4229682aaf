"""YAML values checked against dataclass field types: the one coercion the recipe reader uses for
the file, its profiles and `--set` overrides. Errors name the key (`where`) and what was expected.
`load_yaml` is the reader itself: YAML with no key given twice in one mapping.
Standard library only at import (PyYAML is imported when used), so `toolkit finetune --help` stays instant."""

from __future__ import annotations

import dataclasses
import types
import typing

from toolkit.core.errors import UserError


def load_yaml(text: str, src: str, root: str = ""):
    """`yaml.safe_load(text)`, but a key given twice in one mapping raises UserError naming `src`, the
    line and the key: PyYAML keeps the last value silently, so `lora: {r: 16, r: 8}` would train with
    r=8 while the file reads r=16 to whoever looks first. `root` prefixes the key named (the
    `section.key` of a `--set` value). Malformed YAML raises yaml.YAMLError."""
    import yaml

    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_duplicate_keys(node, src, root, set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _refuse_duplicate_keys(node, src: str, path: str, seen: set[int]) -> None:
    import yaml

    if id(node) in seen:  # an alias (*name) revisits its anchor's node, possibly recursively
        return
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicate_keys(item, src, f"{path}[{i}]", seen)
    elif isinstance(node, yaml.MappingNode):
        first: dict[tuple[str, str], int] = {}
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                # `<<: *base` merges are meant to be overridden; complex keys are not recipe keys
                _refuse_duplicate_keys(value, src, path, seen)
                continue
            dotted = f"{path}.{key.value}" if path else key.value
            line = key.start_mark.line + 1
            if (key.tag, key.value) in first:
                raise UserError(f"{src}:{line}: duplicate key `{dotted}` (first given on line "
                                f"{first[key.tag, key.value]}); remove one")
            first[key.tag, key.value] = line
            _refuse_duplicate_keys(value, src, dotted, seen)


def field_types(cls) -> dict[str, type]:
    """{field name: resolved type} of dataclass `cls`."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def coerce(value, typ, where: str):
    """Check `value` against `typ` (YAML already typed it); ints are accepted for floats."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):  # `str | list[X]`: a YAML list takes the list form
        alts = typing.get_args(typ)
        as_list = [a for a in alts if typing.get_origin(a) is list]
        return coerce(value, as_list[0] if isinstance(value, list) and as_list else
                       next(a for a in alts if a not in as_list), where)
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping with keys {', '.join(field_types(typ))}, got {value!r}")
        types_ = field_types(typ)
        for k in value:
            if k not in types_:
                raise UserError(f"{where}: unknown key `{k}` (known: {', '.join(types_)})")
        return typ(**{k: coerce(v, types_[k], f"{where}.{k}") for k, v in value.items()})
    if origin is list:
        (item,) = typing.get_args(typ)
        if isinstance(value, str):  # `--set lora.target_modules=q_proj,v_proj`
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise UserError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return [coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{where}: expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise UserError(f"{where}: expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `5e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"{where}: expected a number, got {value!r}")
    if typ is str:
        if value is None:
            return ""
        if isinstance(value, str):
            return value
        raise UserError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
    raise AssertionError(f"unhandled field type {typ}")
