"""oneDNN's primitive caches, bounded for processes whose matrix shapes keep changing.

PyTorch runs bf16 matmuls on a CPU with native bf16, and the pre-packed linears of both dtypes
(`toolkit.core.packed_linear`), through oneDNN, which makes a primitive for each new shape and keeps it
in two LRU caches: oneDNN's own (`ONEDNN_PRIMITIVE_CACHE_CAPACITY`) and ideep's, PyTorch's wrapper
(`LRU_CACHE_CAPACITY`), 1,024 entries each by default. A packed training row holds a different number
of tokens at every step, so every step's shapes are new: on the finance recipe's CPU profile ~50
primitives a step that were not in the cache (`ONEDNN_VERBOSE=profile_create`). They stay until the
caches are full, and they hold memory: 200 bf16 products of new shapes (three a shape) kept 369 MiB
(~0.6 MiB a product); the recipe's bf16 run held 0.49 GiB more after 40 steps than with both caches at 128
entries, and its process peaked ~0.5 GiB higher (the Zen 4 EPYC, docs/cpu-training.md).

A step makes ~50 new primitives and reuses ~2,000 calls' worth, so a cache a few steps deep keeps every
hit a step has: at 128 entries the same ~50 misses a step as at 1,024. CAPACITY leaves room for the
evaluation's and the report's shapes beside a step's. The libraries read the setting when they make
their first primitive, so `bound()` must run before the process computes anything with torch; a
value the user set is kept.
"""

from __future__ import annotations

import os

CAPACITY = 256
VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def bound(environ=os.environ) -> dict[str, str]:
    """Set each of VARIABLES to CAPACITY in `environ` where it is unset; returns what it set."""
    set_now = {name: str(CAPACITY) for name in VARIABLES if not environ.get(name)}
    environ.update(set_now)
    return set_now
