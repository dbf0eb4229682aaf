"""Memory budgets: sizes, GPU names, detection."""

from __future__ import annotations

import pytest

from toolkit.estimate.budget import GPUS, gpu_bytes, parse_size, resolve_budget
from toolkit.core.errors import UserError

GIB = 1024**3


@pytest.mark.parametrize("text,expected", [
    ("8GB", 8 * GIB), ("8 GiB", 8 * GIB), ("8g", 8 * GIB), ("24", 24 * GIB), ("7.5GiB", int(7.5 * GIB)),
    ("7680MiB", 7680 * 1024**2), ("7680mb", 7680 * 1024**2), ("1TB", 1024 * GIB), ("123456789B", 123456789),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["eight", "8 GB GB", "", "8XB", "-8GB", "0", "0.0000000001B"])
def test_parse_size_rejects(text):
    with pytest.raises(UserError, match="--vram"):
        parse_size(text)


def test_gpu_names_are_forgiving_about_spelling():
    assert gpu_bytes("RTX 3060 12GB") == ("RTX 3060 12GB", 12 * GIB)
    assert gpu_bytes("nvidia geforce rtx 4090 24gb") == ("RTX 4090 24GB", 24 * GIB)
    assert gpu_bytes("rtx4070tisuper16gib") == ("RTX 4070 Ti Super 16GB", 16 * GIB)
    assert gpu_bytes("A10G") == ("A10G 24GB", 24 * GIB)  # one size only: no need to say it
    with pytest.raises(UserError, match="several sizes"):
        gpu_bytes("A100")
    with pytest.raises(UserError, match="did you mean: RTX 4090 24GB"):
        gpu_bytes("RTX 4090 25GB")
    assert all(name.endswith(f"{gib}GB") for name, gib in GPUS.items())


@pytest.mark.parametrize("name,expected", [
    ("RTX 3090", "RTX 3090 24GB"), ("GeForce RTX 3090", "RTX 3090 24GB"), ("RTX 4070 Ti", "RTX 4070 Ti 12GB"),
    ("RTX 2080", "RTX 2080 8GB"), ("rtx 4060", "RTX 4060 8GB"), ("RTX 4080", "RTX 4080 16GB"),
])
def test_a_gpu_of_one_size_is_not_confused_with_its_ti_or_super(name, expected):
    assert gpu_bytes(name)[0] == expected


@pytest.mark.parametrize("name", ["RTX 3080", "RTX 4060 Ti", "NVIDIA GeForce RTX 4060 Ti", "A100"])
def test_a_gpu_of_several_sizes_asks_for_the_size(name):
    with pytest.raises(UserError, match="several sizes"):
        gpu_bytes(name)


def test_resolve_budget_sources():
    assert resolve_budget("8GB", None).device == "cuda"
    assert resolve_budget(None, "T4").bytes == 16 * GIB
    detected = resolve_budget(None, None)
    assert detected.bytes > 0 and detected.device in ("cpu", "cuda")
    with pytest.raises(UserError, match="either"):
        resolve_budget("8GB", "T4")
