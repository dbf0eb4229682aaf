"""Fixtures shared by the export tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def embedded_tok(embedded_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_dir)
