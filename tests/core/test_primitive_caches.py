"""primitive_caches: what `bound` sets, and that oneDNN in this torch reads it when set in-process
before its first primitive (fails when oneDNN renames the variable or reads it at load time)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from toolkit.core import primitive_caches as C


def test_bound_sets_what_is_unset_and_keeps_the_users_value():
    env = {"LRU_CACHE_CAPACITY": "2048", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": ""}
    assert C.bound(env) == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": str(C.CAPACITY)}
    assert env == {"LRU_CACHE_CAPACITY": "2048", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": str(C.CAPACITY)}
    assert C.bound(env) == {}


# Products of three new shapes, then the first again: with room for one primitive the first was evicted.
_SCRIPT = """
import sys
from toolkit.core import primitive_caches
primitive_caches.CAPACITY = int(sys.argv[1])
primitive_caches.bound()  # after the process started, as the trainer calls it
import torch
from toolkit.core import packed_linear
pack = packed_linear.pack(torch.randn(64, 32), 8)
for rows in (8, 9, 10, 8):
    packed_linear.matmul(torch.randn(rows, 32), pack)
"""


def _creations(capacity: int) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in C.VARIABLES}
    out = subprocess.run([sys.executable, "-c", _SCRIPT, str(capacity)], capture_output=True, text=True, check=True,
                         env={**env, "ONEDNN_VERBOSE": "profile_create"})
    return [line.split(",")[3] for line in (out.stdout + out.stderr).splitlines()
            if line.startswith("onednn_verbose") and ",inner_product," in line]


def test_onednn_takes_the_capacity_set_in_process():
    torch = pytest.importorskip("torch")
    from toolkit.core import packed_linear

    if not (torch.backends.mkldnn.is_available() and packed_linear.available()):
        pytest.skip("this torch runs no oneDNN linear")
    assert _creations(1024)[-1] == "create:cache_hit"
    assert _creations(1)[-1] == "create:cache_miss"
