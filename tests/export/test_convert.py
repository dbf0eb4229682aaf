"""Quant type checks of the GGUF conversion (toolkit/export/convert.py)."""

from __future__ import annotations

import pytest

from toolkit.core.errors import UserError


def test_check_quant_lists_valid_types():
    from toolkit.export.convert import QUANT_TYPES, check_quant

    assert check_quant("Q4_K_M") == "q4_k_m"
    with pytest.raises(UserError) as exc:
        check_quant("q3_xx")
    assert all(q in str(exc.value) for q in QUANT_TYPES)
