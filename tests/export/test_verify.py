"""The verification math (toolkit/export/verify.py) against torch."""

from __future__ import annotations

import pytest


def test_next_token_nll_and_perplexity_match_torch_cross_entropy():
    import numpy as np
    import torch

    from toolkit.export.verify import next_token_nll, perplexity

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(17, 50)).astype(np.float32) * 4
    ids = rng.integers(0, 50, size=17)
    ours = next_token_nll(logits, ids)
    ref = torch.nn.functional.cross_entropy(
        torch.tensor(logits[:-1], dtype=torch.float64), torch.tensor(ids[1:]), reduction="none"
    ).numpy()
    assert np.allclose(ours, ref, atol=1e-9)
    assert perplexity(ours) == pytest.approx(float(torch.exp(torch.tensor(ref).mean())), rel=1e-12)


def test_top1_agreement_and_relative_increase():
    import numpy as np

    from toolkit.export.verify import relative_increase, top1_agreement

    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(40, 9)), rng.normal(size=(40, 9))
    expected = sum(int(np.argmax(a[i]) == np.argmax(b[i])) for i in range(40)) / 40
    assert top1_agreement(a, b) == expected
    assert top1_agreement(a, a) == 1.0
    assert relative_increase(10.5, 10.0) == pytest.approx(0.05)
    with pytest.raises(ValueError):
        top1_agreement(a, b[:5])
